//! `dedup_window`: a node that remembers recent message ids gives the application each message
//! once, even when the transport delivers it twice (here: a sender whose every message is
//! duplicated by fault injection). A node without it sees the duplicates, which proves they are
//! there.

use comms_host::{fault_injection::FaultConfig, Node, PluginLibrary};
use comms_tests::artifacts;
use std::time::Duration;

const MESSAGES: u32 = 50;
const END: u32 = u32::MAX;

/// What `node` receives up to and including the end marker (TCP keeps order, so every
/// duplicate of an earlier message arrives before the end marker does).
async fn received_until_end(node: &Node) -> Vec<u32> {
    let mut numbers = Vec::new();
    loop {
        let received =
            tokio::time::timeout(Duration::from_secs(10), node.receive::<u32>()).await.unwrap().unwrap();
        if received.message == END {
            return numbers;
        }
        numbers.push(received.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_window_gives_the_application_each_message_once() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let start = |id: &str, window: usize| {
        Node::builder(id).dedup_window(window).transport_library("tcp", tcp.clone(), "").build()
    };
    let with_window = start("dedup-on", 1_000).await.unwrap();
    let without = start("dedup-off", 0).await.unwrap();
    let address = |node: &Node| node.transports()[0].local_address.clone();
    let sender = Node::builder("dedup-sender")
        .transport_library("tcp", tcp.clone(), "")
        .faults(FaultConfig { duplicate: 1.0, ..FaultConfig::default() })
        .static_peer("dedup-on", [("tcp", address(&with_window).as_str())])
        .static_peer("dedup-off", [("tcp", address(&without).as_str())])
        .build()
        .await
        .unwrap();

    for n in (0..MESSAGES).chain([END]) {
        sender.send("dedup-on", &n).await.unwrap();
        sender.send("dedup-off", &n).await.unwrap();
    }
    let once: Vec<u32> = (0..MESSAGES).collect();
    assert_eq!(received_until_end(&with_window).await, once, "each message once, in order");
    assert!(with_window.duplicates_count() >= u64::from(MESSAGES), "{}", with_window.duplicates_count());
    let twice = received_until_end(&without).await;
    assert_eq!(twice.len(), 2 * MESSAGES as usize, "without the window the duplicates arrive: {twice:?}");
    assert_eq!(without.duplicates_count(), 0);

    sender.close().await.unwrap();
    with_window.close().await.unwrap();
    without.close().await.unwrap();
}

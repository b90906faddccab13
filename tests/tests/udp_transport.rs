//! The UDP ad-hoc plugin as users load it (`libcomms_udp.so`): the conformance suite in reliable
//! mode, two nodes exchanging 1 MiB messages over loopback, and two nodes that find each other by
//! multicast beacons with no config but the plugin name. Across two network namespaces with packet
//! loss: `udp_namespaces.rs`.

use comms_host::{
    conformance::{run_suite, SuiteConfig, SuiteReport},
    Node, PeerStatus, PluginLibrary,
};
// Reliable mode is ordered and reliable, with plain links.
use comms_tests::{artifacts, ORDERED_RELIABLE_SKIPS as SKIPS};
use std::time::{Duration, Instant};

fn library() -> PluginLibrary {
    PluginLibrary::load(&artifacts().udp_plugin).unwrap_or_else(|error| panic!("{error}"))
}

async fn suite(config_toml: &str) -> SuiteReport {
    run_suite(&library(), &SuiteConfig::new(config_toml)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_mode_passes_the_conformance_suite() {
    let report = suite("").await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.skipped_names(), SKIPS, "{report}");
    let info = report.info.clone().expect("the transport was created");
    assert_eq!(info.capabilities.names(), ["ordered", "reliable"], "{report}");
}

/// A loopback address with a UDP port that is free right now.
fn free_udp_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local address").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_one_mebibyte_messages_in_reliable_mode() {
    let (address_a, address_b) = (free_udp_address(), free_udp_address());
    let config = |address: &str| format!("listen = \"{address}\"\nmode = \"reliable\"");
    let a = Node::builder("a")
        .transport_library("udp", library(), &config(&address_a))
        .static_peer("b", [("udp", address_b.as_str())])
        .build()
        .await
        .unwrap();
    let b = Node::builder("b")
        .transport_library("udp", library(), &config(&address_b))
        .static_peer("a", [("udp", address_a.as_str())])
        .build()
        .await
        .unwrap();
    let message = |n: u8| -> Vec<u8> { (0..1usize << 20).map(|i| (i as u8).wrapping_mul(7) ^ n).collect() };
    let started = Instant::now();
    for n in 0..8u8 {
        a.send_raw("b", vec![], message(n), None).await.unwrap();
        b.send_raw("a", vec![], message(n + 100), None).await.unwrap();
    }
    for n in 0..8u8 {
        let at_b =
            tokio::time::timeout(Duration::from_secs(30), b.receive_envelope()).await.unwrap().unwrap();
        assert_eq!(at_b.from.as_str(), "a");
        assert!(at_b.payload.as_slice() == message(n).as_slice(), "message {n} to b intact and in order");
        let at_a =
            tokio::time::timeout(Duration::from_secs(30), a.receive_envelope()).await.unwrap().unwrap();
        assert!(
            at_a.payload.as_slice() == message(n + 100).as_slice(),
            "message {n} to a intact and in order"
        );
    }
    eprintln!("16 MiB exchanged in {:?}", started.elapsed());
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_nothing_but_the_plugin_name_discover_each_other_and_talk() {
    let zero_config = |id: &str| {
        Node::builder(id).transport_library("udp", library(), "").discovery_library(library(), "").build()
    };
    let a = zero_config("zero-config-a").await.unwrap();
    let b = zero_config("zero-config-b").await.unwrap();
    let started = Instant::now();
    while !a.peers().iter().any(|peer| peer.record.id.as_str() == "zero-config-b")
        || !b.peers().iter().any(|peer| peer.record.id.as_str() == "zero-config-a")
    {
        assert!(started.elapsed() < Duration::from_secs(10), "the nodes never discovered each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("discovered each other in {:?}", started.elapsed());
    let payload: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    a.send_raw("zero-config-b", vec![], payload.clone(), None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), b.receive_envelope()).await.unwrap().unwrap();
    assert!(got.payload.as_slice() == payload.as_slice());
    a.close().await.unwrap();
    let started = Instant::now();
    // Gone, or marked down: a's goodbye may come before b's discovery ever heard a's beacon (b
    // can know a from its hello alone), and then only the goodbye tells b that a left.
    while b
        .peers()
        .iter()
        .any(|peer| peer.record.id.as_str() == "zero-config-a" && peer.status == PeerStatus::Up)
    {
        assert!(started.elapsed() < Duration::from_secs(10), "a closed node never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.close().await.unwrap();
}

/// Numbers for the closing note, not a pass/fail check:
/// `cargo test --release -p comms-tests --test udp_transport -- --ignored --nocapture`.
/// Best-effort mode drops whatever overflows the kernel's receive buffer, and the suite's bursts
/// (20 senders at once, 4 MiB messages) only fit a 4 MiB buffer; with a smaller
/// `net.core.rmem_max` losses are expected, so the test says so and checks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_mode_passes_the_conformance_suite_on_loopback() {
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok();
    if rmem_max.and_then(|text| text.trim().parse::<u64>().ok()).is_none_or(|max| max < 4 << 20) {
        eprintln!("SKIPPED: net.core.rmem_max is below 4 MiB, so best-effort loses datagrams in bursts");
        return;
    }
    let report = suite("mode = \"best-effort\"").await;
    assert!(report.passed(), "{report}");
    assert!(report.info.clone().expect("created").capabilities.names().is_empty(), "{report}");
}

/// A reliable send to a peer that vanished is reported, as with the stream transports: after
/// `peer_timeout_ms` without acknowledgements the queue is dropped and the next send to that
/// address fails once with a retryable `UNREACHABLE`; the one after starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_vanished_peer_is_reported_once() {
    // A socket that receives and never answers: the peer's process is gone but nothing says so.
    let vanished = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = vanished.local_addr().unwrap().to_string();
    let a = Node::builder("sender")
        .liveness(None, Duration::from_secs(60)) // no heartbeats: only our sends reach the peer
        .transport_library("udp", library(), "peer_timeout_ms = 300")
        .static_peer("vanished", [("udp", address.as_str())])
        .build()
        .await
        .unwrap();
    a.send_raw("vanished", vec![], vec![7; 100_000], None).await.expect("queued");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let error = a.send_raw("vanished", vec![], vec![8; 10], None).await.unwrap_err();
    let comms_host::SendError::Transport { error, .. } = &error else { panic!("{error}") };
    assert_eq!(error.code, comms_plugin_api::ErrorCode::UNREACHABLE, "{error}");
    // Ours, and what the host itself sent the peer (its announcement).
    assert!(error.retryable && error.message.contains("queued message(s)"), "{error}");
    a.send_raw("vanished", vec![], vec![9; 10], None).await.expect("reported once, then afresh");
    // The two sends that said Ok were given up on with the peer (the host's own announcement
    // does not count): close says so.
    let error = a.close().await.expect_err("the queued messages were not delivered");
    assert_eq!(error.undelivered, 2, "{error}");
}

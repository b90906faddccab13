//! Bursts through the `Node` API and the thread budget, with the TCP plugin loaded at run time.

use comms_host::{Node, SendError};
use comms_tests::artifacts;
use std::time::Duration;

/// Two nodes over TCP; the builder loads the plugin by name with `plugin_threads`.
async fn pair(threads: u32) -> (Node, Node) {
    comms_tests::tcp_node_pair("burst-sender", "burst-receiver", |node| node.plugin_threads(threads)).await
}

// One test per process area: the thread budget is decided by the first load of the library, so
// both checks share one pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_arrives_whole_and_in_order_and_plugins_keep_to_their_thread_budget() {
    let (sender, receiver) = pair(0).await;
    // `plugin_threads = 0` leaves it to the plugin: the TCP plugin asks for one worker
    // (`Plugin::WORKER_THREADS`; the host drives its sockets), not the general default of two.
    // Static discovery, linked into the host, runs on the host's runtime and starts none.
    // The plugin's runtime threads carry its name (`comms-tcp`).
    let threads = comms_tests::threads::by_name();
    assert_eq!(threads.get("comms-tcp"), Some(&1), "plugin runtime workers in this process: {threads:?}");

    // A send's (and a publication's) future holds the envelope behind a pointer, not by value
    // at every level of the send path (they took 2,056 and 1,112 bytes): small enough for the
    // system allocator's per-thread cache when an application spawns its sends or keeps many in
    // flight.
    let sending = sender.send_raw("burst-receiver", Vec::<(String, String)>::new(), vec![0u8; 8], None);
    let size = std::mem::size_of_val(&sending);
    assert!(size <= 1024, "a send_raw future takes {size} bytes");
    drop(sending);
    let publishing = sender.publish("sizes.of.futures", &0u32);
    let size = std::mem::size_of_val(&publishing);
    assert!(size <= 1024, "a publish future takes {size} bytes");
    drop(publishing);

    let messages: Vec<u32> = (0..5_000).collect();
    let ids = sender.send_many("burst-receiver", messages.chunks(1_000).flatten()).await.unwrap();
    assert_eq!(ids.len(), 5_000);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5_000, "every message has its own id");
    for (n, id) in ids.iter().enumerate() {
        let received = tokio::time::timeout(Duration::from_secs(10), receiver.receive::<u32>())
            .await
            .expect("message in time")
            .unwrap();
        assert_eq!((received.message, received.id), (n as u32, *id), "in order, none lost");
    }

    // A burst to a node nobody knows is refused as a whole, naming it.
    let error = sender.send_many("nobody", [1u32, 2, 3]).await.unwrap_err();
    assert!(matches!(error, SendError::UnknownPeer(ref peer) if peer.as_str() == "nobody"), "{error}");

    // A burst whose messages the transport refuses in part says which; the others go.
    let dir = artifacts().tcp_plugin.parent().expect("plugin directory").to_path_buf();
    let small = Node::builder("small-frames")
        .plugin_dir(&dir)
        .transport("tcp", "tcp", "max_frame_size = 1024")
        .build()
        .await
        .unwrap();
    let payloads = [vec![1u8; 10], vec![2u8; 4096], vec![3u8; 10], vec![4u8; 4096]];
    let error =
        small.send_raw_many("small-frames", Vec::<(String, String)>::new(), payloads).await.unwrap_err();
    let SendError::Batch { total, failed, first } = error else {
        panic!("expected a batch failure: {error}")
    };
    assert_eq!((total, failed), (4, vec![1, 3]));
    assert!(first.to_string().contains("exceeds max_message_size"), "{first}");
    for expected in [1u8, 3] {
        let received =
            tokio::time::timeout(Duration::from_secs(10), small.receive_envelope()).await.unwrap().unwrap();
        assert_eq!(received.payload.as_slice(), &[expected; 10][..]);
    }
    small.close().await.unwrap();
    receiver.close().await.unwrap();
    sender.close().await.unwrap();
}

//! Draining bursts with `Node::receive_envelopes` and `Node::receive_raw_many`, with the
//! plugins loaded at run time: order kept, none lost, a batch never larger than asked or than
//! what waits, and the at-least-once variant's unacknowledged messages delivered again.

use comms_host::{Node, ReceiveError};
use comms_tests::{artifacts, scratch_dir};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
/// The headers of every message: raw bytes.
fn raw() -> Vec<(String, String)> {
    vec![("content-type".to_string(), "application/octet-stream".to_string())]
}

/// Two nodes over TCP; each node's inbox holds `inbox` messages.
async fn tcp_pair(inbox: usize) -> (Node, Node) {
    comms_tests::tcp_node_pair("drain-sender", "drain-receiver", |node| node.receive_queue_capacity(inbox))
        .await
}

/// Waits until `node`'s inbox holds `depth` messages.
async fn until_inbox_holds(node: &Node, depth: u64) {
    let started = tokio::time::Instant::now();
    while node.status().inbox_depth < depth {
        assert!(started.elapsed() < WAIT, "the inbox never held {depth}: {:?}", node.status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_burst_comes_whole_in_order_and_in_batches_bounded_by_max_and_the_inbox() {
    const INBOX: usize = 8;
    const MESSAGES: u32 = 2_000;
    let (sender, receiver) = tcp_pair(INBOX).await;
    let payloads: Vec<Vec<u8>> = (0..MESSAGES).map(|n| n.to_be_bytes().to_vec()).collect();
    for chunk in payloads.chunks(250) {
        sender.send_raw_many("drain-receiver", raw(), chunk.to_vec()).await.unwrap();
    }

    // With the inbox full, one call takes everything waiting (the engine moves the messages
    // parked behind it in as the batch frees room), never more than the inbox holds.
    until_inbox_holds(&receiver, INBOX as u64).await;
    let first = receiver.receive_envelopes(100).await.unwrap();
    assert_eq!(first.len(), INBOX, "a full inbox of {INBOX} drained by one call");

    let mut next = 0u32;
    let mut sizes = vec![first.len()];
    let mut batch = first;
    loop {
        for envelope in &batch {
            let n = u32::from_be_bytes(envelope.payload.as_slice().try_into().expect("4 bytes"));
            assert_eq!(n, next, "in order, none lost, none twice");
            assert_eq!(envelope.from.as_str(), "drain-sender");
            next += 1;
        }
        if next == MESSAGES {
            break;
        }
        // A max below what the inbox holds: the call keeps to it.
        batch = tokio::time::timeout(WAIT, receiver.receive_envelopes(5)).await.expect("in time").unwrap();
        assert!((1..=5).contains(&batch.len()), "a batch of {} for a max of 5", batch.len());
        sizes.push(batch.len());
    }
    assert!(sizes.iter().filter(|size| **size == 5).count() > 10, "batches were filled: {sizes:?}");

    // The single-message call still sees what follows, and a max of 0 takes one.
    sender.send_raw("drain-receiver", raw(), vec![7u8], None).await.unwrap();
    let last = tokio::time::timeout(WAIT, receiver.receive_envelopes(0)).await.expect("in time").unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].payload.as_slice(), &[7u8]);

    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    let closed = receiver.receive_envelopes(10).await.unwrap_err();
    assert!(matches!(closed, ReceiveError::Closed), "{closed}");
}

/// Two nodes sharing one SQLite file (a transport with acknowledgements), found statically.
async fn sqlite_pair(dir: &std::path::Path) -> (Node, Node) {
    let config = format!("database = {:?}\npoll_max_ms = 20", dir.join("comms.db"));
    let build = |id: &str, peer: &str| {
        Node::builder(id)
            .plugin_dir(artifacts().plugin_dir.clone())
            .transport("sqlite", "sqlite", &config)
            .static_peer(peer, [("sqlite", peer)])
            .build()
    };
    let sender = build("drain-sqlite-sender", "drain-sqlite-receiver").await.unwrap();
    let receiver = build("drain-sqlite-receiver", "drain-sqlite-sender").await.unwrap();
    (sender, receiver)
}

/// Takes messages with `receive_raw_many` until `count` have come.
async fn take_raw(node: &Node, count: usize) -> Vec<comms_host::Received<comms_plugin_api::Envelope>> {
    let mut taken = Vec::new();
    while taken.len() < count {
        let batch = tokio::time::timeout(WAIT, node.receive_raw_many(count - taken.len()))
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} messages came", taken.len()))
            .unwrap();
        taken.extend(batch);
    }
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_taken_in_a_batch_are_settled_one_by_one_and_the_unacknowledged_come_again() {
    let dir = scratch_dir("receive-many-sqlite");
    let (sender, receiver) = sqlite_pair(&dir).await;
    let ids = sender.send_raw_many("drain-sqlite-receiver", raw(), (0..6u8).map(|n| vec![n])).await.unwrap();

    // Each message of a batch is its own: three acknowledged, three handed back.
    let mut taken = take_raw(&receiver, 6).await;
    let taken_ids: Vec<_> = taken.iter().map(|received| received.id).collect();
    assert_eq!(taken_ids, ids, "in order");
    for (n, received) in taken.iter_mut().enumerate() {
        if n % 2 == 0 {
            received.ack();
        } else {
            received.nack();
        }
    }
    let again = take_raw(&receiver, 3).await;
    let again_ids: Vec<_> = again.iter().map(|received| received.id).collect();
    assert_eq!(again_ids, vec![ids[1], ids[3], ids[5]], "the handed-back messages, and only they");
    drop(taken);

    // receive_envelopes acknowledges its whole batch at once: after a close (which settles
    // what was taken) and a restart, nothing comes again, while a new message still does.
    let more =
        sender.send_raw_many("drain-sqlite-receiver", raw(), (10..14u8).map(|n| vec![n])).await.unwrap();
    let mut drained = Vec::new();
    while drained.len() < 4 {
        let batch =
            tokio::time::timeout(WAIT, receiver.receive_envelopes(4)).await.expect("in time").unwrap();
        drained.extend(batch.into_iter().map(|envelope| envelope.id));
    }
    assert_eq!(drained, more);
    for mut received in again {
        received.ack();
    }
    receiver.close().await.unwrap();
    let config = format!("database = {:?}\npoll_max_ms = 20", dir.join("comms.db"));
    let receiver = Node::builder("drain-sqlite-receiver")
        .plugin_dir(artifacts().plugin_dir.clone())
        .transport("sqlite", "sqlite", &config)
        .static_peer("drain-sqlite-sender", [("sqlite", "drain-sqlite-sender")])
        .build()
        .await
        .unwrap();
    let marker = sender.send_raw("drain-sqlite-receiver", raw(), vec![99u8], None).await.unwrap();
    let next = tokio::time::timeout(WAIT, receiver.receive_envelopes(10)).await.expect("in time").unwrap();
    assert_eq!(
        next.iter().map(|envelope| envelope.id).collect::<Vec<_>>(),
        vec![marker],
        "only the new message: everything taken before was settled"
    );
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

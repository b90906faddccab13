//! The TCP transport through the host-side API, with the plugin linked into the test binary
//! (the same boundary as a loaded library, without `dlopen`): batched sends, statistics,
//! reconnects, bad input.

use crate::TcpPlugin;
use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, ErrorCode, MessageId, NodeId, Outbound,
};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(10);

async fn transport(node: &str, config: &str) -> LoadedTransport {
    let config = format!("listen = \"127.0.0.1:0\"\n{config}");
    PluginLibrary::linked::<TcpPlugin>().new_transport(&NodeId::new(node), "tcp", &config).await.unwrap()
}

fn envelope(n: u128, size: usize) -> Envelope {
    Envelope::new(MessageId::from_u128(n), "sender", Destination::node("receiver"), vec![n as u8; size])
        .with_header("n", n.to_string())
}

fn address(transport: &LoadedTransport) -> String {
    transport.info().local_address.clone()
}

/// Receives until `count` messages came; their ids, in order.
async fn receive_ids(transport: &LoadedTransport, count: usize) -> Vec<u128> {
    let mut ids = Vec::new();
    while ids.len() < count {
        let batch =
            tokio::time::timeout(LIMIT, transport.receive(1000)).await.expect("messages in time").unwrap();
        assert!(!batch.is_empty(), "the transport closed");
        ids.extend(batch.into_iter().map(|inbound| inbound.envelope.id.as_u128()));
    }
    ids
}

/// Polls `done` until it holds (the writer and reader tasks update counters on their own).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_what_was_sent_and_received() {
    let sender = transport("sender", "").await;
    let receiver = transport("receiver", "").await;
    let to = address(&receiver);
    for n in 0..100 {
        sender.send(&to, envelope(n, 100)).await.unwrap();
    }
    let batch =
        (100..300).map(|n| Outbound { address: to.as_str().into(), envelope: envelope(n, 100) }).collect();
    assert!(sender.send_batch(batch).await.is_empty());
    assert_eq!(receive_ids(&receiver, 300).await, (0..300).collect::<Vec<_>>(), "in order");

    let sent = sender.stats();
    assert_eq!((sent.messages_sent, sent.bytes_sent, sent.send_errors), (300, 30_000, 0));
    let counter = |stats: &comms_plugin_api::host_side::TransportCounters, name: &str| {
        stats.transport.counters.iter().find(|(n, _)| n == name).map(|(_, value)| *value)
    };
    let writes = counter(&sent, "tcp.writes").expect("tcp.writes");
    assert!((1..=300).contains(&writes), "{writes} writes for 300 messages");
    eventually("the send queue empties", || sender.stats().transport.send_queue_depth == 0).await;
    assert_eq!((sent.transport.reconnects, sent.errors), (0, 0));

    let received = receiver.stats();
    assert_eq!((received.messages_received, received.bytes_received), (300, 30_000));
    assert_eq!(received.transport.receive_queue_depth, 0);
    assert_eq!(counter(&received, "tcp.connections.accepted"), Some(1));

    // What waits for the host is counted until it is received.
    sender.send(&to, envelope(300, 10)).await.unwrap();
    eventually("one message waits", || receiver.stats().transport.receive_queue_depth == 1).await;
    assert_eq!(receive_ids(&receiver, 1).await, [300]);
    assert_eq!(receiver.stats().transport.receive_queue_depth, 0);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_queue_arrives_in_order_and_failures_keep_their_index() {
    let sender = transport("sender", "send_queue_capacity = 16\nmax_frame_size = 4096").await;
    let left = transport("left", "").await;
    let right = transport("right", "").await;
    let (to_left, to_right) = (address(&left), address(&right));
    let mut batch = Vec::new();
    for n in 0..1000u128 {
        let (to, size) = match n {
            500 => (&to_left, 5000),     // too large for max_frame_size
            700 => (&to_right, 100_000), // too large as well
            _ if n % 3 == 0 => (&to_right, 100),
            _ => (&to_left, 100),
        };
        batch.push(Outbound { address: to.as_str().into(), envelope: envelope(n, size) });
    }
    let failures = sender.send_batch(batch).await;
    let failed: Vec<(usize, ErrorCode)> = failures.iter().map(|f| (f.index, f.error.code)).collect();
    assert_eq!(failed, [(500, ErrorCode::TOO_LARGE), (700, ErrorCode::TOO_LARGE)]);
    let expected_left: Vec<u128> = (0..1000).filter(|n| n % 3 != 0 && *n != 500 && *n != 700).collect();
    let expected_right: Vec<u128> = (0..1000).filter(|n| n % 3 == 0 && *n != 500 && *n != 700).collect();
    assert_eq!(receive_ids(&left, expected_left.len()).await, expected_left);
    assert_eq!(receive_ids(&right, expected_right.len()).await, expected_right);
    let stats = sender.stats();
    assert_eq!((stats.messages_sent, stats.send_errors), (998, 2));

    // An unreachable address fails every item for it, by index, and nothing else.
    let closed = transport("closed", "reconnect_attempts = 1\nconnect_timeout_ms = 500").await;
    let gone = address(&closed);
    closed.close().await.unwrap();
    let quick = transport("quick", "reconnect_attempts = 1\nconnect_timeout_ms = 500").await;
    let batch = vec![
        Outbound { address: gone.as_str().into(), envelope: envelope(1, 10) },
        Outbound { address: to_left.as_str().into(), envelope: envelope(2, 10) },
    ];
    assert!(quick.send_batch(batch).await.is_empty(), "queued: the dial happens in the background");
    assert_eq!(receive_ids(&left, 1).await, [2]);
    eventually("the writer gives up", || quick.stats().errors >= 1).await;
    let batch = vec![
        Outbound { address: gone.as_str().into(), envelope: envelope(3, 10) },
        Outbound { address: to_left.as_str().into(), envelope: envelope(4, 10) },
        Outbound { address: gone.as_str().into(), envelope: envelope(5, 10) },
    ];
    let failed: Vec<(usize, ErrorCode)> =
        quick.send_batch(batch).await.iter().map(|f| (f.index, f.error.code)).collect();
    assert_eq!(failed, [(0, ErrorCode::UNREACHABLE), (2, ErrorCode::UNREACHABLE)]);
    assert_eq!(receive_ids(&left, 1).await, [4]);
    let dropped =
        quick.stats().transport.counters.into_iter().find(|(name, _)| name == "tcp.messages.dropped");
    assert_eq!(dropped, Some(("tcp.messages.dropped".to_string(), 1)));
    for transport in [sender, left, right, quick] {
        transport.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dialled_again_after_a_loss_is_a_reconnect() {
    let sender = transport("sender", "reconnect_initial_backoff_ms = 5").await;
    let first = transport("receiver", "").await;
    let to = address(&first);
    sender.send(&to, envelope(1, 10)).await.unwrap();
    assert_eq!(receive_ids(&first, 1).await, [1]);
    first.close().await.unwrap();
    // The same address comes back.
    let second = PluginLibrary::linked::<TcpPlugin>()
        .new_transport(&NodeId::new("receiver"), "tcp", &format!("listen = {to:?}"))
        .await
        .unwrap();
    let mut n = 2;
    let got = loop {
        sender.send(&to, envelope(n, 10)).await.unwrap();
        if let Ok(Ok(batch)) = tokio::time::timeout(Duration::from_millis(200), second.receive(10)).await {
            break batch;
        }
        n += 1;
        assert!(n < 50, "the sender never reached the new receiver");
    };
    assert!(!got.is_empty());
    assert_eq!(sender.stats().transport.reconnects, 1);
    sender.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_the_connection_and_counts_as_an_error() {
    let receiver = transport("receiver", "max_frame_size = 4096").await;
    let mut raw = tokio::net::TcpStream::connect(address(&receiver)).await.unwrap();
    let mut hello = vec![1u8];
    hello.extend_from_slice(b"COMMS");
    hello.push(1);
    hello.extend_from_slice(&6u16.to_be_bytes());
    hello.extend_from_slice(b"raw-id");
    let mut bytes = (hello.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&hello);
    // One good envelope, then a frame over the limit: the first is delivered, then the
    // connection is closed.
    let good = comms_plugin_api::stream_transport::protocol::envelope_frame(&envelope(7, 10), 4096).unwrap();
    bytes.extend_from_slice(&good);
    bytes.extend_from_slice(&5000u32.to_be_bytes());
    raw.write_all(&bytes).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(LIMIT, raw.read_to_end(&mut sink)).await.expect("closed").ok();
    assert_eq!(receive_ids(&receiver, 1).await, [7]);
    eventually("the refusal is counted", || receiver.stats().errors == 1).await;
    let refused =
        receiver.stats().transport.counters.into_iter().find(|(name, _)| name == "tcp.connections.refused");
    assert_eq!(refused.map(|(_, value)| value), Some(1));
    receiver.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_every_size_arrive_intact() {
    let sender = transport("sender", "write_batch_bytes = 1000").await;
    let receiver = transport("receiver", "").await;
    let to = address(&receiver);
    let sizes = [0, 1, 100, 999, 1000, 5000, 65_536, 200_000, 3, 70_000, 64];
    let batch = sizes
        .iter()
        .enumerate()
        .map(|(n, &size)| Outbound { address: to.as_str().into(), envelope: envelope(n as u128, size) })
        .collect();
    assert!(sender.send_batch(batch).await.is_empty());
    let mut received = Vec::new();
    while received.len() < sizes.len() {
        received.extend(tokio::time::timeout(LIMIT, receiver.receive(100)).await.unwrap().unwrap());
    }
    for (n, inbound) in received.iter().enumerate() {
        assert_eq!(inbound.envelope, envelope(n as u128, sizes[n]), "message {n}");
    }
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

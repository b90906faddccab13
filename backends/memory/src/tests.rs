//! Unit tests through the host-side API, with the plugin linked into the test binary.

use crate::{MemoryPlugin, ADDRESS_SCHEME};
use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Capabilities, Destination, Envelope, ErrorCode, MessageId, NodeId, Outbound, Payload, PluginError,
};
use std::time::Duration;

fn envelope(n: u128, size: usize) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("sender"),
        Destination::Node(NodeId::new("receiver")),
        Payload::from(vec![n as u8; size]),
    )
    .with_headers(vec![("n".to_string(), n.to_string())])
}

async fn transport(node: &str, config: &str) -> Result<LoadedTransport, PluginError> {
    PluginLibrary::linked::<MemoryPlugin>().new_transport(&NodeId::new(node), "memory", config).await
}

/// A transport at a fixed address; every test uses its own names (tests run in parallel and
/// share the registry).
async fn at(address: &str, extra: &str) -> LoadedTransport {
    transport("node", &format!("address = \"{address}\"\n{extra}")).await.unwrap()
}

async fn ids(transport: &LoadedTransport, max_batch: u32) -> Vec<u128> {
    transport.receive(max_batch).await.unwrap().into_iter().map(|i| i.envelope.id.as_u128()).collect()
}

#[tokio::test]
async fn delivers_in_order_with_everything_intact() {
    let sender = transport("sender", "").await.unwrap();
    let receiver = at("memory://intact", "").await;
    for n in 0..5 {
        sender.send("memory://intact", envelope(n, 3)).await.unwrap();
    }
    let batch = receiver.receive(3).await.unwrap();
    assert_eq!(batch.len(), 3, "receive returns at most max_batch");
    assert_eq!(batch[1].envelope, envelope(1, 3));
    assert_eq!(ids(&receiver, 10).await, [3, 4]);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn declares_ordered_and_reliable_and_its_limits() {
    let transport = at("memory://info", "max_message_size = 100").await;
    let info = transport.info();
    assert_eq!(info.capabilities, Capabilities::ORDERED | Capabilities::RELIABLE);
    assert_eq!(info.local_address, "memory://info");
    assert_eq!(info.max_message_size, 100);
    transport.close().await.unwrap();
}

#[tokio::test]
async fn generated_addresses_are_unique_and_name_the_node() {
    let a = transport("gen", "").await.unwrap();
    let b = transport("gen", "").await.unwrap();
    let (a_address, b_address) = (&a.info().local_address, &b.info().local_address);
    assert!(a_address.starts_with(&format!("{ADDRESS_SCHEME}gen-")), "{a_address}");
    assert_ne!(a_address, b_address);
    a.send(b_address, envelope(7, 1)).await.unwrap();
    assert_eq!(ids(&b, 10).await, [7]);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn unknown_address_is_unreachable_and_retryable() {
    let sender = transport("sender", "").await.unwrap();
    let error = sender.send("memory://nobody-here", envelope(1, 1)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.retryable, "{error}");
    assert!(error.message.contains("`memory://nobody-here`"), "{error}");
    sender.close().await.unwrap();
}

#[tokio::test]
async fn oversized_payloads_are_refused_by_either_limit() {
    let sender = transport("sender", "max_message_size = 1000").await.unwrap();
    let receiver = at("memory://small", "max_message_size = 10").await;
    let error = sender.send("memory://small", envelope(1, 1001)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::TOO_LARGE, "{error}");
    assert!(error.message.contains("1001 bytes exceeds max_message_size 1000"), "{error}");
    let error = sender.send("memory://small", envelope(2, 11)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::TOO_LARGE, "{error}");
    assert!(error.message.contains("max_message_size 10 of the receiving"), "{error}");
    sender.send("memory://small", envelope(3, 10)).await.unwrap();
    assert_eq!(ids(&receiver, 10).await, [3], "the refused messages were not queued");
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn an_address_in_use_is_a_config_error_until_closed() {
    let first = at("memory://taken", "").await;
    let error = transport("other", "address = \"memory://taken\"").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
    assert!(error.message.starts_with("key `address`:"), "{error}");
    assert!(error.message.contains("`memory://taken` is already in use"), "{error}");
    first.close().await.unwrap();
    let second = at("memory://taken", "").await;
    second.close().await.unwrap();
}

#[tokio::test]
async fn a_dropped_transport_frees_its_address() {
    drop(at("memory://dropped", "").await);
    at("memory://dropped", "").await.close().await.unwrap();
}

#[tokio::test]
async fn bad_config_names_the_key() {
    for (config, key) in [
        ("queue_capacity = 0", "queue_capacity"),
        ("max_message_size = 0", "max_message_size"),
        ("address = \"\"", "address"),
        ("queue_capacity = \"big\"", "queue_capacity"),
    ] {
        let error = transport("bad", config).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{config}: {error}");
        assert!(error.message.contains(&format!("key `{key}`")), "{config}: {error}");
    }
    let error = transport("bad", "capacity = 3").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
    assert!(error.message.contains("unknown field `capacity`"), "{error}");
}

#[tokio::test]
async fn a_full_queue_makes_send_wait_until_the_receiver_takes_messages() {
    let sender = transport("sender", "").await.unwrap();
    let receiver = at("memory://narrow", "queue_capacity = 2").await;
    sender.send("memory://narrow", envelope(0, 1)).await.unwrap();
    sender.send("memory://narrow", envelope(1, 1)).await.unwrap();
    let third = sender.send("memory://narrow", envelope(2, 1));
    tokio::pin!(third);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut third).await.is_err(),
        "send to a full queue waits"
    );
    assert_eq!(ids(&receiver, 1).await, [0]);
    tokio::time::timeout(Duration::from_secs(5), third).await.expect("send resumes").unwrap();
    assert_eq!(ids(&receiver, 10).await, [1, 2]);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn close_refuses_sends_and_receive_drains_then_ends() {
    let sender = transport("sender", "").await.unwrap();
    let receiver = at("memory://closing", "").await;
    for n in 0..3 {
        sender.send("memory://closing", envelope(n, 1)).await.unwrap();
    }
    receiver.close().await.unwrap();
    receiver.close().await.unwrap();
    let error = sender.send("memory://closing", envelope(9, 1)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "a closed address is unregistered: {error}");
    assert_eq!(ids(&receiver, 2).await, [0, 1]);
    assert_eq!(ids(&receiver, 2).await, [2]);
    assert!(ids(&receiver, 2).await.is_empty(), "closed and drained");
    let error = receiver.send("memory://anything", envelope(1, 1)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::CLOSED, "{error}");
    sender.close().await.unwrap();
}

#[tokio::test]
async fn close_wakes_a_waiting_receive() {
    let receiver = std::sync::Arc::new(at("memory://waiting", "").await);
    let waiting = tokio::spawn({
        let receiver = std::sync::Arc::clone(&receiver);
        async move { receiver.receive(10).await.unwrap().len() }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    receiver.close().await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap();
    assert_eq!(received, 0);
}

#[tokio::test]
async fn a_send_waiting_for_room_fails_when_either_side_closes() {
    let sender = std::sync::Arc::new(transport("sender", "").await.unwrap());
    let receiver = at("memory://full", "queue_capacity = 1").await;
    sender.send("memory://full", envelope(0, 1)).await.unwrap();
    let waiting = tokio::spawn({
        let sender = std::sync::Arc::clone(&sender);
        async move { sender.send("memory://full", envelope(1, 1)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    receiver.close().await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.message.contains("closed before it took the message"), "{error}");
    assert_eq!(ids(&receiver, 10).await, [0], "the waiting message was not accepted");

    let receiver = at("memory://full-2", "queue_capacity = 1").await;
    sender.send("memory://full-2", envelope(0, 1)).await.unwrap();
    let waiting = tokio::spawn({
        let sender = std::sync::Arc::clone(&sender);
        async move { sender.send("memory://full-2", envelope(1, 1)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    sender.close().await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap_err();
    assert_eq!(error.code, ErrorCode::CLOSED, "{error}");
    receiver.close().await.unwrap();
}

fn outbound(address: &str, n: u128, size: usize) -> Outbound {
    Outbound { address: address.into(), envelope: envelope(n, size) }
}

#[tokio::test]
async fn a_batch_reaches_each_receiver_in_order_and_reports_failures_by_index() {
    let sender = transport("sender", "max_message_size = 100").await.unwrap();
    let left = at("memory://batch-left", "").await;
    let right = at("memory://batch-right", "queue_capacity = 2").await;
    let batch = vec![
        outbound("memory://batch-left", 0, 3),
        outbound("memory://batch-right", 1, 3),
        outbound("memory://batch-nowhere", 2, 3),
        outbound("memory://batch-left", 3, 101),
        outbound("memory://batch-left", 4, 3),
        outbound("memory://batch-right", 5, 3),
        outbound("memory://batch-right", 6, 3),
    ];
    // `right` takes two at a time: the batch waits for room as `send` does.
    let drain_right = async {
        let mut got = Vec::new();
        while got.len() < 3 {
            got.extend(ids(&right, 10).await);
        }
        got
    };
    let (failures, right_ids) = tokio::join!(sender.send_batch(batch), drain_right);
    let failed: Vec<(usize, ErrorCode)> = failures.iter().map(|f| (f.index, f.error.code)).collect();
    assert_eq!(failed, [(2, ErrorCode::UNREACHABLE), (3, ErrorCode::TOO_LARGE)]);
    assert_eq!(ids(&left, 10).await, [0, 4]);
    assert_eq!(right_ids, [1, 5, 6]);

    let sent = sender.stats();
    assert_eq!((sent.messages_sent, sent.bytes_sent, sent.send_errors), (5, 15, 2));
    let received = left.stats();
    assert_eq!((received.messages_received, received.bytes_received), (2, 6));
    for transport in [sender, left, right] {
        transport.close().await.unwrap();
    }
}

#[tokio::test]
async fn stats_count_what_waits_in_the_queue() {
    let sender = transport("sender", "").await.unwrap();
    let receiver = at("memory://stats-depth", "").await;
    let batch = (0..5).map(|n| outbound("memory://stats-depth", n, 10)).collect();
    assert!(sender.send_batch(batch).await.is_empty());
    assert_eq!(receiver.stats().transport.receive_queue_depth, 5);
    assert_eq!(ids(&receiver, 3).await, [0, 1, 2]);
    let stats = receiver.stats();
    assert_eq!((stats.transport.receive_queue_depth, stats.messages_received), (2, 3));
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

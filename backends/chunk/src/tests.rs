//! Two chunk layers back to back over an in-process link.

use crate::{
    part::{self, Layout, HEADER},
    ChunkConfig, ChunkLayer,
};
use comms_plugin_api::{
    config::parse_config,
    testing::{link_pair, Link},
    Capabilities, Destination, Envelope, ErrorCode, Inbound, MessageId, Outbound, Settlement,
    SettlementOutcome, Transport, TransportInfo,
};
use std::{sync::Arc, time::Duration};

fn layer(inner: &Arc<Link>, config: &str) -> ChunkLayer {
    let config: ChunkConfig = parse_config(config).unwrap();
    let settings = config.resolve(&inner.info()).unwrap();
    ChunkLayer::new(Arc::clone(inner) as Arc<dyn Transport>, settings)
}

fn envelope(id: u128, payload: Vec<u8>) -> Envelope {
    Envelope::new(MessageId::from_u128(id), "a", Destination::node("b"), payload).with_header("app", "kept")
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8 ^ seed).collect()
}

fn counter(layer: &ChunkLayer, name: &str) -> u64 {
    let stats = layer.stats();
    stats.counters.iter().find(|(counter, _)| counter == name).map(|(_, value)| *value).unwrap()
}

async fn receive(layer: &ChunkLayer) -> Vec<Inbound> {
    tokio::time::timeout(Duration::from_secs(10), layer.receive(256)).await.unwrap().unwrap()
}

async fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    for _ in 0..500 {
        if holds() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}");
}

#[tokio::test]
async fn a_large_message_goes_as_zero_copy_parts_with_fresh_ids_and_arrives_identical() {
    let (a, b) = link_pair(Capabilities::ORDERED, 100_000);
    let (sender, receiver) = (layer(&a, "part_size = 65536"), layer(&b, ""));
    let original = payload(5_000_000, 1);
    let message = envelope(7, original.clone());
    let buffer = message.payload.as_slice().as_ptr() as usize;
    sender.send("link://b", message).await.unwrap();

    let on_wire = a.wire();
    let layout = Layout::cut(5_000_000, 65_536);
    assert_eq!(on_wire.len() as u64, layout.count);
    let mut ids: Vec<_> = on_wire.iter().map(|part| part.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), on_wire.len(), "every part has an id of its own");
    assert!(!ids.contains(&MessageId::from_u128(7)), "and none is the message's");
    for (index, part) in on_wire.iter().enumerate() {
        assert!(part.payload.len() <= 65_536);
        let range = layout.range(index as u64);
        let at = part.payload.as_slice().as_ptr() as usize;
        assert_eq!(at, buffer + range.start as usize, "part {index} is a slice of the payload, not a copy");
        let header = part::PartHeader::parse(part.header(HEADER).unwrap()).unwrap();
        assert_eq!((header.index, header.count, header.total), (index as u64, layout.count, 5_000_000));
        assert_eq!(part.header("app"), Some("kept"));
    }
    let mut received = Vec::new();
    while received.is_empty() {
        received = receive(&receiver).await;
    }
    assert_eq!(received.len(), 1, "one message, not its parts");
    let message = &received[0].envelope;
    assert_eq!(message.id, MessageId::from_u128(7));
    assert_eq!(message.payload.as_slice(), original.as_slice());
    assert_eq!((message.header("app"), message.header(HEADER)), (Some("kept"), None));
    assert_eq!(received[0].delivery_tag, 0, "no acknowledgements below: no tags");
    assert_eq!(counter(&sender, "chunk.messages_split"), 1);
    assert_eq!(counter(&sender, "chunk.parts_sent"), layout.count);
    assert_eq!(counter(&receiver, "chunk.messages_reassembled"), 1);
    assert_eq!(counter(&receiver, "chunk.bytes_held"), 0);
    assert!(counter(&receiver, "chunk.bytes_held_peak") >= 5_000_000);
}

#[tokio::test]
async fn a_batch_keeps_its_order_and_a_too_large_item_fails_at_its_position() {
    let (a, b) = link_pair(Capabilities::ORDERED, 100_000);
    let (sender, receiver) = (layer(&a, "part_size = 4096\nmax_message_size = 1000000"), layer(&b, ""));
    assert_eq!(sender.info().max_message_size, 1_000_000);
    assert_eq!(sender.info().capabilities, Capabilities::ORDERED);
    assert_eq!(sender.info().local_address, "link://a");
    let item =
        |id, len| Outbound { address: "link://b".into(), envelope: envelope(id, payload(len, id as u8)) };
    let batch = vec![item(1, 100), item(2, 50_000), item(3, 1_000_001), item(4, 4096), item(5, 9000)];
    let failures = sender.send_batch(batch).await;
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].index, failures[0].error.code), (2, ErrorCode::TOO_LARGE));
    assert!(failures[0].error.message.contains("max_message_size 1000000"), "{}", failures[0].error.message);
    let small = &a.wire()[0];
    assert_eq!((small.id, small.header(HEADER)), (MessageId::from_u128(1), None), "small ones go untouched");
    let mut ids = Vec::new();
    while ids.len() < 4 {
        for inbound in receive(&receiver).await {
            let id = inbound.envelope.id.as_u128();
            assert_eq!(
                inbound.envelope.payload.as_slice(),
                payload(inbound.envelope.payload.len(), id as u8)
            );
            ids.push(id);
        }
    }
    assert_eq!(ids, [1, 2, 4, 5], "in send order");
}

#[tokio::test]
async fn with_acknowledgements_the_hosts_outcome_reaches_every_part() {
    let (a, b) = link_pair(Capabilities::ACKNOWLEDGEMENTS, 100_000);
    let (sender, receiver) = (layer(&a, "part_size = 4096"), layer(&b, ""));
    sender.send("link://b", envelope(1, payload(10_000, 1))).await.unwrap();
    sender.send("link://b", envelope(2, payload(100, 2))).await.unwrap();
    let mut received = Vec::new();
    while received.len() < 2 {
        received.extend(receive(&receiver).await);
    }
    // Inner tags 1..=3 are the parts of message 1, 4 is message 2.
    let (big, small) = (received[0].delivery_tag, received[1].delivery_tag);
    assert!(big != 0 && small != 0 && big != small, "tags of the layer's own: {big}, {small}");
    assert!(b.settled().is_empty(), "nothing settled before the host says so");
    let requeue = SettlementOutcome::REJECTED_REQUEUE;
    receiver.settle(vec![Settlement { delivery_tag: big, outcome: requeue }]).await.unwrap();
    let settled: Vec<_> = b.settled().into_iter().map(|s| (s.delivery_tag, s.outcome)).collect();
    assert_eq!(settled, [(1, requeue), (2, requeue), (3, requeue)]);
    let accepted = SettlementOutcome::ACCEPTED;
    receiver.settle(vec![Settlement { delivery_tag: small, outcome: accepted }]).await.unwrap();
    receiver.settle(vec![Settlement { delivery_tag: big, outcome: accepted }]).await.unwrap();
    assert_eq!(b.settled().len(), 4, "a tag is settled once: the repeat is ignored");
    assert_eq!(b.settled()[3], Settlement { delivery_tag: 4, outcome: accepted });
}

/// Sends the first `parts` parts of `message` straight over the link, as a sender that died
/// halfway would leave them.
async fn send_parts(link: &Link, message: &Envelope, part_size: u64, parts: std::ops::Range<u64>) {
    let layout = Layout::cut(message.payload.len() as u64, part_size);
    for index in parts {
        let id = MessageId::from_u128(1000 + index as u128 + message.id.as_u128() * 100_000);
        link.send("link://b", part::part(message, &layout, index, id).unwrap()).await.unwrap();
    }
}

#[tokio::test]
async fn over_budget_parts_are_refused_and_counted_and_the_budget_holds() {
    let (a, b) = link_pair(Capabilities::ORDERED, 100_000);
    // One message of 60 kB fits, two do not.
    let receiver = layer(&b, "max_message_size = 60000\nmax_reassembly_bytes = 100000");
    let (first, second) = (envelope(1, payload(60_000, 1)), envelope(2, payload(60_000, 2)));
    send_parts(&a, &first, 4096, 0..14).await;
    send_parts(&a, &second, 4096, 0..15).await;
    send_parts(&a, &first, 4096, 14..15).await;
    let received = receive(&receiver).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].envelope.payload.as_slice(), first.payload.as_slice());
    assert_eq!(counter(&receiver, "chunk.refused_parts"), 15, "all of the second, none held");
    assert!(counter(&receiver, "chunk.bytes_held_peak") <= 100_000);
    assert!(counter(&receiver, "chunk.bytes_held_peak") >= 60_000);
    assert_eq!(counter(&receiver, "chunk.bytes_held"), 0);
    assert_eq!(receiver.stats().errors, 15);
}

#[tokio::test]
async fn the_timer_drops_an_incomplete_message_and_discards_its_parts() {
    let (a, b) = link_pair(Capabilities::ACKNOWLEDGEMENTS, 100_000);
    let receiver = Arc::new(layer(&b, "reassembly_timeout_ms = 200"));
    send_parts(&a, &envelope(1, payload(20_000, 1)), 4096, 0..3).await;
    // Takes the parts, then waits for a message that never comes.
    let receiving = tokio::spawn({
        let receiver = Arc::clone(&receiver);
        async move { receiver.receive(256).await }
    });
    eventually("the parts are held", || counter(&receiver, "chunk.partial_messages") == 1).await;
    assert!(counter(&receiver, "chunk.bytes_held") >= 20_000);
    eventually("the message expires", || counter(&receiver, "chunk.partial_messages_dropped") == 1).await;
    assert_eq!(counter(&receiver, "chunk.bytes_held"), 0);
    let discarded = SettlementOutcome::REJECTED_DISCARD;
    eventually("its parts are settled", || b.settled().len() == 3).await;
    assert!(b.settled().iter().all(|settlement| settlement.outcome == discarded));
    assert!(!receiving.is_finished(), "receive hands up nothing: no empty batch");
    receiving.abort();
}

#[tokio::test]
async fn close_requeues_held_parts_and_closes_the_inner_transport() {
    let (a, b) = link_pair(Capabilities::ACKNOWLEDGEMENTS, 100_000);
    let receiver = Arc::new(layer(&b, ""));
    send_parts(&a, &envelope(1, payload(20_000, 1)), 4096, 0..2).await;
    let receiving = tokio::spawn({
        let receiver = Arc::clone(&receiver);
        async move { receiver.receive(256).await }
    });
    eventually("the parts are held", || counter(&receiver, "chunk.partial_messages") == 1).await;
    receiving.abort();
    receiver.close().await.unwrap();
    let requeue = SettlementOutcome::REJECTED_REQUEUE;
    assert_eq!(b.settled(), [1, 2].map(|delivery_tag| Settlement { delivery_tag, outcome: requeue }));
    assert!(b.is_closed());
}

#[test]
fn defaults_follow_the_inner_transport_and_errors_name_the_key() {
    let info = |max| TransportInfo::new(Capabilities::NONE, "x", max);
    let resolve = |config: &str, max| parse_config::<ChunkConfig>(config).unwrap().resolve(&info(max));
    let big = resolve("", 16 << 20).unwrap();
    assert_eq!((big.part_size, big.max_message_size, big.max_reassembly_bytes), (1 << 20, 1 << 30, 2 << 30));
    assert_eq!(big.reassembly_timeout, Duration::from_secs(30));
    assert_eq!(resolve("", 65_536).unwrap().part_size, 65_536 - 4096, "room for the headers");
    let error = |config: &str, max| resolve(config, max).unwrap_err().message;
    assert!(error("part_size = 70000", 65_536).starts_with("key `part_size`: 70000 must be between"));
    assert!(error("part_size = 100", 65_536).starts_with("key `part_size`"));
    assert!(error("", 1000).contains("derived from the inner transport"), "{}", error("", 1000));
    assert!(error("max_message_size = 5000000000", 65_536).starts_with("key `max_message_size`"));
    let budget = error("max_message_size = 1000000\nmax_reassembly_bytes = 1000000", 65_536);
    assert!(budget.starts_with("key `max_reassembly_bytes`: 1000000 cannot hold one message"), "{budget}");
    assert!(error("reassembly_timeout_ms = 0", 65_536).starts_with("key `reassembly_timeout_ms`"));
    let unknown = parse_config::<ChunkConfig>("part_sise = 1").unwrap_err().message;
    assert!(unknown.contains("unknown field `part_sise`"), "{unknown}");
    let small = resolve("max_message_size = 1000", 65_536).unwrap();
    assert!(small.max_reassembly_bytes >= 1000 + 4096, "the default covers one message");
}

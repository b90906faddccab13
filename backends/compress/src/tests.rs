//! Two compress layers back to back over an in-process link.

use crate::{codec, CompressConfig, CompressLayer, HEADER};
use comms_plugin_api::{
    config::parse_config,
    testing::{link_pair, Link},
    Capabilities, Destination, Envelope, ErrorCode, Inbound, MessageId, Outbound, Settlement,
    SettlementOutcome, Transport,
};
use std::{sync::Arc, time::Duration};

fn layer(inner: &Arc<Link>, config: &str) -> CompressLayer {
    let config: CompressConfig = parse_config(config).unwrap();
    CompressLayer::new(Arc::clone(inner) as Arc<dyn Transport>, &config).unwrap()
}

fn envelope(id: u128, payload: Vec<u8>) -> Envelope {
    Envelope::new(MessageId::from_u128(id), "a", Destination::node("b"), payload).with_header("app", "kept")
}

fn counter(layer: &CompressLayer, name: &str) -> u64 {
    let stats = layer.stats();
    stats.counters.iter().find(|(counter, _)| counter == name).map(|(_, value)| *value).unwrap()
}

async fn receive_one(layer: &CompressLayer) -> Inbound {
    let mut batch = tokio::time::timeout(Duration::from_secs(10), layer.receive(1)).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    batch.remove(0)
}

/// Deterministic bytes zstd cannot shrink.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test]
async fn a_compressible_payload_is_smaller_on_the_wire_and_identical_after() {
    let (a, b) = link_pair(Capabilities::ORDERED, 16 << 20);
    let (sender, receiver) = (layer(&a, ""), layer(&b, ""));
    // Large enough for the blocking pool, compressible, not trivially so.
    let payload: Vec<u8> =
        (0..300_000u32).flat_map(|i| format!("line {} of the log\n", i % 977).into_bytes()).collect();
    sender.send("link://b", envelope(1, payload.clone())).await.unwrap();

    let on_wire = a.wire();
    assert_eq!(on_wire[0].header(HEADER), Some("zstd"));
    assert!(on_wire[0].payload.len() < payload.len() / 10, "{} bytes on the wire", on_wire[0].payload.len());
    let received = receive_one(&receiver).await.envelope;
    assert_eq!(received.payload.as_slice(), payload.as_slice(), "identical after");
    assert_eq!(received.header(HEADER), None, "the layer's header is removed before handing up");
    assert_eq!(received.header("app"), Some("kept"));
    assert_eq!(received.id, MessageId::from_u128(1));
    assert_eq!(counter(&sender, "compress.messages_compressed"), 1);
    assert_eq!(counter(&sender, "compress.bytes_before"), payload.len() as u64);
    assert_eq!(counter(&sender, "compress.bytes_after"), on_wire[0].payload.len() as u64);
    assert_eq!(counter(&receiver, "compress.messages_decompressed"), 1);
}

#[tokio::test]
async fn small_and_incompressible_payloads_go_as_they_are() {
    let (a, b) = link_pair(Capabilities::ORDERED, 16 << 20);
    let (sender, receiver) = (layer(&a, "threshold = 2000"), layer(&b, ""));
    let small = b"x".repeat(1999);
    let random = noise(100_000);
    sender.send("link://b", envelope(1, small.clone())).await.unwrap();
    sender.send("link://b", envelope(2, random.clone())).await.unwrap();
    for (sent, expected) in a.wire().iter().zip([&small, &random]) {
        assert_eq!(sent.header(HEADER), None, "not compressed: below the threshold, or would not shrink");
        assert_eq!(sent.payload.as_slice(), expected.as_slice());
    }
    assert_eq!(counter(&sender, "compress.messages_not_smaller"), 1, "only the random one was tried");
    assert_eq!(receive_one(&receiver).await.envelope.payload.as_slice(), small.as_slice());
    assert_eq!(receive_one(&receiver).await.envelope.payload.as_slice(), random.as_slice());
}

#[tokio::test]
async fn a_zip_bomb_and_an_unknown_method_are_refused_and_settled_as_discarded() {
    let (a, b) = link_pair(Capabilities::ACKNOWLEDGEMENTS, 16 << 20);
    let receiver = layer(&b, "max_message_size = 1048576");
    // 64 MiB of zeros in about 2 KiB, declared as such in the frame.
    let bomb = codec::compress(&vec![0u8; 64 << 20], 3).unwrap();
    assert!(bomb.len() < 4096);
    a.send("link://b", envelope(1, bomb).with_header(HEADER, "zstd")).await.unwrap();
    a.send("link://b", envelope(2, b"whatever".to_vec()).with_header(HEADER, "brotli")).await.unwrap();
    a.send("link://b", envelope(3, b"garbage, not a frame".to_vec()).with_header(HEADER, "zstd"))
        .await
        .unwrap();
    a.send("link://b", envelope(4, b"fine".to_vec())).await.unwrap();

    let next = receive_one(&receiver).await;
    assert_eq!(next.envelope.id, MessageId::from_u128(4), "the refused ones are not handed up");
    assert_eq!(next.delivery_tag, 4, "tags pass through");
    assert_eq!(counter(&receiver, "compress.decompress_failures"), 3);
    assert_eq!(receiver.stats().errors, 3, "refusals count as errors");
    let discarded = Settlement { delivery_tag: 0, outcome: SettlementOutcome::REJECTED_DISCARD };
    let settled = b.settled();
    assert_eq!(
        settled,
        [1, 2, 3].map(|delivery_tag| Settlement { delivery_tag, ..discarded }),
        "a broker must not deliver them again"
    );
    receiver
        .settle(vec![Settlement { delivery_tag: 4, outcome: SettlementOutcome::ACCEPTED }])
        .await
        .unwrap();
    assert_eq!(b.settled().len(), 4, "the host's settlement reaches the inner transport");
}

#[tokio::test]
async fn too_large_sends_fail_with_their_position_in_a_batch() {
    let (a, b) = link_pair(Capabilities::ORDERED, 16 << 20);
    let sender = layer(&a, "max_message_size = 10000");
    let receiver = layer(&b, "");
    assert_eq!(sender.info().max_message_size, 10_000);
    assert_eq!(receiver.info().max_message_size, 16 << 20, "default: the inner transport's");
    assert_eq!(receiver.info().local_address, "link://b");
    let item = |id, len| Outbound { address: "link://b".into(), envelope: envelope(id, vec![b'z'; len]) };
    let failures = sender.send_batch(vec![item(1, 5000), item(2, 10_001), item(3, 9000)]).await;
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].index, failures[0].error.code), (1, ErrorCode::TOO_LARGE));
    assert!(failures[0].error.message.contains("max_message_size 10000"), "{}", failures[0].error.message);
    let batch = receiver.receive(10).await.unwrap();
    let ids: Vec<_> = batch.iter().map(|inbound| inbound.envelope.id.as_u128()).collect();
    assert_eq!(ids, [1, 3]);
    assert!(a.wire().iter().all(|sent| sent.header(HEADER) == Some("zstd")));
}

#[tokio::test]
async fn a_header_already_there_is_left_alone_and_close_closes_the_inner_transport() {
    let (a, b) = link_pair(Capabilities::ORDERED, 16 << 20);
    let (sender, receiver) = (layer(&a, ""), layer(&b, ""));
    // What a compress layer above this one sent: compressed once, and only once.
    let once = codec::compress(&b"abc".repeat(10_000), 3).unwrap();
    sender.send("link://b", envelope(1, once.clone()).with_header(HEADER, "zstd")).await.unwrap();
    assert_eq!(a.wire()[0].payload.as_slice(), once.as_slice());
    let received = receive_one(&receiver).await.envelope;
    assert_eq!(received.payload.as_slice(), b"abc".repeat(10_000).as_slice());
    sender.close().await.unwrap();
    assert!(a.is_closed());
}

#[test]
fn config_errors_name_the_key() {
    let unknown = parse_config::<CompressConfig>("treshold = 10").unwrap_err();
    assert!(unknown.message.contains("unknown field `treshold`"), "{}", unknown.message);
    let level: CompressConfig = parse_config("level = 23").unwrap();
    let error = level.validate().unwrap_err();
    assert!(error.message.starts_with("key `level`: 23 is outside"), "{}", error.message);
    let zero: CompressConfig = parse_config("max_message_size = 0").unwrap();
    assert!(zero.validate().unwrap_err().message.contains("key `max_message_size`"));
    assert_eq!(parse_config::<CompressConfig>("").unwrap(), CompressConfig::default());
}

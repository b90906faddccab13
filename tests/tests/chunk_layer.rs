//! The chunk layer as the host loads it (`libcomms_chunk.so`) over the real TCP and UDP plugins:
//! one message far larger than either transport takes arrives byte-identical, and the receiver
//! never reserves more than its `max_reassembly_bytes`. Over an acknowledging transport (SQLite)
//! the host's outcome for the message reaches every part. Two nodes configured with
//! `layers = ["compress", "chunk"]` exchange a message twice the size TCP takes.
//!
//! Each test prints its elapsed time and throughput (`cargo test -p comms-tests --test
//! chunk_layer -- --nocapture`); docs/layers.md has the figures measured in a debug build.

use comms_host::Node;
use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, MessageId, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, counter, free_address, scratch_dir, write_config};
use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

const MIB: usize = 1 << 20;
/// The receiver's budget in these tests: one 1 GiB message and its bookkeeping, not two.
const BUDGET: u64 = (1 << 30) + (64 << 20);
/// One transfer at a time: each holds the message on both sides (2 GiB for the largest).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Stamps every this many bytes: a part landing in the wrong place cannot go unnoticed.
const STAMP_EVERY: usize = 4096;

fn library(path: &Path) -> PluginLibrary {
    PluginLibrary::load(path).unwrap_or_else(|error| panic!("{error}"))
}

/// A transport of `inner` with the chunk layer over it, as a node's `layers = [...]` builds it.
async fn layered(inner: &Path, node: &str, inner_config: &str, chunk_config: &str) -> LoadedTransport {
    let node = NodeId::new(node);
    let transport = library(inner).new_transport(&node, "t", inner_config).await.unwrap();
    library(&artifacts().chunk_plugin).new_layer(&node, "t", chunk_config, transport).await.unwrap()
}

/// One mebibyte of noise: the same for every block, so nothing large has to be kept to check.
fn noise() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..MIB / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

/// Writes its own position (in the whole payload) every [`STAMP_EVERY`] bytes of `block`, which
/// starts at `offset`.
fn stamp(block: &mut [u8], offset: usize) {
    for at in (0..block.len().saturating_sub(7)).step_by(STAMP_EVERY) {
        block[at..at + 8].copy_from_slice(&((offset + at) as u64).to_le_bytes());
    }
}

/// `len` bytes: noise with stamps, built block by block (one copy of the payload, no more).
fn payload(len: usize) -> Vec<u8> {
    let noise = noise();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let (start, take) = (out.len(), (len - out.len()).min(MIB));
        out.extend_from_slice(&noise[..take]);
        stamp(&mut out[start..], start);
    }
    out
}

/// Checks `received` against [`payload`]`(len)` block by block, without a second copy.
fn assert_identical(received: &[u8], len: usize) {
    assert_eq!(received.len(), len, "length");
    let noise = noise();
    let mut expected = vec![0u8; MIB];
    for (index, block) in received.chunks(MIB).enumerate() {
        let expected = &mut expected[..block.len()];
        expected.copy_from_slice(&noise[..block.len()]);
        stamp(expected, index * MIB);
        assert!(block == expected, "block {index} (bytes from {}) differs", index * MIB);
    }
}

/// Sends one message of `len` bytes from `sender` to `receiver` and checks what arrives.
async fn transfer(label: &str, sender: LoadedTransport, receiver: LoadedTransport, len: usize) {
    let receiver = Arc::new(receiver);
    let address = receiver.info().local_address.clone();
    assert_eq!(receiver.info().max_message_size, 1 << 30, "the layer declares its own limit");
    let message =
        Envelope::new(MessageId::from_u128(0xc0ffee), "sender", Destination::node("receiver"), payload(len));
    let started = Instant::now();
    let receiving = tokio::spawn({
        let receiver = Arc::clone(&receiver);
        async move {
            let mut batch = Vec::new();
            while batch.is_empty() {
                batch = receiver.receive(256).await.unwrap();
            }
            batch
        }
    });
    // Returns once every part is queued by the inner transport: its queue is the backpressure.
    sender.send(&address, message).await.unwrap();
    let sent = started.elapsed();
    let mut batch = tokio::time::timeout(Duration::from_secs(900), receiving).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(batch.len(), 1, "one message, not its parts");
    let received = batch.remove(0).envelope;
    let rate = len as f64 / MIB as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{label}: {} MiB in {:.2} s ({rate:.1} MiB/s; send returned after {:.2} s)",
        len / MIB,
        elapsed.as_secs_f64(),
        sent.as_secs_f64()
    );
    assert_eq!(received.id, MessageId::from_u128(0xc0ffee), "the message's own id, not a part's");
    assert_eq!(received.header("comms-chunk"), None);
    assert_identical(&received.payload, len);
    drop(received);
    let peak = counter(&receiver, "chunk.bytes_held_peak");
    eprintln!("{label}: peak reserved for reassembly {peak} bytes (max_reassembly_bytes {BUDGET})");
    assert!(peak >= len as u64 && peak <= BUDGET, "held {peak} bytes");
    assert_eq!(counter(&receiver, "chunk.bytes_held"), 0, "nothing held once it is handed up");
    assert_eq!(counter(&receiver, "chunk.messages_reassembled"), 1);
    assert_eq!(counter(&sender, "chunk.parts_sent"), counter(&receiver, "chunk.parts_received"));
    assert_eq!(counter(&receiver, "chunk.refused_parts") + counter(&receiver, "chunk.malformed_parts"), 0);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

fn receiver_config() -> String {
    format!("max_reassembly_bytes = {BUDGET}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_over_tcp_arrives_identical_within_the_budget() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tcp = &artifacts().tcp_plugin;
    let sender = layered(tcp, "sender", "", "").await;
    let receiver = layered(tcp, "receiver", "", &receiver_config()).await;
    // TCP takes 16 MiB frames: the default part size is 1 MiB.
    transfer("tcp", sender, receiver, 1 << 30).await;
}

/// The UDP transport with its defaults (4 MiB messages, 1400-byte datagrams), on loopback.
const UDP: &str = "listen = \"127.0.0.1:0\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_over_udp_arrives_identical_within_the_budget() {
    let _one = ONE_AT_A_TIME.lock().await;
    let udp = &artifacts().udp_plugin;
    let sender = layered(udp, "sender", UDP, "").await;
    let receiver = layered(udp, "receiver", UDP, &receiver_config()).await;
    // UDP takes 4 MiB messages: the default part size is 1 MiB.
    transfer("udp", sender, receiver, 1 << 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_an_acknowledging_transport_the_hosts_outcome_reaches_every_part() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = scratch_dir("chunk-sqlite");
    let sqlite = &artifacts().sqlite_plugin;
    // SQLite keeps each part as a row until it is settled ACCEPTED; a requeued row comes again.
    let config = format!("database = {:?}\nlease_ms = 60000", dir.join("comms.db"));
    let sender = layered(sqlite, "sender", &config, "").await;
    let receiver = layered(sqlite, "receiver", &config, "").await;
    let len = 8 << 20;
    let message =
        Envelope::new(MessageId::from_u128(77), "sender", Destination::node("receiver"), payload(len));
    sender.send("receiver", message).await.unwrap();
    let receive = || async {
        let mut batch = Vec::new();
        while batch.is_empty() {
            batch =
                tokio::time::timeout(Duration::from_secs(30), receiver.receive(256)).await.unwrap().unwrap();
        }
        assert_eq!(batch.len(), 1, "one message, not its parts");
        batch.remove(0)
    };
    let first = receive().await;
    assert_identical(&first.envelope.payload, len);
    assert_ne!(first.delivery_tag, 0, "a tag of the layer's own");
    let settle = |delivery_tag, outcome| receiver.settle(vec![Settlement { delivery_tag, outcome }]);
    // Requeued: every part comes again, and the message is whole again.
    settle(first.delivery_tag, SettlementOutcome::REJECTED_REQUEUE).await.unwrap();
    let again = receive().await;
    assert_eq!(again.envelope.id, MessageId::from_u128(77));
    assert_identical(&again.envelope.payload, len);
    // Accepted: every part is gone from the database, nothing comes a third time.
    settle(again.delivery_tag, SettlementOutcome::ACCEPTED).await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(2), receiver.receive(256)).await;
    assert!(third.is_err(), "delivered a third time: {:?}", third.map(|batch| batch.map(|b| b.len())));
    assert_eq!(counter(&receiver, "chunk.messages_reassembled"), 2);
    assert_eq!(counter(&receiver, "chunk.parts_received"), 2 * counter(&sender, "chunk.parts_sent"));
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

/// `len` bytes of text in a 32-letter alphabet: zstd makes it about 5/8 of its size, so 32 MiB
/// still needs the chunk layer after the compress layer (TCP takes 16 MiB).
fn text(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b"abcdefghijklmnopqrstuvwxyz012345"[(state >> 59) as usize]
        })
        .collect()
}

/// The value of the transport statistic `name` in a node's metrics.
fn stat(node: &Node, name: &str) -> u64 {
    let metrics = node.metrics_text();
    let label = format!("name=\"{name}\"");
    let line = metrics
        .lines()
        .find(|line| line.starts_with("comms_transport_stat") && line.contains(&label))
        .unwrap_or_else(|| panic!("no statistic {name} in\n{metrics}"));
    line.rsplit(' ').next().and_then(|value| value.parse::<f64>().ok()).unwrap_or_else(|| panic!("{line}"))
        as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_configured_with_compress_and_chunk_layers_exchange_a_32_mib_message() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = scratch_dir("layers");
    let plugin_dirs = format!("plugin_dirs = [{:?}]", artifacts().plugin_dir.to_str().unwrap());
    let (alice_address, bob_address) = (free_address(), free_address());
    let config = |id: &str, listen: &str, peer: &str, peer_address: &str| {
        format!(
            "[node]\nid = \"{id}\"\n{plugin_dirs}\n\n\
             [transports.tcp]\nlisten = \"{listen}\"\nlayers = [\"compress\", \"chunk\"]\n\n\
             [discovery]\npeers = [{{ id = \"{peer}\", addresses = {{ tcp = \"{peer_address}\" }} }}]\n"
        )
    };
    let alice_config =
        write_config(&dir, "alice.toml", &config("alice", &alice_address, "bob", &bob_address));
    let bob_config = write_config(&dir, "bob.toml", &config("bob", &bob_address, "alice", &alice_address));
    let alice = Node::from_config(&alice_config).await.unwrap();
    let bob = Node::from_config(&bob_config).await.unwrap();
    let payload = text(32 << 20);
    let started = Instant::now();
    alice.send_raw("bob", vec![], payload.clone(), None).await.unwrap();
    let received =
        tokio::time::timeout(Duration::from_secs(120), bob.receive_envelope()).await.unwrap().unwrap();
    eprintln!(
        "32 MiB through compress and chunk over TCP between two nodes in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(received.from.as_str(), "alice");
    assert!(received.payload.as_slice() == payload.as_slice(), "identical end to end");
    assert!(received.headers.iter().all(|(name, _)| !name.starts_with("comms-c")), "{:?}", received.headers);
    // Both layers did their part: compressed, still too large for TCP, so cut and reassembled.
    let (before, after) = (stat(&alice, "compress.bytes_before"), stat(&alice, "compress.bytes_after"));
    eprintln!("compressed {before} bytes to {after}");
    assert!(before >= 32 << 20 && after < before * 3 / 4 && after > 16 << 20, "{before} -> {after}");
    assert_eq!(stat(&alice, "chunk.messages_split"), 1);
    assert_eq!(stat(&bob, "chunk.messages_reassembled"), 1);
    assert_eq!(stat(&bob, "compress.messages_decompressed"), 1);
    alice.close().await.unwrap();
    bob.close().await.unwrap();
}

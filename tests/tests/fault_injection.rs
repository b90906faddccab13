//! The fault-injection layer (`libcomms_faults.so`) over a real transport (the in-memory plugin,
//! `libcomms_memory.so`), both loaded as the host loads them: the injected faults show up in
//! what arrives, exactly as the layer's counters say, and a seed replays.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, ErrorCode, MessageId, NodeId, Payload,
};
use comms_tests::artifacts;
use std::time::{Duration, Instant};

const MESSAGES: u128 = 1_000;

/// How long the layer holds a reordered message when no next one comes (comms_faults::REORDER_HOLD).
const REORDER_HOLD: Duration = Duration::from_millis(50);

/// A memory transport for node `node`; its queue holds every message a test sends.
async fn memory(node: &str) -> LoadedTransport {
    let library = PluginLibrary::load(&artifacts().memory_plugin).expect("load libcomms_memory.so");
    let transport = library.new_transport(&NodeId::new(node), "memory", "queue_capacity = 4096").await;
    transport.expect("start a memory transport")
}

/// A memory transport for node `node` under the faults layer configured with `faults`.
async fn faulty(node: &str, faults: &str) -> LoadedTransport {
    let library = PluginLibrary::load(&artifacts().faults_plugin).expect("load libcomms_faults.so");
    let inner = memory(node).await;
    let layer = library.new_layer(&NodeId::new(node), "memory.faults", faults, inner).await;
    layer.unwrap_or_else(|error| panic!("faults layer with `{faults}`: {error}"))
}

fn envelope(n: u128) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("sender"),
        Destination::Node(NodeId::new("receiver")),
        Payload::from(n.to_be_bytes().to_vec()),
    )
}

/// The layer's counters after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    dropped: u64,
    duplicated: u64,
    reordered: u64,
    delayed: u64,
}

impl Counters {
    fn of(layer: &LoadedTransport) -> Self {
        let counters = layer.stats().transport.counters;
        let counter = |name: &str| {
            let found = counters.iter().find(|(n, _)| n == name).map(|(_, value)| *value);
            found.unwrap_or_else(|| panic!("no counter {name} in {counters:?}"))
        };
        Counters {
            dropped: counter("faults.dropped"),
            duplicated: counter("faults.duplicated"),
            reordered: counter("faults.reordered"),
            delayed: counter("faults.delayed"),
        }
    }
}

/// What one run of [`run`] saw.
#[derive(Debug)]
struct Run {
    /// The ids that arrived, in arrival order.
    ids: Vec<u128>,
    counters: Counters,
    /// Whether every message that may have been held was released by the next message sent
    /// (which reached the layer before [`REORDER_HOLD`] had passed), never by the hold timer:
    /// then, without delays, the arrivals depend on the seed alone.
    released_by_next: bool,
}

/// Sends `MESSAGES` envelopes through a new faults layer configured with `faults`, from a new
/// sender to a new receiver; closes the layer (which sends what it holds, waits for what it
/// delays, and closes the memory transport below) and returns what arrived.
async fn run(faults: &str) -> Run {
    let sender = faulty("sender", faults).await;
    let receiver = memory("receiver").await;
    let address = receiver.info().local_address.clone();
    let mut sends = Vec::new();
    for n in 0..MESSAGES {
        let start = Instant::now();
        sender.send(&address, envelope(n)).await.unwrap();
        sends.push((start, Instant::now()));
    }
    sender.close().await.unwrap();
    let stats = sender.stats();
    assert_eq!(stats.transport.send_queue_depth, 0, "closed: nothing held or delayed is left: {stats:?}");
    let counters = Counters::of(&sender);
    receiver.close().await.unwrap();
    // Closed: `receive` hands out what is queued, then an empty batch.
    let mut ids = Vec::new();
    loop {
        let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(4096))
            .await
            .expect("a closed memory transport does not block")
            .unwrap();
        if batch.is_empty() {
            break;
        }
        ids.extend(batch.into_iter().map(|inbound| inbound.envelope.id.as_u128()));
    }
    // A held message `n` is released when the next message that is not dropped has been sent
    // (the last one, by the timer or by close: after all others either way).
    let arrived: std::collections::HashSet<u128> = ids.iter().copied().collect();
    let mut next_sent = None;
    let mut released_by_next = true;
    for n in (0..MESSAGES).rev() {
        if !arrived.contains(&n) {
            continue;
        }
        let (start, _) = sends[n as usize];
        if let Some((_, released)) = next_sent {
            released_by_next &= released - start < REORDER_HOLD;
        }
        next_sent = Some(sends[n as usize]);
    }
    Run { ids, counters, released_by_next }
}

/// [`run`], again while the hold timer may have released a message (when the machine stalled
/// for [`REORDER_HOLD`] between two sends).
async fn run_without_timer_releases(faults: &str) -> Run {
    for _ in 0..5 {
        let run = run(faults).await;
        if run.released_by_next {
            return run;
        }
    }
    panic!("in five runs, some send took over {REORDER_HOLD:?}: this machine is too busy for the test");
}

#[tokio::test]
async fn dropped_messages_are_exactly_the_missing_ones() {
    let Run { ids, counters, .. } = run("drop = 0.1\nseed = 11").await;
    assert_eq!(ids.len() as u64, MESSAGES as u64 - counters.dropped, "{counters:?}");
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5; this band is over five of them.
    assert!((50..=150).contains(&counters.dropped), "{counters:?}");
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "without delay or reorder the order is kept");
    assert_eq!((counters.duplicated, counters.delayed, counters.reordered), (0, 0, 0));
}

#[tokio::test]
async fn duplicate_one_delivers_everything_twice() {
    let Run { ids, counters, .. } = run("duplicate = 1.0").await;
    let expected: Vec<u128> = (0..MESSAGES).flat_map(|n| [n, n]).collect();
    assert_eq!(ids, expected);
    assert_eq!(counters.duplicated, MESSAGES as u64);
    assert_eq!((counters.dropped, counters.delayed, counters.reordered), (0, 0, 0));
}

#[tokio::test]
async fn delayed_messages_all_arrive_once_closed() {
    let Run { mut ids, counters, .. } = run("delay_ms = 5\njitter_ms = 5\nseed = 3").await;
    assert_eq!(counters.delayed, MESSAGES as u64, "{counters:?}");
    ids.sort_unstable();
    assert_eq!(ids, (0..MESSAGES).collect::<Vec<_>>(), "close waited for every delayed message");
}

#[tokio::test]
async fn the_same_seed_replays_the_same_arrivals() {
    let faults = "drop = 0.1\nduplicate = 0.1\nreorder = 0.2\nseed = 2024";
    let first = run_without_timer_releases(faults).await;
    let second = run_without_timer_releases(faults).await;
    assert_eq!(first.ids, second.ids);
    assert_eq!(first.counters, second.counters);
    let counters = first.counters;
    assert!(counters.dropped > 0 && counters.duplicated > 0 && counters.reordered > 0, "{counters:?}");
    let expected_len = MESSAGES as u64 - counters.dropped + counters.duplicated;
    assert_eq!(first.ids.len() as u64, expected_len);
    assert!(first.ids.windows(2).any(|pair| pair[0] > pair[1]), "some messages were reordered");

    let other_seed = run("drop = 0.1\nduplicate = 0.1\nreorder = 0.2\nseed = 2025").await;
    assert_ne!(first.ids, other_seed.ids, "another seed gives other faults");
}

#[tokio::test]
async fn a_bad_config_is_refused_naming_the_key() {
    let library = PluginLibrary::load(&artifacts().faults_plugin).expect("load libcomms_faults.so");
    let inner = memory("bad-faults").await;
    let error = library.new_layer(&NodeId::new("bad-faults"), "memory.faults", "drop = 1.5", inner).await;
    let error = error.expect_err("drop = 1.5 is not a probability");
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
    assert!(error.message.contains("key `drop`: must be a probability between 0 and 1"), "{error}");
}

//! Unit tests of the layer: directly over a recording transport (on the test's current-thread
//! runtime, so that timers fire only when a test waits), and through the host-side API with the
//! plugin linked into the test binary.

use crate::{
    layer::FaultLayer, FaultConfig, FaultsPlugin, DELAYED_COUNTER, DROPPED_COUNTER, DUPLICATED_COUNTER,
    REORDERED_COUNTER, REORDER_HOLD,
};
use comms_plugin_api::{
    async_trait,
    config::parse_config,
    host_side::{LoadedTransport, PluginLibrary},
    Capabilities, Destination, Envelope, ErrorCode, Inbound, MessageId, NodeId, Outbound, Payload, Plugin,
    PluginError, Provides, Setup, Transport, TransportInfo, TransportStats, UNDELIVERED_COUNTER,
};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// What the recording transport saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Sent(u128),
    Closed,
}

type Events = Arc<Mutex<Vec<Event>>>;

/// A transport that records what it is sent, refuses addresses starting with `nowhere`, and
/// reports a send queue of [`INNER_DEPTH`] and two counters of its own.
struct Recorder {
    events: Events,
    capabilities: Capabilities,
    closed: AtomicBool,
}

const INNER_DEPTH: u64 = 5;
const INNER_UNDELIVERED: u64 = 2;

#[async_trait]
impl Transport for Recorder {
    fn info(&self) -> TransportInfo {
        TransportInfo::new(self.capabilities, "recorder://here", 1 << 20)
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(PluginError::closed("the recorder"));
        }
        if address.starts_with("nowhere") {
            return Err(PluginError::retryable(ErrorCode::UNREACHABLE, format!("no `{address}`")));
        }
        self.events.lock().unwrap().push(Event::Sent(envelope.id.as_u128()));
        Ok(())
    }

    async fn receive(&self, _max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        Ok(Vec::new())
    }

    fn stats(&self) -> TransportStats {
        let mut stats = TransportStats::default();
        stats.send_queue_depth = INNER_DEPTH;
        stats.counters =
            vec![(UNDELIVERED_COUNTER.to_string(), INNER_UNDELIVERED), ("recorder.things".to_string(), 1)];
        stats
    }

    async fn close(&self) -> Result<(), PluginError> {
        self.closed.store(true, Ordering::SeqCst);
        self.events.lock().unwrap().push(Event::Closed);
        Ok(())
    }
}

struct Recorded {
    layer: FaultLayer,
    events: Events,
}

impl Recorded {
    fn new(config: &str) -> Self {
        Self::with_capabilities(config, Capabilities::ORDERED)
    }

    fn with_capabilities(config: &str, capabilities: Capabilities) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let config: FaultConfig = parse_config(config).unwrap();
        config.validate().unwrap();
        let inner =
            Arc::new(Recorder { events: Arc::clone(&events), capabilities, closed: AtomicBool::new(false) });
        Self { layer: FaultLayer::new(config, inner), events }
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The ids the recorder was sent, in order.
    fn sent(&self) -> Vec<u128> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Sent(id) => Some(id),
                Event::Closed => None,
            })
            .collect()
    }

    async fn send_all(&self, n: u128) {
        for i in 0..n {
            self.layer.send("there", envelope(i)).await.unwrap();
        }
    }

    /// Messages the layer holds or delays: what it adds to the inner send queue.
    fn pending(&self) -> u64 {
        self.layer.stats().send_queue_depth - INNER_DEPTH
    }

    fn counter(&self, name: &str) -> u64 {
        counter(&self.layer.stats(), name)
    }
}

fn counter(stats: &TransportStats, name: &str) -> u64 {
    let mut values = stats.counters.iter().filter(|(n, _)| n == name).map(|(_, value)| *value);
    let value = values.next().unwrap_or_else(|| panic!("no counter {name} in {stats:?}"));
    assert_eq!(values.next(), None, "counter {name} twice in {stats:?}");
    value
}

/// The four fault counters: dropped, duplicated, reordered, delayed.
fn faults(stats: &TransportStats) -> [u64; 4] {
    [DROPPED_COUNTER, DUPLICATED_COUNTER, REORDERED_COUNTER, DELAYED_COUNTER].map(|name| counter(stats, name))
}

fn envelope(n: u128) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("a"),
        Destination::Node(NodeId::new("b")),
        Payload::from(vec![1, 2, 3]),
    )
}

#[tokio::test]
async fn reordering_swaps_a_message_with_the_next_one() {
    let recorded = Recorded::new("reorder = 1.0");
    recorded.send_all(6).await;
    assert_eq!(recorded.sent(), [1, 0, 3, 2, 5, 4]);
    assert_eq!(faults(&recorded.layer.stats()), [0, 0, 3, 0]);
}

#[tokio::test]
async fn a_held_message_goes_out_after_the_hold_time_without_a_next_one() {
    let recorded = Recorded::new("reorder = 1.0");
    let start = Instant::now();
    recorded.send_all(1).await;
    assert!(recorded.sent().is_empty(), "held");
    while recorded.sent().is_empty() && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(recorded.sent(), [0]);
    assert!(start.elapsed() >= REORDER_HOLD, "released after {:?}", start.elapsed());
    assert_eq!(recorded.pending(), 0);
}

#[tokio::test]
async fn drops_and_duplicates_are_counted_and_applied() {
    let dropping = Recorded::new("drop = 1.0");
    dropping.send_all(10).await;
    assert!(dropping.sent().is_empty());
    assert_eq!(faults(&dropping.layer.stats()), [10, 0, 0, 0]);

    let duplicating = Recorded::new("duplicate = 1.0");
    duplicating.send_all(3).await;
    assert_eq!(duplicating.sent(), [0, 0, 1, 1, 2, 2]);
    assert_eq!(faults(&duplicating.layer.stats()), [0, 3, 0, 0]);
}

#[tokio::test]
async fn delayed_messages_go_out_after_the_delay() {
    let recorded = Recorded::new("delay_ms = 30");
    let start = Instant::now();
    recorded.send_all(3).await;
    assert!(start.elapsed() < Duration::from_millis(30), "send returns before the delay");
    assert!(recorded.sent().is_empty(), "delayed");
    while recorded.sent().len() < 3 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(30));
    assert_eq!(recorded.sent().len(), 3);
    assert_eq!(faults(&recorded.layer.stats()), [0, 0, 0, 3]);
}

#[tokio::test]
async fn held_and_delayed_messages_count_in_the_send_queue_depth() {
    let held = Recorded::new("reorder = 1.0");
    assert_eq!(held.layer.stats().send_queue_depth, INNER_DEPTH, "nothing held yet: the inner depth");
    held.layer.send("there", envelope(1)).await.unwrap();
    held.layer.send("elsewhere", envelope(2)).await.unwrap();
    assert_eq!(held.pending(), 2, "one message held per address");
    held.layer.send("there", envelope(3)).await.unwrap();
    assert_eq!(held.sent(), [3, 1], "the next message released the held one");
    assert_eq!(held.pending(), 1);

    let delayed = Recorded::new("delay_ms = 60000");
    delayed.send_all(3).await;
    assert_eq!(delayed.pending(), 3);

    // Held and delayed together, and held messages riding with a delayed one: whatever the
    // layer took and the recorder has not seen is pending.
    let mixed = Recorded::new("reorder = 0.5\ndelay_ms = 60000\nseed = 4");
    mixed.send_all(20).await;
    let [_, _, reordered, delayed_count] = faults(&mixed.layer.stats());
    assert!(reordered > 0 && delayed_count > 0, "both faults happened: {reordered} {delayed_count}");
    assert_eq!(mixed.pending(), 20 - mixed.sent().len() as u64, "{:?}", mixed.sent());
    assert!(mixed.pending() > 0);
}

#[tokio::test]
async fn close_sends_held_and_delayed_messages_then_closes_the_inner_transport() {
    let held = Recorded::new("reorder = 1.0");
    held.layer.send("there", envelope(1)).await.unwrap();
    held.layer.send("elsewhere", envelope(2)).await.unwrap();
    held.layer.close().await.unwrap();
    let events = held.events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.contains(&Event::Sent(1)) && events.contains(&Event::Sent(2)), "{events:?}");
    assert_eq!(events.last(), Some(&Event::Closed), "the inner transport closes last");
    assert_eq!(held.layer.stats().send_queue_depth, INNER_DEPTH);

    let delayed = Recorded::new("delay_ms = 100\nreorder = 0.5\nseed = 4");
    let start = Instant::now();
    delayed.send_all(20).await;
    assert!(delayed.pending() > 0);
    delayed.layer.close().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(100), "close waited for the delayed messages");
    let events = delayed.events();
    assert_eq!(events.last(), Some(&Event::Closed), "{events:?}");
    let mut sent = delayed.sent();
    sent.sort_unstable();
    assert_eq!(sent, (0..20).collect::<Vec<_>>(), "every message was sent before the inner closed");
    assert_eq!(delayed.pending(), 0);
    assert_eq!(delayed.counter(UNDELIVERED_COUNTER), INNER_UNDELIVERED, "nothing failed");
}

#[tokio::test]
async fn sends_after_close_fail_as_closed() {
    // Even a message that would be dropped: the layer refuses it before deciding.
    let recorded = Recorded::new("drop = 1.0");
    recorded.layer.close().await.unwrap();
    let error = recorded.layer.send("there", envelope(1)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::CLOSED, "{error}");
    assert_eq!(recorded.events(), [Event::Closed]);
    assert_eq!(faults(&recorded.layer.stats()), [0, 0, 0, 0]);
}

#[tokio::test]
async fn the_same_seed_replays_the_same_sends() {
    // Timers cannot fire while the loop runs (the recorder never yields), so what reaches the
    // recorder depends on the seed alone.
    async fn run(seed: u64) -> (Vec<u128>, [u64; 4]) {
        let recorded = Recorded::new(&format!("drop = 0.2\nduplicate = 0.2\nreorder = 0.3\nseed = {seed}"));
        recorded.send_all(300).await;
        let counters = faults(&recorded.layer.stats());
        recorded.layer.close().await.unwrap();
        (recorded.sent(), counters)
    }
    let (first, counters) = run(9).await;
    let [dropped, duplicated, reordered, _] = counters;
    assert!(dropped > 0 && duplicated > 0 && reordered > 0, "{counters:?}");
    assert_eq!(first.len() as u64, 300 - dropped + duplicated);
    assert!(first.windows(2).any(|pair| pair[0] > pair[1]), "some messages were reordered");
    assert_eq!(run(9).await, (first.clone(), counters));
    assert_ne!(run(10).await.0, first, "another seed gives other faults");
}

#[tokio::test]
async fn later_sends_that_fail_count_as_errors_and_undelivered() {
    let recorded = Recorded::new("reorder = 1.0");
    recorded.layer.send("nowhere", envelope(1)).await.unwrap();
    let publication = Envelope::new(MessageId::from_u128(2), "a", Destination::topic("news"), vec![1]);
    recorded.layer.send("nowhere-either", publication).await.unwrap();
    recorded.layer.close().await.unwrap();
    let stats = recorded.layer.stats();
    assert_eq!(stats.errors, 2, "{stats:?}");
    assert_eq!(counter(&stats, UNDELIVERED_COUNTER), INNER_UNDELIVERED + 1, "a publication does not count");
    assert_eq!(counter(&stats, "recorder.things"), 1, "the inner counters are kept");

    // A message sent at once returns its error instead.
    let direct = Recorded::new("");
    let error = direct.layer.send("nowhere", envelope(3)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert_eq!((direct.layer.stats().errors, direct.counter(UNDELIVERED_COUNTER)), (0, INNER_UNDELIVERED));
}

#[tokio::test]
async fn a_batch_gets_the_faults_item_by_item() {
    let recorded = Recorded::new("duplicate = 1.0");
    let item = |address: &str, n| Outbound { address: address.into(), envelope: envelope(n) };
    let failures =
        recorded.layer.send_batch(vec![item("there", 0), item("nowhere", 1), item("there", 2)]).await;
    assert_eq!(failures.iter().map(|f| f.index).collect::<Vec<_>>(), [1]);
    assert_eq!(failures[0].error.code, ErrorCode::UNREACHABLE);
    assert_eq!(recorded.sent(), [0, 0, 2, 2]);
    assert_eq!(faults(&recorded.layer.stats()), [0, 3, 0, 0]);
}

#[test]
fn capabilities_lose_batched_sends_and_what_the_faults_break() {
    let all = Capabilities::ORDERED
        | Capabilities::RELIABLE
        | Capabilities::BATCHED_SEND
        | Capabilities::ACKNOWLEDGEMENTS
        | Capabilities::DURABLE;
    let kept = Capabilities::ACKNOWLEDGEMENTS | Capabilities::DURABLE;
    let capabilities = |config: &str| Recorded::with_capabilities(config, all).layer.info().capabilities;
    assert_eq!(capabilities(""), kept | Capabilities::ORDERED | Capabilities::RELIABLE);
    assert_eq!(capabilities("duplicate = 0.5"), kept | Capabilities::ORDERED | Capabilities::RELIABLE);
    assert_eq!(capabilities("drop = 0.1"), kept | Capabilities::ORDERED);
    for reorders in ["reorder = 0.1", "delay_ms = 1", "jitter_ms = 1"] {
        assert_eq!(capabilities(reorders), kept | Capabilities::RELIABLE, "{reorders}");
    }
    let info = Recorded::new("drop = 0.5").layer.info();
    assert_eq!((info.local_address.as_str(), info.max_message_size), ("recorder://here", 1 << 20));
}

// Through the host-side API: the plugin as the host loads it. (Over the recorder, linked as a
// plugin of its own: another plugin crate, say comms-memory, cannot be linked into this test
// binary, since each defines the symbol a plugin library exports.)

/// Provides recorders; each instance's events go to [`recorder_events`] under its instance name.
struct RecorderPlugin;

fn recorder_events(instance_name: &str) -> Events {
    static EVENTS: Mutex<Vec<(String, Events)>> = Mutex::new(Vec::new());
    let mut all = EVENTS.lock().unwrap();
    if let Some((_, events)) = all.iter().find(|(name, _)| name == instance_name) {
        return Arc::clone(events);
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    all.push((instance_name.to_string(), Arc::clone(&events)));
    events
}

#[async_trait]
impl Plugin for RecorderPlugin {
    const NAME: &'static str = "recorder";
    const VERSION: &'static str = "0.0.0";
    const DESCRIPTION: &'static str = "records what it is sent (tests)";
    const PROVIDES: Provides = Provides::TRANSPORT;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        Ok(Arc::new(Recorder {
            events: recorder_events(&setup.instance_name),
            capabilities: Capabilities::ORDERED | Capabilities::BATCHED_SEND,
            closed: AtomicBool::new(false),
        }))
    }
}

async fn recorder(instance_name: &str) -> LoadedTransport {
    PluginLibrary::linked::<RecorderPlugin>()
        .new_transport(&NodeId::new("a"), instance_name, "")
        .await
        .unwrap()
}

#[tokio::test]
async fn the_plugin_provides_a_layer_named_faults() {
    let library = PluginLibrary::linked::<FaultsPlugin>();
    assert_eq!(library.description().name, "faults");
    assert_eq!(library.description().provides, Provides::LAYER);
    let error = library.new_transport(&NodeId::new("a"), "faults", "").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNSUPPORTED, "{error}");
}

#[tokio::test]
async fn a_bad_config_is_refused_naming_the_key() {
    let library = PluginLibrary::linked::<FaultsPlugin>();
    for (config, expected) in [
        ("drop = 1.5", "key `drop`: must be a probability between 0 and 1, found 1.5"),
        ("dorp = 0.1", "unknown field `dorp`"),
        ("seed = \"seven\"", "key `seed`:"),
    ] {
        let inner = recorder("bad-config").await;
        let error = library.new_layer(&NodeId::new("a"), "recorder.faults", config, inner).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{error}");
        assert!(error.message.contains(expected), "{config}: {error}");
    }
}

#[tokio::test]
async fn through_the_boundary_held_messages_count_until_close_sends_them() {
    let library = PluginLibrary::linked::<FaultsPlugin>();
    let inner = recorder("boundary").await;
    let layer =
        library.new_layer(&NodeId::new("a"), "recorder.faults", "reorder = 1.0", inner).await.unwrap();
    assert_eq!(layer.info().local_address, "recorder://here");
    assert_eq!(layer.info().capabilities, Capabilities::NONE, "held messages break the order; no batches");
    layer.send("there", envelope(1)).await.unwrap();
    let stats = layer.stats();
    assert_eq!(stats.transport.send_queue_depth, INNER_DEPTH + 1, "{stats:?}");
    assert_eq!(faults(&stats.transport), [0, 0, 1, 0]);
    let events = recorder_events("boundary");
    assert!(events.lock().unwrap().is_empty(), "held");
    layer.close().await.unwrap();
    assert_eq!(*events.lock().unwrap(), [Event::Sent(1), Event::Closed]);
    assert_eq!(layer.stats().transport.send_queue_depth, INNER_DEPTH);
    let error = layer.send("there", envelope(2)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::CLOSED, "{error}");
}

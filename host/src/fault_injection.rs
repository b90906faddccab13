//! Fault injection: drops, delays, duplicates and reorders messages on their way into a
//! transport, so that an application can be tested against an unreliable network with any
//! backend.
//!
//! Configured per transport, in the transport's table of the node's config file:
//!
//! ```toml
//! [transports.tcp]
//! listen = "127.0.0.1:7001"
//! faults = { drop = 0.1, delay_ms = 20, jitter_ms = 10, duplicate = 0.01, reorder = 0.05, seed = 7 }
//! ```
//!
//! Every key of [`FaultConfig`] is optional and defaults to no fault. Used in code:
//!
//! ```no_run
//! # use comms_plugin_api::host_side::LoadedTransport;
//! # async fn example(transport: std::sync::Arc<LoadedTransport>, envelope: comms_host::Envelope)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use comms_host::fault_injection::{FaultConfig, FaultInjector};
//!
//! let injector = FaultInjector::new(FaultConfig { drop: 0.1, seed: 7, ..FaultConfig::default() })?;
//! injector.send(&transport, "127.0.0.1:7002", envelope).await?; // instead of transport.send(..)
//! println!("{:?}", injector.counters());
//! # Ok(()) }
//! ```
//!
//! ## What happens to each message
//!
//! [`FaultInjector::send`] makes one [`FaultDecision`] per message, then:
//!
//! 1. **drop** (probability `drop`): nothing is sent and `send` returns `Ok(())`: the loss is
//!    silent, as on a real network.
//! 2. **duplicate** (probability `duplicate`): the message is sent twice, with the same id.
//! 3. **reorder** (probability `reorder`): the message is held and sent right after the next
//!    message to the same address, or after [`REORDER_HOLD`] if none comes first. At most one
//!    message is held per address; a message that would be held while another one is, is sent
//!    at once (followed by the held one). A held message is not also delayed.
//! 4. **delay** (`delay_ms` plus a uniform `0..=jitter_ms`): the message is sent that much later
//!    from a spawned task, and `send` returns once it is scheduled. Jitter lets delayed messages
//!    overtake each other, as on a real network.
//!
//! ## Guarantees and limits
//!
//! - **Replay**: decisions come from an RNG seeded with `seed` (default 0), drawing the same
//!   number of values for every message whatever the config. The same seed and the same
//!   sequence of sends give the same decisions (with the same version of `rand`), so a failure
//!   seen in a test can be replayed. When messages are delayed, the order in which they reach
//!   the transport also depends on timing.
//! - **Errors**: a message sent at once returns the transport's error (the second copy of a
//!   duplicate only logs its error). Errors of messages sent later (delayed or held) are logged
//!   with `tracing::debug!`: their `send` already returned `Ok(())`.
//! - **Memory is bounded**: at most [`MAX_DELAYED_IN_FLIGHT`] delayed messages per injector
//!   (beyond that `send` waits, like a full link), and at most one held message per address,
//!   each for at most [`REORDER_HOLD`].
//! - [`FaultInjector::flush`] sends every held message and waits for every delayed one: call it
//!   before closing the transport, or held and delayed messages may fail to be sent.
//! - Needs a tokio runtime (it spawns tasks and uses tokio timers); the host always has one.
//! - Use one injector per transport: it keys held messages by address only.

use comms_plugin_api::{host_side::LoadedTransport, Envelope, ErrorCode, PluginError};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Deserialize;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};
use tokio::{sync::Semaphore, task::JoinHandle};

/// How long a reordered message waits for the next message to the same address.
pub const REORDER_HOLD: Duration = Duration::from_millis(50);

/// Delayed messages one injector keeps at most; `send` waits while this many are pending.
pub const MAX_DELAYED_IN_FLIGHT: usize = 1024;

/// The faults to inject into one transport: the `faults` key of a `[transports.NAME]` table.
/// Every key is optional; the default injects nothing. Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Probability (0 to 1) that a message is silently dropped.
    pub drop: f64,
    /// Fixed delay added to every message, in milliseconds.
    pub delay_ms: u64,
    /// Upper bound of a uniformly random extra delay (`0..=jitter_ms`), in milliseconds.
    pub jitter_ms: u64,
    /// Probability (0 to 1) that a message is sent twice.
    pub duplicate: f64,
    /// Probability (0 to 1) that a message is held and sent after the next one.
    pub reorder: f64,
    /// Seed of the decisions; the same seed replays the same decisions.
    pub seed: u64,
}

impl FaultConfig {
    /// Checks that every probability is between 0 and 1; the error names the key (relative to
    /// the `faults` table: `` key `drop`: ... ``).
    pub fn validate(&self) -> Result<(), String> {
        for (key, probability) in
            [("drop", self.drop), ("duplicate", self.duplicate), ("reorder", self.reorder)]
        {
            if !(0.0..=1.0).contains(&probability) {
                return Err(format!(
                    "key `{key}`: must be a probability between 0 and 1, found {probability}"
                ));
            }
        }
        Ok(())
    }

    /// Whether this config injects no fault at all (every message sent once, at once).
    pub fn is_noop(&self) -> bool {
        self.drop == 0.0
            && self.duplicate == 0.0
            && self.reorder == 0.0
            && self.delay_ms == 0
            && self.jitter_ms == 0
    }
}

/// What happens to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultDecision {
    /// Not sent at all.
    Drop,
    /// Sent (see the module documentation for the order of effects).
    Deliver {
        /// Sent twice.
        duplicate: bool,
        /// Sent this much later (zero when `hold` is set).
        delay: Duration,
        /// Held until the next message to the same address has been sent.
        hold: bool,
    },
}

impl FaultDecision {
    /// The decision of a config without faults.
    pub const DELIVER_ONCE: Self = Self::Deliver { duplicate: false, delay: Duration::ZERO, hold: false };
}

/// How many messages each fault touched since the injector was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultCounters {
    /// Messages dropped.
    pub dropped: u64,
    /// Messages sent twice.
    pub duplicated: u64,
    /// Messages sent later than asked (`delay_ms` plus jitter greater than zero).
    pub delayed: u64,
    /// Messages held and sent after a later one (or after [`REORDER_HOLD`]).
    pub reordered: u64,
}

/// Applies a [`FaultConfig`] to the messages given to [`FaultInjector::send`]. See the module
/// documentation.
pub struct FaultInjector {
    config: FaultConfig,
    rng: Mutex<StdRng>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultInjector")
            .field("config", &self.config)
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

/// State the spawned tasks share with the injector.
struct Shared {
    /// At most one held message per address.
    held: Mutex<HashMap<String, Held>>,
    next_ticket: AtomicU64,
    /// One permit per delayed message in flight.
    delayed: Arc<Semaphore>,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delay_count: AtomicU64,
    reordered: AtomicU64,
}

/// A message held back by a reorder decision.
struct Held {
    transport: Arc<LoadedTransport>,
    message: Outgoing,
    /// Tells this hold from a later one at the same address, for its timer.
    ticket: u64,
    /// Sends the message after [`REORDER_HOLD`]; aborted when the next message sends it.
    timer: Option<JoinHandle<()>>,
}

/// A message and whether it goes twice.
struct Outgoing {
    envelope: Envelope,
    duplicate: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data valid, so a panic elsewhere does not poison it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FaultInjector {
    /// An injector applying `config`; fails (naming the key) if the config is invalid.
    pub fn new(config: FaultConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(Self {
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            shared: Arc::new(Shared {
                held: Mutex::new(HashMap::new()),
                next_ticket: AtomicU64::new(0),
                delayed: Arc::new(Semaphore::new(MAX_DELAYED_IN_FLIGHT)),
                dropped: AtomicU64::new(0),
                duplicated: AtomicU64::new(0),
                delay_count: AtomicU64::new(0),
                reordered: AtomicU64::new(0),
            }),
        })
    }

    /// The config it applies.
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// The next decision. [`FaultInjector::send`] calls it once per message; calling it
    /// elsewhere shifts the sequence of decisions.
    pub fn decide(&self) -> FaultDecision {
        decide(&self.config, &mut lock(&self.rng))
    }

    /// How many messages each fault touched so far.
    pub fn counters(&self) -> FaultCounters {
        let shared = &self.shared;
        FaultCounters {
            dropped: shared.dropped.load(Ordering::Relaxed),
            duplicated: shared.duplicated.load(Ordering::Relaxed),
            delayed: shared.delay_count.load(Ordering::Relaxed),
            reordered: shared.reordered.load(Ordering::Relaxed),
        }
    }

    /// Sends `envelope` to `address` through `transport`, with the faults of this injector
    /// applied (see the module documentation). Returns the transport's error only for a message
    /// sent at once; `Ok(())` for a dropped, held or delayed one. Waits while
    /// [`MAX_DELAYED_IN_FLIGHT`] delayed messages are pending, and whenever the transport waits.
    pub async fn send(
        &self,
        transport: &Arc<LoadedTransport>,
        address: &str,
        envelope: Envelope,
    ) -> Result<(), PluginError> {
        let (duplicate, delay, hold) = match self.decide() {
            FaultDecision::Drop => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(id = %envelope.id, address, "fault injection: dropped");
                return Ok(());
            }
            FaultDecision::Deliver { duplicate, delay, hold } => (duplicate, delay, hold),
        };
        if duplicate {
            self.shared.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        let mut message = Outgoing { envelope, duplicate };
        if hold {
            match Shared::hold(&self.shared, transport, address, message) {
                None => {
                    self.shared.reordered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // Another message is held here: this one is its "next message".
                Some(refused) => message = refused,
            }
        }
        let follower = self.shared.take_held(address, None);
        if delay.is_zero() {
            let result = send_message(transport, address, message).await;
            if let Some(held) = follower {
                send_logged(&held.transport, address, held.message).await;
            }
            return result;
        }
        self.shared.delay_count.fetch_add(1, Ordering::Relaxed);
        let permit = Arc::clone(&self.shared.delayed)
            .acquire_owned()
            .await
            .map_err(|_| PluginError::new(ErrorCode::CLOSED, "the fault injector's delay queue is closed"))?;
        let transport = Arc::clone(transport);
        let address = address.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send_logged(&transport, &address, message).await;
            if let Some(held) = follower {
                send_logged(&held.transport, &address, held.message).await;
            }
            drop(permit);
        });
        Ok(())
    }

    /// Sends every held message now and waits until every delayed message has been sent (or
    /// has failed). Messages given to `send` meanwhile may be held or delayed again.
    pub async fn flush(&self) {
        let held: Vec<(String, Held)> = lock(&self.shared.held).drain().collect();
        for (address, mut held) in held {
            if let Some(timer) = held.timer.take() {
                timer.abort();
            }
            send_logged(&held.transport, &address, held.message).await;
        }
        let all = u32::try_from(MAX_DELAYED_IN_FLIGHT).unwrap_or(u32::MAX);
        // Holding every permit means no delayed send is pending; release them at once.
        let _every_permit = self.shared.delayed.acquire_many(all).await;
    }
}

impl Shared {
    /// Holds `message` for `address`, with a timer that sends it after [`REORDER_HOLD`]; gives
    /// the message back (`Some`) if one is already held there.
    fn hold(
        shared: &Arc<Shared>,
        transport: &Arc<LoadedTransport>,
        address: &str,
        message: Outgoing,
    ) -> Option<Outgoing> {
        let mut held = lock(&shared.held);
        if held.contains_key(address) {
            return Some(message);
        }
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let timer = tokio::spawn({
            let shared = Arc::clone(shared);
            let address = address.to_string();
            async move {
                tokio::time::sleep(REORDER_HOLD).await;
                if let Some(held) = shared.take_held(&address, Some(ticket)) {
                    send_logged(&held.transport, &address, held.message).await;
                }
            }
        });
        let entry = Held { transport: Arc::clone(transport), message, ticket, timer: Some(timer) };
        held.insert(address.to_string(), entry);
        None
    }

    /// Takes the message held for `address`: any (stopping its timer), or only the one with
    /// `ticket` (for that timer itself).
    fn take_held(&self, address: &str, ticket: Option<u64>) -> Option<Held> {
        let mut held = lock(&self.held);
        if ticket.is_some_and(|ticket| held.get(address).is_some_and(|h| h.ticket != ticket)) {
            return None;
        }
        let mut taken = held.remove(address)?;
        if ticket.is_none() {
            if let Some(timer) = taken.timer.take() {
                timer.abort();
            }
        }
        Some(taken)
    }
}

/// Sends a message (twice for a duplicate); the error is the first copy's.
async fn send_message(
    transport: &LoadedTransport,
    address: &str,
    message: Outgoing,
) -> Result<(), PluginError> {
    if message.duplicate {
        transport.send(address, message.envelope.clone()).await?;
        if let Err(error) = transport.send(address, message.envelope).await {
            tracing::debug!(%error, address, "fault injection: sending the duplicate copy failed");
        }
        return Ok(());
    }
    transport.send(address, message.envelope).await
}

/// Sends a message whose `send` already returned, logging a failure.
async fn send_logged(transport: &LoadedTransport, address: &str, message: Outgoing) {
    let id = message.envelope.id;
    if let Err(error) = send_message(transport, address, message).await {
        tracing::debug!(%error, %id, address, "fault injection: a delayed or reordered send failed");
    }
}

/// One decision: a pure function of the config and the RNG state. It always draws the same
/// values, in the same order, so the sequence of decisions depends on the seed and the number
/// of messages only.
fn decide(config: &FaultConfig, rng: &mut StdRng) -> FaultDecision {
    let drop_draw: f64 = rng.gen();
    let duplicate_draw: f64 = rng.gen();
    let reorder_draw: f64 = rng.gen();
    let jitter_draw: u64 = rng.gen();
    // `gen::<f64>()` is in [0, 1): probability 0 never fires, 1 always does.
    if drop_draw < config.drop {
        return FaultDecision::Drop;
    }
    let hold = reorder_draw < config.reorder;
    let delay = if hold {
        Duration::ZERO
    } else {
        // Uniform in 0..=jitter_ms; the modulo bias is below 2^-40 for any sensible jitter.
        let jitter = config.jitter_ms.checked_add(1).map_or(jitter_draw, |span| jitter_draw % span);
        Duration::from_millis(config.delay_ms.saturating_add(jitter))
    };
    FaultDecision::Deliver { duplicate: duplicate_draw < config.duplicate, delay, hold }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{
        async_trait, host_side::PluginLibrary, Capabilities, Destination, Inbound, MessageId, NodeId,
        Payload, Plugin, Provides, Setup, Transport, TransportInfo,
    };
    use std::time::Instant;
    use tokio::sync::mpsc;

    fn config(text: &str) -> FaultConfig {
        toml::from_str(text).unwrap()
    }

    fn decisions(config: &FaultConfig, n: usize) -> Vec<FaultDecision> {
        let injector = FaultInjector::new(config.clone()).unwrap();
        (0..n).map(|_| injector.decide()).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_decisions() {
        let faults = config("drop = 0.2\nduplicate = 0.2\nreorder = 0.2\njitter_ms = 30\nseed = 42");
        assert_eq!(decisions(&faults, 1_000), decisions(&faults, 1_000));
        let other_seed = FaultConfig { seed: 43, ..faults.clone() };
        assert_ne!(decisions(&faults, 1_000), decisions(&other_seed, 1_000));
    }

    #[test]
    fn a_drop_rate_of_a_tenth_drops_a_tenth() {
        let dropped = decisions(&config("drop = 0.1\nseed = 1"), 100_000)
            .into_iter()
            .filter(|d| *d == FaultDecision::Drop)
            .count();
        assert!((9_000..=11_000).contains(&dropped), "{dropped} of 100000 dropped");
    }

    #[test]
    fn no_faults_means_every_message_once_and_at_once() {
        assert!(FaultConfig::default().is_noop());
        assert!(decisions(&FaultConfig::default(), 10_000).iter().all(|d| *d == FaultDecision::DELIVER_ONCE));
        assert!(decisions(&config("seed = 99"), 1_000).iter().all(|d| *d == FaultDecision::DELIVER_ONCE));
    }

    #[test]
    fn certain_faults_always_fire_and_holding_replaces_delay() {
        let all_dropped = decisions(&config("drop = 1.0\nduplicate = 1.0"), 1_000);
        assert!(all_dropped.iter().all(|d| *d == FaultDecision::Drop));
        let held = decisions(&config("duplicate = 1.0\nreorder = 1.0\ndelay_ms = 10"), 1_000);
        let expected = FaultDecision::Deliver { duplicate: true, delay: Duration::ZERO, hold: true };
        assert!(held.iter().all(|d| *d == expected));
    }

    #[test]
    fn delay_is_uniform_between_delay_and_delay_plus_jitter() {
        let delays: Vec<u128> = decisions(&config("delay_ms = 20\njitter_ms = 10\nseed = 5"), 10_000)
            .into_iter()
            .map(|d| match d {
                FaultDecision::Deliver { delay, duplicate: false, hold: false } => delay.as_millis(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(delays.iter().min(), Some(&20));
        assert_eq!(delays.iter().max(), Some(&30));
        let tens = delays.iter().filter(|d| **d == 30).count();
        assert!((700..=1_100).contains(&tens), "each of 11 values about 1/11 of the time: {tens}");
    }

    #[test]
    fn validation_names_the_key() {
        for (text, key) in
            [("drop = 1.5", "drop"), ("duplicate = -0.1", "duplicate"), ("reorder = nan", "reorder")]
        {
            let error = config(text).validate().unwrap_err();
            assert!(error.starts_with(&format!("key `{key}`: must be a probability")), "{error}");
            assert!(FaultInjector::new(config(text)).is_err());
        }
        config("drop = 1.0\nduplicate = 0.0\nreorder = 0.5").validate().unwrap();
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_keys() {
        let faults = config("drop = 0.1\nseed = 7");
        assert_eq!(faults, FaultConfig { drop: 0.1, seed: 7, ..FaultConfig::default() });
        let error = toml::from_str::<FaultConfig>("dorp = 0.1").unwrap_err();
        assert!(error.to_string().contains("unknown field `dorp`"), "{error}");
    }

    /// A transport that hands back what it was sent, in order.
    struct Loopback {
        sender: mpsc::Sender<Envelope>,
        receiver: tokio::sync::Mutex<mpsc::Receiver<Envelope>>,
    }

    #[async_trait]
    impl Transport for Loopback {
        fn info(&self) -> TransportInfo {
            TransportInfo::new(Capabilities::ORDERED, "here", 1 << 20)
        }
        async fn send(&self, _address: &str, envelope: Envelope) -> Result<(), PluginError> {
            self.sender.send(envelope).await.map_err(|_| PluginError::closed("loopback"))
        }
        async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
            let mut receiver = self.receiver.lock().await;
            let mut batch = Vec::new();
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(envelope) => batch.push(Inbound { envelope, delivery_tag: 0 }),
                    Err(_) => break,
                }
            }
            Ok(batch)
        }
        async fn close(&self) -> Result<(), PluginError> {
            Ok(())
        }
    }

    struct LoopbackPlugin;

    #[async_trait]
    impl Plugin for LoopbackPlugin {
        const NAME: &'static str = "loopback";
        const VERSION: &'static str = "0.0.0";
        const DESCRIPTION: &'static str = "test loopback";
        const PROVIDES: Provides = Provides::TRANSPORT;
        async fn new_transport(_setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
            let (sender, receiver) = mpsc::channel(4096);
            Ok(Arc::new(Loopback { sender, receiver: tokio::sync::Mutex::new(receiver) }))
        }
    }

    async fn loopback() -> Arc<LoadedTransport> {
        let library = PluginLibrary::linked::<LoopbackPlugin>();
        Arc::new(library.new_transport(&NodeId::new("a"), "loopback", "").await.unwrap())
    }

    fn envelope(n: u128) -> Envelope {
        Envelope::new(
            MessageId::from_u128(n),
            NodeId::new("a"),
            Destination::Node(NodeId::new("b")),
            Payload::from(vec![1, 2, 3]),
        )
    }

    async fn received(transport: &LoadedTransport) -> Vec<u128> {
        transport.receive(u32::MAX).await.unwrap().into_iter().map(|i| i.envelope.id.as_u128()).collect()
    }

    async fn send_all(injector: &FaultInjector, transport: &Arc<LoadedTransport>, n: u128) {
        for i in 0..n {
            injector.send(transport, "there", envelope(i)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn reordering_swaps_a_message_with_the_next_one() {
        let transport = loopback().await;
        let injector = FaultInjector::new(config("reorder = 1.0")).unwrap();
        send_all(&injector, &transport, 6).await;
        assert_eq!(received(&transport).await, [1, 0, 3, 2, 5, 4]);
        assert_eq!(injector.counters(), FaultCounters { reordered: 3, ..FaultCounters::default() });
    }

    #[tokio::test]
    async fn a_held_message_goes_out_after_the_hold_time_without_a_next_one() {
        let transport = loopback().await;
        let injector = FaultInjector::new(config("reorder = 1.0")).unwrap();
        let start = Instant::now();
        send_all(&injector, &transport, 1).await;
        assert!(received(&transport).await.is_empty(), "held");
        let mut ids = Vec::new();
        while ids.is_empty() && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            ids = received(&transport).await;
        }
        assert_eq!(ids, [0]);
        assert!(start.elapsed() >= REORDER_HOLD, "released after {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn flush_sends_held_messages_and_waits_for_delayed_ones() {
        let transport = loopback().await;
        let injector = FaultInjector::new(config("delay_ms = 30")).unwrap();
        let start = Instant::now();
        send_all(&injector, &transport, 3).await;
        assert!(start.elapsed() < Duration::from_millis(30), "send returns before the delay");
        assert!(received(&transport).await.is_empty(), "delayed");
        injector.flush().await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(received(&transport).await.len(), 3);
        assert_eq!(injector.counters(), FaultCounters { delayed: 3, ..FaultCounters::default() });

        let held = FaultInjector::new(config("reorder = 1.0")).unwrap();
        send_all(&held, &transport, 1).await;
        held.flush().await;
        assert_eq!(received(&transport).await, [0]);
    }

    #[tokio::test]
    async fn drops_and_duplicates_are_counted_and_applied() {
        let transport = loopback().await;
        let dropping = FaultInjector::new(config("drop = 1.0")).unwrap();
        send_all(&dropping, &transport, 10).await;
        assert!(received(&transport).await.is_empty());
        assert_eq!(dropping.counters(), FaultCounters { dropped: 10, ..FaultCounters::default() });

        let duplicating = FaultInjector::new(config("duplicate = 1.0")).unwrap();
        send_all(&duplicating, &transport, 3).await;
        assert_eq!(received(&transport).await, [0, 0, 1, 1, 2, 2]);
        assert_eq!(duplicating.counters().duplicated, 3);
    }
}

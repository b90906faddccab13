//! The layer: applies the [`Decider`]'s decisions to what it is given to send, and sends through
//! the transport below.

use crate::{
    decision::{Decider, FaultDecision},
    FaultConfig, DELAYED_COUNTER, DROPPED_COUNTER, DUPLICATED_COUNTER, MAX_DELAYED_IN_FLIGHT,
    REORDERED_COUNTER, REORDER_HOLD,
};
use comms_plugin_api::{
    async_trait, counts_as_undelivered, Capabilities, Envelope, Inbound, Outbound, PluginError, SendFailure,
    Settlement, Transport, TransportInfo, TransportStats, UNDELIVERED_COUNTER,
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};
use tokio::{
    sync::{watch, Semaphore},
    task::JoinHandle,
};

/// A [`FaultConfig`] applied to what is sent through the transport below: see the crate
/// documentation.
pub(crate) struct FaultLayer {
    decider: Mutex<Decider>,
    info: TransportInfo,
    /// How long `close` waits for pending messages: the longest delay, plus [`CLOSE_GRACE`].
    close_wait: Duration,
    shared: Arc<Shared>,
}

/// What `close` allows, beyond the longest delay, for the pending messages to be sent.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl std::fmt::Debug for FaultLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultLayer").field("info", &self.info).finish_non_exhaustive()
    }
}

/// What the layer shares with its spawned tasks (reorder timers and delayed sends).
struct Shared {
    inner: Arc<dyn Transport>,
    state: Mutex<State>,
    next_ticket: AtomicU64,
    /// One permit per delayed message in flight.
    delayed: Arc<Semaphore>,
    /// Messages taken by `send` and not yet handed to `inner`: held, delayed, or riding with a
    /// delayed one. Counted in `send_queue_depth`, and `close` waits for it to reach 0.
    pending: watch::Sender<u64>,
    counters: Counters,
}

/// The held messages and whether the layer is closing, under one lock: once `closing` is set,
/// nothing more is held or delayed (so `pending` only goes down).
#[derive(Default)]
struct State {
    /// At most one held message per address.
    held: HashMap<String, Held>,
    closing: bool,
}

/// A message held back by a reorder decision.
struct Held {
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

/// What the layer counts, for [`Transport::stats`].
#[derive(Default)]
struct Counters {
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    reordered: AtomicU64,
    /// Sends to `inner` that failed after the layer's `send` returned.
    errors: AtomicU64,
    /// Of those, the ones [`counts_as_undelivered`] counts.
    undelivered: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data valid, so a panic elsewhere does not poison it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl FaultLayer {
    /// A layer applying `config` (already validated) to what it sends through `inner`.
    pub(crate) fn new(config: FaultConfig, inner: Arc<dyn Transport>) -> Self {
        let info = layer_info(&config, inner.info());
        let longest_delay = Duration::from_millis(config.delay_ms.saturating_add(config.jitter_ms));
        Self {
            close_wait: longest_delay.max(REORDER_HOLD).saturating_add(CLOSE_GRACE),
            decider: Mutex::new(Decider::new(config)),
            info,
            shared: Arc::new(Shared {
                inner,
                state: Mutex::new(State::default()),
                next_ticket: AtomicU64::new(0),
                delayed: Arc::new(Semaphore::new(MAX_DELAYED_IN_FLIGHT)),
                pending: watch::channel(0).0,
                counters: Counters::default(),
            }),
        }
    }

    /// Sends `message` now, then the message that was held for `address` (if any).
    async fn send_now(
        &self,
        address: &str,
        message: Outgoing,
        follower: Option<Held>,
    ) -> Result<(), PluginError> {
        let result = self.shared.send_message(address, message).await;
        if let Some(held) = follower {
            self.shared.send_later(address, held.message).await;
        }
        result
    }
}

/// The inner transport's info, without the capabilities the faults break: batched sends (the
/// layer works message by message), order (if messages may be held or delayed) and reliable
/// delivery (if messages may be dropped).
fn layer_info(config: &FaultConfig, mut info: TransportInfo) -> TransportInfo {
    let mut removed = Capabilities::BATCHED_SEND;
    if config.may_reorder() {
        removed = removed | Capabilities::ORDERED;
    }
    if config.drop > 0.0 {
        removed = removed | Capabilities::RELIABLE;
    }
    info.capabilities = Capabilities(info.capabilities.0 & !removed.0);
    info
}

#[async_trait]
impl Transport for FaultLayer {
    fn info(&self) -> TransportInfo {
        self.info.clone()
    }

    /// Applies the next decision to `envelope` (see the crate documentation). Returns the inner
    /// transport's error only for a message sent at once; `Ok(())` for a dropped, held or
    /// delayed one. Waits while [`MAX_DELAYED_IN_FLIGHT`] delayed messages are pending, and
    /// whenever the inner transport waits.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if lock(&self.shared.state).closing {
            return Err(PluginError::closed("the faults layer"));
        }
        let decision = lock(&self.decider).next_decision();
        let (duplicate, delay, hold) = match decision {
            FaultDecision::Drop => {
                count(&self.shared.counters.dropped);
                tracing::trace!(id = %envelope.id, address, "faults: dropped");
                return Ok(());
            }
            FaultDecision::Deliver { duplicate, delay, hold } => (duplicate, delay, hold),
        };
        if duplicate {
            count(&self.shared.counters.duplicated);
        }
        let mut message = Outgoing { envelope, duplicate };
        if hold {
            match Shared::hold(&self.shared, address, message) {
                None => {
                    count(&self.shared.counters.reordered);
                    return Ok(());
                }
                // Another message is held here (or the layer is closing): this one goes now,
                // and is the held one's "next message".
                Some(refused) => message = refused,
            }
        }
        if delay.is_zero() {
            let follower = self.shared.take_held(address, None);
            return self.send_now(address, message, follower).await;
        }
        // The semaphore is never closed; were it, the message would go at once.
        let permit = Arc::clone(&self.shared.delayed).acquire_owned().await.ok();
        let follower = self.shared.take_held(address, None);
        let Some(permit) = permit.filter(|_| self.shared.add_pending()) else {
            // Closing: nothing more is delayed.
            return self.send_now(address, message, follower).await;
        };
        count(&self.shared.counters.delayed);
        let shared = Arc::clone(&self.shared);
        let address = address.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.send_later(&address, message).await;
            if let Some(held) = follower {
                shared.send_later(&address, held.message).await;
            }
            drop(permit);
        });
        Ok(())
    }

    /// Applies the faults to each item as [`Transport::send`] does, one after the other: the
    /// layer works message by message, so it never declares [`Capabilities::BATCHED_SEND`].
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        for (index, outbound) in batch.into_iter().enumerate() {
            if let Err(error) = self.send(&outbound.address, outbound.envelope).await {
                failures.push(SendFailure { index, error });
            }
        }
        failures
    }

    /// Untouched: faults apply to what this side sends.
    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        self.shared.inner.receive(max_batch).await
    }

    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        self.shared.inner.settle(settlements).await
    }

    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.shared.inner.subscribe(pattern).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.shared.inner.unsubscribe(pattern).await
    }

    /// The inner transport's statistics, with the messages held or delayed here added to
    /// `send_queue_depth`, the failed later sends to `errors` (and to
    /// [`UNDELIVERED_COUNTER`] when they count), and the `faults.*` counters.
    fn stats(&self) -> TransportStats {
        let counters = &self.shared.counters;
        let mut stats = self.shared.inner.stats();
        stats.send_queue_depth = stats.send_queue_depth.saturating_add(*self.shared.pending.borrow());
        stats.errors = stats.errors.saturating_add(counters.errors.load(Ordering::Relaxed));
        let undelivered = counters.undelivered.load(Ordering::Relaxed);
        match stats.counters.iter_mut().find(|(name, _)| name == UNDELIVERED_COUNTER) {
            Some((_, value)) => *value = value.saturating_add(undelivered),
            None => stats.counters.push((UNDELIVERED_COUNTER.to_string(), undelivered)),
        }
        for (name, counter) in [
            (DROPPED_COUNTER, &counters.dropped),
            (DUPLICATED_COUNTER, &counters.duplicated),
            (REORDERED_COUNTER, &counters.reordered),
            (DELAYED_COUNTER, &counters.delayed),
        ] {
            stats.counters.push((name.to_string(), counter.load(Ordering::Relaxed)));
        }
        stats
    }

    /// Stops taking messages, sends every held message, waits until every delayed one has been
    /// sent (or has failed), then closes the inner transport. The wait is bounded: after the
    /// longest delay plus [`CLOSE_GRACE`] (a send stuck behind a full queue, say), the inner
    /// transport is closed anyway, and what was still pending fails as for any closed transport.
    async fn close(&self) -> Result<(), PluginError> {
        let held: Vec<(String, Held)> = {
            let mut state = lock(&self.shared.state);
            state.closing = true;
            state.held.drain().collect()
        };
        for (address, mut held) in held {
            if let Some(timer) = held.timer.take() {
                timer.abort();
            }
            self.shared.send_later(&address, held.message).await;
        }
        let mut pending = self.shared.pending.subscribe();
        let idle = pending.wait_for(|pending| *pending == 0);
        if tokio::time::timeout(self.close_wait, idle).await.is_err() {
            let pending = *self.shared.pending.borrow();
            tracing::debug!(pending, "faults: closing the transport below with messages still pending");
        }
        self.shared.inner.close().await
    }
}

impl Shared {
    /// Holds `message` for `address`, with a timer that sends it after [`REORDER_HOLD`]; gives
    /// the message back (`Some`) if one is already held there or the layer is closing.
    fn hold(shared: &Arc<Shared>, address: &str, message: Outgoing) -> Option<Outgoing> {
        let mut state = lock(&shared.state);
        if state.closing || state.held.contains_key(address) {
            return Some(message);
        }
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let timer = tokio::spawn({
            let shared = Arc::clone(shared);
            let address = address.to_string();
            async move {
                tokio::time::sleep(REORDER_HOLD).await;
                if let Some(held) = shared.take_held(&address, Some(ticket)) {
                    shared.send_later(&address, held.message).await;
                }
            }
        });
        state.held.insert(address.to_string(), Held { message, ticket, timer: Some(timer) });
        shared.pending.send_modify(|pending| *pending += 1);
        None
    }

    /// Counts one more pending (delayed) message, unless the layer is closing.
    fn add_pending(&self) -> bool {
        let state = lock(&self.state);
        if !state.closing {
            self.pending.send_modify(|pending| *pending += 1);
        }
        !state.closing
    }

    /// Takes the message held for `address`: any (stopping its timer), or only the one with
    /// `ticket` (for that timer itself). It stays pending until [`Shared::send_later`] sent it.
    fn take_held(&self, address: &str, ticket: Option<u64>) -> Option<Held> {
        let mut state = lock(&self.state);
        if ticket.is_some_and(|ticket| state.held.get(address).is_some_and(|held| held.ticket != ticket)) {
            return None;
        }
        let mut taken = state.held.remove(address)?;
        if ticket.is_none() {
            if let Some(timer) = taken.timer.take() {
                timer.abort();
            }
        }
        Some(taken)
    }

    /// Sends a message (twice for a duplicate); the error is the first copy's, and a failure of
    /// the second copy is only counted and logged.
    async fn send_message(&self, address: &str, message: Outgoing) -> Result<(), PluginError> {
        if !message.duplicate {
            return self.inner.send(address, message.envelope).await;
        }
        self.inner.send(address, message.envelope.clone()).await?;
        if let Err(error) = self.inner.send(address, message.envelope).await {
            count(&self.counters.errors);
            tracing::debug!(%error, address, "faults: sending the duplicate copy failed");
        }
        Ok(())
    }

    /// Sends a pending message (held or delayed: its `send` already returned `Ok`), counting
    /// and logging a failure, and counts it as pending no more.
    async fn send_later(&self, address: &str, message: Outgoing) {
        let id = message.envelope.id;
        let undelivered = counts_as_undelivered(&message.envelope);
        if let Err(error) = self.send_message(address, message).await {
            count(&self.counters.errors);
            if undelivered {
                count(&self.counters.undelivered);
            }
            tracing::debug!(%error, %id, address, "faults: a delayed or reordered send failed");
        }
        self.pending.send_modify(|pending| *pending = pending.saturating_sub(1));
    }
}

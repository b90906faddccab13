//! Settling a received message when the application is done with it, not when it arrives.
//!
//! A message from a transport with acknowledgements (Redis, RabbitMQ, SQLite) stays with its
//! broker until it is settled. The node hands it to the application with an
//! [`Acknowledgement`]: the application (or the host, when a service handler returns) says
//! accept, requeue or discard, and only then does the broker forget it. A process killed before
//! that loses nothing: the broker delivers the message again.
//!
//! One received message can go to several places (a publication to several subscriptions of this
//! node): each copy gets an acknowledgement of its own, and the engine settles the message once
//! the last copy is done: requeued if any asked for it (or was dropped unsettled), discarded if
//! every copy rejected it, accepted otherwise.
//!
//! Settlements go to their transport through a [`SettleLane`]: a bounded queue and a task that
//! settles in batches, beside the receive loop, so acknowledging never waits for application
//! data and many acknowledgements cross the plugin boundary in one call.

use comms_plugin_api::{host_side::LoadedTransport, Settlement, SettlementOutcome};
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use tokio::sync::{mpsc, oneshot};

/// Settlements waiting for their transport, per transport.
const LANE_CAPACITY: usize = 4096;

/// Settlements given to a transport in one call, at most.
const LANE_BATCH: usize = 512;

/// Logged once per process: a message from a broker was dropped without being settled.
static WARNED_UNSETTLED: AtomicBool = AtomicBool::new(false);

enum LaneItem {
    Settle(Settlement),
    /// Answered once everything queued before it has been handed to the transport.
    Flush(oneshot::Sender<()>),
}

/// The settlements of one transport, handed over in batches by a task of their own.
#[derive(Debug, Clone)]
pub(crate) struct SettleLane {
    queue: mpsc::Sender<LaneItem>,
    counts: Arc<SettleCounts>,
}

/// How many deliveries of one transport the node settled, by outcome (metrics and status).
#[derive(Debug, Default)]
pub(crate) struct SettleCounts {
    /// Handled: the broker forgets them.
    pub(crate) accepted: std::sync::atomic::AtomicU64,
    /// Given back to be delivered again (a handler failed, a queue was gone, the node closed).
    pub(crate) requeued: std::sync::atomic::AtomicU64,
    /// Refused for good (discarded or dead-lettered by the transport).
    pub(crate) rejected: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LaneItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Settle(settlement) => write!(f, "Settle({})", settlement.delivery_tag),
            Self::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl SettleLane {
    /// Starts the lane of the transport `name`; the task ends when the transport's node and
    /// every acknowledgement of it are gone.
    pub(crate) fn start(name: String, transport: Arc<LoadedTransport>) -> Self {
        let (queue, mut items) = mpsc::channel::<LaneItem>(LANE_CAPACITY);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut flushes = Vec::new();
            while let Some(first) = items.recv().await {
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match item {
                        LaneItem::Settle(settlement) => batch.push(settlement),
                        LaneItem::Flush(done) => flushes.push(done),
                    }
                    if batch.len() < LANE_BATCH {
                        next = items.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    let count = batch.len();
                    if let Err(error) = transport.settle(std::mem::take(&mut batch)).await {
                        tracing::warn!(transport = %name, %error, count, "settling received messages failed");
                    }
                }
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Self { queue, counts: Arc::default() }
    }

    /// The settlements made so far, by outcome.
    pub(crate) fn counts(&self) -> &SettleCounts {
        &self.counts
    }

    /// Waits until every settlement queued so far has been handed to the transport.
    pub(crate) async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(LaneItem::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    pub(crate) fn settle(&self, settlement: Settlement) {
        let count = match settlement.outcome {
            SettlementOutcome::ACCEPTED => &self.counts.accepted,
            SettlementOutcome::REJECTED_REQUEUE => &self.counts.requeued,
            _ => &self.counts.rejected,
        };
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.queue.try_send(LaneItem::Settle(settlement)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                // Without a runtime (the application's is gone) the broker delivers it again.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let queue = self.queue.clone();
                    runtime.spawn(async move {
                        let _ = queue.send(item).await;
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Where an application's verdict on a received message goes: the node's engine, which settles
/// the message with its transport once every local destination it went to is done with it.
pub(crate) trait Settler: Send + Sync {
    /// The holder of `delivery` is done with it.
    fn settle(&self, delivery: u64, outcome: SettlementOutcome);
}

/// What the application owes the transport for one received message (see the module docs).
/// Nothing for a message from a transport without acknowledgements.
#[derive(Default)]
pub(crate) struct Acknowledgement(Option<(Arc<dyn Settler>, u64)>);

impl std::fmt::Debug for Acknowledgement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((_, delivery)) => write!(f, "Acknowledgement(pending {delivery})"),
            None => f.write_str("Acknowledgement(none)"),
        }
    }
}

impl Acknowledgement {
    /// Nothing to settle (a transport without acknowledgements, or this node's own message).
    pub(crate) fn none() -> Self {
        Self(None)
    }

    /// The acknowledgement of `delivery`, settled through `settler`; delivery 0 means nothing
    /// to settle.
    pub(crate) fn pending(settler: Arc<dyn Settler>, delivery: u64) -> Self {
        Self((delivery != 0).then_some((settler, delivery)))
    }

    /// Whether there is something to settle.
    pub(crate) fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    /// Done with the message.
    pub(crate) fn accept(&mut self) {
        self.finish(SettlementOutcome::ACCEPTED);
    }

    /// The message should be delivered again.
    pub(crate) fn requeue(&mut self) {
        self.finish(SettlementOutcome::REJECTED_REQUEUE);
    }

    /// The message is refused for good.
    pub(crate) fn reject(&mut self) {
        self.finish(SettlementOutcome::REJECTED_DISCARD);
    }

    /// Takes the duty away without settling (the caller settles `delivery` itself, e.g. while
    /// it holds the engine the settler would call).
    pub(crate) fn defuse(mut self) -> Option<u64> {
        self.0.take().map(|(_, delivery)| delivery)
    }

    fn finish(&mut self, outcome: SettlementOutcome) {
        if let Some((settler, delivery)) = self.0.take() {
            settler.settle(delivery, outcome);
        }
    }
}

impl Drop for Acknowledgement {
    fn drop(&mut self) {
        if let Some((settler, delivery)) = self.0.take() {
            if !WARNED_UNSETTLED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "a received message was dropped without ack(), nack() or reject(): it is delivered \
                     again (call ack() when done with a message from a transport with acknowledgements)"
                );
            }
            settler.settle(delivery, SettlementOutcome::REJECTED_REQUEUE);
        }
    }
}

//! Settling a received message when the application is done with it, not when it arrives.
//!
//! A message from a transport with acknowledgements (Redis, RabbitMQ, SQLite) stays with its
//! broker until it is settled. The node hands it to the application with an
//! [`Acknowledgement`]: the application (or the host, when a service handler returns) says
//! accept, requeue or discard, and only then does the broker forget it. A process killed before
//! that loses nothing: the broker delivers the message again.
//!
//! One received message can go to several places (a publication to several subscriptions of this
//! node): each gets a share of its acknowledgement, and the message is settled once the last
//! share is done, requeued if any share asked for it (or was dropped unsettled), discarded if
//! every share rejected it, accepted otherwise.
//!
//! Settlements go to their transport through a [`SettleLane`]: a bounded queue and a task that
//! settles in batches, beside the receive loop, so acknowledging never waits for application
//! data and many acknowledgements cross the plugin boundary in one call.

use crate::dedup::DedupWindow;
use comms_plugin_api::{host_side::LoadedTransport, MessageId, Settlement, SettlementOutcome};
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
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
        Self { queue }
    }

    /// Waits until every settlement queued so far has been handed to the transport.
    pub(crate) async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(LaneItem::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    fn settle(&self, settlement: Settlement) {
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

/// One received message waiting to be settled; settles when the last share is gone.
#[derive(Debug)]
struct Unsettled {
    lane: SettleLane,
    tag: u64,
    /// The node's dedup window and the message's id: a requeued message must be forgotten there,
    /// or its redelivery would be dropped as a repeat.
    remembered: Option<(Arc<Mutex<DedupWindow>>, MessageId)>,
    requeue: AtomicBool,
    accept: AtomicBool,
    reject: AtomicBool,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let outcome = if self.requeue.load(Ordering::Acquire) {
            if let Some((window, id)) = &self.remembered {
                window.lock().unwrap_or_else(|p| p.into_inner()).forget(*id);
            }
            SettlementOutcome::REJECTED_REQUEUE
        } else if self.reject.load(Ordering::Acquire) && !self.accept.load(Ordering::Acquire) {
            SettlementOutcome::REJECTED_DISCARD
        } else {
            SettlementOutcome::ACCEPTED
        };
        self.lane.settle(Settlement { delivery_tag: self.tag, outcome });
    }
}

/// What the application owes the transport for one received message (see the module docs).
/// Nothing for a message from a transport without acknowledgements.
#[derive(Debug, Default)]
pub(crate) struct Acknowledgement(Option<Arc<Unsettled>>);

impl Acknowledgement {
    /// Nothing to settle (a transport without acknowledgements, or this node's own message).
    pub(crate) fn none() -> Self {
        Self(None)
    }

    /// The acknowledgement of the message `tag` of the transport `lane` settles; `remembered`:
    /// where the node's dedup window remembers it.
    pub(crate) fn pending(
        lane: &SettleLane,
        tag: u64,
        remembered: Option<(Arc<Mutex<DedupWindow>>, MessageId)>,
    ) -> Self {
        Self(Some(Arc::new(Unsettled {
            lane: lane.clone(),
            tag,
            remembered,
            requeue: AtomicBool::new(false),
            accept: AtomicBool::new(false),
            reject: AtomicBool::new(false),
        })))
    }

    /// Another share of the same message, for one more destination.
    pub(crate) fn share(&self) -> Self {
        Self(self.0.clone())
    }

    /// Whether there is something to settle.
    pub(crate) fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    /// This share is done with the message.
    pub(crate) fn accept(&mut self) {
        self.finish(|unsettled| &unsettled.accept);
    }

    /// This share wants the message delivered again.
    pub(crate) fn requeue(&mut self) {
        self.finish(|unsettled| &unsettled.requeue);
    }

    /// This share refuses the message for good.
    pub(crate) fn reject(&mut self) {
        self.finish(|unsettled| &unsettled.reject);
    }

    /// Gives up this share without a verdict (it went nowhere).
    pub(crate) fn release(mut self) {
        self.0 = None;
    }

    fn finish(&mut self, flag: impl FnOnce(&Unsettled) -> &AtomicBool) {
        if let Some(unsettled) = self.0.take() {
            flag(&unsettled).store(true, Ordering::Release);
        }
    }
}

impl Drop for Acknowledgement {
    fn drop(&mut self) {
        if let Some(unsettled) = self.0.take() {
            if !WARNED_UNSETTLED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "a received message was dropped without ack(), nack() or reject(): it is delivered \
                     again (call ack() when done with a message from a transport with acknowledgements)"
                );
            }
            unsettled.requeue.store(true, Ordering::Release);
        }
    }
}

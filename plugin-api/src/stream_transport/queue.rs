//! The outgoing queue of one peer: bounded in messages, filled by the senders, emptied by the
//! peer's writer task.
//!
//! Envelopes wait here as they were sent (their buffers moved, not copied); the writer encodes
//! them straight into the buffer it writes. A batch of sends takes its room in one step and
//! wakes the writer once.

use crate::{Envelope, PluginError};
use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};
use tokio::sync::{Notify, Semaphore, TryAcquireError};

/// A queued envelope and the size of its frame (checked against `max_frame_size` by `send`).
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) envelope: Envelope,
    pub(super) frame_bytes: usize,
}

/// What [`PeerQueue::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Items were moved out.
    Taken,
    /// Nothing queued; wait with [`PeerQueue::ready`].
    Empty,
    /// Nothing queued and nothing more will be: the writer ends.
    Finished,
}

#[derive(Debug)]
struct State {
    items: VecDeque<Queued>,
    /// Whether sends are still taken.
    open: bool,
    /// Why the writer gave up, once it has.
    failure: Option<PluginError>,
}

/// One peer's queue: a semaphore counts its free places (senders wait on it: backpressure), a
/// mutex guards the items, a `Notify` wakes the writer.
#[derive(Debug)]
pub(super) struct PeerQueue {
    state: Mutex<State>,
    room: Semaphore,
    ready: Notify,
    capacity: usize,
}

impl PeerQueue {
    pub(super) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            state: Mutex::new(State { items: VecDeque::new(), open: true, failure: None }),
            room: Semaphore::new(capacity),
            ready: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a push, a pop or a flag: valid after any panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `items` in order, waiting for room (at most a queue's capacity at a time, each
    /// part with one wake of the writer). `Err` once the queue no longer takes sends; the items
    /// left in `items` were not queued.
    pub(super) async fn push<I: ExactSizeIterator<Item = Queued>>(&self, items: &mut I) -> Result<(), ()> {
        while items.len() > 0 {
            let wanted = items.len().min(self.capacity);
            let count = wanted as u32;
            match self.room.try_acquire_many(count) {
                Ok(permits) => permits.forget(),
                Err(TryAcquireError::Closed) => return Err(()),
                Err(TryAcquireError::NoPermits) => {
                    self.room.acquire_many(count).await.map_err(|_| ())?.forget()
                }
            }
            let mut state = self.lock();
            if !state.open {
                return Err(());
            }
            state.items.extend(items.by_ref().take(wanted));
            drop(state);
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves queued items to `out` until their frames reach `budget` bytes (at least one item,
    /// so a frame larger than the budget goes alone), freeing their places.
    pub(super) fn take(&self, budget: usize, out: &mut Vec<Queued>) -> Take {
        let mut state = self.lock();
        let before = out.len();
        let mut bytes = 0;
        while bytes < budget {
            let Some(item) = state.items.pop_front() else { break };
            bytes += item.frame_bytes;
            out.push(item);
        }
        let open = state.open;
        drop(state);
        let taken = out.len() - before;
        if taken > 0 {
            self.room.add_permits(taken);
            Take::Taken
        } else if open {
            Take::Empty
        } else {
            Take::Finished
        }
    }

    /// Completes when items may have been queued (or the queue finished) since the last
    /// [`PeerQueue::take`]. A wake is never lost: one that comes first is kept for the next wait.
    pub(super) async fn ready(&self) {
        self.ready.notified().await
    }

    /// Takes no more sends; the writer writes what is queued, then ends. Senders waiting for
    /// room fail.
    pub(super) fn finish(&self) {
        self.lock().open = false;
        self.room.close();
        self.ready.notify_one();
    }

    /// The writer gave up: records why (senders read it once the queue no longer takes sends)
    /// and returns what was queued (for the writer to count, then drop).
    pub(super) fn fail(&self, error: PluginError) -> VecDeque<Queued> {
        let dropped = {
            let mut state = self.lock();
            state.open = false;
            state.failure = Some(error);
            std::mem::take(&mut state.items)
        };
        self.room.close();
        dropped
    }

    /// Whether sends are still taken.
    pub(super) fn is_open(&self) -> bool {
        self.lock().open
    }

    /// Why the writer gave up, if it did.
    pub(super) fn failure(&self) -> Option<PluginError> {
        self.lock().failure.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Destination, MessageId};
    use std::{sync::Arc, time::Duration};

    fn item(n: u32) -> Queued {
        Queued {
            envelope: Envelope::new(MessageId::from_u128(n.into()), "a", Destination::node("b"), vec![0; 10]),
            frame_bytes: 100,
        }
    }

    fn ids(items: &[Queued]) -> Vec<u128> {
        items.iter().map(|item| item.envelope.id.as_u128()).collect()
    }

    #[tokio::test]
    async fn items_come_out_in_order_within_the_budget() {
        let queue = PeerQueue::new(10);
        queue.push(&mut (0..5).map(item)).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(queue.take(250, &mut out), Take::Taken);
        assert_eq!(ids(&out), [0, 1, 2], "up to the budget, the last one crossing it");
        out.clear();
        assert_eq!(queue.take(1, &mut out), Take::Taken);
        assert_eq!(ids(&out), [3], "at least one");
        out.clear();
        assert_eq!(queue.take(1000, &mut out), Take::Taken);
        assert_eq!(ids(&out), [4]);
        out.clear();
        assert_eq!(queue.take(1000, &mut out), Take::Empty);
        queue.finish();
        assert_eq!(queue.take(1000, &mut out), Take::Finished);
        assert!(queue.push(&mut std::iter::once(item(9))).await.is_err(), "finished: no more sends");
    }

    #[tokio::test]
    async fn a_full_queue_makes_senders_wait_and_a_batch_larger_than_the_queue_goes_in_parts() {
        let queue = Arc::new(PeerQueue::new(4));
        let sender = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.push(&mut (0..10).map(item)).await })
        };
        let mut out = Vec::new();
        while out.len() < 10 {
            tokio::time::timeout(Duration::from_secs(5), queue.ready()).await.expect("woken");
            queue.take(usize::MAX, &mut out);
            assert!(out.len() <= 10);
        }
        sender.await.unwrap().unwrap();
        assert_eq!(ids(&out), (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failed_queue_drops_its_items_and_fails_waiting_senders() {
        let queue = Arc::new(PeerQueue::new(2));
        queue.push(&mut (0..2).map(item)).await.unwrap();
        let waiting = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let mut items = (2..4).map(item);
                let pushed = queue.push(&mut items).await;
                (pushed, items.len())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(queue.fail(PluginError::closed("test")).len(), 2);
        assert_eq!(waiting.await.unwrap(), (Err(()), 2), "the waiting batch was not queued");
        assert!(!queue.is_open());
        assert!(queue.failure().is_some());
        assert_eq!(queue.take(100, &mut Vec::new()), Take::Finished);
    }
}

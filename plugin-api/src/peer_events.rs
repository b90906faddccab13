//! The queue between a discovery's background work and [`Discovery::next_event`]: bounded,
//! and it never loses a node's latest state.
//!
//! A discovery learns of peers in a task of its own (a watcher of a table or a bucket, a
//! protocol loop) and the host takes the events when it is ready. A plain bounded channel leaves
//! the producer two bad choices when the host falls behind: wait (a protocol loop that waits
//! stops answering its peers) or drop the event (a dropped `Left` leaves a dead peer in the
//! host's table, a dropped `Joined` hides a live one). This queue holds at most one event per
//! node instead: an event about a node that already has one waiting is merged into it, in its
//! place in the queue. The host then learns every node's latest state, in the order the nodes
//! first changed, and the queue's size is bounded by the number of nodes, not of changes.
//!
//! Merging: the newer event replaces the waiting one, except that an `Updated` after a waiting
//! `Joined` stays `Joined` (with the newer record), since the host has not seen the node yet. A
//! node that leaves and comes back before the host looked is one `Joined` (or `Updated`) with
//! its new record: the host sees where the node is now, not each step on the way.
//!
//! Limits: events about at most `capacity` different nodes wait. Past that,
//! [`PeerEventSender::push`] gives the event back (the caller logs it: the host's view then
//! lags until that node changes again or the host asks for [`Discovery::peers`]) and
//! [`PeerEventSender::send`] waits for room.
//!
//! [`Discovery::next_event`]: crate::Discovery::next_event
//! [`Discovery::peers`]: crate::Discovery::peers

use crate::{PeerEvent, PeerEventKind};
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
};
use tokio::sync::{watch, Notify};

/// A new queue holding events about at most `capacity` nodes (at least one).
pub fn peer_event_queue(capacity: usize) -> (PeerEventSender, PeerEventQueue) {
    let shared = Arc::new(Shared {
        waiting: Mutex::new(Waiting::default()),
        capacity: capacity.max(1),
        arrived: Notify::new(),
        room: Notify::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
    });
    (PeerEventSender { shared: Arc::clone(&shared) }, PeerEventQueue { shared })
}

/// The events waiting: one per node, in the order the nodes first changed.
#[derive(Default)]
struct Waiting {
    order: VecDeque<String>,
    by_node: HashMap<String, PeerEvent>,
}

struct Shared {
    waiting: Mutex<Waiting>,
    capacity: usize,
    /// Notified when an event is queued or the last sender goes.
    arrived: Notify,
    /// Notified when an event is taken or the receiving end goes.
    room: Notify,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
}

impl Shared {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent data.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why [`PeerEventSender::push`] gave an event back: events about `capacity` other nodes wait.
/// Holds the event (boxed: a record is large, and the error is rare).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull(pub Box<PeerEvent>);

/// The producing end: cheap to clone, never blocks in [`PeerEventSender::push`].
pub struct PeerEventSender {
    shared: Arc<Shared>,
}

impl PeerEventSender {
    /// Queues `event`, merged into the waiting event about the same node if there is one (see
    /// the module docs). Never waits. Gives the event back if events about `capacity` other
    /// nodes are waiting. An event nobody will read any more (the [`PeerEventQueue`] is gone)
    /// is accepted and forgotten.
    pub fn push(&self, event: PeerEvent) -> Result<(), QueueFull> {
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let mut waiting = self.shared.waiting();
            let key = event.record.id.as_str();
            if let Some(queued) = waiting.by_node.get_mut(key) {
                let kind = if queued.kind == PeerEventKind::Joined && event.kind == PeerEventKind::Updated {
                    PeerEventKind::Joined
                } else {
                    event.kind
                };
                *queued = PeerEvent { kind, record: event.record };
            } else if waiting.order.len() >= self.shared.capacity {
                return Err(QueueFull(Box::new(event)));
            } else {
                let key = key.to_string();
                waiting.order.push_back(key.clone());
                waiting.by_node.insert(key, event);
            }
        }
        self.shared.arrived.notify_waiters();
        Ok(())
    }

    /// Queues `event` like [`PeerEventSender::push`], waiting for room if events about
    /// `capacity` other nodes are waiting. Returns `false` (and drops the event) once the
    /// [`PeerEventQueue`] is gone: the discovery was dropped, and its watcher can stop.
    pub async fn send(&self, mut event: PeerEvent) -> bool {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.shared.receiver_gone.load(Ordering::Acquire) {
                return false;
            }
            match self.push(event) {
                Ok(()) => return true,
                Err(QueueFull(back)) => event = *back,
            }
            room.await;
        }
    }
}

impl Clone for PeerEventSender {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl Drop for PeerEventSender {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.arrived.notify_waiters();
        }
    }
}

impl std::fmt::Debug for PeerEventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEventSender").field("capacity", &self.shared.capacity).finish_non_exhaustive()
    }
}

/// The receiving end, read by [`Discovery::next_event`](crate::Discovery::next_event).
pub struct PeerEventQueue {
    shared: Arc<Shared>,
}

impl PeerEventQueue {
    /// The next event, waiting for one. `None` once `closing` is `true` (at once, even with
    /// events waiting: a closed discovery has nothing more to say), once every sender is gone
    /// and no event waits, or once the sender of `closing` is gone while waiting. Cancel-safe: an event is taken only when it is returned.
    ///
    /// This is the whole of `next_event` for a discovery built on this queue:
    /// `Ok(self.events.next(self.closed.subscribe()).await)`.
    pub async fn next(&self, mut closing: watch::Receiver<bool>) -> Option<PeerEvent> {
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if *closing.borrow_and_update() {
                return None;
            }
            if let Some(event) = self.take() {
                return Some(event);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return None;
            }
            tokio::select! {
                () = arrived => {}
                changed = closing.changed() => {
                    // The owner of the flag is gone: nobody can close any more, nor read on.
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// The first waiting event, if any.
    fn take(&self) -> Option<PeerEvent> {
        let event = {
            let mut waiting = self.shared.waiting();
            let key = waiting.order.pop_front()?;
            waiting.by_node.remove(&key)
        };
        self.shared.room.notify_waiters();
        event
    }

    /// How many events wait (one per node at most).
    pub fn len(&self) -> usize {
        self.shared.waiting().order.len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for PeerEventQueue {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        self.shared.room.notify_waiters();
    }
}

impl std::fmt::Debug for PeerEventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEventQueue").field("waiting", &self.len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeRecord, PeerEventKind as Kind};
    use std::{future::Future, pin::pin, task::Poll};

    /// Polls `future` once: whether it has finished yet.
    fn finished<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(future.poll(&mut context), Poll::Ready(_))
    }

    fn event(kind: Kind, id: &str, service: &str) -> PeerEvent {
        let mut record = NodeRecord::new(id);
        record.services.push(service.into());
        PeerEvent { kind, record }
    }

    fn open() -> (watch::Sender<bool>, watch::Receiver<bool>) {
        watch::channel(false)
    }

    async fn drain(queue: &PeerEventQueue) -> Vec<(Kind, String, String)> {
        let (_closing, closed) = open();
        let mut taken = Vec::new();
        while !queue.is_empty() {
            let event = queue.next(closed.clone()).await.expect("an event waits");
            taken.push((
                event.kind,
                event.record.id.as_str().to_string(),
                event.record.services[0].to_string(),
            ));
        }
        taken
    }

    #[tokio::test]
    async fn events_about_one_node_merge_in_place_and_keep_the_latest_record() {
        let (sender, queue) = peer_event_queue(8);
        sender.push(event(Kind::Joined, "a", "a1")).unwrap();
        sender.push(event(Kind::Joined, "b", "b1")).unwrap();
        sender.push(event(Kind::Updated, "a", "a2")).unwrap();
        sender.push(event(Kind::Left, "b", "b2")).unwrap();
        sender.push(event(Kind::Updated, "c", "c1")).unwrap();
        sender.push(event(Kind::Joined, "c", "c2")).unwrap();
        assert_eq!(queue.len(), 3);
        assert_eq!(
            drain(&queue).await,
            [
                // Not seen by the host yet: still a join, with the newer record.
                (Kind::Joined, "a".into(), "a2".into()),
                (Kind::Left, "b".into(), "b2".into()),
                (Kind::Joined, "c".into(), "c2".into()),
            ]
        );
        // Taken: a later event about the same node is queued again, behind the others.
        sender.push(event(Kind::Updated, "a", "a3")).unwrap();
        assert_eq!(drain(&queue).await, [(Kind::Updated, "a".into(), "a3".into())]);
    }

    #[tokio::test]
    async fn past_capacity_only_new_nodes_are_refused_and_send_waits_for_room() {
        let (sender, queue) = peer_event_queue(2);
        sender.push(event(Kind::Joined, "a", "a1")).unwrap();
        sender.push(event(Kind::Joined, "b", "b1")).unwrap();
        let refused = sender.push(event(Kind::Joined, "c", "c1")).unwrap_err();
        assert_eq!(refused.0.record.id.as_str(), "c");
        // A node that already waits is merged, full or not.
        sender.push(event(Kind::Left, "a", "a2")).unwrap();

        let mut sending = pin!(sender.send(event(Kind::Joined, "c", "c1")));
        assert!(!finished(sending.as_mut()), "send waits while the queue is full");
        let (_closing, closed) = open();
        let first = queue.next(closed).await.expect("an event waits");
        assert_eq!((first.kind, first.record.id.as_str()), (Kind::Left, "a"));
        assert!(sending.await, "room was made: the event is queued");
        assert_eq!(
            drain(&queue).await,
            [(Kind::Joined, "b".into(), "b1".into()), (Kind::Joined, "c".into(), "c1".into())]
        );
    }

    #[tokio::test]
    async fn next_waits_for_an_event_and_ends_at_closing_or_when_the_senders_are_gone() {
        let (sender, queue) = peer_event_queue(4);
        let (closing, closed) = open();
        let mut next = pin!(queue.next(closed.clone()));
        assert!(!finished(next.as_mut()), "nothing waits yet");
        sender.push(event(Kind::Joined, "late", "x")).unwrap();
        let late = next.await.expect("the late event arrives");
        assert_eq!(late.record.id.as_str(), "late");

        // Closing ends a waiting `next` and every later one, even with events waiting.
        let mut next = pin!(queue.next(closed.clone()));
        assert!(!finished(next.as_mut()), "nothing waits yet");
        closing.send_replace(true);
        assert_eq!(next.await, None);
        sender.push(event(Kind::Joined, "after", "x")).unwrap();
        assert_eq!(queue.next(closed).await, None);

        // A `closing` whose sender is gone ends a waiting `next` too (instead of waking it
        // again and again).
        let (sender, queue) = peer_event_queue(4);
        let (closing, closed) = open();
        let mut next = pin!(queue.next(closed));
        assert!(!finished(next.as_mut()), "nothing waits yet");
        drop(closing);
        assert_eq!(next.await, None);
        drop(sender);

        // The senders gone: what waits is handed over, then `None`.
        let (sender, queue) = peer_event_queue(4);
        sender.push(event(Kind::Joined, "last", "x")).unwrap();
        drop(sender);
        let (_closing, closed) = open();
        assert_eq!(queue.next(closed.clone()).await.map(|event| event.record.id), Some("last".into()));
        assert_eq!(queue.next(closed).await, None);
    }

    #[tokio::test]
    async fn a_sender_learns_that_the_queue_is_gone() {
        let (sender, queue) = peer_event_queue(1);
        sender.push(event(Kind::Joined, "a", "a1")).unwrap();
        let mut sending = pin!(sender.send(event(Kind::Joined, "b", "b1")));
        assert!(!finished(sending.as_mut()), "send waits while the queue is full");
        drop(queue);
        assert!(!sending.await, "a send waiting for room ends when the queue goes");
        assert!(!sender.send(event(Kind::Joined, "c", "c1")).await);
        assert_eq!(sender.push(event(Kind::Joined, "d", "d1")), Ok(()), "pushed events are forgotten");
    }
}

//! The node's inbox: the queue between the engine and `Node::receive*`.
//!
//! Messages go in as the chunks the engine delivers in one step (all the messages of a batch
//! taken from a transport), so the queue costs one push and one wake per batch, not per
//! message, and a chunk the application takes whole moves no message. They come out in order,
//! up to the `max` of each take; what a take leaves of a chunk waits for the next one.
//!
//! Bounded: the engine counts the messages in the inbox and delivers none beyond its capacity
//! (`receive_queue_capacity`), so the queue never holds more chunks than that, plus the room
//! kept for transport failures ([`INBOX_SLACK`]).

use crate::acknowledgement::Acknowledgement;
use comms_plugin_api::{Envelope, PluginError};
use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
};
use tokio::sync::mpsc;

/// Room in the inbox beyond the engine's count of messages, for transport failures reported to
/// the application.
pub(crate) const INBOX_SLACK: usize = 16;

/// What waits in the inbox for `Node::receive`.
pub(crate) enum InboxItem {
    Message(Envelope, Acknowledgement),
    TransportFailed { transport: String, error: PluginError },
}

impl InboxItem {
    fn is_failure(&self) -> bool {
        matches!(self, Self::TransportFailed { .. })
    }
}

/// An inbox for `capacity` messages: the engine's side and the application's.
pub(crate) fn inbox(capacity: usize) -> (InboxSender, InboxReceiver) {
    let (chunks, queue) = mpsc::channel(capacity + INBOX_SLACK);
    let waiting = Arc::new(AtomicUsize::new(0));
    (
        InboxSender { chunks, waiting: Arc::clone(&waiting) },
        InboxReceiver { chunks: queue, rest: VecDeque::new(), waiting },
    )
}

/// The engine's side: puts chunks in.
pub(crate) struct InboxSender {
    chunks: mpsc::Sender<Vec<InboxItem>>,
    /// Items put in and not taken yet (in the queue, or left over by a take).
    waiting: Arc<AtomicUsize>,
}

impl InboxSender {
    /// Puts `chunk` in the inbox: the messages of one engine step in order, or one transport
    /// failure alone. Gives it back when the inbox is gone (the node was dropped) or full.
    pub(crate) fn put(&self, chunk: Vec<InboxItem>) -> Result<(), Vec<InboxItem>> {
        if chunk.is_empty() {
            return Ok(());
        }
        let count = chunk.len();
        // Counted before it can be taken, so that the count never goes below zero.
        self.waiting.fetch_add(count, Relaxed);
        self.chunks.try_send(chunk).map_err(|refused| {
            self.waiting.fetch_sub(count, Relaxed);
            refused.into_inner()
        })
    }

    /// Messages and failures waiting to be taken.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }
}

/// The application's side: takes what waits.
pub(crate) struct InboxReceiver {
    chunks: mpsc::Receiver<Vec<InboxItem>>,
    /// Taken from the queue and not returned yet: the rest of a chunk larger than a take's
    /// `max`, or a failure that came behind messages (the next take returns it first, so that a
    /// failure is never lost and never overtakes a message).
    rest: VecDeque<InboxItem>,
    waiting: Arc<AtomicUsize>,
}

impl InboxReceiver {
    /// Up to `max` items (at least one): a transport failure alone, else messages in the order
    /// they were put in. Waits for the first unless something waits already, or until `stop`
    /// completes (then returns only what is queued already). Empty: nothing waits, and after
    /// `stop` or once the engine's side is gone nothing will.
    pub(crate) async fn take(&mut self, max: usize, stop: impl Future<Output = ()>) -> Vec<InboxItem> {
        let max = max.max(1);
        let mut items = match self.rest.front() {
            Some(item) if item.is_failure() => {
                let failure = self.rest.pop_front().into_iter().collect();
                return self.taken(failure);
            }
            Some(_) => Vec::with_capacity(max.min(self.rest.len())),
            None => {
                let chunk = tokio::select! {
                    biased;
                    chunk = self.chunks.recv() => chunk,
                    () = stop => self.chunks.try_recv().ok(),
                };
                let Some(mut chunk) = chunk else { return Vec::new() };
                if chunk[0].is_failure() {
                    // A failure is put in alone.
                    return self.taken(chunk);
                }
                if chunk.len() > max {
                    self.rest.extend(chunk.drain(max..));
                }
                // The common case under load: this chunk is the batch, as it was put in.
                chunk
            }
        };
        loop {
            while items.len() < max && self.rest.front().is_some_and(|item| !item.is_failure()) {
                items.extend(self.rest.pop_front());
            }
            // Full, or a failure waits behind these messages.
            if items.len() == max || !self.rest.is_empty() {
                break;
            }
            let Ok(chunk) = self.chunks.try_recv() else { break };
            if chunk.len() <= max - items.len() && !chunk[0].is_failure() {
                items.extend(chunk);
            } else {
                self.rest = VecDeque::from(chunk);
            }
        }
        self.taken(items)
    }

    fn taken(&self, items: Vec<InboxItem>) -> Vec<InboxItem> {
        self.waiting.fetch_sub(items.len(), Relaxed);
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::{ErrorCode, MessageId};

    fn message(n: u128) -> InboxItem {
        let to = comms_plugin_api::Destination::Node("b".into());
        InboxItem::Message(
            Envelope::new(MessageId::from_u128(n), "a", to, Vec::new()),
            Acknowledgement::none(),
        )
    }

    fn messages(range: std::ops::Range<u128>) -> Vec<InboxItem> {
        range.map(message).collect()
    }

    fn failure() -> InboxItem {
        InboxItem::TransportFailed {
            transport: "tcp".into(),
            error: PluginError::new(ErrorCode::OTHER, "gone"),
        }
    }

    /// The ids of `items`, a failure as `None`.
    fn ids(items: &[InboxItem]) -> Vec<Option<u128>> {
        items
            .iter()
            .map(|item| match item {
                InboxItem::Message(envelope, _) => Some(envelope.id.as_u128()),
                InboxItem::TransportFailed { .. } => None,
            })
            .collect()
    }

    fn some(range: std::ops::Range<u128>) -> Vec<Option<u128>> {
        range.map(Some).collect()
    }

    /// A `stop` that has completed: a take then returns only what is queued.
    async fn stopped() {}

    #[tokio::test]
    async fn chunks_come_out_in_order_split_and_joined_to_each_take_s_max() {
        let (sender, mut receiver) = inbox(100);
        sender.put(messages(0..5)).unwrap_or_else(|_| panic!("room"));
        sender.put(messages(5..7)).unwrap_or_else(|_| panic!("room"));
        sender.put(messages(7..8)).unwrap_or_else(|_| panic!("room"));
        assert_eq!(sender.waiting(), 8);
        // A chunk larger than `max` is split; what is left comes first next time, and later
        // chunks join it while they fit.
        assert_eq!(ids(&receiver.take(3, stopped()).await), some(0..3));
        assert_eq!(sender.waiting(), 5);
        assert_eq!(ids(&receiver.take(4, stopped()).await), some(3..7));
        assert_eq!(ids(&receiver.take(4, stopped()).await), some(7..8));
        assert_eq!(sender.waiting(), 0);
        assert!(receiver.take(4, stopped()).await.is_empty(), "nothing waits after stop");
    }

    #[tokio::test]
    async fn a_failure_comes_alone_and_never_overtakes_a_message() {
        let (sender, mut receiver) = inbox(100);
        sender.put(messages(0..2)).unwrap_or_else(|_| panic!("room"));
        sender.put(vec![failure()]).unwrap_or_else(|_| panic!("room"));
        sender.put(messages(2..3)).unwrap_or_else(|_| panic!("room"));
        assert_eq!(ids(&receiver.take(10, stopped()).await), some(0..2));
        assert_eq!(ids(&receiver.take(10, stopped()).await), vec![None]);
        assert_eq!(ids(&receiver.take(10, stopped()).await), some(2..3));
        // A failure first in line is also returned alone.
        sender.put(vec![failure()]).unwrap_or_else(|_| panic!("room"));
        sender.put(messages(3..4)).unwrap_or_else(|_| panic!("room"));
        assert_eq!(ids(&receiver.take(10, stopped()).await), vec![None]);
        assert_eq!(ids(&receiver.take(10, stopped()).await), some(3..4));
        assert_eq!(sender.waiting(), 0);
    }

    #[tokio::test]
    async fn a_failure_behind_the_rest_of_a_split_chunk_waits_for_it() {
        let (sender, mut receiver) = inbox(100);
        sender.put(messages(0..4)).unwrap_or_else(|_| panic!("room"));
        sender.put(vec![failure()]).unwrap_or_else(|_| panic!("room"));
        assert_eq!(ids(&receiver.take(3, stopped()).await), some(0..3));
        assert_eq!(ids(&receiver.take(3, stopped()).await), some(3..4));
        assert_eq!(ids(&receiver.take(3, stopped()).await), vec![None]);
    }

    #[tokio::test]
    async fn a_take_waits_for_the_first_chunk_and_ends_when_the_sender_is_gone() {
        let (sender, mut receiver) = inbox(100);
        let take = tokio::spawn(async move {
            let first = receiver.take(10, std::future::pending()).await;
            let after = receiver.take(10, std::future::pending()).await;
            (ids(&first), after.len())
        });
        tokio::task::yield_now().await;
        sender.put(messages(0..2)).unwrap_or_else(|_| panic!("room"));
        drop(sender);
        assert_eq!(take.await.expect("take"), (some(0..2), 0));
    }

    #[tokio::test]
    async fn a_full_or_closed_inbox_gives_the_chunk_back_uncounted() {
        let (sender, receiver) = inbox(1);
        for n in 0..(1 + INBOX_SLACK as u128) {
            sender.put(messages(n..n + 1)).unwrap_or_else(|_| panic!("room for chunk {n}"));
        }
        let refused = sender.put(messages(100..102)).expect_err("full");
        assert_eq!(ids(&refused), some(100..102));
        assert_eq!(sender.waiting(), 1 + INBOX_SLACK);
        drop(receiver);
        assert!(sender.put(messages(200..201)).is_err(), "closed");
        assert!(sender.put(Vec::new()).is_ok(), "an empty chunk is nothing to put");
    }
}

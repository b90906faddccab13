//! The receive queue: what the connections' readers decoded, waiting for
//! [`super::StreamTransport::receive`].
//!
//! A reader puts in what one read decoded as one chunk, so the queue costs one push and one
//! wake per read, not per message, and a chunk that `receive` returns whole moves no message.
//! `receive` returns chunks in the order they were put in, split to its `max_batch` (what it
//! leaves of a chunk comes first next time), and small ones joined.
//!
//! Bounded in messages: a reader takes room for a chunk's messages before putting it in
//! (waiting when there is none: backpressure on the connection), and `receive` gives the room
//! back as it hands the messages out. The queue ends (`receive` returns the empty batch) once
//! every reader has dropped its sender and everything was taken.

use crate::Inbound;
use std::{collections::VecDeque, sync::Arc};
use tokio::sync::{mpsc, Semaphore, TryAcquireError};

/// A batch of this many messages is returned as it is, not joined with the next chunk:
/// joining moves each message of that chunk (and may grow the batch's buffer, copying it),
/// where one more `receive` costs one crossing of the plugin boundary. Measured with
/// `receive(1024)` on the loaded TCP transport (reads of about 430 messages of 64 B), joining
/// large chunks did not pay (3.04M-3.25M msg/s joined, 3.21M-3.26M not, three runs each).
const JOIN_BELOW: usize = 64;

/// The receive queue is gone (the transport was dropped): nothing can be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gone;

/// A queue for `capacity` messages: the readers' side, the side of `receive`, and its depth.
pub(super) fn receive_queue(capacity: usize) -> (ChunkSender, ReceiveQueue, QueueDepth) {
    let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    // Each chunk holds at least one message and its room: never more chunks than `capacity`.
    let (chunks, queue) = mpsc::channel(capacity);
    let room = Arc::new(Semaphore::new(capacity));
    (
        ChunkSender { chunks, room: Arc::clone(&room), capacity },
        ReceiveQueue { chunks: queue, rest: VecDeque::new(), room: Arc::clone(&room) },
        QueueDepth { room, capacity },
    )
}

/// A reader's side; one clone per connection.
#[derive(Debug, Clone)]
pub(super) struct ChunkSender {
    chunks: mpsc::Sender<Vec<Inbound>>,
    room: Arc<Semaphore>,
    capacity: usize,
}

impl ChunkSender {
    /// The most messages one chunk can take room for.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes room for `count` messages (at most [`ChunkSender::capacity`]) if there is that
    /// much now.
    pub(super) fn try_reserve(&self, count: usize) -> Result<bool, Gone> {
        match self.room.try_acquire_many(count as u32) {
            Ok(permits) => {
                permits.forget();
                Ok(true)
            }
            Err(TryAcquireError::NoPermits) => Ok(false),
            Err(TryAcquireError::Closed) => Err(Gone),
        }
    }

    /// Waits for room for `count` messages (at most [`ChunkSender::capacity`]) and takes it.
    /// Cancel-safe: dropped while waiting, it takes nothing.
    pub(super) async fn reserve(&self, count: usize) -> Result<(), Gone> {
        self.room.acquire_many(count as u32).await.map_err(|_| Gone)?.forget();
        Ok(())
    }

    /// Puts `chunk` in, whose room was reserved.
    pub(super) fn put(&self, chunk: Vec<Inbound>) -> Result<(), Gone> {
        // The reserved room guarantees a place: chunks never outnumber their messages.
        self.chunks.try_send(chunk).map_err(|_| Gone)
    }

    /// Completes when the queue is gone.
    pub(super) async fn closed(&self) {
        self.chunks.closed().await
    }
}

/// The side of `receive`.
#[derive(Debug)]
pub(super) struct ReceiveQueue {
    chunks: mpsc::Receiver<Vec<Inbound>>,
    /// Taken from the queue and not returned yet: the rest of a chunk larger than a
    /// `max_batch`.
    rest: VecDeque<Inbound>,
    room: Arc<Semaphore>,
}

impl ReceiveQueue {
    /// Waits for at least one message unless some wait already; returns up to `max` (at least
    /// one) in order: a chunk as it was put in, or the messages of small chunks together.
    /// Empty: every sender is gone and everything was taken. Cancel-safe.
    pub(super) async fn take(&mut self, max: usize) -> Vec<Inbound> {
        let max = max.max(1);
        let mut batch = if self.rest.is_empty() {
            // What is waiting already is taken without setting up the wait (the common case
            // when messages arrive faster than the host takes them).
            let first = match self.chunks.try_recv() {
                Ok(chunk) => Some(chunk),
                Err(_) => self.chunks.recv().await,
            };
            let Some(mut chunk) = first else { return Vec::new() };
            if chunk.len() > max {
                self.rest.extend(chunk.drain(max..));
            }
            // Under load, this chunk is the batch, as the reader put it in.
            chunk
        } else {
            Vec::with_capacity(max.min(self.rest.len()))
        };
        loop {
            let from_rest = (max - batch.len()).min(self.rest.len());
            batch.extend(self.rest.drain(..from_rest));
            if batch.len() == max || batch.len() >= JOIN_BELOW {
                break;
            }
            let Ok(chunk) = self.chunks.try_recv() else { break };
            if chunk.len() <= max - batch.len() {
                batch.extend(chunk);
            } else {
                self.rest = VecDeque::from(chunk);
            }
        }
        self.room.add_permits(batch.len());
        batch
    }
}

impl Drop for ReceiveQueue {
    /// Readers waiting for room stop waiting: nothing will be taken.
    fn drop(&mut self) {
        self.room.close();
    }
}

/// How many messages wait in a queue (put in and not returned by `receive`).
#[derive(Debug)]
pub(super) struct QueueDepth {
    room: Arc<Semaphore>,
    capacity: usize,
}

impl QueueDepth {
    pub(super) fn get(&self) -> u64 {
        self.capacity.saturating_sub(self.room.available_permits()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Destination, Envelope, MessageId};

    fn messages(range: std::ops::Range<u128>) -> Vec<Inbound> {
        range
            .map(|n| Inbound {
                envelope: Envelope::new(
                    MessageId::from_u128(n),
                    "a",
                    Destination::Node("b".into()),
                    Vec::new(),
                ),
                delivery_tag: 0,
            })
            .collect()
    }

    fn ids(batch: &[Inbound]) -> Vec<u128> {
        batch.iter().map(|inbound| inbound.envelope.id.as_u128()).collect()
    }

    fn put(sender: &ChunkSender, chunk: Vec<Inbound>) {
        assert_eq!(sender.try_reserve(chunk.len()), Ok(true), "room for {} messages", chunk.len());
        sender.put(chunk).expect("queue open");
    }

    #[tokio::test]
    async fn chunks_come_out_in_order_split_and_joined_to_max_batch() {
        let (sender, mut queue, depth) = receive_queue(100);
        put(&sender, messages(0..5));
        put(&sender, messages(5..7));
        put(&sender, messages(7..8));
        assert_eq!(depth.get(), 8);
        assert_eq!(ids(&queue.take(3).await), (0..3).collect::<Vec<_>>());
        assert_eq!(depth.get(), 5, "the rest of a split chunk still counts");
        assert_eq!(ids(&queue.take(4).await), (3..7).collect::<Vec<_>>());
        assert_eq!(ids(&queue.take(4).await), vec![7]);
        assert_eq!(depth.get(), 0);
        drop(sender);
        assert!(queue.take(4).await.is_empty(), "the end once every sender is gone");
    }

    #[tokio::test]
    async fn a_large_chunk_is_returned_as_it_is_not_joined_with_the_next() {
        let large = JOIN_BELOW as u128;
        let (sender, mut queue, _) = receive_queue(1000);
        put(&sender, messages(0..large));
        put(&sender, messages(large..large + 1));
        put(&sender, messages(large + 1..large + 2));
        assert_eq!(queue.take(500).await.len(), JOIN_BELOW);
        // Small ones are joined.
        assert_eq!(ids(&queue.take(500).await), vec![large, large + 1]);
    }

    #[tokio::test]
    async fn room_is_bounded_in_messages_and_comes_back_as_they_are_taken() {
        let (sender, mut queue, _) = receive_queue(4);
        put(&sender, messages(0..3));
        assert_eq!(sender.try_reserve(2), Ok(false), "one place left");
        let waiting = tokio::spawn({
            let sender = sender.clone();
            async move {
                sender.reserve(2).await?;
                sender.put(messages(3..5))
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits for room");
        assert_eq!(ids(&queue.take(2).await), vec![0, 1]);
        assert_eq!(waiting.await.expect("task"), Ok(()));
        assert_eq!(ids(&queue.take(10).await), vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn a_dropped_queue_ends_the_readers_waits() {
        let (sender, queue, _) = receive_queue(1);
        put(&sender, messages(0..1));
        let waiting = tokio::spawn({
            let sender = sender.clone();
            async move { sender.reserve(1).await }
        });
        tokio::task::yield_now().await;
        drop(queue);
        assert_eq!(waiting.await.expect("task"), Err(Gone));
        assert_eq!(sender.try_reserve(1), Err(Gone));
        sender.closed().await;
    }
}

//! Topic subscriptions of this node.

use crate::{
    error::ReceiveError,
    node::{decode_received, NodeInner, Received},
    topics::matches,
};
use comms_plugin_api::Envelope;
use futures::Stream;
use serde::de::DeserializeOwned;
use std::{
    marker::PhantomData,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    task::{Context, Poll},
};
use tokio::sync::mpsc;

/// Messages buffered per subscription before delivery waits for the application.
pub const SUBSCRIPTION_BUFFER: usize = 256;

#[derive(Debug)]
struct Entry {
    id: u64,
    pattern: String,
    sender: mpsc::Sender<Envelope>,
}

/// The node's subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    next_id: AtomicU64,
    entries: RwLock<Vec<Entry>>,
}

impl Subscriptions {
    pub(crate) fn add(&self, pattern: &str) -> (u64, mpsc::Receiver<Envelope>) {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { id, pattern: pattern.to_string(), sender };
        self.entries.write().unwrap_or_else(|p| p.into_inner()).push(entry);
        (id, receiver)
    }

    /// Ends every subscription's stream (the node stopped).
    pub(crate) fn clear(&self) {
        self.entries.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub(crate) fn remove(&self, id: u64) {
        self.entries.write().unwrap_or_else(|p| p.into_inner()).retain(|entry| entry.id != id);
    }

    /// The distinct patterns subscribed to, sorted.
    pub(crate) fn patterns(&self) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut patterns: Vec<String> = entries.iter().map(|entry| entry.pattern.clone()).collect();
        patterns.sort();
        patterns.dedup();
        patterns
    }

    /// Hands `envelope` to every subscription matching `topic`, waiting while a buffer is full.
    /// Returns how many subscriptions got it.
    pub(crate) async fn deliver(&self, topic: &str, envelope: &Envelope) -> usize {
        let senders: Vec<mpsc::Sender<Envelope>> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|entry| matches(&entry.pattern, topic))
            .map(|entry| entry.sender.clone())
            .collect();
        let mut delivered = 0;
        for sender in senders {
            if sender.send(envelope.clone()).await.is_ok() {
                delivered += 1;
            }
        }
        delivered
    }
}

/// A subscription to a topic pattern: a stream of typed messages. Dropping it unsubscribes.
pub struct Subscription<T> {
    node: Arc<NodeInner>,
    id: u64,
    pattern: String,
    receiver: mpsc::Receiver<Envelope>,
    _message: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("pattern", &self.pattern).finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Subscription<T> {
    pub(crate) fn new(
        node: Arc<NodeInner>,
        id: u64,
        pattern: String,
        receiver: mpsc::Receiver<Envelope>,
    ) -> Self {
        Self { node, id, pattern, receiver, _message: PhantomData }
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The next message; `None` once the node is closed or dropped. [`Subscription::next_envelope`] gives
    /// the raw envelope, whose destination names the topic it was published on.
    pub async fn next(&mut self) -> Option<Result<Received<T>, ReceiveError>> {
        let envelope = self.receiver.recv().await?;
        Some(decode_received(self.node.settings.codec, envelope))
    }

    /// The next message undecoded, with its destination topic.
    pub async fn next_envelope(&mut self) -> Option<Envelope> {
        self.receiver.recv().await
    }
}

impl<T: DeserializeOwned> Stream for Subscription<T> {
    type Item = Result<Received<T>, ReceiveError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.receiver
            .poll_recv(cx)
            .map(|envelope| envelope.map(|e| decode_received(this.node.settings.codec, e)))
    }
}

impl<T> Unpin for Subscription<T> {}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.node.subscriptions.remove(self.id);
        // Tell peers the topic is gone, if a runtime is there to do it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let node = Arc::clone(&self.node);
            runtime.spawn(async move { node.announce_changes().await });
        }
    }
}

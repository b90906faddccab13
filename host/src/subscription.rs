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

/// Messages buffered per subscription. Publications that come at most once (TCP, UDP, memory,
/// Redis pub/sub, this node's own) for a full subscription are dropped and counted
/// ([`Subscription::dropped`]), as NATS and ZeroMQ do with a slow subscriber: a subscriber that
/// stops reading must not hold up the transport its messages come on, and with it requests,
/// responses and heartbeats. Publications from a transport with acknowledgements wait instead
/// (the broker keeps them; nothing is lost).
pub const SUBSCRIPTION_BUFFER: usize = 256;

#[derive(Debug)]
struct Entry {
    id: u64,
    pattern: String,
    sender: mpsc::Sender<Envelope>,
    dropped: Arc<AtomicU64>,
}

/// How a publication reached this node, which decides what a full subscription does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// From a transport with acknowledgements: it keeps the message until it is settled.
    Acknowledged,
    /// From a transport without them, or from this node itself: at most once.
    AtMostOnce,
}

/// The node's subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    next_id: AtomicU64,
    entries: RwLock<Vec<Entry>>,
}

impl Subscriptions {
    /// A new subscription: its id, its queue and its count of dropped publications.
    pub(crate) fn add(&self, pattern: &str) -> (u64, mpsc::Receiver<Envelope>, Arc<AtomicU64>) {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        let entry = Entry { id, pattern: pattern.to_string(), sender, dropped: Arc::clone(&dropped) };
        self.entries.write().unwrap_or_else(|p| p.into_inner()).push(entry);
        (id, receiver, dropped)
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

    /// Hands `envelope` to every subscription matching `topic`. Returns how many got it.
    ///
    /// A full subscription makes this wait when `delivery` is [`Delivery::Acknowledged`] (the
    /// message came from a transport that keeps it until settled: waiting holds it at the broker,
    /// nothing is lost); otherwise the subscription drops it and counts (the first drop is
    /// logged), and this never waits.
    pub(crate) async fn deliver(&self, topic: &str, envelope: &Envelope, delivery: Delivery) -> usize {
        let entries: Vec<(String, mpsc::Sender<Envelope>, Arc<AtomicU64>)> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|entry| matches(&entry.pattern, topic))
            .map(|entry| (entry.pattern.clone(), entry.sender.clone(), Arc::clone(&entry.dropped)))
            .collect();
        let mut delivered = 0;
        for (pattern, sender, dropped) in entries {
            if delivery == Delivery::Acknowledged {
                if sender.send(envelope.clone()).await.is_ok() {
                    delivered += 1;
                }
                continue;
            }
            match sender.try_send(envelope.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(
                            %pattern,
                            %topic,
                            buffer = SUBSCRIPTION_BUFFER,
                            "a subscription is not read fast enough: publications for it are dropped \
                             while its buffer is full (Subscription::dropped counts them)"
                        );
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
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
    dropped: Arc<AtomicU64>,
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
        dropped: Arc<AtomicU64>,
    ) -> Self {
        Self { node, id, pattern, receiver, dropped, _message: PhantomData }
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// How many publications this subscription missed because its buffer
    /// ([`SUBSCRIPTION_BUFFER`] messages) was full when they arrived.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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

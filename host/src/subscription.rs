//! Topic subscriptions of this node.

use crate::{
    acknowledgement::Acknowledgement,
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
    sender: mpsc::Sender<Queued>,
    dropped: Arc<AtomicU64>,
}

/// A publication waiting in a subscription, with its share of the acknowledgement.
type Queued = (Envelope, Acknowledgement);

/// The node's subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    next_id: AtomicU64,
    entries: RwLock<Vec<Entry>>,
}

impl Subscriptions {
    /// A new subscription: its id, its queue and its count of dropped publications.
    pub(crate) fn add(&self, pattern: &str) -> (u64, mpsc::Receiver<Queued>, Arc<AtomicU64>) {
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

    /// Hands `envelope` to every subscription matching `topic`, each with a share of its
    /// acknowledgement. Returns how many got it.
    ///
    /// A full subscription makes this wait when the message is to be acknowledged (it came from
    /// a transport that keeps it until settled: waiting holds it at the broker, nothing is
    /// lost); otherwise the subscription drops it and counts (the first drop is logged), and
    /// this never waits.
    pub(crate) async fn deliver(
        &self,
        topic: &str,
        envelope: &Envelope,
        acknowledgement: Acknowledgement,
    ) -> usize {
        let entries: Vec<(String, mpsc::Sender<Queued>, Arc<AtomicU64>)> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|entry| matches(&entry.pattern, topic))
            .map(|entry| (entry.pattern.clone(), entry.sender.clone(), Arc::clone(&entry.dropped)))
            .collect();
        let mut delivered = 0;
        let acknowledged = acknowledgement.is_pending();
        for (pattern, sender, dropped) in entries {
            let item = (envelope.clone(), acknowledgement.share());
            if acknowledged {
                if sender.send(item).await.is_ok() {
                    delivered += 1;
                }
                continue;
            }
            match sender.try_send(item) {
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
        // The shares decide; a message no subscription took is accepted.
        acknowledgement.release();
        delivered
    }
}

/// A subscription to a topic pattern: a stream of typed messages. Dropping it unsubscribes.
pub struct Subscription<T> {
    node: Arc<NodeInner>,
    id: u64,
    pattern: String,
    receiver: mpsc::Receiver<Queued>,
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
        receiver: mpsc::Receiver<Queued>,
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

    /// The next message; `None` once the node is closed or dropped. Acknowledge it with
    /// [`Received::ack`] once handled (see [`Received`]). [`Subscription::next_raw`] gives the
    /// raw envelope, whose destination names the topic it was published on.
    pub async fn next(&mut self) -> Option<Result<Received<T>, ReceiveError>> {
        let (envelope, acknowledgement) = self.receiver.recv().await?;
        Some(decode_received(self.node.settings.codec, envelope, acknowledgement))
    }

    /// The next message undecoded (the envelope is the message, with its destination topic),
    /// to be acknowledged like any [`Received`].
    pub async fn next_raw(&mut self) -> Option<Received<Envelope>> {
        let (envelope, acknowledgement) = self.receiver.recv().await?;
        Some(Received::raw(envelope, acknowledgement))
    }

    /// The next message undecoded, with its destination topic, acknowledged at once
    /// (at-most-once to the application; prefer [`Subscription::next_raw`] with brokers).
    pub async fn next_envelope(&mut self) -> Option<Envelope> {
        let (envelope, mut acknowledgement) = self.receiver.recv().await?;
        acknowledgement.accept();
        Some(envelope)
    }
}

impl<T: DeserializeOwned> Stream for Subscription<T> {
    type Item = Result<Received<T>, ReceiveError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.receiver
            .poll_recv(cx)
            .map(|item| item.map(|(envelope, ack)| decode_received(this.node.settings.codec, envelope, ack)))
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

/// A subscription whose messages a handler takes, one at a time: see [`crate::Node::subscribe_with`].
/// Dropping it (or [`HandlerSubscription::stop`]) unsubscribes; a message whose handler had not
/// finished is delivered again (transports with acknowledgements).
#[derive(Debug)]
pub struct HandlerSubscription {
    pattern: String,
    task: tokio::task::JoinHandle<()>,
}

impl HandlerSubscription {
    pub(crate) fn start<T, E, F, Fut>(mut subscription: Subscription<T>, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn(Received<T>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    {
        let pattern = subscription.pattern.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                let mut received = match item {
                    Ok(received) => received,
                    Err(error) => {
                        // Rejected already: delivering it again would not decode it either.
                        tracing::warn!(pattern = %subscription.pattern, %error, "a publication was dropped");
                        continue;
                    }
                };
                // The handler gets the message; the acknowledgement stays here.
                let mut acknowledgement = std::mem::take(received.acknowledgement_mut());
                match handler(received).await {
                    Ok(()) => acknowledgement.accept(),
                    Err(error) => {
                        tracing::warn!(
                            pattern = %subscription.pattern,
                            %error,
                            "a subscription handler failed: the message is delivered again (transports with \
                             acknowledgements)"
                        );
                        acknowledgement.requeue();
                    }
                }
            }
        });
        Self { pattern, task }
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Unsubscribes (as dropping it does).
    pub fn stop(self) {}
}

impl Drop for HandlerSubscription {
    fn drop(&mut self) {
        // Dropping the task drops its Subscription, which unsubscribes.
        self.task.abort();
    }
}

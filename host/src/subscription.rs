//! Topic subscriptions of this node.

use crate::{
    driver::{Driver, Queued},
    engine::Local,
    error::ReceiveError,
    received::{decode_received, Received},
};
use comms_plugin_api::Envelope;
use futures::Stream;
use serde::de::DeserializeOwned;
use std::{
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::sync::mpsc;

pub use crate::spec::SUBSCRIPTION_BUFFER;

/// A subscription to a topic pattern: a stream of typed messages. Dropping it unsubscribes.
pub struct Subscription<T> {
    node: Arc<Driver>,
    id: u64,
    pattern: String,
    receiver: mpsc::Receiver<Queued>,
    _message: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("pattern", &self.pattern).finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Subscription<T> {
    pub(crate) fn new(node: Arc<Driver>, id: u64, pattern: String, receiver: mpsc::Receiver<Queued>) -> Self {
        Self { node, id, pattern, receiver, _message: PhantomData }
    }

    /// The next queued message; the engine may hand over the next one.
    async fn next_queued(&mut self) -> Option<Queued> {
        let queued = self.receiver.recv().await?;
        self.node.taken(Local::Subscription(self.id));
        Some(queued)
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Ends the subscription, as dropping it does, and returns once the transports with native
    /// topics have unsubscribed the pattern (when no other subscription of this node has it):
    /// from then on a broker keeps and sends nothing more for it. A transport's refusal is
    /// [`crate::SendError::Transport`]; the subscription is over either way.
    pub async fn unsubscribe(mut self) -> Result<(), crate::SendError> {
        let pattern = std::mem::take(&mut self.pattern);
        self.node.remove_subscription(self.id);
        let failures = crate::driver::NativeSubscriptions::release_now(&self.node, &pattern).await;
        match failures.into_iter().next() {
            None => Ok(()),
            Some((transport, error)) => {
                let peer = comms_plugin_api::NodeId::new(format!("topic:{pattern}"));
                Err(crate::SendError::Transport { transport, peer, error })
            }
        }
    }

    /// How many publications this subscription missed because its buffer
    /// ([`SUBSCRIPTION_BUFFER`] messages) was full when they arrived.
    pub fn dropped(&self) -> u64 {
        self.node.engine().dropped_by(self.id)
    }

    /// The next message; `None` once the node is closed or dropped. Acknowledge it with
    /// [`Received::ack`] once handled (see [`Received`]). [`Subscription::next_raw`] gives the
    /// raw envelope, whose destination names the topic it was published on.
    pub async fn next(&mut self) -> Option<Result<Received<T>, ReceiveError>> {
        let (envelope, acknowledgement) = self.next_queued().await?;
        Some(decode_received(self.node.spec.codec, envelope, acknowledgement))
    }

    /// The next message undecoded (the envelope is the message, with its destination topic),
    /// to be acknowledged like any [`Received`].
    pub async fn next_raw(&mut self) -> Option<Received<Envelope>> {
        let (envelope, acknowledgement) = self.next_queued().await?;
        Some(Received::raw(envelope, acknowledgement))
    }

    /// The next message undecoded, with its destination topic, acknowledged at once
    /// (at-most-once to the application; prefer [`Subscription::next_raw`] with brokers).
    pub async fn next_envelope(&mut self) -> Option<Envelope> {
        let (envelope, mut acknowledgement) = self.next_queued().await?;
        acknowledgement.accept();
        Some(envelope)
    }
}

impl<T: DeserializeOwned> Stream for Subscription<T> {
    type Item = Result<Received<T>, ReceiveError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let polled = this.receiver.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &polled {
            this.node.taken(Local::Subscription(this.id));
        }
        polled.map(|item| item.map(|(envelope, ack)| decode_received(this.node.spec.codec, envelope, ack)))
    }
}

impl<T> Unpin for Subscription<T> {}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        // Empty: `unsubscribe` has ended it already (a pattern is never empty).
        let pattern = std::mem::take(&mut self.pattern);
        if pattern.is_empty() {
            return;
        }
        // Peers hear that the topic is gone, and the transports with native topics (if a
        // runtime is there to tell them).
        self.node.end_subscription(self.id, pattern);
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

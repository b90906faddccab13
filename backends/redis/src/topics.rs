//! Topic subscriptions of one transport over Redis pub/sub: one pub/sub connection, opened on
//! the first `subscribe`, re-opened and re-subscribed after a disconnect.
//!
//! Guarantee: at-most-once. Redis pub/sub keeps nothing: a message published while a
//! subscriber is disconnected (or before it subscribed) is not delivered to it, and Redis
//! drops a subscriber whose output buffer overflows (`client-output-buffer-limit pubsub`).

use crate::{
    connect,
    topic_pattern::{glob, matches, topic_of},
    transport::{closing, Shared},
};
use comms_plugin_api::{backoff::Backoff, wire, ErrorCode, Inbound, PluginError};
use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::task::JoinHandle;

/// How often an idle pub/sub connection is checked with a `PING`.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// comms pattern -> the Redis glob subscribed for it.
type Patterns = Arc<Mutex<BTreeMap<String, String>>>;

pub(crate) struct TopicSubscriber {
    shared: Arc<Shared>,
    sink: Arc<tokio::sync::Mutex<Option<PubSubSink>>>,
    patterns: Patterns,
    pump: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn connect(shared: &Shared) -> Result<(PubSubSink, PubSubStream), PluginError> {
    let client = shared.url.client()?;
    let limit = Duration::from_millis(shared.config.command_timeout_ms);
    match tokio::time::timeout(limit, connect::pubsub(client)).await {
        Ok(Ok(pubsub)) => Ok(pubsub.split()),
        Ok(Err(error)) => Err(shared.url.error("opening the pub/sub connection for topics", &error)),
        Err(_) => Err(PluginError::retryable(
            ErrorCode::TIMEOUT,
            format!("opening a pub/sub connection to Redis at {} timed out", shared.url.redacted()),
        )),
    }
}

impl TopicSubscriber {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared, sink: Arc::default(), patterns: Arc::default(), pump: Mutex::new(None) }
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.shared.config.command_timeout_ms)
    }

    pub(crate) async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if pattern.is_empty() {
            return Err(PluginError::new(ErrorCode::INVALID_ADDRESS, "an empty topic pattern"));
        }
        let mut sink = self.sink.lock().await;
        if sink.is_none() {
            let (new_sink, stream) = connect(&self.shared).await?;
            *sink = Some(new_sink);
            let pump = tokio::spawn(pump(
                Arc::clone(&self.shared),
                Arc::clone(&self.sink),
                Arc::clone(&self.patterns),
                stream,
            ));
            *lock(&self.pump) = Some(pump);
        }
        let glob = glob(&self.shared.config.prefix, pattern);
        let new_glob = {
            let mut patterns = lock(&self.patterns);
            if patterns.contains_key(pattern) {
                return Ok(());
            }
            let new_glob = !patterns.values().any(|existing| *existing == glob);
            patterns.insert(pattern.to_string(), glob.clone());
            new_glob
        };
        if !new_glob {
            return Ok(());
        }
        let Some(active) = sink.as_mut() else { return Err(self.shared.closed_error()) };
        let result = match tokio::time::timeout(self.limit(), active.psubscribe(&glob)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.shared.url.error(&format!("subscribing to `{pattern}`"), &error)),
            Err(_) => Err(PluginError::retryable(
                ErrorCode::TIMEOUT,
                format!("subscribing to `{pattern}` timed out"),
            )),
        };
        if result.is_err() {
            lock(&self.patterns).remove(pattern);
        }
        result
    }

    pub(crate) async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        let mut sink = self.sink.lock().await;
        let glob = {
            let mut patterns = lock(&self.patterns);
            let Some(glob) = patterns.remove(pattern) else { return Ok(()) };
            if patterns.values().any(|existing| *existing == glob) {
                return Ok(());
            }
            glob
        };
        let Some(active) = sink.as_mut() else { return Ok(()) };
        match tokio::time::timeout(self.limit(), active.punsubscribe(&glob)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.shared.url.error(&format!("unsubscribing from `{pattern}`"), &error)),
            Err(_) => Err(PluginError::retryable(
                ErrorCode::TIMEOUT,
                format!("unsubscribing from `{pattern}` timed out"),
            )),
        }
    }

    /// Stops the pump (the transport's shutdown flag is already set) and drops the connection.
    pub(crate) async fn close(&self) {
        let pump = lock(&self.pump).take();
        if let Some(pump) = pump {
            if tokio::time::timeout(self.limit(), pump).await.is_err() {
                tracing::debug!("the topic subscriber did not stop in time");
            }
        }
        self.sink.lock().await.take();
    }
}

/// Forwards matching messages to the transport's inbound queue; reconnects and re-subscribes
/// after a disconnect (what was published meanwhile is lost: at-most-once).
async fn pump(
    shared: Arc<Shared>,
    sink: Arc<tokio::sync::Mutex<Option<PubSubSink>>>,
    patterns: Patterns,
    mut stream: PubSubStream,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut ticker = tokio::time::interval(PING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = Duration::from_millis(shared.config.command_timeout_ms);
    loop {
        let alive = tokio::select! {
            message = stream.next() => match message {
                Some(message) => {
                    if let Some(inbound) = accept(&shared, &patterns, &message) {
                        tokio::select! {
                            sent = shared.inbound.send(inbound) => if sent.is_err() { return },
                            _ = closing(&mut shutdown) => return,
                        }
                    }
                    true
                }
                None => false,
            },
            _ = ticker.tick() => {
                let mut sink = sink.lock().await;
                match sink.as_mut() {
                    Some(active) => matches!(
                        tokio::time::timeout(limit, active.ping::<redis::Value>()).await,
                        Ok(Ok(_))
                    ),
                    None => return,
                }
            }
            _ = closing(&mut shutdown) => return,
        };
        if alive {
            continue;
        }
        tracing::warn!(url = %shared.url.redacted(), "the pub/sub connection for topics was lost; reconnecting (messages published meanwhile are not delivered)");
        let backoff =
            Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(2), attempts: u32::MAX };
        let mut attempt = 1;
        stream = loop {
            let mut guard = sink.lock().await;
            if shared.is_closed() {
                return;
            }
            match resubscribe(&shared, &patterns).await {
                Ok((new_sink, new_stream)) => {
                    *guard = Some(new_sink);
                    break new_stream;
                }
                Err(error) => tracing::debug!(%error, attempt, "re-opening the pub/sub connection failed"),
            }
            drop(guard);
            let delay = backoff.delay_after(attempt).unwrap_or(backoff.max);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closing(&mut shutdown) => return,
            }
        };
    }
}

async fn resubscribe(
    shared: &Shared,
    patterns: &Patterns,
) -> Result<(PubSubSink, PubSubStream), PluginError> {
    let (mut sink, stream) = connect(shared).await?;
    let mut globs: Vec<String> = lock(patterns).values().cloned().collect();
    globs.sort_unstable();
    globs.dedup();
    if !globs.is_empty() {
        sink.psubscribe(&globs)
            .await
            .map_err(|error| shared.url.error("re-subscribing to topics", &error))?;
    }
    Ok((sink, stream))
}

/// The message as an [`Inbound`], if one of this node's patterns matches its topic exactly and
/// it arrived through the first such pattern's glob (so it is delivered once).
fn accept(shared: &Shared, patterns: &Patterns, message: &redis::Msg) -> Option<Inbound> {
    let via: String = message.get_pattern().ok()?;
    let topic = topic_of(&shared.config.prefix, message.get_channel_name())?;
    let first = lock(patterns)
        .iter()
        .filter(|(pattern, _)| matches(pattern, topic))
        .map(|(_, glob)| glob.clone())
        .min()?;
    if first != via {
        return None;
    }
    match wire::decode_envelope(message.get_payload_bytes()) {
        Ok(envelope) => Some(Inbound { envelope, delivery_tag: shared.next_topic_tag() }),
        Err(error) => {
            tracing::warn!(topic, %error, "a message on a topic channel is not a comms envelope; dropped");
            None
        }
    }
}

//! The node's subscriptions at the transports with native topics (Redis pub/sub, RabbitMQ
//! bindings, SQLite and PostgreSQL subscription rows, NATS subjects or durable consumers).
//!
//! A pattern is subscribed at those transports when the first of the application's
//! subscriptions to it starts, and unsubscribed when the last one is dropped while the node
//! runs, so that a broker stops keeping or sending what nobody here reads. A node that closes
//! leaves them as they are: a transport that keeps subscriptions across restarts (SQLite, NATS
//! with `durable_topics`) keeps what is published for the node's next run.
//!
//! One lock orders the calls, so that a pattern dropped and subscribed again at once ends up
//! subscribed (the unsubscribe runs first, or sees the new subscription and does nothing).

use super::Driver;
use comms_plugin_api::{Capabilities, PluginError};
use std::{collections::HashMap, sync::Arc};

/// Live subscriptions per pattern.
#[derive(Debug, Default)]
pub(crate) struct NativeSubscriptions {
    counts: tokio::sync::Mutex<HashMap<String, usize>>,
}

impl NativeSubscriptions {
    /// Subscribes `pattern` at every transport in service with native topics (again, for
    /// transports that had it: subscribing is idempotent); counts one more subscription to it.
    /// On an error, the transport's name and its error, and nothing is counted.
    pub(crate) async fn subscribe(
        &self,
        driver: &Driver,
        pattern: &str,
    ) -> Result<(), (String, PluginError)> {
        let mut counts = self.counts.lock().await;
        for (_, transport) in driver.serving_transports() {
            if transport.has(Capabilities::NATIVE_TOPICS) {
                transport.loaded.subscribe(pattern).await.map_err(|error| (transport.name.clone(), error))?;
            }
        }
        *counts.entry(pattern.to_string()).or_default() += 1;
        Ok(())
    }

    /// One subscription to `pattern` ended; the last one unsubscribes it at the transports,
    /// unless the node is closing. Runs in a task of its own (called from a `Drop`).
    pub(crate) fn release(driver: &Arc<Driver>, pattern: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let driver = Arc::clone(driver);
        drop(runtime.spawn(async move { Self::release_now(&driver, &pattern).await }));
    }

    /// [`NativeSubscriptions::release`], returning once the transports have answered; the
    /// failures, by transport name.
    pub(crate) async fn release_now(driver: &Driver, pattern: &str) -> Vec<(String, PluginError)> {
        let mut counts = driver.native_subscriptions.counts.lock().await;
        let Some(count) = counts.get_mut(pattern) else { return Vec::new() };
        *count -= 1;
        if *count > 0 {
            return Vec::new();
        }
        counts.remove(pattern);
        if *driver.closing.borrow() {
            return Vec::new();
        }
        let mut failures = Vec::new();
        for (_, transport) in driver.serving_transports() {
            if !transport.has(Capabilities::NATIVE_TOPICS) {
                continue;
            }
            if let Err(error) = transport.loaded.unsubscribe(pattern).await {
                tracing::warn!(transport = %transport.name, %pattern, %error, "unsubscribing at the transport failed");
                failures.push((transport.name.clone(), error));
            }
        }
        failures
    }
}

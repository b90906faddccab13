//! Layers: plugins that wrap a transport and are themselves transports (contract 1.2).
//!
//! A node's config stacks layers on a transport, the first named outermost:
//!
//! ```toml
//! [transports.tcp]
//! listen = "127.0.0.1:7001"
//! layers = ["compress", { plugin = "chunk", part_size = 65536 }, { plugin = "faults", drop = 0.1 }]
//! ```
//!
//! The application's message goes through `compress`, then `chunk`, then `faults`, then TCP;
//! what TCP receives comes back up in the opposite order. Each layer is a plugin library like a
//! transport (`libcomms_compress.so`), loaded and version-checked the same way, and gets its own
//! table (every key but `plugin` and `path`) as its [`crate::Setup`].
//!
//! ## Writing one
//!
//! Declare [`crate::Provides::LAYER`] and implement [`crate::Plugin::new_layer`]. It is given the
//! transport below as an `Arc<dyn Transport>` ([`InnerTransport`]: the same trait the layer
//! implements), so a layer is written like any transport that calls another:
//!
//! - **It owns the inner transport.** Its `close` closes the inner one (after flushing what the
//!   layer itself holds); the host never calls the inner transport directly.
//! - **It forwards what it does not change**: `settle` (mapping its own delivery tags back to the
//!   inner ones if it made new ones), `subscribe`, `unsubscribe`, and the inner `stats` (queue
//!   depths, reconnects and [`crate::UNDELIVERED_COUNTER`] matter to the host's `flush`).
//! - **Its [`crate::TransportInfo`] is what the host sees**: usually the inner capabilities and
//!   local address, with the limits the layer changes (a chunking layer raises
//!   `max_message_size`).
//! - **Headers it adds are its own**: name them `comms-<layer>-...`, and remove them before
//!   handing a message up, so that the layers above and the application see what was sent.
//!
//! Panics are caught at both boundaries: the layer's own entry points (as for every plugin) and
//! the inner transport's, whose panics reach the layer as [`crate::ErrorCode::PANICKED`] errors.

use crate::{
    host_side::LoadedTransport, Envelope, Inbound, Outbound, PluginError, SendFailure, Settlement, Transport,
    TransportInfo, TransportStats,
};
use async_trait::async_trait;

/// The transport a layer wraps, as the layer calls it: a transport (or a lower layer) built by
/// another plugin library and handed over the boundary.
pub struct InnerTransport {
    loaded: LoadedTransport,
}

impl std::fmt::Debug for InnerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerTransport").field("info", self.loaded.info()).finish_non_exhaustive()
    }
}

impl InnerTransport {
    pub(crate) fn new(loaded: LoadedTransport) -> Self {
        Self { loaded }
    }
}

#[async_trait]
impl Transport for InnerTransport {
    fn info(&self) -> TransportInfo {
        self.loaded.info().clone()
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        self.loaded.send(address, envelope).await
    }

    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        self.loaded.send_batch(batch).await
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        self.loaded.receive(u32::try_from(max_batch).unwrap_or(u32::MAX)).await
    }

    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        self.loaded.settle(settlements).await
    }

    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.loaded.subscribe(pattern).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        self.loaded.unsubscribe(pattern).await
    }

    /// The inner transport's own statistics (its queue depths, reconnects, errors and
    /// counters); the layer's boundary counts its own messages and bytes.
    fn stats(&self) -> TransportStats {
        let counters = self.loaded.stats();
        TransportStats { errors: counters.errors, ..counters.transport }
    }

    async fn close(&self) -> Result<(), PluginError> {
        self.loaded.close().await
    }
}

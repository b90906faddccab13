//! The transport trait a plugin author implements.

use crate::{Envelope, PluginError};
use async_trait::async_trait;
pub use comms_core::{Capabilities, Settlement, SettlementOutcome};

/// What a transport tells the host about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportInfo {
    /// Guarantees beyond best-effort point-to-point delivery. Declare only what is true: the
    /// conformance suite tests every flag.
    pub capabilities: Capabilities,
    /// The address peers use to reach this node through this transport.
    pub local_address: String,
    /// The largest payload the transport accepts, in bytes.
    pub max_message_size: u64,
}

/// A message handed to the host, with the tag the host settles it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The message.
    pub envelope: Envelope,
    /// The transport's own handle for this delivery (a stream entry, a broker delivery tag, ...);
    /// 0 for transports without acknowledgements.
    pub delivery_tag: u64,
}

/// Moves envelopes between nodes. Implement this, then export it with [`crate::export_plugin!`].
///
/// Every method is called from the plugin's own runtime (see [`crate::runtime`]), so tokio I/O,
/// timers and `tokio::spawn` work inside them. Methods may be called concurrently.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Capabilities, local address, limits. Called once, right after construction.
    fn info(&self) -> TransportInfo;

    /// Sends `envelope` to the node at `address`. Returns once the message is queued or written;
    /// waits while the outgoing queue is full.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError>;

    /// Waits for at least one message and returns up to `max_batch`; an empty vector means the
    /// transport is closed and nothing more will arrive.
    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError>;

    /// What the host did with received messages. Transports without acknowledgements ignore it.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        let _ = settlements;
        Ok(())
    }

    /// Starts delivering messages published to topics matching `pattern`. Only transports that
    /// declare [`Capabilities::NATIVE_TOPICS`] implement it; the default says unsupported.
    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        Err(PluginError::unsupported(format!("this transport has no native topics (subscribe {pattern})")))
    }

    /// Undoes [`Transport::subscribe`].
    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        Err(PluginError::unsupported(format!("this transport has no native topics (unsubscribe {pattern})")))
    }

    /// Stops accepting, flushes what is queued (bounded by the transport's own deadline) and
    /// releases resources.
    async fn close(&self) -> Result<(), PluginError>;
}

//! The `Transport` object a plugin hands to the host.

use crate::{Capabilities, CommsResult, Envelope, Inbound, Settlement};
use abi_stable::{
    sabi_trait,
    std_types::{RBox, RString, RVec},
    StableAbi,
};
use async_ffi::FfiFuture;

/// What the host learns about a transport once it is constructed.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct TransportInfo {
    /// What the transport guarantees beyond best-effort point-to-point delivery.
    pub capabilities: Capabilities,
    /// The address other nodes use to reach this one (for TCP, `ip:port` of the listener);
    /// published through discovery.
    pub local_address: RString,
    /// The largest payload, in bytes, the transport accepts.
    pub max_message_size: u64,
}

/// Moves envelopes to an address and hands what arrives to the host.
///
/// All methods take `&self` and may be called concurrently. Every async method returns an
/// [`FfiFuture`] that the host polls on its own runtime; the plugin is responsible for running
/// its I/O on its own runtime (comms-plugin-api does this).
///
/// Delivery acknowledgement: every [`Inbound`] has a tag; the host reports through
/// [`Transport::settle`] whether it accepted each message, and a transport that declares
/// [`Capabilities::ACKNOWLEDGEMENTS`] acknowledges the message to its medium only then.
#[sabi_trait]
pub trait Transport: Send + Sync {
    /// Capabilities, local address and limits. Must not block.
    fn info(&self) -> CommsResult<TransportInfo>;

    /// Sends `envelope` to the node reachable at `address` (an address this transport published).
    /// For a topic destination on a [`Capabilities::NATIVE_TOPICS`] transport, `address` is empty
    /// and the transport publishes to the topic.
    ///
    /// Completes when the transport has taken the message (queued or written); waits while its
    /// bounded queue is full, which is how backpressure reaches the sender.
    fn send(&self, address: RString, envelope: Envelope) -> FfiFuture<CommsResult<()>>;

    /// Waits for at least one arriving message and returns up to `max_batch` of them, or an
    /// empty vector once the transport is closed and nothing more will arrive.
    fn receive(&self, max_batch: u32) -> FfiFuture<CommsResult<RVec<Inbound>>>;

    /// Tells the transport what the host did with messages it received.
    fn settle(&self, settlements: RVec<Settlement>) -> FfiFuture<CommsResult<()>>;

    /// Starts delivering messages published to topics matching `pattern` (dot-separated
    /// segments; `*` matches one segment, `>` the rest). Only for transports that declare
    /// [`Capabilities::NATIVE_TOPICS`]; others return [`crate::ErrorCode::UNSUPPORTED`].
    fn subscribe(&self, pattern: RString) -> FfiFuture<CommsResult<()>>;

    /// Stops what [`Transport::subscribe`] started for the same `pattern`.
    fn unsubscribe(&self, pattern: RString) -> FfiFuture<CommsResult<()>>;

    /// Stops accepting, flushes queued outgoing messages within the transport's own deadline and
    /// releases its resources. Later calls fail with [`crate::ErrorCode::CLOSED`].
    #[sabi(last_prefix_field)]
    fn close(&self) -> FfiFuture<CommsResult<()>>;
}

/// A boxed transport object as plugins return it.
pub type TransportBox = Transport_TO<'static, RBox<()>>;

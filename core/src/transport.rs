//! The `Transport` object a plugin hands to the host.

use crate::{Capabilities, CommsResult, Envelope, Extension, Inbound, Outbound, SendFailure, Settlement};
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
    /// Attributes added by later minor versions of the contract (none in 1.0).
    pub extensions: RVec<Extension>,
}

/// A named counter of a transport's own, beyond the fixed ones of [`TransportStats`]
/// (for example `redis.pending_entries`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatCounter {
    /// Lowercase, dot-separated, prefixed with the plugin's name.
    pub name: RString,
    /// The current value.
    pub value: u64,
}

/// What a transport has done since it was constructed: cheap to produce, polled for metrics.
///
/// Counts are totals since construction; depths are the current lengths of the transport's
/// bounded queues.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportStats {
    /// Messages taken by `send` and `send_batch`.
    pub messages_sent: u64,
    /// Payload bytes of those messages.
    pub bytes_sent: u64,
    /// Messages handed to the host by `receive`.
    pub messages_received: u64,
    /// Payload bytes of those messages.
    pub bytes_received: u64,
    /// Sends (or batch items) that failed.
    pub send_errors: u64,
    /// Other failures: receives that failed, connections dropped for bad input, ...
    pub errors: u64,
    /// Messages queued for sending and not yet written or handed to the medium.
    pub send_queue_depth: u64,
    /// Messages received and waiting for the host's `receive`.
    pub receive_queue_depth: u64,
    /// Connections (to peers or to a broker) opened again after they were lost.
    pub reconnects: u64,
    /// The transport's own counters.
    pub counters: RVec<StatCounter>,
}

/// Moves envelopes to an address and hands what arrives to the host.
///
/// All methods take `&self` and may be called concurrently. Every async method returns an
/// [`FfiFuture`] that the host polls on its own runtime; the plugin is responsible for running
/// its I/O on its own runtime (comms-plugin-api does this). A poll must not block the thread.
///
/// Delivery acknowledgement: every [`Inbound`] has a tag; the host reports through
/// [`Transport::settle`] what it did with each message, and a transport that declares
/// [`Capabilities::ACKNOWLEDGEMENTS`] acknowledges the message to its medium only then.
///
/// Methods added after contract 1.0 go after [`Transport::close`], each with a default body
/// that the host runs when a plugin built for an older minor version does not have the method.
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

    /// Sends every item of `batch`, each to its own address, as [`Transport::send`] would, in
    /// order per address. Completes when every item is taken or has failed; the result lists
    /// the items that failed (empty: all were taken). An `Err` means the call failed as a whole
    /// and none was taken.
    fn send_batch(&self, batch: RVec<Outbound>) -> FfiFuture<CommsResult<RVec<SendFailure>>>;

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

    /// Counters and queue depths, for metrics. Must not block; called often.
    fn stats(&self) -> TransportStats;

    /// Stops accepting, flushes queued outgoing messages within the transport's own deadline and
    /// releases its resources. Later calls fail with [`crate::ErrorCode::CLOSED`].
    #[sabi(last_prefix_field)]
    fn close(&self) -> FfiFuture<CommsResult<()>>;
}

/// A boxed transport object as plugins return it.
pub type TransportBox = Transport_TO<'static, RBox<()>>;

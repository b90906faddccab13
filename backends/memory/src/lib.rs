//! # comms-memory: the in-memory transport plugin
//!
//! For unit tests of applications: nodes in the same process exchange messages through bounded
//! in-memory queues, with no network, no ports and no files. Loaded by the comms host as
//! `libcomms_memory.so` like any other transport:
//!
//! ```toml
//! [transports.memory]
//! address = "memory://alice"   # default: memory://<node id>-<n>, unique in the process
//! queue_capacity = 1024        # messages waiting for this node before senders wait (default 1024)
//! max_message_size = 16777216  # largest payload in bytes, sent or received (default 16 MiB)
//! ```
//!
//! All keys are optional ([`MemoryConfig`]); an unknown key is an error naming it. Peers reach a
//! node at its `address`, exactly as they would reach a TCP node at `ip:port` (list it under the
//! node's static peers, or let a discovery plugin publish it).
//!
//! Below the node level, the transports can be driven through the host-side API, here with the
//! plugin linked into the program instead of loaded (as this crate's own tests do, in
//! `src/tests.rs`):
//!
//! ```text
//! use comms_memory::MemoryPlugin;
//! use comms_plugin_api::{host_side::PluginLibrary, Destination, Envelope, MessageId, NodeId};
//! let memory = PluginLibrary::linked::<MemoryPlugin>();
//! let alice = memory.new_transport(&NodeId::new("alice"), "memory", "").await?;
//! let bob = memory.new_transport(&NodeId::new("bob"), "memory", r#"address = "memory://bob""#).await?;
//! let envelope = Envelope {
//!     id: MessageId::from_u128(1),
//!     from: NodeId::new("alice"),
//!     to: Destination::Node(NodeId::new("bob")),
//!     correlation_id: None,
//!     headers: Vec::new(),
//!     payload: b"hello".as_slice().into(),
//! };
//! alice.send("memory://bob", envelope).await?;
//! assert_eq!(bob.receive(10).await?[0].envelope.payload.as_slice(), b"hello");
//! ```
//!
//! ## How it works
//!
//! Every transport instance owns one bounded inbound queue and registers it, under its address,
//! in a registry that is a `static` of this library. The dynamic loader maps a library once per
//! process, so every node of the process that loads this plugin shares the registry, and `send`
//! puts the envelope straight into the receiver's queue: nothing is encoded, and the payload
//! buffer is moved, not copied. A batched send looks each receiver up once. Its statistics report
//! the receive queue's depth.
//!
//! ## Guarantees
//!
//! - **Ordering** ([`Capabilities::ORDERED`]): messages from one sender to one receiver arrive in
//!   the order their `send`s completed. (Concurrent `send`s to the same queue are taken in the
//!   order they got queue space.)
//! - **Delivery** ([`Capabilities::RELIABLE`]): a message accepted by `send` is in the
//!   receiver's queue and is returned by its `receive`, unless the receiver is dropped without
//!   being drained. Closing a receiver does not lose what is already queued: `receive` keeps
//!   returning it, then an empty batch.
//! - **Backpressure**: `send` to a full queue waits until the receiver takes messages. A send
//!   waiting for space fails with [`ErrorCode::UNREACHABLE`] if the receiver closes meanwhile
//!   (the message was not accepted), and with [`ErrorCode::CLOSED`] if the sender closes.
//! - No acknowledgements, no durability, no native topics: it does not declare them.
//!
//! ## Errors
//!
//! | case | code |
//! |---|---|
//! | no instance registered at the address (never was, or closed) | [`ErrorCode::UNREACHABLE`], retryable |
//! | payload larger than the sender's or the receiver's `max_message_size` | [`ErrorCode::TOO_LARGE`] |
//! | `send` after this transport's `close` | [`ErrorCode::CLOSED`] |
//! | a second instance configured with an address in use | [`ErrorCode::INVALID_CONFIG`] naming `address` |
//!
//! ## Limits
//!
//! - One process only. And one registry per copy of the library: a program that both links this
//!   crate (`PluginLibrary::linked::<MemoryPlugin>()`) and loads `libcomms_memory.so` has two
//!   registries, and an instance of one cannot reach an instance of the other.
//! - Memory: at most `queue_capacity` envelopes wait per receiver; every queue is bounded.
//! - `max_message_size` counts payload bytes (headers and ids are not counted).
//! - `close` unregisters the address at once: from then on senders get
//!   [`ErrorCode::UNREACHABLE`], and the address can be registered by a new instance.

#![warn(missing_docs)]

mod registry;
mod transport;

pub use transport::MemoryTransport;

use comms_plugin_api::{async_trait, export_plugin, Plugin, PluginError, Provides, Setup, Transport};
#[cfg(doc)]
use comms_plugin_api::{Capabilities, ErrorCode};
use serde::Deserialize;
use std::sync::Arc;

/// Default of [`MemoryConfig::queue_capacity`].
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// Default of [`MemoryConfig::max_message_size`]: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;

/// Prefix of generated addresses.
pub const ADDRESS_SCHEME: &str = "memory://";

/// The config table of a memory transport. Every key is optional; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// The address peers send to. Must be unique among the memory transports of the process.
    /// Default: `memory://<node id>-<n>`, with `n` chosen to make it unique.
    pub address: Option<String>,
    /// Messages waiting in this instance's inbound queue before senders wait. At least 1.
    pub queue_capacity: usize,
    /// Largest payload, in bytes, this instance sends or accepts. At least 1.
    pub max_message_size: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            address: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl MemoryConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        if self.address.as_deref().is_some_and(|address| address.trim().is_empty()) {
            return Err(PluginError::invalid_config("key `address`: must not be empty"));
        }
        if self.queue_capacity == 0 {
            return Err(PluginError::invalid_config("key `queue_capacity`: must be greater than 0"));
        }
        if self.max_message_size == 0 {
            return Err(PluginError::invalid_config("key `max_message_size`: must be greater than 0"));
        }
        Ok(())
    }
}

/// The plugin: provides the in-memory transport.
#[derive(Debug)]
pub struct MemoryPlugin;

#[async_trait]
impl Plugin for MemoryPlugin {
    const NAME: &'static str = "memory";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "in-memory transport: nodes of one process, no network (for tests)";
    const PROVIDES: Provides = Provides::TRANSPORT;
    // Delivery is a hand-over between channels in this process; the runtime only keeps timers.
    const WORKER_THREADS: usize = 1;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        Ok(Arc::new(MemoryTransport::register(&setup.node_id, setup.config()?)?))
    }
}

export_plugin!(MemoryPlugin);

#[cfg(test)]
mod tests;

//! # comms-chunk: the chunking layer
//!
//! A layer (plugin contract 1.2) that wraps any transport and carries messages larger than it
//! takes: a message above `part_size` goes as several parts, each a message of the inner
//! transport, and is reassembled on the other side with bounded memory. Loaded by the host as
//! `libcomms_chunk.so` and configured on a transport:
//!
//! ```text
//! [transports.tcp]
//! layers = ["chunk"]                                     # the defaults below
//! layers = [{ plugin = "chunk", part_size = 262144, max_message_size = 4294967296 }]
//! ```
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `part_size` | 1 MiB, or the inner transport's `max_message_size` minus room for headers (4 KiB, or half of a tiny limit) if that is smaller | largest payload of one part; from 1024 to the inner transport's `max_message_size` |
//! | `max_message_size` | 1 GiB | what the layer declares: the largest message sent and reassembled; at most 4 GiB |
//! | `max_reassembly_bytes` | 2 x `max_message_size` | the most the receiver reserves for messages in reassembly, all senders together; at least `max_message_size` + 1/32 of it + 4 KiB (one message of the largest size with its bookkeeping and headers) |
//! | `reassembly_timeout_ms` | 30000 | an incomplete message with no new part for this long is dropped |
//!
//! An unknown key, or a value out of range, is an error naming the key.
//!
//! The default budget, twice the largest message, lets two messages of the largest size (or one
//! and many small ones) be reassembled at once; it is reserved only while messages are in
//! reassembly, so a node receiving small messages holds nothing. Lower it on a node that must
//! bound its memory, raise it for many concurrent large senders.
//!
//! ## Format
//!
//! A message of at most `part_size` bytes goes untouched. A larger one of `total` bytes goes as
//! `count = ceil(total / part_size)` parts of `ceil(total / count)` bytes each (the last one
//! shorter), in order. Each part is an envelope with a **fresh message id** (inner transports may
//! drop repeated ids), the message's addressing, correlation id, headers and extensions, and the
//! header
//!
//! ```text
//! comms-chunk: <message id, 32 hex digits> <index from 0> <count> <total length>
//! ```
//!
//! e.g. `comms-chunk: 0000000000000000000000000000002a 3 1024 1073741824`. The receiver derives
//! every part's place from `count` and `total`; a part whose length does not match its place,
//! or whose header contradicts the parts held, is dropped. Parts are zero-copy slices of the
//! message's payload.
//!
//! ## Guarantees
//!
//! - **Byte-identical**: the message handed up has the original id, addressing, headers (without
//!   `comms-chunk`), extensions and payload.
//! - **Sender memory**: parts are slices of the payload, handed down in batches of at most 64
//!   parts or 8 MiB, each batch taken by the inner transport (its backpressure) before the next
//!   is made. If a part is refused, `send` fails naming the part; the parts already sent are
//!   dropped by the receiver when their message expires.
//! - **Receiver memory** (see [`reassembly`]): a message's buffer is allocated when its first
//!   part arrives, only if its reservation (length plus bookkeeping) fits in
//!   `max_reassembly_bytes` with everything else held; parts are copied into it as they come and
//!   the buffer becomes the payload handed up. Beyond the budget, parts of new messages are
//!   refused: counted, logged (rate-limited), and dropped (without acknowledgements; the
//!   message is lost, and its later parts are dropped without allocating) or settled
//!   `REJECTED_REQUEUE` (with acknowledgements: a broker delivers it again later). No queue
//!   grows with what peers send.
//! - **Timeout**: an incomplete message with no new part for `reassembly_timeout_ms` is dropped
//!   and its bytes freed, by a timer even if nothing else arrives.
//! - **Acknowledgements**: if the inner transport declares `ACKNOWLEDGEMENTS`, the layer hands up
//!   tags of its own and settles every part of a message with the outcome the host gives the
//!   whole message. Parts it drops are settled itself: duplicates `ACCEPTED`, malformed ones
//!   `REJECTED_DISCARD`, refused ones `REJECTED_REQUEUE`, those of an expired message
//!   `REJECTED_DISCARD` (requeued, they would come back, wait for the same missing part and
//!   expire again), those held at `close` `REJECTED_REQUEUE`. Without acknowledgements tags are 0.
//! - **Info**: the inner transport's capabilities and address; `max_message_size` is the layer's.
//!   Ordering is kept per sender when the inner transport keeps it (a message completes on its
//!   last part, and parts go in order). Reliability holds within the receiver's budget only: a
//!   message refused for memory without acknowledgements is lost (counted in
//!   `chunk.refused_parts` and the errors).
//!
//! ## Statistics
//!
//! The inner transport's, plus `chunk.messages_split`, `chunk.parts_sent`,
//! `chunk.parts_received`, `chunk.messages_reassembled`, `chunk.duplicate_parts`,
//! `chunk.malformed_parts`, `chunk.refused_parts`, `chunk.partial_messages_dropped` (expired),
//! `chunk.partial_messages` and `chunk.bytes_held` (now), `chunk.bytes_held_peak`. Malformed
//! and refused parts and expired messages also count as errors.
//!
//! ## Limits
//!
//! - Parts of one message must reach the same receiving layer: with competing consumers on one
//!   broker queue (service replicas), parts are spread among them and never complete. A broker's
//!   prefetch (AMQP `prefetch`) must exceed the parts of one message, or the receiver waits for
//!   parts the broker will not push until it settles the ones it holds (they expire instead).
//! - The inner transport's `undelivered` counter counts a message given up on once, by its last
//!   part ([`comms_plugin_api::counts_as_undelivered`]; a transport built with an older
//!   comms-plugin-api counts each part). Its other per-message counters count parts.
//! - Two chunk layers on one transport are refused at `send` for messages the lower one would
//!   cut again.

#![warn(missing_docs)]

mod layer;
pub mod part;
pub mod reassembly;

pub use layer::ChunkLayer;

use comms_plugin_api::{
    async_trait, export_plugin, Capabilities, Plugin, PluginError, Provides, Setup, Transport, TransportInfo,
};
use serde::Deserialize;
use std::{sync::Arc, time::Duration};

/// The smallest `part_size` accepted.
pub const MIN_PART_SIZE: u64 = 1024;
/// The default `part_size` when the inner transport takes more.
pub const DEFAULT_PART_SIZE: u64 = 1 << 20;
/// Room left for the envelope's own fields (ids, names, headers) when `part_size` is derived
/// from the inner transport's `max_message_size`, which some transports count with them.
pub const HEADER_ALLOWANCE: u64 = 4096;
/// Default of [`ChunkConfig::max_message_size`]: 1 GiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1 << 30;
/// The largest `max_message_size` accepted: 4 GiB.
pub const MAX_MESSAGE_SIZE: u64 = 4 << 30;
/// Default of [`ChunkConfig::reassembly_timeout_ms`].
pub const DEFAULT_REASSEMBLY_TIMEOUT_MS: u64 = 30_000;

/// The layer's config table. Every key is optional; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkConfig {
    /// Largest payload of one part; default derived from the inner transport.
    pub part_size: Option<u64>,
    /// Largest message sent and reassembled.
    pub max_message_size: u64,
    /// Bytes reserved for messages in reassembly, at most; default twice `max_message_size`.
    pub max_reassembly_bytes: Option<u64>,
    /// Milliseconds an incomplete message waits for its next part.
    pub reassembly_timeout_ms: u64,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            part_size: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_reassembly_bytes: None,
            reassembly_timeout_ms: DEFAULT_REASSEMBLY_TIMEOUT_MS,
        }
    }
}

/// The config with every default resolved against the inner transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Largest payload of one part.
    pub part_size: u64,
    /// Largest message.
    pub max_message_size: u64,
    /// The receiver's budget.
    pub max_reassembly_bytes: u64,
    /// How long an incomplete message waits for its next part.
    pub reassembly_timeout: Duration,
    /// The inner transport declares acknowledgements.
    pub acknowledging: bool,
}

impl ChunkConfig {
    /// The settings for a layer over a transport that declared `inner`, or an error naming the
    /// key whose value cannot work.
    pub fn resolve(&self, inner: &TransportInfo) -> Result<Settings, PluginError> {
        let inner_max = inner.max_message_size;
        let part_size = match self.part_size {
            Some(part_size) => part_size,
            None => DEFAULT_PART_SIZE.min(inner_max - HEADER_ALLOWANCE.min(inner_max / 2)),
        };
        if !(MIN_PART_SIZE..=inner_max).contains(&part_size) {
            let which = if self.part_size.is_some() { "" } else { " (derived from the inner transport's)" };
            return Err(PluginError::invalid_config(format!(
                "key `part_size`: {part_size}{which} must be between {MIN_PART_SIZE} and the inner transport's \
                 max_message_size {inner_max}"
            )));
        }
        let max_message_size = self.max_message_size;
        if !(1..=MAX_MESSAGE_SIZE).contains(&max_message_size) {
            return Err(PluginError::invalid_config(format!(
                "key `max_message_size`: {max_message_size} must be between 1 and {MAX_MESSAGE_SIZE}"
            )));
        }
        let needed = max_message_size + max_message_size / 32 + 4096;
        // The default is never below what one message of the largest size needs.
        let max_reassembly_bytes = self.max_reassembly_bytes.unwrap_or((2 * max_message_size).max(needed));
        if max_reassembly_bytes < needed {
            return Err(PluginError::invalid_config(format!(
                "key `max_reassembly_bytes`: {max_reassembly_bytes} cannot hold one message of max_message_size \
                 {max_message_size} with its bookkeeping: at least {needed} needed"
            )));
        }
        if !(1..=86_400_000).contains(&self.reassembly_timeout_ms) {
            return Err(PluginError::invalid_config(format!(
                "key `reassembly_timeout_ms`: {} must be between 1 and 86400000 (a day)",
                self.reassembly_timeout_ms
            )));
        }
        Ok(Settings {
            part_size,
            max_message_size,
            max_reassembly_bytes,
            reassembly_timeout: Duration::from_millis(self.reassembly_timeout_ms),
            acknowledging: inner.capabilities.contains(Capabilities::ACKNOWLEDGEMENTS),
        })
    }
}

/// The plugin: provides the chunk layer.
#[derive(Debug)]
pub struct ChunkPlugin;

#[async_trait]
impl Plugin for ChunkPlugin {
    const NAME: &'static str = "chunk";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "layer: large messages as parts, reassembled with bounded memory";
    const PROVIDES: Provides = Provides::LAYER;
    // The layer runs in its callers' polls; the runtime keeps one timer (expiry) per layer.
    const WORKER_THREADS: usize = 1;

    async fn new_layer(setup: Setup, inner: Arc<dyn Transport>) -> Result<Arc<dyn Transport>, PluginError> {
        let config: ChunkConfig = setup.config()?;
        let settings = config.resolve(&inner.info())?;
        Ok(Arc::new(ChunkLayer::new(inner, settings)))
    }
}

export_plugin!(ChunkPlugin);

#[cfg(test)]
mod tests;

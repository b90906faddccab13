//! # comms-compress: the zstd compression layer
//!
//! A layer (plugin contract 1.2) that wraps any transport: payloads of at least `threshold`
//! bytes are compressed with zstd on the way down and decompressed on the way up. Loaded by the
//! host as `libcomms_compress.so` and configured on a transport:
//!
//! ```text
//! [transports.tcp]
//! layers = ["compress"]                                   # the defaults below
//! layers = [{ plugin = "compress", threshold = 4096, level = 9, max_message_size = 67108864 }]
//! ```
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `threshold` | 1024 | payloads of at least this many bytes are compressed (0: all) |
//! | `level` | 3 | zstd level, -131072 (fastest) to 22 (smallest) |
//! | `max_message_size` | the inner transport's | largest payload sent, and largest a received message may decompress to |
//!
//! An unknown key is an error naming it.
//!
//! ## Format
//!
//! A compressed message carries the header `comms-compress: zstd` and a payload that is one or
//! more zstd frames (this layer writes one, with its size declared). Everything else about the
//! envelope (id, addressing, other headers, extensions) is unchanged. A message is compressed
//! only if that makes it smaller; otherwise it goes as it is, without the header. A message
//! that already carries the header (a second compress layer) is not compressed again.
//!
//! ## Guarantees
//!
//! - What goes up is what was sent: the payload decompressed and the header removed. Messages
//!   without the header pass untouched, so a node with the layer talks to one without it as
//!   long as nothing above `threshold` shrinks (in practice: configure both ends alike).
//! - **Bounded decompression.** A received message may decompress to at most
//!   `max_message_size` bytes: a frame declaring more is refused before anything is allocated,
//!   a frame declaring nothing is decoded through a reader that stops one byte past the limit.
//!   A message that is refused (over the limit: a zip bomb; corrupt; an unknown method in the
//!   header) is dropped, counted in `compress.decompress_failures` and in the errors, and logged
//!   a few times per 10 s; with an acknowledging inner transport it is settled
//!   `REJECTED_DISCARD` (it would fail again). Never a panic.
//! - **No blocking.** Payloads of 64 KiB or more are compressed on tokio's blocking pool, and
//!   so is decompression unless the frame is under 64 KiB and declares a result under 64 KiB:
//!   the plugin runtime keeps serving other calls.
//! - The inner transport's capabilities, address and delivery tags pass through unchanged;
//!   `max_message_size` is the configured one (default the inner's). A message that compresses
//!   to more than the inner transport takes is refused by the inner transport's `send`.
//!
//! ## Statistics
//!
//! The inner transport's, plus `compress.messages_compressed`, `compress.bytes_before` and
//! `compress.bytes_after` (payload bytes of the messages sent compressed, before and after),
//! `compress.messages_not_smaller` (at or above the threshold but sent as they were),
//! `compress.messages_decompressed` and `compress.decompress_failures`.
//!
//! ## Limits
//!
//! - A sent message is held twice while compressed (the original and the compressed copy).
//! - zstd refuses frames that need a window over 128 MiB (its default decoder limit), so
//!   frames from other encoders with `--long` windows are refused as corrupt.

#![warn(missing_docs)]

pub mod codec;
mod layer;

pub use layer::CompressLayer;

use comms_plugin_api::{async_trait, export_plugin, Plugin, PluginError, Provides, Setup, Transport};
use serde::Deserialize;
use std::sync::Arc;

/// The header a compressed message carries.
pub const HEADER: &str = "comms-compress";
/// Its value for zstd, the only method.
pub const ZSTD: &str = "zstd";
/// Default of [`CompressConfig::threshold`].
pub const DEFAULT_THRESHOLD: u64 = 1024;
/// Default of [`CompressConfig::level`].
pub const DEFAULT_LEVEL: i32 = 3;
/// Payloads of at least this many bytes are compressed on the blocking pool; frames of this size,
/// or declaring a result of this size or none, are decompressed there.
pub const BLOCKING_THRESHOLD: u64 = 64 * 1024;

/// The layer's config table. Every key is optional; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressConfig {
    /// Payloads of at least this many bytes are compressed.
    pub threshold: u64,
    /// zstd compression level.
    pub level: i32,
    /// Largest payload sent and largest decompressed payload accepted; default: the inner
    /// transport's `max_message_size`.
    pub max_message_size: Option<u64>,
}

impl Default for CompressConfig {
    fn default() -> Self {
        Self { threshold: DEFAULT_THRESHOLD, level: DEFAULT_LEVEL, max_message_size: None }
    }
}

impl CompressConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        let levels = zstd::compression_level_range();
        if !levels.contains(&self.level) {
            return Err(PluginError::invalid_config(format!(
                "key `level`: {} is outside zstd's levels {}..={}",
                self.level,
                levels.start(),
                levels.end()
            )));
        }
        if self.max_message_size == Some(0) {
            return Err(PluginError::invalid_config("key `max_message_size`: must be greater than 0"));
        }
        Ok(())
    }
}

/// The plugin: provides the compress layer.
#[derive(Debug)]
pub struct CompressPlugin;

#[async_trait]
impl Plugin for CompressPlugin {
    const NAME: &'static str = "compress";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "layer: zstd compression of payloads above a threshold";
    const PROVIDES: Provides = Provides::LAYER;
    // (De)compression runs on the runtime's blocking threads; its workers only await them.
    const WORKER_THREADS: usize = 1;

    async fn new_layer(setup: Setup, inner: Arc<dyn Transport>) -> Result<Arc<dyn Transport>, PluginError> {
        let config: CompressConfig = setup.config()?;
        Ok(Arc::new(CompressLayer::new(inner, &config)?))
    }
}

export_plugin!(CompressPlugin);

#[cfg(test)]
mod tests;

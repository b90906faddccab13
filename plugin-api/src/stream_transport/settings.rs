//! The configuration every stream transport shares.

use crate::{backoff::Backoff, framing::DEFAULT_MAX_FRAME_SIZE};
use serde::Deserialize;
use std::time::Duration;

/// The config table of a stream transport (TCP, Unix sockets, ...). Unknown keys are errors.
///
/// ```toml
/// [transports.tcp]
/// listen = "127.0.0.1:7001"     # where to accept connections (default: the backend's)
/// advertise = "10.0.0.5:7001"   # what peers are told (default: the bound address)
/// max_frame_size = 16777216     # bytes; larger frames are refused (default 16 MiB)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Address to listen on; each backend has its own default.
    pub listen: Option<String>,
    /// Address published to peers; defaults to the bound listen address.
    pub advertise: Option<String>,
    /// Largest frame body accepted or sent, in bytes.
    pub max_frame_size: u32,
    /// Messages queued per peer before `send` waits.
    pub send_queue_capacity: usize,
    /// Received messages buffered before readers stop reading (TCP flow control then slows the
    /// senders).
    pub receive_queue_capacity: usize,
    /// A writer encodes queued messages into one write of up to this many bytes (a larger
    /// message is written alone).
    pub write_batch_bytes: usize,
    /// Time allowed for one attempt to open a connection (the TCP connect, not the handshake).
    pub connect_timeout_ms: u64,
    /// First delay between reconnection attempts; doubles each time.
    pub reconnect_initial_backoff_ms: u64,
    /// Upper bound of that delay.
    pub reconnect_max_backoff_ms: u64,
    /// Attempts before queued messages for an unreachable peer are dropped and `send` fails.
    pub reconnect_attempts: u32,
    /// Time the handshake (Noise, then hellos) may take once connected, on both sides. Separate
    /// from `connect_timeout_ms` because a busy peer may be slow to answer handshakes (they cost
    /// CPU) without being unreachable: giving up early would only add another handshake to do.
    pub handshake_timeout_ms: u64,
    /// Time `close` waits for queued messages to be written.
    pub close_timeout_ms: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            listen: None,
            advertise: None,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            send_queue_capacity: 1024,
            receive_queue_capacity: 1024,
            write_batch_bytes: 64 * 1024,
            connect_timeout_ms: 2_000,
            reconnect_initial_backoff_ms: 20,
            reconnect_max_backoff_ms: 2_000,
            reconnect_attempts: 8,
            handshake_timeout_ms: 5_000,
            close_timeout_ms: 5_000,
        }
    }
}

impl StreamSettings {
    /// The reconnection policy these settings describe.
    pub fn reconnect_backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(self.reconnect_initial_backoff_ms),
            max: Duration::from_millis(self.reconnect_max_backoff_ms),
            attempts: self.reconnect_attempts,
        }
    }

    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), crate::PluginError> {
        let positive = [
            ("max_frame_size", self.max_frame_size as u64),
            ("send_queue_capacity", self.send_queue_capacity as u64),
            ("receive_queue_capacity", self.receive_queue_capacity as u64),
            ("write_batch_bytes", self.write_batch_bytes as u64),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("reconnect_attempts", self.reconnect_attempts as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
        ];
        match positive.iter().find(|(_, value)| *value == 0) {
            Some((key, _)) => {
                Err(crate::PluginError::invalid_config(format!("key `{key}`: must be greater than 0")))
            }
            None => Ok(()),
        }
    }
}

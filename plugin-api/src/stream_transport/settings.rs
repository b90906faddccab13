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
/// partial_frames_budget_bytes = 67108864 # all partly received frames together (default 4 frames)
/// frame_read_timeout_ms = 30000 # a frame must arrive whole within this, from its first byte
/// idle_timeout_ms = 60000       # an incoming connection with no frame for this long is closed
/// max_connections = 512         # incoming connections in all
/// max_connections_per_address = 128 # incoming connections from one IP address
/// ```
///
/// ## What one peer can make a node hold
///
/// These limits bound what a peer that is not (yet) trusted can take, following what NATS and
/// RabbitMQ do with a hostile client:
///
/// - **Memory of partly received frames**: a frame's buffer grows as its bytes arrive, not on
///   its declared length, and every incoming connection's growth beyond one 64 KiB chunk comes
///   from one budget of `partial_frames_budget_bytes` per transport. A connection that finds it
///   used up stops reading (TCP flow control slows its sender) until budget is returned.
/// - **Time**: a frame must arrive whole within `frame_read_timeout_ms` of its first byte (the
///   time waiting for budget included), else the connection is closed; this also ends a peer
///   that holds budget by sending slowly. An incoming connection that completes no frame for
///   `idle_timeout_ms` is closed with a GOODBYE (the dialling side then dials again on its next
///   message). With heartbeats on (every second by default) a live peer is never idle that
///   long. A message written by the peer at the very moment the connection is closed as idle
///   can be lost, as on any connection that breaks (see the delivery guarantee).
/// - **Connections**: at most `max_connections` incoming connections in all, and
///   `max_connections_per_address` from one IP address (connections before their handshake
///   included). A new connection over a limit evicts the connection that is most likely dead or
///   hostile: the one idle longest (from its last frame, or its accept while in its handshake;
///   from the same address when that address is over its limit), so that a live peer sending
///   heartbeats keeps its connection while the idle ones of a flood are closed. The evicted
///   connection is told goodbye; bytes it sent that were not read yet are lost with it. Keep
///   `max_connections` below the process's open-file limit; if accepting still fails for lack
///   of file descriptors (`EMFILE`), the longest idle connection is closed to make room, and
///   accepting backs off (10 ms doubling to 1 s) with one log line per streak of failures.
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
    /// Time `close` may take: to write what is queued for peers, and to drain incoming
    /// connections (read them until each peer closes its side; one still open then is cut and
    /// what was not read from it is lost). Also how long a writer that closed its side of a
    /// connection waits for the peer to close its own before dropping it.
    pub close_timeout_ms: u64,
    /// Bytes that partly received frames of every incoming connection together may hold beyond
    /// one chunk (64 KiB) each; `None`: four times `max_frame_size`. At least `max_frame_size`.
    pub partial_frames_budget_bytes: Option<u64>,
    /// Time a frame may take to arrive whole, from its first byte.
    pub frame_read_timeout_ms: u64,
    /// Time an incoming connection may go without a complete frame before it is closed.
    pub idle_timeout_ms: u64,
    /// Incoming connections open at once, in all.
    pub max_connections: usize,
    /// Incoming connections open at once from one IP address (connections without one, over a
    /// Unix socket, count only towards `max_connections`).
    pub max_connections_per_address: usize,
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
            partial_frames_budget_bytes: None,
            frame_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 512,
            max_connections_per_address: 128,
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

    /// The budget of partly received frames, in bytes.
    pub fn partial_frames_budget(&self) -> u64 {
        self.partial_frames_budget_bytes.unwrap_or(4 * u64::from(self.max_frame_size))
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
            ("frame_read_timeout_ms", self.frame_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_address", self.max_connections_per_address as u64),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(crate::PluginError::invalid_config(format!("key `{key}`: must be greater than 0")));
        }
        let budget = self.partial_frames_budget();
        if budget < u64::from(self.max_frame_size) {
            // A frame of the largest size could never be received.
            return Err(crate::PluginError::invalid_config(format!(
                "key `partial_frames_budget_bytes`: {budget} is less than max_frame_size ({})",
                self.max_frame_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(toml: &str) -> String {
        match crate::config::parse_config::<StreamSettings>(toml) {
            Ok(settings) => settings.validate().unwrap_err().message,
            Err(error) => error.message,
        }
    }

    #[test]
    fn the_limits_on_hostile_peers_are_keys_checked_by_name() {
        let settings = crate::config::parse_config::<StreamSettings>(
            "max_frame_size = 1048576\npartial_frames_budget_bytes = 2097152\nframe_read_timeout_ms = 300\nidle_timeout_ms = 400\n\
             max_connections = 8\nmax_connections_per_address = 4",
        )
        .unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.partial_frames_budget(), 2 << 20);
        assert_eq!(StreamSettings::default().partial_frames_budget(), 4 * u64::from(DEFAULT_MAX_FRAME_SIZE));
        for key in
            ["frame_read_timeout_ms", "idle_timeout_ms", "max_connections", "max_connections_per_address"]
        {
            assert_eq!(error(&format!("{key} = 0")), format!("key `{key}`: must be greater than 0"));
        }
        assert_eq!(
            error("max_frame_size = 1000\npartial_frames_budget_bytes = 999"),
            "key `partial_frames_budget_bytes`: 999 is less than max_frame_size (1000)"
        );
        assert!(error("idle_timeout = 5").starts_with("unknown field `idle_timeout`"));
        assert!(error("max_connections = -1").starts_with("key `max_connections`:"));
    }
}

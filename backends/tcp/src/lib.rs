//! # comms-tcp: the TCP transport plugin
//!
//! Loaded by the comms host as `libcomms_tcp.so`. Configure it in the node's config file:
//!
//! ```toml
//! [transports.tcp]
//! listen = "127.0.0.1:7001"   # default 127.0.0.1:0 (any free port, loopback only)
//! advertise = "10.0.0.5:7001" # what peers are told; default: the bound address
//! max_frame_size = 16777216   # default 16 MiB
//! # What an unauthenticated peer can make the node hold (defaults shown):
//! partial_frames_budget_bytes = 67108864 # partly received frames, all connections: 4 frames
//! frame_read_timeout_ms = 30000          # a started frame must arrive whole within this
//! idle_timeout_ms = 60000                # incoming connection without a frame: closed
//! max_connections = 512                  # incoming connections in all (keep below `ulimit -n`)
//! max_connections_per_address = 128      # incoming connections from one IP address
//! ```
//!
//! All keys are those of [`StreamSettings`]; an unknown key is an error naming it, and a value
//! that cannot work (0 for a limit or a timeout, a budget below `max_frame_size`) is an error
//! naming its key.
//!
//! ## Encrypted links
//!
//! When the node's `[security]` says `links = "noise"`, the host passes it to this plugin and
//! every connection starts with a Noise XX handshake that authenticates both nodes by their
//! identity keys and the allow-list; everything after it is encrypted, and plaintext peers are
//! refused. The transport then declares `ENCRYPTED`. See `docs/security-links.md`.
//!
//! ## Wire format
//!
//! Length-prefixed frames (`u32` big-endian body length, then the body) carrying a hello, then
//! envelopes in the documented wire encoding, then a goodbye: see
//! [`comms_plugin_api::stream_transport::protocol`] and [`comms_plugin_api::wire`].
//!
//! ## Guarantees and limits
//!
//! - **Ordering**: per sender and receiver, in send order.
//! - **Delivery**: at-most-once, except that a batch whose write failed is written again after
//!   reconnecting (a duplicate then carries the same message id). A peer that stays unreachable
//!   for `reconnect_attempts` tries loses what was queued for it and `send` reports it.
//! - **Graceful close**: a receiver that closes loses nothing a comms peer had written to it,
//!   within `close_timeout_ms`. `close` frees the listen address at once, tells each peer
//!   goodbye and reads on (and `receive` hands it over) until the peer closes its side, which
//!   it does as soon as it sees the goodbye, after at most the batch it is writing; the rest goes
//!   to the next transport on the address (a hot swap) once it listens, dialled with the
//!   reconnect backoff (with the defaults about 2.5 s of retries, then the queued messages are
//!   dropped and counted as undelivered). A connection not drained within `close_timeout_ms`
//!   (the host stopped calling `receive`, a peer built before this drain keeps writing under
//!   load, a peer vanished) is cut with a warning, and what was not read from it is lost. A crash
//!   or a transport dropped without `close` still loses what was in flight: nothing is
//!   acknowledged end to end.
//! - **Max message size**: `max_frame_size` (default 16 MiB) including the envelope header.
//! - **Disconnect**: reconnect with exponential backoff on the next message.
//! - **Connections**: one outgoing connection per peer address, reused; the listener serves
//!   up to `max_connections` peers (`max_connections_per_address` per IP address), and a peer
//!   sending garbage only loses its own connection.
//! - **Hostile peers** (see [`StreamSettings`] for the details): a frame's buffer grows as its
//!   bytes arrive, and partly received frames of all connections together hold at most
//!   `partial_frames_budget_bytes` beyond 64 KiB each (a connection over it stops being read
//!   until budget is free); a frame must arrive whole within `frame_read_timeout_ms` of its first
//!   byte; an incoming connection without a frame for `idle_timeout_ms` is closed with a goodbye
//!   (with heartbeats on, a live peer sends one every second); a new connection over a
//!   connection limit evicts the one idle longest (of its own address if that address is over
//!   its limit); out of file descriptors (`EMFILE`), the idlest connection
//!   is closed to make room, and accepting backs off with one log line every 10 s at most.
//!
//! TCP_NODELAY is on: batching happens in the writer, not in the kernel. Each message is encoded
//! once, straight into the buffer that is written; a batched send (`send_batch`) queues all the
//! items for one peer at once. Received payloads are ranges of the buffer they were read into
//! (no copy) when messages arrive in bulk.
//!
//! ## Statistics
//!
//! Besides what the host counts (messages and bytes each way): the send and receive queue
//! depths, reconnects, errors (connections refused or closed for bad input, failed writes, peers
//! given up) and the counters `tcp.writes`, `tcp.connections.accepted`,
//! `tcp.connections.refused`, `tcp.messages.dropped`, `tcp.connections.evicted`,
//! `tcp.connections.idle_closed`, `tcp.connections.frame_timeouts`, and the gauges
//! `tcp.connections.open` (incoming connections now) and `tcp.frames.partial_bytes` (budget held
//! by partly received frames now).

#![warn(missing_docs)]

use comms_plugin_api::{
    async_trait, export_plugin,
    host_driven::{self, HostDrivenStream},
    security::LinkSecurity,
    stream_transport::{Acceptor, StreamMedium, StreamSettings, StreamTransport},
    Plugin, PluginError, Provides, Setup, Transport,
};
use std::{io, sync::Arc};
use tokio::net::{TcpListener, TcpStream};

/// Listen address when the config names none: any free port on loopback.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// The plugin: provides a transport.
#[derive(Debug)]
pub struct TcpPlugin;

#[async_trait]
impl Plugin for TcpPlugin {
    const NAME: &'static str = "tcp";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "TCP transport: length-prefixed frames, batched writes, reconnect";
    const PROVIDES: Provides = Provides::TRANSPORT;
    // The host's reactor drives the connections (host_driven::adopt): this library's runtime
    // only dials, accepts and keeps timers.
    const WORKER_THREADS: usize = 1;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let security = setup.link_security()?;
        Ok(Arc::new(bind(setup.node_id.clone(), setup.config()?, security).await?))
    }
}

export_plugin!(TcpPlugin);

/// A TCP transport: a [`StreamTransport`] over TCP sockets.
pub type TcpTransport = StreamTransport<TcpDialer>;

/// Binds the listener `settings.listen` (default [`DEFAULT_LISTEN`]) and starts serving, with
/// encrypted links when `security` is set. Must run inside a tokio runtime.
pub async fn bind(
    node_id: comms_plugin_api::NodeId,
    settings: StreamSettings,
    security: Option<LinkSecurity>,
) -> Result<TcpTransport, PluginError> {
    let listen = settings.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listener = TcpListener::bind(&listen).await.map_err(|error| {
        let message = format!("key `listen`: cannot listen on {listen}: {error}");
        // A port in use is not a mistake in the config: it may be free later (a reload starts
        // the new transport again once the old one has closed).
        match error.kind() {
            io::ErrorKind::AddrInUse => PluginError::new(comms_plugin_api::ErrorCode::IO, message),
            _ => PluginError::invalid_config(message),
        }
    })?;
    let local_address = listener.local_addr()?.to_string();
    StreamTransport::start(
        "tcp",
        node_id,
        settings,
        security,
        TcpDialer,
        TcpAcceptor(listener),
        local_address,
    )
}

/// Dials `host:port` addresses.
#[derive(Debug)]
pub struct TcpDialer;

// Connected sockets go to the host's reactor when the host drives plugin sockets (contract 1.1):
// a message then wakes one thread instead of two. Dialling and accepting stay here.
impl StreamMedium for TcpDialer {
    type Stream = HostDrivenStream<TcpStream>;

    async fn connect(&self, address: &str) -> io::Result<Self::Stream> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        host_driven::adopt(stream)
    }
}

struct TcpAcceptor(TcpListener);

impl Acceptor for TcpAcceptor {
    type Stream = HostDrivenStream<TcpStream>;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((host_driven::adopt(stream)?, peer.to_string()))
    }
}

#[cfg(test)]
mod tests;

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
//! The keys are those of [`StreamSettings`] and the NAT traversal keys below ([`TcpConfig`]);
//! an unknown key is an error naming it, and a value that cannot work (0 for a limit or a
//! timeout, a budget below `max_frame_size`, a NAT key without the key it needs) is an error
//! naming its key.
//!
//! ## NAT traversal
//!
//! Two nodes each behind its own NAT reach each other through a **rendezvous**, a reachable
//! node both know: by TCP hole punching (simultaneous open) where the NATs allow it, else
//! relayed by the rendezvous.
//!
//! ```toml
//! # the rendezvous, on a public address
//! [transports.tcp]
//! listen = "203.0.113.1:7000"
//! rendezvous_server = true
//!
//! # a node behind NAT (id "alice"): advertises "alice@203.0.113.1:7000"
//! [transports.tcp]
//! listen = "0.0.0.0:7100"            # an address that routes to the rendezvous (not loopback)
//! rendezvous = "203.0.113.1:7000"
//! # rendezvous_name = "alice"        # default: the node id (1 to 255 bytes, no `@`)
//! # punch_timeout_ms = 3000          # punching time before relaying, 100..=600000
//!
//! # another node behind NAT lists it by that address, e.g. in static discovery
//! [discovery]
//! peers = [{ id = "alice", addresses = { tcp = "alice@203.0.113.1:7000" } }]
//! ```
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `rendezvous` | none | on a node behind NAT: `host:port` of the rendezvous to register with; the node then advertises `<rendezvous_name>@<rendezvous>` unless `advertise` is set |
//! | `rendezvous_name` | the node id | the name to register under; needs `rendezvous` |
//! | `punch_timeout_ms` | `3000` | how long punching may take before the connection is relayed; needs `rendezvous` |
//! | `rendezvous_server` | `false` | on a reachable node: serve as rendezvous and relay; not together with `rendezvous` |
//!
//! How it works (protocol and limits in [`nat`], which is the sans-IO state machine; the I/O
//! around it is in `rendezvous.rs`):
//!
//! - **Registration**: a node with `rendezvous` keeps a signalling connection to it, opened
//!   *from its listen port* (`SO_REUSEADDR` and `SO_REUSEPORT` on the listener and on these
//!   sockets), so the rendezvous sees, and tells the node, the NAT's mapping of the listen port.
//!   It keeps a second connection from a **dial port** of its own, whose mapping the rendezvous
//!   learns too. Both are renewed every 25 s and reopened (backoff 0.1 to 5 s) when lost; a
//!   registration the rendezvous has not answered within 3 s is sent again (dials wait for the
//!   answer).
//! - **Telling connections apart**: every NAT traversal connection starts with the four bytes
//!   `C7 4E 41 54`; a comms connection starts with the length of its first frame, whose first
//!   byte is 0. The listener peeks at the first byte and hands the connection over accordingly.
//! - **Dialling `name@rendezvous`**: the node asks the rendezvous to introduce it; the
//!   rendezvous sends both sides each other's mapping and a token. The dialler connects from its
//!   dial port to the target's listen port, the target from its listen port to the dialler's
//!   dial port, at the same time, again 150 ms after an attempt that failed at once (a NAT that
//!   answers an early SYN with a reset), until `punch_timeout_ms`. The connection that opens
//!   (a simultaneous open, or one side's SYN reaching the other's listener) starts with both
//!   sides' greeting (token and role); it is the dialler's outgoing connection and, on the
//!   target, goes to the listener as if accepted: connections stay one-directional, and the
//!   two directions between two nodes use different address pairs.
//! - **Relay fallback**: if no punch gets through within `punch_timeout_ms` (a symmetric NAT,
//!   e.g. Linux `masquerade fully-random`), the dialler opens a relay connection to the
//!   rendezvous with the token, the rendezvous asks the target (over its signalling connection)
//!   to open the matching one, and copies bytes between the two. The target's half goes to its
//!   listener as an incoming connection.
//! - **Encrypted links** work unchanged: the Noise handshake runs over the punched or relayed
//!   stream like over any TCP connection (the rendezvous relays ciphertext it cannot read).
//! - A connection through the rendezvous takes longer to open: the transport's connect timeout
//!   for a node with `rendezvous` is `connect_timeout_ms` plus 11 s (introduction, punching with
//!   the default 3 s, relay setup); each step has its own bound. A relayed connection costs the
//!   dialler `punch_timeout_ms` before its first message.
//!
//! Guarantees and limits:
//!
//! - The stream guarantees below hold on punched and relayed connections alike (they are byte
//!   streams like any other); a connection lost is dialled again through the rendezvous.
//! - Only nodes with `rendezvous` dial `name@rendezvous` addresses, and only through their own
//!   rendezvous (another one is refused). The rendezvous itself does not dial such addresses.
//! - **Not an open relay**: the rendezvous relays only between two registered nodes it
//!   introduced, with the introduction's token (unguessable, valid for 30 s), at most 256 relays
//!   at once and 16 per node; a relay half waits at most 5 s for the other. At most 4096 names
//!   are registered (a name registered again from elsewhere moves there: names are not
//!   authenticated, as with plain links; use encrypted links to authenticate peers), 4096
//!   introductions live at once and 64 per node. Malformed NAT traversal messages close their
//!   connection and are counted; classifying new connections is bounded (64 at once, 5 s each).
//! - Punching needs NATs that map a port to the same public port for every destination
//!   ("cone", e.g. Linux `masquerade`); behind symmetric NATs every connection is relayed.
//! - Reconnecting at once to the same peer may find the previous connection's address pair
//!   still in TIME_WAIT: the punch then fails and the connection is relayed.
//! - Statistics: a node behind NAT adds `tcp.nat.introductions`, `tcp.nat.punched`,
//!   `tcp.nat.relayed`, `tcp.nat.dials_failed`, `tcp.nat.bad_punches`, `tcp.nat.malformed`;
//!   the rendezvous `tcp.nat.registrations`, `tcp.nat.introductions`, `tcp.nat.relays`,
//!   `tcp.nat.relays_open` (a gauge), `tcp.nat.refused`, `tcp.nat.malformed`. Punched and
//!   relayed connections are logged at info level.
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

pub mod nat;
mod rendezvous;

use comms_plugin_api::{
    async_trait, export_plugin,
    host_driven::{self, HostDrivenStream},
    security::LinkSecurity,
    serde::{
        de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor},
        Deserialize, Deserializer,
    },
    stream_transport::{Acceptor, StreamMedium, StreamSettings, StreamTransport},
    Plugin, PluginError, Provides, Setup, Transport,
};
use rendezvous::{NatAcceptor, NatClient, NatRole, NatServer};
use std::{fmt, io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::{TcpListener, TcpStream};

/// Listen address when the config names none: any free port on loopback.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// Default `punch_timeout_ms`.
pub const DEFAULT_PUNCH_TIMEOUT_MS: u64 = 3_000;

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
        let config: TcpConfig = setup.config()?;
        let (transport, nat) = start(setup.node_id.clone(), config, security, true).await?;
        Ok(with_nat(transport, nat))
    }
}

export_plugin!(TcpPlugin);

/// The NAT traversal keys of `[transports.tcp]` (see "NAT traversal" above).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatSettings {
    /// `host:port` of the rendezvous to register with (a node behind NAT).
    pub rendezvous: Option<String>,
    /// The name to register under; default: the node id.
    pub rendezvous_name: Option<String>,
    /// Serve as the rendezvous (a reachable node).
    pub rendezvous_server: bool,
    /// How long punching may take before the dialler relays; default
    /// [`DEFAULT_PUNCH_TIMEOUT_MS`].
    pub punch_timeout_ms: Option<u64>,
}

/// The `[transports.tcp]` table: the keys of every stream transport ([`StreamSettings`]) and
/// those of NAT traversal ([`NatSettings`]). An unknown key is an error naming it, and so is a
/// bad value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpConfig {
    /// The stream transport's keys.
    pub stream: StreamSettings,
    /// NAT traversal's keys.
    pub nat: NatSettings,
}

impl<'de> Deserialize<'de> for TcpConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Table;
        impl<'de> Visitor<'de> for Table {
            type Value = TcpConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of TCP transport settings")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TcpConfig, A::Error> {
                let mut nat = NatSettings::default();
                let keys = NatKeys { map, nat: &mut nat };
                let stream = StreamSettings::deserialize(de::value::MapAccessDeserializer::new(keys))?;
                Ok(TcpConfig { stream, nat })
            }
        }
        deserializer.deserialize_map(Table)
    }
}

/// Reads the NAT traversal keys of a table and passes every other key on. Values are read from
/// the underlying table, so errors name their key as for any other.
struct NatKeys<'a, A> {
    map: A,
    nat: &'a mut NatSettings,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for NatKeys<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key::<String>()? else { return Ok(None) };
            match key.as_str() {
                "rendezvous" => self.nat.rendezvous = Some(self.map.next_value()?),
                "rendezvous_name" => self.nat.rendezvous_name = Some(self.map.next_value()?),
                "rendezvous_server" => self.nat.rendezvous_server = self.map.next_value()?,
                "punch_timeout_ms" => self.nat.punch_timeout_ms = Some(self.map.next_value()?),
                _ => {
                    let key: de::value::StringDeserializer<A::Error> = key.into_deserializer();
                    return seed.deserialize(key).map(Some);
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

impl TcpConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self, node_id: &comms_plugin_api::NodeId) -> Result<(), PluginError> {
        self.stream.validate()?;
        let nat = &self.nat;
        let error =
            |key: &str, message: &str| Err(PluginError::invalid_config(format!("key `{key}`: {message}")));
        if nat.rendezvous.is_some() && nat.rendezvous_server {
            return error("rendezvous_server", "not together with `rendezvous` (a rendezvous is reachable)");
        }
        if nat.rendezvous.is_none() {
            if nat.rendezvous_name.is_some() {
                return error("rendezvous_name", "needs `rendezvous`");
            }
            if nat.punch_timeout_ms.is_some() {
                return error("punch_timeout_ms", "needs `rendezvous`");
            }
            return Ok(());
        }
        if let Some(timeout) = nat.punch_timeout_ms {
            if !(100..=600_000).contains(&timeout) {
                return error("punch_timeout_ms", &format!("{timeout} is not within 100..=600000"));
            }
        }
        let name = nat.rendezvous_name.as_deref().unwrap_or(node_id.as_str());
        if !nat::valid_name(name.as_bytes()) {
            let key = if nat.rendezvous_name.is_some() { "rendezvous_name" } else { "node.id" };
            return error(key, "a name registered at the rendezvous must be 1 to 255 bytes");
        }
        if name.contains('@') {
            let key = if nat.rendezvous_name.is_some() { "rendezvous_name" } else { "node.id" };
            return error(key, "a name registered at the rendezvous cannot contain `@`");
        }
        Ok(())
    }

    fn punch_timeout(&self) -> Duration {
        Duration::from_millis(self.nat.punch_timeout_ms.unwrap_or(DEFAULT_PUNCH_TIMEOUT_MS))
    }
}

/// A TCP transport: a [`StreamTransport`] over TCP sockets.
pub type TcpTransport = StreamTransport<TcpDialer>;

/// Binds the listener `settings.listen` (default [`DEFAULT_LISTEN`]) and starts serving, with
/// encrypted links when `security` is set. Must run inside a tokio runtime.
pub async fn bind(
    node_id: comms_plugin_api::NodeId,
    settings: StreamSettings,
    security: Option<LinkSecurity>,
) -> Result<TcpTransport, PluginError> {
    bind_config(node_id, TcpConfig { stream: settings, nat: NatSettings::default() }, security).await
}

/// [`bind`] with the NAT traversal keys: registers with a rendezvous or serves as one.
pub async fn bind_config(
    node_id: comms_plugin_api::NodeId,
    config: TcpConfig,
    security: Option<LinkSecurity>,
) -> Result<TcpTransport, PluginError> {
    Ok(start(node_id, config, security, true).await?.0)
}

fn listen_error(listen: &str, error: &io::Error) -> PluginError {
    let message = format!("key `listen`: cannot listen on {listen}: {error}");
    // A port in use is not a mistake in the config: it may be free later (a reload starts
    // the new transport again once the old one has closed).
    match error.kind() {
        io::ErrorKind::AddrInUse => PluginError::new(comms_plugin_api::ErrorCode::IO, message),
        _ => PluginError::invalid_config(message),
    }
}

async fn resolve(key: &str, address: &str) -> Result<SocketAddr, PluginError> {
    let mut addresses = tokio::net::lookup_host(address).await.map_err(|error| {
        PluginError::invalid_config(format!("key `{key}`: cannot resolve {address}: {error}"))
    })?;
    addresses
        .next()
        .ok_or_else(|| PluginError::invalid_config(format!("key `{key}`: {address} resolves to no address")))
}

/// Starts the transport and its NAT traversal role, if any; `punch: false` (tests) makes a node
/// behind NAT relay every connection.
async fn start(
    node_id: comms_plugin_api::NodeId,
    mut config: TcpConfig,
    security: Option<LinkSecurity>,
    punch: bool,
) -> Result<(TcpTransport, Option<NatRole>), PluginError> {
    config.validate(&node_id)?;
    let listen = config.stream.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let connect_timeout = Duration::from_millis(config.stream.connect_timeout_ms);
    let nat_config = nat::Config { punch_timeout: config.punch_timeout(), ..nat::Config::default() };
    let nat_wanted = config.nat.rendezvous.is_some() || config.nat.rendezvous_server;
    let listener = if nat_wanted {
        let address = resolve("listen", &listen).await?;
        rendezvous::bind_shared(address).map_err(|error| listen_error(&listen, &error))?
    } else {
        TcpListener::bind(&listen).await.map_err(|error| listen_error(&listen, &error))?
    };
    let local = listener.local_addr()?;
    let (sender, receiver) = tokio::sync::mpsc::channel(rendezvous::INCOMING_CAPACITY);
    let (nat_client, role) = match (&config.nat.rendezvous, config.nat.rendezvous_server) {
        (Some(rendezvous_text), _) => {
            let rendezvous = resolve("rendezvous", rendezvous_text).await?;
            let name = config.nat.rendezvous_name.clone().unwrap_or_else(|| node_id.as_str().to_string());
            if config.stream.advertise.is_none() {
                config.stream.advertise = Some(format!("{name}@{rendezvous_text}"));
            }
            // A dial through the rendezvous waits for the registration and the introduction,
            // punches, then may open a relay: the stream transport's timeout covers it all,
            // and each step has its own bound inside.
            let extra =
                2 * nat_config.introduction_timeout + nat_config.punch_timeout + nat_config.relay_wait;
            config.stream.connect_timeout_ms += u64::try_from(extra.as_millis()).unwrap_or(u64::MAX / 2);
            let setup = rendezvous::ClientSetup {
                config: nat_config,
                name,
                rendezvous_text: rendezvous_text.clone(),
                rendezvous,
                local,
                connect_timeout,
                punch,
            };
            let client = NatClient::new(setup, sender.clone())
                .map_err(|error| PluginError::invalid_config(format!("key `rendezvous_name`: {error}")))?;
            (Some(Arc::clone(&client)), Some(NatRole::Client(client)))
        }
        (None, true) => (None, Some(NatRole::Server(NatServer::new(nat_config)))),
        (None, false) => (None, None),
    };
    let nat = role.clone().map(|role| NatAcceptor::start(role, receiver, sender));
    let transport = StreamTransport::start(
        "tcp",
        node_id,
        config.stream,
        security,
        TcpDialer { nat: nat_client, connect_timeout },
        TcpAcceptor { listener, nat },
        local.to_string(),
    )?;
    Ok((transport, role))
}

/// The transport the host gets: with NAT traversal, its counters are added to the statistics.
fn with_nat(transport: TcpTransport, nat: Option<NatRole>) -> Arc<dyn Transport> {
    match nat {
        None => Arc::new(transport),
        Some(role) => Arc::new(WithNat { transport, role }),
    }
}

/// A TCP transport with NAT traversal: the stream transport, and the NAT counters in `stats`.
#[derive(Debug)]
struct WithNat {
    transport: TcpTransport,
    role: NatRole,
}

#[async_trait]
impl Transport for WithNat {
    fn info(&self) -> comms_plugin_api::TransportInfo {
        self.transport.info()
    }

    async fn send(&self, address: &str, envelope: comms_plugin_api::Envelope) -> Result<(), PluginError> {
        self.transport.send(address, envelope).await
    }

    async fn send_batch(&self, batch: Vec<comms_plugin_api::Outbound>) -> Vec<comms_plugin_api::SendFailure> {
        self.transport.send_batch(batch).await
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<comms_plugin_api::Inbound>, PluginError> {
        self.transport.receive(max_batch).await
    }

    fn stats(&self) -> comms_plugin_api::TransportStats {
        let mut stats = self.transport.stats();
        stats
            .counters
            .extend(self.role.counters().into_iter().map(|(name, value)| (name.to_string(), value)));
        stats
    }

    async fn close(&self) -> Result<(), PluginError> {
        self.transport.close().await
    }
}

/// Dials `host:port` addresses, and `name@rendezvous` addresses through NAT traversal.
#[derive(Debug)]
pub struct TcpDialer {
    nat: Option<Arc<NatClient>>,
    /// The configured `connect_timeout_ms` (the stream transport's may be longer with NAT
    /// traversal).
    connect_timeout: Duration,
}

// Connected sockets go to the host's reactor when the host drives plugin sockets (contract 1.1):
// a message then wakes one thread instead of two. Dialling and accepting stay here.
impl StreamMedium for TcpDialer {
    type Stream = HostDrivenStream<TcpStream>;

    async fn connect(&self, address: &str) -> io::Result<Self::Stream> {
        let stream = match (nat::split_address(address), &self.nat) {
            (Some((name, rendezvous)), Some(client)) if client.is_my_rendezvous(rendezvous) => {
                client.dial(name).await?
            }
            (Some((_, rendezvous)), _) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "`{address}` is a node behind NAT: it is reached only through the rendezvous \
                         `{rendezvous}`, and this node is not registered there (key `rendezvous`)"
                    ),
                ))
            }
            (None, _) => tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??,
        };
        stream.set_nodelay(true)?;
        host_driven::adopt(stream)
    }
}

struct TcpAcceptor {
    listener: TcpListener,
    nat: Option<NatAcceptor>,
}

impl Acceptor for TcpAcceptor {
    type Stream = HostDrivenStream<TcpStream>;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = match &mut self.nat {
            Some(nat) => nat.accept(&self.listener).await?,
            None => {
                let (stream, peer) = self.listener.accept().await?;
                (stream, peer.to_string())
            }
        };
        stream.set_nodelay(true)?;
        Ok((host_driven::adopt(stream)?, peer))
    }
}

#[cfg(test)]
mod tests;

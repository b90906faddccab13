//! # comms-udp: the ad-hoc LAN transport over UDP datagrams, with multicast discovery
//!
//! Loaded by the comms host as `libcomms_udp.so`. No server, no broker: every node binds one UDP
//! socket and sends datagrams straight to its peers. Configure it in the node's config file:
//!
//! ```toml
//! [transports.udp]
//! listen = "0.0.0.0:0"        # default: any free port on every IPv4 interface (a LAN transport);
//!                             # "127.0.0.1:0" keeps a node on this machine
//! advertise = "10.0.0.5:7000" # what peers are told; default: the bound address (for 0.0.0.0
//!                             # or [::], the IP of the interface that routes to multicast)
//! mode = "reliable"           # or "best-effort"; default reliable
//! max_datagram = 1400         # bytes per datagram including the 34-byte header; default 1400
//! max_message_size = 4194304  # largest payload accepted; default 4 MiB
//! peer_timeout_ms = 10000     # reliable mode: give up on a peer that acknowledges nothing for
//!                             # this long; default 10 s
//! # NAT traversal (see below); all off by default:
//! # rendezvous = "203.0.113.1:7000"  # behind NAT: register with this rendezvous node
//! # rendezvous_name = "alice"        # the name to register under; default the node id
//! # keepalive_ms = 15000             # registration / NAT binding keepalive; default 15 s
//! # punch_timeout_ms = 3000          # hole punching before relaying; default 3 s
//! # rendezvous_server = true         # on a public node: serve as rendezvous and relay
//! # relay_rate = 2000                # rendezvous: relayed datagrams/s per registered node
//! ```
//!
//! An unknown key is an error naming it. With `[discovery] plugin = "udp"` (no other key needed)
//! nodes find each other by multicast beacons: see [`beacon`]. Zero config: a node whose config
//! has nothing but `[transports.udp]` and that discovery line finds its peers on the LAN.
//! Links are plaintext unless the node's `[security] links = "noise"` is set; on a network you do
//! not trust, turn it on (see docs/security-links.md).
//!
//! ## Encrypted links
//!
//! When the node's `[security]` says `links = "noise"`, the host passes the key file and
//! allow-list (`[comms_security]`) and every pair of peers runs a Noise XX handshake over
//! datagrams before any data is accepted; every datagram after it is sealed with an explicit
//! nonce and checked against a replay window, plaintext peers and keys off the allow-list are
//! refused and logged, and envelopes whose sender id is not bound to the peer's key are dropped.
//! The transport then declares `ENCRYPTED`. Sealing adds [`secure::OVERHEAD`] bytes per datagram,
//! taken from `max_datagram`. Beacons stay plaintext. See [`secure`].
//!
//! ## NAT traversal
//!
//! A node behind NAT sets `rendezvous` to a reachable node that has `rendezvous_server = true`.
//! It registers there (again every `keepalive_ms`, which keeps its NAT binding open) and
//! advertises `<rendezvous_name>@<rendezvous ip:port>` (unless `advertise` is set), an address
//! static discovery can list. Sending to such an address asks the rendezvous for the peer's
//! reflexive address, punches a hole with datagrams to it from both sides and, once a punch
//! arrives, sends directly; if none arrives within `punch_timeout_ms`, datagrams are relayed
//! through the rendezvous (only between registered nodes, rate-limited). Messages sent while the
//! path is set up are held (bounded) and go out on it. The rendezvous reaches its registered
//! nodes at the same addresses. With encrypted links, the Noise session runs end to end between
//! the two nodes over whichever path the datagrams take (the rendezvous relays sealed datagrams
//! it cannot read); the NAT traversal datagrams themselves (registrations, introductions,
//! punches) are not sealed, so a forged one can misdirect a path (the messages on it are then
//! not delivered and the peer is given up on), never read or inject a message. Protocol, datagram format and bounds:
//! [`nat`].
//!
//! ## How it works
//!
//! All protocol logic (fragmentation, reassembly, acks, retransmission, duplicate suppression,
//! ordering and every memory bound) lives in the sans-IO state machine [`reliability`], which has
//! its own datagram format documentation. This crate's transport only moves datagrams between
//! a tokio UDP socket and that state machine, runs its retransmission timer, and encodes
//! envelopes with [`comms_plugin_api::wire`].
//!
//! ## Guarantees and limits
//!
//! - **Reliable mode** (capabilities `reliable`, `ordered`): a message accepted by `send` is
//!   delivered exactly once and in send order per sender and receiver, unless the receiver
//!   acknowledges nothing for `peer_timeout_ms` (default 10 s) while datagrams wait for it (or one
//!   datagram was sent 12 times), in which case what was queued for it is dropped, a warning
//!   with the dropped count is logged, and the next `send` to that address fails once with a
//!   retryable `UNREACHABLE` error (that message is not sent; the send after it starts afresh).
//!   No acknowledgements to the application: a message is acked on the wire when it reaches the
//!   receiving transport, not when the host settles it. Datagrams forged with a peer's address
//!   and a fresh epoch cause no loss and no duplicates: a new epoch needs a proof that its
//!   sender receives at the address (see "Epoch changes" in [`reliability`]); a forger that
//!   reads the traffic can still interfere unless links are encrypted.
//! - **Best-effort mode** (no capabilities): a message arrives whole or not at all, possibly
//!   duplicated or reordered by the network.
//! - **Max message size**: `max_message_size` of payload; the encoded envelope may add up to
//!   64 KiB of names and headers.
//! - **Memory**: bounded per peer and overall (see [`reliability`]); at most 1024 complete
//!   messages wait for the host.
//! - **Close**: waits up to 2 s for unacknowledged datagrams to be acknowledged.
//! - Discovery: multicast beacons, see [`beacon`].
//! - NAT traversal: a node uses one rendezvous; a node behind NAT reaches peers behind NAT only
//!   through its own rendezvous; relayed datagrams are at most the rendezvous's `max_datagram`
//!   (keep it the same on all nodes); no encrypted links (see [`nat`]).

#![warn(missing_docs)]

pub mod beacon;
pub mod nat;
pub mod reliability;
pub mod secure;

use comms_plugin_api::{
    async_trait, counts_as_undelivered, export_plugin,
    inbound::receive_batch,
    queued,
    security::{noise::NoiseIdentity, LinkSecurity, PublicKey},
    socket_address, wire, Capabilities, Envelope, ErrorCode, Inbound, IncidentCounters, NodeId, Outbound,
    Plugin, PluginError, Provides, SendFailure, Setup, SharedBuffer, Transport, TransportInfo,
    TransportStats,
};
use nat::{Nat, Peer};
use reliability::{Endpoint, Event, SendError, MIN_DATAGRAM};
use secure::{SecureConfig, SecureEvent, SecureLayer, SecureStats};
use serde::Deserialize;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};

/// Listen address when the config names none: any free port on every IPv4 interface, because an
/// ad-hoc LAN transport bound to loopback could not reach its LAN peers.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:0";
/// Default give-up time for a peer that acknowledges nothing, in milliseconds.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 10_000;
/// The shortest `peer_timeout_ms` accepted (the retransmission timeout is capped at a quarter
/// of it, and never goes below 30 ms).
pub const MIN_PEER_TIMEOUT_MS: u64 = 200;
/// Default largest payload.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 4 << 20;
/// NAT traversal: default time between registrations with the rendezvous, in milliseconds.
pub const DEFAULT_KEEPALIVE_MS: u64 = 15_000;
/// NAT traversal: default time hole punching may take before relaying, in milliseconds.
pub const DEFAULT_PUNCH_TIMEOUT_MS: u64 = 3_000;
/// NAT traversal: default datagrams per second a rendezvous relays for each registered node.
pub const DEFAULT_RELAY_RATE: u32 = 2_000;
/// The largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Room for the envelope's own fields beyond the payload.
const ENVELOPE_ALLOWANCE: usize = 64 << 10;
/// Complete messages waiting for the host.
const INBOUND_CAPACITY: usize = 1024;
/// How long `send` waits for room in a full send queue.
const SEND_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// How long `close` waits for unacknowledged datagrams.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// Requested kernel receive buffer of the transport socket.
const RECEIVE_BUFFER: usize = 4 << 20;
/// Datagrams written per turn of the driver before it reads the socket again.
const TRANSMIT_BATCH: usize = 256;

/// Reliable (acks, retransmission, ordering) or best-effort delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Acks, retransmission, duplicate suppression, per-sender ordering.
    #[default]
    Reliable,
    /// Fragments only.
    BestEffort,
}

/// The plugin's config table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSettings {
    /// Address to bind; default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// The address peers are told (`host:port`); default: the bound address, or, when bound to
    /// an unspecified IP (`0.0.0.0`), the IP of the interface that routes to the LAN multicast
    /// group, with the bound port.
    pub advertise: Option<String>,
    /// Delivery mode; default reliable.
    #[serde(default)]
    pub mode: Mode,
    /// Bytes per datagram including the header; default 1400.
    pub max_datagram: Option<usize>,
    /// Largest payload; default [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: Option<u64>,
    /// Reliable mode: milliseconds a peer may leave sent datagrams unacknowledged before it is
    /// taken for gone (its queue dropped, the next send to it failing once with `UNREACHABLE`);
    /// default [`DEFAULT_PEER_TIMEOUT_MS`].
    pub peer_timeout_ms: Option<u64>,
    /// NAT traversal, for a node behind NAT: the rendezvous (`host:port`) to register with.
    /// The node then advertises `<rendezvous_name>@<rendezvous>` unless `advertise` says
    /// otherwise. See [`nat`].
    pub rendezvous: Option<String>,
    /// NAT traversal: the name to register under; default the node id.
    pub rendezvous_name: Option<String>,
    /// NAT traversal: serve as the rendezvous (and relay) for nodes behind NAT; default false.
    #[serde(default)]
    pub rendezvous_server: bool,
    /// NAT traversal, with `rendezvous`: milliseconds between registrations (the NAT binding's
    /// keepalive) and between keepalives on an idle direct path; default
    /// [`DEFAULT_KEEPALIVE_MS`].
    pub keepalive_ms: Option<u64>,
    /// NAT traversal, with `rendezvous`: milliseconds of hole punching before datagrams are
    /// relayed through the rendezvous; default [`DEFAULT_PUNCH_TIMEOUT_MS`].
    pub punch_timeout_ms: Option<u64>,
    /// NAT traversal, with `rendezvous_server`: datagrams per second each registered node may
    /// have relayed; default [`DEFAULT_RELAY_RATE`].
    pub relay_rate: Option<u32>,
}

impl UdpSettings {
    /// The state machine's config for plain links, or an error naming the key that is out of
    /// range.
    pub fn reliability_config(&self) -> Result<reliability::Config, PluginError> {
        self.reliability_config_for(false)
    }

    /// The state machine's config, for encrypted links if `encrypted` (each datagram then
    /// carries [`secure::OVERHEAD`] more bytes, taken from `max_datagram`), or an error naming
    /// the key that is out of range.
    pub fn reliability_config_for(&self, encrypted: bool) -> Result<reliability::Config, PluginError> {
        let defaults = reliability::Config::default();
        let configured = self.max_datagram.unwrap_or(defaults.max_datagram);
        let overhead = if encrypted { secure::OVERHEAD } else { 0 };
        let smallest = MIN_DATAGRAM + overhead;
        if !(smallest..=MAX_UDP_PAYLOAD).contains(&configured) {
            let why = if encrypted { " with encrypted links" } else { "" };
            return Err(PluginError::invalid_config(format!(
                "key `max_datagram`: {configured} is outside {smallest}..={MAX_UDP_PAYLOAD}{why}"
            )));
        }
        let max_datagram = configured - overhead;
        let payload = self.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        let fragment = max_datagram - reliability::DATA_HEADER;
        let largest = (u16::MAX as u64) * fragment as u64 - ENVELOPE_ALLOWANCE as u64;
        if payload == 0 || payload > largest.min(u32::MAX as u64 / 2) {
            return Err(PluginError::invalid_config(format!(
                "key `max_message_size`: {payload} must be between 1 and {} with max_datagram {max_datagram}",
                largest.min(u32::MAX as u64 / 2)
            )));
        }
        let peer_timeout_ms = self.peer_timeout_ms.unwrap_or(DEFAULT_PEER_TIMEOUT_MS);
        if !(MIN_PEER_TIMEOUT_MS..=3_600_000).contains(&peer_timeout_ms) {
            return Err(PluginError::invalid_config(format!(
                "key `peer_timeout_ms`: {peer_timeout_ms} is outside {MIN_PEER_TIMEOUT_MS}..=3600000"
            )));
        }
        // Room for several retransmissions before giving up: a lost retransmission must not
        // make a live peer look gone.
        let peer_timeout = Duration::from_millis(peer_timeout_ms);
        let max_rto = defaults.max_rto.min(peer_timeout / 4);
        let message = payload as usize + ENVELOPE_ALLOWANCE;
        Ok(reliability::Config {
            reliable: self.mode == Mode::Reliable,
            max_datagram,
            max_message_size: message,
            max_peer_reassembly_bytes: defaults.max_peer_reassembly_bytes.max(2 * message),
            max_total_reassembly_bytes: defaults.max_total_reassembly_bytes.max(4 * message),
            max_queued_bytes: defaults.max_queued_bytes.max(2 * message),
            peer_timeout,
            max_rto,
            initial_rto: defaults.initial_rto.min(max_rto),
            ..defaults
        })
    }
}

impl UdpSettings {
    /// Whether any NAT traversal key is set.
    fn nat_configured(&self) -> bool {
        self.rendezvous.is_some()
            || self.rendezvous_server
            || self.rendezvous_name.is_some()
            || self.keepalive_ms.is_some()
            || self.punch_timeout_ms.is_some()
            || self.relay_rate.is_some()
    }

    /// The NAT traversal state machine's config (`max_datagram` is the reliability core's, the
    /// largest payload the rendezvous relays), or an error naming the key that is out of range
    /// or set without what it needs.
    pub fn nat_config(&self, max_datagram: usize) -> Result<nat::Config, PluginError> {
        let client = self.rendezvous.is_some();
        if client && self.rendezvous_server {
            return Err(PluginError::invalid_config(
                "keys `rendezvous` and `rendezvous_server`: a node is either behind NAT (registers with a \
                 rendezvous) or the rendezvous, not both",
            ));
        }
        for (key, set) in [
            ("rendezvous_name", self.rendezvous_name.is_some()),
            ("keepalive_ms", self.keepalive_ms.is_some()),
            ("punch_timeout_ms", self.punch_timeout_ms.is_some()),
        ] {
            if set && !client {
                return Err(PluginError::invalid_config(format!(
                    "key `{key}` needs `rendezvous` (the rendezvous node to register with)"
                )));
            }
        }
        if self.relay_rate.is_some() && !self.rendezvous_server {
            return Err(PluginError::invalid_config("key `relay_rate` needs `rendezvous_server = true`"));
        }
        let keepalive = self.keepalive_ms.unwrap_or(DEFAULT_KEEPALIVE_MS);
        if !(100..=3_600_000).contains(&keepalive) {
            return Err(PluginError::invalid_config(format!(
                "key `keepalive_ms`: {keepalive} is outside 100..=3600000"
            )));
        }
        let punch_timeout = self.punch_timeout_ms.unwrap_or(DEFAULT_PUNCH_TIMEOUT_MS);
        if !(100..=600_000).contains(&punch_timeout) {
            return Err(PluginError::invalid_config(format!(
                "key `punch_timeout_ms`: {punch_timeout} is outside 100..=600000"
            )));
        }
        let relay_rate = self.relay_rate.unwrap_or(DEFAULT_RELAY_RATE);
        if relay_rate == 0 {
            return Err(PluginError::invalid_config("key `relay_rate`: must be at least 1"));
        }
        if let Some(name) = &self.rendezvous_name {
            if name.is_empty() || name.len() > nat::MAX_NAME {
                return Err(PluginError::invalid_config(format!(
                    "key `rendezvous_name`: must be 1 to {} bytes",
                    nat::MAX_NAME
                )));
            }
        }
        let defaults = nat::Config::default();
        let keepalive = Duration::from_millis(keepalive);
        Ok(nat::Config {
            keepalive,
            punch_timeout: Duration::from_millis(punch_timeout),
            // Several keepalives may be lost before a path or a registration is forgotten.
            path_idle: defaults.path_idle.max(4 * keepalive),
            registration_timeout: defaults.registration_timeout.max(4 * keepalive),
            relay_rate,
            max_relay_payload: max_datagram,
            ..defaults
        })
    }
}

/// The plugin: provides a transport.
#[derive(Debug)]
pub struct UdpPlugin;

#[async_trait]
impl Plugin for UdpPlugin {
    const NAME: &'static str = "udp";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "UDP ad-hoc transport: fragments, acks and retransmission, no server";
    const PROVIDES: Provides = Provides(Provides::TRANSPORT.0 | Provides::DISCOVERY.0);

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let security = setup.link_security()?;
        Ok(Arc::new(
            UdpTransport::bind_with_security(setup.node_id.clone(), setup.config()?, security).await?,
        ))
    }

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn comms_plugin_api::Discovery>, PluginError> {
        Ok(Arc::new(beacon::MulticastBeacon::start(setup.config()?)?))
    }
}

export_plugin!(UdpPlugin);

struct Shared {
    endpoint: Mutex<Endpoint<Peer>>,
    /// Encrypted links: below the endpoint, keyed like it (a peer behind NAT keeps its session
    /// whichever path its datagrams take). Locked after `endpoint` when both are needed.
    secure: Option<Mutex<SecureLayer<Peer>>>,
    /// NAT traversal: below `secure` (it carries sealed datagrams; its own signalling is not
    /// sealed). Locked after `endpoint` and `secure` when they are needed too.
    nat: Option<Mutex<Nat>>,
    /// A rendezvous server's own addresses: `name@` one of them names a node registered here.
    own_addresses: Vec<SocketAddr>,
    /// Something was queued: the driver has datagrams to write.
    wake: Notify,
    /// Datagrams were acknowledged: a full send queue may have room.
    space: Notify,
    shutdown: watch::Sender<bool>,
    closing: AtomicBool,
    /// Messages dropped by the driver because they are not envelopes, and messages `send` took
    /// and the endpoint gave up on (undelivered).
    incidents: IncidentCounters,
}

impl Shared {
    fn endpoint(&self) -> std::sync::MutexGuard<'_, Endpoint<Peer>> {
        // The state machine has no invariant a panicking holder could break halfway that matters
        // more than staying available.
        self.endpoint.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn secure(&self) -> Option<std::sync::MutexGuard<'_, SecureLayer<Peer>>> {
        let secure = self.secure.as_ref()?;
        Some(secure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn nat(&self) -> Option<std::sync::MutexGuard<'_, Nat>> {
        let nat = self.nat.as_ref()?;
        Some(nat.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn has_pending_sends(&self) -> bool {
        self.endpoint().has_pending_sends() || self.secure().is_some_and(|secure| secure.has_held())
    }
}

/// A transport over one UDP socket.
pub struct UdpTransport {
    shared: Arc<Shared>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    /// The sending side of `inbound`, kept only to count what waits in it.
    inbound_depth: mpsc::Sender<Inbound>,
    info: TransportInfo,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for UdpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpTransport").field("info", &self.info).finish_non_exhaustive()
    }
}

impl UdpTransport {
    /// Binds `settings.listen` and starts the driver task, with plain links. Must run inside a
    /// tokio runtime.
    pub async fn bind(node_id: NodeId, settings: UdpSettings) -> Result<Self, PluginError> {
        Self::bind_with_security(node_id, settings, None).await
    }

    /// Like [`bind`](Self::bind), with encrypted and authenticated links when `security` is set
    /// (see [`secure`]): the transport then declares [`Capabilities::ENCRYPTED`].
    pub async fn bind_with_security(
        node_id: NodeId,
        settings: UdpSettings,
        security: Option<LinkSecurity>,
    ) -> Result<Self, PluginError> {
        let config = settings.reliability_config_for(security.is_some())?;
        // The rendezvous relays sealed datagrams when links are encrypted.
        let sealed_datagram = config.max_datagram + if security.is_some() { secure::OVERHEAD } else { 0 };
        let nat_config =
            if settings.nat_configured() { Some(settings.nat_config(sealed_datagram)?) } else { None };
        let rendezvous = match &settings.rendezvous {
            Some(rendezvous) => Some(socket_address::resolve("key `rendezvous`", rendezvous).await?),
            None => None,
        };
        let rendezvous_name =
            settings.rendezvous_name.clone().unwrap_or_else(|| node_id.as_str().to_string());
        if rendezvous.is_some() && rendezvous_name.len() > nat::MAX_NAME {
            return Err(PluginError::invalid_config(format!(
                "key `rendezvous_name`: the node id is longer than {} bytes; set a shorter name",
                nat::MAX_NAME
            )));
        }
        let secure = match &security {
            Some(security) => {
                let noise = NoiseIdentity::new(security).map_err(|error| {
                    PluginError::new(ErrorCode::OTHER, format!("udp: cannot set up encrypted links: {error}"))
                })?;
                Some(Mutex::new(SecureLayer::new(noise, SecureConfig::default())))
            }
            None => None,
        };
        let listen = settings.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let socket = bind_socket(&listen).await.map_err(|error| {
            PluginError::invalid_config(format!("key `listen`: cannot bind UDP socket {listen}: {error}"))
        })?;
        let local_address = match (&settings.advertise, rendezvous) {
            (Some(advertise), _) => advertise.clone(),
            // Behind NAT: reached through the rendezvous, by name.
            (None, Some(rendezvous)) => format!("{rendezvous_name}@{rendezvous}"),
            // The IP the kernel sends LAN multicast from (the beacons' default groups): the
            // interface the peers on the LAN share with this node.
            (None, None) => socket_address::advertised(
                socket.local_addr()?,
                std::net::Ipv4Addr::new(239, 255, 67, 1),
                std::net::Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0x4353, 1),
            )
            .to_string(),
        };
        let now = Instant::now();
        let nat = match (nat_config, rendezvous) {
            (Some(nat_config), Some(rendezvous)) => Some(Mutex::new(
                Nat::client(nat_config, rendezvous, rendezvous_name.as_bytes(), now).map_err(|error| {
                    PluginError::invalid_config(format!("key `rendezvous_name`: {error}"))
                })?,
            )),
            (Some(nat_config), None) => Some(Mutex::new(Nat::server(nat_config, now))),
            (None, _) => None,
        };
        let mut own_addresses = vec![socket.local_addr()?];
        own_addresses.extend(local_address.parse::<SocketAddr>().ok());
        let mut capabilities =
            if config.reliable { Capabilities::RELIABLE | Capabilities::ORDERED } else { Capabilities::NONE };
        if secure.is_some() {
            capabilities = capabilities | Capabilities::ENCRYPTED;
        }
        let info = TransportInfo::new(
            capabilities,
            local_address.clone(),
            config.max_message_size as u64 - ENVELOPE_ALLOWANCE as u64,
        );
        let epoch = epoch_for(&node_id, &local_address);
        let shared = Arc::new(Shared {
            endpoint: Mutex::new(Endpoint::new(config, epoch)),
            secure,
            nat,
            own_addresses,
            wake: Notify::new(),
            space: Notify::new(),
            shutdown: watch::channel(false).0,
            closing: AtomicBool::new(false),
            incidents: IncidentCounters::default(),
        });
        let (sender, receiver) = mpsc::channel(INBOUND_CAPACITY);
        let inbound_depth = sender.clone();
        let driver = tokio::spawn(drive(socket, shared.clone(), sender, local_address));
        Ok(Self {
            shared,
            inbound: tokio::sync::Mutex::new(receiver),
            inbound_depth,
            info,
            driver: Mutex::new(Some(driver)),
        })
    }

    /// Counters of the state machine (dropped, duplicated, retransmitted, delivered).
    pub fn stats(&self) -> reliability::Stats {
        self.shared.endpoint().stats().clone()
    }

    /// Counters of the encrypted links (handshakes, refusals, tampered and replayed datagrams);
    /// `None` with plain links.
    pub fn secure_stats(&self) -> Option<SecureStats> {
        self.shared.secure().map(|secure| secure.stats().clone())
    }

    /// Counters of NAT traversal; `None` without `rendezvous` or `rendezvous_server`.
    pub fn nat_stats(&self) -> Option<nat::Stats> {
        self.shared.nat().map(|nat| nat.stats().clone())
    }

    /// The peer an address names: `host:port`, or, with NAT traversal, `name@rendezvous`.
    async fn resolve_peer(&self, address: &str) -> Result<Peer, PluginError> {
        if self.shared.nat.is_some() {
            if let Some((name, rendezvous)) = nat::split_address(address) {
                return self.resolve_nat_peer(address, name, rendezvous).await;
            }
        }
        Ok(Peer::Addr(resolve(address).await?))
    }

    async fn resolve_nat_peer(
        &self,
        address: &str,
        name: &str,
        rendezvous: &str,
    ) -> Result<Peer, PluginError> {
        let rendezvous = socket_address::resolve("udp address", rendezvous).await?;
        let Some(mut nat) = self.shared.nat() else { return Err(PluginError::closed("udp transport")) };
        let unreachable = |why: String| {
            PluginError::retryable(ErrorCode::UNREACHABLE, format!("udp send to {address}: {why}"))
        };
        match nat.rendezvous() {
            Some(mine) if mine == rendezvous => nat
                .peer(Instant::now(), name.as_bytes())
                .map(Peer::Nat)
                .map_err(|error| unreachable(error.to_string())),
            Some(mine) => Err(PluginError::new(
                ErrorCode::UNREACHABLE,
                format!(
                    "udp send to {address}: the peer is behind the rendezvous {rendezvous}, and this node \
                     registers with {mine} (one rendezvous per node)"
                ),
            )),
            // The rendezvous itself: straight to where the node registered from.
            None if self.shared.own_addresses.contains(&rendezvous) => nat
                .registered(name.as_bytes())
                .map(Peer::Addr)
                .ok_or_else(|| unreachable(format!("no node is registered here as `{name}`"))),
            None => Err(PluginError::new(
                ErrorCode::UNREACHABLE,
                format!(
                    "udp send to {address}: the peer is behind the rendezvous {rendezvous}, not this one"
                ),
            )),
        }
    }

    /// What `send` refuses before resolving the address.
    fn check_sendable(&self, address: &str, envelope: &Envelope) -> Result<(), PluginError> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(PluginError::closed("udp transport"));
        }
        let max = self.info.max_message_size;
        if envelope.payload.len() as u64 > max {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!(
                    "udp send to {address}: payload of {} bytes exceeds max_message_size {max}",
                    envelope.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// Encodes `envelope` (into `bytes`, reused) and queues it in the endpoint for `to`, waiting
    /// up to [`SEND_QUEUE_WAIT`] while the peer's queue is full (the driver is woken then; the
    /// caller wakes it once the message is queued).
    async fn enqueue(
        &self,
        address: &str,
        to: Peer,
        envelope: &Envelope,
        bytes: &mut Vec<u8>,
    ) -> Result<(), PluginError> {
        bytes.clear();
        wire::encode_envelope(envelope, bytes).map_err(|error| {
            PluginError::new(
                ErrorCode::MALFORMED,
                format!("udp send to {address}: cannot encode envelope: {error}"),
            )
        })?;
        let deadline = tokio::time::Instant::now() + SEND_QUEUE_WAIT;
        loop {
            // Only application messages to a node count as undelivered if the peer is given up
            // on: the host learns of the others' loss otherwise (see `counts_as_undelivered`).
            let counted = counts_as_undelivered(envelope);
            let result = self.shared.endpoint().send_counted(Instant::now(), to, bytes, counted);
            match result {
                Ok(()) => return Ok(()),
                Err(SendError::TooLarge { size, max }) => {
                    return Err(PluginError::new(
                        ErrorCode::TOO_LARGE,
                        format!("udp send to {address}: encoded envelope of {size} bytes exceeds {max}"),
                    ))
                }
                Err(error @ SendError::Unreachable { .. }) => {
                    return Err(PluginError::retryable(
                        ErrorCode::UNREACHABLE,
                        format!("udp send to {address}: {error}; this message was not sent"),
                    ))
                }
                Err(error @ (SendError::QueueFull | SendError::PeerLimit)) => {
                    if tokio::time::Instant::now() >= deadline || self.shared.closing.load(Ordering::Acquire)
                    {
                        return Err(PluginError::retryable(
                            ErrorCode::UNREACHABLE,
                            format!("udp send to {address}: {error} for {} s", SEND_QUEUE_WAIT.as_secs()),
                        ));
                    }
                    // What is queued has to go out before there is room.
                    self.shared.wake.notify_one();
                    let _ =
                        tokio::time::timeout(Duration::from_millis(20), self.shared.space.notified()).await;
                }
            }
        }
    }
}

/// Binds a UDP socket with a large receive buffer: a burst of datagrams that overflows the
/// kernel's buffer is lost (and, in reliable mode, retransmitted only after a timeout).
async fn bind_socket(listen: &str) -> std::io::Result<UdpSocket> {
    let address = tokio::net::lookup_host(listen)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Capped by net.core.rmem_max; a smaller buffer still works, with more loss under bursts.
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    socket.bind(&address.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// A per-start number that differs between restarts of the same node on the same address.
fn epoch_for(node_id: &NodeId, address: &str) -> u32 {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    state.hash_one((node_id.as_str(), address, std::time::SystemTime::now())) as u32
}

/// A peer's address as the host gave it (`host:port`).
async fn resolve(address: &str) -> Result<SocketAddr, PluginError> {
    socket_address::resolve("udp address", address).await
}

#[async_trait]
impl Transport for UdpTransport {
    fn info(&self) -> TransportInfo {
        self.info.clone()
    }

    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        self.check_sendable(address, &envelope)?;
        let to = self.resolve_peer(address).await?;
        let mut bytes = Vec::new();
        self.enqueue(address, to, &envelope, &mut bytes).await?;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Like `send` for each item, in order, resolving each address once and waking the driver
    /// once for the whole batch.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        let mut resolved: Vec<(comms_plugin_api::Text, Result<Peer, PluginError>)> = Vec::new();
        let mut bytes = Vec::new();
        for (index, Outbound { address, envelope }) in batch.into_iter().enumerate() {
            let sent = match self.check_sendable(&address, &envelope) {
                Ok(()) => {
                    let position = match resolved.iter().position(|(known, _)| *known == address) {
                        Some(position) => position,
                        None => {
                            let to = self.resolve_peer(&address).await;
                            resolved.push((address.clone(), to));
                            resolved.len() - 1
                        }
                    };
                    match &resolved[position].1 {
                        Ok(to) => self.enqueue(&address, *to, &envelope, &mut bytes).await,
                        Err(error) => Err(error.clone()),
                    }
                }
                Err(error) => Err(error),
            };
            if let Err(error) = sent {
                failures.push(SendFailure { index, error });
            }
        }
        self.shared.wake.notify_one();
        failures
    }

    /// Queue depth of received messages; errors: malformed, tampered, replayed and refused
    /// datagrams, messages that are not envelopes, peers given up; the `undelivered` counter
    /// (application messages to a node dropped when their peer was given up); counters of the
    /// state machine (`udp.retransmissions`, `udp.duplicates`, ...).
    fn stats(&self) -> TransportStats {
        let reliability = UdpTransport::stats(self);
        let secure = self.secure_stats().unwrap_or_default();
        let mut stats = self.shared.incidents.stats();
        stats.receive_queue_depth = queued(&self.inbound_depth);
        stats.errors += reliability.malformed
            + reliability.gave_up
            + reliability.bad_proofs
            + secure.malformed
            + secure.tampered
            + secure.replayed
            + secure.refused
            + secure.unbound_node_id;
        // Extend: `incidents.stats()` already put the `undelivered` counter there.
        stats.counters.extend(
            [
                ("udp.delivered", reliability.delivered),
                ("udp.retransmissions", reliability.retransmissions),
                ("udp.duplicates", reliability.duplicates),
                ("udp.abandoned_messages", reliability.abandoned_messages),
                ("udp.out_of_window", reliability.out_of_window),
                ("udp.over_budget", reliability.over_budget),
                ("udp.unproven_epoch", reliability.unproven_epoch),
                ("udp.epoch_changes", reliability.epoch_changes),
                ("udp.handshakes", secure.handshakes),
                ("udp.plaintext_dropped", secure.plaintext),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_string(), value)),
        );
        if let Some(nat) = self.nat_stats() {
            stats.errors += nat.malformed + nat.bad_punches;
            stats.counters.extend(
                [
                    ("udp.nat.direct_paths", nat.direct_paths),
                    ("udp.nat.relayed_paths", nat.relayed_paths),
                    ("udp.nat.relayed_out", nat.relayed_out),
                    ("udp.nat.relayed_in", nat.relayed_in),
                    ("udp.nat.held_dropped", nat.held_dropped),
                    ("udp.nat.unresolved", nat.unresolved),
                    ("udp.nat.registrations", nat.registrations),
                    ("udp.nat.relayed", nat.relayed),
                    ("udp.nat.refused", nat.refused),
                    ("udp.nat.malformed", nat.malformed),
                ]
                .into_iter()
                .map(|(name, value)| (name.to_string(), value)),
            );
        }
        stats
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let mut closing = self.shared.shutdown.subscribe();
        let mut inbound = self.inbound.lock().await;
        Ok(receive_batch(&mut inbound, max_batch, &mut closing).await)
    }

    async fn close(&self) -> Result<(), PluginError> {
        self.shared.closing.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + CLOSE_FLUSH;
        while self.shared.has_pending_sends() && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(10), self.shared.space.notified()).await;
        }
        // What is still pending will never be acknowledged: give up on it here, so that the host,
        // which reads `undelivered` after `close`, hears of it. The driver may take some of these
        // events first; either way each is reported once.
        let events: Vec<_> = {
            let mut endpoint = self.shared.endpoint();
            endpoint.give_up_all(Instant::now());
            std::iter::from_fn(|| endpoint.poll_event()).collect()
        };
        for event in events {
            report(&self.shared, &self.info.local_address, event);
        }
        self.shared.shutdown.send_replace(true);
        let driver = self.driver.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(driver) = driver {
            let _ = driver.await;
        }
        Ok(())
    }
}

/// Counts and logs an event of the endpoint.
fn report(shared: &Shared, local: &str, event: Event<Peer>) {
    let Event::GaveUp { peer, dropped_messages, undelivered, silent_for } = event;
    // `send` returned Ok for these: `Node::flush` and `close` report them through `stats`.
    shared.incidents.undelivered(undelivered);
    let peer = peer_label(shared, peer);
    tracing::warn!(
        "udp {local}: giving up on peer {peer}: nothing acknowledged for {} ms; \
         {dropped_messages} queued message(s) dropped; the next send to it fails once",
        silent_for.as_millis()
    );
}

/// A peer for logs: its address, or the name of a peer behind NAT. Locks `nat`.
fn peer_label(shared: &Shared, peer: Peer) -> String {
    match peer {
        Peer::Nat(id) => match shared.nat().and_then(|nat| nat.name(id)) {
            Some(name) => format!("`{name}` (behind NAT)"),
            None => peer.to_string(),
        },
        Peer::Addr(_) => peer.to_string(),
    }
}

/// Moves datagrams between the socket and the state machines until shutdown.
async fn drive(socket: UdpSocket, shared: Arc<Shared>, inbound: mpsc::Sender<Inbound>, local: String) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut buffer = vec![0u8; MAX_UDP_PAYLOAD + 1];
    loop {
        let (transmits, messages, events, nat_events, timeout) = {
            let mut endpoint = shared.endpoint();
            let mut secure = shared.secure();
            let mut nat = shared.nat();
            let now = Instant::now();
            if endpoint.poll_timeout().is_some_and(|at| at <= now) {
                endpoint.handle_timeout(now);
            }
            if let Some(secure) = secure.as_mut() {
                if secure.poll_timeout().is_some_and(|at| at <= now) {
                    secure.handle_timeout(now);
                }
            }
            if let Some(nat) = nat.as_mut() {
                if nat.poll_timeout().is_some_and(|at| at <= now) {
                    nat.handle_timeout(now);
                }
            }
            let transmits = collect_transmits(&mut endpoint, secure.as_deref_mut(), nat.as_deref_mut(), now);
            let messages: Vec<_> = std::iter::from_fn(|| endpoint.poll_message()).collect();
            let events: Vec<_> = std::iter::from_fn(|| endpoint.poll_event()).collect();
            let nat_events: Vec<_> = match nat.as_mut() {
                Some(nat) => std::iter::from_fn(|| nat.poll_event()).collect(),
                None => Vec::new(),
            };
            let timeout = endpoint
                .poll_timeout()
                .into_iter()
                .chain(secure.as_ref().and_then(|secure| secure.poll_timeout()))
                .chain(nat.as_ref().and_then(|nat| nat.poll_timeout()))
                .min();
            (transmits, messages, events, nat_events, timeout)
        };
        for event in events {
            report(&shared, &local, event);
        }
        for event in nat_events {
            log_nat_event(&local, event);
        }
        shared.space.notify_waiters();
        let more = transmits.len() == TRANSMIT_BATCH;
        for (to, datagram) in transmits {
            if let Err(error) = socket.send_to(&datagram, to).await {
                tracing::debug!("udp {local}: sending a datagram to {to} failed: {error}");
            }
        }
        for (from, bytes) in messages {
            // The payload stays in the reassembled message's buffer: no copy.
            let length = bytes.len();
            let envelope = match wire::decode_envelope_shared(&SharedBuffer::from(bytes), 0..length) {
                Ok(envelope) => envelope,
                Err(error) => {
                    shared.incidents.failed();
                    tracing::warn!(
                        "udp {local}: dropped a message from {from} that is not an envelope: {error}"
                    );
                    continue;
                }
            };
            if !sender_is_bound(&shared, from, &envelope) {
                continue;
            }
            tokio::select! {
                sent = inbound.send(Inbound { envelope, delivery_tag: 0 }) => if sent.is_err() { return },
                _ = shutdown.wait_for(|closing| *closing) => return,
            }
        }
        log_secure_events(&shared, &local);
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|closing| *closing) => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok((n, from)) => {
                    let mut endpoint = shared.endpoint();
                    let mut secure = shared.secure();
                    let mut nat = shared.nat();
                    let mut handle = |from: SocketAddr, datagram: &[u8]| {
                        let now = Instant::now();
                        // NAT traversal first: its own datagrams stop there, a relay frame gives
                        // the datagram inside and the peer behind NAT that sent it.
                        let (peer, datagram) = match nat.as_mut() {
                            Some(nat) if datagram.first() == Some(&nat::MAGIC) => {
                                match nat.handle_datagram(now, from, datagram) {
                                    Some((peer, relayed)) => (Peer::Nat(peer), relayed),
                                    None => return,
                                }
                            }
                            Some(nat) => (nat.classify(now, from), datagram),
                            None => (Peer::Addr(from), datagram),
                        };
                        match secure.as_mut() {
                            Some(secure) => {
                                if let Some(plaintext) = secure.handle_datagram(now, peer, datagram) {
                                    endpoint.handle_datagram(now, peer, &plaintext);
                                }
                            }
                            None => endpoint.handle_datagram(now, peer, datagram),
                        }
                    };
                    handle(from, &buffer[..n]);
                    // Take what else is waiting, so that one ack answers a burst.
                    for _ in 0..64 {
                        match socket.try_recv_from(&mut buffer) {
                            Ok((n, from)) => handle(from, &buffer[..n]),
                            Err(_) => break,
                        }
                    }
                }
                Err(error) => tracing::debug!("udp {local}: receiving failed: {error}"),
            },
            _ = sleep, if !more => {}
            _ = shared.wake.notified(), if !more => {}
            _ = std::future::ready(()), if more => {}
        }
    }
}

/// Up to [`TRANSMIT_BATCH`] datagrams to write: the endpoint's, sealed by the secure layer if
/// links are encrypted (which also adds its own handshake datagrams).
/// With NAT traversal, the datagrams (sealed or not) for peers behind NAT go through it (direct,
/// relayed or held while the path is set up), and it adds its own (registrations, punches,
/// relaying).
fn collect_transmits(
    endpoint: &mut Endpoint<Peer>,
    mut secure: Option<&mut SecureLayer<Peer>>,
    mut nat: Option<&mut Nat>,
    now: Instant,
) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut transmits = Vec::new();
    fn route(
        to: Peer,
        datagram: Vec<u8>,
        nat: Option<&mut &mut Nat>,
        transmits: &mut Vec<(SocketAddr, Vec<u8>)>,
        now: Instant,
    ) {
        match (to, nat) {
            (Peer::Addr(to), _) => transmits.push((to, datagram)),
            (Peer::Nat(peer), Some(nat)) => nat.send(now, peer, datagram),
            // Only NAT traversal makes such peers.
            (Peer::Nat(_), None) => {}
        }
    }
    while transmits.len() < TRANSMIT_BATCH {
        if let Some((to, datagram)) = secure.as_mut().and_then(|secure| secure.poll_transmit()) {
            route(to, datagram, nat.as_mut(), &mut transmits, now);
            continue;
        }
        if let Some(transmit) = nat.as_mut().and_then(|nat| nat.poll_transmit()) {
            transmits.push(transmit);
            continue;
        }
        match (endpoint.poll_transmit(now), secure.as_mut()) {
            (Some((to, datagram)), Some(secure)) => secure.send(now, to, &datagram),
            (Some((to, datagram)), None) => route(to, datagram, nat.as_mut(), &mut transmits, now),
            (None, _) => break,
        }
    }
    transmits
}

fn log_nat_event(local: &str, event: nat::Event) {
    match event {
        nat::Event::Registered { reflexive } => {
            tracing::info!("udp {local}: registered with the rendezvous; reflexive address {reflexive}")
        }
        nat::Event::Direct { name, address, .. } => {
            tracing::info!("udp {local}: direct path to `{name}` at {address} (hole punched)")
        }
        nat::Event::Relayed { name, .. } => {
            tracing::info!("udp {local}: no direct path to `{name}`: relaying through the rendezvous")
        }
        nat::Event::Unresolved { name, dropped, .. } => tracing::warn!(
            "udp {local}: the rendezvous did not introduce `{name}` in time (not registered?); \
             {dropped} datagram(s) dropped, the next one asks again"
        ),
    }
}

/// With encrypted links: whether the envelope's sender id is bound to the key the peer at `from`
/// authenticated with (otherwise it is dropped, counted and reported).
fn sender_is_bound(shared: &Shared, from: Peer, envelope: &Envelope) -> bool {
    let Some(mut secure) = shared.secure() else { return true };
    match secure.peer_key(&from) {
        Some(key) if PublicKey::of_node(&envelope.from) == Some(key) => true,
        Some(key) => {
            secure.refuse_node_id(Instant::now(), from, &envelope.from, key);
            false
        }
        // The session ended between the datagram and its message: nothing to bind it to.
        None => false,
    }
}

fn log_secure_events(shared: &Shared, local: &str) {
    let events: Vec<_> = match shared.secure() {
        Some(mut secure) => std::iter::from_fn(|| secure.poll_event()).collect(),
        None => return,
    };
    for event in events {
        let label = |peer: Peer| peer_label(shared, peer);
        match event {
            SecureEvent::Established { peer, key, initiator } => tracing::debug!(
                "udp {local}: encrypted session with {} (key {key}, {})",
                label(peer),
                if initiator { "we dialled" } else { "they dialled" }
            ),
            SecureEvent::Refused { peer, key: Some(key), reason } => {
                tracing::warn!("udp {local}: refused peer {} with key {key}: {reason}", label(peer))
            }
            SecureEvent::Refused { peer, key: None, reason } => {
                tracing::warn!("udp {local}: refused peer {}: {reason}", label(peer))
            }
            SecureEvent::Plaintext { peer } => tracing::warn!(
                "udp {local}: dropped plaintext datagrams from {}: this node requires encrypted links \
                 (security.links = \"noise\")",
                label(peer)
            ),
            SecureEvent::HandshakeTimeout { peer, tries, dropped } => tracing::warn!(
                "udp {local}: no encrypted session with {} after {tries} handshake attempts; \
                 {dropped} datagram(s) dropped",
                label(peer)
            ),
        }
    }
}

#[cfg(test)]
mod tests;

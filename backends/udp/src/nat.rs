//! NAT traversal for the UDP transport: registration with a rendezvous node, UDP hole punching,
//! and relaying through the rendezvous when punching fails, as a sans-IO state machine.
//!
//! Like [`crate::reliability`], [`Nat`] owns no socket and reads no clock: the caller hands it
//! the datagrams that start with [`MAGIC`] ([`Nat::handle_datagram`]), the reliability
//! datagrams it wants to send to a peer behind NAT ([`Nat::send`]) and the current time, and
//! takes out datagrams to write ([`Nat::poll_transmit`]), events to log ([`Nat::poll_event`])
//! and the next instant it wants to be woken at ([`Nat::poll_timeout`], then
//! [`Nat::handle_timeout`]).
//!
//! ## Roles
//!
//! - A **client** ([`Nat::client`]) sits behind a NAT. It registers with one rendezvous under a
//!   name (the node id by default) and repeats the registration every [`Config::keepalive`],
//!   which keeps its NAT binding towards the rendezvous open and tells it its reflexive (public)
//!   address. Other nodes reach it at `<name>@<rendezvous ip:port>`.
//! - A **server** ([`Nat::server`]) is the rendezvous: it keeps the registrations, introduces
//!   registered clients to each other and relays datagrams between them.
//!
//! ## Reaching a peer behind NAT
//!
//! A client sending to `name@rendezvous` gets a stable [`PeerId`] for the name
//! ([`Nat::peer`]); the reliability core keys the peer by it ([`Peer::Nat`]) whatever path the
//! datagrams take, so switching from one path to another loses and repeats nothing.
//!
//! 1. The first datagram for a peer with no path starts **connecting**: the client asks the
//!    rendezvous (`CONNECT`), which answers both sides with the other's reflexive address and a
//!    token (`PEER`). Datagrams sent meanwhile are **held** (at most
//!    [`Config::max_held_datagrams`] per peer and [`Config::max_held_bytes`] overall; beyond
//!    that they are dropped and counted, and reliable mode retransmits them later).
//! 2. Both sides send `PUNCH` datagrams carrying the token to the other's reflexive address
//!    every [`Config::punch_interval`]. The first `PUNCH` (answered with `PUNCH_ACK`) or
//!    `PUNCH_ACK` with the right token that arrives makes the path **direct**, to the address
//!    it came from; the held datagrams go out on it.
//! 3. If no punch arrives within [`Config::punch_timeout`] but the rendezvous introduced the
//!    peer, the path becomes **relayed**: datagrams go to the rendezvous in `RELAY` frames, and
//!    it forwards them as `RELAYED` frames. A client that receives a relayed datagram from a
//!    peer it has no path to (or is still punching) relays too. A valid punch later upgrades a
//!    relayed path to a direct one.
//! 4. If the rendezvous never introduced the peer (not registered, rendezvous down) within the
//!    timeout, the held datagrams are dropped ([`Stats::unresolved`], [`Event::Unresolved`])
//!    and the next datagram starts over.
//!
//! A direct path is kept alive with a `PUNCH` every [`Config::keepalive`] while it is in use
//! (data sent or received within [`Config::path_idle`]). A path on which nothing was heard for
//! `path_idle` is forgotten (the peer keeps its id); the next datagram connects again.
//!
//! ## Datagram format (version 1)
//!
//! All integers are big-endian. `name` is `u8 length` (1..=255) then that many bytes;
//! `address` is `u8 family` (4 or 6), the 4 or 16 bytes of the IP, `u16 port`.
//!
//! ```text
//! u8   magic 0xCF (0xCD is reliability, 0xCE the secure layer)
//! u8   kind
//!  1 REGISTER        client -> rendezvous   name (the client's)
//!  2 REGISTERED      rendezvous -> client   address (the client's reflexive address)
//!  3 CONNECT         client -> rendezvous   name (the peer wanted)
//!  4 PEER            rendezvous -> client   u64 token, address (the peer's reflexive), name (the peer's)
//!  5 UNKNOWN_PEER    rendezvous -> client   name (not registered)
//!  6 PUNCH           client -> client       u64 token, name (the sender's)
//!  7 PUNCH_ACK       client -> client       u64 token, name (the sender's)
//!  8 RELAY           client -> rendezvous   name (the destination), payload (the rest, at least 1 byte)
//!  9 RELAYED         rendezvous -> client   name (the source), payload (the rest, at least 1 byte)
//! 10 NOT_REGISTERED  rendezvous -> client   nothing: register again
//! ```
//!
//! The payload of a relay frame is one reliability datagram (magic 0xCD). The token is a keyed
//! hash (random key per rendezvous start) of both names and reflexive addresses: the same for
//! repeated introductions of the same pair, unguessable for anyone else, so a forged punch
//! cannot divert a path. A datagram that does not parse, has trailing bytes, comes from the
//! wrong sender (a rendezvous message not from the rendezvous) or is of a kind the role does not
//! take is dropped and counted in [`Stats::malformed`]; nothing panics and nothing allocates
//! beyond the bounds.
//!
//! ## Rendezvous bounds (not an open relay)
//!
//! - Only registered clients may relay, and only to registered clients; anything else is dropped
//!   ([`Stats::refused`]) and answered `NOT_REGISTERED` or `UNKNOWN_PEER`, at most
//!   [`REPLY_RATE`] such answers per second overall (both are no larger than what they answer).
//! - Each registered sender may relay [`Config::relay_rate`] datagrams per second (token
//!   bucket, burst of one second's worth); payloads over [`Config::max_relay_payload`] are
//!   dropped.
//! - At most [`Config::max_registrations`] registrations (one name per address; a registration
//!   silent for [`Config::registration_timeout`] expires) and [`Config::max_queued_transmits`]
//!   datagrams waiting to be written (beyond that, dropped and counted in [`Stats::queue_full`]).
//! - Names are not authenticated: like plain links, anyone who can send to the rendezvous can
//!   register any name (the latest registration wins). Encrypted links are not supported
//!   together with NAT traversal yet.

use std::{
    collections::{hash_map::RandomState, HashMap, VecDeque},
    fmt,
    hash::BuildHasher,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// The first byte of every NAT traversal datagram.
pub const MAGIC: u8 = 0xCF;
const KIND_REGISTER: u8 = 1;
const KIND_REGISTERED: u8 = 2;
const KIND_CONNECT: u8 = 3;
const KIND_PEER: u8 = 4;
const KIND_UNKNOWN_PEER: u8 = 5;
const KIND_PUNCH: u8 = 6;
const KIND_PUNCH_ACK: u8 = 7;
const KIND_RELAY: u8 = 8;
const KIND_RELAYED: u8 = 9;
const KIND_NOT_REGISTERED: u8 = 10;
/// The longest name (a node id is at most 255 bytes).
pub const MAX_NAME: usize = 255;
/// `NOT_REGISTERED` and `UNKNOWN_PEER` answers a rendezvous sends per second, overall.
pub const REPLY_RATE: f64 = 100.0;
/// Bytes a relay frame adds before the payload, for a name of `name_len` bytes.
pub const fn relay_overhead(name_len: usize) -> usize {
    3 + name_len
}

/// Timing and limits of a [`Nat`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Client: time between registrations (keeps the NAT binding to the rendezvous open), and
    /// between keepalive punches on a direct path in use. Default 15 s.
    pub keepalive: Duration,
    /// Client: how long punching may take before the path falls back to the relay. Default 3 s.
    pub punch_timeout: Duration,
    /// Client: time between punches, and between `CONNECT`s until the peer is introduced.
    /// Default 100 ms.
    pub punch_interval: Duration,
    /// Client: time between registrations while none has been answered. Default 1 s.
    pub register_retry: Duration,
    /// Client: a path on which nothing was heard for this long is forgotten. Default 60 s.
    pub path_idle: Duration,
    /// Server: a registration not renewed for this long expires. Default 60 s.
    pub registration_timeout: Duration,
    /// Client: peers behind NAT tracked (the least recently used idle one is evicted beyond
    /// it). Default 1024, above the reliability core's 256, so that a peer's id outlives its
    /// reliability state.
    pub max_peers: usize,
    /// Client: datagrams held per peer while its path is set up. Default 256.
    pub max_held_datagrams: usize,
    /// Client: bytes held over all peers while their paths are set up. Default 8 MiB.
    pub max_held_bytes: usize,
    /// Server: registrations kept. Default 4096.
    pub max_registrations: usize,
    /// Server: datagrams per second each registered client may relay (burst: the same number).
    /// Default 2000.
    pub relay_rate: u32,
    /// Server: the largest relayed payload. Default 65,507 minus the frame header.
    pub max_relay_payload: usize,
    /// Datagrams waiting in [`Nat::poll_transmit`]. Default 4096.
    pub max_queued_transmits: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(15),
            punch_timeout: Duration::from_secs(3),
            punch_interval: Duration::from_millis(100),
            register_retry: Duration::from_secs(1),
            path_idle: Duration::from_secs(60),
            registration_timeout: Duration::from_secs(60),
            max_peers: 1024,
            max_held_datagrams: 256,
            max_held_bytes: 8 << 20,
            max_registrations: 4096,
            relay_rate: 2000,
            max_relay_payload: 65_507 - relay_overhead(MAX_NAME),
            max_queued_transmits: 4096,
        }
    }
}

/// A peer behind NAT, as one client knows it: stable for the name while the client tracks it,
/// never reused for another name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// How the transport keys a peer in the reliability core: by its address, or, behind NAT, by
/// the id of its name (whatever path its datagrams take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A peer reached at this address.
    Addr(SocketAddr),
    /// A peer behind NAT, reached through a rendezvous.
    Nat(PeerId),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Addr(address) => write!(f, "{address}"),
            Peer::Nat(PeerId(id)) => write!(f, "nat peer #{id}"),
        }
    }
}

/// The path datagrams to a peer behind NAT take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Nothing known: the next datagram starts connecting.
    Idle,
    /// Asking the rendezvous and punching; datagrams are held.
    Connecting,
    /// Straight to this address.
    Direct(SocketAddr),
    /// Through the rendezvous.
    Relayed,
}

/// Why [`Nat::peer`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// Only a client reaches peers through a rendezvous.
    NotAClient,
    /// The name is empty or longer than [`MAX_NAME`].
    BadName,
    /// [`Config::max_peers`] peers are tracked and none can be evicted.
    PeerLimit,
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::NotAClient => write!(f, "this node is not a rendezvous client"),
            PeerError::BadName => write!(f, "the name must be 1 to {MAX_NAME} bytes"),
            PeerError::PeerLimit => write!(f, "too many peers behind NAT are being reached at once"),
        }
    }
}

impl std::error::Error for PeerError {}

/// Something to log, taken out with [`Nat::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The rendezvous answered a registration with this reflexive address (reported when it
    /// changes, including the first time).
    Registered {
        /// The client's address as the rendezvous sees it.
        reflexive: SocketAddr,
    },
    /// A punch got through: datagrams to the peer go straight to `address`.
    Direct {
        /// The peer.
        peer: PeerId,
        /// Its name.
        name: String,
        /// Where its punch came from.
        address: SocketAddr,
    },
    /// Punching failed (or the peer relays): datagrams go through the rendezvous.
    Relayed {
        /// The peer.
        peer: PeerId,
        /// Its name.
        name: String,
    },
    /// The rendezvous did not introduce the peer in time; `dropped` held datagrams were dropped.
    Unresolved {
        /// The peer.
        peer: PeerId,
        /// Its name.
        name: String,
        /// Datagrams dropped.
        dropped: usize,
    },
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams that did not parse, came from the wrong sender or are not for this role.
    pub malformed: u64,
    /// Punches and punch acks with an unknown name or a wrong token.
    pub bad_punches: u64,
    /// Client: registrations sent.
    pub registrations_sent: u64,
    /// Client: punches sent (keepalives included).
    pub punches_sent: u64,
    /// Client: paths that became direct.
    pub direct_paths: u64,
    /// Client: paths that became relayed.
    pub relayed_paths: u64,
    /// Client: datagrams sent in relay frames.
    pub relayed_out: u64,
    /// Client: datagrams received in relay frames.
    pub relayed_in: u64,
    /// Client: held datagrams dropped (hold full, or the peer unresolved or evicted).
    pub held_dropped: u64,
    /// Client: peers the rendezvous did not introduce in time.
    pub unresolved: u64,
    /// Client: `UNKNOWN_PEER` answers received.
    pub unknown_peer: u64,
    /// Server: registrations accepted (renewals included).
    pub registrations: u64,
    /// Server: datagrams forwarded between clients.
    pub relayed: u64,
    /// Server: requests dropped (from an unregistered address, to an unknown name, over the
    /// rate, too large, registrations full).
    pub refused: u64,
    /// Datagrams dropped because [`Config::max_queued_transmits`] were waiting.
    pub queue_full: u64,
}

#[derive(Debug)]
enum Path {
    Idle,
    Connecting {
        deadline: Instant,
        next_try: Instant,
        tries: u32,
        /// Token and reflexive address from the rendezvous's introduction.
        introduced: Option<(u64, SocketAddr)>,
    },
    Direct {
        address: SocketAddr,
        token: u64,
    },
    Relayed {
        /// The introduction's token, if there was one (punches with it still upgrade the path).
        token: Option<u64>,
    },
}

#[derive(Debug)]
struct NatPeer {
    name: Box<[u8]>,
    path: Path,
    held: VecDeque<Vec<u8>>,
    last_heard: Instant,
    last_used: Instant,
    last_sent: Instant,
}

impl NatPeer {
    fn kind(&self) -> PathKind {
        match self.path {
            Path::Idle => PathKind::Idle,
            Path::Connecting { .. } => PathKind::Connecting,
            Path::Direct { address, .. } => PathKind::Direct(address),
            Path::Relayed { .. } => PathKind::Relayed,
        }
    }

    fn token(&self) -> Option<u64> {
        match self.path {
            Path::Connecting { introduced, .. } => introduced.map(|(token, _)| token),
            Path::Direct { token, .. } => Some(token),
            Path::Relayed { token, .. } => token,
            Path::Idle => None,
        }
    }
}

#[derive(Debug)]
struct Client {
    rendezvous: SocketAddr,
    name: Box<[u8]>,
    reflexive: Option<SocketAddr>,
    /// Answered since the last `NOT_REGISTERED`.
    registered: bool,
    next_register: Instant,
    peers: HashMap<PeerId, NatPeer>,
    by_name: HashMap<Box<[u8]>, PeerId>,
    /// Direct paths: the address a peer's datagrams come from.
    by_address: HashMap<SocketAddr, PeerId>,
    next_id: u64,
    held_bytes: usize,
    next_sweep: Instant,
}

#[derive(Debug)]
struct Registration {
    address: SocketAddr,
    last_seen: Instant,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug)]
struct Server {
    registrations: HashMap<Box<[u8]>, Registration>,
    by_address: HashMap<SocketAddr, Box<[u8]>>,
    token_key: RandomState,
    reply_tokens: f64,
    reply_refilled: Instant,
    next_sweep: Instant,
}

#[derive(Debug)]
enum Role {
    Client(Client),
    Server(Server),
}

/// The NAT traversal state machine of one socket: a client or a rendezvous server.
#[derive(Debug)]
pub struct Nat {
    config: Config,
    role: Role,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<Event>,
    stats: Stats,
}

/// A parsed datagram.
#[derive(Debug, PartialEq, Eq)]
enum Message<'a> {
    Register { name: &'a [u8] },
    Registered { address: SocketAddr },
    Connect { name: &'a [u8] },
    PeerInfo { token: u64, address: SocketAddr, name: &'a [u8] },
    UnknownPeer { name: &'a [u8] },
    Punch { ack: bool, token: u64, name: &'a [u8] },
    Relay { name: &'a [u8], payload: &'a [u8] },
    Relayed { name: &'a [u8], payload: &'a [u8] },
    NotRegistered,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u64(&mut self) -> Option<u64> {
        let bytes: [u8; 8] = self.take(8)?.try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    }

    fn name(&mut self) -> Option<&'a [u8]> {
        let length = self.u8()? as usize;
        if length == 0 {
            return None;
        }
        self.take(length)
    }

    fn address(&mut self) -> Option<SocketAddr> {
        let (address, rest) = comms_plugin_api::socket_address::decode_binary(self.0).ok()?;
        self.0 = rest;
        Some(address)
    }

    /// The rest, at least one byte.
    fn payload(&mut self) -> Option<&'a [u8]> {
        let rest = std::mem::take(&mut self.0);
        (!rest.is_empty()).then_some(rest)
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

fn parse(datagram: &[u8]) -> Option<Message<'_>> {
    let mut reader = Reader(datagram);
    if reader.u8()? != MAGIC {
        return None;
    }
    let message = match reader.u8()? {
        KIND_REGISTER => Message::Register { name: reader.name()? },
        KIND_REGISTERED => Message::Registered { address: reader.address()? },
        KIND_CONNECT => Message::Connect { name: reader.name()? },
        KIND_PEER => {
            Message::PeerInfo { token: reader.u64()?, address: reader.address()?, name: reader.name()? }
        }
        KIND_UNKNOWN_PEER => Message::UnknownPeer { name: reader.name()? },
        kind @ (KIND_PUNCH | KIND_PUNCH_ACK) => {
            Message::Punch { ack: kind == KIND_PUNCH_ACK, token: reader.u64()?, name: reader.name()? }
        }
        KIND_RELAY => Message::Relay { name: reader.name()?, payload: reader.payload()? },
        KIND_RELAYED => Message::Relayed { name: reader.name()?, payload: reader.payload()? },
        KIND_NOT_REGISTERED => Message::NotRegistered,
        _ => return None,
    };
    reader.end()?;
    Some(message)
}

fn push_name(out: &mut Vec<u8>, name: &[u8]) {
    // Names are checked to be 1..=255 bytes where they enter.
    out.push(name.len().min(MAX_NAME) as u8);
    out.extend_from_slice(&name[..name.len().min(MAX_NAME)]);
}

fn encode(message: &Message<'_>) -> Vec<u8> {
    let mut out = vec![MAGIC];
    match message {
        Message::Register { name } => {
            out.push(KIND_REGISTER);
            push_name(&mut out, name);
        }
        Message::Registered { address } => {
            out.push(KIND_REGISTERED);
            comms_plugin_api::socket_address::encode_binary(&mut out, *address);
        }
        Message::Connect { name } => {
            out.push(KIND_CONNECT);
            push_name(&mut out, name);
        }
        Message::PeerInfo { token, address, name } => {
            out.push(KIND_PEER);
            out.extend_from_slice(&token.to_be_bytes());
            comms_plugin_api::socket_address::encode_binary(&mut out, *address);
            push_name(&mut out, name);
        }
        Message::UnknownPeer { name } => {
            out.push(KIND_UNKNOWN_PEER);
            push_name(&mut out, name);
        }
        Message::Punch { ack, token, name } => {
            out.push(if *ack { KIND_PUNCH_ACK } else { KIND_PUNCH });
            out.extend_from_slice(&token.to_be_bytes());
            push_name(&mut out, name);
        }
        Message::Relay { name, payload } => {
            out.push(KIND_RELAY);
            push_name(&mut out, name);
            out.extend_from_slice(payload);
        }
        Message::Relayed { name, payload } => {
            out.push(KIND_RELAYED);
            push_name(&mut out, name);
            out.extend_from_slice(payload);
        }
        Message::NotRegistered => out.push(KIND_NOT_REGISTERED),
    }
    out
}

fn valid_name(name: &[u8]) -> bool {
    (1..=MAX_NAME).contains(&name.len())
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Splits `name@host:port` into the name and the rendezvous part (at the last `@`); `None`
/// for an address without `@` or with an empty side.
pub fn split_address(address: &str) -> Option<(&str, &str)> {
    let (name, rendezvous) = address.rsplit_once('@')?;
    (!name.is_empty() && !rendezvous.is_empty()).then_some((name, rendezvous))
}

impl Nat {
    /// A client registering as `name` (1..=255 bytes) with the rendezvous at `rendezvous`; its
    /// first registration goes out at once.
    pub fn client(
        config: Config,
        rendezvous: SocketAddr,
        name: &[u8],
        now: Instant,
    ) -> Result<Self, PeerError> {
        if !valid_name(name) {
            return Err(PeerError::BadName);
        }
        let sweep = config.keepalive / 3;
        Ok(Self {
            role: Role::Client(Client {
                rendezvous,
                name: name.into(),
                reflexive: None,
                registered: false,
                next_register: now,
                peers: HashMap::new(),
                by_name: HashMap::new(),
                by_address: HashMap::new(),
                next_id: 1,
                held_bytes: 0,
                next_sweep: now + sweep,
            }),
            config,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    /// A rendezvous server. The key of its punch tokens is random (std's `RandomState`).
    pub fn server(config: Config, now: Instant) -> Self {
        let sweep = config.registration_timeout / 4;
        Self {
            role: Role::Server(Server {
                registrations: HashMap::new(),
                by_address: HashMap::new(),
                token_key: RandomState::new(),
                reply_tokens: REPLY_RATE,
                reply_refilled: now,
                next_sweep: now + sweep,
            }),
            config,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Client: the rendezvous it registers with.
    pub fn rendezvous(&self) -> Option<SocketAddr> {
        match &self.role {
            Role::Client(client) => Some(client.rendezvous),
            Role::Server(_) => None,
        }
    }

    /// Client: its reflexive address, once the rendezvous told it.
    pub fn reflexive(&self) -> Option<SocketAddr> {
        match &self.role {
            Role::Client(client) => client.reflexive,
            Role::Server(_) => None,
        }
    }

    /// Server: where the client registered as `name` is (its reflexive address).
    pub fn registered(&self, name: &[u8]) -> Option<SocketAddr> {
        match &self.role {
            Role::Server(server) => server.registrations.get(name).map(|registration| registration.address),
            Role::Client(_) => None,
        }
    }

    /// Server: registrations kept.
    pub fn registration_count(&self) -> usize {
        match &self.role {
            Role::Server(server) => server.registrations.len(),
            Role::Client(_) => 0,
        }
    }

    /// Client: the path to `peer` now, `None` for an unknown id.
    pub fn path(&self, peer: PeerId) -> Option<PathKind> {
        match &self.role {
            Role::Client(client) => client.peers.get(&peer).map(NatPeer::kind),
            Role::Server(_) => None,
        }
    }

    /// Client: the name of `peer`.
    pub fn name(&self, peer: PeerId) -> Option<String> {
        match &self.role {
            Role::Client(client) => client.peers.get(&peer).map(|state| lossy(&state.name)),
            Role::Server(_) => None,
        }
    }

    /// Client: datagrams held over all peers, in bytes.
    pub fn held_bytes(&self) -> usize {
        match &self.role {
            Role::Client(client) => client.held_bytes,
            Role::Server(_) => 0,
        }
    }

    /// Client: the id of the peer registered as `name` with this client's rendezvous, tracking
    /// it if it is new (evicting the least recently used idle peer beyond
    /// [`Config::max_peers`]).
    pub fn peer(&mut self, now: Instant, name: &[u8]) -> Result<PeerId, PeerError> {
        let Role::Client(client) = &mut self.role else { return Err(PeerError::NotAClient) };
        if !valid_name(name) {
            return Err(PeerError::BadName);
        }
        if let Some(id) = client.by_name.get(name) {
            return Ok(*id);
        }
        if client.peers.len() >= self.config.max_peers {
            let victim = client
                .peers
                .iter()
                .filter(|(_, peer)| peer.held.is_empty() && !matches!(peer.path, Path::Connecting { .. }))
                .min_by_key(|(_, peer)| peer.last_used.max(peer.last_heard))
                .map(|(id, _)| *id)
                .ok_or(PeerError::PeerLimit)?;
            if let Some(gone) = client.peers.remove(&victim) {
                client.by_name.remove(&gone.name);
                client.by_address.retain(|_, id| *id != victim);
            }
        }
        let id = PeerId(client.next_id);
        client.next_id += 1;
        client.peers.insert(
            id,
            NatPeer {
                name: name.into(),
                path: Path::Idle,
                held: VecDeque::new(),
                last_heard: now,
                last_used: now,
                last_sent: now,
            },
        );
        client.by_name.insert(name.into(), id);
        Ok(id)
    }

    /// How the reliability core should key a datagram from `from` that is not a NAT traversal
    /// datagram: the peer whose direct path it is, else the address.
    pub fn classify(&mut self, now: Instant, from: SocketAddr) -> Peer {
        let Role::Client(client) = &mut self.role else { return Peer::Addr(from) };
        let Some(id) = client.by_address.get(&from).copied() else { return Peer::Addr(from) };
        let Some(peer) = client.peers.get_mut(&id) else { return Peer::Addr(from) };
        peer.last_heard = now;
        peer.last_used = now;
        // Data straight from the introduced address: the peer has a direct path to us, so its
        // NAT lets our datagrams to that address in too (the punch that told it may have been
        // lost on its way back).
        if !matches!(peer.path, Path::Direct { .. }) {
            if let Some(token) = peer.token() {
                peer.path = Path::Direct { address: from, token };
                self.stats.direct_paths += 1;
                self.events.push_back(Event::Direct { peer: id, name: lossy(&peer.name), address: from });
                self.flush(now, id);
            }
        }
        Peer::Nat(id)
    }

    /// Client: sends `datagram` (a reliability datagram) to `peer` on its path, holding it while
    /// the path is set up (and starting that if there is no path). Dropped (and counted) for an
    /// unknown id or when the hold is full.
    pub fn send(&mut self, now: Instant, peer: PeerId, datagram: Vec<u8>) {
        let config = &self.config;
        let Role::Client(client) = &mut self.role else {
            self.stats.malformed += 1;
            return;
        };
        let Some(state) = client.peers.get_mut(&peer) else {
            self.stats.held_dropped += 1;
            return;
        };
        state.last_used = now;
        match state.path {
            Path::Direct { address, .. } => {
                state.last_sent = now;
                push(&mut self.transmits, &mut self.stats, config, address, datagram);
            }
            Path::Relayed { .. } => {
                state.last_sent = now;
                self.stats.relayed_out += 1;
                let frame = encode(&Message::Relay { name: &state.name, payload: &datagram });
                push(&mut self.transmits, &mut self.stats, config, client.rendezvous, frame);
            }
            Path::Idle | Path::Connecting { .. } => {
                if matches!(state.path, Path::Idle) {
                    // The first try (a CONNECT) goes out at the next `handle_timeout`, now.
                    state.path = Path::Connecting {
                        deadline: now + config.punch_timeout,
                        next_try: now,
                        tries: 0,
                        introduced: None,
                    };
                }
                if state.held.len() >= config.max_held_datagrams
                    || client.held_bytes + datagram.len() > config.max_held_bytes
                {
                    self.stats.held_dropped += 1;
                    return;
                }
                client.held_bytes += datagram.len();
                state.held.push_back(datagram);
            }
        }
    }

    /// Takes a datagram starting with [`MAGIC`] from `from`. Returns the reliability datagram
    /// inside a relay frame, with the peer that sent it, for the reliability core.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &'a [u8],
    ) -> Option<(PeerId, &'a [u8])> {
        let Some(message) = parse(datagram) else {
            self.stats.malformed += 1;
            return None;
        };
        match &mut self.role {
            Role::Server(_) => {
                self.server_receive(now, from, message);
                None
            }
            Role::Client(_) => self.client_receive(now, from, message),
        }
    }

    fn server_receive(&mut self, now: Instant, from: SocketAddr, message: Message<'_>) {
        let config = &self.config;
        let Role::Server(server) = &mut self.role else { return };
        match message {
            Message::Register { name } => {
                let known = server.registrations.contains_key(name);
                if !known && server.registrations.len() >= config.max_registrations {
                    server.expire(now, config.registration_timeout);
                    if server.registrations.len() >= config.max_registrations {
                        self.stats.refused += 1;
                        return;
                    }
                }
                // One name per address: a client that renamed itself drops its old name.
                if let Some(old) = server.by_address.get(&from) {
                    if **old != *name {
                        let old = old.clone();
                        server.registrations.remove(&old);
                    }
                }
                match server.registrations.get_mut(name) {
                    Some(registration) => {
                        if registration.address != from {
                            server.by_address.remove(&registration.address);
                            registration.address = from;
                        }
                        registration.last_seen = now;
                    }
                    None => {
                        server.registrations.insert(
                            name.into(),
                            Registration {
                                address: from,
                                last_seen: now,
                                tokens: config.relay_rate as f64,
                                refilled: now,
                            },
                        );
                    }
                }
                server.by_address.insert(from, name.into());
                self.stats.registrations += 1;
                push(
                    &mut self.transmits,
                    &mut self.stats,
                    config,
                    from,
                    encode(&Message::Registered { address: from }),
                );
            }
            Message::Connect { name: target } => {
                let Some(sender) = server.sender(now, from) else {
                    self.stats.refused += 1;
                    self.reply(now, from, &Message::NotRegistered);
                    return;
                };
                let Some(registration) = server.registrations.get(target) else {
                    self.stats.refused += 1;
                    self.reply(now, from, &Message::UnknownPeer { name: target });
                    return;
                };
                let to = registration.address;
                let token = server.token(&sender, from, target, to);
                let to_sender = encode(&Message::PeerInfo { token, address: to, name: target });
                let to_target = encode(&Message::PeerInfo { token, address: from, name: &sender });
                push(&mut self.transmits, &mut self.stats, config, from, to_sender);
                push(&mut self.transmits, &mut self.stats, config, to, to_target);
            }
            Message::Relay { name: target, payload } => {
                let Some(sender) = server.sender(now, from) else {
                    self.stats.refused += 1;
                    self.reply(now, from, &Message::NotRegistered);
                    return;
                };
                let Some(to) = server.registrations.get(target).map(|registration| registration.address)
                else {
                    self.stats.refused += 1;
                    self.reply(now, from, &Message::UnknownPeer { name: target });
                    return;
                };
                let rate = config.relay_rate as f64;
                let allowed = payload.len() <= config.max_relay_payload
                    && server.registrations.get_mut(&sender).is_some_and(|registration| {
                        take_token(&mut registration.tokens, &mut registration.refilled, now, rate)
                    });
                if !allowed {
                    self.stats.refused += 1;
                    return;
                }
                self.stats.relayed += 1;
                let frame = encode(&Message::Relayed { name: &sender, payload });
                push(&mut self.transmits, &mut self.stats, config, to, frame);
            }
            _ => self.stats.malformed += 1,
        }
    }

    /// A rate-limited answer of the rendezvous to a request it refuses.
    fn reply(&mut self, now: Instant, to: SocketAddr, message: &Message<'_>) {
        let Role::Server(server) = &mut self.role else { return };
        if take_token(&mut server.reply_tokens, &mut server.reply_refilled, now, REPLY_RATE) {
            push(&mut self.transmits, &mut self.stats, &self.config, to, encode(message));
        }
    }

    fn client_receive<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        message: Message<'a>,
    ) -> Option<(PeerId, &'a [u8])> {
        let Role::Client(client) = &mut self.role else { return None };
        let from_rendezvous = from == client.rendezvous;
        match message {
            Message::Registered { address } if from_rendezvous => {
                client.registered = true;
                client.next_register = now + self.config.keepalive;
                // Peers waiting for a CONNECT that could not go out unregistered: now.
                for peer in client.peers.values_mut() {
                    if let Path::Connecting { next_try, introduced: None, .. } = &mut peer.path {
                        *next_try = now;
                    }
                }
                if client.reflexive != Some(address) {
                    client.reflexive = Some(address);
                    self.events.push_back(Event::Registered { reflexive: address });
                }
                None
            }
            Message::NotRegistered if from_rendezvous => {
                // The rendezvous restarted or forgot us: register again at once.
                client.registered = false;
                client.next_register = now;
                None
            }
            Message::UnknownPeer { .. } if from_rendezvous => {
                self.stats.unknown_peer += 1;
                None
            }
            Message::PeerInfo { token, address, name } if from_rendezvous => {
                let id = match self.peer(now, name) {
                    Ok(id) => id,
                    Err(_) => {
                        self.stats.refused += 1;
                        return None;
                    }
                };
                let Role::Client(client) = &mut self.role else { return None };
                let state = client.peers.get_mut(&id)?;
                let same = state.token() == Some(token);
                match &mut state.path {
                    Path::Connecting { introduced, next_try, .. } => {
                        *introduced = Some((token, address));
                        *next_try = now;
                        client.by_address.insert(address, id);
                    }
                    Path::Direct { .. } | Path::Relayed { .. } if same => {}
                    _ => {
                        // Introduced afresh (the peer connects to us, or it moved): punch.
                        client.by_address.retain(|_, known| *known != id);
                        client.by_address.insert(address, id);
                        state.path = Path::Connecting {
                            deadline: now + self.config.punch_timeout,
                            next_try: now,
                            tries: 0,
                            introduced: Some((token, address)),
                        };
                    }
                }
                self.handle_timeout(now);
                None
            }
            Message::Punch { ack, token, name } => {
                let me = client.name.clone();
                let Some(id) = client.by_name.get(name).copied() else {
                    self.stats.bad_punches += 1;
                    return None;
                };
                let state = client.peers.get_mut(&id)?;
                if state.token() != Some(token) {
                    self.stats.bad_punches += 1;
                    return None;
                }
                state.last_heard = now;
                if !ack {
                    let answer = encode(&Message::Punch { ack: true, token, name: &me });
                    push(&mut self.transmits, &mut self.stats, &self.config, from, answer);
                }
                if matches!(state.path, Path::Direct { address, .. } if address == from) {
                    return None;
                }
                client.by_address.retain(|_, known| *known != id);
                state.path = Path::Direct { address: from, token };
                client.by_address.insert(from, id);
                self.stats.direct_paths += 1;
                self.events.push_back(Event::Direct { peer: id, name: lossy(&state.name), address: from });
                self.flush(now, id);
                None
            }
            Message::Relayed { name, payload } if from_rendezvous => {
                let id = match self.peer(now, name) {
                    Ok(id) => id,
                    Err(_) => {
                        self.stats.refused += 1;
                        return None;
                    }
                };
                let Role::Client(client) = &mut self.role else { return None };
                let state = client.peers.get_mut(&id)?;
                state.last_heard = now;
                state.last_used = now;
                self.stats.relayed_in += 1;
                // The peer relays: so do we, unless we have a direct path already.
                if matches!(state.path, Path::Idle | Path::Connecting { .. }) {
                    let token = state.token();
                    state.path = Path::Relayed { token };
                    self.stats.relayed_paths += 1;
                    self.events.push_back(Event::Relayed { peer: id, name: lossy(&state.name) });
                    self.flush(now, id);
                }
                Some((id, payload))
            }
            _ => {
                self.stats.malformed += 1;
                None
            }
        }
    }

    /// Sends what is held for `peer` on its (new) path.
    fn flush(&mut self, now: Instant, peer: PeerId) {
        let Role::Client(client) = &mut self.role else { return };
        let Some(state) = client.peers.get_mut(&peer) else { return };
        let held: Vec<Vec<u8>> = state.held.drain(..).collect();
        client.held_bytes -= held.iter().map(Vec::len).sum::<usize>();
        for datagram in held {
            self.send(now, peer, datagram);
        }
    }

    /// Takes the next datagram to write: `(to, bytes)`.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// Takes the next event to log.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Nat::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.role {
            Role::Server(server) => Some(server.next_sweep),
            Role::Client(client) => {
                let mut next = client.next_register.min(client.next_sweep);
                for peer in client.peers.values() {
                    if let Path::Connecting { deadline, next_try, .. } = peer.path {
                        next = next.min(deadline).min(next_try);
                    }
                }
                Some(next)
            }
        }
    }

    /// Fires the timers that are due at `now`: registrations, connect retries, punches, the
    /// fallback to the relay, keepalives, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        let config = self.config.clone();
        match &mut self.role {
            Role::Server(server) => {
                if now >= server.next_sweep {
                    server.expire(now, config.registration_timeout);
                    server.next_sweep = now + config.registration_timeout / 4;
                }
            }
            Role::Client(client) => {
                if now >= client.next_register {
                    self.stats.registrations_sent += 1;
                    let register = encode(&Message::Register { name: &client.name });
                    push(&mut self.transmits, &mut self.stats, &config, client.rendezvous, register);
                    client.next_register =
                        now + if client.registered { config.keepalive } else { config.register_retry };
                }
                let mut flushes = Vec::new();
                let mut unresolved = Vec::new();
                for (id, peer) in client.peers.iter_mut() {
                    let Path::Connecting { deadline, next_try, tries, introduced } = &mut peer.path else {
                        continue;
                    };
                    if now >= *deadline {
                        match *introduced {
                            Some((token, _)) => {
                                peer.path = Path::Relayed { token: Some(token) };
                                self.stats.relayed_paths += 1;
                                self.events.push_back(Event::Relayed { peer: *id, name: lossy(&peer.name) });
                                flushes.push(*id);
                            }
                            None => {
                                peer.path = Path::Idle;
                                client.by_address.retain(|_, known| *known != *id);
                                let dropped = peer.held.len();
                                client.held_bytes -=
                                    peer.held.drain(..).map(|held| held.len()).sum::<usize>();
                                self.stats.held_dropped += dropped as u64;
                                self.stats.unresolved += 1;
                                unresolved.push(Event::Unresolved {
                                    peer: *id,
                                    name: lossy(&peer.name),
                                    dropped,
                                });
                            }
                        }
                        continue;
                    }
                    if now < *next_try {
                        continue;
                    }
                    // A CONNECT every try until introduced, then every 4th (an introduction
                    // may have been lost on the other side); a punch every try once introduced.
                    if client.registered && (introduced.is_none() || *tries % 4 == 0) {
                        let connect = encode(&Message::Connect { name: &peer.name });
                        push(&mut self.transmits, &mut self.stats, &config, client.rendezvous, connect);
                    }
                    if let Some((token, address)) = *introduced {
                        self.stats.punches_sent += 1;
                        let punch = encode(&Message::Punch { ack: false, token, name: &client.name });
                        push(&mut self.transmits, &mut self.stats, &config, address, punch);
                    }
                    *tries += 1;
                    *next_try = now + config.punch_interval;
                }
                self.events.extend(unresolved);
                if now >= client.next_sweep {
                    client.next_sweep = now + config.keepalive / 3;
                    let mut forgotten = Vec::new();
                    for (&id, peer) in client.peers.iter_mut() {
                        let silent = now.saturating_duration_since(peer.last_heard) >= config.path_idle;
                        match peer.path {
                            Path::Direct { .. } | Path::Relayed { .. } if silent => {
                                forgotten.push(id);
                                peer.path = Path::Idle;
                            }
                            Path::Direct { address, token } => {
                                let in_use = now.saturating_duration_since(peer.last_used) < config.path_idle;
                                if in_use && now.saturating_duration_since(peer.last_sent) >= config.keepalive
                                {
                                    peer.last_sent = now;
                                    self.stats.punches_sent += 1;
                                    let punch =
                                        encode(&Message::Punch { ack: false, token, name: &client.name });
                                    push(&mut self.transmits, &mut self.stats, &config, address, punch);
                                }
                            }
                            _ => {}
                        }
                    }
                    client.by_address.retain(|_, known| !forgotten.contains(known));
                }
                for id in flushes {
                    self.flush(now, id);
                }
            }
        }
    }
}

impl Server {
    /// The name registered from `from`, renewing it.
    fn sender(&mut self, now: Instant, from: SocketAddr) -> Option<Box<[u8]>> {
        let name = self.by_address.get(&from)?.clone();
        if let Some(registration) = self.registrations.get_mut(&name) {
            registration.last_seen = now;
        }
        Some(name)
    }

    fn token(&self, a: &[u8], a_address: SocketAddr, b: &[u8], b_address: SocketAddr) -> u64 {
        // The same for both orders: both sides of one introduction get one token.
        if (a, a_address) <= (b, b_address) {
            self.token_key.hash_one((a, a_address, b, b_address))
        } else {
            self.token_key.hash_one((b, b_address, a, a_address))
        }
    }

    fn expire(&mut self, now: Instant, timeout: Duration) {
        let by_address = &mut self.by_address;
        self.registrations.retain(|_, registration| {
            let keep = now.saturating_duration_since(registration.last_seen) < timeout;
            if !keep {
                by_address.remove(&registration.address);
            }
            keep
        });
    }
}

/// A token bucket holding up to `rate` tokens, refilled at `rate` per second.
fn take_token(tokens: &mut f64, refilled: &mut Instant, now: Instant, rate: f64) -> bool {
    let elapsed = now.saturating_duration_since(*refilled).as_secs_f64();
    *tokens = (*tokens + elapsed * rate).min(rate);
    *refilled = now.max(*refilled);
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

fn push(
    transmits: &mut VecDeque<(SocketAddr, Vec<u8>)>,
    stats: &mut Stats,
    config: &Config,
    to: SocketAddr,
    datagram: Vec<u8>,
) {
    if transmits.len() >= config.max_queued_transmits {
        stats.queue_full += 1;
        return;
    }
    transmits.push_back((to, datagram));
}

#[cfg(test)]
mod tests;

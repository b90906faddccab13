//! NAT traversal for the TCP transport, as sans-IO state machines: the rendezvous
//! ([`Server`]) and a node behind NAT ([`Client`]).
//!
//! Like the UDP transport's `nat.rs`, nothing here owns a socket or reads a clock: the caller
//! (`rendezvous.rs`) hands in the messages read from connections and the current
//! [`Instant`], and takes out messages to write ([`Server::poll_transmit`],
//! [`Client::poll_transmit`]), what to do with a connection ([`Disposition`],
//! [`Server::poll_close`]), events ([`Client::poll_event`]) and the next instant to be woken at
//! (`poll_timeout`, then `handle_timeout`).
//!
//! ## Connections
//!
//! Every NAT traversal connection starts with the four bytes [`MAGIC`], which no comms
//! connection can start with (a comms connection starts with the `u32` big-endian length of a
//! HELLO or NOISE frame, at most 65,545 bytes, so its first byte is 0). A listener that peeks a
//! first byte other than 0 hands the connection to this module. After the magic come messages,
//! each `u16` big-endian body length then the body (at most [`MAX_BODY`] bytes). The first
//! message says what the connection is:
//!
//! - `REGISTER`: a **signalling** connection from a node behind NAT to its rendezvous, opened
//!   from the node's listen port, kept open and renewed every [`Config::keepalive`]; the
//!   rendezvous answers with the node's reflexive (public) address;
//! - `REGISTER_DIAL`: a second kept-open connection from the node's **dial port** (a port of
//!   its own, not the listen port), whose reflexive address the rendezvous gives to the targets
//!   of the node's dials. A node punches its outgoing connections from its dial port to the
//!   target's listen port, so that the connections each way between two nodes have different
//!   address pairs (the same pair twice is impossible in TCP);
//! - `PUNCH`: a connection punched between two nodes (TCP simultaneous open, or one side's SYN
//!   reaching the other's listener); both sides send it first and check the other's;
//! - `RELAY_DIAL` / `RELAY_ACCEPT`: the two halves of a relayed connection, which the
//!   rendezvous splices together once both arrived (it answers `RELAY_READY` to the dialler).
//!
//! ## Message bodies (version 1)
//!
//! Integers are big-endian. `name` is `u8 length` (1..=255) then the bytes; `address` is `u8
//! family` (4 or 6), the 4 or 16 bytes of the IP, `u16 port`; `role` is 1 (dialler) or 2
//! (target).
//!
//! ```text
//! u8 kind
//!  1 REGISTER       node -> rendezvous   name (the node's)
//!  2 REGISTERED     rendezvous -> node   address (the node's reflexive address)
//!  3 CONNECT        node -> rendezvous   name (the peer wanted)
//!  4 INTRODUCE      rendezvous -> node   u64 token, role (the receiver's), address (the peer's reflexive), name (the peer's)
//!  5 UNKNOWN_PEER   rendezvous -> node   name (not registered)
//!  6 RELAY_REQUEST  rendezvous -> target u64 token: open a RELAY_ACCEPT connection
//!  7 PUNCH          node -> node         u64 token, role (the sender's)
//!  8 RELAY_DIAL     dialler -> rendezvous u64 token
//!  9 RELAY_ACCEPT   target -> rendezvous  u64 token
//! 10 RELAY_READY    rendezvous -> dialler nothing: the relay is spliced
//! 11 REFUSED        rendezvous -> node   nothing: over a limit, or not allowed
//! 12 REGISTER_DIAL  node -> rendezvous   name (the node's, registered): the dial port's mapping
//! ```
//!
//! A message that does not parse, has trailing bytes or is not expected where it arrives is
//! counted in `malformed` and its connection is closed; nothing panics, and every table is
//! bounded by [`Config`].
//!
//! ## Tokens
//!
//! The rendezvous makes a token per introduction (a keyed hash of a counter, with a random key
//! per start): unguessable by anyone who did not receive the introduction. A punched connection
//! is accepted only with the token of a punch in progress and the opposite role, and a relay
//! half only with the token of a live introduction, so a stranger can neither take over a punch
//! nor open relays.

use std::{
    collections::{hash_map::RandomState, HashMap, VecDeque},
    fmt,
    hash::BuildHasher,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// The first four bytes of every NAT traversal connection.
pub const MAGIC: [u8; 4] = [0xC7, b'N', b'A', b'T'];
/// The longest message body.
pub const MAX_BODY: usize = 512;
/// The longest name (a registered node name).
pub const MAX_NAME: usize = 255;

const KIND_REGISTER: u8 = 1;
const KIND_REGISTERED: u8 = 2;
const KIND_CONNECT: u8 = 3;
const KIND_INTRODUCE: u8 = 4;
const KIND_UNKNOWN_PEER: u8 = 5;
const KIND_RELAY_REQUEST: u8 = 6;
const KIND_PUNCH: u8 = 7;
const KIND_RELAY_DIAL: u8 = 8;
const KIND_RELAY_ACCEPT: u8 = 9;
const KIND_RELAY_READY: u8 = 10;
const KIND_REFUSED: u8 = 11;
const KIND_REGISTER_DIAL: u8 = 12;

/// Which end of a connection being set up a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The node that asked for the connection: it becomes that node's outgoing connection.
    Dialler,
    /// The node asked for: the connection is handed to its listener as an incoming one.
    Target,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Dialler => 1,
            Role::Target => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Role::Dialler),
            2 => Some(Role::Target),
            _ => None,
        }
    }

    /// The other end.
    pub fn opposite(self) -> Self {
        match self {
            Role::Dialler => Role::Target,
            Role::Target => Role::Dialler,
        }
    }
}

/// One message (a body, without its length prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Node -> rendezvous: register (or renew) under this name.
    Register {
        /// The node's name.
        name: Vec<u8>,
    },
    /// Rendezvous -> node: registered; the node's address as the rendezvous sees it.
    Registered {
        /// The reflexive address.
        address: SocketAddr,
    },
    /// Node -> rendezvous: introduce me to this name.
    Connect {
        /// The peer's name.
        name: Vec<u8>,
    },
    /// Rendezvous -> node: punch towards `address` with `token`, as `role`.
    Introduce {
        /// The introduction's token.
        token: u64,
        /// The receiver's role.
        role: Role,
        /// The peer's reflexive address.
        address: SocketAddr,
        /// The peer's name.
        name: Vec<u8>,
    },
    /// Rendezvous -> node: no node is registered under this name.
    UnknownPeer {
        /// The name asked for.
        name: Vec<u8>,
    },
    /// Rendezvous -> target: open the relay half of this introduction.
    RelayRequest {
        /// The introduction's token.
        token: u64,
    },
    /// Node -> node, first on a punched connection.
    Punch {
        /// The introduction's token.
        token: u64,
        /// The sender's role.
        role: Role,
    },
    /// Dialler -> rendezvous, first on a relay connection.
    RelayDial {
        /// The introduction's token.
        token: u64,
    },
    /// Target -> rendezvous, first on a relay connection.
    RelayAccept {
        /// The introduction's token.
        token: u64,
    },
    /// Rendezvous -> dialler: both halves are there, what follows is the peer's.
    RelayReady,
    /// Rendezvous -> node: refused (over a limit or not allowed).
    Refused,
    /// Node -> rendezvous, on a second connection from the node's dial port: the mapping of
    /// that port (answered `REGISTERED`). The node registered as `name` must be registered.
    RegisterDial {
        /// The node's name.
        name: Vec<u8>,
    },
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
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn name(&mut self) -> Option<Vec<u8>> {
        let length = usize::from(self.u8()?);
        if length == 0 {
            return None;
        }
        self.take(length).map(<[u8]>::to_vec)
    }

    fn role(&mut self) -> Option<Role> {
        Role::from_byte(self.u8()?)
    }

    fn address(&mut self) -> Option<SocketAddr> {
        let (address, rest) = comms_plugin_api::socket_address::decode_binary(self.0).ok()?;
        self.0 = rest;
        Some(address)
    }
}

/// Parses one message body; `None` for anything malformed (trailing bytes included).
pub fn parse(body: &[u8]) -> Option<Message> {
    let mut reader = Reader(body);
    let message = match reader.u8()? {
        KIND_REGISTER => Message::Register { name: reader.name()? },
        KIND_REGISTERED => Message::Registered { address: reader.address()? },
        KIND_CONNECT => Message::Connect { name: reader.name()? },
        KIND_INTRODUCE => Message::Introduce {
            token: reader.u64()?,
            role: reader.role()?,
            address: reader.address()?,
            name: reader.name()?,
        },
        KIND_UNKNOWN_PEER => Message::UnknownPeer { name: reader.name()? },
        KIND_RELAY_REQUEST => Message::RelayRequest { token: reader.u64()? },
        KIND_PUNCH => Message::Punch { token: reader.u64()?, role: reader.role()? },
        KIND_RELAY_DIAL => Message::RelayDial { token: reader.u64()? },
        KIND_RELAY_ACCEPT => Message::RelayAccept { token: reader.u64()? },
        KIND_RELAY_READY => Message::RelayReady,
        KIND_REFUSED => Message::Refused,
        KIND_REGISTER_DIAL => Message::RegisterDial { name: reader.name()? },
        _ => return None,
    };
    reader.0.is_empty().then_some(message)
}

fn push_name(out: &mut Vec<u8>, name: &[u8]) {
    // Names are checked to be 1..=255 bytes where they enter.
    let name = &name[..name.len().min(MAX_NAME)];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
}

fn push_address(out: &mut Vec<u8>, address: SocketAddr) {
    comms_plugin_api::socket_address::encode_binary(out, address);
}

/// The message as it goes on the wire: `u16` length, then the body.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    match message {
        Message::Register { name } => {
            body.push(KIND_REGISTER);
            push_name(&mut body, name);
        }
        Message::Registered { address } => {
            body.push(KIND_REGISTERED);
            push_address(&mut body, *address);
        }
        Message::Connect { name } => {
            body.push(KIND_CONNECT);
            push_name(&mut body, name);
        }
        Message::Introduce { token, role, address, name } => {
            body.push(KIND_INTRODUCE);
            body.extend_from_slice(&token.to_be_bytes());
            body.push(role.byte());
            push_address(&mut body, *address);
            push_name(&mut body, name);
        }
        Message::UnknownPeer { name } => {
            body.push(KIND_UNKNOWN_PEER);
            push_name(&mut body, name);
        }
        Message::RelayRequest { token } => {
            body.push(KIND_RELAY_REQUEST);
            body.extend_from_slice(&token.to_be_bytes());
        }
        Message::Punch { token, role } => {
            body.push(KIND_PUNCH);
            body.extend_from_slice(&token.to_be_bytes());
            body.push(role.byte());
        }
        Message::RelayDial { token } => {
            body.push(KIND_RELAY_DIAL);
            body.extend_from_slice(&token.to_be_bytes());
        }
        Message::RelayAccept { token } => {
            body.push(KIND_RELAY_ACCEPT);
            body.extend_from_slice(&token.to_be_bytes());
        }
        Message::RelayReady => body.push(KIND_RELAY_READY),
        Message::Refused => body.push(KIND_REFUSED),
        Message::RegisterDial { name } => {
            body.push(KIND_REGISTER_DIAL);
            push_name(&mut body, name);
        }
    }
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// [`MAGIC`] followed by the encoded `message`: the first bytes of a NAT traversal connection.
pub fn opening(message: &Message) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&encode(message));
    out
}

/// Whether `name` can be registered: 1 to [`MAX_NAME`] bytes.
pub fn valid_name(name: &[u8]) -> bool {
    (1..=MAX_NAME).contains(&name.len())
}

/// Splits `name@host:port` at the last `@`; `None` without one or with an empty side.
pub fn split_address(address: &str) -> Option<(&str, &str)> {
    let (name, rendezvous) = address.rsplit_once('@')?;
    (!name.is_empty() && !rendezvous.is_empty()).then_some((name, rendezvous))
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Timing and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Node: how long punching may take before the dialler relays. Default 3 s.
    pub punch_timeout: Duration,
    /// Node: time between registrations on the signalling connection (they keep its NAT
    /// mapping open). Default 25 s.
    pub keepalive: Duration,
    /// Node: how long a dial waits for the rendezvous's introduction, and how long a
    /// registration waits for its answer before it is sent again. Default 3 s.
    pub introduction_timeout: Duration,
    /// Rendezvous: how long a relay half waits for the other. Default 5 s.
    pub relay_wait: Duration,
    /// Rendezvous: an introduction's token opens a relay within this long. Default 30 s.
    pub introduction_lifetime: Duration,
    /// Rendezvous: names registered at once. Default 4096.
    pub max_registrations: usize,
    /// Rendezvous: live introductions, in all. Default 4096.
    pub max_introductions: usize,
    /// Rendezvous: live introductions one node asked for. Default 64.
    pub max_introductions_per_node: usize,
    /// Rendezvous: relays spliced or waiting for their second half, in all. Default 256.
    pub max_relays: usize,
    /// Rendezvous: relays one node is an end of. Default 16.
    pub max_relays_per_node: usize,
    /// Node: dials waiting for an introduction. Default 256.
    pub max_pending_dials: usize,
    /// Node: punches (and relay windows) in progress. Default 256.
    pub max_punches: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            punch_timeout: Duration::from_secs(3),
            keepalive: Duration::from_secs(25),
            introduction_timeout: Duration::from_secs(3),
            relay_wait: Duration::from_secs(5),
            introduction_lifetime: Duration::from_secs(30),
            max_registrations: 4096,
            max_introductions: 4096,
            max_introductions_per_node: 64,
            max_relays: 256,
            max_relays_per_node: 16,
            max_pending_dials: 256,
            max_punches: 256,
        }
    }
}

/// Identifies one connection of the rendezvous (the I/O layer numbers them).
pub type ConnId = u64;

/// What the rendezvous's I/O does with the connection a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A signalling connection: go on reading it.
    Keep,
    /// The dialler's relay half: stop reading and hold it until spliced or closed.
    Hold,
    /// The target's relay half: write `RELAY_READY` to the held connection `dial`, then copy
    /// between the two until either ends (then call [`Server::relay_ended`] with `token`).
    Splice {
        /// The held dialler half.
        dial: ConnId,
        /// The introduction.
        token: u64,
    },
    /// Close it (malformed, refused or not expected).
    Close,
}

/// Rendezvous counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Registrations accepted (renewals included).
    pub registrations: u64,
    /// Introductions made.
    pub introductions: u64,
    /// Relays spliced.
    pub relays: u64,
    /// Requests refused: over a limit, unknown token, unknown name.
    pub refused: u64,
    /// Messages that did not parse or were not expected.
    pub malformed: u64,
}

#[derive(Debug)]
struct Registration {
    conn: ConnId,
    address: SocketAddr,
    /// The dial port's connection and reflexive address, once registered.
    dial: Option<(ConnId, SocketAddr)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relay {
    None,
    Waiting { dial: ConnId, deadline: Instant },
    Active,
}

#[derive(Debug)]
struct Introduction {
    dialler: Box<[u8]>,
    target: Box<[u8]>,
    expires: Instant,
    relay: Relay,
}

/// The rendezvous: registrations, introductions and relays.
#[derive(Debug)]
pub struct Server {
    config: Config,
    registrations: HashMap<Box<[u8]>, Registration>,
    by_conn: HashMap<ConnId, Box<[u8]>>,
    /// Dial port connections: the name they belong to.
    dial_conns: HashMap<ConnId, Box<[u8]>>,
    introductions: HashMap<u64, Introduction>,
    /// Relays waiting or spliced that each node is an end of.
    relays_of: HashMap<Box<[u8]>, usize>,
    relays: usize,
    token_key: RandomState,
    token_counter: u64,
    transmits: VecDeque<(ConnId, Vec<u8>)>,
    closes: VecDeque<ConnId>,
    stats: ServerStats,
}

impl Server {
    /// A rendezvous with a random token key.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            registrations: HashMap::new(),
            by_conn: HashMap::new(),
            dial_conns: HashMap::new(),
            introductions: HashMap::new(),
            relays_of: HashMap::new(),
            relays: 0,
            token_key: RandomState::new(),
            token_counter: 0,
            transmits: VecDeque::new(),
            closes: VecDeque::new(),
            stats: ServerStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Where the node registered as `name` is (its reflexive address).
    pub fn registered(&self, name: &[u8]) -> Option<SocketAddr> {
        self.registrations.get(name).map(|registration| registration.address)
    }

    /// Relays spliced or waiting for their second half.
    pub fn relay_count(&self) -> usize {
        self.relays
    }

    /// A message to write: the connection and the encoded message.
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// A connection to close: a held relay half whose other half did not come in time, or a
    /// signalling connection whose name was registered again from elsewhere.
    pub fn poll_close(&mut self) -> Option<ConnId> {
        self.closes.pop_front()
    }

    /// The next instant [`Server::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.introductions
            .values()
            .filter_map(|introduction| match introduction.relay {
                Relay::Waiting { deadline, .. } => Some(deadline.min(introduction.expires)),
                Relay::None => Some(introduction.expires),
                // Lasts as long as its connections.
                Relay::Active => None,
            })
            .min()
    }

    /// Expires introductions and relay halves that waited too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (&token, introduction) in &self.introductions {
            match introduction.relay {
                Relay::Waiting { dial, deadline } if deadline <= now || introduction.expires <= now => {
                    expired.push((token, Some(dial)))
                }
                Relay::None if introduction.expires <= now => expired.push((token, None)),
                _ => {}
            }
        }
        for (token, dial) in expired {
            if let Some(dial) = dial {
                self.stats.refused += 1;
                self.closes.push_back(dial);
                self.end_relay(token);
            }
            self.introductions.remove(&token);
        }
    }

    /// The first or a later message on connection `conn` from `from`; `body` without its length.
    pub fn handle_message(
        &mut self,
        conn: ConnId,
        from: SocketAddr,
        body: &[u8],
        now: Instant,
    ) -> Disposition {
        let Some(message) = parse(body) else {
            self.stats.malformed += 1;
            return Disposition::Close;
        };
        let registered = self.by_conn.get(&conn).cloned();
        match (message, registered) {
            (Message::Register { name }, _) => self.register(conn, from, name),
            (Message::Connect { name }, Some(dialler)) => {
                self.introduce(conn, dialler, name, now);
                Disposition::Keep
            }
            (Message::RegisterDial { name }, None) => self.register_dial(conn, from, name),
            (Message::RelayDial { token }, None) => self.relay_dial(conn, token, now),
            (Message::RelayAccept { token }, None) => self.relay_accept(token),
            _ => {
                self.stats.malformed += 1;
                if let Some(name) = self.by_conn.remove(&conn) {
                    self.registrations.remove(&name);
                }
                Disposition::Close
            }
        }
    }

    /// Connection `conn` closed: its registration, if it was a signalling connection, ends;
    /// a held relay half is forgotten.
    pub fn handle_closed(&mut self, conn: ConnId) {
        if let Some(name) = self.dial_conns.remove(&conn) {
            if let Some(registration) = self.registrations.get_mut(&name) {
                if registration.dial.is_some_and(|(dial, _)| dial == conn) {
                    registration.dial = None;
                }
            }
        }
        if let Some(name) = self.by_conn.remove(&conn) {
            if self.registrations.get(&name).is_some_and(|registration| registration.conn == conn) {
                self.registrations.remove(&name);
            }
        }
        let waiting: Vec<u64> = self
            .introductions
            .iter()
            .filter(
                |(_, introduction)| matches!(introduction.relay, Relay::Waiting { dial, .. } if dial == conn),
            )
            .map(|(&token, _)| token)
            .collect();
        for token in waiting {
            self.end_relay(token);
            self.introductions.remove(&token);
        }
    }

    /// A spliced relay ended (either side closed).
    pub fn relay_ended(&mut self, token: u64) {
        if self.introductions.get(&token).is_some_and(|introduction| introduction.relay == Relay::Active) {
            self.end_relay(token);
            self.introductions.remove(&token);
        }
    }

    fn register(&mut self, conn: ConnId, from: SocketAddr, name: Vec<u8>) -> Disposition {
        let name: Box<[u8]> = name.into();
        if let Some(previous) = self.by_conn.get(&conn) {
            if *previous != name {
                // A new name on the same connection: the old one is gone.
                let previous = previous.clone();
                self.registrations.remove(&previous);
            }
        }
        match self.registrations.get(&name) {
            Some(existing) if existing.conn != conn => {
                // Registered again from elsewhere: the latest wins.
                self.closes.push_back(existing.conn);
                self.by_conn.remove(&existing.conn);
            }
            Some(_) => {}
            None if self.registrations.len() >= self.config.max_registrations => {
                self.stats.refused += 1;
                self.transmits.push_back((conn, encode(&Message::Refused)));
                return Disposition::Close;
            }
            None => {}
        }
        let dial = self.registrations.get(&name).and_then(|registration| registration.dial);
        self.registrations.insert(name.clone(), Registration { conn, address: from, dial });
        self.by_conn.insert(conn, name);
        self.stats.registrations += 1;
        self.transmits.push_back((conn, encode(&Message::Registered { address: from })));
        Disposition::Keep
    }

    fn register_dial(&mut self, conn: ConnId, from: SocketAddr, name: Vec<u8>) -> Disposition {
        let registration = match self.registrations.get_mut(name.as_slice()) {
            Some(registration) if self.dial_conns.get(&conn).is_none_or(|known| **known == *name) => {
                registration
            }
            _ => {
                self.stats.refused += 1;
                self.transmits.push_back((conn, encode(&Message::Refused)));
                return Disposition::Close;
            }
        };
        if let Some((previous, _)) = registration.dial {
            if previous != conn {
                self.closes.push_back(previous);
                self.dial_conns.remove(&previous);
            }
        }
        registration.dial = Some((conn, from));
        self.dial_conns.insert(conn, name.into());
        self.transmits.push_back((conn, encode(&Message::Registered { address: from })));
        Disposition::Keep
    }

    fn introduce(&mut self, conn: ConnId, dialler: Box<[u8]>, target: Vec<u8>, now: Instant) {
        let (Some(from), Some(to)) =
            (self.registrations.get(&dialler), self.registrations.get(target.as_slice()))
        else {
            self.stats.refused += 1;
            self.transmits.push_back((conn, encode(&Message::UnknownPeer { name: target })));
            return;
        };
        // The target punches towards the dialler's dial port, which the dialler punches from.
        let from_address = from.dial.map_or(from.address, |(_, address)| address);
        let (to_conn, to_address) = (to.conn, to.address);
        if *dialler == *target {
            self.stats.refused += 1;
            self.transmits.push_back((conn, encode(&Message::UnknownPeer { name: target })));
            return;
        }
        self.handle_timeout(now);
        let asked =
            self.introductions.values().filter(|introduction| introduction.dialler == dialler).count();
        if self.introductions.len() >= self.config.max_introductions
            || asked >= self.config.max_introductions_per_node
        {
            self.stats.refused += 1;
            self.transmits.push_back((conn, encode(&Message::Refused)));
            return;
        }
        self.token_counter += 1;
        let token = self.token_key.hash_one(self.token_counter);
        self.introductions.insert(
            token,
            Introduction {
                dialler: dialler.clone(),
                target: target.clone().into(),
                expires: now + self.config.introduction_lifetime,
                relay: Relay::None,
            },
        );
        self.stats.introductions += 1;
        self.transmits.push_back((
            conn,
            encode(&Message::Introduce { token, role: Role::Dialler, address: to_address, name: target }),
        ));
        self.transmits.push_back((
            to_conn,
            encode(&Message::Introduce {
                token,
                role: Role::Target,
                address: from_address,
                name: dialler.to_vec(),
            }),
        ));
    }

    fn relays_of(&self, name: &[u8]) -> usize {
        self.relays_of.get(name).copied().unwrap_or(0)
    }

    fn relay_dial(&mut self, conn: ConnId, token: u64, now: Instant) -> Disposition {
        let Some(introduction) = self.introductions.get(&token) else {
            self.stats.refused += 1;
            return Disposition::Close;
        };
        let target_conn = self.registrations.get(&introduction.target).map(|registration| registration.conn);
        let over = self.relays >= self.config.max_relays
            || self.relays_of(&introduction.dialler) >= self.config.max_relays_per_node
            || self.relays_of(&introduction.target) >= self.config.max_relays_per_node;
        let (Some(target_conn), Relay::None, false) = (target_conn, introduction.relay, over) else {
            self.stats.refused += 1;
            return Disposition::Close;
        };
        let (dialler, target) = (introduction.dialler.clone(), introduction.target.clone());
        if let Some(introduction) = self.introductions.get_mut(&token) {
            introduction.relay = Relay::Waiting { dial: conn, deadline: now + self.config.relay_wait };
        }
        self.relays += 1;
        *self.relays_of.entry(dialler).or_default() += 1;
        *self.relays_of.entry(target).or_default() += 1;
        self.transmits.push_back((target_conn, encode(&Message::RelayRequest { token })));
        Disposition::Hold
    }

    fn relay_accept(&mut self, token: u64) -> Disposition {
        match self.introductions.get_mut(&token) {
            Some(introduction) => match introduction.relay {
                Relay::Waiting { dial, .. } => {
                    introduction.relay = Relay::Active;
                    self.stats.relays += 1;
                    Disposition::Splice { dial, token }
                }
                _ => {
                    self.stats.refused += 1;
                    Disposition::Close
                }
            },
            None => {
                self.stats.refused += 1;
                Disposition::Close
            }
        }
    }

    fn end_relay(&mut self, token: u64) {
        let Some(introduction) = self.introductions.get(&token) else { return };
        if introduction.relay == Relay::None {
            return;
        }
        let (dialler, target) = (introduction.dialler.clone(), introduction.target.clone());
        self.relays = self.relays.saturating_sub(1);
        for name in [dialler, target] {
            if let Some(count) = self.relays_of.get_mut(&name) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.relays_of.remove(&name);
                }
            }
        }
        if let Some(introduction) = self.introductions.get_mut(&token) {
            introduction.relay = Relay::None;
        }
    }
}

/// Why [`Client::dial`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    /// The name is empty or longer than [`MAX_NAME`].
    BadName,
    /// The signalling connection is not registered (yet).
    NotRegistered,
    /// [`Config::max_pending_dials`] dials wait already.
    TooMany,
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::BadName => write!(f, "the name must be 1 to {MAX_NAME} bytes"),
            DialError::NotRegistered => write!(f, "not registered with the rendezvous (yet)"),
            DialError::TooMany => write!(f, "too many connections to nodes behind NAT are being set up"),
        }
    }
}

impl std::error::Error for DialError {}

/// What a node behind NAT learns, taken out with [`Client::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The rendezvous registered the node; its reflexive address.
    Registered {
        /// The node's address as the rendezvous sees it.
        reflexive: SocketAddr,
    },
    /// Punch towards `address` until `deadline`, as `role`.
    Punch {
        /// The peer's name.
        name: String,
        /// The introduction's token.
        token: u64,
        /// This node's role.
        role: Role,
        /// The peer's reflexive address.
        address: SocketAddr,
        /// When punching stops (the dialler then relays).
        deadline: Instant,
    },
    /// A dial failed: the rendezvous does not know the name, refused, or did not answer in time.
    DialFailed {
        /// The name dialled.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Target: open the relay half of this introduction.
    RelayRequested {
        /// The introduction's token.
        token: u64,
    },
}

/// Counters of a node behind NAT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Registrations sent (renewals included).
    pub registrations_sent: u64,
    /// Introductions received (either role).
    pub introductions: u64,
    /// Connections punched (either role).
    pub punched: u64,
    /// Connections relayed (either role).
    pub relayed: u64,
    /// Dials that failed before punching.
    pub dials_failed: u64,
    /// Punch greetings with an unknown token or the wrong role, or before the punch was ready.
    pub bad_punches: u64,
    /// Messages that did not parse or were not expected.
    pub malformed: u64,
}

#[derive(Debug)]
struct Punch {
    role: Role,
    /// Punching ends.
    deadline: Instant,
    /// The token is forgotten (after the relay window).
    expires: Instant,
    done: bool,
}

/// A node behind NAT: its registration, dials waiting for introductions, punches.
#[derive(Debug)]
pub struct Client {
    config: Config,
    name: Box<[u8]>,
    connected: bool,
    reflexive: Option<SocketAddr>,
    next_register: Option<Instant>,
    dials: HashMap<Box<[u8]>, Instant>,
    punches: HashMap<u64, Punch>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    stats: ClientStats,
}

impl Client {
    /// A node registering as `name` (1..=255 bytes); call [`Client::handle_connected`] once
    /// its signalling connection is open.
    pub fn new(config: Config, name: &[u8]) -> Result<Self, DialError> {
        if !valid_name(name) {
            return Err(DialError::BadName);
        }
        Ok(Self {
            config,
            name: name.into(),
            connected: false,
            reflexive: None,
            next_register: None,
            dials: HashMap::new(),
            punches: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The reflexive address, while registered.
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    /// The opening message of the signalling connection (its `REGISTER`).
    pub fn register_opening(&self) -> Vec<u8> {
        opening(&Message::Register { name: self.name.to_vec() })
    }

    /// The opening of the dial port's connection (its `REGISTER_DIAL`); renew it with
    /// [`encode`] of the same message every [`Config::keepalive`].
    pub fn register_dial_message(&self) -> Message {
        Message::RegisterDial { name: self.name.to_vec() }
    }

    /// The signalling connection is open and its opening ([`Client::register_opening`]) sent.
    pub fn handle_connected(&mut self, now: Instant) {
        self.connected = true;
        self.registration_sent(now);
    }

    /// A registration went out: the next one is due after a keepalive, or sooner while the
    /// rendezvous has not answered any (an answer lost on its way must not leave the node
    /// unregistered, refusing every dial, for a whole keepalive).
    fn registration_sent(&mut self, now: Instant) {
        self.stats.registrations_sent += 1;
        let wait = match self.reflexive {
            Some(_) => self.config.keepalive,
            None => self.config.introduction_timeout.min(self.config.keepalive),
        };
        self.next_register = Some(now + wait);
    }

    /// The signalling connection closed: not registered until it is open again; waiting dials
    /// fail.
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
        self.reflexive = None;
        self.next_register = None;
        self.transmits.clear();
        for (name, _) in self.dials.drain() {
            self.stats.dials_failed += 1;
            self.events.push_back(Event::DialFailed {
                name: lossy(&name),
                reason: "the rendezvous connection closed",
            });
        }
    }

    /// Asks the rendezvous for an introduction to `name`; [`Event::Punch`] or
    /// [`Event::DialFailed`] follows.
    pub fn dial(&mut self, name: &[u8], now: Instant) -> Result<(), DialError> {
        if !valid_name(name) {
            return Err(DialError::BadName);
        }
        if !self.connected || self.reflexive.is_none() {
            return Err(DialError::NotRegistered);
        }
        if self.dials.contains_key(name) {
            return Ok(());
        }
        if self.dials.len() >= self.config.max_pending_dials {
            return Err(DialError::TooMany);
        }
        self.dials.insert(name.into(), now + self.config.introduction_timeout);
        self.transmits.push_back(encode(&Message::Connect { name: name.to_vec() }));
        Ok(())
    }

    /// A message that came on the signalling connection. `false`: malformed or unexpected
    /// (counted); the caller closes the connection.
    pub fn handle_message(&mut self, body: &[u8], now: Instant) -> bool {
        match parse(body) {
            Some(Message::Registered { address }) => {
                if self.reflexive.is_none() && self.connected {
                    // The first answer: renew after a keepalive from now on.
                    self.next_register = Some(now + self.config.keepalive);
                }
                if self.reflexive != Some(address) {
                    self.events.push_back(Event::Registered { reflexive: address });
                }
                self.reflexive = Some(address);
                true
            }
            Some(Message::Introduce { token, role, address, name }) => {
                self.stats.introductions += 1;
                if role == Role::Dialler && self.dials.remove(name.as_slice()).is_none() {
                    // Not asked for (any more): ignored.
                    self.stats.bad_punches += 1;
                    return true;
                }
                self.expire(now);
                if self.punches.len() >= self.config.max_punches {
                    if role == Role::Dialler {
                        self.stats.dials_failed += 1;
                        self.events
                            .push_back(Event::DialFailed { name: lossy(&name), reason: "too many punches" });
                    }
                    return true;
                }
                let deadline = now + self.config.punch_timeout;
                let expires = deadline + self.config.relay_wait + self.config.punch_timeout;
                self.punches.insert(token, Punch { role, deadline, expires, done: false });
                self.events.push_back(Event::Punch { name: lossy(&name), token, role, address, deadline });
                true
            }
            Some(Message::UnknownPeer { name }) => {
                if self.dials.remove(name.as_slice()).is_some() {
                    self.stats.dials_failed += 1;
                    self.events.push_back(Event::DialFailed {
                        name: lossy(&name),
                        reason: "no node is registered under that name at the rendezvous",
                    });
                }
                true
            }
            Some(Message::Refused) => {
                for (name, _) in self.dials.drain() {
                    self.stats.dials_failed += 1;
                    self.events.push_back(Event::DialFailed {
                        name: lossy(&name),
                        reason: "the rendezvous refused",
                    });
                }
                true
            }
            Some(Message::RelayRequest { token }) => {
                match self.punches.get_mut(&token) {
                    Some(punch) if punch.role == Role::Target => {
                        punch.done = true;
                        self.stats.relayed += 1;
                        self.events.push_back(Event::RelayRequested { token });
                    }
                    _ => self.stats.bad_punches += 1,
                }
                true
            }
            _ => {
                self.stats.malformed += 1;
                false
            }
        }
    }

    /// The greeting of a punched connection: the peer says it is `role` with `token`. Returns
    /// this node's role if a punch with that token is in progress and the roles fit (and counts
    /// the punch done), `None` otherwise (counted).
    pub fn handle_greeting(&mut self, token: u64, role: Role, now: Instant) -> Option<Role> {
        match self.punches.get_mut(&token) {
            Some(punch) if punch.role == role.opposite() && !punch.done && now <= punch.deadline => {
                punch.done = true;
                self.stats.punched += 1;
                Some(punch.role)
            }
            _ => {
                self.stats.bad_punches += 1;
                None
            }
        }
    }

    /// A punched connection arrived before this node's punch with its token was ready to take
    /// it: refused and counted, the peer tries again.
    pub fn early_greeting(&mut self) {
        self.stats.bad_punches += 1;
    }

    /// Whether the punch with `token` still goes on (not punched, not relayed, before its
    /// deadline).
    pub fn punching(&self, token: u64, now: Instant) -> bool {
        self.punches.get(&token).is_some_and(|punch| !punch.done && now <= punch.deadline)
    }

    /// The dialler's punch with `token` failed and it relays.
    pub fn relaying(&mut self, token: u64) {
        if let Some(punch) = self.punches.get_mut(&token) {
            punch.done = true;
        }
        self.stats.relayed += 1;
    }

    /// A message to write on the signalling connection.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next instant [`Client::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let dials = self.dials.values().copied();
        let punches = self.punches.values().map(|punch| punch.expires);
        dials.chain(punches).chain(self.next_register).min()
    }

    /// Renews the registration, fails dials the rendezvous did not answer, forgets old punches.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(next) = self.next_register {
            if next <= now && self.connected {
                self.transmits.push_back(encode(&Message::Register { name: self.name.to_vec() }));
                self.registration_sent(now);
            }
        }
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<Box<[u8]>> = self
            .dials
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in late {
            self.dials.remove(&name);
            self.stats.dials_failed += 1;
            self.events.push_back(Event::DialFailed {
                name: lossy(&name),
                reason: "the rendezvous did not introduce the peer in time",
            });
        }
        self.punches.retain(|_, punch| punch.expires > now);
    }
}

#[cfg(test)]
mod tests;

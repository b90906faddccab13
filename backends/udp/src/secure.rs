//! Encrypted, authenticated links over datagrams: the Noise XX handshake of
//! [`comms_plugin_api::security::noise`] run over UDP, then every datagram sealed with its own
//! explicit nonce and checked against a replay window.
//!
//! Like [`crate::reliability`], this is a sans-IO state machine ([`SecureLayer`]): it sits
//! *below* the reliability endpoint. Every datagram the endpoint wants to write goes through
//! [`SecureLayer::send`] (sealed, or held while the handshake with that peer runs), every
//! datagram read from the socket through [`SecureLayer::handle_datagram`] (which returns the
//! opened plaintext, if any, for the endpoint). Acks, fragments and retransmissions are therefore
//! all encrypted, and the reliability core is unchanged.
//!
//! ## Datagram format
//!
//! All integers big-endian. The first byte tells secure datagrams (`0xCE`) from plaintext ones
//! (`0xCD`, [`crate::reliability`]); a node in `noise` mode drops every plaintext datagram, a
//! plain node drops every secure one, so nothing crosses between the two modes.
//!
//! ```text
//! u8  magic 0xCE
//! u8  kind
//! 1 handshake message 1:   u32 initiator index, noise message (e)
//! 2 handshake message 2:   u32 initiator index, u32 responder index, noise message (e, ee, s, es)
//! 3 handshake message 3:   u32 responder index, u32 initiator index, noise message (s, se)
//! 4 data:                  u32 receiver's index, u64 nonce, ciphertext (plaintext + 16-byte tag)
//! 5 unknown session:       u32 the receiver index that was not recognised
//! ```
//!
//! Each side of a session picks a random 32-bit index; data carries the receiver's, so a
//! datagram finds its session (and a datagram for a session that no longer exists is noticed).
//! Data with an empty plaintext is a confirmation: the responder sends one when the handshake
//! completes, and again for every repeated message 3.
//!
//! ## Handshake over an unreliable network
//!
//! - **Message 1 lost** (or message 2): the initiator starts over after a timeout (200 ms,
//!   doubling up to 1 s), with a fresh handshake state and a fresh index each time, at most
//!   [`SecureConfig::handshake_tries`] times; then what it held for that peer is dropped and
//!   [`SecureEvent::HandshakeTimeout`] reported. The next datagram for the peer starts anew.
//! - **Duplicate message 1**: the responder answers with the message 2 it stored, without a new
//!   key exchange.
//! - **Message 3 lost**: the initiator's session stays *unconfirmed* until an authenticated
//!   datagram arrives on it; until then it repeats message 3 on the same timer (and gives the
//!   session up after `handshake_tries`). The responder answers a repeated message 3 of an
//!   established session with a new confirmation.
//! - **Unknown session** (the peer restarted, or gave the session up): the receiver answers a
//!   data datagram it has no session for with kind 5 (at most
//!   [`SecureConfig::max_unknown_replies_per_second`]), and the sender drops that session; its
//!   next datagram starts a new handshake. Kind 5 is unauthenticated: someone who sees the
//!   indices on the LAN can force a new handshake, never read or inject data.
//! - **Crossing handshakes** (both sides start at once): both complete; each side keeps the two
//!   newest sessions per peer, sends on the newest and accepts either.
//!
//! ## Who gets through
//!
//! The handshake authenticates both identity keys and checks them against the allow-list (and
//! the network key, if any). A peer that fails is reported ([`SecureEvent::Refused`], with its
//! address and, when it got that far, its public key) and never gets a session, so nothing it
//! sends is opened. The transport then checks every delivered envelope's sender id against the
//! key of the session it came through ([`SecureLayer::peer_key`]).
//!
//! Every data datagram is opened only if its tag verifies (else it is dropped and counted in
//! [`SecureStats::tampered`]) and its nonce is fresh for the session's
//! [`replay::ReplayWindow`] (else [`SecureStats::replayed`]), in best-effort mode too.
//!
//! ## Bounds
//!
//! At most [`SecureConfig::max_responses`] handshakes answered and waiting for message 3 (at
//! most [`SecureConfig::max_responses_per_address`] per address; the oldest is evicted, so a
//! flood of message 1 from strangers costs CPU and bounded memory, and may delay a legitimate
//! handshake), at most [`SecureConfig::max_peers`] peers with sessions (the least recently used
//! is forgotten; it re-handshakes), two sessions per peer, and at most
//! [`SecureConfig::max_held_datagrams`] datagrams held per peer while its handshake runs (more
//! are dropped: reliable mode retransmits them).

pub mod replay;

use comms_plugin_api::security::{
    noise::{snow::StatelessTransportState, NoiseHandshake, NoiseIdentity, TAG_BYTES},
    HandshakeError, PublicKey,
};
use replay::ReplayWindow;
use std::{
    collections::{HashMap, VecDeque},
    fmt,
    hash::Hash,
    sync::Arc,
    time::{Duration, Instant},
};

/// First byte of every secure datagram.
pub const MAGIC: u8 = 0xCE;
const KIND_MESSAGE_1: u8 = 1;
const KIND_MESSAGE_2: u8 = 2;
const KIND_MESSAGE_3: u8 = 3;
const KIND_DATA: u8 = 4;
const KIND_UNKNOWN_SESSION: u8 = 5;
/// Bytes of a data datagram before the ciphertext.
const DATA_HEADER: usize = 2 + 4 + 8;
/// What sealing adds to a datagram: header and tag.
pub const OVERHEAD: usize = DATA_HEADER + TAG_BYTES;
/// Sessions kept per peer (the newest is used for sending).
const SESSIONS_PER_PEER: usize = 2;
/// Events waiting to be logged; more are counted in [`SecureStats::events_dropped`].
const MAX_EVENTS: usize = 256;
/// A refusal of the same peer (address and key) is reported at most this often.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Peers whose last refusal is remembered (for [`REPORT_INTERVAL`]).
const MAX_REPORTED: usize = 256;

/// Timers and bounds of a [`SecureLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureConfig {
    /// Wait before the first repetition of a handshake message; doubles on every repetition.
    pub initial_timeout: Duration,
    /// Upper bound of that wait.
    pub max_timeout: Duration,
    /// Handshake attempts (message 1) and sends of message 3 before giving up.
    pub handshake_tries: u32,
    /// Handshakes answered (message 2 sent) and waiting for message 3, over all addresses.
    pub max_responses: usize,
    /// Of those, per address.
    pub max_responses_per_address: usize,
    /// How long an answered handshake waits for message 3.
    pub response_lifetime: Duration,
    /// Peers with sessions or handshakes.
    pub max_peers: usize,
    /// Datagrams held per peer while its handshake runs.
    pub max_held_datagrams: usize,
    /// Replies "unknown session" per second, over all peers.
    pub max_unknown_replies_per_second: u32,
}

impl Default for SecureConfig {
    fn default() -> Self {
        Self {
            initial_timeout: Duration::from_millis(200),
            max_timeout: Duration::from_secs(1),
            handshake_tries: 8,
            max_responses: 64,
            max_responses_per_address: 4,
            response_lifetime: Duration::from_secs(10),
            max_peers: 1024,
            max_held_datagrams: 1024,
            max_unknown_replies_per_second: 20,
        }
    }
}

/// Something to log, taken out with [`SecureLayer::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureEvent<A> {
    /// A session with `peer` was established.
    Established {
        /// The peer's address.
        peer: A,
        /// Its authenticated identity key.
        key: PublicKey,
        /// Whether this side started the handshake.
        initiator: bool,
    },
    /// A peer was refused: not on the allow-list, a bad identity binding, another network key,
    /// a message that does not decrypt, or a node id not bound to its key. Reported at most once
    /// per 10 s per address and key.
    Refused {
        /// The peer's address.
        peer: A,
        /// Its identity key, when the handshake got far enough to learn it.
        key: Option<PublicKey>,
        /// Why (no secrets).
        reason: String,
    },
    /// A plaintext datagram arrived (a peer in plain mode); reported at most once per 10 s per
    /// address.
    Plaintext {
        /// The sender's address.
        peer: A,
    },
    /// A handshake got no answer after every try; the datagrams held for the peer were dropped.
    HandshakeTimeout {
        /// The peer's address.
        peer: A,
        /// Attempts made.
        tries: u32,
        /// Datagrams dropped.
        dropped: usize,
    },
}

/// Counters of what the layer did and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecureStats {
    /// Sessions established (both roles).
    pub handshakes: u64,
    /// Handshakes refused (allow-list, identity binding, network key, decryption).
    pub refused: u64,
    /// Handshakes given up for lack of answers.
    pub handshake_timeouts: u64,
    /// Data datagrams whose tag did not verify (tampered, or sealed with another key).
    pub tampered: u64,
    /// Data datagrams whose nonce was already seen or is older than the replay window.
    pub replayed: u64,
    /// Plaintext datagrams dropped.
    pub plaintext: u64,
    /// Datagrams that do not parse.
    pub malformed: u64,
    /// Data datagrams for no known session.
    pub unknown_session: u64,
    /// Handshake messages for no handshake in progress (late duplicates, stale attempts).
    pub stale_handshake: u64,
    /// Answered handshakes evicted to stay within the bounds.
    pub evicted_responses: u64,
    /// Datagrams dropped: held over the bound, or for a peer whose handshake failed.
    pub dropped_datagrams: u64,
    /// Messages dropped because the sender id is not bound to the session's key (counted by the
    /// transport, see [`SecureLayer::refuse_node_id`]).
    pub unbound_node_id: u64,
    /// Events dropped because too many waited.
    pub events_dropped: u64,
    /// Data datagrams sealed.
    pub sealed: u64,
    /// Data datagrams opened.
    pub opened: u64,
}

/// Repetition of a handshake message on a timer.
#[derive(Debug)]
struct Retry {
    at: Instant,
    tries: u32,
    timeout: Duration,
}

impl Retry {
    fn first(now: Instant, config: &SecureConfig) -> Self {
        Self { at: now + config.initial_timeout, tries: 1, timeout: config.initial_timeout }
    }

    fn next(&mut self, now: Instant, config: &SecureConfig) {
        self.tries += 1;
        self.timeout = (self.timeout * 2).min(config.max_timeout);
        self.at = now + self.timeout;
    }
}

struct Session {
    local_index: u32,
    remote_index: u32,
    key: PublicKey,
    transport: StatelessTransportState,
    next_nonce: u64,
    replay: ReplayWindow,
    /// Initiator side, until an authenticated datagram arrives: message 3 and its timer.
    unconfirmed: Option<(Vec<u8>, Retry)>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("key", &self.key)
            .field("confirmed", &self.unconfirmed.is_none())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Initiation {
    index: u32,
    handshake: NoiseHandshake,
    retry: Retry,
}

#[derive(Debug)]
struct Peer {
    /// Oldest first; the last one seals.
    sessions: Vec<Session>,
    initiation: Option<Initiation>,
    held: VecDeque<Vec<u8>>,
    last_used: Instant,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Self { sessions: Vec::new(), initiation: None, held: VecDeque::new(), last_used: now }
    }
}

/// A handshake answered (message 2 sent), waiting for message 3.
#[derive(Debug)]
struct Response<A> {
    address: A,
    initiator_index: u32,
    message_1: Vec<u8>,
    message_2: Vec<u8>,
    handshake: NoiseHandshake,
    started: Instant,
}

/// The secure datagram layer: one per socket. `A` is the peer's address.
pub struct SecureLayer<A> {
    config: SecureConfig,
    noise: Arc<NoiseIdentity>,
    peers: HashMap<A, Peer>,
    /// By responder (local) index.
    responses: HashMap<u32, Response<A>>,
    transmits: VecDeque<(A, Vec<u8>)>,
    events: VecDeque<SecureEvent<A>>,
    reported: HashMap<(A, Option<PublicKey>), Instant>,
    unknown_replies: (Instant, u32),
    stats: SecureStats,
}

impl<A: fmt::Debug> fmt::Debug for SecureLayer<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureLayer")
            .field("noise", &self.noise)
            .field("peers", &self.peers.len())
            .field("responses", &self.responses.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn handshake_datagram(kind: u8, indices: &[u32], message: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(2 + 4 * indices.len() + message.len());
    datagram.push(MAGIC);
    datagram.push(kind);
    for index in indices {
        datagram.extend_from_slice(&index.to_be_bytes());
    }
    datagram.extend_from_slice(message);
    datagram
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn seal(session: &mut Session, plaintext: &[u8]) -> Option<Vec<u8>> {
    let nonce = session.next_nonce;
    session.next_nonce += 1;
    let mut datagram = vec![0u8; DATA_HEADER + plaintext.len() + TAG_BYTES];
    datagram[0] = MAGIC;
    datagram[1] = KIND_DATA;
    datagram[2..6].copy_from_slice(&session.remote_index.to_be_bytes());
    datagram[6..14].copy_from_slice(&nonce.to_be_bytes());
    let length = session.transport.write_message(nonce, plaintext, &mut datagram[DATA_HEADER..]).ok()?;
    datagram.truncate(DATA_HEADER + length);
    Some(datagram)
}

impl<A: Copy + Eq + Hash + fmt::Debug> SecureLayer<A> {
    /// A layer that authenticates with `noise` (this transport's static key, identity and
    /// allow-list).
    pub fn new(noise: Arc<NoiseIdentity>, config: SecureConfig) -> Self {
        Self {
            config,
            noise,
            peers: HashMap::new(),
            responses: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            reported: HashMap::new(),
            unknown_replies: (Instant::now(), 0),
            stats: SecureStats::default(),
        }
    }

    /// What was done and dropped so far.
    pub fn stats(&self) -> &SecureStats {
        &self.stats
    }

    /// The authenticated identity key of the peer at `address`, if a session is established.
    pub fn peer_key(&self, address: &A) -> Option<PublicKey> {
        self.peers.get(address)?.sessions.last().map(|session| session.key)
    }

    /// Whether datagrams wait for a handshake with any peer.
    pub fn has_held(&self) -> bool {
        self.peers.values().any(|peer| !peer.held.is_empty())
    }

    /// The next datagram to write.
    pub fn poll_transmit(&mut self) -> Option<(A, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event to log.
    pub fn poll_event(&mut self) -> Option<SecureEvent<A>> {
        self.events.pop_front()
    }

    fn event(&mut self, event: SecureEvent<A>) {
        if self.events.len() < MAX_EVENTS {
            self.events.push_back(event);
        } else {
            self.stats.events_dropped += 1;
        }
    }

    /// Reports a refusal (or plaintext peer) unless the same one was reported recently.
    fn report(&mut self, now: Instant, peer: A, key: Option<PublicKey>, reason: Option<String>) {
        if let Some(at) = self.reported.get(&(peer, key)) {
            if now.saturating_duration_since(*at) < REPORT_INTERVAL {
                return;
            }
        }
        if self.reported.len() >= MAX_REPORTED {
            self.reported.retain(|_, at| now.saturating_duration_since(*at) < REPORT_INTERVAL);
            if self.reported.len() >= MAX_REPORTED {
                self.reported.clear();
            }
        }
        self.reported.insert((peer, key), now);
        self.event(match reason {
            Some(reason) => SecureEvent::Refused { peer, key, reason },
            None => SecureEvent::Plaintext { peer },
        });
    }

    fn refuse(&mut self, now: Instant, peer: A, error: HandshakeError) {
        self.stats.refused += 1;
        let key = match &error {
            HandshakeError::KeyNotAllowed(key) | HandshakeError::BadSignature(key) => Some(*key),
            HandshakeError::NodeIdMismatch { key, .. } => Some(*key),
            _ => None,
        };
        self.report(now, peer, key, Some(error.to_string()));
    }

    /// Records that a message from `peer` claimed a node id not bound to `key` (the transport
    /// drops it).
    pub fn refuse_node_id(
        &mut self,
        now: Instant,
        peer: A,
        claimed: &comms_plugin_api::NodeId,
        key: PublicKey,
    ) {
        self.stats.unbound_node_id += 1;
        let error =
            HandshakeError::NodeIdMismatch { claimed: claimed.as_str().chars().take(200).collect(), key };
        self.report(now, peer, Some(key), Some(format!("message dropped: {error}")));
    }

    fn fresh_index(&self) -> u32 {
        loop {
            let index: u32 = rand::random();
            if !self.responses.contains_key(&index) {
                return index;
            }
        }
    }

    /// Makes room for an entry for `address` by forgetting the least recently used peer.
    fn make_room(&mut self, address: A) {
        if !self.peers.contains_key(&address) && self.peers.len() >= self.config.max_peers {
            if let Some(victim) = self.peers.iter().min_by_key(|(_, peer)| peer.last_used).map(|(a, _)| *a) {
                if let Some(gone) = self.peers.remove(&victim) {
                    self.stats.dropped_datagrams += gone.held.len() as u64;
                }
            }
        }
    }

    /// Seals `datagram` for `to`, or holds it (starting a handshake) until a session exists.
    pub fn send(&mut self, now: Instant, to: A, datagram: &[u8]) {
        let max_held = self.config.max_held_datagrams;
        self.make_room(to);
        let peer = self.peers.entry(to).or_insert_with(|| Peer::new(now));
        peer.last_used = now;
        if let Some(session) = peer.sessions.last_mut() {
            if let Some(sealed) = seal(session, datagram) {
                self.stats.sealed += 1;
                self.transmits.push_back((to, sealed));
            }
            return;
        }
        if peer.held.len() < max_held {
            peer.held.push_back(datagram.to_vec());
        } else {
            self.stats.dropped_datagrams += 1;
        }
        if peer.initiation.is_none() {
            self.initiate(now, to, None);
        }
    }

    /// Starts (or restarts, with fresh state) a handshake with `to`.
    fn initiate(&mut self, now: Instant, to: A, retry: Option<Retry>) {
        let index = self.fresh_index();
        let started = NoiseHandshake::initiator(&self.noise).and_then(|mut handshake| {
            let mut message = Vec::new();
            handshake.write_message(&mut message)?;
            Ok((handshake, message))
        });
        let (handshake, message) = match started {
            Ok(started) => started,
            Err(error) => {
                // Only a local failure (the noise library refusing its own state) gets here.
                self.refuse(now, to, error);
                return;
            }
        };
        let retry = match retry {
            Some(mut retry) => {
                retry.next(now, &self.config);
                retry
            }
            None => Retry::first(now, &self.config),
        };
        self.transmits.push_back((to, handshake_datagram(KIND_MESSAGE_1, &[index], &message)));
        if let Some(peer) = self.peers.get_mut(&to) {
            peer.initiation = Some(Initiation { index, handshake, retry });
        }
    }

    /// Processes one datagram from `from`; returns the plaintext for the reliability layer.
    pub fn handle_datagram(&mut self, now: Instant, from: A, datagram: &[u8]) -> Option<Vec<u8>> {
        match datagram {
            [MAGIC, KIND_DATA, ..] => self.receive_data(now, from, datagram),
            [MAGIC, KIND_MESSAGE_1, ..] => {
                self.receive_message_1(now, from, datagram);
                None
            }
            [MAGIC, KIND_MESSAGE_2, ..] => {
                self.receive_message_2(now, from, datagram);
                None
            }
            [MAGIC, KIND_MESSAGE_3, ..] => {
                self.receive_message_3(now, from, datagram);
                None
            }
            [MAGIC, KIND_UNKNOWN_SESSION, ..] => {
                self.receive_unknown_session(from, datagram);
                None
            }
            [MAGIC, ..] | [] => {
                self.stats.malformed += 1;
                None
            }
            [_, ..] => {
                self.stats.plaintext += 1;
                self.report(now, from, None, None);
                None
            }
        }
    }

    fn receive_data(&mut self, now: Instant, from: A, datagram: &[u8]) -> Option<Vec<u8>> {
        let (Some(index), Some(nonce)) = (
            read_u32(datagram, 2),
            datagram.get(6..14).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
        ) else {
            self.stats.malformed += 1;
            return None;
        };
        let ciphertext = &datagram[DATA_HEADER..];
        if ciphertext.len() < TAG_BYTES {
            self.stats.malformed += 1;
            return None;
        }
        let session = self
            .peers
            .get_mut(&from)
            .and_then(|peer| peer.sessions.iter_mut().find(|session| session.local_index == index));
        let Some(session) = session else {
            self.stats.unknown_session += 1;
            let pending = self.responses.get(&index).is_some_and(|response| response.address == from);
            if !pending {
                self.reply_unknown_session(now, from, index);
            }
            return None;
        };
        if !session.replay.is_fresh(nonce) {
            self.stats.replayed += 1;
            return None;
        }
        let mut plaintext = vec![0u8; ciphertext.len()];
        let Ok(length) = session.transport.read_message(nonce, ciphertext, &mut plaintext) else {
            self.stats.tampered += 1;
            return None;
        };
        session.replay.accept(nonce);
        session.unconfirmed = None;
        self.stats.opened += 1;
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.last_used = now;
        }
        if length == 0 {
            return None; // a confirmation
        }
        plaintext.truncate(length);
        Some(plaintext)
    }

    fn reply_unknown_session(&mut self, now: Instant, to: A, index: u32) {
        let (since, count) = &mut self.unknown_replies;
        if now.saturating_duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *count = 0;
        }
        if *count < self.config.max_unknown_replies_per_second {
            *count += 1;
            self.transmits.push_back((to, handshake_datagram(KIND_UNKNOWN_SESSION, &[index], &[])));
        }
    }

    fn receive_unknown_session(&mut self, from: A, datagram: &[u8]) {
        let (Some(index), 6) = (read_u32(datagram, 2), datagram.len()) else {
            self.stats.malformed += 1;
            return;
        };
        if let Some(peer) = self.peers.get_mut(&from) {
            // The peer has no such session (any more): the next datagram starts a new handshake.
            peer.sessions.retain(|session| session.remote_index != index);
        }
    }

    fn receive_message_1(&mut self, now: Instant, from: A, datagram: &[u8]) {
        let Some(initiator_index) = read_u32(datagram, 2) else {
            self.stats.malformed += 1;
            return;
        };
        let message_1 = &datagram[6..];
        // A duplicate (the network repeated it): answer the same way, no new key exchange.
        let duplicate = self.responses.values().find(|response| {
            response.address == from
                && response.initiator_index == initiator_index
                && response.message_1 == message_1
        });
        if let Some(response) = duplicate {
            let reply = response.message_2.clone();
            self.transmits.push_back((from, reply));
            return;
        }
        self.expire_responses(now);
        let from_here = self.responses.values().filter(|response| response.address == from).count();
        if from_here >= self.config.max_responses_per_address {
            self.evict_oldest_response(Some(from));
        }
        if self.responses.len() >= self.config.max_responses {
            self.evict_oldest_response(None);
        }
        let answered = NoiseHandshake::responder(&self.noise).and_then(|mut handshake| {
            handshake.read_message(message_1)?;
            let mut message = Vec::new();
            handshake.write_message(&mut message)?;
            Ok((handshake, message))
        });
        let (handshake, message) = match answered {
            Ok(answered) => answered,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        let local_index = self.fresh_index();
        let message_2 = handshake_datagram(KIND_MESSAGE_2, &[initiator_index, local_index], &message);
        self.transmits.push_back((from, message_2.clone()));
        self.responses.insert(
            local_index,
            Response {
                address: from,
                initiator_index,
                message_1: message_1.to_vec(),
                message_2,
                handshake,
                started: now,
            },
        );
    }

    fn evict_oldest_response(&mut self, address: Option<A>) {
        let victim = self
            .responses
            .iter()
            .filter(|(_, response)| address.is_none_or(|address| response.address == address))
            .min_by_key(|(_, response)| response.started)
            .map(|(index, _)| *index);
        if let Some(victim) = victim {
            self.responses.remove(&victim);
            self.stats.evicted_responses += 1;
        }
    }

    fn expire_responses(&mut self, now: Instant) {
        let lifetime = self.config.response_lifetime;
        self.responses.retain(|_, response| now.saturating_duration_since(response.started) < lifetime);
    }

    fn receive_message_2(&mut self, now: Instant, from: A, datagram: &[u8]) {
        let (Some(initiator_index), Some(responder_index)) = (read_u32(datagram, 2), read_u32(datagram, 6))
        else {
            self.stats.malformed += 1;
            return;
        };
        let initiation = self.peers.get_mut(&from).and_then(|peer| match &peer.initiation {
            Some(initiation) if initiation.index == initiator_index => peer.initiation.take(),
            _ => None,
        });
        let Some(mut initiation) = initiation else {
            self.stats.stale_handshake += 1;
            return;
        };
        let mut message_3 = Vec::new();
        let result = initiation
            .handshake
            .read_message(&datagram[10..])
            .and_then(|()| initiation.handshake.write_message(&mut message_3))
            .and_then(|()| initiation.handshake.into_stateless_transport());
        match result {
            Ok((key, transport)) => {
                let message_3 =
                    handshake_datagram(KIND_MESSAGE_3, &[responder_index, initiator_index], &message_3);
                self.transmits.push_back((from, message_3.clone()));
                let session = Session {
                    local_index: initiator_index,
                    remote_index: responder_index,
                    key,
                    transport,
                    next_nonce: 0,
                    replay: ReplayWindow::new(),
                    unconfirmed: Some((message_3, Retry::first(now, &self.config))),
                };
                self.establish(now, from, session, true);
            }
            Err(error @ (HandshakeError::KeyNotAllowed(_) | HandshakeError::BadSignature(_))) => {
                // The peer is who it is: trying again changes nothing.
                self.refuse(now, from, error);
                self.drop_held(from);
            }
            Err(error) => {
                // Garbage, tampering or another network key: refuse this answer and start over
                // with fresh state (counting a try), so that a forged message 2 cannot end a
                // legitimate handshake for good.
                self.refuse(now, from, error);
                self.initiate(now, from, Some(initiation.retry));
            }
        }
    }

    fn receive_message_3(&mut self, now: Instant, from: A, datagram: &[u8]) {
        let (Some(responder_index), Some(initiator_index)) = (read_u32(datagram, 2), read_u32(datagram, 6))
        else {
            self.stats.malformed += 1;
            return;
        };
        let matches = self
            .responses
            .get(&responder_index)
            .is_some_and(|response| response.address == from && response.initiator_index == initiator_index);
        if !matches {
            // A repeated message 3 of an established session: confirm again.
            let session = self.peers.get_mut(&from).and_then(|peer| {
                peer.sessions.iter_mut().find(|session| {
                    session.local_index == responder_index && session.remote_index == initiator_index
                })
            });
            match session {
                Some(session) => {
                    if let Some(confirmation) = seal(session, &[]) {
                        self.transmits.push_back((from, confirmation));
                    }
                }
                None => self.stats.stale_handshake += 1,
            }
            return;
        }
        let Some(mut response) = self.responses.remove(&responder_index) else { return };
        let result = response
            .handshake
            .read_message(&datagram[10..])
            .and_then(|()| response.handshake.into_stateless_transport());
        match result {
            Ok((key, transport)) => {
                let session = Session {
                    local_index: responder_index,
                    remote_index: initiator_index,
                    key,
                    transport,
                    next_nonce: 0,
                    replay: ReplayWindow::new(),
                    unconfirmed: None,
                };
                self.establish(now, from, session, false);
            }
            Err(error) => self.refuse(now, from, error),
        }
    }

    /// Installs a new session for `address`: sends the held datagrams through it, and (as
    /// responder) a confirmation.
    fn establish(&mut self, now: Instant, address: A, mut session: Session, initiator: bool) {
        self.stats.handshakes += 1;
        let key = session.key;
        if !initiator {
            if let Some(confirmation) = seal(&mut session, &[]) {
                self.transmits.push_back((address, confirmation));
            }
        }
        self.make_room(address);
        let peer = self.peers.entry(address).or_insert_with(|| Peer::new(now));
        peer.last_used = now;
        // Another key behind this address (a new node took it): its sessions are void.
        peer.sessions.retain(|old| old.key == key);
        if peer.sessions.len() >= SESSIONS_PER_PEER {
            peer.sessions.remove(0);
        }
        peer.sessions.push(session);
        let held: Vec<Vec<u8>> = peer.held.drain(..).collect();
        let session = peer.sessions.last_mut().expect("just pushed");
        for datagram in held {
            if let Some(sealed) = seal(session, &datagram) {
                self.stats.sealed += 1;
                self.transmits.push_back((address, sealed));
            }
        }
        self.event(SecureEvent::Established { peer: address, key, initiator });
    }

    fn drop_held(&mut self, address: A) -> usize {
        let Some(peer) = self.peers.get_mut(&address) else { return 0 };
        let dropped = peer.held.len();
        peer.held.clear();
        self.stats.dropped_datagrams += dropped as u64;
        dropped
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lifetime = self.config.response_lifetime;
        let peers = self.peers.values().flat_map(|peer| {
            let initiation = peer.initiation.as_ref().map(|initiation| initiation.retry.at);
            let confirmations = peer
                .sessions
                .iter()
                .filter_map(|session| session.unconfirmed.as_ref().map(|(_, retry)| retry.at));
            initiation.into_iter().chain(confirmations)
        });
        let responses = self.responses.values().map(|response| response.started + lifetime);
        peers.chain(responses).min()
    }

    /// Repeats handshake messages whose timer expired, gives up on silent peers, forgets
    /// answered handshakes that never finished.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_responses(now);
        let tries = self.config.handshake_tries;
        let mut restart = Vec::new();
        let mut timed_out = Vec::new();
        for (address, peer) in self.peers.iter_mut() {
            if let Some(initiation) = &peer.initiation {
                if initiation.retry.at <= now {
                    let initiation = peer.initiation.take().expect("checked");
                    if initiation.retry.tries >= tries {
                        timed_out.push((*address, initiation.retry.tries));
                    } else {
                        restart.push((*address, initiation.retry));
                    }
                }
            }
            // An initiator session never confirmed after every try: the responder does not have it.
            peer.sessions.retain(|session| {
                session.unconfirmed.as_ref().is_none_or(|(_, retry)| retry.at > now || retry.tries < tries)
            });
            for session in peer.sessions.iter_mut() {
                if let Some((message_3, retry)) = &mut session.unconfirmed {
                    if retry.at <= now {
                        retry.next(now, &self.config);
                        self.transmits.push_back((*address, message_3.clone()));
                    }
                }
            }
        }
        for (address, retry) in restart {
            self.initiate(now, address, Some(retry));
        }
        for (address, tries) in timed_out {
            self.stats.handshake_timeouts += 1;
            let dropped = self.drop_held(address);
            self.event(SecureEvent::HandshakeTimeout { peer: address, tries, dropped });
        }
        // Forget peers with nothing left.
        self.peers.retain(|_, peer| {
            !(peer.sessions.is_empty() && peer.initiation.is_none() && peer.held.is_empty())
        });
    }
}

#[cfg(test)]
mod tests;

//! The sans-IO core of the UDP transport: fragmentation, reassembly, acknowledgements,
//! retransmission, duplicate suppression and ordering as a pure state machine.
//!
//! [`Endpoint`] owns no socket and reads no clock: the caller hands it datagrams
//! ([`Endpoint::handle_datagram`]), messages to send ([`Endpoint::send`]) and the current time,
//! and takes out datagrams to transmit ([`Endpoint::poll_transmit`]), complete messages
//! ([`Endpoint::poll_message`]) and the next instant it wants to be woken at
//! ([`Endpoint::poll_timeout`], then [`Endpoint::handle_timeout`]). That makes every behaviour
//! testable deterministically, loss and reordering included.
//!
//! ## Datagram format (version 2)
//!
//! All integers are big-endian.
//!
//! ```text
//! u8   magic 0xCD
//! u8   kind: 1 reliable data, 2 best-effort data, 3 ack, 4 epoch challenge, 5 epoch proof
//! u32  epoch: a random number the sending endpoint picked at start (a restart is a new epoch)
//! data (kinds 1 and 2):
//!   u64  sequence number of this datagram per (sender, receiver); 0 in best-effort mode
//!   u64  base: every sequence number below it is settled (acked or abandoned) at the sender
//!   u32  message number per (sender, receiver)
//!   u16  fragment index
//!   u16  fragment count (at least 1)
//!   u32  message length in bytes
//!   [..] the fragment's bytes (the rest of the datagram)
//! ack (kind 3):
//!   u32  the epoch being acknowledged (the data sender's)
//!   u64  cumulative: every sequence number below it has been received
//!   u16  bitmap length in bytes (at most 64)
//!   [..] bitmap: bit i (byte i / 8, least significant bit first) = sequence cumulative + 1 + i
//!        has been received (selective acknowledgement)
//! epoch challenge (kind 4), version 2, sent by a receiver to an address whose reliable data
//! arrives in a new epoch (see "Epoch changes"):
//!   u64  cookie: a keyed hash of the address under a secret of the challenger
//! epoch proof (kind 5), version 2, the answer; the header's epoch is the one proved (the
//! answering endpoint's own):
//!   u64  the cookie of the challenge, echoed
//! ```
//!
//! Version 2 added kinds 4 and 5 and changed nothing else; the magic byte is the same. A
//! version 1 node drops kinds 4 and 5 as malformed. What that means for mixed networks is in
//! "Epoch changes" below.
//!
//! A datagram that does not parse, or whose fields contradict each other or the limits, is
//! dropped and counted in [`Stats::malformed`]; it never panics and never allocates beyond the
//! bounds below.
//!
//! ## Guarantees and limits
//!
//! - **Reliable mode**: every datagram carries a per-peer sequence number; the receiver acks
//!   (cumulative + selective) and passes datagrams to reassembly strictly in sequence order, so
//!   messages from one sender arrive complete, once, and in send order. The sender keeps every
//!   datagram in flight within [`Config::window`] sequence numbers of the oldest unacknowledged
//!   one, so that the receiver never has to drop one for lack of room.
//! - **Loss recovery** (reliable mode), see "Loss recovery" below: a datagram is resent early
//!   (fast retransmission) once acknowledgements show that [`DUP_THRESH`] datagrams sent after
//!   it arrived and it has been out longer than the round trip allows; otherwise after the
//!   retransmission timeout, which doubles per timeout round and collapses on progress.
//! - **Giving up**: when datagrams in flight towards a peer got no acknowledgement at all from it
//!   for [`Config::peer_timeout`], or one datagram was sent [`Config::max_transmissions`] times
//!   by its timer (its first send and its retransmissions after a timeout; fast retransmissions,
//!   prompted by the peer's own acknowledgements, do not count), the peer is taken for gone:
//!   what was queued for it is dropped (counted in [`Stats::abandoned_messages`], and in
//!   [`Stats::undelivered`] if it was sent with `counted` set, see [`Endpoint::send_counted`]),
//!   [`Endpoint::poll_event`] reports [`Event::GaveUp`] once, and the next [`Endpoint::send`] to
//!   that peer fails once with [`SendError::Unreachable`] (the message is not queued); the send
//!   after that starts afresh. [`Endpoint::give_up_all`] does the same at once for every peer
//!   with something pending (for a caller that is closing).
//! - **Best-effort mode**: fragments without acks; a message arrives whole or not at all, at most
//!   once per copy the network delivers (no duplicate suppression), in any order.
//! - **Bounded**: at most [`Config::window`] datagrams in flight per peer and buffered out of
//!   order per peer; reassembly holds at most [`Config::max_partial_messages`] partial messages
//!   and [`Config::max_peer_reassembly_bytes`] per peer and [`Config::max_total_reassembly_bytes`]
//!   overall (the oldest partial message is evicted; in reliable mode a datagram over budget is
//!   dropped unacked instead, so the sender retransmits it later); at most [`Config::max_peers`]
//!   peers are tracked (the one heard from least recently with nothing in flight is evicted); the
//!   send queue per peer holds at most [`Config::max_queued_bytes`]. A flood from more than
//!   `max_peers` strangers can evict the receive state of a peer that is only sending to us;
//!   its next datagram starts a fresh state, and a message it was halfway through is lost.
//! - Sequence numbers are 64 bits and never wrap in practice.
//!
//! ## Epoch changes
//!
//! The receive state of a peer (next sequence number expected, out-of-order datagrams, the
//! message being reassembled) belongs to one epoch of the sender. Before version 2, reliable
//! data in a new epoch from a known address reset that state at once, so a datagram forged with
//! the peer's address and a made-up epoch (it needs no knowledge of the traffic) wiped it: the
//! real sender's next datagram reset it again and skipped to its `base`, and messages that had
//! been acknowledged but not completed were lost, and ones delivered but not yet acknowledged
//! were delivered twice. Version 2 adopts a new epoch only with proof that whoever sends it can
//! receive at that address:
//!
//! - The **first** epoch heard from an address is adopted at once: there is no state to lose.
//! - Reliable data in another epoch than the adopted one is dropped unacknowledged (counted in
//!   [`Stats::unproven_epoch`]) and answered with an **epoch challenge** to that address (at
//!   most one per [`Config::min_rto`] per address, and smaller than a data datagram, so it
//!   amplifies nothing). The cookie is a keyed hash (SipHash, 128-bit random key per endpoint)
//!   of the address: the challenger keeps no state per challenge.
//! - The challenge asks whoever **receives** at the address which epoch it sends in, not
//!   whether a given epoch is right: the endpoint there answers any challenge from a peer it
//!   talks to with a **proof** carrying its own epoch and echoing the cookie. So a flood of
//!   forged epochs cannot crowd out a real one: every challenge it provokes is answered with
//!   the real epoch. A proof whose cookie matches switches the receive state to the proved
//!   epoch if it is not the adopted one already (counted in [`Stats::epoch_changes`]); one
//!   whose cookie does not match is dropped ([`Stats::bad_proofs`]). The restarted sender's
//!   dropped datagrams come again at its retransmission timeout (200 ms before its first
//!   round-trip sample): a restart costs about that much once.
//! - **Fallback**: once the adopted epoch has been silent (no data, no ack in it) for
//!   [`Config::peer_timeout`], a new epoch is adopted without proof. By then the old sender has
//!   either been acknowledged for everything it sent or given up on this receiver (and reported
//!   it), so resetting the state loses and repeats nothing it counted as delivered. This is also
//!   how a version 1 sender, which cannot answer a challenge, gets through after a restart: its
//!   datagrams are dropped until its old epoch has been silent for `peer_timeout` (it may give
//!   up meanwhile and report `Unreachable` once). Version 1 receivers never challenge, so a
//!   version 2 sender works with them as before, and they stay exposed to forged epochs.
//!
//! What this protects against, in plaintext: a forger **off the path** (it can send datagrams
//! with any source address but not read what is sent to that address) cannot answer a
//! challenge (it would have to guess a 64-bit cookie), so forged epochs from a known peer's
//! address cause neither loss nor duplicates. It can still deliver messages of its own from an
//! address with no state yet, and, if it guesses the current 32-bit epoch of a stream
//! (one chance in 2^32 per datagram), inject into it. A flood from more than
//! [`Config::max_peers`] forged addresses can evict an idle peer's receive state (see
//! "Bounded"). A forger **on the path** (it reads the datagrams) can answer challenges, forge
//! acknowledgements and data in the current epoch, and so lose, repeat or alter messages:
//! plaintext mode cannot stop it. Encrypted links (the secure layer below this core,
//! `secure.rs`) authenticate every datagram, so nothing forged reaches this state machine at all.
//!
//! ## Loss recovery
//!
//! Per peer, the sender keeps a round-trip estimate (RFC 6298 `srtt` and `rttvar`). It takes one
//! sample per acknowledgement that settles datagrams sent only once (Karn's algorithm: nothing
//! from a retransmitted datagram): the longest round trip among them, so that a burst settled by
//! one acknowledgement counts once and the estimate covers the slowest datagrams. From it:
//!
//! - the **retransmission timeout** (RTO) `srtt + 4 rttvar`, at least [`Config::min_rto`], at
//!   most [`Config::max_rto`]. A datagram unacknowledged for an RTO is resent and the RTO
//!   doubles (up to `max_rto`), at most once per timeout round: datagrams of one burst expiring
//!   a few milliseconds apart double it once, not once each. An acknowledgement that advances
//!   the cumulative acknowledgement, or a fresh sample, brings it back to `srtt + 4 rttvar`.
//! - the **loss delay** `srtt + m * max(4 rttvar, srtt / 4, 1 ms)`, at most the RTO without
//!   backoff. A datagram is taken for lost without waiting for its timeout when at least
//!   [`DUP_THRESH`] datagrams with higher sequence numbers have been acknowledged (the
//!   selective acknowledgement shows the hole) and it was sent a loss delay ago or more, so that
//!   reordering by less than that never causes a resend. It is resent at once, without touching
//!   the RTO. If that copy is lost too, the next fast retransmission waits twice as long (then 4,
//!   8, ... times, up to `max_rto`; the RTO may fire first): a hole is resent about once per
//!   round trip, never once per acknowledgement, and a receiver that keeps dropping one datagram
//!   gets an exponentially slowing trickle, not a storm.
//! - `m`, the reordering multiplier, starts at 1 and doubles (up to 8) whenever a retransmission
//!   turns out spurious: its acknowledgement came back sooner than the shortest round trip
//!   measured, so it was for the first copy, which the network had only delayed. It is kept for
//!   the peer's lifetime (reset when the peer is given up).
//!
//! [`Stats::retransmissions`] counts every datagram sent again, [`Stats::fast_retransmissions`]
//! the part of them sent on acknowledgements rather than by the timer, and
//! [`Stats::spurious_retransmissions`] those detected as unnecessary. Without loss and with
//! reordering within the loss delay, none of them grows.
//!
//! Memory: the loss detection adds a few words per datagram in flight and per peer; the
//! retransmission queue holds each datagram in flight at most once.

use std::{
    collections::{hash_map::RandomState, BTreeMap, HashMap, VecDeque},
    fmt,
    hash::{BuildHasher, Hash},
    time::{Duration, Instant},
};

const MAGIC: u8 = 0xCD;
const KIND_RELIABLE: u8 = 1;
const KIND_BEST_EFFORT: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_CHALLENGE: u8 = 4;
const KIND_PROOF: u8 = 5;
/// Bytes of a data datagram before the fragment.
pub const DATA_HEADER: usize = 6 + 8 + 8 + 4 + 2 + 2 + 4;
const BASE_OFFSET: usize = 6 + 8;
const MESSAGE_OFFSET: usize = 6 + 8 + 8;
const MAX_BITMAP_BYTES: usize = 64;
/// The smallest `max_datagram` that leaves room for a fragment and an ack.
pub const MIN_DATAGRAM: usize = 6 + 4 + 8 + 2 + MAX_BITMAP_BYTES + 16;

/// Limits and timing of an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Reliable (acks, retransmission, ordering) or best-effort (fragments only).
    pub reliable: bool,
    /// The largest datagram written, header included; at least [`MIN_DATAGRAM`].
    pub max_datagram: usize,
    /// The largest message accepted by `send` and reassembled from a peer.
    pub max_message_size: usize,
    /// Sequence numbers in flight per peer: the sender sends a datagram only if its sequence
    /// number is below the oldest unacknowledged one plus `window`, and the receiver buffers out
    /// of order only that far ahead of what it has delivered. Memory: up to `window` datagrams
    /// of `max_datagram` bytes per peer on each side (the receive side also within
    /// [`Config::max_total_reassembly_bytes`]). Up to 513 is covered by the selective
    /// acknowledgement bitmap; beyond it datagrams are acked only cumulatively.
    pub window: usize,
    /// Peers tracked at once.
    pub max_peers: usize,
    /// Partial messages being reassembled per peer (best-effort mode; reliable mode has one).
    pub max_partial_messages: usize,
    /// Bytes of partial messages per peer (best-effort mode).
    pub max_peer_reassembly_bytes: usize,
    /// Bytes of partial messages and out-of-order datagrams over all peers.
    pub max_total_reassembly_bytes: usize,
    /// Bytes queued or in flight towards one peer before `send` reports [`SendError::QueueFull`].
    pub max_queued_bytes: usize,
    /// Retransmission timeout before the first RTT sample.
    pub initial_rto: Duration,
    /// Lower bound of the retransmission timeout.
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout.
    pub max_rto: Duration,
    /// Timer-driven sends of one datagram (its first send and its retransmissions after a
    /// timeout) before the peer is taken for gone. Fast retransmissions do not count: they are
    /// prompted by acknowledgements, so the peer is there.
    pub max_transmissions: u32,
    /// How long datagrams in flight towards a peer may go without any acknowledgement from it
    /// before the peer is taken for gone. Should be several times [`Config::max_rto`], or a
    /// single lost retransmission makes a live peer look gone.
    pub peer_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            reliable: true,
            max_datagram: 1400,
            max_message_size: 4 << 20,
            window: 128,
            max_peers: 256,
            max_partial_messages: 8,
            max_peer_reassembly_bytes: 8 << 20,
            max_total_reassembly_bytes: 64 << 20,
            max_queued_bytes: 16 << 20,
            initial_rto: Duration::from_millis(200),
            min_rto: Duration::from_millis(30),
            max_rto: Duration::from_secs(2),
            max_transmissions: 12,
            peer_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    fn fragment_size(&self) -> usize {
        self.max_datagram - DATA_HEADER
    }
}

/// Why [`Endpoint::send`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The message is larger than [`Config::max_message_size`].
    TooLarge {
        /// The message's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The queue towards this peer is full; try again once datagrams are acked.
    QueueFull,
    /// [`Config::max_peers`] peers are tracked and none can be evicted.
    PeerLimit,
    /// The endpoint gave up on this peer since the last send to it (see [`Event::GaveUp`]); the
    /// message was not queued. Reported once: the next send starts afresh.
    Unreachable {
        /// Messages that were queued or in flight and were dropped.
        dropped_messages: u64,
        /// How long the peer had left datagrams unacknowledged.
        silent_for: Duration,
    },
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { size, max } => {
                write!(f, "message of {size} bytes exceeds max_message_size {max}")
            }
            Self::QueueFull => write!(f, "the send queue towards this peer is full"),
            Self::PeerLimit => write!(f, "too many peers are tracked and none is idle"),
            Self::Unreachable { dropped_messages, silent_for } => write!(
                f,
                "the peer acknowledged nothing for {} ms; {dropped_messages} queued message(s) to it were dropped",
                silent_for.as_millis()
            ),
        }
    }
}

impl std::error::Error for SendError {}

/// Something the caller should report (log), taken out with [`Endpoint::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<A> {
    /// `peer` stopped acknowledging: what was queued for it was dropped.
    GaveUp {
        /// The peer.
        peer: A,
        /// Messages that were queued or in flight and were dropped.
        dropped_messages: u64,
        /// The part of `dropped_messages` sent with `counted` set ([`Endpoint::send_counted`]):
        /// those whose loss the caller has to report.
        undelivered: u64,
        /// How long the peer had left datagrams unacknowledged.
        silent_for: Duration,
    },
}

/// Counters of what the endpoint dropped or repeated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams that did not parse or contradicted the limits.
    pub malformed: u64,
    /// Reliable datagrams received again (suppressed, acked again).
    pub duplicates: u64,
    /// Reliable datagrams beyond the receive window (dropped unacked).
    pub out_of_window: u64,
    /// Datagrams dropped because the reassembly budget was spent.
    pub over_budget: u64,
    /// Partial messages evicted to stay within the reassembly bounds.
    pub evicted_partials: u64,
    /// Datagrams from a new peer dropped because the peer table was full.
    pub refused_peers: u64,
    /// Datagrams sent again, after a timeout or as fast retransmissions.
    pub retransmissions: u64,
    /// The part of [`Stats::retransmissions`] sent because acknowledgements of later datagrams
    /// showed the datagram missing (see "Loss recovery" in the module docs), not after a timeout.
    pub fast_retransmissions: u64,
    /// Retransmissions shown unnecessary: the acknowledgement came back sooner than any round
    /// trip, so it was for an earlier copy (a lower bound: later ones go unnoticed).
    pub spurious_retransmissions: u64,
    /// Messages (queued or in flight) abandoned because their peer stopped acknowledging.
    pub abandoned_messages: u64,
    /// The part of [`Stats::abandoned_messages`] sent with `counted` set
    /// ([`Endpoint::send_counted`]).
    pub undelivered: u64,
    /// Times the endpoint gave up on a peer.
    pub gave_up: u64,
    /// Messages completed and handed out.
    pub delivered: u64,
    /// Reliable datagrams dropped unacknowledged because their epoch differs from the one
    /// adopted for their address and was not proved yet (see "Epoch changes").
    pub unproven_epoch: u64,
    /// Epoch challenges sent.
    pub challenges: u64,
    /// Times a peer's receive state switched to a new epoch (proved, or after the old one was
    /// silent for [`Config::peer_timeout`]); not counting the first epoch of an address.
    pub epoch_changes: u64,
    /// Epoch proofs whose cookie did not match (forged).
    pub bad_proofs: u64,
    /// Epoch challenges answered with a proof.
    pub proofs: u64,
}

/// Acknowledged datagrams with higher sequence numbers that make a missing datagram a candidate
/// for fast retransmission (TCP's three duplicate acks, counted from selective acknowledgements).
pub const DUP_THRESH: u64 = 3;

/// The largest multiplier of the reordering allowance (see "Loss recovery").
const MAX_REORDER_MULT: u32 = 8;

/// Jacobson/Karels round-trip estimation (RFC 6298), with the backoff kept apart so that it can
/// collapse.
#[derive(Debug, Clone)]
struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
    /// The timeout without backoff: `srtt + 4 rttvar` within the bounds.
    base: Duration,
    /// The timeout in force: `base`, doubled per timeout round since the last collapse.
    rto: Duration,
    /// When the RTO was last doubled (None: not backed off).
    backed_off_at: Option<Instant>,
    /// The shortest round trip measured: an acknowledgement of a retransmission that comes back
    /// sooner must be for the first copy, so the retransmission was spurious.
    min_rtt: Option<Duration>,
    /// Multiplier of the reordering allowance in the loss delay, doubled on every spurious
    /// retransmission detected (at most [`MAX_REORDER_MULT`]).
    reorder_mult: u32,
}

impl Rtt {
    fn new(config: &Config) -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            base: config.initial_rto,
            rto: config.initial_rto,
            backed_off_at: None,
            min_rtt: None,
            reorder_mult: 1,
        }
    }

    /// How long a datagram is given before later datagrams' acknowledgements make it lost: the
    /// RTO without its floor and backoff (before any sample: the initial RTO).
    fn loss_delay(&self) -> Duration {
        match self.srtt {
            Some(srtt) => {
                let allowance = (self.rttvar * 4).max(srtt / 4).max(Duration::from_millis(1));
                (srtt + allowance.saturating_mul(self.reorder_mult)).min(self.base)
            }
            None => self.base,
        }
    }

    /// An acknowledgement came back for a retransmitted datagram sooner than any round trip:
    /// it was for an earlier copy, and the network reorders more than the loss delay allowed.
    fn spurious(&mut self) {
        self.reorder_mult = (self.reorder_mult * 2).min(MAX_REORDER_MULT);
    }

    /// Back to the timeout the estimate gives (after fresh evidence that the path delivers).
    fn collapse(&mut self) {
        self.rto = self.base;
        self.backed_off_at = None;
    }

    fn sample(&mut self, rtt: Duration, config: &Config) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |min| min.min(rtt)));
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let error = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + error) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let rto = self.srtt.unwrap_or(rtt) + (self.rttvar * 4).max(Duration::from_millis(1));
        self.base = rto.clamp(config.min_rto, config.max_rto);
        self.collapse();
    }

    /// Doubles the RTO after a timeout at `now`, unless it was doubled less than the previous
    /// RTO ago: the datagrams of one burst expire a few milliseconds apart, and that is one
    /// timeout round, not many.
    fn back_off(&mut self, now: Instant, config: &Config) {
        if self.backed_off_at.is_some_and(|at| now < at + self.rto / 2) {
            return;
        }
        self.rto = (self.rto * 2).min(config.max_rto);
        self.backed_off_at = Some(now);
    }
}

#[derive(Debug)]
struct InFlight {
    datagram: Vec<u8>,
    /// When it was last sent; None while it waits in the retransmission queue.
    sent_at: Option<Instant>,
    /// Sends so far, of any kind.
    transmissions: u32,
    /// Sends by timer (the first and those after a timeout), for giving up.
    timer_sends: u32,
    /// Fast retransmissions so far (each doubles the wait before the next one).
    fast_sends: u32,
    /// At least [`DUP_THRESH`] datagrams with higher sequence numbers were acknowledged.
    lost: bool,
    /// Its message was sent with `counted` set (see [`Queued::counted`]).
    counted: bool,
}

impl InFlight {
    /// When it becomes due for a fast retransmission, if acknowledgements showed it missing.
    fn fast_deadline(&self, loss_delay: Duration, config: &Config) -> Option<Instant> {
        if !self.lost {
            return None;
        }
        let wait = loss_delay.saturating_mul(1 << self.fast_sends.min(16)).min(config.max_rto);
        self.sent_at.map(|at| at + wait)
    }
}

/// A datagram waiting for its first send.
#[derive(Debug)]
struct Queued {
    seq: u64,
    datagram: Vec<u8>,
    /// Its message counts in [`Stats::undelivered`] if the peer is given up on. Carried by every
    /// datagram of the message, so that nothing has to be looked up or cleaned up on an ack.
    counted: bool,
}

#[derive(Debug)]
struct Fragment {
    message: u32,
    index: u16,
    count: u16,
    length: u32,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct Partial {
    length: u32,
    count: u16,
    fragments: BTreeMap<u16, Vec<u8>>,
    bytes: usize,
    started: u64,
}

#[derive(Debug)]
struct Peer {
    last_heard: Instant,
    rx_epoch: Option<u32>,
    /// When a datagram in `rx_epoch` (data, or an ack sent in it) last arrived: the fallback
    /// of "Epoch changes" adopts a new epoch without proof once this is `peer_timeout` ago.
    rx_heard: Instant,
    /// A challenge is due (queued for `poll_transmit`).
    challenge: bool,
    /// When the last challenge was queued (at most one per `min_rto`).
    challenged_at: Option<Instant>,
    /// The cookie of a challenge from this peer, to echo in a proof (queued for `poll_transmit`).
    proof: Option<u64>,
    rx_next: u64,
    rx_window: BTreeMap<u64, Fragment>,
    ack_pending: bool,
    partials: HashMap<u32, Partial>,
    tx_next_seq: u64,
    tx_next_message: u32,
    queued: VecDeque<Queued>,
    in_flight: BTreeMap<u64, InFlight>,
    /// Datagrams to send again, and whether as a fast retransmission (else after a timeout).
    retransmit: VecDeque<(u64, bool)>,
    /// The highest sequence number the peer acknowledged (cumulatively or selectively).
    highest_acked: Option<u64>,
    queued_bytes: usize,
    rtt: Rtt,
    /// Since when datagrams have been in flight with no ack from the peer.
    waiting_since: Option<Instant>,
    /// Set when the endpoint gave up on this peer; taken by the next `send`.
    gave_up: Option<(u64, Duration)>,
}

impl Peer {
    fn new(now: Instant, config: &Config) -> Self {
        Self {
            last_heard: now,
            rx_epoch: None,
            rx_heard: now,
            challenge: false,
            challenged_at: None,
            proof: None,
            rx_next: 0,
            rx_window: BTreeMap::new(),
            ack_pending: false,
            partials: HashMap::new(),
            tx_next_seq: 0,
            tx_next_message: 0,
            queued: VecDeque::new(),
            in_flight: BTreeMap::new(),
            retransmit: VecDeque::new(),
            highest_acked: None,
            queued_bytes: 0,
            rtt: Rtt::new(config),
            waiting_since: None,
            gave_up: None,
        }
    }

    fn idle(&self) -> bool {
        self.queued.is_empty() && self.in_flight.is_empty()
    }

    fn base(&self) -> u64 {
        self.in_flight
            .keys()
            .next()
            .copied()
            .or_else(|| self.queued.front().map(|queued| queued.seq))
            .unwrap_or(self.tx_next_seq)
    }

    fn buffered_bytes(&self) -> usize {
        self.partials.values().map(|p| p.bytes).sum::<usize>()
            + self.rx_window.values().map(|f| f.bytes.len()).sum::<usize>()
    }

    /// Messages with a datagram in flight or queued (their datagrams are consecutive), and how
    /// many of them were sent with `counted` set.
    fn pending_messages(&self) -> (u64, u64) {
        let datagrams = self
            .in_flight
            .values()
            .map(|flight| (&flight.datagram, flight.counted))
            .chain(self.queued.iter().map(|queued| (&queued.datagram, queued.counted)));
        let (mut count, mut counted) = (0, 0);
        let mut last = None;
        for (datagram, counts) in datagrams {
            let number = datagram.get(MESSAGE_OFFSET..MESSAGE_OFFSET + 4);
            if number != last {
                count += 1;
                counted += u64::from(counts);
                last = number;
            }
        }
        (count, counted)
    }

    /// Marks as lost the datagrams in flight with at least [`DUP_THRESH`] acknowledged datagrams
    /// above them. Every sequence number up to `highest_acked` was sent, so those above a
    /// datagram that are not in flight were acknowledged.
    fn mark_lost(&mut self) {
        let Some(highest) = self.highest_acked else { return };
        for (unacked_above, (seq, flight)) in self.in_flight.range_mut(..highest).rev().enumerate() {
            if highest - seq - unacked_above as u64 >= DUP_THRESH {
                flight.lost = true;
            }
        }
    }

    /// Queues for fast retransmission the lost datagrams whose wait has passed at `now`.
    fn queue_fast_retransmissions(&mut self, now: Instant, config: &Config) {
        let loss_delay = self.rtt.loss_delay();
        for (seq, flight) in self.in_flight.iter_mut() {
            if flight.fast_deadline(loss_delay, config).is_some_and(|at| at <= now) {
                flight.sent_at = None;
                self.retransmit.push_back((*seq, true));
            }
        }
    }

    /// Drops everything queued or in flight and remembers why, for the next `send`. Returns the
    /// messages dropped and how many of them were counted.
    fn give_up(&mut self, silent_for: Duration, config: &Config) -> (u64, u64) {
        let (dropped, counted) = self.pending_messages();
        self.in_flight.clear();
        self.queued.clear();
        self.retransmit.clear();
        self.highest_acked = None;
        self.queued_bytes = 0;
        self.rtt = Rtt::new(config);
        self.waiting_since = None;
        self.gave_up = Some((dropped, silent_for));
        (dropped, counted)
    }
}

/// The state machine: one per socket, tracking every peer it talks to. `A` is the peer's
/// address (a `SocketAddr` in the plugin, anything in tests).
#[derive(Debug)]
pub struct Endpoint<A> {
    config: Config,
    epoch: u32,
    peers: HashMap<A, Peer>,
    delivered: VecDeque<(A, Vec<u8>)>,
    events: VecDeque<Event<A>>,
    buffered: usize,
    tick: u64,
    stats: Stats,
    /// Keys the cookies of epoch challenges (SipHash with a random 128-bit key).
    cookie_key: RandomState,
}

impl<A: Copy + Eq + Hash + fmt::Debug> Endpoint<A> {
    /// A new endpoint. `epoch` should be random per start, so that peers notice a restart.
    /// The key of its epoch challenge cookies is random (std's `RandomState`, seeded by the
    /// operating system): the only thing the endpoint does not take from its caller, and one
    /// that no test needs to know (a proof echoes the cookie it was sent).
    ///
    /// # Panics
    /// If `config.max_datagram` is below [`MIN_DATAGRAM`], the window or peer limit is 0, or
    /// `max_message_size` does not fit the datagram format (the plugin validates its config first).
    pub fn new(config: Config, epoch: u32) -> Self {
        assert!(config.max_datagram >= MIN_DATAGRAM, "max_datagram below {MIN_DATAGRAM}");
        assert!(config.window > 0 && config.max_peers > 0, "window and max_peers must be positive");
        assert!(
            config.max_message_size <= u32::MAX as usize
                && config.max_message_size.div_ceil(config.fragment_size()) <= u16::MAX as usize,
            "max_message_size must fit the u32 length and u16 fragment count of the datagram format"
        );
        Self {
            config,
            epoch,
            peers: HashMap::new(),
            delivered: VecDeque::new(),
            events: VecDeque::new(),
            buffered: 0,
            tick: 0,
            stats: Stats::default(),
            cookie_key: RandomState::new(),
        }
    }

    /// The cookie of a challenge to `address`: unguessable without the key, and the same every
    /// time, so that no state is kept per challenge.
    fn cookie(&self, address: &A) -> u64 {
        self.cookie_key.hash_one(address)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What was dropped, repeated and delivered so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Peers currently tracked.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Bytes held in reassembly and out-of-order buffers over all peers.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Whether anything is queued or unacked towards any peer.
    pub fn has_pending_sends(&self) -> bool {
        self.peers.values().any(|peer| !peer.idle())
    }

    fn peer(&mut self, now: Instant, address: A) -> Option<&mut Peer> {
        if !self.peers.contains_key(&address) {
            if self.peers.len() >= self.config.max_peers {
                let victim = self
                    .peers
                    .iter()
                    .filter(|(_, peer)| peer.idle())
                    // Keep a pending "gave up" report for its next send if possible.
                    .min_by_key(|(_, peer)| (peer.gave_up.is_some(), peer.last_heard))
                    .map(|(address, _)| *address)?;
                let gone = self.peers.remove(&victim).expect("victim is tracked");
                self.buffered -= gone.buffered_bytes();
            }
            self.peers.insert(address, Peer::new(now, &self.config));
        }
        self.peers.get_mut(&address)
    }

    /// Queues `message` for `peer`, cut into fragments. If the endpoint gives up on it, it counts
    /// in [`Stats::undelivered`]: the same as [`Endpoint::send_counted`] with `counted` set.
    pub fn send(&mut self, now: Instant, peer: A, message: &[u8]) -> Result<(), SendError> {
        self.send_counted(now, peer, message, true)
    }

    /// Queues `message` for `peer`, cut into fragments. `counted` says whether giving up on it
    /// counts in [`Stats::undelivered`] (and [`Event::GaveUp`]'s `undelivered`): the caller
    /// clears it for messages whose loss it learns of otherwise or that need no delivery, so
    /// that the counter holds only losses it has to report.
    pub fn send_counted(
        &mut self,
        now: Instant,
        peer: A,
        message: &[u8],
        counted: bool,
    ) -> Result<(), SendError> {
        let max = self.config.max_message_size;
        if message.len() > max {
            return Err(SendError::TooLarge { size: message.len(), max });
        }
        let fragment_size = self.config.fragment_size();
        let (reliable, max_queued, epoch) = (self.config.reliable, self.config.max_queued_bytes, self.epoch);
        let Some(state) = self.peer(now, peer) else { return Err(SendError::PeerLimit) };
        if let Some((dropped_messages, silent_for)) = state.gave_up.take() {
            return Err(SendError::Unreachable { dropped_messages, silent_for });
        }
        if state.queued_bytes > 0 && state.queued_bytes + message.len() > max_queued {
            return Err(SendError::QueueFull);
        }
        let count = message.len().div_ceil(fragment_size).max(1);
        let number = state.tx_next_message;
        state.tx_next_message = state.tx_next_message.wrapping_add(1);
        for index in 0..count {
            let chunk = &message[(index * fragment_size).min(message.len())
                ..((index + 1) * fragment_size).min(message.len())];
            let seq = if reliable { state.tx_next_seq } else { 0 };
            state.tx_next_seq += 1;
            let mut datagram = Vec::with_capacity(DATA_HEADER + chunk.len());
            datagram.push(MAGIC);
            datagram.push(if reliable { KIND_RELIABLE } else { KIND_BEST_EFFORT });
            datagram.extend_from_slice(&epoch.to_be_bytes());
            datagram.extend_from_slice(&seq.to_be_bytes());
            datagram.extend_from_slice(&0u64.to_be_bytes());
            datagram.extend_from_slice(&number.to_be_bytes());
            datagram.extend_from_slice(&(index as u16).to_be_bytes());
            datagram.extend_from_slice(&(count as u16).to_be_bytes());
            datagram.extend_from_slice(&(message.len() as u32).to_be_bytes());
            datagram.extend_from_slice(chunk);
            state.queued_bytes += chunk.len();
            state.queued.push_back(Queued { seq, datagram, counted });
        }
        Ok(())
    }

    /// The next datagram to write, and where to. Call until `None` after every other call.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(A, Vec<u8>)> {
        let window = self.config.window;
        let reliable = self.config.reliable;
        // Acks, proofs and challenges first: they unblock the other side.
        for (address, peer) in self.peers.iter_mut() {
            if peer.ack_pending {
                peer.ack_pending = false;
                return Some((*address, encode_ack(self.epoch, peer)));
            }
            if let Some(cookie) = peer.proof.take() {
                self.stats.proofs += 1;
                return Some((*address, encode_epoch_check(KIND_PROOF, self.epoch, cookie)));
            }
            if std::mem::take(&mut peer.challenge) {
                self.stats.challenges += 1;
                let cookie = self.cookie_key.hash_one(address);
                return Some((*address, encode_epoch_check(KIND_CHALLENGE, self.epoch, cookie)));
            }
        }
        for (address, peer) in self.peers.iter_mut() {
            while let Some((seq, fast)) = peer.retransmit.pop_front() {
                let base = peer.base();
                if let Some(flight) = peer.in_flight.get_mut(&seq) {
                    flight.sent_at = Some(now);
                    flight.transmissions += 1;
                    self.stats.retransmissions += 1;
                    if fast {
                        flight.fast_sends += 1;
                        self.stats.fast_retransmissions += 1;
                    } else {
                        flight.timer_sends += 1;
                    }
                    flight.datagram[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base.to_be_bytes());
                    return Some((*address, flight.datagram.clone()));
                }
            }
            if !reliable {
                if let Some(Queued { datagram, .. }) = peer.queued.pop_front() {
                    peer.queued_bytes -= datagram.len() - DATA_HEADER;
                    return Some((*address, datagram));
                }
                continue;
            }
            // Within `window` of the oldest unacknowledged datagram: the receiver buffers no
            // further ahead, so anything beyond would be dropped and cost a timeout.
            let oldest = peer.in_flight.keys().next().copied();
            let next = peer.queued.front().map(|queued| queued.seq);
            if next.is_some_and(|next| oldest.is_none_or(|oldest| next - oldest < window as u64)) {
                if let Some(Queued { seq, mut datagram, counted }) = peer.queued.pop_front() {
                    let base = oldest.unwrap_or(seq);
                    datagram[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base.to_be_bytes());
                    let copy = datagram.clone();
                    let flight = InFlight {
                        datagram,
                        sent_at: Some(now),
                        transmissions: 1,
                        timer_sends: 1,
                        fast_sends: 0,
                        lost: false,
                        counted,
                    };
                    peer.in_flight.insert(seq, flight);
                    peer.waiting_since.get_or_insert(now);
                    return Some((*address, copy));
                }
            }
        }
        None
    }

    /// The next complete message and its sender.
    pub fn poll_message(&mut self) -> Option<(A, Vec<u8>)> {
        self.delivered.pop_front()
    }

    /// The next event to report (at most one per peer the endpoint gave up on).
    pub fn poll_event(&mut self) -> Option<Event<A>> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] should next be called, if anything waits for a timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let config = &self.config;
        self.peers
            .values()
            .flat_map(|peer| {
                let rto = peer.rtt.rto;
                let loss_delay = peer.rtt.loss_delay();
                let give_up = peer.waiting_since.map(|since| since + config.peer_timeout);
                peer.in_flight
                    .values()
                    .filter_map(move |flight| {
                        let timeout = flight.sent_at.map(|at| at + rto);
                        match flight.fast_deadline(loss_delay, config) {
                            Some(fast) => Some(fast.min(timeout?)),
                            None => timeout,
                        }
                    })
                    .chain(give_up)
            })
            .min()
    }

    /// Schedules retransmissions whose timeout (or fast retransmission wait) has passed at
    /// `now`, and abandons peers that stopped answering.
    pub fn handle_timeout(&mut self, now: Instant) {
        let config = &self.config;
        for (address, peer) in self.peers.iter_mut() {
            peer.queue_fast_retransmissions(now, config);
            let rto = peer.rtt.rto;
            let silent_for =
                peer.waiting_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
            let expired: Vec<u64> = peer
                .in_flight
                .iter()
                .filter(|(_, flight)| flight.sent_at.is_some_and(|at| at + rto <= now))
                .map(|(seq, _)| *seq)
                .collect();
            let exhausted =
                expired.iter().any(|seq| peer.in_flight[seq].timer_sends >= config.max_transmissions);
            if exhausted || (peer.waiting_since.is_some() && silent_for >= config.peer_timeout) {
                Self::abandon(&mut self.stats, &mut self.events, config, *address, peer, silent_for);
                continue;
            }
            if expired.is_empty() {
                continue;
            }
            peer.rtt.back_off(now, config);
            for seq in expired {
                if let Some(flight) = peer.in_flight.get_mut(&seq) {
                    flight.sent_at = None;
                    peer.retransmit.push_back((seq, false));
                }
            }
        }
    }

    /// Gives up on every peer with something queued or in flight, counted and reported like a
    /// peer that stopped answering: for a caller that closes and waits for no more
    /// acknowledgements, so that what it drops is not lost silently.
    pub fn give_up_all(&mut self, now: Instant) {
        for (address, peer) in self.peers.iter_mut().filter(|(_, peer)| !peer.idle()) {
            let silent_for =
                peer.waiting_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
            Self::abandon(&mut self.stats, &mut self.events, &self.config, *address, peer, silent_for);
        }
    }

    /// Gives up on `peer`: drops what is queued for it, counts it and reports it. Takes the
    /// endpoint's fields apart so that callers can hold a peer borrowed from `peers`.
    fn abandon(
        stats: &mut Stats,
        events: &mut VecDeque<Event<A>>,
        config: &Config,
        address: A,
        peer: &mut Peer,
        silent_for: Duration,
    ) {
        let (dropped_messages, undelivered) = peer.give_up(silent_for, config);
        stats.abandoned_messages += dropped_messages;
        stats.undelivered += undelivered;
        stats.gave_up += 1;
        if events.len() < config.max_peers {
            events.push_back(Event::GaveUp { peer: address, dropped_messages, undelivered, silent_for });
        }
    }

    /// Processes one datagram from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: A, datagram: &[u8]) {
        let Some(parsed) = parse(datagram) else {
            self.stats.malformed += 1;
            return;
        };
        match parsed {
            Parsed::Ack { epoch, acked_epoch, cumulative, bitmap } => {
                if acked_epoch != self.epoch {
                    self.stats.malformed += 1;
                    return;
                }
                let Some(peer) = self.peers.get_mut(&from) else { return };
                peer.last_heard = now;
                if peer.rx_epoch == Some(epoch) {
                    peer.rx_heard = now;
                }
                self.handle_ack(now, from, cumulative, bitmap);
            }
            Parsed::Challenge { cookie } => {
                // Only a peer we talk to challenges us; a stranger gets no state and no answer.
                if let Some(peer) = self.peers.get_mut(&from) {
                    peer.proof = Some(cookie);
                }
            }
            Parsed::Proof { epoch, cookie } => {
                if !self.config.reliable || !self.peers.contains_key(&from) {
                    return; // nothing challenged: best-effort mode has no receive state
                }
                if cookie != self.cookie(&from) {
                    self.stats.bad_proofs += 1;
                    return;
                }
                let peer = self.peers.get_mut(&from).expect("checked above");
                peer.last_heard = now;
                if peer.rx_epoch != Some(epoch) {
                    self.adopt_epoch(now, from, epoch);
                }
            }
            Parsed::Data { reliable, epoch, seq, base, fragment } => {
                if reliable != self.config.reliable || !self.valid_fragment(&fragment) {
                    self.stats.malformed += 1;
                    return;
                }
                if self.peer(now, from).is_none() {
                    self.stats.refused_peers += 1;
                    return;
                }
                if reliable {
                    self.receive_reliable(now, from, epoch, seq, base, fragment);
                } else {
                    self.peers.get_mut(&from).expect("just added").last_heard = now;
                    self.reassemble(from, fragment);
                }
            }
        }
    }

    /// Starts a fresh receive state for `from` in `epoch` (see "Epoch changes").
    fn adopt_epoch(&mut self, now: Instant, from: A, epoch: u32) {
        let peer = self.peers.get_mut(&from).expect("caller checked");
        if peer.rx_epoch.is_some() {
            self.stats.epoch_changes += 1;
        }
        self.buffered -= peer.buffered_bytes();
        peer.rx_epoch = Some(epoch);
        peer.rx_heard = now;
        peer.rx_next = 0;
        peer.rx_window.clear();
        peer.partials.clear();
        peer.challenge = false;
        peer.challenged_at = None;
    }

    fn valid_fragment(&self, fragment: &Fragment) -> bool {
        let length = fragment.length as usize;
        fragment.count >= 1
            && fragment.index < fragment.count
            && length <= self.config.max_message_size
            && fragment.bytes.len() <= length
            && (fragment.count as usize) <= length.max(1)
    }

    fn handle_ack(&mut self, now: Instant, from: A, cumulative: u64, bitmap: &[u8]) {
        let config = &self.config;
        let peer = self.peers.get_mut(&from).expect("caller checked");
        let mut acked: Vec<u64> = peer.in_flight.range(..cumulative).map(|(seq, _)| *seq).collect();
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let seq = cumulative + 1 + (i * 8 + bit) as u64;
                    if peer.in_flight.contains_key(&seq) {
                        acked.push(seq);
                    }
                }
            }
        }
        // Any ack shows the peer is there, even one that settles nothing new (it answers a
        // retransmission of what it already had).
        if !peer.in_flight.is_empty() {
            peer.waiting_since = Some(now);
        }
        if acked.first().is_some_and(|seq| *seq < cumulative) {
            // The cumulative acknowledgement moved: the path delivers, the backoff is over.
            peer.rtt.collapse();
        }
        let any_acked = !acked.is_empty();
        let mut rtt_sample: Option<Duration> = None;
        for seq in acked {
            peer.highest_acked = peer.highest_acked.max(Some(seq));
            let flight = peer.in_flight.remove(&seq).expect("listed from in_flight");
            peer.queued_bytes -= flight.datagram.len() - DATA_HEADER;
            // Karn: only datagrams sent once give an unambiguous sample.
            match (flight.transmissions, flight.sent_at) {
                (1, Some(at)) => {
                    let rtt = now.saturating_duration_since(at);
                    rtt_sample = Some(rtt_sample.map_or(rtt, |sample| sample.max(rtt)));
                }
                (_, Some(at))
                    if peer.rtt.min_rtt.is_some_and(|min| now.saturating_duration_since(at) < min) =>
                {
                    self.stats.spurious_retransmissions += 1;
                    peer.rtt.spurious();
                }
                _ => {}
            }
        }
        // One sample per acknowledgement, not one per datagram it settles: a burst acked at once
        // would otherwise count as many identical samples and drive `rttvar` to zero. The
        // longest, so that the estimate covers the datagrams that took longest (reordering).
        if let Some(rtt) = rtt_sample {
            peer.rtt.sample(rtt, config);
        }
        if any_acked {
            peer.mark_lost();
        }
        if peer.in_flight.is_empty() {
            // Nothing waits for the peer any more: an idle peer is not a silent one.
            peer.waiting_since = None;
        }
        peer.queue_fast_retransmissions(now, config);
    }

    fn receive_reliable(
        &mut self,
        now: Instant,
        from: A,
        epoch: u32,
        seq: u64,
        base: u64,
        fragment: Fragment,
    ) {
        let window = self.config.window as u64;
        let budget = self.config.max_total_reassembly_bytes;
        let (peer_timeout, min_rto) = (self.config.peer_timeout, self.config.min_rto);
        let peer = self.peers.get_mut(&from).expect("caller added it");
        peer.last_heard = now;
        match peer.rx_epoch {
            Some(current) if current == epoch => peer.rx_heard = now,
            // The first datagram from this address: no state to lose.
            None => self.adopt_epoch(now, from, epoch),
            // The adopted epoch went quiet long enough that its sender is done or gave up.
            Some(_) if now.saturating_duration_since(peer.rx_heard) >= peer_timeout => {
                self.adopt_epoch(now, from, epoch)
            }
            Some(_) => {
                // Unproven: whoever sent it must show it receives at this address first.
                self.stats.unproven_epoch += 1;
                if peer.challenged_at.is_none_or(|at| now >= at + min_rto) {
                    peer.challenge = true;
                    peer.challenged_at = Some(now);
                }
                return;
            }
        }
        let peer = self.peers.get_mut(&from).expect("caller added it");
        if base > peer.rx_next {
            // The sender settled everything below `base` (it gave up on us, or we lost state).
            let dropped = peer.buffered_bytes();
            peer.rx_window = peer.rx_window.split_off(&base);
            peer.partials.clear();
            self.buffered = self.buffered - dropped + peer.buffered_bytes();
            peer.rx_next = base;
        }
        peer.ack_pending = true;
        if seq < peer.rx_next || peer.rx_window.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        if seq >= peer.rx_next + window {
            self.stats.out_of_window += 1;
            return;
        }
        if self.buffered + fragment.bytes.len() > budget {
            self.stats.over_budget += 1;
            return;
        }
        self.buffered += fragment.bytes.len();
        peer.rx_window.insert(seq, fragment);
        let mut ready = Vec::new();
        while let Some(next) = peer.rx_window.remove(&peer.rx_next) {
            peer.rx_next += 1;
            self.buffered -= next.bytes.len();
            ready.push(next);
        }
        for fragment in ready {
            self.reassemble(from, fragment);
        }
    }

    fn reassemble(&mut self, from: A, fragment: Fragment) {
        if fragment.count == 1 {
            if fragment.bytes.len() == fragment.length as usize {
                self.stats.delivered += 1;
                self.delivered.push_back((from, fragment.bytes));
            } else {
                self.stats.malformed += 1;
            }
            return;
        }
        let reliable = self.config.reliable;
        let (per_peer_partials, per_peer_bytes) =
            (self.config.max_partial_messages, self.config.max_peer_reassembly_bytes);
        let total = self.config.max_total_reassembly_bytes;
        let size = fragment.bytes.len();
        if !reliable {
            // Make room: per peer first, then overall, always evicting the oldest partial.
            loop {
                let peer = &self.peers[&from];
                let new_partial = !peer.partials.contains_key(&fragment.message);
                let peer_full = (new_partial && peer.partials.len() >= per_peer_partials)
                    || peer.buffered_bytes() + size > per_peer_bytes;
                let total_full = self.buffered + size > total;
                if !peer_full && !total_full {
                    break;
                }
                let victim = if peer_full {
                    peer.partials.iter().min_by_key(|(_, p)| p.started).map(|(m, _)| (from, *m))
                } else {
                    self.peers
                        .iter()
                        .flat_map(|(a, p)| p.partials.iter().map(move |(m, part)| (part.started, *a, *m)))
                        .min_by_key(|(started, ..)| *started)
                        .map(|(_, a, m)| (a, m))
                };
                let Some((address, message)) = victim else {
                    self.stats.over_budget += 1;
                    return;
                };
                let gone = self.peers.get_mut(&address).and_then(|p| p.partials.remove(&message));
                self.buffered -= gone.map_or(0, |p| p.bytes);
                self.stats.evicted_partials += 1;
            }
        }
        self.tick += 1;
        let tick = self.tick;
        let peer = self.peers.get_mut(&from).expect("caller added it");
        if reliable && !peer.partials.contains_key(&fragment.message) && !peer.partials.is_empty() {
            // Fragments arrive in sequence order: a new message means the old one cannot complete.
            let gone: usize = peer.partials.drain().map(|(_, p)| p.bytes).sum();
            self.buffered -= gone;
            self.stats.evicted_partials += 1;
        }
        let partial = peer.partials.entry(fragment.message).or_insert_with(|| Partial {
            length: fragment.length,
            count: fragment.count,
            fragments: BTreeMap::new(),
            bytes: 0,
            started: tick,
        });
        if partial.length != fragment.length || partial.count != fragment.count {
            self.stats.malformed += 1;
            return;
        }
        if partial.fragments.contains_key(&fragment.index) {
            return; // a duplicate copy in best-effort mode
        }
        if partial.bytes + size > partial.length as usize {
            self.stats.malformed += 1;
            let gone = peer.partials.remove(&fragment.message).map_or(0, |p| p.bytes);
            self.buffered -= gone;
            return;
        }
        partial.bytes += size;
        self.buffered += size;
        partial.fragments.insert(fragment.index, fragment.bytes);
        if partial.fragments.len() == partial.count as usize {
            let partial = peer.partials.remove(&fragment.message).expect("just completed");
            self.buffered -= partial.bytes;
            if partial.bytes != partial.length as usize {
                self.stats.malformed += 1;
                return;
            }
            let mut message = Vec::with_capacity(partial.bytes);
            for bytes in partial.fragments.into_values() {
                message.extend_from_slice(&bytes);
            }
            self.stats.delivered += 1;
            self.delivered.push_back((from, message));
        }
    }
}

fn encode_ack(own_epoch: u32, peer: &Peer) -> Vec<u8> {
    let mut bitmap = [0u8; MAX_BITMAP_BYTES];
    let mut used = 0;
    for seq in peer.rx_window.keys() {
        let bit = (seq - peer.rx_next - 1) as usize;
        if bit < MAX_BITMAP_BYTES * 8 {
            bitmap[bit / 8] |= 1 << (bit % 8);
            used = used.max(bit / 8 + 1);
        }
    }
    let mut datagram = Vec::with_capacity(20 + used);
    datagram.push(MAGIC);
    datagram.push(KIND_ACK);
    datagram.extend_from_slice(&own_epoch.to_be_bytes());
    datagram.extend_from_slice(&peer.rx_epoch.unwrap_or(0).to_be_bytes());
    datagram.extend_from_slice(&peer.rx_next.to_be_bytes());
    datagram.extend_from_slice(&(used as u16).to_be_bytes());
    datagram.extend_from_slice(&bitmap[..used]);
    datagram
}

/// An epoch challenge (`KIND_CHALLENGE`) or proof (`KIND_PROOF`): the same layout.
fn encode_epoch_check(kind: u8, own_epoch: u32, cookie: u64) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(14);
    datagram.push(MAGIC);
    datagram.push(kind);
    datagram.extend_from_slice(&own_epoch.to_be_bytes());
    datagram.extend_from_slice(&cookie.to_be_bytes());
    datagram
}

enum Parsed<'a> {
    Data { reliable: bool, epoch: u32, seq: u64, base: u64, fragment: Fragment },
    Ack { epoch: u32, acked_epoch: u32, cumulative: u64, bitmap: &'a [u8] },
    Challenge { cookie: u64 },
    Proof { epoch: u32, cookie: u64 },
}

fn parse(datagram: &[u8]) -> Option<Parsed<'_>> {
    let mut r = datagram;
    fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if r.len() < n {
            return None;
        }
        let (head, rest) = r.split_at(n);
        *r = rest;
        Some(head)
    }
    let u16_ = |r: &mut &[u8]| take(r, 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let u32_ = |r: &mut &[u8]| take(r, 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let u64_ = |r: &mut &[u8]| take(r, 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    let head = take(&mut r, 2)?;
    if head[0] != MAGIC {
        return None;
    }
    let epoch = u32_(&mut r)?;
    match head[1] {
        KIND_RELIABLE | KIND_BEST_EFFORT => {
            let seq = u64_(&mut r)?;
            let base = u64_(&mut r)?;
            let message = u32_(&mut r)?;
            let index = u16_(&mut r)?;
            let count = u16_(&mut r)?;
            let length = u32_(&mut r)?;
            let fragment = Fragment { message, index, count, length, bytes: r.to_vec() };
            Some(Parsed::Data { reliable: head[1] == KIND_RELIABLE, epoch, seq, base, fragment })
        }
        KIND_ACK => {
            let acked_epoch = u32_(&mut r)?;
            let cumulative = u64_(&mut r)?;
            let used = u16_(&mut r)? as usize;
            if used > MAX_BITMAP_BYTES || r.len() != used {
                return None;
            }
            Some(Parsed::Ack { epoch, acked_epoch, cumulative, bitmap: r })
        }
        KIND_CHALLENGE => {
            let cookie = u64_(&mut r)?;
            r.is_empty().then_some(Parsed::Challenge { cookie })
        }
        KIND_PROOF => {
            let cookie = u64_(&mut r)?;
            r.is_empty().then_some(Parsed::Proof { epoch, cookie })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;

//! The sans-IO gossip member: the member table, the failure detector and the dissemination
//! queue tied together behind datagrams in, datagrams out.
//!
//! [`GossipNode`] owns no socket and reads no clock. The caller hands it datagrams
//! ([`GossipNode::handle_datagram`]), commands ([`GossipNode::set_record`],
//! [`GossipNode::join`], [`GossipNode::leave`]) and the current time, wakes it at
//! [`GossipNode::next_timeout`] ([`GossipNode::handle_timeout`]), and takes out datagrams to
//! send ([`GossipNode::poll_transmit`]) and membership changes ([`GossipNode::poll_event`]).
//! It is generic over the address type, so simulations use integers.
//!
//! ```
//! use comms_gossip::node::{Config, GossipNode, NodeRecord};
//! use std::time::Instant;
//!
//! let now = Instant::now();
//! let mut a = GossipNode::new("a", 1u32, Config::default(), 1, now);
//! let mut b = GossipNode::new("b", 2u32, Config::default(), 2, now);
//! a.set_record(NodeRecord::new("a"), now).unwrap();
//! b.set_record(NodeRecord::new("b"), now).unwrap();
//! b.join(&[1], now); // b asks a, its seed, for the member table
//! for _ in 0..4 {
//!     while let Some((to, datagram)) = a.poll_transmit() {
//!         assert_eq!(to, 2);
//!         b.handle_datagram(1, &datagram, now).unwrap();
//!     }
//!     while let Some((to, datagram)) = b.poll_transmit() {
//!         assert_eq!(to, 1);
//!         a.handle_datagram(2, &datagram, now).unwrap();
//!     }
//! }
//! assert_eq!(a.peers()[0].id.as_str(), "b");
//! assert_eq!(b.peers()[0].id.as_str(), "a");
//! ```
//!
//! ## Joining and anti-entropy
//!
//! Piggybacked gossip spreads a change to everyone in O(log n) periods, but a newcomer needs the
//! whole table at once. [`GossipNode::join`] sends this node's `Alive` to each seed in a `Join`
//! message, which the seed gossips on and answers with its table (retried every two periods
//! until a table arrives); [`EARLY_SYNCS`] syncs with random members follow, 3 to 6 periods
//! apart, for those who joined after the seed's answer. Every `sync_interval` (scaled up by `1 + ceil(log2(n / 32))` beyond 32
//! members, as memberlist does, so the cost per node stays flat) a member exchanges tables with
//! one random live member (`State` both ways), which heals what gossip missed (a partition,
//! updates dropped from a full queue). What a node learns from a table is merged but not gossiped
//! on: it is not news, and re-gossiping whole tables would flood every piggyback queue.
//!
//! ## Bounds and rate limits
//!
//! - member table: `max_members` entries (see [`crate::membership`]); records up to what one
//!   update in one datagram carries (`max_datagram` minus [`BODY_ALLOWANCE`]) and
//!   `NodeRecord::check`.
//! - piggyback queue: `max_members` updates (see [`crate::dissemination`]).
//! - outgoing datagrams: [`MAX_TRANSMITS_QUEUED`]; beyond it new ones are dropped and counted.
//! - events: [`EVENT_CAPACITY`]; beyond it new ones are dropped and counted (`peers` stays
//!   exact).
//! - state requests (joins, syncs): answered at most once per source address per period and
//!   `max_state_replies_per_period` times in all per period; the others are counted and
//!   dropped. A reply is the whole table, so this bounds how much traffic a stranger can make
//!   this node send (to itself or, with a forged source address, to someone else).
//! - relayed probes: see [`crate::failure_detector`].
//!
//! ## Authenticated mode
//!
//! [`GossipNode::authenticate`] (the plugin calls it when the node runs with
//! `security.links = "noise"`) makes every datagram this node queues sealed
//! ([`crate::protocol::seal`]: version 2, its id, its clock, its signature) and every datagram
//! it handles opened ([`crate::protocol::open`]) before anything in it is decoded: a datagram
//! from a key that is not allowed, with a bad signature, a time more than 5 minutes from ours
//! (a replay) or in plaintext is refused whole, changes nothing and is counted
//! ([`Stats::unauthenticated`]). `Alive` records carry their owner's signature (see
//! [`crate::membership`]), and a `Join` must carry the sender's own `Alive` only. So a table
//! reply (which ends a join's retries) comes from an allowed member. The node reads no clock:
//! the caller sets wall-clock time with [`GossipNode::set_wall_clock`], and it advances with the
//! `Instant`s handed in. Plaintext and authenticated members do not understand each other.

use crate::{
    auth::{self, AuthError, LinkSecurity, PublicKey, WallClock},
    dissemination::{retransmit_limit, Dissemination},
    failure_detector::{AckFor, FailureDetector},
    membership::{MemberEvent, Membership, RecordError, Status},
    protocol::{
        decode, encode_update, finish_datagram, open, seal, start_datagram, Address, Body, DecodeError,
        Update, COUNT_BYTES, MAX_UPDATES_PER_DATAGRAM,
    },
};
/// The record a member carries (re-exported: the type [`GossipNode::set_record`] takes).
pub use comms_plugin_api::NodeRecord;
use rand::{rngs::StdRng, seq::IteratorRandom, Rng, SeedableRng};
use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, Instant},
};

/// Room kept in every datagram for the header, the body (a `PingReq` naming a 255-byte id and
/// an IPv6 address) and the update count: a record's `Alive` update may take the rest.
pub const BODY_ALLOWANCE: usize = 320;
/// Room kept in every datagram of an authenticated member for the trailer of the longest node
/// id (255 bytes): the same on every member, so the largest record is too.
pub const AUTH_ALLOWANCE: usize = 255 + auth::TRAILER;
/// Datagrams waiting for the caller to send them.
pub const MAX_TRANSMITS_QUEUED: usize = 4096;
/// Events waiting for the caller.
pub const EVENT_CAPACITY: usize = 4096;
/// Seeds kept.
pub const MAX_SEEDS: usize = 64;
/// Table syncs with random members right after joining, before the (scaled) sync interval
/// takes over: a newcomer's table misses whoever joined after the seed answered, and a few
/// rounds of push-pull among newcomers fill that in (the missing share squares each round).
pub const EARLY_SYNCS: u32 = 2;
/// Protocol periods between early syncs (and from the join request to the first).
const EARLY_SYNC_PERIODS: std::ops::Range<f64> = 3.0..6.0;

/// Timing and limits of a [`GossipNode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// One probe per period.
    pub protocol_period: Duration,
    /// How long a direct ping may take before indirect probes go out; below the period.
    pub probe_timeout: Duration,
    /// Members asked to probe indirectly (`k`).
    pub indirect_probes: usize,
    /// Suspicion timeout = `suspicion_multiplier · max(1, log10(n)) · protocol_period`.
    pub suspicion_multiplier: u32,
    /// Each update is piggybacked `retransmit_multiplier · ceil(log10(n + 1))` times (λ).
    pub retransmit_multiplier: u32,
    /// Member table entries, tombstones included (also the piggyback queue's size).
    pub max_members: usize,
    /// The largest datagram written or accepted.
    pub max_datagram: usize,
    /// Time between table exchanges with a random member (scaled with the group's size).
    pub sync_interval: Duration,
    /// Table requests (joins, syncs) answered per period, in all.
    pub max_state_replies_per_period: usize,
    /// How long a dead or left member is remembered, so stale gossip cannot bring it back.
    pub tombstone_retention: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            protocol_period: Duration::from_millis(1000),
            probe_timeout: Duration::from_millis(500),
            indirect_probes: 3,
            suspicion_multiplier: 4,
            retransmit_multiplier: 4,
            max_members: 4096,
            max_datagram: 1400,
            sync_interval: Duration::from_secs(30),
            max_state_replies_per_period: 16,
            tombstone_retention: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// `Err((field, why))` naming the first field that is out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        use crate::protocol::{MAX_DATAGRAM, MIN_DATAGRAM};
        let period = self.protocol_period;
        if period < Duration::from_millis(10) || period > Duration::from_secs(3600) {
            return Err(("protocol_period", format!("{period:?} is outside 10 ms..=1 h")));
        }
        if self.probe_timeout.is_zero() || self.probe_timeout >= period {
            let why =
                format!("{:?} must be above 0 and below the protocol period {period:?}", self.probe_timeout);
            return Err(("probe_timeout", why));
        }
        if self.indirect_probes > 16 {
            return Err(("indirect_probes", format!("{} is above 16", self.indirect_probes)));
        }
        if !(1..=100).contains(&self.suspicion_multiplier) {
            return Err((
                "suspicion_multiplier",
                format!("{} is outside 1..=100", self.suspicion_multiplier),
            ));
        }
        if !(1..=100).contains(&self.retransmit_multiplier) {
            return Err((
                "retransmit_multiplier",
                format!("{} is outside 1..=100", self.retransmit_multiplier),
            ));
        }
        if !(2..=1_000_000).contains(&self.max_members) {
            return Err(("max_members", format!("{} is outside 2..=1000000", self.max_members)));
        }
        if !(MIN_DATAGRAM..=MAX_DATAGRAM).contains(&self.max_datagram) {
            return Err((
                "max_datagram",
                format!("{} is outside {MIN_DATAGRAM}..={MAX_DATAGRAM}", self.max_datagram),
            ));
        }
        if self.sync_interval < period || self.sync_interval > Duration::from_secs(86_400) {
            let why = format!("{:?} is outside the protocol period {period:?}..=1 day", self.sync_interval);
            return Err(("sync_interval", why));
        }
        Ok(())
    }

    /// The largest encoded update (an `Alive` with its record).
    pub fn max_update_bytes(&self) -> usize {
        self.max_datagram.saturating_sub(BODY_ALLOWANCE)
    }
}

/// Counters of a [`GossipNode`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams queued for sending.
    pub datagrams_sent: u64,
    /// Of which probe traffic: pings, ping-requests, acks (direct, relayed, forwarded).
    pub probe_datagrams_sent: u64,
    /// Datagrams accepted.
    pub datagrams_received: u64,
    /// Datagrams refused by the decoder (authentication failures included).
    pub malformed: u64,
    /// Of which refused by authentication (authenticated mode): plaintext, not signed by an
    /// allowed key, outside the time window, or a `Join` carrying another member's record.
    pub unauthenticated: u64,
    /// Direct probes started.
    pub probes: u64,
    /// Ping-requests sent.
    pub indirect_probes: u64,
    /// Members this node suspected (its probe failed).
    pub suspicions: u64,
    /// Members this node declared dead (their suspicion timed out here).
    pub deaths_declared: u64,
    /// Member tables sent in reply to joins and syncs.
    pub state_replies: u64,
    /// Table requests refused by the rate limits.
    pub state_requests_refused: u64,
    /// Ping-requests refused: too many relays pending.
    pub relays_refused: u64,
    /// Datagrams dropped: the outgoing queue was full.
    pub transmits_dropped: u64,
    /// Events dropped: the event queue was full.
    pub events_dropped: u64,
}

/// A gossip member. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct GossipNode<A> {
    config: Config,
    membership: Membership<A>,
    dissemination: Dissemination,
    detector: FailureDetector<A>,
    rng: StdRng,
    transmits: VecDeque<(A, Vec<u8>)>,
    events: VecDeque<MemberEvent>,
    seeds: Vec<A>,
    next_period: Instant,
    next_join: Instant,
    next_sync: Instant,
    /// Sources whose table request was answered this period.
    served: HashSet<A>,
    /// A member table arrived (a seed's answer to a join, or a sync): joins stop.
    has_table: bool,
    /// Early syncs left, see [`EARLY_SYNCS`].
    early_syncs: u32,
    /// Authenticated mode.
    auth: Option<Auth>,
    /// The latest time handed in (the time of datagrams queued by calls that take none).
    latest: Instant,
    stats: Stats,
}

/// What an authenticated member seals and opens datagrams with.
#[derive(Debug, Clone)]
struct Auth {
    security: LinkSecurity,
    clock: WallClock,
}

impl<A: Address> GossipNode<A> {
    /// Member `id` gossiping at `address`; `seed` seeds its random choices. `config` should have
    /// passed [`Config::validate`] (out-of-range values are clamped, never a panic).
    pub fn new(id: &str, address: A, config: Config, seed: u64, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut config = config;
        config.max_datagram =
            config.max_datagram.clamp(crate::protocol::MIN_DATAGRAM, crate::protocol::MAX_DATAGRAM);
        // Clamped so that no timer arithmetic can overflow (Instant + Duration panics on overflow).
        const DAY: Duration = Duration::from_secs(86_400);
        config.protocol_period =
            config.protocol_period.clamp(Duration::from_millis(1), Duration::from_secs(3600));
        config.probe_timeout = config.probe_timeout.min(config.protocol_period);
        config.sync_interval = config.sync_interval.clamp(config.protocol_period, DAY);
        config.tombstone_retention = config.tombstone_retention.min(DAY);
        config.suspicion_multiplier = config.suspicion_multiplier.clamp(1, 100);
        config.retransmit_multiplier = config.retransmit_multiplier.clamp(1, 100);
        config.indirect_probes = config.indirect_probes.min(16);
        let membership = Membership::new(id, address, config.max_members, config.max_update_bytes());
        let dissemination = Dissemination::new(config.max_members);
        let detector = FailureDetector::new(rng.gen());
        // Spread the first period over one period, so nodes started together do not probe in step.
        let first = now + config.protocol_period.mul_f64(rng.gen_range(0.0..1.0));
        let sync_jitter = config.sync_interval.mul_f64(rng.gen_range(0.5..1.0));
        Self {
            membership,
            dissemination,
            detector,
            rng,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            seeds: Vec::new(),
            next_period: first,
            next_join: now,
            next_sync: now + sync_jitter,
            served: HashSet::new(),
            has_table: false,
            early_syncs: 0,
            auth: None,
            latest: now,
            stats: Stats::default(),
            config,
        }
    }

    /// Switches to authenticated mode (see the [module documentation](self)) with this node's
    /// identity and allow list; the wall clock reads `unix_ms` (milliseconds since the Unix
    /// epoch) at `now`. Call before [`GossipNode::set_record`]. Refused if this node's id is not
    /// bound to the identity's public key.
    pub fn authenticate(&mut self, security: LinkSecurity, now: Instant, unix_ms: u64) -> Result<(), String> {
        let id = self.membership.local_id();
        let key = security.identity.public_key();
        if PublicKey::of_node(&comms_plugin_api::NodeId::new(id)) != Some(key) {
            return Err(format!("the node id `{id}` is not bound to this node's public key {key}"));
        }
        if id.len() > u8::MAX as usize {
            return Err(format!("the node id `{id}` is longer than 255 bytes"));
        }
        let max_update_bytes = self.config.max_datagram.saturating_sub(AUTH_ALLOWANCE + BODY_ALLOWANCE);
        self.membership.authenticate(security.clone(), max_update_bytes);
        self.auth = Some(Auth { security, clock: WallClock::new(now, unix_ms) });
        Ok(())
    }

    /// Whether datagrams are sealed and opened (authenticated mode).
    pub fn is_authenticated(&self) -> bool {
        self.auth.is_some()
    }

    /// Sets the wall clock (authenticated mode): `unix_ms` milliseconds since the Unix epoch at
    /// `now`. Datagrams carry it; those more than 5 minutes from it are refused.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.touch(now);
        if let Some(auth) = &mut self.auth {
            auth.clock.set(now, unix_ms);
        }
    }

    fn touch(&mut self, now: Instant) {
        self.latest = self.latest.max(now);
    }

    /// Bytes of a datagram left for the message once the trailer (authenticated mode) is in.
    fn payload_limit(&self) -> usize {
        match &self.auth {
            Some(_) => {
                self.config.max_datagram.saturating_sub(self.membership.local_id().len() + auth::TRAILER)
            }
            None => self.config.max_datagram,
        }
    }

    /// Publishes (or replaces) this node's record: it joins the group, or, if it is a member,
    /// gossips the new record with a higher incarnation. Sends a join to the seeds if it knows
    /// no member yet.
    pub fn set_record(&mut self, record: NodeRecord, now: Instant) -> Result<(), RecordError> {
        self.touch(now);
        if self.membership.set_local_record(record)? {
            self.gossip_local_alive();
            if !self.has_table {
                self.send_join(now);
            }
        }
        Ok(())
    }

    /// Sets the seeds (their gossip addresses; this node's own is skipped) and, if this node has
    /// a record, asks them for the member table.
    pub fn join(&mut self, seeds: &[A], now: Instant) {
        self.touch(now);
        let own = self.membership.local_address();
        self.has_table = false;
        self.early_syncs = EARLY_SYNCS;
        self.seeds = seeds.iter().copied().filter(|seed| *seed != own).take(MAX_SEEDS).collect();
        self.seeds.dedup();
        self.send_join(now);
    }

    /// Leaves gracefully: gossips `Left` about this node, pushed at once to a few random members,
    /// and stops probing and answering probes. [`GossipNode::set_record`] joins again.
    pub fn leave(&mut self) {
        let Some(left) = self.membership.leave() else { return };
        let id = self.membership.local_id().to_string();
        self.dissemination.push(&id, left.clone());
        let fanout = self.config.indirect_probes.max(1) + 1;
        let targets: Vec<A> = self
            .membership
            .iter()
            .filter(|(_, member)| member.status.is_live())
            .map(|(_, member)| member.address)
            .choose_multiple(&mut self.rng, fanout);
        for to in targets {
            let datagram = finish_datagram(start_datagram::<A>(&Body::Push), &[&left]);
            self.queue(to, datagram, false);
        }
    }

    /// Handles one received datagram; `Err` (counted in [`Stats::malformed`], and in
    /// [`Stats::unauthenticated`] if authentication refused it) if it is not a valid gossip
    /// datagram, which changes nothing.
    pub fn handle_datagram(&mut self, from: A, bytes: &[u8], now: Instant) -> Result<(), DecodeError> {
        self.touch(now);
        if bytes.len() > self.config.max_datagram {
            self.stats.malformed += 1;
            return Err(DecodeError::Malformed("datagram: larger than max_datagram"));
        }
        let message = self.open(bytes, now).inspect_err(|error| {
            self.stats.malformed += 1;
            if error.is_authentication() {
                self.stats.unauthenticated += 1;
            }
        })?;
        self.stats.datagrams_received += 1;
        // A table transfer is not news: re-gossiping a whole table learned at a join would put
        // every member in the piggyback queue of every newcomer.
        let gossip = !matches!(message.body, Body::State { .. });
        for update in &message.updates {
            self.apply(update, now, gossip);
        }
        let member = self.membership.is_member();
        match message.body {
            Body::Ping { seq, target } => {
                if member && target == self.membership.local_id() {
                    self.send_with_gossip(from, &Body::Ack { seq }, None);
                }
            }
            Body::PingReq { seq, target, address } => {
                if !member {
                    return Ok(());
                }
                match self.detector.add_relay(from, seq, now + self.config.protocol_period) {
                    Some(relay_seq) => {
                        self.send_with_gossip(address, &Body::Ping { seq: relay_seq, target }, None)
                    }
                    None => self.stats.relays_refused += 1,
                }
            }
            Body::Ack { seq } => {
                if let AckFor::Relay { origin, seq } = self.detector.on_ack(seq) {
                    self.send_with_gossip(origin, &Body::Ack { seq }, None);
                }
            }
            Body::Push => {}
            Body::State { respond: false } => self.has_table = true,
            Body::Join | Body::State { respond: true } => {
                if member {
                    if self.served.len() < self.config.max_state_replies_per_period
                        && self.served.insert(from)
                    {
                        self.stats.state_replies += 1;
                        self.send_state(from, false);
                    } else {
                        self.stats.state_requests_refused += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes a datagram: in authenticated mode, only once its trailer checks out, and a
    /// `Join` only with the sender's own `Alive`.
    fn open(&self, bytes: &[u8], now: Instant) -> Result<crate::protocol::Message<A>, DecodeError> {
        let Some(auth) = &self.auth else { return decode::<A>(bytes) };
        let (sender, message) = open::<A>(&auth.security, bytes, auth.clock.unix_ms(now))?;
        if message.body == Body::Join
            && !message
                .updates
                .iter()
                .all(|update| matches!(update, Update::Alive { id, .. } if id == sender))
        {
            return Err(DecodeError::Auth(AuthError::WrongSender));
        }
        Ok(message)
    }

    /// Runs what is due at `now`: suspicion timeouts, the indirect probe, the end of the period
    /// (suspect an unanswered target, retry the join, sync, start the next probe).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.touch(now);
        for (id, incarnation) in self.membership.expired_suspicions(now) {
            self.stats.deaths_declared += 1;
            self.apply(&Update::Dead { id, incarnation }, now, true);
        }
        if let Some(probe) = self.detector.indirect_due(now) {
            let helpers: Vec<A> = self
                .membership
                .iter()
                .filter(|(id, member)| member.status.is_live() && *id != probe.target)
                .map(|(_, member)| member.address)
                .choose_multiple(&mut self.rng, self.config.indirect_probes);
            for helper in helpers {
                self.stats.indirect_probes += 1;
                let body =
                    Body::PingReq { seq: probe.seq, target: probe.target.clone(), address: probe.address };
                self.send_with_gossip(helper, &body, None);
            }
        }
        if now < self.next_period {
            return;
        }
        self.next_period += self.config.protocol_period;
        if self.next_period <= now {
            self.next_period = now + self.config.protocol_period; // the caller was late: skip, do not burst
        }
        if let Some(failed) = self.detector.finish_probe() {
            if let Some(member) = self.membership.get(&failed.target).filter(|m| m.status == Status::Alive) {
                self.stats.suspicions += 1;
                let update = Update::Suspect { id: failed.target, incarnation: member.incarnation };
                self.apply(&update, now, true);
            }
        }
        self.membership.forget_tombstones(now, self.config.tombstone_retention);
        self.detector.expire_relays(now);
        self.served.clear();
        if !self.membership.is_member() {
            return;
        }
        if !self.has_table && now >= self.next_join {
            self.send_join(now);
        }
        if now >= self.next_sync {
            let partner = self
                .membership
                .iter()
                .filter(|(_, member)| member.status.is_live())
                .map(|(_, member)| member.address)
                .choose(&mut self.rng);
            // Nobody to sync with yet: try again next period.
            if let Some(partner) = partner {
                self.next_sync = if self.early_syncs > 0 {
                    self.early_syncs -= 1;
                    now + self.config.protocol_period.mul_f64(self.rng.gen_range(EARLY_SYNC_PERIODS))
                } else {
                    let scale = sync_scale(self.membership.live_count() + 1);
                    now + self.config.sync_interval.mul_f64(scale * self.rng.gen_range(0.75..1.25))
                };
                self.send_state(partner, true);
            }
        }
        if let Some(probe) =
            self.detector.start_probe(&self.membership, now, self.config.probe_timeout, &mut self.rng)
        {
            self.stats.probes += 1;
            // A suspect target hears of it first, so that it refutes in its ack.
            let suspicion =
                self.membership.get(&probe.target).filter(|member| member.status == Status::Suspect).map(
                    |member| {
                        encode_update::<A>(&Update::Suspect {
                            id: probe.target.clone(),
                            incarnation: member.incarnation,
                        })
                    },
                );
            let body = Body::Ping { seq: probe.seq, target: probe.target };
            self.send_with_gossip(probe.address, &body, suspicion);
        }
    }

    /// When [`GossipNode::handle_timeout`] wants to run next.
    pub fn next_timeout(&self) -> Instant {
        [Some(self.next_period), self.detector.next_timeout(), self.membership.next_suspicion_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_period)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(A, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// Records of the alive and suspect members, this node excluded.
    pub fn peers(&self) -> Vec<NodeRecord> {
        self.membership.iter().filter(|(_, m)| m.status.is_live()).map(|(_, m)| m.record.clone()).collect()
    }

    /// The member table.
    pub fn membership(&self) -> &Membership<A> {
        &self.membership
    }

    /// Updates waiting in the piggyback queue.
    pub fn queued_updates(&self) -> usize {
        self.dissemination.len()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The config in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn suspicion_timeout(&self) -> Duration {
        let n = (self.membership.live_count() + 1) as f64;
        let scale = n.log10().max(1.0);
        self.config.protocol_period.mul_f64(scale * self.config.suspicion_multiplier as f64)
    }

    /// Merges one update and does what it calls for.
    fn apply(&mut self, update: &Update<A>, now: Instant, gossip: bool) {
        let timeout = self.suspicion_timeout();
        let outcome = self.membership.apply(update, now, timeout);
        if outcome.rebroadcast && gossip {
            self.dissemination.push(update.id(), encode_update(update));
        }
        if outcome.refuted {
            self.gossip_local_alive();
        }
        if outcome.now_live {
            self.detector.insert(update.id(), &mut self.rng);
        }
        if let Some(event) = outcome.event {
            if self.events.len() >= EVENT_CAPACITY {
                self.stats.events_dropped += 1;
            } else {
                self.events.push_back(event);
            }
        }
    }

    fn gossip_local_alive(&mut self) {
        if let Some(alive) = self.membership.local_alive().map(<[u8]>::to_vec) {
            let id = self.membership.local_id().to_string();
            self.dissemination.push(&id, alive);
        }
    }

    /// Asks every seed for its table (with this node's `Alive`), if this node is a member.
    fn send_join(&mut self, now: Instant) {
        let Some(alive) = self.membership.local_alive().filter(|_| self.membership.is_member()) else {
            return;
        };
        if self.seeds.is_empty() {
            return;
        }
        let alive = alive.to_vec();
        self.next_join = now + self.config.protocol_period * 2;
        // A seed's table misses whoever joins after us: the first syncs come a few periods
        // apart, not a whole (scaled) sync interval later.
        let first_sync = now + self.config.protocol_period.mul_f64(self.rng.gen_range(EARLY_SYNC_PERIODS));
        self.next_sync = self.next_sync.min(first_sync);
        for seed in self.seeds.clone() {
            let datagram = finish_datagram(start_datagram::<A>(&Body::Join), &[&alive]);
            self.queue(seed, datagram, false);
        }
    }

    /// Sends the whole member table to `to`, in as many datagrams as it takes.
    fn send_state(&mut self, to: A, respond: bool) {
        let start = start_datagram::<A>(&Body::State { respond });
        for datagram in self.membership.snapshot_datagrams(&start, self.payload_limit()) {
            self.queue(to, datagram, false);
        }
    }

    /// Sends `body` to `to` with `first` (if it fits) and as many queued updates as fit.
    fn send_with_gossip(&mut self, to: A, body: &Body<A>, first: Option<Vec<u8>>) {
        let start = start_datagram(body);
        let mut room = self.payload_limit().saturating_sub(start.len() + COUNT_BYTES);
        let mut updates = Vec::new();
        if let Some(first) = first.filter(|first| first.len() <= room) {
            room -= first.len();
            updates.push(first);
        }
        let limit = retransmit_limit(self.config.retransmit_multiplier, self.membership.live_count() + 1);
        updates.extend(self.dissemination.take(room, limit, MAX_UPDATES_PER_DATAGRAM - updates.len()));
        let slices: Vec<&[u8]> = updates.iter().map(Vec::as_slice).collect();
        let datagram = finish_datagram(start, &slices);
        self.queue(to, datagram, true);
    }

    fn queue(&mut self, to: A, datagram: Vec<u8>, probe: bool) {
        if self.transmits.len() >= MAX_TRANSMITS_QUEUED {
            self.stats.transmits_dropped += 1;
            return;
        }
        let datagram = match &self.auth {
            Some(auth) => {
                let unix_ms = auth.clock.unix_ms(self.latest);
                seal(&auth.security, self.membership.local_id(), datagram, unix_ms)
            }
            None => datagram,
        };
        self.stats.datagrams_sent += 1;
        if probe {
            self.stats.probe_datagrams_sent += 1;
        }
        self.transmits.push_back((to, datagram));
    }
}

/// memberlist's push-pull scaling: 1 up to 32 members, then `1 + ceil(log2(n / 32))`.
fn sync_scale(members: usize) -> f64 {
    if members <= 32 {
        1.0
    } else {
        1.0 + (members as f64 / 32.0).log2().ceil()
    }
}

#[cfg(test)]
mod tests;

//! The DHT node as a sans-IO state machine: routing table, lookups, record store and this
//! node's own publications, driven by datagrams and time handed in.
//!
//! [`DhtNode`] owns no socket and reads no clock. Feed it datagrams
//! ([`DhtNode::handle_datagram`]) and wake it at [`DhtNode::next_timeout`]
//! ([`DhtNode::handle_timeout`]); take out datagrams to send ([`DhtNode::poll_transmit`]) and
//! events ([`DhtNode::poll_event`]: peers joining, leaving, changing, and finished lookups).
//! Commands: [`DhtNode::bootstrap`], [`DhtNode::publish`], [`DhtNode::withdraw`],
//! [`DhtNode::find_service`], [`DhtNode::set_find_services`].
//!
//! ```
//! use comms_kademlia::node::{Config, DhtNode};
//! use std::time::Instant;
//! let now = Instant::now();
//! let mut a = DhtNode::<u32>::new("a", Config::default(), now);
//! let mut b = DhtNode::<u32>::new("b", Config::default(), now);
//! b.bootstrap(vec![1], now); // a is at address 1, b at 2
//! while let Some((to, bytes)) = b.poll_transmit() {
//!     assert_eq!(to, 1);
//!     a.handle_datagram(2, &bytes, now);
//! }
//! while let Some((to, bytes)) = a.poll_transmit() {
//!     assert_eq!(to, 2);
//!     b.handle_datagram(1, &bytes, now);
//! }
//! assert_eq!((a.contact_count(), b.contact_count()), (1, 1));
//! ```
//!
//! ## What it does
//!
//! - **Bootstrap**: PING the seeds (again every [`Config::bootstrap_retry`] while the table is
//!   empty); the first answer starts a lookup of our own key, which fills the table with our
//!   neighbourhood and makes us known to it.
//! - **Publish**: our record under our node key and, for each service it lists, under the
//!   service key: a FIND_NODE lookup of the key, then STORE at the k closest nodes that answered.
//!   Republished every `record_ttl / 2`, so values never expire while we live.
//! - **Hand-over**: when a new contact is closer to a key we keep values under than we are, and
//!   we are among the [`HANDOVER_RANK`] closest to that key we know of, we STORE copies (with their remaining
//!   time to live) at the new contact: values follow the k closest nodes as the network grows.
//! - **Find**: a FIND_VALUE lookup of a service key collects the providers' records; those found
//!   are known until their time to live runs out (unless found again).
//! - **Contacts' records** ([`Config::learn_contact_records`]): each contact added to the table
//!   is asked for its own record; our record is pushed to our contacts when it changes. A contact
//!   that leaves the table (it stopped answering, or said GOODBYE) takes its record with it.
//! - **Refresh**: every [`Config::refresh_interval`], a lookup of a random key in each bucket not
//!   looked into since.
//! - **Failures**: a request unanswered for [`Config::request_timeout`] fails; a contact that
//!   fails [`crate::routing_table::MAX_FAILURES`] requests in a row and has been silent for
//!   two request timeouts (or fails one, when a newcomer waits for its place in a full bucket)
//!   is dropped from the table, and the newcomer takes its place. Requests that time out
//!   together (a node starved of CPU for a moment) do not drop a contact heard from lately.
//!
//! ## Authenticated mode
//!
//! [`DhtNode::authenticate`] (the plugin calls it when the node runs with
//! `security.links = "noise"`) seals every datagram this node sends
//! ([`crate::protocol::seal`]: version 2, its node id, its clock, its signature) and opens every
//! datagram it handles ([`crate::protocol::open`]) before anything in it is parsed: a datagram
//! from a key that is not allowed, with a bad signature, a sender key that is not its signer's,
//! a time more than 5 minutes from ours (a replay) or in plaintext is refused whole, changes
//! nothing and is counted ([`Stats::unauthenticated`]). Records travel signed by their own node
//! ([`crate::protocol::sign_record`]), so a node can store, hand over or return only records
//! their nodes signed: nobody can publish a provider of a service in another node's name.
//! Since a datagram replayed within the window from another address would otherwise put its
//! signer's key at that address in the routing table, a *request* from a key the table does not
//! have at that address only makes this node PING the address; the key goes into the table
//! when a fresh, signed PONG comes back from there (responses count only with their random
//! transaction id, so they cannot be replayed). The node reads no clock: the caller sets the
//! wall-clock time with [`DhtNode::set_wall_clock`], and it advances with the `Instant`s handed
//! in. Plaintext and authenticated nodes do not understand each other.

use crate::{
    auth::{self, LinkSecurity, PublicKey, WallClock},
    key::Key,
    lookup::Lookup,
    protocol::{
        decode_value, encode_record, open, seal, sign_record, Body, Contact, DecodeError, Message,
        RecordTooLarge, Value, WireAddress, HEADER, MAX_DATAGRAM,
    },
    routing_table::{Insert, RoutingTable},
    store::{RecordStore, StoreLimits, StoreOutcome},
};
use comms_plugin_api::{NodeRecord, PeerEvent, PeerEventKind};
use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

/// A node hands its values under a key over to a new contact closer to the key only if fewer
/// than this many contacts (the new one included) are closer to it than the node itself.
pub const HANDOVER_RANK: usize = 3;

/// Parameters and bounds of a [`DhtNode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Bucket size and replication factor (at most [`crate::protocol::MAX_CONTACTS`]).
    pub k: usize,
    /// Queries in flight per lookup.
    pub alpha: usize,
    /// How long a request may go unanswered.
    pub request_timeout: Duration,
    /// Time to live of our values at other nodes; republished every half of it.
    pub record_ttl: Duration,
    /// How often stale buckets are refreshed.
    pub refresh_interval: Duration,
    /// How often the services of [`DhtNode::set_find_services`] are looked up.
    pub find_interval: Duration,
    /// How often the seeds are pinged again while the routing table is empty (and how soon a
    /// publication or search that found nobody is tried again).
    pub bootstrap_retry: Duration,
    /// How often expired values and records are swept.
    pub sweep_interval: Duration,
    /// Ask each new contact for its record, and push ours to our contacts when it changes.
    pub learn_contact_records: bool,
    /// Bounds of the values kept for others.
    pub store: StoreLimits,
    /// Peer records known at once.
    pub max_known: usize,
    /// Requests awaiting an answer.
    pub max_pending_requests: usize,
    /// Lookups running at once.
    pub max_lookups: usize,
    /// Events waiting to be polled (the oldest is dropped beyond it).
    pub max_events: usize,
    /// Datagrams waiting to be sent (further ones are dropped; their requests time out).
    pub max_transmits: usize,
    /// Seed of the node's random numbers (transaction ids, refresh keys).
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: 20,
            alpha: 3,
            request_timeout: Duration::from_secs(1),
            record_ttl: Duration::from_secs(600),
            refresh_interval: Duration::from_secs(3600),
            find_interval: Duration::from_secs(30),
            bootstrap_retry: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(1),
            learn_contact_records: true,
            store: StoreLimits::default(),
            max_known: 10_000,
            max_pending_requests: 4096,
            max_lookups: 256,
            max_events: 1024,
            max_transmits: 8192,
            seed: 1,
        }
    }
}

/// Why a lookup ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupPurpose {
    /// Our own key after bootstrap, or a bucket refresh.
    Refresh,
    /// Finding where to STORE (or remove, with ttl 0) a value of ours.
    Publish,
    /// Finding the providers of a service.
    FindService(String),
}

/// The numbers of a finished lookup.
#[derive(Debug, Clone)]
pub struct LookupReport {
    /// The key looked up.
    pub target: Key,
    /// Why.
    pub purpose: LookupPurpose,
    /// For [`LookupPurpose::FindService`], the providers found.
    pub providers: Vec<NodeRecord>,
    /// FIND queries sent.
    pub queries: u32,
    /// Answers received.
    pub answers: u32,
    /// Hops to the first node that returned a value (`None`: none did).
    pub value_hops: Option<u32>,
    /// The deepest hop among the k closest that answered.
    pub hops: u32,
    /// From start to finish.
    pub duration: Duration,
}

/// What a [`DhtNode`] reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A peer record appeared, changed or went.
    Peer(PeerEvent),
    /// A lookup finished.
    Lookup(LookupReport),
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed out to send.
    pub sent: u64,
    /// Datagrams received that parsed.
    pub received: u64,
    /// Datagrams that did not parse (authentication failures included).
    pub malformed: u64,
    /// Of which refused by authentication (authenticated mode): plaintext, not signed by an
    /// allowed key, outside the time window, or carrying a record its node did not sign.
    pub unauthenticated: u64,
    /// Responses that matched no request (late, or forged).
    pub unsolicited: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// STOREs refused (rate limit, bounds, invalid).
    pub stores_refused: u64,
    /// Datagrams, events, requests or records dropped because a bound was reached.
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    /// A seed's key is unknown until it answers.
    Bootstrap,
    /// Is the oldest contact of a full bucket still there?
    Evict,
    Lookup(u64),
    /// A new contact's own record.
    FetchRecord,
    Store,
    /// Authenticated mode: does the key that sent a request answer at its address?
    Verify,
}

#[derive(Debug, Clone)]
struct Request<A> {
    to: A,
    key: Option<Key>,
    kind: RequestKind,
    deadline: Instant,
}

#[derive(Debug)]
struct Running<A> {
    lookup: Lookup<A>,
    purpose: LookupPurpose,
    started: Instant,
    /// Publish: what to STORE at the closest nodes, and for how long (0: remove).
    store: Option<(Vec<u8>, Duration)>,
}

#[derive(Debug)]
struct Known {
    record: NodeRecord,
    /// Learned from the routing table: kept while the contact is there.
    contact: bool,
    /// Learned by a lookup: kept until then (or while a contact).
    expires: Option<Instant>,
}

/// The random generator's first state: the configured seed mixed with our key (so that nodes
/// given the same seed still differ), never 0 (xorshift would stay at 0 forever).
fn initial_rng(seed: u64, own: &Key) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&own.0[..8]);
    match seed.max(1) ^ u64::from_be_bytes(first) {
        0 => 1,
        mixed => mixed,
    }
}

/// A Kademlia node over addresses of type `A`.
#[derive(Debug)]
pub struct DhtNode<A> {
    config: Config,
    own: Key,
    own_id: String,
    table: RoutingTable<A>,
    store: RecordStore<A>,
    rng: u64,
    requests: HashMap<u64, Request<A>>,
    lookups: HashMap<u64, Running<A>>,
    next_lookup: u64,
    transmits: VecDeque<(A, Vec<u8>)>,
    events: VecDeque<Event>,
    seeds: Vec<A>,
    bootstrapped: bool,
    next_bootstrap: Option<Instant>,
    own_record: Option<(NodeRecord, Vec<u8>)>,
    next_republish: Option<Instant>,
    find_services: Vec<String>,
    next_find: Option<Instant>,
    next_refresh: Instant,
    next_sweep: Instant,
    known: HashMap<Key, Known>,
    evicting: HashSet<Key>,
    /// Authenticated mode.
    auth: Option<Auth>,
    /// Keys whose address is being checked (authenticated mode).
    verifying: HashSet<Key>,
    /// The latest time handed in (the time of datagrams sent).
    latest: Instant,
    stats: Stats,
}

/// What an authenticated node seals and opens datagrams with.
#[derive(Debug, Clone)]
struct Auth {
    security: LinkSecurity,
    clock: WallClock,
}

impl<A: WireAddress> DhtNode<A> {
    /// A node with id `own_id` (its key is the SHA-256 of it).
    pub fn new(own_id: &str, config: Config, now: Instant) -> Self {
        let own = Key::for_node(own_id);
        let config = Config {
            k: config.k.clamp(1, crate::protocol::MAX_CONTACTS),
            alpha: config.alpha.max(1),
            ..config
        };
        Self {
            table: RoutingTable::new(own, config.k),
            store: RecordStore::new(config.store.clone()),
            rng: initial_rng(config.seed, &own),
            own,
            own_id: own_id.to_string(),
            requests: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            seeds: Vec::new(),
            bootstrapped: false,
            next_bootstrap: None,
            own_record: None,
            next_republish: None,
            find_services: Vec::new(),
            next_find: None,
            next_refresh: now + config.refresh_interval,
            next_sweep: now + config.sweep_interval,
            known: HashMap::new(),
            evicting: HashSet::new(),
            auth: None,
            verifying: HashSet::new(),
            latest: now,
            stats: Stats::default(),
            config,
        }
    }

    /// Switches to authenticated mode (see the [module documentation](self)) with this node's
    /// identity and allow list; the wall clock reads `unix_ms` (milliseconds since the Unix
    /// epoch) at `now`. Call before [`DhtNode::publish`]. Refused if this node's id is not bound
    /// to the identity's public key.
    pub fn authenticate(&mut self, security: LinkSecurity, now: Instant, unix_ms: u64) -> Result<(), String> {
        let (id, key) = (&self.own_id, security.identity.public_key());
        if PublicKey::of_node(&comms_plugin_api::NodeId::new(id.as_str())) != Some(key) {
            return Err(format!("the node id `{id}` is not bound to this node's public key {key}"));
        }
        if id.len() > u8::MAX as usize {
            return Err(format!("the node id `{id}` is longer than 255 bytes"));
        }
        self.store.set_signed(true);
        self.auth = Some(Auth { security, clock: WallClock::new(now, unix_ms) });
        self.touch(now);
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

    /// Our key.
    pub fn key(&self) -> Key {
        self.own
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Contacts in the routing table.
    pub fn contact_count(&self) -> usize {
        self.table.len()
    }

    /// The address of contact `key` in the routing table.
    pub fn contact_address(&self, key: &Key) -> Option<A> {
        self.table.address_of(key)
    }

    /// Values kept for others.
    pub fn stored_count(&self) -> usize {
        self.store.len()
    }

    /// Requests awaiting an answer.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }

    /// The peer records known now (never our own).
    pub fn known_records(&self) -> Vec<NodeRecord> {
        self.known.values().map(|known| known.record.clone()).collect()
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, good enough for transaction ids and refresh keys.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    // ----- commands -----

    /// Joins the network through `seeds` (addresses of any nodes in it).
    pub fn bootstrap(&mut self, seeds: Vec<A>, now: Instant) {
        self.touch(now);
        self.seeds = seeds;
        self.bootstrapped = false;
        self.ping_seeds(now);
    }

    fn ping_seeds(&mut self, now: Instant) {
        let seeds = self.seeds.clone();
        for seed in seeds {
            self.request(seed, None, RequestKind::Bootstrap, Body::Ping, now);
        }
        self.next_bootstrap = (!self.seeds.is_empty()).then(|| now + self.config.bootstrap_retry);
    }

    /// Publishes (or replaces) our record: under our node key and under the key of each service
    /// it lists, at the k closest nodes; republished before it expires.
    pub fn publish(&mut self, record: NodeRecord, now: Instant) -> Result<(), RecordTooLarge> {
        self.touch(now);
        let bytes = match &self.auth {
            Some(auth) => sign_record(&auth.security, encode_record(&record)?)?,
            None => encode_record(&record)?,
        };
        let changed = self.own_record.as_ref().is_none_or(|(_, old)| *old != bytes);
        self.own_record = Some((record, bytes.clone()));
        if changed && self.config.learn_contact_records {
            // Contacts that asked for our record before it existed or changed learn it now.
            let contacts: Vec<_> = self.table.contacts().collect();
            let ttl = self.ttl_ms();
            for contact in contacts {
                let body = Body::Store { key: self.own, ttl_ms: ttl, record: bytes.clone() };
                self.request(contact.address, Some(contact.key), RequestKind::Store, body, now);
            }
        }
        self.republish(now);
        Ok(())
    }

    fn ttl_ms(&self) -> u32 {
        self.config.record_ttl.as_millis().clamp(1, u32::MAX as u128) as u32
    }

    /// The keys our record is published under.
    fn publication_keys(&self) -> Vec<Key> {
        let Some((record, _)) = &self.own_record else { return Vec::new() };
        let mut keys = vec![self.own];
        keys.extend(record.services.iter().map(|service| Key::for_service(service)));
        keys.dedup();
        keys
    }

    fn republish(&mut self, now: Instant) {
        let Some((_, bytes)) = self.own_record.clone() else {
            self.next_republish = None;
            return;
        };
        for key in self.publication_keys() {
            self.start_lookup(
                key,
                LookupPurpose::Publish,
                Some((bytes.clone(), self.config.record_ttl)),
                now,
            );
        }
        self.next_republish = Some(now + self.config.record_ttl / 2);
    }

    /// Removes our record: asks the nodes closest to each of its keys (as our table knows
    /// them) to drop it, and says GOODBYE to every contact, which drops our contact record.
    pub fn withdraw(&mut self, now: Instant) {
        self.touch(now);
        let keys = self.publication_keys();
        if let Some((_, bytes)) = self.own_record.take() {
            for key in keys {
                for contact in self.table.closest(&key, self.config.k) {
                    let body = Body::Store { key, ttl_ms: 0, record: bytes.clone() };
                    self.request(contact.address, Some(contact.key), RequestKind::Store, body, now);
                }
            }
        }
        self.next_republish = None;
        let contacts: Vec<_> = self.table.contacts().collect();
        for contact in contacts {
            self.send(contact.address, Message { txid: 0, sender: self.own, body: Body::Goodbye });
        }
    }

    /// Looks up the providers of `service` now; returns the lookup's id. The providers found
    /// become known records, and an [`Event::Lookup`] reports the lookup.
    pub fn find_service(&mut self, service: &str, now: Instant) -> Option<u64> {
        self.touch(now);
        self.start_lookup(
            Key::for_service(service),
            LookupPurpose::FindService(service.to_string()),
            None,
            now,
        )
    }

    /// Services whose providers are looked up every [`Config::find_interval`] (the first time
    /// at once).
    pub fn set_find_services(&mut self, services: Vec<String>, now: Instant) {
        self.touch(now);
        self.find_services = services;
        self.next_find = (!self.find_services.is_empty()).then_some(now);
    }

    // ----- I/O -----

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(A, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`DhtNode::handle_timeout`] must run next.
    pub fn next_timeout(&self) -> Option<Instant> {
        let requests = self.requests.values().map(|request| request.deadline).min();
        [
            requests,
            self.next_bootstrap,
            self.next_republish,
            self.next_find,
            Some(self.next_refresh),
            Some(self.next_sweep),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.touch(now);
        let mut expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, request)| request.deadline <= now)
            .map(|(txid, _)| *txid)
            .collect();
        // Hash-map order differs per process: sorted, a simulation replays exactly.
        expired.sort_unstable();
        for txid in expired {
            if let Some(request) = self.requests.remove(&txid) {
                self.stats.timeouts += 1;
                self.request_failed(request, now);
            }
        }
        if self.next_bootstrap.is_some_and(|at| at <= now) {
            if self.table.is_empty() {
                self.ping_seeds(now);
            } else {
                self.next_bootstrap = None;
            }
        }
        if self.next_republish.is_some_and(|at| at <= now) {
            self.republish(now);
        }
        if self.next_find.is_some_and(|at| at <= now) {
            for service in self.find_services.clone() {
                self.find_service(&service, now);
            }
            self.next_find = Some(now + self.config.find_interval);
        }
        if self.next_refresh <= now {
            self.refresh(now);
            self.next_refresh = now + self.config.refresh_interval;
        }
        if self.next_sweep <= now {
            self.sweep(now);
            self.next_sweep = now + self.config.sweep_interval;
        }
    }

    fn refresh(&mut self, now: Instant) {
        let since = now.checked_sub(self.config.refresh_interval).unwrap_or(now);
        // A bounded number per round: the rest wait for the next round.
        for index in self.table.stale_buckets(since).into_iter().take(16) {
            let mut random = Key::ZERO;
            for chunk in random.0.chunks_mut(8) {
                chunk.copy_from_slice(&self.random().to_be_bytes());
            }
            let target = self.own.random_in_bucket(index, &random);
            self.start_lookup(target, LookupPurpose::Refresh, None, now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.store.expire(now);
        let mut expired: Vec<Key> = self
            .known
            .iter()
            .filter(|(_, known)| !known.contact && known.expires.is_some_and(|at| at <= now))
            .map(|(key, _)| *key)
            .collect();
        expired.sort_unstable();
        for key in expired {
            if let Some(known) = self.known.remove(&key) {
                self.emit(PeerEventKind::Left, known.record);
            }
        }
        for known in self.known.values_mut() {
            if known.contact && known.expires.is_some_and(|at| at <= now) {
                known.expires = None;
            }
        }
    }

    /// Handles one datagram from `from`. Anything that does not parse (or, in authenticated
    /// mode, fails authentication) is counted and dropped.
    pub fn handle_datagram(&mut self, from: A, bytes: &[u8], now: Instant) {
        let _ = self.handle_datagram_checked(from, bytes, now);
    }

    /// [`DhtNode::handle_datagram`], saying why a datagram was dropped.
    pub fn handle_datagram_checked(
        &mut self,
        from: A,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), DecodeError> {
        self.touch(now);
        let decoded = match &self.auth {
            Some(auth) => {
                open::<A>(&auth.security, bytes, auth.clock.unix_ms(now)).map(|(_, message)| message)
            }
            None => Message::<A>::decode(bytes),
        };
        let message = match decoded {
            Ok(message) => message,
            Err(error) => {
                self.stats.malformed += 1;
                if error.is_authentication() {
                    self.stats.unauthenticated += 1;
                }
                return Err(error);
            }
        };
        self.stats.received += 1;
        if message.sender == self.own {
            return Ok(());
        }
        let sender = Contact { key: message.sender, address: from };
        match message.body {
            Body::Ping => {
                self.heard_request_from(sender, now);
                self.respond(from, message.txid, Body::Pong);
            }
            Body::Find { target, values } => {
                self.heard_request_from(sender, now);
                let body = self.found(&target, values, &message.sender, now);
                self.respond(from, message.txid, body);
            }
            Body::Store { key, ttl_ms, record } => {
                self.heard_request_from(sender, now);
                let ttl = Duration::from_millis(ttl_ms as u64);
                let outcome = self.store.put(from, message.sender, key, ttl, record.clone(), now);
                let accepted = matches!(outcome, StoreOutcome::Stored | StoreOutcome::Removed);
                if !accepted {
                    self.stats.stores_refused += 1;
                }
                // A contact pushing its changed record: update what we know of it, or learn it
                // (a contact whose record did not exist yet when we fetched it pushes it once it
                // publishes: without this, its record would stay unknown here until it changed).
                let from_contact = self.table.address_of(&key) == Some(from);
                if outcome == StoreOutcome::Stored
                    && key == message.sender
                    && from_contact
                    && (self.config.learn_contact_records || self.known.contains_key(&key))
                {
                    if let Ok(record) = decode_value(&record, self.auth.is_some()) {
                        self.learn(record, None, true);
                    }
                }
                self.respond(from, message.txid, Body::Stored { accepted });
            }
            Body::Goodbye => {
                // Only from the contact's own address: a forger elsewhere cannot evict it.
                if self.table.address_of(&message.sender) != Some(from) {
                    return Ok(());
                }
                self.drop_contact(&message.sender, now);
                if let Some(known) = self.known.remove(&message.sender) {
                    self.emit(PeerEventKind::Left, known.record);
                }
                self.fail_lookups_of(&message.sender, now);
            }
            Body::Pong | Body::Found { .. } | Body::Stored { .. } => {
                self.handle_response(sender, message, now)
            }
        }
        Ok(())
    }

    /// `contact` sent a request. In plaintext it goes into the routing table; in authenticated
    /// mode too if the table has it at that address, otherwise it is asked to answer a PING
    /// there first (see the [module documentation](self)).
    fn heard_request_from(&mut self, contact: Contact<A>, now: Instant) {
        if self.auth.is_none() || self.table.address_of(&contact.key) == Some(contact.address) {
            return self.heard_from(contact, now);
        }
        if self.verifying.insert(contact.key)
            && !self.request(contact.address, Some(contact.key), RequestKind::Verify, Body::Ping, now)
        {
            self.verifying.remove(&contact.key);
        }
    }

    fn handle_response(&mut self, sender: Contact<A>, message: Message<A>, now: Instant) {
        // A response counts only from the address the request went to (an off-path forger
        // would also have to guess the 64-bit transaction id).
        let matches = self.requests.get(&message.txid).is_some_and(|request| request.to == sender.address);
        let Some(request) = matches.then(|| self.requests.remove(&message.txid)).flatten() else {
            self.stats.unsolicited += 1;
            return;
        };
        if request.key.is_some_and(|expected| expected != sender.key) {
            // Someone else answers at that address now: the contact we knew is gone.
            self.request_failed(request.clone(), now);
            self.heard_from(sender, now);
            return;
        }
        self.heard_from(sender, now);
        match (request.kind, message.body) {
            (RequestKind::Evict, _) => {
                self.evicting.remove(&sender.key);
                self.table.drop_pending(&sender.key);
            }
            (RequestKind::Verify, _) => {
                self.verifying.remove(&sender.key);
            }
            (RequestKind::Bootstrap, _) => {
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    self.next_bootstrap = None;
                    self.start_lookup(self.own, LookupPurpose::Refresh, None, now);
                    // What waited for a first contact goes now.
                    if self.own_record.is_some() {
                        self.republish(now);
                    }
                    if !self.find_services.is_empty() {
                        self.next_find = Some(now);
                    }
                }
            }
            (RequestKind::Lookup(id), Body::Found { contacts, values }) => {
                if let Some(running) = self.lookups.get_mut(&id) {
                    running.lookup.on_response(&sender.key, &contacts, values);
                    self.pump(id, now);
                }
            }
            (RequestKind::FetchRecord, Body::Found { values, .. }) => {
                let signed = self.auth.is_some();
                let own = values
                    .iter()
                    .filter_map(|value| decode_value(&value.record, signed).ok())
                    .find(|record| Key::for_node(record.id.as_str()) == sender.key);
                if let Some(record) = own {
                    if self.table.contains(&sender.key) {
                        self.learn(record, None, true);
                    }
                }
            }
            (RequestKind::Store, Body::Stored { accepted }) => {
                if !accepted {
                    tracing::debug!("kademlia: node {} refused a STORE", sender.key);
                }
            }
            (kind, _) => {
                // The wrong kind of answer: treat the request as failed.
                self.stats.unsolicited += 1;
                self.request_failed(Request { kind, ..request }, now);
            }
        }
    }

    /// `contact` sent us something from its own address: it goes into the routing table.
    fn heard_from(&mut self, contact: Contact<A>, now: Instant) {
        // One node per address: a new key there means the old node is gone (a restart with a
        // new id), and a flood of identities from one address holds one slot, not thousands.
        if let Some(old) = self.table.key_at(&contact.address).filter(|old| *old != contact.key) {
            self.drop_contact(&old, now);
        }
        match self.table.insert(contact, now) {
            Insert::Added => self.contact_added(contact, now),
            Insert::Full { oldest } => {
                if self.evicting.insert(oldest.key) {
                    self.request(oldest.address, Some(oldest.key), RequestKind::Evict, Body::Ping, now);
                }
            }
            Insert::Refreshed | Insert::Ignored => {}
        }
    }

    fn contact_added(&mut self, contact: Contact<A>, now: Instant) {
        if self.config.learn_contact_records {
            let body = Body::Find { target: contact.key, values: true };
            self.request(contact.address, Some(contact.key), RequestKind::FetchRecord, body, now);
        }
        self.hand_over(contact, now);
    }

    /// Copies to a new contact the values it is now responsible for with us.
    fn hand_over(&mut self, contact: Contact<A>, now: Instant) {
        let mut keys: Vec<Key> = self
            .store
            .keys()
            .filter(|key| contact.key.distance(key) < self.own.distance(key))
            // Only the few nodes closest to the key hand over (the new contact counts among
            // the closer ones): one copy is enough, twenty would be a burst of STOREs per join,
            // and a far node that kept a value from when the network was small would otherwise
            // copy it to half of its new contacts.
            .filter(|key| {
                self.table.count_closer(key, &self.own.distance(key), HANDOVER_RANK) < HANDOVER_RANK
            })
            .copied()
            .collect();
        keys.sort_unstable();
        for key in keys {
            for value in self.store.get(&key, now) {
                let body = Body::Store { key, ttl_ms: value.ttl_ms, record: value.record };
                self.request(contact.address, Some(contact.key), RequestKind::Store, body, now);
            }
        }
    }

    /// A request timed out or was answered by someone else.
    fn request_failed(&mut self, request: Request<A>, now: Instant) {
        let Some(key) = request.key else { return };
        if request.kind == RequestKind::Verify {
            // Nobody with that key at that address (a replay from elsewhere, or it went away):
            // whatever the table has for the key stays as it was.
            self.verifying.remove(&key);
            return;
        }
        if request.kind == RequestKind::Evict {
            self.evicting.remove(&key);
        }
        // An eviction ping is the contact's last chance: the candidate waits for its place.
        let removed = if request.kind == RequestKind::Evict {
            self.table.remove(&key)
        } else {
            self.table.fail(&key, now, self.config.request_timeout * 2)
        };
        if let Some((_, promoted)) = removed {
            self.forget_contact(&key);
            if let Some(promoted) = promoted {
                self.contact_added(promoted, now);
            }
        }
        if let RequestKind::Lookup(id) = request.kind {
            if let Some(running) = self.lookups.get_mut(&id) {
                running.lookup.on_failure(&key);
                self.pump(id, now);
            }
        }
    }

    /// Removes a contact from the table (promoting its bucket's candidate) and its record.
    fn drop_contact(&mut self, key: &Key, now: Instant) {
        if let Some((_, promoted)) = self.table.remove(key) {
            self.forget_contact(key);
            if let Some(promoted) = promoted {
                self.contact_added(promoted, now);
            }
        }
    }

    fn fail_lookups_of(&mut self, key: &Key, now: Instant) {
        let mut ids: Vec<u64> = self.lookups.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(running) = self.lookups.get_mut(&id) {
                running.lookup.on_failure(key);
                self.pump(id, now);
            }
        }
    }

    /// A contact left the table: its contact record goes, unless a lookup found it too.
    fn forget_contact(&mut self, key: &Key) {
        let Some(known) = self.known.get_mut(key) else { return };
        known.contact = false;
        if known.expires.is_none() {
            if let Some(known) = self.known.remove(key) {
                self.emit(PeerEventKind::Left, known.record);
            }
        }
    }

    /// Adds or updates a peer record.
    fn learn(&mut self, record: NodeRecord, expires: Option<Instant>, contact: bool) {
        if record.id.as_str() == self.own_id {
            return;
        }
        let key = Key::for_node(record.id.as_str());
        if let Some(known) = self.known.get_mut(&key) {
            known.contact |= contact;
            known.expires = match (known.expires, expires) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if known.record != record {
                known.record = record.clone();
                self.emit(PeerEventKind::Updated, record);
            }
            return;
        }
        if self.known.len() >= self.config.max_known {
            self.stats.dropped += 1;
            return;
        }
        self.known.insert(key, Known { record: record.clone(), contact, expires });
        self.emit(PeerEventKind::Joined, record);
    }

    fn emit(&mut self, kind: PeerEventKind, record: NodeRecord) {
        self.push_event(Event::Peer(PeerEvent { kind, record }));
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= self.config.max_events {
            self.events.pop_front();
            self.stats.dropped += 1;
        }
        self.events.push_back(event);
    }

    /// The answer to a FIND: our closest contacts and, if asked, the values under the target
    /// (ours included), within one datagram.
    fn found(&self, target: &Key, with_values: bool, requester: &Key, now: Instant) -> Body<A> {
        let contacts: Vec<Contact<A>> = self
            .table
            .closest(target, self.config.k + 1)
            .into_iter()
            .filter(|contact| contact.key != *requester)
            .take(self.config.k)
            .collect();
        let mut values = Vec::new();
        if with_values {
            let trailer = match &self.auth {
                Some(_) => self.own_id.len() + auth::TRAILER,
                None => 0,
            };
            let mut room = MAX_DATAGRAM - trailer - HEADER - 2 - contacts.len() * (32 + 19);
            let mut add = |value: Value| {
                if value.encoded_len() <= room && values.len() < u8::MAX as usize {
                    room -= value.encoded_len();
                    values.push(value);
                }
            };
            if self.publication_keys().contains(target) {
                if let Some((_, bytes)) = &self.own_record {
                    add(Value { ttl_ms: self.ttl_ms(), record: bytes.clone() });
                }
            }
            for value in self.store.get(target, now) {
                add(value);
            }
        }
        Body::Found { contacts, values }
    }

    // ----- lookups -----

    fn start_lookup(
        &mut self,
        target: Key,
        purpose: LookupPurpose,
        store: Option<(Vec<u8>, Duration)>,
        now: Instant,
    ) -> Option<u64> {
        if self.lookups.len() >= self.config.max_lookups {
            self.stats.dropped += 1;
            return None;
        }
        let id = self.next_lookup;
        self.next_lookup += 1;
        self.table.mark_refreshed(&target, now);
        let seeds = self.table.closest(&target, self.config.k);
        let lookup = Lookup::new(target, self.own, seeds, self.config.k, self.config.alpha);
        self.lookups.insert(id, Running { lookup, purpose, started: now, store });
        self.pump(id, now);
        Some(id)
    }

    /// Sends a lookup's next queries, and finishes it if it is done.
    fn pump(&mut self, id: u64, now: Instant) {
        loop {
            let Some(running) = self.lookups.get_mut(&id) else { return };
            let target = running.lookup.target();
            let values = matches!(running.purpose, LookupPurpose::FindService(_));
            let queries = running.lookup.next_queries();
            if queries.is_empty() {
                break;
            }
            let mut refused = Vec::new();
            for contact in queries {
                let body = Body::Find { target, values };
                if !self.request(contact.address, Some(contact.key), RequestKind::Lookup(id), body, now) {
                    refused.push(contact.key);
                }
            }
            if refused.is_empty() {
                break;
            }
            // No room for more requests: those queries count as failed, pick others.
            if let Some(running) = self.lookups.get_mut(&id) {
                for key in refused {
                    running.lookup.on_failure(&key);
                }
            }
        }
        if self.lookups.get(&id).is_some_and(|running| running.lookup.is_finished()) {
            self.finish(id, now);
        }
    }

    fn finish(&mut self, id: u64, now: Instant) {
        let Some(mut running) = self.lookups.remove(&id) else { return };
        let target = running.lookup.target();
        let closest = running.lookup.closest_answered();
        let mut providers = Vec::new();
        match &running.purpose {
            LookupPurpose::Refresh => {}
            LookupPurpose::Publish => {
                if let Some((bytes, ttl)) = running.store.take() {
                    let ttl_ms = ttl.as_millis().min(u32::MAX as u128) as u32;
                    for contact in &closest {
                        let body = Body::Store { key: target, ttl_ms, record: bytes.clone() };
                        self.request(contact.address, Some(contact.key), RequestKind::Store, body, now);
                    }
                }
                if closest.is_empty() && self.own_record.is_some() {
                    // Nobody to store at yet: try again soon rather than in ttl / 2.
                    let soon = now + self.config.bootstrap_retry;
                    self.next_republish = Some(self.next_republish.map_or(soon, |at| at.min(soon)));
                }
            }
            LookupPurpose::FindService(service) => {
                let service = service.clone();
                for value in running.lookup.take_values() {
                    let Ok(record) = decode_value(&value.record, self.auth.is_some()) else { continue };
                    if !record.services.contains(&service) {
                        continue;
                    }
                    let expires =
                        now + Duration::from_millis(value.ttl_ms as u64).min(self.config.store.max_ttl);
                    if !providers.iter().any(|known: &NodeRecord| known.id == record.id) {
                        providers.push(record.clone());
                    }
                    self.learn(record, Some(expires), false);
                }
                if closest.is_empty() {
                    let soon = now + self.config.bootstrap_retry;
                    self.next_find = Some(self.next_find.map_or(soon, |at| at.min(soon)));
                }
            }
        }
        let report = LookupReport {
            target,
            purpose: running.purpose,
            providers,
            queries: running.lookup.queries(),
            answers: running.lookup.answers(),
            value_hops: running.lookup.value_hops(),
            hops: running.lookup.hops(),
            duration: now.saturating_duration_since(running.started),
        };
        self.push_event(Event::Lookup(report));
    }

    // ----- sending -----

    /// Sends a request and remembers it; false if the pending-request bound is reached.
    fn request(&mut self, to: A, key: Option<Key>, kind: RequestKind, body: Body<A>, now: Instant) -> bool {
        if self.requests.len() >= self.config.max_pending_requests {
            self.stats.dropped += 1;
            return false;
        }
        let mut txid = self.random();
        while txid == 0 || self.requests.contains_key(&txid) {
            txid = self.random();
        }
        self.requests.insert(txid, Request { to, key, kind, deadline: now + self.config.request_timeout });
        self.send(to, Message { txid, sender: self.own, body });
        true
    }

    fn respond(&mut self, to: A, txid: u64, body: Body<A>) {
        self.send(to, Message { txid, sender: self.own, body });
    }

    fn send(&mut self, to: A, message: Message<A>) {
        if self.transmits.len() >= self.config.max_transmits {
            self.stats.dropped += 1;
            return;
        }
        self.stats.sent += 1;
        let datagram = match &self.auth {
            Some(auth) => {
                seal(&auth.security, &self.own_id, message.encode(), auth.clock.unix_ms(self.latest))
            }
            None => message.encode(),
        };
        self.transmits.push_back((to, datagram));
    }
}

//! # The node's engine: every decision a node makes, with no I/O
//!
//! [`Engine::handle`] (or [`Engine::handle_into`], which appends to a buffer) takes an
//! [`Input`] (an envelope a transport received, a discovery event, the passing of time,
//! something the application did) with the current time, and returns the [`Action`]s the node
//! must carry out (deliver to a local queue, settle with a transport, send a
//! control message, report a peer event). It owns the peer table ([`membership`]), the local
//! destinations (the inbox, subscriptions, services) with their queue depths, the settlement of
//! every received message, the requests in flight, and the node's own record. It never waits,
//! never locks and never reads the clock: the I/O loops in [`crate::driver`] feed it and carry
//! out what it says, and its tests drive it with simulated time.
//!
//! ## Lanes
//!
//! Framework messages (hello, heartbeat, goodbye, response) are handled inside [`Engine::handle`]
//! at once; they never wait behind application data. Application data goes to a bounded local
//! queue per destination. When a destination is full, only that destination waits:
//!
//! - from a transport with acknowledgements, the message is parked for up to `requeue_after`
//!   and then handed back to the transport (`REJECTED_REQUEUE`: the broker delivers it again
//!   later); once [`PARK_LIMIT`] of one transport wait, the node stops taking from it until
//!   there is room (its broker keeps the rest), so a subscriber that stopped reading holds no
//!   more than its queue and the parked ones;
//! - from a transport without them (TCP, UDP, memory), a message for a full subscription is
//!   dropped and counted (as NATS and ZeroMQ do with slow subscribers: these transports are
//!   at-most-once), and a message for the full inbox is parked while the node stops taking
//!   messages from that transport until the application reads (backpressure; nothing lost);
//! - a request for a service at its concurrency limit is answered `unavailable` at once, and the
//!   caller retries another replica.
//!
//! ## Settlement
//!
//! A message is settled with its transport when the application is done with it, not when it
//! is queued: when the application acknowledges it (or drops it unacknowledged: requeued), when
//! a handler returns, when every subscription it went to is done with it (it is requeued if any
//! asked for that, and accepted otherwise).

pub(crate) mod membership;
mod parked;
mod pattern_index;
pub(crate) mod pending;

use crate::control::{self, RecordMessage, KIND_HEADER};
use crate::dedup::DedupWindow;
use comms_plugin_api::{
    node_limits::MAX_RECORD_BYTES, Destination, Envelope, Headers, MessageId, NodeId, NodeRecord, Payload,
    PeerEvent, PeerEventKind, SettlementOutcome,
};
use membership::{Learned, Membership, PeerStatus, Source};
use parked::{Parked, ParkedQueue};
use pending::{Balancing, PendingRequests};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// What the engine needs to know about the node.
#[derive(Debug, Clone)]
pub(crate) struct EngineSpec {
    pub(crate) id: NodeId,
    /// `None`: no heartbeats, peers never expire.
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) peer_timeout: Duration,
    pub(crate) inbox_capacity: usize,
    pub(crate) subscription_capacity: usize,
    /// Forward envelopes addressed to other nodes.
    pub(crate) relay: bool,
    /// 0: off.
    pub(crate) dedup_window: usize,
    /// How long a message for a full destination waits before it is handed back to a transport
    /// with acknowledgements.
    pub(crate) requeue_after: Duration,
    pub(crate) balancing: Balancing,
}

/// What the engine needs to know about one of the node's transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TransportFacts {
    pub(crate) name: String,
    /// It settles messages with its medium (`ACKNOWLEDGEMENTS`).
    pub(crate) acknowledges: bool,
    /// It keeps a node's inbox while the node is away (`DURABLE`).
    pub(crate) durable: bool,
}

/// A local destination of application data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Local {
    /// `Node::receive`.
    Inbox,
    /// A subscription, by its id.
    Subscription(u64),
    /// A service's handler.
    Service(String),
}

/// Messages from one transport with acknowledgements that may wait for room in full local
/// queues; past it the node stops taking from that transport (its broker keeps the rest).
pub(crate) const PARK_LIMIT: usize = 256;

/// The "transport" of a node's own publications to its own subscriptions.
const LOCAL: usize = usize::MAX;

/// A received message the engine tracks until it is settled; 0 for messages from transports
/// without acknowledgements (nothing to settle).
pub(crate) type DeliveryId = u64;

/// Where to send an envelope: a transport (by index) and the peer's address on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) transport: usize,
    pub(crate) address: String,
    pub(crate) peer: NodeId,
}

/// Why a send could not be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// No record of the node.
    UnknownPeer(NodeId),
    /// The node has no address on any transport of this node.
    NoCommonTransport { peer: NodeId, peer_transports: String, local_transports: String },
}

/// Something that happened, for the engine to act on.
#[derive(Debug)]
pub(crate) enum Input {
    /// A transport (by index) received `envelope`; `tag` settles it.
    Received { transport: usize, envelope: Envelope, tag: u64 },
    /// Discovery reported a peer (at start, or a change).
    Discovery(PeerEvent),
    /// Time passed: heartbeats, expiry, parked messages whose wait is over.
    Tick,
    /// The application took `count` messages from the queue of a destination (a batch is one
    /// input), or a handler finished (`count` 1).
    Taken { from: Local, count: usize },
    /// The application (or a handler, or a forward) is done with a delivery.
    Settled { delivery: DeliveryId, outcome: SettlementOutcome },
    /// A subscription was made.
    Subscribed { id: u64, pattern: String },
    /// A subscription ended; what waits for it is accepted (nobody will read it).
    Unsubscribed { id: u64 },
    /// A service is served, with at most `limit` requests handled at once.
    Served { name: String, limit: usize },
    /// A service is no longer served.
    Unserved { name: String },
    /// An attempt of a request went to `replica`.
    RequestStarted { id: MessageId, replica: NodeId },
    /// An attempt is over (answered, timed out or not sent).
    RequestEnded { id: MessageId },
    /// The node is closing: no new requests are taken; peers are told goodbye.
    Closing,
    /// A publication of this node for its own subscriptions (at-most-once: a full subscription
    /// drops it, as from any transport without acknowledgements).
    Local(Envelope),
    /// The node's transports changed (a reload): `facts` of every transport it has run, by
    /// index (an index is never reused, so that a late settlement or pause still names the
    /// instance it was meant for); `serving`: the indexes in service, in preference order;
    /// `addresses`: the record's new addresses. Announced to discovery and every live peer.
    TransportsChanged { facts: Vec<TransportFacts>, serving: Vec<usize>, addresses: Vec<(String, String)> },
}

/// What the node must do.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Put `envelope` in the queue of a local destination (there is room), or run the handler.
    Deliver { to: Local, envelope: Envelope, delivery: DeliveryId },
    /// Settle a received message with its transport.
    Settle { transport: usize, tag: u64, outcome: SettlementOutcome },
    /// Send a framework message (control lane: never behind application data).
    SendControl { route: Route, envelope: Envelope },
    /// Forward a message for another node (relay), then settle `delivery`.
    Forward { route: Route, envelope: Envelope, delivery: DeliveryId },
    /// Answer a request for a service this node cannot take now; the request is settled.
    Refuse { request: Envelope, reason: String },
    /// Hand a response to the attempt waiting for it.
    CompleteRequest { id: MessageId, response: Envelope },
    /// A peer joined, left or changed.
    PeerEvent(PeerEvent),
    /// The node's record changed: announce it to discovery.
    Announce(NodeRecord),
    /// Stop taking messages from a transport until [`Action::Resume`] (backpressure).
    Pause { transport: usize },
    /// Take messages from a transport again.
    Resume { transport: usize },
    /// A message was not delivered, for the log and the counters.
    Dropped { from: NodeId, id: MessageId, reason: DropReason },
    /// A peer's record was not taken into the peer table (invalid, oversized, or no room),
    /// for the log.
    RecordRefused { source: Source, reason: String },
}

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Addressed to another node, and this node does not relay.
    NotForThisNode(NodeId),
    /// A node's record no route leads to (relay), or the message cannot be routed.
    NoRoute(String),
    /// Seen before (the dedup window).
    Duplicate,
    /// A subscription was full and the transport cannot take the message back.
    SubscriptionFull { subscription: u64 },
    /// A response nobody waits for (late, or a duplicate).
    LateResponse,
    /// A framework message this release does not know, or cannot read.
    UnknownControl(String),
    /// The sender's id cannot name a node (empty, a control character, too long): nothing
    /// from it is taken.
    InvalidSender(String),
}

/// Message ids of one node: a random prefix and a counter, shared by everything that sends.
#[derive(Debug)]
pub(crate) struct IdSource {
    prefix: u64,
    counter: AtomicU64,
}

impl IdSource {
    pub(crate) fn new(prefix: u64) -> Self {
        Self { prefix, counter: AtomicU64::new(0) }
    }

    pub(crate) fn next(&self) -> MessageId {
        MessageId { high: self.prefix, low: self.counter.fetch_add(1, Ordering::Relaxed) }
    }
}

/// A bounded queue's depth.
#[derive(Debug, Clone, Copy)]
struct Depth {
    used: usize,
    capacity: usize,
}

impl Depth {
    fn new(capacity: usize) -> Self {
        Self { used: 0, capacity: capacity.max(1) }
    }

    fn has_room(&self) -> bool {
        self.used < self.capacity
    }
}

#[derive(Debug)]
struct SubscriptionEntry {
    pattern: String,
    depth: Depth,
    dropped: u64,
}

#[derive(Debug)]
struct ServiceEntry {
    in_flight: Depth,
}

/// A received message waiting for its local destinations to be done with it.
#[derive(Debug)]
struct Unsettled {
    transport: usize,
    tag: u64,
    /// The message's id, forgotten by the dedup window if it is requeued (or its redelivery
    /// would be dropped as a repeat).
    id: MessageId,
    remaining: usize,
    requeue: bool,
    all_rejected: bool,
}

/// Counts of what the engine did not deliver, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EngineCounters {
    pub(crate) duplicates: u64,
    pub(crate) dropped: u64,
    pub(crate) requeued: u64,
    pub(crate) refused: u64,
    /// Records (from hellos, heartbeats or discovery) and envelopes from invalid ids refused.
    pub(crate) records_refused: u64,
}

/// The node's state machine: see the module documentation.
#[derive(Debug)]
pub(crate) struct Engine {
    spec: EngineSpec,
    transports: Vec<TransportFacts>,
    /// The transports in service, by index, in preference order (all of them until a reload
    /// replaces or removes one).
    serving: Vec<usize>,
    ids: std::sync::Arc<IdSource>,
    record: NodeRecord,
    membership: Membership,
    pending: PendingRequests,
    dedup: Option<DedupWindow>,
    inbox: Depth,
    subscriptions: BTreeMap<u64, SubscriptionEntry>,
    services: BTreeMap<String, ServiceEntry>,
    unsettled: HashMap<DeliveryId, Unsettled>,
    next_delivery: DeliveryId,
    parked: ParkedQueue,
    paused: HashSet<usize>,
    /// Peers that got this node's record in order before its first application message to them
    /// (a HELLO sent on the same path just before it: see `prepare_send`).
    greeted: HashSet<NodeId>,
    next_heartbeat: Option<Instant>,
    closing: bool,
    counters: EngineCounters,
    /// The sender whose id passed the checks last: a burst from one peer is checked once.
    last_checked_sender: Option<NodeId>,
    out: Vec<Action>,
}

impl Engine {
    /// An engine for a node with `record` (its addresses) and `transports`, started at `now`.
    pub(crate) fn new(
        spec: EngineSpec,
        transports: Vec<TransportFacts>,
        record: NodeRecord,
        ids: std::sync::Arc<IdSource>,
        now: Instant,
    ) -> Self {
        let timeout = spec.heartbeat_interval.map(|_| spec.peer_timeout);
        Self {
            membership: Membership::new(spec.id.clone(), timeout),
            dedup: (spec.dedup_window > 0).then(|| DedupWindow::new(spec.dedup_window)),
            inbox: Depth::new(spec.inbox_capacity),
            next_heartbeat: spec.heartbeat_interval.map(|interval| now + interval),
            spec,
            serving: (0..transports.len()).collect(),
            transports,
            ids,
            record,
            pending: PendingRequests::default(),
            subscriptions: BTreeMap::new(),
            services: BTreeMap::new(),
            unsettled: HashMap::new(),
            next_delivery: 1,
            parked: ParkedQueue::default(),
            paused: HashSet::new(),
            greeted: HashSet::new(),
            closing: false,
            counters: EngineCounters::default(),
            last_checked_sender: None,
            out: Vec::new(),
        }
    }

    /// Handles one input at `now`; returns what to do, in order.
    /// (The tests' form; the driver appends into one buffer with [`Engine::handle_into`].)
    #[cfg(test)]
    pub(crate) fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        self.apply(input, now);
        std::mem::take(&mut self.out)
    }

    /// As [`Engine::handle`], appending the actions to `actions` (no allocation per input on
    /// the hot path).
    pub(crate) fn handle_into(&mut self, input: Input, now: Instant, actions: &mut Vec<Action>) {
        if self.out.is_empty() {
            // The actions go straight into the caller's vector: for a received batch that is
            // one move of each action fewer than appending them.
            std::mem::swap(&mut self.out, actions);
            self.apply(input, now);
            std::mem::swap(&mut self.out, actions);
        } else {
            self.apply(input, now);
            actions.append(&mut self.out);
        }
    }

    fn apply(&mut self, input: Input, now: Instant) {
        match input {
            Input::Received { transport, envelope, tag } => self.received(transport, envelope, tag, now),
            Input::Discovery(event) => self.discovery(event, now),
            Input::TransportsChanged { facts, serving, addresses } => {
                self.transports = facts;
                self.serving = serving.into_iter().filter(|index| *index < self.transports.len()).collect();
                self.record.addresses = addresses;
                self.record_changed();
            }
            Input::Tick => self.tick(now),
            Input::Taken { from, count } => self.taken(from, count),
            Input::Settled { delivery, outcome } => self.settled(delivery, outcome),
            Input::Subscribed { id, pattern } => {
                let depth = Depth::new(self.spec.subscription_capacity);
                self.subscriptions.insert(id, SubscriptionEntry { pattern, depth, dropped: 0 });
                self.record_changed();
            }
            Input::Unsubscribed { id } => {
                self.subscriptions.remove(&id);
                // What waited for it goes nowhere now; the rest may move on.
                self.unpark(now);
                self.record_changed();
            }
            Input::Served { name, limit } => {
                self.services.insert(name, ServiceEntry { in_flight: Depth::new(limit) });
                self.record_changed();
            }
            Input::Unserved { name } => {
                self.services.remove(&name);
                self.record_changed();
            }
            Input::RequestStarted { id, replica } => self.pending.started(id, replica),
            Input::RequestEnded { id } => {
                self.pending.finished(id);
            }
            Input::Closing => self.closing = true,
            Input::Local(envelope) => self.application_message(LOCAL, envelope, 0, now),
        }
    }

    // ---- incoming envelopes ------------------------------------------------------------------

    fn received(&mut self, transport: usize, envelope: Envelope, tag: u64, now: Instant) {
        // Refused before anything else: such an id would be added to the peer table, written
        // into logs and names (a newline forges a log line), and cannot be answered anyway.
        let checked = self.last_checked_sender.as_ref() == Some(&envelope.from);
        if let Err(problem) = if checked { Ok(()) } else { envelope.from.check() } {
            self.counters.records_refused += 1;
            let reason = DropReason::InvalidSender(problem);
            self.out.push(Action::Dropped { from: envelope.from.clone(), id: envelope.id, reason });
            return self.settle_now(transport, tag, SettlementOutcome::REJECTED_DISCARD);
        }
        if !checked {
            self.last_checked_sender = Some(envelope.from.clone());
        }
        let mut events = Vec::new();
        self.membership.heard_from(&envelope.from, now, &mut events);
        self.report(events);
        let kind = envelope.header(KIND_HEADER).map(str::to_owned);
        let describes_sender =
            matches!(kind.as_deref(), Some(control::HELLO | control::HEARTBEAT | control::GOODBYE));
        if let Destination::Node(to) = &envelope.to {
            // A heartbeat or goodbye meant for a node behind this relay still tells this node
            // about its direct neighbour, the sender; it is handled here and not forwarded.
            if *to != self.spec.id && !describes_sender {
                let to = to.clone();
                let delivery = self.track(transport, tag, envelope.id, 1);
                return self.relay(to, envelope, delivery);
            }
        }
        match kind.as_deref() {
            Some(control::HELLO | control::HEARTBEAT) => {
                self.record_message(&envelope, now);
                self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
            }
            Some(control::GOODBYE) => {
                let offline = RecordMessage::decode(envelope.payload.as_slice()).is_ok_and(|m| m.offline);
                let mut events = Vec::new();
                self.membership.goodbye(&envelope.from, offline, now, &mut events);
                self.report(events);
                self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
            }
            Some(control::RESPONSE) => {
                match envelope.correlation_id.filter(|id| self.pending.finished(*id)) {
                    Some(id) => self.out.push(Action::CompleteRequest { id, response: envelope }),
                    None => self.out.push(Action::Dropped {
                        from: envelope.from.clone(),
                        id: envelope.id,
                        reason: DropReason::LateResponse,
                    }),
                }
                self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
            }
            Some(other) => {
                let reason = DropReason::UnknownControl(other.to_string());
                self.out.push(Action::Dropped { from: envelope.from.clone(), id: envelope.id, reason });
                self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
            }
            None => self.application_message(transport, envelope, tag, now),
        }
    }

    /// A hello or heartbeat: learn the sender's record; answer a hello (or a peer met for the
    /// first time) with this node's own record at once, so neither side waits for a heartbeat.
    fn record_message(&mut self, envelope: &Envelope, now: Instant) {
        // Not even decoded: a record this large would be refused once decoded (its encoding is
        // at most about as large as the record), and decoding it would cost as much again.
        if envelope.payload.len() > 2 * MAX_RECORD_BYTES {
            let reason = format!(
                "record of node `{}` refused unread: {} bytes, at most {MAX_RECORD_BYTES}",
                envelope.from,
                envelope.payload.len()
            );
            return self.record_refused(Source::Heard, reason);
        }
        let message = match RecordMessage::decode(envelope.payload.as_slice()) {
            Ok(message) => message,
            Err(error) => {
                let reason = DropReason::UnknownControl(format!("unreadable record: {error}"));
                self.out.push(Action::Dropped { from: envelope.from.clone(), id: envelope.id, reason });
                return;
            }
        };
        let asks = message.reply;
        let mut events = Vec::new();
        let record = message.into_record(envelope.from.clone());
        let learned = self.membership.learn(record, Source::Heard, now, &mut events);
        self.report(events);
        match learned {
            Ok(learned) if asks || learned == Learned::New => {
                self.send_record(&envelope.from, control::HEARTBEAT, false)
            }
            Ok(_) => {}
            Err(reason) => self.record_refused(Source::Heard, reason),
        }
    }

    fn record_refused(&mut self, source: Source, reason: String) {
        self.counters.records_refused += 1;
        self.out.push(Action::RecordRefused { source, reason });
    }

    fn application_message(&mut self, transport: usize, envelope: Envelope, tag: u64, now: Instant) {
        if let Some(window) = &mut self.dedup {
            if window.is_repeat(envelope.id) {
                self.counters.duplicates += 1;
                self.out.push(Action::Dropped {
                    from: envelope.from.clone(),
                    id: envelope.id,
                    reason: DropReason::Duplicate,
                });
                return self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
            }
        }
        match &envelope.to {
            Destination::Node(_) => {
                let delivery = self.track(transport, tag, envelope.id, 1);
                self.deliver(Local::Inbox, envelope, delivery, transport, now);
            }
            Destination::Topic(topic) => {
                let matching: Vec<u64> = self
                    .subscriptions
                    .iter()
                    .filter(|(_, entry)| crate::topics::matches(&entry.pattern, topic))
                    .map(|(id, _)| *id)
                    .collect();
                if matching.is_empty() {
                    return self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
                }
                let delivery = self.track(transport, tag, envelope.id, matching.len());
                for id in matching {
                    self.deliver(Local::Subscription(id), envelope.clone(), delivery, transport, now);
                }
            }
            Destination::Service(service) => {
                let service = service.to_string();
                let refusal = match self.services.get(&service) {
                    _ if self.closing => Some(format!("node `{}` is shutting down", self.spec.id)),
                    None => Some(format!("node `{}` does not serve `{service}`", self.spec.id)),
                    Some(entry) if !entry.in_flight.has_room() => Some(format!(
                        "node `{}` is handling {} requests for `{service}`, its limit",
                        self.spec.id, entry.in_flight.capacity
                    )),
                    Some(_) => None,
                };
                match refusal {
                    Some(reason) => {
                        self.counters.refused += 1;
                        self.settle_now(transport, tag, SettlementOutcome::ACCEPTED);
                        self.out.push(Action::Refuse { request: envelope, reason });
                    }
                    None => {
                        if let Some(entry) = self.services.get_mut(&service) {
                            entry.in_flight.used += 1;
                        }
                        let delivery = self.track(transport, tag, envelope.id, 1);
                        self.out.push(Action::Deliver { to: Local::Service(service), envelope, delivery });
                    }
                }
            }
        }
    }

    fn depth_mut(&mut self, local: &Local) -> Option<&mut Depth> {
        match local {
            Local::Inbox => Some(&mut self.inbox),
            Local::Subscription(id) => self.subscriptions.get_mut(id).map(|entry| &mut entry.depth),
            Local::Service(name) => self.services.get_mut(name).map(|entry| &mut entry.in_flight),
        }
    }

    /// Puts one message in a local queue, or applies the destination's policy when it is full.
    fn deliver(
        &mut self,
        to: Local,
        envelope: Envelope,
        delivery: DeliveryId,
        transport: usize,
        now: Instant,
    ) {
        let waiting_before = self.parked.waits_for(&to);
        let Some(depth) = self.depth_mut(&to) else {
            return self.settled(delivery, SettlementOutcome::ACCEPTED);
        };
        // Messages already parked for this destination keep their turn.
        if depth.has_room() && !waiting_before {
            depth.used += 1;
            return self.out.push(Action::Deliver { to, envelope, delivery });
        }
        let acknowledges = self.transports.get(transport).is_some_and(|t| t.acknowledges);
        if acknowledges {
            let until = Some(now + self.spec.requeue_after);
            self.parked.push(Parked { to, envelope, delivery, transport, until });
            // The broker keeps the rest: past PARK_LIMIT this node stops taking from it until
            // there is room again (or the parked ones go back), so memory stays bounded.
            if self.parked.count_from(transport) >= PARK_LIMIT && self.paused.insert(transport) {
                self.out.push(Action::Pause { transport });
            }
            return;
        }
        match to {
            Local::Subscription(subscription) => {
                if let Some(entry) = self.subscriptions.get_mut(&subscription) {
                    entry.dropped += 1;
                }
                self.counters.dropped += 1;
                let reason = DropReason::SubscriptionFull { subscription };
                self.out.push(Action::Dropped { from: envelope.from.clone(), id: envelope.id, reason });
                self.settled(delivery, SettlementOutcome::ACCEPTED);
            }
            _ => {
                if self.paused.insert(transport) {
                    self.out.push(Action::Pause { transport });
                }
                self.parked.push(Parked { to, envelope, delivery, transport, until: None });
            }
        }
    }

    fn relay(&mut self, to: NodeId, envelope: Envelope, delivery: DeliveryId) {
        if !self.spec.relay {
            self.out.push(Action::Dropped {
                from: envelope.from.clone(),
                id: envelope.id,
                reason: DropReason::NotForThisNode(to),
            });
            return self.settled(delivery, SettlementOutcome::ACCEPTED);
        }
        match self.route(&to) {
            Ok(route) => self.out.push(Action::Forward { route, envelope, delivery }),
            Err(error) => {
                let reason = DropReason::NoRoute(format!("{error:?}"));
                self.out.push(Action::Dropped { from: envelope.from.clone(), id: envelope.id, reason });
                self.settled(delivery, SettlementOutcome::ACCEPTED);
            }
        }
    }

    // ---- settlement ----------------------------------------------------------------------------

    /// Starts tracking a message that `copies` local destinations will settle.
    fn track(&mut self, transport: usize, tag: u64, id: MessageId, copies: usize) -> DeliveryId {
        if !self.transports.get(transport).is_some_and(|t| t.acknowledges) {
            return 0;
        }
        let delivery = self.next_delivery;
        self.next_delivery += 1;
        let entry = Unsettled { transport, tag, id, remaining: copies, requeue: false, all_rejected: true };
        self.unsettled.insert(delivery, entry);
        delivery
    }

    fn settle_now(&mut self, transport: usize, tag: u64, outcome: SettlementOutcome) {
        if self.transports.get(transport).is_some_and(|t| t.acknowledges) {
            self.out.push(Action::Settle { transport, tag, outcome });
        }
    }

    fn settled(&mut self, delivery: DeliveryId, outcome: SettlementOutcome) {
        let Some(entry) = self.unsettled.get_mut(&delivery) else { return };
        entry.remaining = entry.remaining.saturating_sub(1);
        entry.requeue |= outcome == SettlementOutcome::REJECTED_REQUEUE;
        entry.all_rejected &= outcome == SettlementOutcome::REJECTED_DISCARD;
        if entry.remaining > 0 {
            return;
        }
        let Some(entry) = self.unsettled.remove(&delivery) else { return };
        let outcome = if entry.requeue {
            if let Some(window) = &mut self.dedup {
                window.forget(entry.id);
            }
            SettlementOutcome::REJECTED_REQUEUE
        } else if entry.all_rejected {
            SettlementOutcome::REJECTED_DISCARD
        } else {
            SettlementOutcome::ACCEPTED
        };
        self.out.push(Action::Settle { transport: entry.transport, tag: entry.tag, outcome });
    }

    /// One message left a local queue: the oldest parked one for it, if any, takes its place.
    fn taken(&mut self, local: Local, count: usize) {
        let Some(depth) = self.depth_mut(&local) else { return };
        depth.used = depth.used.saturating_sub(count);
        while self.depth_mut(&local).is_some_and(|depth| depth.has_room()) {
            let Some(parked) = self.parked.take_first_for(&local) else { break };
            if let Some(depth) = self.depth_mut(&local) {
                depth.used += 1;
            }
            let transport = parked.transport;
            self.out.push(Action::Deliver {
                to: parked.to,
                envelope: parked.envelope,
                delivery: parked.delivery,
            });
            self.resume_if_clear(transport);
        }
    }

    /// Goes through every parked message: moves in those that have room now, settles those whose
    /// destination is gone, hands back those whose wait is over.
    fn unpark(&mut self, now: Instant) {
        if self.parked.is_empty() {
            return;
        }
        let mut blocked: HashSet<Local> = HashSet::new();
        let mut transports = HashSet::new();
        for parked in self.parked.take_all() {
            transports.insert(parked.transport);
            let due = parked.until.is_some_and(|until| until <= now);
            let room =
                !blocked.contains(&parked.to) && self.depth_mut(&parked.to).is_some_and(|d| d.has_room());
            if room {
                if let Some(depth) = self.depth_mut(&parked.to) {
                    depth.used += 1;
                }
                self.out.push(Action::Deliver {
                    to: parked.to,
                    envelope: parked.envelope,
                    delivery: parked.delivery,
                });
            } else if self.depth_mut(&parked.to).is_none() {
                // The destination is gone (unsubscribed, unserved): nobody will read it.
                self.settled(parked.delivery, SettlementOutcome::ACCEPTED);
            } else if due {
                self.counters.requeued += 1;
                self.settled(parked.delivery, SettlementOutcome::REJECTED_REQUEUE);
            } else {
                blocked.insert(parked.to.clone());
                self.parked.push(parked);
            }
        }
        for transport in transports {
            self.resume_if_clear(transport);
        }
    }

    /// Takes messages from `transport` again once nothing of it waits without a deadline and
    /// fewer than [`PARK_LIMIT`] wait in all.
    fn resume_if_clear(&mut self, transport: usize) {
        if self.paused.contains(&transport)
            && !self.parked.holds(transport)
            && self.parked.count_from(transport) < PARK_LIMIT
        {
            self.paused.remove(&transport);
            self.out.push(Action::Resume { transport });
        }
    }

    // ---- time, peers and records ---------------------------------------------------------------

    fn tick(&mut self, now: Instant) {
        let mut events = Vec::new();
        for forgotten in self.membership.expire(now, &mut events) {
            // Greeted again (with a hello before the first message) if it comes back.
            self.greeted.remove(&forgotten);
        }
        self.report(events);
        if let (Some(due), Some(interval)) = (self.next_heartbeat, self.spec.heartbeat_interval) {
            if due <= now && !self.closing {
                self.next_heartbeat = Some(now + interval);
                self.heartbeat_everyone();
            }
        }
        self.unpark(now);
    }

    /// When the engine next needs a [`Input::Tick`].
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let parked = self.parked.earliest_deadline();
        [self.next_heartbeat, self.membership.next_expiry(), parked].into_iter().flatten().min()
    }

    fn discovery(&mut self, event: PeerEvent, now: Instant) {
        let mut events = Vec::new();
        match event.kind {
            PeerEventKind::Left => {
                self.membership.withdrawn(&event.record.id, now, &mut events);
                self.greeted.remove(&event.record.id);
            }
            PeerEventKind::Joined | PeerEventKind::Updated => {
                let id = event.record.id.clone();
                let away = event.record.is_offline();
                let learned = match self.membership.learn(event.record, Source::Discovery, now, &mut events) {
                    Ok(learned) => learned,
                    Err(reason) => {
                        self.report(events);
                        return self.record_refused(Source::Discovery, reason);
                    }
                };
                // A peer met through discovery gets this node's record at once, and is asked for
                // its own: neither waits for the other's heartbeat. A node that is away is asked
                // nothing (it announces itself when it is back; the first message sent to its
                // inbox meanwhile carries this node's record).
                if learned == Learned::New && !self.closing && !away {
                    self.send_record(&id, control::HELLO, true);
                }
            }
        }
        self.report(events);
    }

    fn report(&mut self, events: Vec<PeerEvent>) {
        self.out.extend(events.into_iter().map(Action::PeerEvent));
    }

    /// The record changed (services or topics): a new revision, to discovery and every live peer.
    fn record_changed(&mut self) {
        // The framework's own services are answered, never announced (crate::admin).
        self.record.services =
            self.services.keys().filter(|name| !crate::admin::is_reserved(name)).cloned().collect();
        let mut topics: Vec<String> =
            self.subscriptions.values().map(|entry| entry.pattern.clone()).collect();
        topics.sort();
        topics.dedup();
        self.record.topics = topics;
        let next = control::revision(&self.record).unwrap_or(0) + 1;
        control::set_revision(&mut self.record, next);
        self.out.push(Action::Announce(self.record.clone()));
        self.heartbeat_everyone();
    }

    fn heartbeat_everyone(&mut self) {
        let peers: Vec<NodeId> = self.membership.live(|_| true).into_iter().map(|r| r.id.clone()).collect();
        // Encoded once for the round: every peer's heartbeat shares the one buffer.
        let record = Payload::from(RecordMessage::of(&self.record).encode());
        for peer in peers {
            self.send_encoded_record(&peer, control::HEARTBEAT, record.clone());
        }
    }

    /// Sends this node's record to `peer` as a `kind` message.
    fn send_record(&mut self, peer: &NodeId, kind: &str, reply: bool) {
        let message = RecordMessage { reply, ..RecordMessage::of(&self.record) };
        self.send_encoded_record(peer, kind, message.encode().into());
    }

    /// Sends `record` (a [`RecordMessage`], encoded) to `peer` as a `kind` message.
    fn send_encoded_record(&mut self, peer: &NodeId, kind: &str, record: Payload) {
        let Ok(route) = self.route(peer) else { return };
        let envelope = self.control_envelope(peer, kind, record);
        // Not counted as a greeting: a control message goes out in a task of its own, so an
        // application message sent meanwhile could reach the peer first, and the peer could not
        // answer it (it would not know this node's address yet). The first application message
        // carries its own greeting, in order (`prepare_send`).
        self.out.push(Action::SendControl { route, envelope });
    }

    fn control_envelope(&self, to: &NodeId, kind: &str, payload: impl Into<Payload>) -> Envelope {
        let headers: Headers = [(KIND_HEADER, kind)].into_iter().collect();
        Envelope::new(self.ids.next(), self.spec.id.clone(), Destination::Node(to.clone()), payload)
            .with_headers(headers)
    }

    // ---- queries for the sending side ----------------------------------------------------------

    /// How to reach `node`: the first transport (in config order) on which it has an address.
    /// Offline and down peers keep their records: a durable inbox takes what is sent to them.
    pub(crate) fn route(&self, node: &NodeId) -> Result<Route, RouteError> {
        let record = if *node == self.spec.id {
            &self.record
        } else {
            self.membership
                .get(node)
                .map(|(record, _)| record)
                .ok_or_else(|| RouteError::UnknownPeer(node.clone()))?
        };
        // An offline node is reachable only through a durable inbox, which keeps what is sent.
        let offline = record.is_offline();
        let preferred = self.in_service().filter(|(_, t)| !offline || t.durable);
        for (index, transport) in preferred.chain(self.in_service()) {
            if let Some(address) = record.address_for(&transport.name) {
                return Ok(Route { transport: index, address: address.to_string(), peer: node.clone() });
            }
        }
        let names = |list: Vec<&str>| list.join(", ");
        Err(RouteError::NoCommonTransport {
            peer: node.clone(),
            peer_transports: names(record.addresses.iter().map(|(t, _)| t.as_str()).collect()),
            local_transports: names(self.in_service().map(|(_, t)| t.name.as_str()).collect()),
        })
    }

    /// The transports in service with their indexes, in preference order.
    fn in_service(&self) -> impl Iterator<Item = (usize, &TransportFacts)> + Clone {
        self.serving.iter().filter_map(|&index| self.transports.get(index).map(|facts| (index, facts)))
    }

    /// The route to `node` for an application message, with this node's record to send first
    /// if `node` has not had it yet (so that it can answer a node it has never heard of).
    pub(crate) fn prepare_send(&mut self, node: &NodeId) -> Result<(Route, Option<Envelope>), RouteError> {
        let route = self.route(node)?;
        // A hello asks the peer for its record at once: this node learns its services and topics
        // now, not at the peer's next heartbeat.
        // Looked up before it is inserted: no copy of the id on every message.
        let first_contact = *node != self.spec.id && !self.greeted.contains(node);
        let greeting = (first_contact && self.greeted.insert(node.clone())).then(|| {
            let message = RecordMessage { reply: true, ..RecordMessage::of(&self.record) };
            self.control_envelope(node, control::HELLO, message.encode())
        });
        Ok((route, greeting))
    }

    /// The first contact with `node` failed: greet it again next time.
    pub(crate) fn greeting_failed(&mut self, node: &NodeId) {
        self.greeted.remove(node);
    }

    /// Live replicas of `service` (this node included when it serves it), one chosen by the
    /// node's balancing; replicas in `tried` only when there is no other.
    pub(crate) fn choose_replica(&mut self, service: &str, tried: &HashSet<NodeId>) -> Option<Route> {
        let mut candidates: Vec<NodeId> =
            self.membership.live_serving(service).into_iter().map(|record| record.id.clone()).collect();
        // The framework's own services (crate::admin) are asked of a named node only.
        if self.services.contains_key(service) && !self.closing && !crate::admin::is_reserved(service) {
            candidates.push(self.spec.id.clone());
        }
        candidates.sort();
        let refs: Vec<&NodeId> = candidates.iter().collect();
        let chosen = self.pending.choose(&refs, tried, self.spec.balancing)?.clone();
        self.route(&chosen).ok()
    }

    /// Live peers whose announced patterns match `topic`, except those reachable through the
    /// transport `native` (which carries topics itself), with their routes.
    pub(crate) fn subscribers(&self, topic: &str, native: Option<usize>) -> Vec<Route> {
        let native_name = native.and_then(|index| self.transports.get(index)).map(|t| t.name.as_str());
        let ids: Vec<NodeId> = self
            .membership
            .live_subscribed(topic, |record| {
                native_name.is_none_or(|name| record.address_for(name).is_none())
            })
            .into_iter()
            .map(|record| record.id.clone())
            .collect();
        ids.iter().filter_map(|id| self.route(id).ok()).collect()
    }

    /// Whether a subscription of this node matches `topic`.
    pub(crate) fn subscribed_locally(&self, topic: &str) -> Vec<u64> {
        self.subscriptions
            .iter()
            .filter(|(_, entry)| crate::topics::matches(&entry.pattern, topic))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether some live node (this one included) serves `service`.
    pub(crate) fn serves(&self, service: &str) -> bool {
        (self.services.contains_key(service) && !self.closing && !crate::admin::is_reserved(service))
            || self.membership.any_live_serving(service)
    }

    /// Whether `node` is known (up, down or offline).
    pub(crate) fn knows(&self, node: &NodeId) -> bool {
        *node == self.spec.id || self.membership.get(node).is_some()
    }

    /// The status of a known peer.
    pub(crate) fn status(&self, node: &NodeId) -> Option<PeerStatus> {
        self.membership.get(node).map(|(_, status)| status)
    }

    /// The peer table.
    pub(crate) fn peers(&self, now: Instant) -> Vec<membership::PeerInfo> {
        self.membership.snapshot(now)
    }

    /// Live peers, for goodbyes.
    pub(crate) fn live_peers(&self) -> Vec<NodeId> {
        self.membership.live(|_| true).into_iter().map(|r| r.id.clone()).collect()
    }

    /// This node's record.
    pub(crate) fn record(&self) -> &NodeRecord {
        &self.record
    }

    /// Messages dropped by a subscription that was full (at-most-once transports only).
    pub(crate) fn dropped_by(&self, subscription: u64) -> u64 {
        self.subscriptions.get(&subscription).map_or(0, |entry| entry.dropped)
    }

    /// What the engine did not deliver, in total.
    pub(crate) fn counters(&self) -> EngineCounters {
        self.counters
    }

    /// Whether one of this node's transports keeps its inbox while it is away (so it leaves a
    /// record marked offline instead of withdrawing, and peers keep sending to that inbox).
    pub(crate) fn durable(&self) -> bool {
        self.in_service().any(|(_, t)| t.durable)
    }

    /// The goodbye to `peer`; `offline`: this node's inbox keeps what is sent to it.
    pub(crate) fn goodbye(&self, peer: &NodeId, offline: bool) -> Option<(Route, Envelope)> {
        let route = self.route(peer).ok()?;
        let message = RecordMessage { offline, ..RecordMessage::of(&self.record) };
        Some((route, self.control_envelope(peer, control::GOODBYE, message.encode())))
    }

    /// This node's record as it leaves: marked offline (durable transports) or not.
    pub(crate) fn leaving_record(&self) -> NodeRecord {
        let mut record = self.record.clone();
        record.mark_offline();
        let next = control::revision(&record).unwrap_or(0) + 1;
        control::set_revision(&mut record, next);
        record
    }

    /// Every message still waiting for room: the node is closing and hands them back.
    pub(crate) fn drain_parked(&mut self) -> Vec<Action> {
        for parked in self.parked.take_all() {
            self.settled(parked.delivery, SettlementOutcome::REJECTED_REQUEUE);
        }
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests;

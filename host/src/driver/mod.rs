//! # The node's I/O: thin loops around the engine
//!
//! The [`Engine`] makes every decision; this module feeds it and carries out what it says. It
//! owns what the engine must not: the transports and discovery (plugins), the local queues the
//! application reads (the inbox, one per subscription), the service handlers and their tasks,
//! the callers waiting for responses, and the clock.
//!
//! - [`incoming`]: one receive loop per transport, the discovery loop and the timer. Each turns
//!   what happened into an [`Input`].
//! - [`outgoing`]: sending, publishing, requests with retries, answering requests.
//! - [`inbox`]: the queue between the engine and `Node::receive*`, which takes the messages of
//!   one engine step as one chunk.
//! - here: [`Driver::run`] carries out the engine's [`Action`]s. Local deliveries and
//!   settlements happen at once; sends to peers (control messages, forwards, refusals) go out
//!   in a task of their own, so that a slow link never holds up the loop that took the message
//!   (the control lane).
//!
//! The engine sits behind a plain mutex, held only while it decides (never across an await).

mod gathered_sends;
mod inbox;
pub(crate) use inbox::InboxItem;
mod incoming;
mod native_topics;
pub(crate) use native_topics::NativeSubscriptions;
mod outgoing;
mod reload;
mod remote_admin;
mod status;

use crate::{
    acknowledgement::{Acknowledgement, SettleLane, Settler},
    control,
    engine::{
        membership::Source, Action, DeliveryId, DropReason, Engine, IdSource, Input, Local, Route,
        TransportFacts,
    },
    error::{undelivered_sentence, CloseError, FlushError, SendError, WaitError},
    metrics::RequestMetrics,
    security::{RejectedCounter, Signatures, SIGNATURE_HEADER},
    service::Handler,
    spec::NodeSpec,
};
use comms_plugin_api::log_rate::LogRateLimit;
use comms_plugin_api::{
    host_side::{LoadedDiscovery, LoadedTransport},
    Capabilities, Destination, Envelope, Headers, MessageId, NodeId, NodeRecord, Payload, PeerEvent,
    PeerEventKind, PluginError, Settlement, SettlementOutcome, UNDELIVERED_COUNTER,
};
use futures::future::BoxFuture;
use gathered_sends::GatheredSends;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak,
    },
    time::{Duration, Instant},
};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch, Notify},
    task::JoinHandle,
};

pub(crate) use outgoing::STATUS_UNAVAILABLE;
pub(crate) use reload::{Attempt, StartFailure};

/// Peer events buffered per `peer_events()` stream; a consumer that falls further behind skips.
const EVENT_BUFFER: usize = 256;

/// Logged once per process: a subscription dropped a publication because it was full.
static WARNED_SUBSCRIPTION_FULL: AtomicBool = AtomicBool::new(false);

/// A transport as the node holds it.
#[derive(Debug)]
pub(crate) struct NodeTransport {
    pub(crate) name: String,
    pub(crate) plugin: String,
    /// The plugin's own version (what `comms status` reports, so that a swap shows).
    pub(crate) plugin_version: String,
    pub(crate) loaded: Arc<LoadedTransport>,
    /// Where settlements of received messages go (transports with acknowledgements).
    pub(crate) settle_lane: SettleLane,
    /// Set while the engine wants no more messages from this transport (backpressure).
    pub(crate) paused: watch::Sender<bool>,
    /// Sends that overlap go out in one batch (transports with `BATCHED_SEND` only).
    gathered: Option<Arc<GatheredSends>>,
    /// Set when a reload takes this transport out of service: its receive loop stops taking
    /// (transports with acknowledgements) and sends routed to it wait for its successor.
    pub(crate) retiring: watch::Sender<bool>,
    /// The sends under way (a reload waits for them before it closes the transport).
    in_use: reload::InUse,
}

impl NodeTransport {
    pub(crate) fn new(
        name: String,
        (plugin, plugin_version): (String, String),
        loaded: Arc<LoadedTransport>,
    ) -> Self {
        let settle_lane = SettleLane::start(name.clone(), Arc::clone(&loaded));
        let gathers = loaded.info().capabilities.contains(Capabilities::BATCHED_SEND);
        let gathered = gathers.then(|| GatheredSends::new(Arc::clone(&loaded)));
        Self {
            name,
            plugin,
            plugin_version,
            loaded,
            settle_lane,
            paused: watch::channel(false).0,
            gathered,
            retiring: watch::channel(false).0,
            in_use: reload::InUse::default(),
        }
    }

    /// Sends `envelope` (boxed: see [`Driver::send_to_node`]) through this transport, gathered
    /// with the sends that overlap it when the transport takes batches.
    pub(crate) async fn send(&self, address: &str, envelope: Box<Envelope>) -> Result<(), PluginError> {
        match &self.gathered {
            Some(gathered) => gathered.send(address, envelope).await,
            None => self.loaded.send(address, *envelope).await,
        }
    }

    pub(crate) fn has(&self, capability: Capabilities) -> bool {
        self.loaded.info().capabilities.contains(capability)
    }

    fn facts(&self) -> TransportFacts {
        TransportFacts {
            name: self.name.clone(),
            acknowledges: self.has(Capabilities::ACKNOWLEDGEMENTS),
            durable: self.has(Capabilities::DURABLE),
        }
    }
}

/// Every transport the node has run, by index, and the ones in service.
///
/// An index is never reused: a reload that replaces a transport appends its successor, so that
/// a settlement, a pause or a receive loop of the old instance can never reach the new one.
/// The table grows by one entry per replaced transport (a library is never unloaded anyway).
#[derive(Debug, Default)]
pub(crate) struct TransportTable {
    pub(crate) all: Vec<Arc<NodeTransport>>,
    /// Indexes into `all` of the transports in service, in preference order.
    pub(crate) serving: Vec<usize>,
}

impl TransportTable {
    fn new(transports: Vec<Arc<NodeTransport>>) -> Self {
        Self { serving: (0..transports.len()).collect(), all: transports }
    }

    /// The transports in service with their indexes, in preference order.
    pub(crate) fn in_service(&self) -> Vec<(usize, Arc<NodeTransport>)> {
        self.serving.iter().filter_map(|&i| self.all.get(i).map(|t| (i, Arc::clone(t)))).collect()
    }

    /// What the engine is told: facts of all, the indexes in service, the record's addresses.
    fn engine_input(&self) -> Input {
        let addresses = self
            .in_service()
            .iter()
            .map(|(_, t)| (t.name.clone(), t.loaded.info().local_address.clone()))
            .collect();
        Input::TransportsChanged {
            facts: self.all.iter().map(|t| t.facts()).collect(),
            serving: self.serving.clone(),
            addresses,
        }
    }
}

/// Reloads a node from its config file: what the admin service [`crate::admin::RELOAD_SERVICE`]
/// runs. The answer is a line of text either way.
pub(crate) type Reloader =
    Arc<dyn Fn(Arc<Driver>) -> BoxFuture<'static, Result<String, String>> + Send + Sync>;

/// A publication waiting in a subscription's queue.
pub(crate) type Queued = (Envelope, Acknowledgement);

/// Hands the application's verdicts to the engine; weak, so that messages still queued do not
/// keep a dropped node alive.
struct EngineSettler(Weak<Driver>);

impl Settler for EngineSettler {
    fn settle(&self, delivery: u64, outcome: SettlementOutcome) {
        if let Some(driver) = self.0.upgrade() {
            let sends = driver.handle(Input::Settled { delivery, outcome });
            driver.run(sends);
        }
    }
}

/// The node's state and I/O, shared by the `Node` facade and the background tasks.
pub(crate) struct Driver {
    pub(crate) id: NodeId,
    pub(crate) spec: NodeSpec,
    engine: Mutex<Engine>,
    ids: Arc<IdSource>,
    transports: RwLock<TransportTable>,
    discovery: RwLock<Arc<LoadedDiscovery>>,
    /// Counts finished transport swaps: sends that found their transport retiring wait for it.
    swaps: watch::Sender<u64>,
    /// One reload at a time, and the configuration it started from.
    pub(crate) applied: tokio::sync::Mutex<crate::reload::AppliedConfig>,
    /// Reads the node's config file again and applies it, answering what changed (set for
    /// nodes built from a file: see [`crate::config`]); what an admin's reload request runs.
    pub(crate) reloader: OnceLock<Reloader>,
    settler: Arc<dyn Settler>,
    inbox_tx: inbox::InboxSender,
    inbox: tokio::sync::Mutex<inbox::InboxReceiver>,
    subscriptions: Mutex<HashMap<u64, mpsc::Sender<Queued>>>,
    next_subscription: AtomicU64,
    /// The patterns subscribed at the transports with native topics.
    pub(crate) native_subscriptions: NativeSubscriptions,
    services: RwLock<HashMap<String, Handler>>,
    /// Requests being handled by this node's services.
    in_flight: watch::Sender<usize>,
    /// Callers waiting for a response, by the id of their attempt.
    waiting: Mutex<HashMap<MessageId, oneshot::Sender<Envelope>>>,
    events: broadcast::Sender<PeerEvent>,
    /// Wakes the timer when the engine's next deadline moved earlier.
    timer: Notify,
    /// One announcement to discovery at a time, always of the latest record.
    announcing: tokio::sync::Mutex<u64>,
    /// Set once when the node stops for good.
    pub(crate) shutdown: watch::Sender<bool>,
    /// Set when `close` starts: no new requests are served, failing transports are not retried.
    pub(crate) closing: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// By transport index.
    receive_loops: Mutex<Vec<(usize, JoinHandle<()>)>>,
    pub(crate) closed: AtomicBool,
    /// Envelope signatures (`[security] signatures`), if on.
    pub(crate) signatures: Option<Signatures>,
    /// Incoming envelopes refused (signature checks).
    pub(crate) rejected: RejectedCounter,
    /// Per transport, its `undelivered` counter as last reported by a flush or close (each
    /// message given up on is reported once).
    reported_undelivered: Mutex<Vec<u64>>,
    /// Request latencies (the other metrics are read at scrape time: [`crate::metrics`]).
    pub(crate) request_metrics: RequestMetrics,
    /// Where `[metrics] listen` serves, once the endpoint is up.
    pub(crate) metrics_address: OnceLock<SocketAddr>,
    /// When the node started (for its uptime).
    pub(crate) started: Instant,
}

/// The lengths of the node's own queues, for the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueDepths {
    /// Received messages the application has not taken yet.
    pub(crate) inbox: u64,
    /// This node's calls waiting for a response.
    pub(crate) requests_waiting: u64,
    /// Requests this node's services are handling.
    pub(crate) requests_being_served: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The engine's clock: tokio's, so that tests with paused time see it too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Driver {
    /// Starts the engine and the background tasks of node `id`; `peers`: what discovery knew at
    /// start (each is greeted and asked for its record at once).
    pub(crate) fn start(
        id: NodeId,
        spec: NodeSpec,
        transports: Vec<Arc<NodeTransport>>,
        (discovery, record, peers): (LoadedDiscovery, NodeRecord, Vec<NodeRecord>),
        signatures: Option<Signatures>,
        applied: crate::reload::AppliedConfig,
    ) -> Arc<Self> {
        let ids = Arc::new(IdSource::new(rand::random()));
        let facts = transports.iter().map(|t| t.facts()).collect();
        let engine = Engine::new(spec.engine_spec(id.clone()), facts, record, Arc::clone(&ids), now());
        let (inbox_tx, inbox_rx) = inbox::inbox(spec.receive_queue_capacity);
        let driver = Arc::new_cyclic(|me: &Weak<Driver>| Driver {
            id,
            spec,
            engine: Mutex::new(engine),
            ids,
            transports: RwLock::new(TransportTable::new(transports)),
            discovery: RwLock::new(Arc::new(discovery)),
            swaps: watch::channel(0).0,
            applied: tokio::sync::Mutex::new(applied),
            reloader: OnceLock::new(),
            settler: Arc::new(EngineSettler(me.clone())),
            inbox_tx,
            inbox: tokio::sync::Mutex::new(inbox_rx),
            subscriptions: Mutex::new(HashMap::new()),
            next_subscription: AtomicU64::new(1),
            native_subscriptions: NativeSubscriptions::default(),
            services: RwLock::new(HashMap::new()),
            in_flight: watch::channel(0).0,
            waiting: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENT_BUFFER).0,
            timer: Notify::new(),
            announcing: tokio::sync::Mutex::new(0),
            shutdown: watch::channel(false).0,
            closing: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            receive_loops: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            signatures,
            rejected: RejectedCounter::default(),
            reported_undelivered: Mutex::new(Vec::new()),
            request_metrics: RequestMetrics::default(),
            metrics_address: OnceLock::new(),
            started: now(),
        });
        // The framework's own service (not announced): see crate::admin.
        let status = status::status_handler(driver.spec.codec, Arc::downgrade(&driver));
        driver.add_service(crate::admin::STATUS_SERVICE, status);
        let served = Input::Served { name: crate::admin::STATUS_SERVICE.to_string(), limit: 4 };
        driver.run(driver.handle(served));
        let shutdown = remote_admin::shutdown_handler(driver.spec.codec, Arc::downgrade(&driver));
        driver.add_service(crate::admin::SHUTDOWN_SERVICE, shutdown);
        let served = Input::Served { name: crate::admin::SHUTDOWN_SERVICE.to_string(), limit: 1 };
        driver.run(driver.handle(served));
        let reload = remote_admin::reload_handler(driver.spec.codec, Arc::downgrade(&driver));
        driver.add_service(crate::admin::RELOAD_SERVICE, reload);
        let served = Input::Served { name: crate::admin::RELOAD_SERVICE.to_string(), limit: 1 };
        driver.run(driver.handle(served));
        let serving = driver.table().serving.clone();
        for index in serving {
            driver.start_receive_loop(index);
        }
        let tasks = vec![
            tokio::spawn(incoming::watch_discovery(Arc::clone(&driver))),
            tokio::spawn(incoming::timer(Arc::clone(&driver))),
        ];
        *lock(&driver.tasks) = tasks;
        for record in peers {
            driver.run(driver.handle(Input::Discovery(PeerEvent { kind: PeerEventKind::Joined, record })));
        }
        driver
    }

    /// The transport table (never held across an await).
    pub(crate) fn table(&self) -> std::sync::RwLockReadGuard<'_, TransportTable> {
        self.transports.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The transport at `index` (in service or not).
    pub(crate) fn transport(&self, index: usize) -> Option<Arc<NodeTransport>> {
        self.table().all.get(index).cloned()
    }

    /// The transports in service with their indexes, in preference order.
    pub(crate) fn serving_transports(&self) -> Vec<(usize, Arc<NodeTransport>)> {
        self.table().in_service()
    }

    /// The index of the transport in service called `name`.
    pub(crate) fn serving_index(&self, name: &str) -> Option<usize> {
        let table = self.table();
        table.serving.iter().copied().find(|&index| table.all.get(index).is_some_and(|t| t.name == name))
    }

    /// The discovery in service.
    pub(crate) fn discovery(&self) -> Arc<LoadedDiscovery> {
        Arc::clone(&self.discovery.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn start_receive_loop(self: &Arc<Self>, index: usize) {
        let handle = tokio::spawn(incoming::receive_loop(Arc::clone(self), index));
        lock(&self.receive_loops).push((index, handle));
    }

    /// The peers this node knows, with liveness, sorted by id.
    pub(crate) fn peers(&self) -> Vec<crate::PeerInfo> {
        self.engine().peers(now())
    }

    /// Repeated messages the dedup window dropped.
    pub(crate) fn duplicates(&self) -> u64 {
        self.engine().counters().duplicates
    }

    /// The lengths of the node's own queues now.
    pub(crate) fn queue_depths(&self) -> QueueDepths {
        QueueDepths {
            inbox: self.inbox_tx.waiting() as u64,
            requests_waiting: lock(&self.waiting).len() as u64,
            requests_being_served: *self.in_flight.borrow() as u64,
        }
    }

    // ---- the engine ------------------------------------------------------------------------------

    /// The engine, for a query (never held across an await).
    pub(crate) fn engine(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    /// Hands `input` to the engine and carries out at once what can be (see
    /// [`Driver::handle_all`]); returns the sends to peers, for [`Driver::run`] or
    /// [`Driver::run_and_wait`].
    pub(crate) fn handle(self: &Arc<Self>, input: Input) -> Sends {
        self.handle_all(std::iter::once(input))
    }

    /// Hands several inputs to the engine under one lock (a received batch).
    ///
    /// What happens locally (deliveries to queues, settlements, pausing a transport, completing
    /// a request, peer events) is carried out before the lock is released: so it happens in the
    /// order the engine decided it, whichever threads feed the engine. (Carried out after, a
    /// Pause could land after the Resume that followed it, or a parked message after a newer
    /// one.) Nothing done under the lock waits or calls back into the engine.
    pub(crate) fn handle_all(self: &Arc<Self>, inputs: impl IntoIterator<Item = Input>) -> Sends {
        let inputs: Vec<Input> = inputs.into_iter().collect();
        // Only these can bring the engine's next deadline forward (a parked message, a new peer
        // to expire); the others never wake the timer, and skip the check.
        let may_advance = inputs.iter().any(|input| {
            matches!(input, Input::Received { .. } | Input::Local(_) | Input::Discovery(_) | Input::Closing)
        });
        // Usually one action per input (a received message's delivery).
        self.process(may_advance, inputs.len(), |engine, now, actions| {
            for input in inputs {
                engine.handle_into(input, now, actions);
            }
        })
    }

    /// Runs `decide` on the engine, carries out the local actions it returns under the same
    /// lock, and returns the sends. `expected_actions` sizes the actions' vector once (growing
    /// it moves every action again).
    fn process(
        self: &Arc<Self>,
        may_advance_deadline: bool,
        expected_actions: usize,
        decide: impl FnOnce(&mut Engine, Instant, &mut Vec<Action>),
    ) -> Sends {
        let mut engine = self.engine();
        // Read under the lock, so that the engine sees time only move forward.
        let now = now();
        let before = if may_advance_deadline { engine.next_deadline() } else { None };
        let mut actions = Vec::with_capacity(expected_actions);
        decide(&mut engine, now, &mut actions);
        let mut sends = Sends::default();
        // A delivery that finds its queue gone is settled here, under the same lock.
        let mut settle_later = Vec::new();
        while !actions.is_empty() {
            self.execute(std::mem::take(&mut actions), &mut sends, &mut settle_later);
            for (delivery, outcome) in settle_later.drain(..) {
                engine.handle_into(Input::Settled { delivery, outcome }, now, &mut actions);
            }
        }
        let after = if may_advance_deadline { engine.next_deadline() } else { None };
        drop(engine);
        if after.is_some_and(|after| before.is_none_or(|before| after < before)) {
            self.timer.notify_one();
        }
        sends
    }

    /// Sends to peers go out in tasks of their own (they never hold up the caller).
    pub(crate) fn run(self: &Arc<Self>, sends: Sends) {
        let Sends { concurrent, in_order } = sends;
        if concurrent.is_empty() && in_order.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                if !concurrent.is_empty() {
                    drop(runtime.spawn(futures::future::join_all(concurrent)));
                }
                if !in_order.is_empty() {
                    drop(runtime.spawn(one_after_another(in_order)));
                }
            }
            // The application's runtime is gone (a node dropped outside it): nobody to tell.
            Err(_) => tracing::debug!("no runtime: messages to peers not sent"),
        }
    }

    /// The sends for a received batch: framework messages go out beside the loop, while
    /// forwarded messages (relay) go out before the loop takes more, in the order they came (a
    /// slow next hop slows the relay's intake, and nothing is reordered).
    pub(crate) async fn run_received(self: &Arc<Self>, sends: Sends) {
        let Sends { concurrent, in_order } = sends;
        if !concurrent.is_empty() {
            tokio::spawn(futures::future::join_all(concurrent));
        }
        one_after_another(in_order).await;
    }

    /// Waits for the sends (each bounded in time).
    pub(crate) async fn run_and_wait(self: &Arc<Self>, sends: Sends) {
        let Sends { concurrent, in_order } = sends;
        futures::future::join(futures::future::join_all(concurrent), one_after_another(in_order)).await;
    }

    /// Carries out the local actions; adds the sends to peers to `sends`, and to `settle_later`
    /// the deliveries whose queue is gone.
    fn execute(
        self: &Arc<Self>,
        actions: Vec<Action>,
        sends: &mut Sends,
        settle_later: &mut Vec<(u64, SettlementOutcome)>,
    ) {
        // The messages for the inbox go in as one chunk, after the other actions of this step;
        // sized once, at the first of them.
        let mut to_inbox = Vec::new();
        let count = actions.len();
        for action in actions {
            match action {
                Action::Deliver { to: Local::Inbox, envelope, delivery } => {
                    if to_inbox.capacity() == 0 {
                        to_inbox.reserve_exact(count);
                    }
                    to_inbox.push(InboxItem::Message(envelope, self.acknowledgement(delivery)));
                }
                Action::Deliver { to, envelope, delivery } => {
                    if let Some(outcome) = self.deliver(to, envelope, delivery) {
                        settle_later.push((delivery, outcome));
                    }
                }
                Action::Settle { transport, tag, outcome } => {
                    if let Some(transport) = self.transport(transport) {
                        transport.settle_lane.settle(Settlement { delivery_tag: tag, outcome });
                    }
                }
                Action::SendControl { route, envelope } => {
                    let driver = Arc::clone(self);
                    sends
                        .concurrent
                        .push(Box::pin(async move { driver.send_control(route, envelope).await }));
                }
                Action::Forward { route, envelope, delivery } => {
                    let driver = Arc::clone(self);
                    sends.in_order.push(Box::pin(async move {
                        if let Err(error) = driver.send_to_node(&route.peer, envelope).await {
                            if let Some(repeats) = RELAY_FAILED.check() {
                                tracing::warn!(to = %route.peer, %error, "relaying a message failed{repeats}");
                            }
                        }
                        let accepted = Input::Settled { delivery, outcome: SettlementOutcome::ACCEPTED };
                        driver.run(driver.handle(accepted));
                    }));
                }
                Action::Refuse { request, reason } => {
                    let driver = Arc::clone(self);
                    sends.concurrent.push(Box::pin(async move {
                        driver.respond(&request, Err((STATUS_UNAVAILABLE, reason))).await;
                    }));
                }
                Action::CompleteRequest { id, response } => {
                    if let Some(waiter) = lock(&self.waiting).remove(&id) {
                        let _ = waiter.send(response);
                    }
                }
                Action::PeerEvent(event) => {
                    let _ = self.events.send(event);
                }
                Action::Announce(_) => {
                    let driver = Arc::clone(self);
                    sends.concurrent.push(Box::pin(async move { driver.announce_latest().await }));
                }
                Action::Pause { transport } => {
                    if let Some(transport) = self.transport(transport) {
                        tracing::debug!(transport = %transport.name, "local queues full: taking no more for now");
                        transport.paused.send_replace(true);
                    }
                }
                Action::Resume { transport } => {
                    if let Some(transport) = self.transport(transport) {
                        transport.paused.send_replace(false);
                    }
                }
                Action::Dropped { from, id, reason } => log_dropped(&from, id, reason),
                Action::RecordRefused { source, reason } => log_record_refused(source, &reason),
            }
        }
        settle_later.extend(self.put_in_inbox(to_inbox));
    }

    /// Puts messages the engine delivered to the inbox in it, as one chunk. The engine counted
    /// the room, so a refusal means the inbox is gone (the node was dropped): returns how to
    /// settle each message handed back.
    fn put_in_inbox(&self, chunk: Vec<InboxItem>) -> Vec<(u64, SettlementOutcome)> {
        let Err(refused) = self.inbox_tx.put(chunk) else { return Vec::new() };
        tracing::debug!("inbox closed; messages handed back");
        refused
            .into_iter()
            .filter_map(|item| match item {
                InboxItem::Message(_, acknowledgement) => acknowledgement.defuse(),
                InboxItem::TransportFailed { .. } => None,
            })
            .map(|delivery| (delivery, SettlementOutcome::REJECTED_REQUEUE))
            .collect()
    }

    /// The acknowledgement of a delivery. Delivery 0: nothing to settle (a transport without
    /// acknowledgements), and no handle on the settler to take and drop per message.
    fn acknowledgement(&self, delivery: u64) -> Acknowledgement {
        match delivery {
            0 => Acknowledgement::none(),
            _ => Acknowledgement::pending(Arc::clone(&self.settler), delivery),
        }
    }

    /// Puts a message in a subscription's queue (the engine counted the room) or starts its
    /// handler (the inbox takes its messages a step at a time: see [`Driver::execute`]). Returns
    /// how to settle it when its queue is gone (the subscription ended meanwhile).
    fn deliver(self: &Arc<Self>, to: Local, envelope: Envelope, delivery: u64) -> Option<SettlementOutcome> {
        let acknowledgement = self.acknowledgement(delivery);
        match to {
            Local::Subscription(id) => {
                let queue = lock(&self.subscriptions).get(&id).cloned();
                let refused = match queue {
                    Some(queue) => queue.try_send((envelope, acknowledgement)).err()?.into_inner().1,
                    None => acknowledgement,
                };
                // Nobody will read it.
                tracing::debug!(subscription = id, "subscription ended; publication dropped");
                refused.defuse().map(|_| SettlementOutcome::ACCEPTED)
            }
            Local::Service(name) => {
                self.start_handler(name, envelope, acknowledgement);
                None
            }
            Local::Inbox => {
                let handed_back = self.put_in_inbox(vec![InboxItem::Message(envelope, acknowledgement)]);
                handed_back.first().map(|(_, outcome)| *outcome)
            }
        }
    }

    /// Runs the handler of `service` for one request in a task of its own; the request is
    /// settled once the response is sent.
    fn start_handler(
        self: &Arc<Self>,
        service: String,
        request: Envelope,
        mut acknowledgement: Acknowledgement,
    ) {
        let handler = self.services.read().unwrap_or_else(|p| p.into_inner()).get(&service).cloned();
        self.in_flight.send_modify(|n| *n += 1);
        let driver = Arc::clone(self);
        tokio::spawn(async move {
            let reply_to = Envelope::new(request.id, request.from.clone(), request.to.clone(), Vec::new());
            let result = match handler {
                Some(handler) => handler(request).await.into_result(),
                None => Err((STATUS_UNAVAILABLE, format!("node `{}` does not serve `{service}`", driver.id))),
            };
            driver.respond(&reply_to, result).await;
            acknowledgement.accept();
            driver.run(driver.handle(Input::Taken { from: Local::Service(service), count: 1 }));
            driver.in_flight.send_modify(|n| *n -= 1);
        });
    }

    /// Sends a framework message, bounded in time (a slow or unreachable peer holds up nobody).
    async fn send_control(&self, route: Route, envelope: Envelope) {
        let Some(transport) = self.transport(route.transport) else { return };
        let limit = self.spec.heartbeat_interval.unwrap_or(Duration::from_secs(1));
        let kind = envelope.header(control::KIND_HEADER).unwrap_or("").to_string();
        let sent =
            tokio::time::timeout(limit, transport.send(&route.address, Box::new(self.sealed(envelope))))
                .await;
        let failure = match sent {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("timed out after {limit:?}"),
        };
        tracing::debug!(peer = %route.peer, kind, failure, "framework message not sent");
        // Not greeted after all: the next message to the peer says hello first.
        self.engine().greeting_failed(&route.peer);
    }

    /// Announces this node's latest record to discovery, unless a newer one went already.
    async fn announce_latest(&self) {
        let mut announced = self.announcing.lock().await;
        let record = self.engine().record().clone();
        let revision = control::revision(&record).unwrap_or(0);
        if revision <= *announced || *self.closing.borrow() {
            return;
        }
        match self.discovery().announce(record).await {
            Ok(()) => *announced = revision,
            Err(error) => tracing::warn!(%error, "announcing the node's record to discovery failed"),
        }
    }

    // ---- local queues --------------------------------------------------------------------------

    /// The next item of the inbox; `None` once the node is gone.
    pub(crate) async fn next_inbox_item(self: &Arc<Self>) -> Option<InboxItem> {
        let mut items = self.next_inbox_items(1).await;
        items.pop()
    }

    /// Waits for the next item of the inbox, then takes the messages waiting behind it, `max` in
    /// all (at least one), with one engine call for the batch: a transport failure comes alone
    /// (it ends a batch and is returned by the next call). Empty once the node is gone.
    pub(crate) async fn next_inbox_items(self: &Arc<Self>, max: usize) -> Vec<InboxItem> {
        let mut inbox = self.inbox.lock().await;
        // Closed: what is still queued, then nothing (a wait would never end). Subscribed only
        // if the take has to wait.
        let stopped = async {
            let _ = self.shutdown.subscribe().wait_for(|stopped| *stopped).await;
        };
        let items = inbox.take(max, stopped).await;
        drop(inbox);
        if matches!(items.first(), Some(InboxItem::Message(..))) {
            self.run(self.handle(Input::Taken { from: Local::Inbox, count: items.len() }));
        }
        items
    }

    /// Settles deliveries taken from the inbox (their defused acknowledgements) as accepted,
    /// with one engine call.
    pub(crate) fn accept_all(self: &Arc<Self>, deliveries: Vec<DeliveryId>) {
        if !deliveries.is_empty() {
            let settled = deliveries
                .into_iter()
                .map(|delivery| Input::Settled { delivery, outcome: SettlementOutcome::ACCEPTED });
            self.run(self.handle_all(settled));
        }
    }

    /// Reports a transport's failure to the application (dropped if the inbox is full: then
    /// the application is not reading anyway, and the log has it).
    pub(crate) fn report_failure(&self, transport: &str, error: PluginError) {
        let _ =
            self.inbox_tx.put(vec![InboxItem::TransportFailed { transport: transport.to_string(), error }]);
    }

    /// A new subscription's id and queue.
    pub(crate) fn add_subscription(&self) -> (u64, mpsc::Receiver<Queued>) {
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(crate::spec::SUBSCRIPTION_BUFFER);
        lock(&self.subscriptions).insert(id, sender);
        (id, receiver)
    }

    /// Ends a subscription; what waits for it is settled.
    pub(crate) fn remove_subscription(self: &Arc<Self>, id: u64) {
        if lock(&self.subscriptions).remove(&id).is_some() {
            self.run(self.handle(Input::Unsubscribed { id }));
        }
    }

    /// Ends a subscription to `pattern` that was subscribed at the transports (see
    /// [`native_topics`]).
    pub(crate) fn end_subscription(self: &Arc<Self>, id: u64, pattern: String) {
        self.remove_subscription(id);
        NativeSubscriptions::release(self, pattern);
    }

    /// Ends every subscription's stream (the node stopped).
    pub(crate) fn clear_subscriptions(&self) {
        lock(&self.subscriptions).clear();
    }

    /// `false` if `name` is served already.
    pub(crate) fn add_service(&self, name: &str, handler: Handler) -> bool {
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        if services.contains_key(name) {
            return false;
        }
        services.insert(name.to_string(), handler);
        true
    }

    pub(crate) fn remove_service(&self, name: &str) -> bool {
        self.services.write().unwrap_or_else(|p| p.into_inner()).remove(name).is_some()
    }

    /// Peer events from now on.
    pub(crate) fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    // ---- envelopes -----------------------------------------------------------------------------

    pub(crate) fn new_envelope(
        &self,
        to: Destination,
        headers: Headers,
        payload: impl Into<Payload>,
    ) -> Envelope {
        Envelope::new(self.ids.next(), self.id.clone(), to, payload).with_headers(headers)
    }

    /// Signs an envelope this node sends, if signatures are on. Envelopes of other nodes
    /// (relayed) and envelopes already signed (a publication sent to several subscribers) are
    /// left as they are.
    pub(crate) fn sealed(&self, mut envelope: Envelope) -> Envelope {
        self.seal(&mut envelope);
        envelope
    }

    /// [`Driver::sealed`], in place.
    pub(crate) fn seal(&self, envelope: &mut Envelope) {
        if let Some(signatures) = &self.signatures {
            let signed = envelope.header(SIGNATURE_HEADER).is_some();
            if envelope.from == self.id && !signed {
                signatures.seal(envelope);
            }
        }
    }

    pub(crate) fn check_open(&self) -> Result<(), SendError> {
        if self.closed.load(Ordering::Acquire) {
            Err(SendError::Closed)
        } else {
            Ok(())
        }
    }

    // ---- waiting -------------------------------------------------------------------------------

    /// Waits until `ready` holds for the engine (checked at once, then after every peer event),
    /// for at most `limit`.
    pub(crate) async fn wait_until(
        &self,
        what: impl FnOnce() -> String,
        limit: Duration,
        mut ready: impl FnMut(&Engine) -> bool,
    ) -> Result<(), WaitError> {
        // Subscribe before the first check, so that no change between the two is missed.
        let mut changes = self.events.subscribe();
        let mut check = || ready(&self.engine());
        let waiting = async {
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return Err(WaitError::Closed);
                }
                if check() {
                    return Ok(());
                }
                match changes.recv().await {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(WaitError::Closed),
                }
            }
        };
        match tokio::time::timeout(limit, waiting).await {
            Ok(result) => result,
            Err(_) if ready(&self.engine()) => Ok(()),
            Err(_) => Err(WaitError::TimedOut { what: what(), waited: limit }),
        }
    }

    // ---- flushing and closing ---------------------------------------------------------------

    /// Waits until every transport's send queue is empty (written, or given up on), for at
    /// most `limit`; reports the messages given up on since the last report.
    ///
    /// The v1 contract has no "queue drained" event: the queue depths of `stats()` (cheap, by
    /// contract) are read again after a pause that grows from 1 to 50 ms.
    pub(crate) async fn flush(&self, limit: Duration) -> Result<(), FlushError> {
        let started = tokio::time::Instant::now();
        let transports = self.serving_transports();
        let mut pause = Duration::from_millis(1);
        let queued = loop {
            let queued: u64 =
                transports.iter().map(|(_, t)| t.loaded.stats().transport.send_queue_depth).sum();
            let waited = started.elapsed();
            if queued == 0 || waited >= limit {
                break queued;
            }
            tokio::time::sleep(pause.min(limit - waited)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        let by_transport = self.take_undelivered();
        let count = by_transport.iter().map(|(_, count)| count).sum();
        if queued > 0 {
            return Err(FlushError::TimedOut { queued, waited: limit, undelivered: count });
        }
        if count > 0 {
            return Err(FlushError::Undelivered { count, by_transport });
        }
        Ok(())
    }

    /// The messages each transport gave up on (its [`UNDELIVERED_COUNTER`]) since the last call,
    /// for the transports that gave some up.
    fn take_undelivered(&self) -> Vec<(String, u64)> {
        let all = self.table().all.clone();
        let mut reported = lock(&self.reported_undelivered);
        reported.resize(all.len(), 0);
        let mut news = Vec::new();
        for (transport, reported) in all.iter().zip(reported.iter_mut()) {
            let stats = transport.loaded.stats();
            let total = stats
                .transport
                .counters
                .iter()
                .find(|(name, _)| name == UNDELIVERED_COUNTER)
                .map_or(0, |(_, value)| *value);
            if total > *reported {
                news.push((transport.name.clone(), total - *reported));
                *reported = total;
            }
        }
        news
    }

    /// Leaves gracefully (see `Node::close`).
    pub(crate) async fn close(self: &Arc<Self>) -> Result<(), CloseError> {
        let deadline = self.spec.close_timeout;
        self.closing.send_replace(true);
        self.run(self.handle(Input::Closing));
        let mut failures = Vec::new();
        let mut in_flight = self.in_flight.subscribe();
        if tokio::time::timeout(deadline, in_flight.wait_for(|n| *n == 0)).await.is_err() {
            failures.push("requests in flight did not finish within the close timeout".to_string());
        }
        let offline = self.engine().durable();
        {
            let _turn = self.announcing.lock().await;
            if offline {
                // Still addressable: the durable inbox takes what is sent meanwhile.
                let record = self.engine().leaving_record();
                if let Err(error) = self.discovery().announce(record).await {
                    failures.push(format!("announcing the offline record to discovery: {error}"));
                }
            } else if let Err(error) = self.discovery().withdraw(&self.id).await {
                failures.push(format!("withdrawing from discovery: {error}"));
            }
        }
        self.say_goodbye(offline).await;
        let loops = std::mem::take(&mut *lock(&self.receive_loops));
        let transports = self.serving_transports();
        let (mut acknowledging, draining): (Vec<_>, Vec<_>) = loops
            .into_iter()
            .filter_map(|(index, handle)| self.transport(index).map(|transport| (transport, handle)))
            .partition(|(transport, _)| transport.has(Capabilities::ACKNOWLEDGEMENTS));
        // The settlements given so far reach each acknowledging transport before it closes;
        // messages still waiting for room go back. Messages the application still holds
        // unacknowledged stay with the broker, which delivers them again.
        let settled = tokio::time::timeout(deadline, async {
            for (_, handle) in acknowledging.iter_mut() {
                let _ = handle.await;
            }
            let sends = self.process(false, 0, |engine, _, actions| actions.extend(engine.drain_parked()));
            self.run(sends);
            for (transport, _) in &acknowledging {
                transport.settle_lane.flush().await;
            }
        })
        .await;
        if settled.is_err() {
            failures.push("received messages could not be handed back in time".to_string());
        }
        for (_, transport) in &transports {
            if let Err(error) = transport.loaded.close().await {
                failures.push(format!("transport `{}`: {error}", transport.name));
            }
        }
        let drained = tokio::time::timeout(deadline, async {
            for (_, handle) in draining {
                let _ = handle.await;
            }
        })
        .await;
        if drained.is_err() {
            failures.push("received messages could not be handed over in time (inbox full)".to_string());
        }
        // Closed transports have written or given up on everything they took.
        let by_transport = self.take_undelivered();
        let undelivered = by_transport.iter().map(|(_, count)| count).sum();
        if undelivered > 0 {
            failures.push(undelivered_sentence(undelivered, &by_transport));
        }
        self.shutdown.send_replace(true);
        // Callers still waiting for a response see it abandoned.
        lock(&self.waiting).clear();
        self.clear_subscriptions();
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let _ = task.await;
        }
        if let Err(error) = self.discovery().close().await {
            failures.push(format!("discovery: {error}"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CloseError { failures, undelivered })
        }
    }

    /// Tells every live peer this node is leaving, all at once, each bounded in time.
    async fn say_goodbye(&self, offline: bool) {
        let goodbyes: Vec<(Route, Envelope)> = {
            let engine = self.engine();
            engine.live_peers().iter().filter_map(|peer| engine.goodbye(peer, offline)).collect()
        };
        let limit = self.spec.close_timeout.min(Duration::from_secs(1));
        let sends = goodbyes.into_iter().map(|(route, envelope)| async move {
            let Some(transport) = self.transport(route.transport) else { return };
            let sent =
                tokio::time::timeout(limit, transport.send(&route.address, Box::new(self.sealed(envelope))))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!(peer = %route.peer, "goodbye not sent");
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Stops the background tasks without telling peers (the last `Node` handle was dropped).
    pub(crate) fn stop(&self) {
        self.shutdown.send_replace(true);
        self.clear_subscriptions();
    }
}

/// Sends the engine asked for: framework messages (any order, all at once) and application
/// data passing through (in the order it came).
#[derive(Default)]
pub(crate) struct Sends {
    concurrent: Vec<BoxFuture<'static, ()>>,
    in_order: Vec<BoxFuture<'static, ()>>,
}

async fn one_after_another(sends: Vec<BoxFuture<'static, ()>>) {
    for send in sends {
        send.await;
    }
}

// Warnings that a peer can repeat once per message it sends: each written at most
// `LogRateLimit::standard()` times per interval, then counted in the next line.
static NOT_FOR_THIS_NODE: LogRateLimit = LogRateLimit::standard();
static RELAY_FAILED: LogRateLimit = LogRateLimit::standard();
static INVALID_SENDER: LogRateLimit = LogRateLimit::standard();
static HEARD_RECORD_REFUSED: LogRateLimit = LogRateLimit::standard();
static DISCOVERY_RECORD_REFUSED: LogRateLimit = LogRateLimit::standard();

/// Logs a peer's record the engine did not take.
fn log_record_refused(source: Source, reason: &str) {
    match source {
        Source::Heard => {
            if let Some(repeats) = HEARD_RECORD_REFUSED.check() {
                tracing::warn!(reason, "a peer's hello or heartbeat was refused{repeats}");
            }
        }
        Source::Discovery => {
            if let Some(repeats) = DISCOVERY_RECORD_REFUSED.check() {
                tracing::warn!(reason, "a peer reported by discovery was refused{repeats}");
            }
        }
    }
}

/// Logs a message the engine did not deliver.
fn log_dropped(from: &NodeId, id: MessageId, reason: DropReason) {
    match reason {
        DropReason::NotForThisNode(to) => {
            if let Some(repeats) = NOT_FOR_THIS_NODE.check() {
                tracing::warn!(
                    %from, %to, %id,
                    "message for another node dropped (this node does not relay){repeats}"
                )
            }
        }
        DropReason::NoRoute(why) => {
            if let Some(repeats) = RELAY_FAILED.check() {
                tracing::warn!(%from, %id, why, "relaying a message failed{repeats}")
            }
        }
        DropReason::InvalidSender(problem) => {
            if let Some(repeats) = INVALID_SENDER.check() {
                // Debug-quoted: the id may hold a newline that would forge a log line.
                tracing::warn!(from = ?from.as_str(), %id, problem, "message from an invalid node id refused{repeats}")
            }
        }
        DropReason::Duplicate => {
            tracing::debug!(%from, %id, "a message seen before was dropped (dedup_window)")
        }
        DropReason::SubscriptionFull { subscription } => {
            if !WARNED_SUBSCRIPTION_FULL.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    subscription,
                    buffer = crate::spec::SUBSCRIPTION_BUFFER,
                    "a subscription is not read fast enough: publications for it are dropped while its \
                     buffer is full (Subscription::dropped counts them)"
                );
            }
        }
        DropReason::LateResponse => {
            tracing::debug!(%from, %id, "response with no waiting request (late or duplicate) dropped")
        }
        DropReason::UnknownControl(kind) => {
            tracing::debug!(%from, %id, kind, "unknown framework message ignored")
        }
    }
}

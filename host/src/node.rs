//! The `Node`: what applications use.

use crate::{
    acknowledgement::{Acknowledgement, SettleLane},
    builder::NodeBuilder,
    codec::{Codec, CONTENT_TYPE_HEADER},
    config,
    control::{self, RecordMessage, KIND_HEADER, STATUS_HEADER},
    dedup::DedupWindow,
    dispatch,
    error::{BuildError, CloseError, ReceiveError, RequestError, SendError, ServeError, WaitError},
    fault_injection::FaultInjector,
    membership::{Membership, PeerInfo},
    request_response::{Balancing, PendingRequests, RequestOptions},
    security::{RejectedCounter, Signatures, SIGNATURE_HEADER, SIGNED_AT_HEADER},
    service::{ServiceHandler, Services},
    subscription::{HandlerSubscription, Subscription, Subscriptions},
    topics::{validate_pattern, validate_topic},
};
use comms_plugin_api::{
    host_side::{LoadedDiscovery, LoadedTransport},
    Capabilities, Destination, Envelope, Headers, MessageId, NodeId, NodeRecord, Payload, PeerEvent,
    PluginError,
};
use futures::Stream;
use serde::{de::DeserializeOwned, Serialize};
use std::{
    collections::HashSet,
    future::Future,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// A typed message as the application receives it.
///
/// # Acknowledgement
///
/// A message from a transport with acknowledgements (Redis, RabbitMQ, SQLite: at-least-once)
/// stays with the broker until the application is done with it. Call [`Received::ack`] when it
/// is handled, [`Received::nack`] to have it delivered again later, or [`Received::reject`] to
/// refuse it for good. A `Received` dropped without any of them (or whose `message` was moved
/// out before) is delivered again, as if the process had crashed: nothing is lost, and a message
/// may be handled twice. Service handlers need none of this: the node acknowledges a request
/// when its handler returns. For transports without acknowledgements (TCP, UDP, memory) the
/// three methods do nothing.
///
/// A clone carries the message but not the duty to acknowledge it.
pub struct Received<T> {
    /// Who sent it.
    pub from: NodeId,
    /// Its id (the same if it is delivered twice).
    pub id: MessageId,
    /// Its headers.
    pub headers: Headers,
    /// The decoded message.
    pub message: T,
    acknowledgement: Acknowledgement,
}

impl<T> Received<T> {
    pub(crate) fn new(
        envelope_parts: (NodeId, MessageId, Headers),
        message: T,
        acknowledgement: Acknowledgement,
    ) -> Self {
        let (from, id, headers) = envelope_parts;
        Self { from, id, headers, message, acknowledgement }
    }

    /// Done with it: the broker forgets it.
    pub fn ack(&mut self) {
        self.acknowledgement.accept();
    }

    /// Not handled: the broker delivers it again (to this node or another consumer of its
    /// inbox), after a delay that depends on the backend.
    pub fn nack(&mut self) {
        self.acknowledgement.requeue();
    }

    /// Refused for good (malformed, or poison): the broker discards it (or dead-letters it, where
    /// the backend is set up for that).
    pub fn reject(&mut self) {
        self.acknowledgement.reject();
    }

    pub(crate) fn acknowledgement_mut(&mut self) -> &mut Acknowledgement {
        &mut self.acknowledgement
    }

    /// Whether this message still waits for [`Received::ack`], [`Received::nack`] or
    /// [`Received::reject`] (always `false` for transports without acknowledgements).
    pub fn needs_acknowledgement(&self) -> bool {
        self.acknowledgement.is_pending()
    }
}

impl Received<Envelope> {
    /// An undecoded message: the envelope is the message.
    pub(crate) fn raw(envelope: Envelope, acknowledgement: Acknowledgement) -> Self {
        let parts = (envelope.from.clone(), envelope.id, envelope.headers.clone());
        Self::new(parts, envelope, acknowledgement)
    }
}

impl<T: Clone> Clone for Received<T> {
    fn clone(&self) -> Self {
        Self {
            from: self.from.clone(),
            id: self.id,
            headers: self.headers.clone(),
            message: self.message.clone(),
            acknowledgement: Acknowledgement::none(),
        }
    }
}

impl<T: PartialEq> PartialEq for Received<T> {
    fn eq(&self, other: &Self) -> bool {
        (&self.from, self.id, &self.headers, &self.message)
            == (&other.from, other.id, &other.headers, &other.message)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Received<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("from", &self.from)
            .field("id", &self.id)
            .field("headers", &self.headers)
            .field("message", &self.message)
            .field("needs_acknowledgement", &self.needs_acknowledgement())
            .finish()
    }
}

/// Node-wide settings from the `[node]` table or the builder.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) codec: Codec,
    pub(crate) receive_queue_capacity: usize,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) peer_timeout: Duration,
    pub(crate) balancing: Balancing,
    pub(crate) request_options: RequestOptions,
    pub(crate) close_timeout: Duration,
    /// Forward messages addressed to other nodes (a bridge between backends).
    pub(crate) relay: bool,
    /// Message ids remembered to give the application each message once; 0: off.
    pub(crate) dedup_window: usize,
}

impl Settings {
    /// The one check of node settings, for config files and builders alike; the message names
    /// the config key.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_some_and(|interval| self.peer_timeout <= interval) {
            return Err("key `node.peer_timeout_ms`: must be longer than heartbeat_interval_ms".into());
        }
        if self.request_options.attempts == 0 {
            return Err("key `node.request_attempts`: must be at least 1".into());
        }
        if self.receive_queue_capacity == 0 {
            return Err("key `node.receive_queue_capacity`: must be greater than 0".into());
        }
        Ok(())
    }
}

/// A transport as the node holds it.
#[derive(Debug)]
pub(crate) struct NodeTransport {
    pub(crate) name: String,
    pub(crate) plugin: String,
    pub(crate) loaded: Arc<LoadedTransport>,
    pub(crate) faults: Option<FaultInjector>,
    /// Where acknowledgements of received messages go (transports with acknowledgements).
    pub(crate) settle_lane: SettleLane,
}

impl NodeTransport {
    pub(crate) async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        match &self.faults {
            Some(faults) => faults.send(&self.loaded, address, envelope).await,
            None => self.loaded.send(address, envelope).await,
        }
    }

    pub(crate) fn has(&self, capability: Capabilities) -> bool {
        self.loaded.info().capabilities.contains(capability)
    }
}

/// What a transport of this node is, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSummary {
    /// The name peers' addresses use (the config table name).
    pub name: String,
    /// The plugin that provides it.
    pub plugin: String,
    /// Where peers reach this node through it.
    pub local_address: String,
    /// What it guarantees.
    pub capabilities: Capabilities,
}

pub(crate) enum InboxItem {
    Message(Envelope, Acknowledgement),
    TransportFailed { transport: String, error: PluginError },
}

/// A comms node: sends typed messages to other nodes and receives theirs, publishes and
/// subscribes, serves and calls services, over whatever transports its configuration names.
///
/// Cheap to clone; all clones are the same node. Works on a tokio multi-thread or current-thread
/// runtime. Call [`Node::close`] to leave gracefully; dropping the last clone stops the node's
/// background tasks without telling peers.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
    _alive: Arc<StopOnDrop>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

/// Held by the application's `Node` handles only (not by background tasks): when the last one
/// goes, the tasks stop.
struct StopOnDrop(Arc<NodeInner>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.shutdown.send_replace(true);
        self.0.subscriptions.clear();
    }
}

/// The node's state, shared with its background tasks.
pub(crate) struct NodeInner {
    pub(crate) id: NodeId,
    pub(crate) settings: Settings,
    pub(crate) record: RwLock<NodeRecord>,
    pub(crate) transports: Vec<Arc<NodeTransport>>,
    pub(crate) discovery: Arc<LoadedDiscovery>,
    pub(crate) membership: Membership,
    pub(crate) inbox_tx: mpsc::Sender<InboxItem>,
    inbox: tokio::sync::Mutex<mpsc::Receiver<InboxItem>>,
    pub(crate) subscriptions: Subscriptions,
    pub(crate) services: Services,
    pub(crate) pending: PendingRequests,
    /// Peers this node has announced itself to (a heartbeat precedes the first message).
    greeted: Mutex<HashSet<NodeId>>,
    /// Set once when the node stops for good.
    pub(crate) shutdown: watch::Sender<bool>,
    /// Set when `close` starts: no new requests are served, failing transports are not retried.
    pub(crate) closing: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    receive_loops: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
    id_prefix: u64,
    id_counter: AtomicU64,
    /// Envelope signatures (`[security] signatures`), if on.
    pub(crate) signatures: Option<Signatures>,
    /// Incoming envelopes refused (signature checks).
    pub(crate) rejected: RejectedCounter,
    /// Recent application message ids (`dedup_window`), if on.
    pub(crate) dedup: Option<Arc<Mutex<DedupWindow>>>,
    /// Repeats the dedup window dropped.
    pub(crate) duplicates: AtomicU64,
}

impl Node {
    /// Starts building a node in code.
    pub fn builder(id: impl Into<NodeId>) -> NodeBuilder {
        NodeBuilder::new(id)
    }

    /// Builds the node a config file describes (see [`crate::config`]).
    pub async fn from_config(path: impl AsRef<Path>) -> Result<Node, BuildError> {
        config::load(path.as_ref())?.build().await
    }

    pub(crate) async fn start(
        id: NodeId,
        settings: Settings,
        transports: Vec<Arc<NodeTransport>>,
        discovery: LoadedDiscovery,
        record: NodeRecord,
        peers: Vec<NodeRecord>,
        signatures: Option<Signatures>,
    ) -> Node {
        let (shutdown, _) = watch::channel(false);
        let (closing, _) = watch::channel(false);
        let (inbox_tx, inbox_rx) = mpsc::channel(settings.receive_queue_capacity);
        let timeout = settings.heartbeat_interval.map(|_| settings.peer_timeout);
        let membership = Membership::new(id.clone(), timeout);
        for peer in peers {
            membership.discovered(peer);
        }
        let inner = Arc::new(NodeInner {
            id,
            record: RwLock::new(record),
            transports,
            discovery: Arc::new(discovery),
            membership,
            inbox_tx,
            inbox: tokio::sync::Mutex::new(inbox_rx),
            subscriptions: Subscriptions::default(),
            services: Services::default(),
            pending: PendingRequests::default(),
            greeted: Mutex::new(HashSet::new()),
            shutdown,
            closing,
            tasks: Mutex::new(Vec::new()),
            receive_loops: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            id_prefix: rand::random(),
            id_counter: AtomicU64::new(0),
            signatures,
            rejected: RejectedCounter::default(),
            dedup: (settings.dedup_window > 0)
                .then(|| Arc::new(Mutex::new(DedupWindow::new(settings.dedup_window)))),
            duplicates: AtomicU64::new(0),
            settings,
        });
        let receive_loops = inner
            .transports
            .iter()
            .map(|t| tokio::spawn(dispatch::receive_loop(Arc::clone(&inner), Arc::clone(t))));
        *inner.receive_loops.lock().unwrap_or_else(|p| p.into_inner()) = receive_loops.collect();
        let tasks = vec![
            tokio::spawn(dispatch::watch_discovery(Arc::clone(&inner))),
            tokio::spawn(dispatch::heartbeats(Arc::clone(&inner))),
        ];
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        let alive = Arc::new(StopOnDrop(Arc::clone(&inner)));
        Node { inner, _alive: alive }
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    /// How many repeated messages the dedup window (`dedup_window`) dropped since the node
    /// started; always 0 when it is off.
    pub fn duplicates_count(&self) -> u64 {
        self.inner.duplicates.load(Ordering::Relaxed)
    }

    /// How many incoming envelopes this node refused since it started: with
    /// `signatures = "require"`, unsigned, badly signed, unlisted, stale and replayed ones.
    pub fn rejected_count(&self) -> u64 {
        self.inner.rejected.get()
    }

    /// The codec this node sends with.
    pub fn codec(&self) -> Codec {
        self.inner.settings.codec
    }

    /// This node's transports, in preference order.
    pub fn transports(&self) -> Vec<TransportSummary> {
        self.inner
            .transports
            .iter()
            .map(|t| TransportSummary {
                name: t.name.clone(),
                plugin: t.plugin.clone(),
                local_address: t.loaded.info().local_address.clone(),
                capabilities: t.loaded.info().capabilities,
            })
            .collect()
    }

    /// This node's record as announced (addresses, services, topic patterns).
    pub fn record(&self) -> NodeRecord {
        self.inner.record.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The peers this node knows, with liveness, sorted by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.inner.membership.snapshot()
    }

    /// Peers joining, leaving (down or withdrawn) and changing, from now on. A consumer that
    /// falls more than 256 events behind skips the oldest.
    pub fn peer_events(&self) -> impl Stream<Item = PeerEvent> + Send + 'static {
        let events = self.inner.membership.subscribe();
        futures::stream::unfold(events, |mut events| async move {
            loop {
                match events.recv().await {
                    Ok(event) => return Some((event, events)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    pub(crate) fn new_envelope(
        &self,
        to: Destination,
        headers: Headers,
        payload: impl Into<Payload>,
    ) -> Envelope {
        self.inner.new_envelope(to, headers, payload)
    }

    fn content_type_header(&self) -> Headers {
        self.inner.content_type_header()
    }

    /// Sends `message` to node `to`. Completes when a transport has taken it; waits while that
    /// transport's queue is full.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        to: impl Into<NodeId>,
        message: &T,
    ) -> Result<MessageId, SendError> {
        let payload = self.inner.settings.codec.encode(message)?;
        self.send_raw(to, self.content_type_header(), payload, None).await
    }

    /// Sends raw payload bytes to node `to`, with the given headers (include `content-type` so
    /// the receiver knows how to decode them) and optionally the id of the message this answers.
    pub async fn send_raw(
        &self,
        to: impl Into<NodeId>,
        headers: impl Into<Headers>,
        payload: impl Into<Payload>,
        correlation_id: Option<MessageId>,
    ) -> Result<MessageId, SendError> {
        let to = to.into();
        let mut headers = headers.into();
        if self.inner.signatures.is_some() {
            // Only this node's signer writes these: an application's own would go out unchecked.
            headers.retain(|name, _| name != SIGNATURE_HEADER && name != SIGNED_AT_HEADER);
        }
        let mut envelope = self.new_envelope(Destination::Node(to.clone()), headers, payload);
        envelope.correlation_id = correlation_id;
        let id = envelope.id;
        self.inner.check_open()?;
        // A plugin's future is ready at once while its queue has room, and tokio's fairness
        // budget cannot see into the plugin's runtime: spend from it here, so that a tight send
        // loop still lets the other tasks on this worker run.
        tokio::task::consume_budget().await;
        self.inner.send_to_node(&to, envelope).await?;
        Ok(id)
    }

    /// Waits for the next message sent to this node and decodes it as `T` (by the codec its
    /// content type names).
    ///
    /// Acknowledge it with [`Received::ack`] once handled (see [`Received`]); a message that
    /// does not decode is rejected.
    pub async fn receive<T: DeserializeOwned>(&self) -> Result<Received<T>, ReceiveError> {
        let (envelope, acknowledgement) = self.next_inbox_item().await?;
        decode_received(self.inner.settings.codec, envelope, acknowledgement)
    }

    /// Waits for the next message sent to this node, undecoded (the envelope is the message),
    /// to be acknowledged like any [`Received`].
    pub async fn receive_raw(&self) -> Result<Received<Envelope>, ReceiveError> {
        let (envelope, acknowledgement) = self.next_inbox_item().await?;
        Ok(Received::raw(envelope, acknowledgement))
    }

    /// Waits for the next message sent to this node, undecoded, and acknowledges it at once:
    /// at-most-once to the application (a crash before it is handled loses it). Prefer
    /// [`Node::receive_raw`] with brokers.
    pub async fn receive_envelope(&self) -> Result<Envelope, ReceiveError> {
        let (envelope, mut acknowledgement) = self.next_inbox_item().await?;
        acknowledgement.accept();
        Ok(envelope)
    }

    async fn next_inbox_item(&self) -> Result<(Envelope, Acknowledgement), ReceiveError> {
        let mut inbox = self.inner.inbox.lock().await;
        match inbox.recv().await {
            Some(InboxItem::Message(envelope, acknowledgement)) => Ok((envelope, acknowledgement)),
            Some(InboxItem::TransportFailed { transport, error }) => {
                Err(ReceiveError::Transport { transport, error })
            }
            None => Err(ReceiveError::Closed),
        }
    }

    /// The received messages as a stream; it ends when the node is closed and drained.
    pub fn messages<T: DeserializeOwned>(
        &self,
    ) -> impl Stream<Item = Result<Received<T>, ReceiveError>> + '_ {
        futures::stream::unfold(self, |node| async move {
            match node.receive::<T>().await {
                Err(ReceiveError::Closed) => None,
                other => Some((other, node)),
            }
        })
    }

    /// Publishes `message` on `topic` to every subscriber: through a transport with native
    /// topics when there is one, and directly to every live peer whose announced patterns match
    /// otherwise; subscriptions of this node get it too. Returns how many nodes it was handed to
    /// directly (a broker's fan-out is not counted).
    pub async fn publish<T: Serialize + ?Sized>(&self, topic: &str, message: &T) -> Result<usize, SendError> {
        validate_topic(topic).map_err(|e| SendError::InvalidTopic(e.to_string()))?;
        self.inner.check_open()?;
        let payload = self.inner.settings.codec.encode(message)?;
        let envelope = self.new_envelope(Destination::topic(topic), self.content_type_header(), payload);
        tokio::task::consume_budget().await;
        self.inner.publish(topic, envelope).await
    }

    /// Subscribes to topics matching `pattern` (`*` one segment, `>` the rest). Peers learn of
    /// it through discovery and the next heartbeat (sent at once). Dropping the subscription
    /// unsubscribes.
    ///
    /// Messages wait in a bounded buffer ([`crate::subscription::SUBSCRIPTION_BUFFER`]); while it
    /// is full, publications that come at most once are dropped and counted
    /// ([`Subscription::dropped`]) so that a subscriber that stops reading holds up nothing else;
    /// those from a transport with acknowledgements wait at the broker.
    pub async fn subscribe<T: DeserializeOwned>(&self, pattern: &str) -> Result<Subscription<T>, SendError> {
        validate_pattern(pattern).map_err(|e| SendError::InvalidTopic(e.to_string()))?;
        self.inner.check_open()?;
        let (id, receiver, dropped) = self.inner.subscriptions.add(pattern);
        for transport in self.inner.transports.iter().filter(|t| t.has(Capabilities::NATIVE_TOPICS)) {
            if let Err(error) = transport.loaded.subscribe(pattern).await {
                self.inner.subscriptions.remove(id);
                let peer = NodeId::new(format!("topic:{pattern}"));
                return Err(SendError::Transport { transport: transport.name.clone(), peer, error });
            }
        }
        self.inner.announce_changes().await;
        Ok(Subscription::new(Arc::clone(&self.inner), id, pattern.to_string(), receiver, dropped))
    }

    /// Subscribes to `pattern` and hands each message to `handler`, one at a time, in a task of
    /// the node's. A message is acknowledged when the handler returns `Ok`, and delivered again
    /// when it returns an error (transports with acknowledgements; at-most-once transports
    /// drop it, logged). The subscription lasts as long as the returned handle.
    pub async fn subscribe_with<T, E, F, Fut>(
        &self,
        pattern: &str,
        handler: F,
    ) -> Result<HandlerSubscription, SendError>
    where
        T: DeserializeOwned + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn(Received<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let subscription = self.subscribe::<T>(pattern).await?;
        Ok(HandlerSubscription::start(subscription, handler))
    }

    /// Serves `service`: `handler` answers each request; its error goes back to the caller as a
    /// remote error. Several nodes may serve the same service; callers spread requests over them.
    /// At most 256 requests are handled at once per node; one more is answered `unavailable` at
    /// once, and the caller retries another replica.
    pub async fn serve<Req, Resp, E, F, Fut>(&self, service: &str, handler: F) -> Result<(), ServeError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn(Received<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, E>> + Send + 'static,
    {
        if service.is_empty() {
            return Err(ServeError::InvalidName(service.to_string()));
        }
        self.inner.check_open().map_err(|_| ServeError::Closed)?;
        let handler = ServiceHandler::new(self.inner.settings.codec, handler);
        if !self.inner.services.add(service, handler) {
            return Err(ServeError::AlreadyServed(service.to_string()));
        }
        self.inner.announce_changes().await;
        Ok(())
    }

    /// Stops serving `service`; requests in flight still complete. `false` if it was not served.
    pub async fn stop_serving(&self, service: &str) -> bool {
        let removed = self.inner.services.remove(service);
        if removed {
            self.inner.announce_changes().await;
        }
        removed
    }

    /// Calls `service` on one of its live replicas with the node's default [`RequestOptions`].
    pub async fn request<Req, Resp>(&self, service: &str, request: &Req) -> Result<Resp, RequestError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let options = self.inner.settings.request_options.clone();
        self.request_with(service, request, &options).await
    }

    /// Calls `service` with explicit timeout and retries; a retry goes to another replica when
    /// there is one. A handler's error is returned at once as [`RequestError::Remote`] (not
    /// retried); timeouts, send failures and replicas that are closing are retried.
    pub async fn request_with<Req, Resp>(
        &self,
        service: &str,
        request: &Req,
        options: &RequestOptions,
    ) -> Result<Resp, RequestError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let payload = self.inner.settings.codec.encode(request).map_err(RequestError::Encode)?;
        let response = self.inner.call(service, None, payload, options).await?;
        decode_response(self.inner.settings.codec, response)
    }

    /// Calls `service` on node `node` only (retries go to the same node).
    pub async fn request_node<Req, Resp>(
        &self,
        node: impl Into<NodeId>,
        service: &str,
        request: &Req,
        options: &RequestOptions,
    ) -> Result<Resp, RequestError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let payload = self.inner.settings.codec.encode(request).map_err(RequestError::Encode)?;
        let response = self.inner.call(service, Some(node.into()), payload, options).await?;
        decode_response(self.inner.settings.codec, response)
    }

    /// Waits until peer `node` is known and up (discovered, or heard from), for at most
    /// `timeout`. A node that has just started knows only what discovery told it; this is how an
    /// application waits for the node it is about to talk to.
    pub async fn wait_for_peer(&self, node: impl Into<NodeId>, timeout: Duration) -> Result<(), WaitError> {
        let node = node.into();
        let what = || format!("peer `{node}`");
        self.inner.wait_until(what, timeout, |inner| inner.membership.is_up(&node)).await
    }

    /// Waits until a live peer (or this node) serves `service`, for at most `timeout`.
    /// [`Node::request`] waits like this on its first attempt by itself (for up to its attempt
    /// timeout).
    pub async fn wait_for_service(&self, service: &str, timeout: Duration) -> Result<(), WaitError> {
        let what = || format!("a replica of `{service}`");
        self.inner.wait_until(what, timeout, |inner| inner.has_replica(service)).await
    }

    /// Waits until a live peer (or a subscription of this node) subscribes to a pattern matching
    /// `topic`, for at most `timeout`. Subscribers behind a broker with native topics are not
    /// known to the node: for them, this waits for nothing it can see.
    pub async fn wait_for_subscriber(&self, topic: &str, timeout: Duration) -> Result<(), WaitError> {
        let what = || format!("a subscriber of `{topic}`");
        self.inner.wait_until(what, timeout, |inner| inner.has_subscriber(topic)).await
    }

    /// Leaves gracefully, within the close timeout: stops taking new requests and lets those in
    /// flight finish, withdraws from discovery, tells every live peer (who marks this node down
    /// at once), hands the acknowledgements given so far to the transports, flushes their queues
    /// and closes them. Messages already received can still be taken with `receive` afterwards;
    /// from a transport with acknowledgements, those not acknowledged before the close are
    /// delivered again later (at least once, never lost).
    pub async fn close(&self) -> Result<(), CloseError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.close().await
    }
}

/// Decodes a successful response as the type the caller expects.
fn decode_response<T: DeserializeOwned>(default: Codec, response: Envelope) -> Result<T, RequestError> {
    match decode_received(default, response, Acknowledgement::none()) {
        Ok(received) => Ok(received.message),
        Err(ReceiveError::Decode { source, .. }) => Err(RequestError::Decode(source)),
        Err(other) => {
            Err(RequestError::Decode(crate::codec::CodecError::UnknownContentType(other.to_string())))
        }
    }
}

/// Decodes an envelope by its content type (or `default` without one). A message that does not
/// decode is rejected (delivering it again would not help).
pub(crate) fn decode_received<T: DeserializeOwned>(
    default: Codec,
    envelope: Envelope,
    mut acknowledgement: Acknowledgement,
) -> Result<Received<T>, ReceiveError> {
    let codec = match envelope.header(CONTENT_TYPE_HEADER) {
        Some(content_type) => Codec::from_content_type(content_type),
        None => Ok(default),
    };
    match codec.and_then(|codec| codec.decode(envelope.payload.as_slice())) {
        Ok(message) => {
            Ok(Received::new((envelope.from, envelope.id, envelope.headers), message, acknowledgement))
        }
        Err(source) => {
            acknowledgement.reject();
            Err(ReceiveError::Decode { from: envelope.from, id: envelope.id, source })
        }
    }
}

impl NodeInner {
    pub(crate) fn new_envelope(
        &self,
        to: Destination,
        headers: Headers,
        payload: impl Into<Payload>,
    ) -> Envelope {
        let id = MessageId { high: self.id_prefix, low: self.id_counter.fetch_add(1, Ordering::Relaxed) };
        Envelope::new(id, self.id.clone(), to, payload).with_headers(headers)
    }

    /// The `content-type` header of this node's codec.
    pub(crate) fn content_type_header(&self) -> Headers {
        [(CONTENT_TYPE_HEADER, self.settings.codec.content_type())].into_iter().collect()
    }

    fn check_open(&self) -> Result<(), SendError> {
        if self.closed.load(Ordering::Acquire) {
            Err(SendError::Closed)
        } else {
            Ok(())
        }
    }

    /// The record of `node`: this node's own, or the latest a peer announced.
    fn record_of(&self, node: &NodeId) -> Option<NodeRecord> {
        if *node == self.id {
            Some(self.record.read().unwrap_or_else(|p| p.into_inner()).clone())
        } else {
            self.membership.record(node)
        }
    }

    /// Whether one of this node's transports keeps its inbox while it is away (`DURABLE`): then
    /// a clean close leaves an offline record, and peers keep sending to it.
    pub(crate) fn keeps_inbox(&self) -> bool {
        self.transports.iter().any(|transport| transport.has(Capabilities::DURABLE))
    }

    /// The first transport (in config order) on which `record` has an address; for an offline
    /// node, the first durable one (only its inbox is there to take the message).
    fn route(&self, record: &NodeRecord) -> Result<(Arc<NodeTransport>, String), SendError> {
        if record.is_offline() {
            for transport in self.transports.iter().filter(|t| t.has(Capabilities::DURABLE)) {
                if let Some(address) = record.address_for(&transport.name) {
                    return Ok((Arc::clone(transport), address.to_string()));
                }
            }
        }
        for transport in &self.transports {
            if let Some(address) = record.address_for(&transport.name) {
                return Ok((Arc::clone(transport), address.to_string()));
            }
        }
        let names = |list: Vec<&str>| list.join(", ");
        Err(SendError::NoCommonTransport {
            peer: record.id.clone(),
            peer_transports: names(record.addresses.iter().map(|(t, _)| t.as_str()).collect()),
            local_transports: names(self.transports.iter().map(|t| t.name.as_str()).collect()),
        })
    }

    pub(crate) async fn send_to_node(&self, to: &NodeId, envelope: Envelope) -> Result<(), SendError> {
        let record = self.record_of(to).ok_or_else(|| SendError::UnknownPeer(to.clone()))?;
        self.send_to_record(&record, envelope).await
    }

    /// Sends to the node `record` describes, announcing this node first if it has not yet,
    /// so the peer can answer even when it has never heard of this node.
    pub(crate) async fn send_to_record(
        &self,
        record: &NodeRecord,
        envelope: Envelope,
    ) -> Result<(), SendError> {
        let (transport, address) = self.route(record)?;
        let first_contact = record.id != self.id
            && self.greeted.lock().unwrap_or_else(|p| p.into_inner()).insert(record.id.clone());
        let envelope = self.sealed(envelope);
        if first_contact {
            // A hello asks the peer for its record at once: this node learns its services and
            // topics now, not at the peer's next heartbeat.
            let hello = self.sealed(self.record_envelope(&record.id, control::HELLO, true));
            if let Err(error) = transport.loaded.send(&address, hello).await {
                self.greeted.lock().unwrap_or_else(|p| p.into_inner()).remove(&record.id);
                return Err(SendError::Transport {
                    transport: transport.name.clone(),
                    peer: record.id.clone(),
                    error,
                });
            }
        }
        transport.send(&address, envelope).await.map_err(|error| SendError::Transport {
            transport: transport.name.clone(),
            peer: record.id.clone(),
            error,
        })
    }

    /// A framework message of `kind` (hello, heartbeat, goodbye) carrying this node's record;
    /// `reply` asks the receiver to answer with its own record at once.
    pub(crate) fn record_envelope(&self, to: &NodeId, kind: &str, reply: bool) -> Envelope {
        let record = self.record.read().unwrap_or_else(|p| p.into_inner()).clone();
        // A goodbye of a node with a durable inbox says that messages sent to it will wait.
        let offline = kind == control::GOODBYE && self.keeps_inbox();
        let message = RecordMessage { reply, offline, ..RecordMessage::of(&record) };
        let headers = [(KIND_HEADER, kind)].into_iter().collect();
        self.new_envelope(Destination::Node(to.clone()), headers, message.encode())
    }

    /// Sends this node's record to `peer` as a message of `kind` (`reply`: asking for the peer's
    /// at once). The peer counts as greeted: no hello goes before later messages.
    /// A closing node sends nothing but goodbyes: a hello or heartbeat after its goodbye would
    /// make peers take it for alive again.
    pub(crate) async fn send_record(
        &self,
        peer: &NodeRecord,
        kind: &str,
        reply: bool,
    ) -> Result<(), SendError> {
        if kind != control::GOODBYE && *self.closing.borrow() {
            return Err(SendError::Closed);
        }
        let (transport, address) = self.route(peer)?;
        self.greeted.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.id.clone());
        let envelope = self.sealed(self.record_envelope(&peer.id, kind, reply));
        transport.send(&address, envelope).await.map_err(|error| {
            // Not greeted after all: the next message to the peer says hello first.
            self.greeted.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer.id);
            SendError::Transport { transport: transport.name.clone(), peer: peer.id.clone(), error }
        })
    }

    /// Waits until `ready` holds for the peer table (checked at once, then after every change),
    /// for at most `limit`.
    pub(crate) async fn wait_until(
        &self,
        what: impl FnOnce() -> String,
        limit: Duration,
        mut ready: impl FnMut(&Self) -> bool,
    ) -> Result<(), WaitError> {
        // Subscribe before the first check, so that no change between the two is missed.
        let mut changes = self.membership.subscribe();
        let waiting = async {
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return Err(WaitError::Closed);
                }
                if ready(self) {
                    return Ok(());
                }
                match changes.recv().await {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(WaitError::Closed),
                }
            }
        };
        match tokio::time::timeout(limit, waiting).await {
            Ok(result) => result,
            Err(_) if ready(self) => Ok(()),
            Err(_) => Err(WaitError::TimedOut { what: what(), waited: limit }),
        }
    }

    /// The records of the live peers that serve `service`, and this node's if it does.
    fn replicas(&self, service: &str) -> Vec<NodeRecord> {
        let mut replicas = self.membership.live(|record| record.services.iter().any(|s| s == service));
        if self.services.contains(service) {
            replicas.push(self.record.read().unwrap_or_else(|p| p.into_inner()).clone());
        }
        replicas
    }

    /// Whether a live peer (or this node) serves `service`.
    fn has_replica(&self, service: &str) -> bool {
        !self.replicas(service).is_empty()
    }

    /// Whether a live peer (or a subscription of this node) subscribes to a pattern matching
    /// `topic`.
    fn has_subscriber(&self, topic: &str) -> bool {
        self.subscriptions.patterns().iter().any(|pattern| crate::topics::matches(pattern, topic))
            || !self
                .membership
                .live(|record| record.topics.iter().any(|pattern| crate::topics::matches(pattern, topic)))
                .is_empty()
    }

    /// Re-announces this node's record after its services or topics changed: to discovery and,
    /// with a heartbeat, to every known peer at once.
    pub(crate) async fn announce_changes(&self) {
        {
            let mut record = self.record.write().unwrap_or_else(|p| p.into_inner());
            record.services = self.services.names();
            record.topics = self.subscriptions.patterns();
            let next = crate::membership::revision(&record).unwrap_or(0) + 1;
            crate::membership::set_revision(&mut record, next);
        }
        let record = self.record.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(error) = self.discovery.announce(record).await {
            tracing::warn!(%error, "announcing the node's record to discovery failed");
        }
        dispatch::send_heartbeats(self).await;
    }

    /// Signs an envelope this node sends, if signatures are on. Envelopes of other nodes
    /// (relayed) and envelopes already signed (a publication sent to several subscribers) are
    /// left as they are.
    pub(crate) fn sealed(&self, mut envelope: Envelope) -> Envelope {
        if let Some(signatures) = &self.signatures {
            let signed = envelope.header(SIGNATURE_HEADER).is_some();
            if envelope.from == self.id && !signed {
                signatures.seal(&mut envelope);
            }
        }
        envelope
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<usize, SendError> {
        let envelope = self.sealed(envelope);
        let native = self.transports.iter().find(|t| t.has(Capabilities::NATIVE_TOPICS));
        if let Some(native) = native {
            native.send("", envelope.clone()).await.map_err(|error| SendError::Transport {
                transport: native.name.clone(),
                peer: NodeId::new(format!("topic:{topic}")),
                error,
            })?;
        }
        let mut delivered = 0;
        let mut first_error = None;
        let subscribers = self.membership.live(|record| {
            record.topics.iter().any(|pattern| crate::topics::matches(pattern, topic))
                && native.is_none_or(|native| record.address_for(&native.name).is_none())
        });
        for subscriber in subscribers {
            match self.send_to_record(&subscriber, envelope.clone()).await {
                Ok(()) => delivered += 1,
                Err(error) => {
                    tracing::debug!(%error, peer = %subscriber.id, "publishing to a subscriber failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        // With native topics the broker delivers to this node's own subscriptions too.
        if native.is_none() && self.subscriptions.deliver(topic, &envelope, Acknowledgement::none()).await > 0
        {
            delivered += 1;
        }
        match first_error {
            Some(error) if delivered == 0 => Err(error),
            _ => Ok(delivered),
        }
    }

    /// One request, with retries. Returns the successful response envelope.
    async fn call(
        &self,
        service: &str,
        node: Option<NodeId>,
        payload: Vec<u8>,
        options: &RequestOptions,
    ) -> Result<Envelope, RequestError> {
        self.check_open().map_err(|_| RequestError::Closed)?;
        let mut tried = HashSet::new();
        let mut last_error = None;
        let attempts = options.attempts.max(1);
        // One buffer for every attempt: each retry shares it.
        let payload = Payload::from_vec(payload);
        for attempt in 0..attempts {
            if attempt > 0 {
                let pause = options.backoff.saturating_mul(1 << (attempt - 1).min(10));
                tokio::time::sleep(pause).await;
            }
            let target = match &node {
                Some(node) => self.record_of(node),
                None => self.pending.choose(&self.replicas(service), &tried, self.settings.balancing),
            };
            let target = match (target, &node) {
                // A node that has just started may not have heard from the replicas yet (their
                // hellos answer within a round trip): the first attempt waits for one.
                (None, None) if attempt == 0 => {
                    let what = || format!("a replica of `{service}`");
                    match self.wait_until(what, options.timeout, |inner| inner.has_replica(service)).await {
                        Ok(()) => {
                            self.pending.choose(&self.replicas(service), &tried, self.settings.balancing)
                        }
                        Err(_) => None,
                    }
                }
                (target, _) => target,
            };
            let Some(target) = target else {
                last_error = Some(match &node {
                    Some(node) => RequestError::Send(SendError::UnknownPeer(node.clone())),
                    None => RequestError::NoReplica { service: service.to_string() },
                });
                continue;
            };
            tried.insert(target.id.clone());
            let envelope =
                self.new_envelope(Destination::service(service), self.content_type_header(), payload.clone());
            let id = envelope.id;
            let response = self.pending.expect(id);
            let _in_flight = self.pending.start(&target.id);
            if let Err(error) = self.send_to_record(&target, envelope).await {
                self.pending.forget(id);
                tracing::debug!(%error, replica = %target.id, attempt, "request send failed");
                last_error = Some(RequestError::Send(error));
                continue;
            }
            let response = match tokio::time::timeout(options.timeout, response).await {
                Err(_) => {
                    self.pending.forget(id);
                    tracing::debug!(replica = %target.id, attempt, "request timed out");
                    last_error = Some(RequestError::Timeout {
                        service: service.to_string(),
                        attempts: attempt + 1,
                        timeout: options.timeout,
                    });
                    continue;
                }
                Ok(Err(_)) => return Err(RequestError::Closed),
                Ok(Ok(response)) => response,
            };
            match response.header(STATUS_HEADER) {
                Some(control::STATUS_OK) | None => return Ok(response),
                Some(control::STATUS_ERROR) => {
                    return Err(RequestError::Remote {
                        node: response.from.clone(),
                        message: String::from_utf8_lossy(response.payload.as_slice()).into_owned(),
                    })
                }
                Some(_) => {
                    let message = String::from_utf8_lossy(response.payload.as_slice()).into_owned();
                    last_error = Some(RequestError::Unavailable { node: response.from.clone(), message });
                }
            }
        }
        Err(match last_error {
            Some(RequestError::Timeout { service, timeout, .. }) => {
                RequestError::Timeout { service, attempts, timeout }
            }
            Some(error) => error,
            None => RequestError::NoReplica { service: service.to_string() },
        })
    }

    async fn close(self: &Arc<Self>) -> Result<(), CloseError> {
        let deadline = self.settings.close_timeout;
        self.closing.send_replace(true);
        let mut failures = Vec::new();
        if !self.services.wait_idle(deadline).await {
            failures.push("requests in flight did not finish within the close timeout".to_string());
        }
        if self.keeps_inbox() {
            // Still addressable: the durable inbox takes what is sent meanwhile.
            let mut record = self.record.read().unwrap_or_else(|p| p.into_inner()).clone();
            record.mark_offline();
            if let Err(error) = self.discovery.announce(record).await {
                failures.push(format!("announcing the offline record to discovery: {error}"));
            }
        } else if let Err(error) = self.discovery.withdraw(&self.id).await {
            failures.push(format!("withdrawing from discovery: {error}"));
        }
        dispatch::send_goodbyes(self).await;
        let loops = std::mem::take(&mut *self.receive_loops.lock().unwrap_or_else(|p| p.into_inner()));
        let (acknowledging, draining): (Vec<_>, Vec<_>) = self
            .transports
            .iter()
            .zip(loops)
            .partition(|(transport, _)| transport.has(Capabilities::ACKNOWLEDGEMENTS));
        // The acknowledgements given so far reach each acknowledging transport before it closes.
        // Messages the application still holds unacknowledged stay with the broker, which
        // delivers them again (to this node when it comes back, or to another consumer).
        let settled = tokio::time::timeout(deadline, async {
            for (transport, handle) in acknowledging {
                let _ = handle.await;
                transport.settle_lane.flush().await;
            }
        })
        .await;
        if settled.is_err() {
            failures.push("received messages could not be handed over in time (inbox full)".to_string());
        }
        for transport in &self.transports {
            if let Some(faults) = &transport.faults {
                // Held and delayed messages go out before the transport closes.
                faults.flush().await;
            }
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
        self.shutdown.send_replace(true);
        self.pending.abandon_all();
        self.subscriptions.clear();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        if let Err(error) = self.discovery.close().await {
            failures.push(format!("discovery: {error}"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CloseError { failures })
        }
    }
}

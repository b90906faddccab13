//! The `Node`: what applications use. A facade over the node's driver (its I/O loops), which
//! runs the node's engine (its decisions).

use crate::{
    acknowledgement::Acknowledgement,
    codec::{Codec, CONTENT_TYPE_HEADER},
    driver::{Driver, InboxItem},
    engine::{membership::PeerInfo, membership::PeerStatus, Input},
    error::{CloseError, FlushError, ReceiveError, RequestError, SendError, ServeError, WaitError},
    received::{decode_received, decode_response, Received},
    request_response::RequestOptions,
    security::{SIGNATURE_HEADER, SIGNED_AT_HEADER},
    service::ServiceHandler,
    spec::MAX_CONCURRENT_REQUESTS,
    subscription::{HandlerSubscription, Subscription},
    topics::{validate_pattern, validate_topic},
};
use comms_plugin_api::{
    Capabilities, Destination, Envelope, Headers, MessageId, NodeId, NodeRecord, Payload, PeerEvent,
};
use futures::Stream;
use serde::{de::DeserializeOwned, Serialize};
use std::{
    future::Future,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

/// What a transport of this node is, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSummary {
    /// The name peers' addresses use (the config table name).
    pub name: String,
    /// The plugin that provides it.
    pub plugin: String,
    /// The plugin's version (its crate version, unless the plugin says otherwise).
    pub plugin_version: String,
    /// Where peers reach this node through it.
    pub local_address: String,
    /// What it guarantees.
    pub capabilities: Capabilities,
}

/// A comms node: sends typed messages to other nodes and receives theirs, publishes and
/// subscribes, serves and calls services, over whatever transports its configuration names.
///
/// Cheap to clone; all clones are the same node. Works on a tokio multi-thread or current-thread
/// runtime. Call [`Node::close`] to leave gracefully; dropping the last clone stops the node's
/// background tasks without telling peers.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Driver>,
    _alive: Arc<StopOnDrop>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

/// Held by the application's `Node` handles only (not by background tasks): when the last one
/// goes, the tasks stop.
struct StopOnDrop(Arc<Driver>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Node {
    /// The facade of a started node (see [`crate::builder`]).
    pub(crate) fn new(inner: Arc<Driver>) -> Node {
        let alive = Arc::new(StopOnDrop(Arc::clone(&inner)));
        Node { inner, _alive: alive }
    }

    /// The node's state and I/O (for the modules that extend `Node`: builder, config).
    pub(crate) fn driver(&self) -> &Arc<Driver> {
        &self.inner
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    /// How many repeated messages the dedup window (`dedup_window`) dropped since the node
    /// started; always 0 when it is off.
    pub fn duplicates_count(&self) -> u64 {
        self.inner.engine().counters().duplicates
    }

    /// How many incoming envelopes this node refused since it started: with
    /// `signatures = "require"`, unsigned, badly signed, unlisted, stale and replayed ones.
    pub fn rejected_count(&self) -> u64 {
        self.inner.rejected.get()
    }

    /// The codec this node sends with.
    pub fn codec(&self) -> Codec {
        self.inner.spec.codec
    }

    /// This node's transports, in preference order.
    pub fn transports(&self) -> Vec<TransportSummary> {
        self.inner
            .serving_transports()
            .into_iter()
            .map(|(_, t)| TransportSummary {
                name: t.name.clone(),
                plugin: t.plugin.clone(),
                plugin_version: t.plugin_version.clone(),
                local_address: t.loaded.info().local_address.clone(),
                capabilities: t.loaded.info().capabilities,
            })
            .collect()
    }

    /// Asks node `node` to read its config file again and apply it
    /// ([`crate::admin::RELOAD_SERVICE`]): it does if this node's key is in its `[admin] keys`.
    /// The answer says what changed; a refusal or a failed reload is a
    /// [`RequestError::Remote`] with the reason.
    pub async fn remote_reload(
        &self,
        node: impl Into<NodeId>,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        let options = RequestOptions { timeout, attempts: 1, ..RequestOptions::default() };
        self.request_node(node, crate::admin::RELOAD_SERVICE, &(), &options).await
    }

    /// This node's state: transports with their counts, peers, services, queues (see
    /// [`crate::admin`]).
    pub fn status(&self) -> crate::admin::NodeStatus {
        self.inner.status()
    }

    /// Asks node `node` for its [`crate::admin::NodeStatus`] over comms (the built-in
    /// [`crate::admin::STATUS_SERVICE`]), waiting at most `timeout` for the answer (one attempt).
    pub async fn remote_status(
        &self,
        node: impl Into<NodeId>,
        timeout: Duration,
    ) -> Result<crate::admin::NodeStatus, RequestError> {
        let options = RequestOptions { timeout, attempts: 1, ..RequestOptions::default() };
        self.request_node(node, crate::admin::STATUS_SERVICE, &(), &options).await
    }

    /// Asks node `node` to shut down ([`crate::admin::SHUTDOWN_SERVICE`]): it does if this
    /// node's key is one of its `[admin] keys`, and answers first. One attempt, waiting at most
    /// `timeout`; a refusal is a [`RequestError::Remote`] that says why.
    pub async fn remote_shutdown(
        &self,
        node: impl Into<NodeId>,
        timeout: Duration,
    ) -> Result<String, RequestError> {
        let options = RequestOptions { timeout, attempts: 1, ..RequestOptions::default() };
        self.request_node(node, crate::admin::SHUTDOWN_SERVICE, &(), &options).await
    }

    /// Completes once this node has closed: by [`Node::close`], or at an admin's request
    /// ([`crate::admin::SHUTDOWN_SERVICE`]).
    pub async fn closed(&self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        // An error means the driver is gone, which is closed too.
        let _ = shutdown.wait_for(|stopped| *stopped).await;
    }

    /// This node's metrics in the OpenMetrics text format that Prometheus scrapes (see
    /// [`crate::metrics`]), for an application that serves them itself.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics_text()
    }

    /// Where this node serves its metrics (`[metrics] listen`, or
    /// [`crate::NodeBuilder::metrics_listen`]), if it does.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.inner.metrics_address.get().copied()
    }

    /// This node's record as announced (addresses, services, topic patterns).
    pub fn record(&self) -> NodeRecord {
        self.inner.engine().record().clone()
    }

    /// The peers this node knows, with liveness, sorted by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.inner.engine().peers(tokio::time::Instant::now().into_std())
    }

    /// Peers joining, leaving (down or withdrawn) and changing, from now on. A consumer that
    /// falls more than 256 events behind skips the oldest.
    pub fn peer_events(&self) -> impl Stream<Item = PeerEvent> + Send + 'static {
        let events = self.inner.peer_events();
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

    fn content_type_header(&self) -> Headers {
        [(CONTENT_TYPE_HEADER, self.inner.spec.codec.content_type())].into_iter().collect()
    }

    /// Sends `message` to node `to`. Completes when a transport has taken it; waits while that
    /// transport's queue is full.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        to: impl Into<NodeId>,
        message: &T,
    ) -> Result<MessageId, SendError> {
        let payload = self.inner.spec.codec.encode(message)?;
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
        // Boxed from the start (see `Driver::send_to_node`): this future then holds a pointer,
        // not the envelope.
        let mut envelope = Box::new(self.inner.new_envelope(Destination::Node(to.clone()), headers, payload));
        envelope.correlation_id = correlation_id;
        let id = envelope.id;
        self.inner.check_open()?;
        let span = tracing::debug_span!("comms.send", %to, %id, "otel.kind" = "producer", trace_id = tracing::field::Empty);
        // Sent while a trace is current (in a handler, or in `TraceContext::scope`): the
        // message carries it on, so that the receiver's `comms.receive` span names the trace.
        if let Some(parent) = crate::trace_context::current() {
            let context = crate::trace_context::begin(&span, Some(parent));
            envelope.headers.set(crate::trace_context::TRACEPARENT_HEADER, context.to_string());
        }
        let sent = async {
            // A plugin's future is ready at once while its queue has room, and tokio's fairness
            // budget cannot see into the plugin's runtime: spend from it here, so that a tight
            // send loop still lets the other tasks on this worker run.
            tokio::task::consume_budget().await;
            self.inner.send_boxed_to_node(&to, envelope).await
        };
        tracing::Instrument::instrument(sent, span).await?;
        Ok(id)
    }

    /// Sends every message of `messages` to node `to`, in order, handing them to the transport
    /// in one call (one wake of the connection's writer, one crossing of the plugin boundary):
    /// the way to send a burst. Returns their ids. [`SendError::Batch`] says which were not
    /// sent; the others were.
    pub async fn send_many<T: Serialize>(
        &self,
        to: impl Into<NodeId>,
        messages: impl IntoIterator<Item = T>,
    ) -> Result<Vec<MessageId>, SendError> {
        let mut payloads = Vec::new();
        for message in messages {
            payloads.push(self.inner.spec.codec.encode(&message)?);
        }
        self.send_raw_many(to, self.content_type_header(), payloads).await
    }

    /// Sends raw payloads to node `to` as [`Node::send_many`] does, each with `headers`.
    pub async fn send_raw_many<P: Into<Payload>>(
        &self,
        to: impl Into<NodeId>,
        headers: impl Into<Headers>,
        payloads: impl IntoIterator<Item = P>,
    ) -> Result<Vec<MessageId>, SendError> {
        let to = to.into();
        let mut headers = headers.into();
        if self.inner.signatures.is_some() {
            headers.retain(|name, _| name != SIGNATURE_HEADER && name != SIGNED_AT_HEADER);
        }
        let envelopes: Vec<Envelope> = payloads
            .into_iter()
            .map(|payload| self.inner.new_envelope(Destination::Node(to.clone()), headers.clone(), payload))
            .collect();
        let ids = envelopes.iter().map(|envelope| envelope.id).collect();
        self.inner.check_open()?;
        tokio::task::consume_budget().await;
        self.inner.send_batch_to_node(&to, envelopes).await?;
        Ok(ids)
    }

    /// Waits for the next message sent to this node and decodes it as `T` (by the codec its
    /// content type names).
    ///
    /// Acknowledge it with [`Received::ack`] once handled (see [`Received`]); a message that
    /// does not decode is rejected.
    pub async fn receive<T: DeserializeOwned>(&self) -> Result<Received<T>, ReceiveError> {
        let (envelope, acknowledgement) = self.next_inbox_item().await?;
        decode_received(self.inner.spec.codec, envelope, acknowledgement)
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

    /// Waits for the next message sent to this node, then takes the messages waiting behind it
    /// too, `max` in all (at least one), undecoded and each acknowledged at once, as
    /// [`Node::receive_envelope`] does: the way to drain a burst, with one step through the
    /// node's engine for the batch instead of one per message. Order is kept. A transport
    /// failure ends a batch; the next call returns it.
    pub async fn receive_envelopes(&self, max: usize) -> Result<Vec<Envelope>, ReceiveError> {
        let mut deliveries = Vec::new();
        let envelopes = self
            .next_inbox_items(max, |envelope, acknowledgement| {
                deliveries.extend(acknowledgement.defuse());
                envelope
            })
            .await;
        // Whatever was taken is settled, also if the batch ended in an error.
        self.inner.accept_all(deliveries);
        envelopes
    }

    /// As [`Node::receive_envelopes`], each message to be acknowledged like any [`Received`]
    /// (at-least-once with the brokers).
    pub async fn receive_raw_many(&self, max: usize) -> Result<Vec<Received<Envelope>>, ReceiveError> {
        self.next_inbox_items(max, Received::raw).await
    }

    /// The next messages of the inbox (see [`Node::receive_envelopes`]), each made into what
    /// the caller returns as it is taken: one vector per batch, sized once, and no envelope
    /// moved through another one on the way.
    async fn next_inbox_items<T>(
        &self,
        max: usize,
        mut each: impl FnMut(Envelope, Acknowledgement) -> T,
    ) -> Result<Vec<T>, ReceiveError> {
        let items = self.inner.next_inbox_items(max.max(1)).await;
        let mut messages = Vec::with_capacity(items.len());
        for item in items {
            match item {
                InboxItem::Message(envelope, acknowledgement) => {
                    trace_taken(&envelope);
                    messages.push(each(envelope, acknowledgement));
                }
                InboxItem::TransportFailed { transport, error } => {
                    return Err(ReceiveError::Transport { transport, error })
                }
            }
        }
        if messages.is_empty() {
            return Err(ReceiveError::Closed);
        }
        Ok(messages)
    }

    async fn next_inbox_item(&self) -> Result<(Envelope, Acknowledgement), ReceiveError> {
        match self.inner.next_inbox_item().await {
            Some(InboxItem::Message(envelope, acknowledgement)) => {
                trace_taken(&envelope);
                Ok((envelope, acknowledgement))
            }
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
        let payload = self.inner.spec.codec.encode(message)?;
        let envelope =
            self.inner.new_envelope(Destination::topic(topic), self.content_type_header(), payload);
        // Made before the wait, so that this future holds the publication's future, which holds
        // the envelope boxed, and not the envelope as well (see `Driver::send_to_node`).
        let publishing = self.inner.publish(topic, envelope);
        tokio::task::consume_budget().await;
        publishing.await
    }

    /// Subscribes to topics matching `pattern` (`*` one segment, `>` the rest). Peers learn of
    /// it through discovery and the next heartbeat (sent at once). Dropping the subscription
    /// unsubscribes, at the transports with native topics too once no other subscription of
    /// this node has the same pattern (a transport that keeps subscriptions across restarts,
    /// such as SQLite or NATS with `durable_topics`, then stops keeping messages for it); a node
    /// that closes leaves them subscribed there, for its next run.
    ///
    /// Messages wait in a bounded buffer ([`crate::subscription::SUBSCRIPTION_BUFFER`]); while it
    /// is full, publications that come at most once are dropped and counted
    /// ([`Subscription::dropped`]) so that a subscriber that stops reading holds up nothing else;
    /// those from a transport with acknowledgements wait at the broker.
    pub async fn subscribe<T: DeserializeOwned>(&self, pattern: &str) -> Result<Subscription<T>, SendError> {
        validate_pattern(pattern).map_err(|e| SendError::InvalidTopic(e.to_string()))?;
        self.inner.check_open()?;
        let (id, receiver) = self.inner.add_subscription();
        // The engine knows the subscription before a transport is subscribed: a broker that kept
        // messages for it (SQLite, NATS with `durable_topics`) may deliver them at once, and a
        // publication with no subscription to go to is acknowledged away.
        let actions = self.inner.handle(Input::Subscribed { id, pattern: pattern.to_string() });
        if let Err((transport, error)) = self.inner.native_subscriptions.subscribe(&self.inner, pattern).await
        {
            self.inner.remove_subscription(id);
            let peer = NodeId::new(format!("topic:{pattern}"));
            return Err(SendError::Transport { transport, peer, error });
        }
        // Discovery and every live peer hear of it before this returns.
        self.inner.run_and_wait(actions).await;
        Ok(Subscription::new(Arc::clone(&self.inner), id, pattern.to_string(), receiver))
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
        let handler = ServiceHandler::new(self.inner.spec.codec, handler);
        if !self.inner.add_service(service, handler.0) {
            return Err(ServeError::AlreadyServed(service.to_string()));
        }
        let served = Input::Served { name: service.to_string(), limit: MAX_CONCURRENT_REQUESTS };
        self.inner.run_and_wait(self.inner.handle(served)).await;
        Ok(())
    }

    /// Stops serving `service`; requests in flight still complete. `false` if it was not served.
    pub async fn stop_serving(&self, service: &str) -> bool {
        let removed = self.inner.remove_service(service);
        if removed {
            let unserved = Input::Unserved { name: service.to_string() };
            self.inner.run_and_wait(self.inner.handle(unserved)).await;
        }
        removed
    }

    /// Calls `service` on one of its live replicas with the node's default [`RequestOptions`].
    pub async fn request<Req, Resp>(&self, service: &str, request: &Req) -> Result<Resp, RequestError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let options = self.inner.spec.request_options.clone();
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
        let payload = self.inner.spec.codec.encode(request).map_err(RequestError::Encode)?;
        let response = self.inner.call(service, None, payload, options).await?;
        decode_response(self.inner.spec.codec, response)
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
        let payload = self.inner.spec.codec.encode(request).map_err(RequestError::Encode)?;
        let response = self.inner.call(service, Some(node.into()), payload, options).await?;
        decode_response(self.inner.spec.codec, response)
    }

    /// Waits until peer `node` is known and up (discovered, or heard from), for at most
    /// `timeout`. A node that has just started knows only what discovery told it; this is how an
    /// application waits for the node it is about to talk to.
    pub async fn wait_for_peer(&self, node: impl Into<NodeId>, timeout: Duration) -> Result<(), WaitError> {
        let node = node.into();
        let what = || format!("peer `{node}`");
        self.inner.wait_until(what, timeout, |engine| engine.status(&node) == Some(PeerStatus::Up)).await
    }

    /// Waits until a live peer (or this node) serves `service`, for at most `timeout`.
    /// [`Node::request`] waits like this on its first attempt by itself (for up to its attempt
    /// timeout).
    pub async fn wait_for_service(&self, service: &str, timeout: Duration) -> Result<(), WaitError> {
        let what = || format!("a replica of `{service}`");
        self.inner.wait_until(what, timeout, |engine| engine.serves(service)).await
    }

    /// Waits until a live peer (or a subscription of this node) subscribes to a pattern matching
    /// `topic`, for at most `timeout`. Subscribers behind a broker with native topics are not
    /// known to the node: for them, this waits for nothing it can see.
    pub async fn wait_for_subscriber(&self, topic: &str, timeout: Duration) -> Result<(), WaitError> {
        let what = || format!("a subscriber of `{topic}`");
        self.inner
            .wait_until(what, timeout, |engine| {
                !engine.subscribed_locally(topic).is_empty() || !engine.subscribers(topic, None).is_empty()
            })
            .await
    }

    /// Waits until every message sent so far has been written by its transport, or given up
    /// on, for at most the close timeout (`close_timeout_ms`, 5 s by default).
    ///
    /// `Ok` when the transports' send queues emptied and none gave up on a message.
    /// [`FlushError::Undelivered`] counts the messages to a node that `send` (or `send_many`)
    /// had taken (it returned `Ok`) and a transport then dropped (e.g. TCP after
    /// `reconnect_attempts` to a peer that stayed unreachable); each is reported once, by the
    /// first flush or [`Node::close`] after it. Requests (their caller gets a timeout and
    /// retries) and publications (at most once to each subscriber alive then) are not counted:
    /// see [`comms_plugin_api::counts_as_undelivered`]. What
    /// "written" means is the transport's: for TCP, handed to the operating system's socket (a
    /// peer that crashes after it may still lose it); for a broker, confirmed by the broker.
    /// A transport that does not report its queue or what it gave up on (see
    /// [`comms_plugin_api::UNDELIVERED_COUNTER`]) is taken at its word.
    pub async fn flush(&self) -> Result<(), FlushError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(FlushError::Closed);
        }
        self.inner.flush(self.inner.spec.close_timeout).await
    }

    /// Leaves gracefully, within the close timeout: stops taking new requests and lets those in
    /// flight finish, withdraws from discovery, tells every live peer (who marks this node down
    /// at once), hands the acknowledgements given so far to the transports, flushes their queues
    /// and closes them. Messages already received can still be taken with `receive` afterwards;
    /// from a transport with acknowledgements, those not acknowledged before the close are
    /// delivered again later (at least once, never lost).
    ///
    /// Messages this node sent that a transport gave up on, and that no [`Node::flush`]
    /// reported, make it an error ([`CloseError::undelivered`] counts them): a send that did
    /// not reach its peer is never silent.
    pub async fn close(&self) -> Result<(), CloseError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.close().await
    }
}

/// One event per message taken, in a span that names it (and its trace, when the sender was in
/// one): visible with RUST_LOG=comms_host=debug.
fn trace_taken(envelope: &Envelope) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let trace = envelope.header(crate::trace_context::TRACEPARENT_HEADER);
        let trace_id = trace.and_then(crate::trace_context::TraceContext::parse).map(|c| c.trace_id_hex());
        let span = tracing::debug_span!("comms.receive", from = %envelope.from, id = %envelope.id, trace_id);
        span.in_scope(|| tracing::debug!(bytes = envelope.payload.len(), "message taken"));
    }
}

//! What goes out: messages to a node, publications, requests with retries, and the answers of
//! this node's services. The engine says where (routes, replicas, subscribers); this sends.

use super::{
    reload::{retired_error, SendGuard},
    Driver, NodeTransport,
};
use crate::{
    codec::CONTENT_TYPE_HEADER,
    control::{self, KIND_HEADER, STATUS_HEADER},
    engine::{Input, Local, RouteError},
    error::{RequestError, SendError},
    request_response::RequestOptions,
    trace_context::{self, TraceContext, TRACEPARENT_HEADER},
};
use comms_plugin_api::{
    Capabilities, Destination, Envelope, NodeId, Outbound, Payload, PeerEvent, PeerEventKind, PluginError,
    Text,
};
use std::{collections::HashSet, sync::Arc};
use tracing::Instrument;

/// `comms-status` of a response from a replica that cannot take the request (closing, busy, or
/// it does not serve the service): the caller tries another replica.
pub(crate) const STATUS_UNAVAILABLE: &str = "unavailable";

fn send_error(error: RouteError) -> SendError {
    match error {
        RouteError::UnknownPeer(peer) => SendError::UnknownPeer(peer),
        RouteError::NoCommonTransport { peer, peer_transports, local_transports } => {
            SendError::NoCommonTransport { peer, peer_transports, local_transports }
        }
    }
}

fn transport_error(transport: &NodeTransport, peer: &NodeId, error: PluginError) -> SendError {
    SendError::Transport { transport: transport.name.clone(), peer: peer.clone(), error }
}

impl Driver {
    /// The route to node `to` (the first transport both have; a durable one if `to` is
    /// offline), after greeting it if it has not had this node's record yet, so that it can
    /// answer even a node it has never heard of.
    ///
    /// The transport comes as a [`SendGuard`]: a reload waits for the sends under way before it
    /// closes a transport, and a send that finds its transport retiring waits for the successor
    /// and takes the route again ([`Driver::wait_for_swap`]).
    async fn greeted_route(&self, to: &NodeId) -> Result<(SendGuard, String), SendError> {
        let mut waited = false;
        let (route, greeting, transport) = loop {
            let (route, greeting) = self.engine().prepare_send(to).map_err(send_error)?;
            // Boxed, so that this future holds a pointer across its waits (see `send_to_node`).
            let greeting = greeting.map(Box::new);
            let Some(transport) = self.transport(route.transport) else {
                return Err(SendError::Closed);
            };
            match SendGuard::begin(transport) {
                Ok(guard) => break (route, greeting, guard),
                // Once only: a second swap meanwhile is not waited for again.
                Err(retiring) if !waited => {
                    waited = true;
                    if greeting.is_some() {
                        self.engine().greeting_failed(to);
                    }
                    // Rare (a reload under way): boxed, so that every send's future does not
                    // carry room for it (see `Driver::send_to_node`).
                    Box::pin(self.wait_for_swap(&retiring)).await;
                }
                Err(retiring) => return Err(transport_error(&retiring, to, retired_error(&retiring))),
            }
        };
        if let Some(hello) = greeting {
            if let Err(error) = transport.loaded.send(&route.address, self.sealed(*hello)).await {
                self.engine().greeting_failed(to);
                return Err(transport_error(&transport, to, error));
            }
        }
        Ok((transport, route.address))
    }

    /// Sends to node `to` (see [`Driver::greeted_route`]).
    ///
    /// The envelope is boxed before the future is made. An async function keeps its arguments
    /// in its future for as long as it runs, and an envelope is about 200 bytes: passed by value
    /// down the send path, each level held a copy, and a send's future came to about 2 KiB, too
    /// large for the system allocator's per-thread cache when a caller spawns it or keeps many
    /// in flight. Boxed, each level holds a pointer.
    pub(crate) fn send_to_node<'a>(
        &'a self,
        to: &'a NodeId,
        envelope: Envelope,
    ) -> impl std::future::Future<Output = Result<(), SendError>> + 'a {
        self.send_boxed_to_node(to, Box::new(envelope))
    }

    /// [`Driver::send_to_node`], for a caller that boxed the envelope itself.
    pub(crate) async fn send_boxed_to_node(
        &self,
        to: &NodeId,
        mut envelope: Box<Envelope>,
    ) -> Result<(), SendError> {
        let (transport, address) = self.greeted_route(to).await?;
        self.seal(&mut envelope);
        let sent = transport.send(&address, envelope).await;
        sent.map_err(|error| transport_error(&transport, to, error))
    }

    /// Sends `envelopes` to node `to` in one call across the plugin boundary (the transport's
    /// `send_batch`: one wake of the connection's writer for all of them), in order. The route
    /// and the greeting are settled once for the whole batch.
    pub(crate) async fn send_batch_to_node(
        &self,
        to: &NodeId,
        envelopes: Vec<Envelope>,
    ) -> Result<(), SendError> {
        let total = envelopes.len();
        let (transport, address) = self.greeted_route(to).await?;
        let address = Text::from(address.as_str());
        let batch = envelopes
            .into_iter()
            .map(|envelope| Outbound { address: address.clone(), envelope: self.sealed(envelope) })
            .collect();
        let failures = transport.loaded.send_batch(batch).await;
        let Some(first) = failures.first() else { return Ok(()) };
        let first = Box::new(transport_error(&transport, to, first.error.clone()));
        Err(SendError::Batch { total, failed: failures.iter().map(|f| f.index).collect(), first })
    }

    /// Publishes through a transport with native topics when there is one, directly to every
    /// live peer whose patterns match otherwise, and to this node's own subscriptions. Returns
    /// how many nodes it was handed to directly.
    ///
    /// The envelope is sealed and boxed before the future is made (see [`Driver::send_to_node`]).
    pub(crate) fn publish<'a>(
        self: &'a Arc<Self>,
        topic: &'a str,
        envelope: Envelope,
    ) -> impl std::future::Future<Output = Result<usize, SendError>> + 'a {
        self.publish_sealed(topic, Box::new(self.sealed(envelope)))
    }

    async fn publish_sealed(
        self: &Arc<Self>,
        topic: &str,
        envelope: Box<Envelope>,
    ) -> Result<usize, SendError> {
        let native = self.serving_transports().into_iter().find(|(_, t)| t.has(Capabilities::NATIVE_TOPICS));
        if let Some((_, transport)) = &native {
            transport.send("", envelope.clone()).await.map_err(|error| SendError::Transport {
                transport: transport.name.clone(),
                peer: NodeId::new(format!("topic:{topic}")),
                error,
            })?;
        }
        let native = native.map(|(index, _)| index);
        let subscribers: Vec<NodeId> =
            self.engine().subscribers(topic, native).into_iter().map(|route| route.peer).collect();
        let mut delivered = 0;
        let mut first_error = None;
        for subscriber in subscribers {
            match self.send_boxed_to_node(&subscriber, envelope.clone()).await {
                Ok(()) => delivered += 1,
                Err(error) => {
                    tracing::debug!(%error, peer = %subscriber, "publishing to a subscriber failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        // With native topics the broker delivers to this node's own subscriptions too.
        if native.is_none() && !self.engine().subscribed_locally(topic).is_empty() {
            delivered += 1;
            self.run(self.handle(Input::Local(*envelope)));
        }
        match first_error {
            Some(error) if delivered == 0 => Err(error),
            _ => Ok(delivered),
        }
    }

    /// One request, with retries: to `node`, or to a replica of `service` the engine chooses
    /// (another one on each retry when there is one). Returns the successful response.
    pub(crate) async fn call(
        self: &Arc<Self>,
        service: &str,
        node: Option<NodeId>,
        payload: Vec<u8>,
        options: &RequestOptions,
    ) -> Result<Envelope, RequestError> {
        let started = tokio::time::Instant::now();
        // A child of the request being handled by this task, or a new trace.
        let span = tracing::info_span!(
            "comms.request",
            service,
            "otel.kind" = "client",
            trace_id = tracing::field::Empty
        );
        let context = trace_context::begin(&span, trace_context::current());
        let result = self.call_with_retries(service, node, payload, options, context).instrument(span).await;
        self.request_metrics.record(service, &result, started.elapsed());
        result
    }

    /// Asks the discovery for the providers of `service` (a DHT looks them up; most discoveries
    /// report every record anyway and find nothing more) and learns what it finds, within
    /// `limit`. A failure is logged: the request then waits for the providers as before.
    async fn find_providers(self: &Arc<Self>, service: &str, limit: std::time::Duration) {
        let discovery = self.discovery();
        match tokio::time::timeout(limit, discovery.find_service(service)).await {
            Ok(Ok(records)) => {
                for record in records.into_iter().filter(|record| record.id != self.id) {
                    let event = PeerEvent { kind: PeerEventKind::Updated, record };
                    self.run(self.handle(Input::Discovery(event)));
                }
            }
            Ok(Err(error)) => tracing::debug!(service, %error, "the discovery could not look up providers"),
            Err(_) => tracing::debug!(service, "the discovery's provider lookup timed out"),
        }
    }

    /// [`Driver::call`] without the metrics.
    async fn call_with_retries(
        self: &Arc<Self>,
        service: &str,
        node: Option<NodeId>,
        payload: Vec<u8>,
        options: &RequestOptions,
        context: TraceContext,
    ) -> Result<Envelope, RequestError> {
        self.check_open().map_err(|_| RequestError::Closed)?;
        let traceparent = context.to_string();
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
            let choose = |tried: &HashSet<NodeId>| match &node {
                Some(node) => self.engine().knows(node).then(|| node.clone()),
                None => self.engine().choose_replica(service, tried).map(|route| route.peer),
            };
            let mut target = choose(&tried);
            if target.is_none() && node.is_none() && attempt == 0 {
                // A discovery that does not hold every record (a DHT) looks the providers up.
                self.find_providers(service, options.timeout).await;
                // A node that has just started may not have heard from the replicas yet (their
                // answers to its hellos come within a round trip): the first attempt waits.
                let what = || format!("a replica of `{service}`");
                if self.wait_until(what, options.timeout, |engine| engine.serves(service)).await.is_ok() {
                    target = choose(&tried);
                }
            }
            let Some(target) = target else {
                last_error = Some(match &node {
                    Some(node) => RequestError::Send(SendError::UnknownPeer(node.clone())),
                    None => RequestError::NoReplica { service: service.to_string() },
                });
                continue;
            };
            tried.insert(target.clone());
            let headers = [
                (CONTENT_TYPE_HEADER, self.spec.codec.content_type()),
                (TRACEPARENT_HEADER, traceparent.as_str()),
            ]
            .into_iter()
            .collect();
            let envelope = self.new_envelope(Destination::service(service), headers, payload.clone());
            let id = envelope.id;
            let (waiter, response) = tokio::sync::oneshot::channel();
            super::lock(&self.waiting).insert(id, waiter);
            let _ = self.handle(Input::RequestStarted { id, replica: target.clone() });
            let ended = || {
                super::lock(&self.waiting).remove(&id);
                let _ = self.handle(Input::RequestEnded { id });
            };
            if let Err(error) = self.send_to_node(&target, envelope).await {
                ended();
                tracing::debug!(%error, replica = %target, attempt, "request send failed");
                last_error = Some(RequestError::Send(error));
                continue;
            }
            let response = match tokio::time::timeout(options.timeout, response).await {
                Err(_) => {
                    ended();
                    tracing::debug!(replica = %target, attempt, "request timed out");
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

    /// Sends the response to `request` back to its sender.
    pub(super) async fn respond(&self, request: &Envelope, result: Result<(Vec<u8>, &str), (&str, String)>) {
        let (status, content_type, payload) = match result {
            Ok((payload, content_type)) => (control::STATUS_OK, content_type, payload),
            Err((status, message)) => (status, "text/plain; charset=utf-8", message.into_bytes()),
        };
        let headers =
            [(KIND_HEADER, control::RESPONSE), (STATUS_HEADER, status), (CONTENT_TYPE_HEADER, content_type)]
                .into_iter()
                .collect();
        let mut response = self.new_envelope(Destination::Node(request.from.clone()), headers, payload);
        response.correlation_id = Some(request.id);
        if let Err(error) = self.send_to_node(&request.from, response).await {
            tracing::warn!(to = %request.from, %error, "could not send a response");
        }
    }

    /// A subscription took one message from its queue: the engine may hand it the next.
    pub(crate) fn taken(self: &Arc<Self>, local: Local) {
        self.run(self.handle(Input::Taken { from: local, count: 1 }));
    }
}

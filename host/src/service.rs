//! Services this node serves: handlers, and answering requests.

use crate::{
    acknowledgement::Acknowledgement,
    codec::{Codec, CONTENT_TYPE_HEADER},
    control::{self, KIND_HEADER, STATUS_HEADER},
    node::{decode_received, NodeInner, Received},
};
use comms_plugin_api::{Destination, Envelope};
use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};
use tokio::sync::{watch, Semaphore};

/// Requests handled at once per node. One more is answered `unavailable` at once (the caller
/// tries another replica): a saturated service must not hold up the transport it came on, and
/// with it the responses, heartbeats and other services behind it.
pub(crate) const MAX_CONCURRENT_REQUESTS: usize = 256;

/// `comms-status` of a response from a replica that cannot take the request (closing, or it
/// does not serve the service): the caller tries another replica.
pub(crate) const STATUS_UNAVAILABLE: &str = "unavailable";

/// How a request ended, before it is sent back.
pub(crate) enum Outcome {
    Ok { payload: Vec<u8>, content_type: &'static str },
    HandlerError(String),
    BadRequest(String),
}

type Handler = Arc<dyn Fn(Envelope) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// A type-erased service handler.
pub(crate) struct ServiceHandler(Handler);

impl ServiceHandler {
    pub(crate) fn new<Req, Resp, E, F, Fut>(codec: Codec, handler: F) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn(Received<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        ServiceHandler(Arc::new(move |envelope: Envelope| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                // The node acknowledges the request when the handler is done (handle_request).
                let request: Received<Req> = match decode_received(codec, envelope, Acknowledgement::none()) {
                    Ok(request) => request,
                    Err(error) => return Outcome::BadRequest(error.to_string()),
                };
                match handler(request).await {
                    Ok(response) => match codec.encode(&response) {
                        Ok(payload) => Outcome::Ok { payload, content_type: codec.content_type() },
                        Err(error) => Outcome::HandlerError(format!("encoding the response: {error}")),
                    },
                    Err(error) => Outcome::HandlerError(error.to_string()),
                }
            })
        }))
    }
}

/// The node's services and the requests in flight.
pub(crate) struct Services {
    handlers: RwLock<HashMap<String, Handler>>,
    slots: Arc<Semaphore>,
    in_flight: watch::Sender<usize>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("names", &self.names()).finish_non_exhaustive()
    }
}

impl Default for Services {
    fn default() -> Self {
        Self {
            handlers: RwLock::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            in_flight: watch::channel(0).0,
        }
    }
}

impl Services {
    /// `false` if the service is already served.
    pub(crate) fn add(&self, name: &str, handler: ServiceHandler) -> bool {
        let mut handlers = self.handlers.write().unwrap_or_else(|p| p.into_inner());
        if handlers.contains_key(name) {
            return false;
        }
        handlers.insert(name.to_string(), handler.0);
        true
    }

    pub(crate) fn remove(&self, name: &str) -> bool {
        self.handlers.write().unwrap_or_else(|p| p.into_inner()).remove(name).is_some()
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.handlers.read().unwrap_or_else(|p| p.into_inner()).contains_key(name)
    }

    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.handlers.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }

    fn handler(&self, name: &str) -> Option<Handler> {
        self.handlers.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Waits until no request is in flight; `false` if `limit` passed first.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let mut in_flight = self.in_flight.subscribe();
        let idle = tokio::time::timeout(limit, in_flight.wait_for(|n| *n == 0)).await.is_ok();
        idle
    }
}

/// Answers one request: runs the handler in a task of its own and sends the response back.
/// Never waits: a request the node cannot take now is refused (in a task of its own too).
/// The request is acknowledged once its response is sent (or it is refused): a node killed
/// while the handler runs leaves it with the broker, which delivers it again.
pub(crate) fn handle_request(
    inner: &Arc<NodeInner>,
    service: &str,
    request: Envelope,
    mut acknowledgement: Acknowledgement,
) {
    let services = &inner.services;
    let closing = *inner.closing.borrow();
    let handler = if closing { None } else { services.handler(service) };
    let slot = handler.as_ref().and_then(|_| Arc::clone(&services.slots).try_acquire_owned().ok());
    let (Some(handler), Some(slot)) = (handler, slot) else {
        let reason = if closing {
            format!("node `{}` is shutting down", inner.id)
        } else if services.contains(service) {
            format!("node `{}` is handling {MAX_CONCURRENT_REQUESTS} requests, its limit", inner.id)
        } else {
            format!("node `{}` does not serve `{service}`", inner.id)
        };
        let inner = Arc::clone(inner);
        tokio::spawn(async move {
            respond(&inner, &request, Err((STATUS_UNAVAILABLE, reason))).await;
            acknowledgement.accept();
        });
        return;
    };
    services.in_flight.send_modify(|n| *n += 1);
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let reply_to = request.clone_headers_only();
        let outcome = handler(request).await;
        let result = match outcome {
            Outcome::Ok { payload, content_type } => Ok((payload, content_type)),
            Outcome::HandlerError(message) => Err((control::STATUS_ERROR, message)),
            Outcome::BadRequest(message) => Err((control::STATUS_ERROR, format!("bad request: {message}"))),
        };
        respond(&inner, &reply_to, result).await;
        acknowledgement.accept();
        inner.services.in_flight.send_modify(|n| *n -= 1);
        drop(slot);
    });
}

/// Sends the response to `request` back to its sender.
async fn respond(inner: &NodeInner, request: &Envelope, result: Result<(Vec<u8>, &str), (&str, String)>) {
    let (status, content_type, payload) = match result {
        Ok((payload, content_type)) => (control::STATUS_OK, content_type, payload),
        Err((status, message)) => (status, "text/plain; charset=utf-8", message.into_bytes()),
    };
    let headers =
        [(KIND_HEADER, control::RESPONSE), (STATUS_HEADER, status), (CONTENT_TYPE_HEADER, content_type)]
            .into_iter()
            .collect();
    let mut response = inner.new_envelope(Destination::Node(request.from.clone()), headers, payload);
    response.correlation_id = Some(request.id);
    if let Err(error) = inner.send_to_node(&request.from, response).await {
        tracing::warn!(to = %request.from, %error, "could not send a response");
    }
}

/// The parts of a request needed to answer it, kept while the handler consumes the request.
trait HeadersOnly {
    fn clone_headers_only(&self) -> Envelope;
}

impl HeadersOnly for Envelope {
    fn clone_headers_only(&self) -> Envelope {
        Envelope::new(self.id, self.from.clone(), self.to.clone(), Vec::new())
            .with_correlation_id(self.correlation_id)
    }
}

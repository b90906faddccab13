//! A service handler with its types erased: what the node runs for each request.

use crate::{
    acknowledgement::Acknowledgement,
    codec::Codec,
    control,
    received::{decode_received, Received},
    trace_context::{TraceContext, TRACEPARENT_HEADER},
};
use comms_plugin_api::Envelope;
use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use std::{future::Future, sync::Arc};
use tracing::Instrument;

/// How a request ended, before it is sent back.
pub(crate) enum Outcome {
    Ok { payload: Vec<u8>, content_type: &'static str },
    HandlerError(String),
    BadRequest(String),
}

impl Outcome {
    /// The response's payload and content type, or its status and error message.
    pub(crate) fn into_result(self) -> Result<(Vec<u8>, &'static str), (&'static str, String)> {
        match self {
            Outcome::Ok { payload, content_type } => Ok((payload, content_type)),
            Outcome::HandlerError(message) => Err((control::STATUS_ERROR, message)),
            Outcome::BadRequest(message) => Err((control::STATUS_ERROR, format!("bad request: {message}"))),
        }
    }
}

/// A running handler: request in, outcome out.
pub(crate) type Handler = Arc<dyn Fn(Envelope) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// A type-erased service handler.
pub(crate) struct ServiceHandler(pub(crate) Handler);

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
            // The caller's trace continues here (a new one if the request carries none).
            let span = tracing::info_span!(
                "comms.handle",
                from = %envelope.from,
                "otel.kind" = "server",
                trace_id = tracing::field::Empty
            );
            let context = crate::trace_context::begin(
                &span,
                envelope.header(TRACEPARENT_HEADER).and_then(TraceContext::parse),
            );
            let handled = async move {
                // The node acknowledges the request when its response is sent (the driver).
                let request: Received<Req> = match decode_received(codec, envelope, Acknowledgement::none()) {
                    Ok(request) => request,
                    Err(error) => return Outcome::BadRequest(error.to_string()),
                };
                match context.scope(handler(request)).await {
                    Ok(response) => match codec.encode(&response) {
                        Ok(payload) => Outcome::Ok { payload, content_type: codec.content_type() },
                        Err(error) => Outcome::HandlerError(format!("encoding the response: {error}")),
                    },
                    Err(error) => Outcome::HandlerError(error.to_string()),
                }
            };
            Box::pin(handled.instrument(span))
        }))
    }
}

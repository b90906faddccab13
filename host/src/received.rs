//! A received message as the application gets it, and decoding it by its content type.

use crate::{
    acknowledgement::Acknowledgement,
    codec::{Codec, CONTENT_TYPE_HEADER},
    error::{ReceiveError, RequestError},
};
use comms_plugin_api::{Envelope, Headers, MessageId, NodeId};
use serde::de::DeserializeOwned;

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
    /// inbox), after a delay that depends on the backend: at once by default on NATS,
    /// PostgreSQL and SQLite, or after their `requeue_delay_ms`, doubled at each delivery.
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

    /// The trace the sender was in (its `traceparent` header), if any: run the work this message
    /// starts in [`crate::trace_context::TraceContext::scope`] to continue it.
    pub fn trace_context(&self) -> Option<crate::trace_context::TraceContext> {
        self.headers
            .get(crate::trace_context::TRACEPARENT_HEADER)
            .and_then(crate::trace_context::TraceContext::parse)
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

/// Decodes a successful response as the type the caller expects.
pub(crate) fn decode_response<T: DeserializeOwned>(
    default: Codec,
    response: Envelope,
) -> Result<T, RequestError> {
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

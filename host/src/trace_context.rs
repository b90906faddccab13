//! W3C Trace Context across nodes: every request carries a `traceparent` header
//! (`00-<trace id>-<parent span id>-<flags>`, <https://www.w3.org/TR/trace-context/>), so that a
//! request's trace continues in the node that serves it, whatever the transport, and in the
//! requests that node makes while handling it.
//!
//! - [`crate::Node::request`] (and its variants) starts a child of the current context, or a new
//!   trace when there is none, and sends it in the request's `traceparent` header; the call runs
//!   in a `comms.request` span with the trace id as a field.
//! - A service handler runs with the request's context as the current one ([`current`]), in a
//!   `comms.handle` span with the trace id, so requests it makes are children of the one it
//!   serves. The context belongs to the handler's task: a task it spawns starts without it
//!   (wrap it in [`TraceContext::scope`]).
//!
//! A malformed `traceparent` is ignored (a new trace starts), as the W3C recommendation says.
//!
//! With the cargo feature `otel` and an OpenTelemetry layer installed (`crate::telemetry`), the
//! ids sent are those of the OpenTelemetry spans, so that the exported spans link up across
//! nodes; without one, comms makes its own ids.

use std::{fmt, future::Future};

#[cfg(feature = "otel")]
mod otel;

/// The header name (lower case, as the W3C recommendation spells it).
pub const TRACEPARENT_HEADER: &str = "traceparent";

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// One position in a trace: the trace and the span that is the parent of the next hop.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero: the span that sent this context.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceContext {
    /// A new trace, sampled, with a random trace id and span id.
    pub fn new_root() -> Self {
        Self { trace_id: nonzero(), span_id: nonzero(), flags: 1 }
    }

    /// The next hop of this trace: the same trace id and flags, a new span id.
    pub fn child(&self) -> Self {
        Self { span_id: nonzero(), ..*self }
    }

    /// Parses a `traceparent` value; `None` if it is not a valid version-00 (or later, read as
    /// 00) value.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four parts; a later version may append more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        hex_bytes::<1>(version)?;
        let trace_id = hex_bytes::<16>(trace)?;
        let span_id = hex_bytes::<8>(span)?;
        let [flags] = hex_bytes::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id, flags })
    }

    /// The trace id in lower-case hex (32 digits), as tracing tools show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Runs `future` with this context as the [`current`] one.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }
}

/// The context of the request being handled by this task, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|context| *context).ok()
}

/// The hop `span` stands for: the next one after `parent`, or a new trace. When an
/// OpenTelemetry layer sees the span (feature `otel`), its ids are the span's, and the span is
/// made a child of `parent`; otherwise new ids are drawn. Records the trace id in the span's
/// `trace_id` field.
pub(crate) fn begin(span: &tracing::Span, parent: Option<TraceContext>) -> TraceContext {
    let context = joined(span, parent)
        .unwrap_or_else(|| parent.map_or_else(TraceContext::new_root, |parent| parent.child()));
    span.record("trace_id", tracing::field::display(HexTraceId(context.trace_id)));
    context
}

#[cfg(feature = "otel")]
fn joined(span: &tracing::Span, parent: Option<TraceContext>) -> Option<TraceContext> {
    otel::join_span(span, parent)
}

#[cfg(not(feature = "otel"))]
fn joined(_span: &tracing::Span, _parent: Option<TraceContext>) -> Option<TraceContext> {
    None
}

/// Writes a trace id as hex without allocating (it is recorded on every traced span).
struct HexTraceId([u8; 16]);

impl fmt::Display for HexTraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// The `traceparent` value.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = std::array::from_fn(|_| rand::random());
        if bytes != [0; N] {
            return bytes;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Exactly `2 * N` lower-case hex digits.
fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut bytes = [0; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_w3c_example_round_trips_and_malformed_values_are_refused() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(value).expect("the recommendation's example parses");
        assert_eq!(context.to_string(), value);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?} must be refused");
        }
        // A later version may carry more parts; what version 00 defines is read.
        let later = TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more");
        assert_eq!(later.map(|c| c.flags), Some(0));
    }

    #[test]
    fn a_child_keeps_the_trace_and_takes_a_new_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceContext::new_root().trace_id, root.trace_id);
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
    }

    #[tokio::test]
    async fn the_current_context_is_the_scopes_and_only_inside_it() {
        assert_eq!(current(), None);
        let context = TraceContext::new_root();
        let inside = context.scope(async { current() }).await;
        assert_eq!(inside, Some(context));
        assert_eq!(current(), None);
    }
}

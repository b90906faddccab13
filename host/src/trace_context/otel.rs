//! The OpenTelemetry side of a hop (cargo feature `otel`): a span seen by the
//! `tracing-opentelemetry` layer (installed through `crate::telemetry`) takes its ids from, and
//! gives its ids to, the `traceparent` comms carries.

use super::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` stand for the next hop after `parent` (a new trace when `None`) in the
/// OpenTelemetry layer, if one sees the span, and returns its ids; `None` when no layer does
/// (not installed, or the span is filtered out).
pub(super) fn join_span(span: &tracing::Span, parent: Option<TraceContext>) -> Option<TraceContext> {
    if let Some(parent) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote)).ok()?;
    }
    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then(|| TraceContext {
        trace_id: ids.trace_id().to_bytes(),
        span_id: ids.span_id().to_bytes(),
        flags: ids.trace_flags().to_u8(),
    })
}

//! Exporting the node's spans to OpenTelemetry (cargo feature `otel`): OTLP over HTTP, protobuf
//! encoded, to a collector (the OpenTelemetry Collector, Jaeger, Tempo, ...).
//!
//! The spans are the ones [`crate::trace_context`] describes: `comms.request` (kind client),
//! `comms.handle` (server) and `comms.send` (producer, at debug level). With the layer
//! installed, their OpenTelemetry span ids are the ones carried in `traceparent`: the span a
//! node exports for handling a request is the child of the caller's `comms.request` span, in the
//! caller's trace, whichever transport carried it. A request made inside an application span
//! that is itself exported becomes that span's child.
//!
//! An application installs the layer in its own subscriber:
//!
//! ```no_run
//! use tracing_subscriber::prelude::*;
//! # fn main() -> Result<(), comms_host::telemetry::TelemetryError> {
//! let export = comms_host::telemetry::OtlpTracing::to_endpoint("http://127.0.0.1:4318/v1/traces", "orders")?;
//! tracing_subscriber::registry().with(export.layer()).init();
//! // ... run nodes; dropping `export` flushes what is left.
//! # Ok(()) }
//! ```
//!
//! `comms run` installs it when the standard variables `OTEL_EXPORTER_OTLP_ENDPOINT` (the
//! collector's base URL; `/v1/traces` is appended) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the
//! whole URL) are set ([`OtlpTracing::from_env`]); `OTEL_SERVICE_NAME` names the process
//! (default `comms`), and the SDK's other variables (`OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, ...) apply.
//!
//! Limits: spans are exported in batches from a thread of their own (every 5 s by default, at
//! most 2048 waiting: more are dropped, never queued without bound); the HTTP client is plain
//! HTTP/1.1 (`http://` only: run a collector beside the node to reach a TLS endpoint); metrics
//! stay on the Prometheus endpoint ([`crate::metrics`]).

mod http_client;

use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    trace::{SdkTracer, SdkTracerProvider},
    Resource,
};
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetryLayer;

/// The variable naming the whole URL of the traces endpoint.
pub const TRACES_ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The variable naming the collector's base URL (`/v1/traces` is appended).
pub const ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How long one export may take before it is given up (the batch is dropped, a warning logged).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not a plain `http://host:port/...` URL.
    #[error("the OTLP endpoint {value:?} (from {source_name}) cannot be used: {reason}")]
    Endpoint {
        /// Where the value came from: a variable's name, or "the program".
        source_name: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The OpenTelemetry SDK refused the exporter's configuration.
    #[error("the OTLP exporter cannot be built: {0}")]
    Exporter(String),
}

/// An OTLP span exporter and the [`tracing`] layer that feeds it. Dropping it exports what is
/// still waiting and stops the export thread, waiting at most 5 s (the SDK's shutdown limit):
/// a collector that does not answer delays the end of the process by that much, never more.
#[derive(Debug)]
pub struct OtlpTracing {
    provider: SdkTracerProvider,
    endpoint: String,
}

impl OtlpTracing {
    /// The exporter the standard variables ask for, or `None` when neither
    /// [`TRACES_ENDPOINT_VARIABLE`] nor [`ENDPOINT_VARIABLE`] is set. `default_service_name`
    /// names the process unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) does.
    pub fn from_env(default_service_name: &str) -> Result<Option<Self>, TelemetryError> {
        let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
        let (source_name, endpoint) = if let Some(url) = variable(TRACES_ENDPOINT_VARIABLE) {
            (TRACES_ENDPOINT_VARIABLE, url)
        } else if let Some(base) = variable(ENDPOINT_VARIABLE) {
            (ENDPOINT_VARIABLE, format!("{}/v1/traces", base.trim_end_matches('/')))
        } else {
            return Ok(None);
        };
        let named = variable("OTEL_SERVICE_NAME").is_some()
            || variable("OTEL_RESOURCE_ATTRIBUTES")
                .is_some_and(|attributes| attributes.contains("service.name="));
        let service_name = (!named).then_some(default_service_name);
        Self::build(&endpoint, source_name, service_name).map(Some)
    }

    /// An exporter to `endpoint`, the whole URL of the traces endpoint (a collector's is
    /// `http://HOST:4318/v1/traces`), naming the process `service_name`.
    pub fn to_endpoint(endpoint: &str, service_name: &str) -> Result<Self, TelemetryError> {
        Self::build(endpoint, "the program", Some(service_name))
    }

    fn build(endpoint: &str, source_name: &str, service_name: Option<&str>) -> Result<Self, TelemetryError> {
        let client = http_client::PlainHttpClient::new(endpoint, EXPORT_TIMEOUT).map_err(|reason| {
            TelemetryError::Endpoint {
                source_name: source_name.to_string(),
                value: endpoint.to_string(),
                reason,
            }
        })?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        let mut resource = Resource::builder();
        if let Some(name) = service_name {
            resource = resource.with_service_name(name.to_string());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Self { provider, endpoint: endpoint.to_string() })
    }

    /// The URL spans are posted to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The layer to add to the application's subscriber. Several layers may be made from one
    /// exporter.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("comms"))
            .with_tracked_inactivity(false)
    }

    /// Exports every span ended so far, waiting for the collector's answer.
    pub fn flush(&self) -> Result<(), TelemetryError> {
        self.provider.force_flush().map_err(|error| TelemetryError::Exporter(error.to_string()))
    }
}

impl Drop for OtlpTracing {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, endpoint = %self.endpoint, "the OTLP exporter did not shut down cleanly");
        }
    }
}

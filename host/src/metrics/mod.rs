//! A node's metrics in the Prometheus / OpenMetrics text format: [`crate::Node::metrics_text`],
//! and over HTTP at `GET /metrics` when the config has
//!
//! ```toml
//! [metrics]
//! listen = "127.0.0.1:9464"    # off when absent; port 0 picks a free port
//! ```
//!
//! Almost everything is read at scrape time from the state the node keeps anyway (the
//! transports' `stats()`, the peer table, the queues), so an unscraped node pays nothing for
//! it. The one series recorded as it happens is the request latency histogram, one atomic
//! update per request.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `comms_transport_messages_sent_total`, `..._bytes_sent_total`, `..._messages_received_total`, `..._bytes_received_total`, `..._send_errors_total`, `..._errors_total`, `..._reconnects_total`, `..._plugin_panics_total` | counter | `transport`, `plugin` |
//! | `comms_transport_settled_total` (received messages the node acknowledged, gave back or refused) | counter | `transport`, `plugin`, `outcome` (`accepted`, `requeued`, `rejected`) |
//! | `comms_transport_send_queue_depth`, `comms_transport_receive_queue_depth` | gauge | `transport`, `plugin` |
//! | `comms_transport_stat` (a plugin's own counters, e.g. `redis.claimed`) | gauge | `transport`, `plugin`, `name` |
//! | `comms_transport_longest_blocking_poll_seconds` (a plugin future that held the host's thread) | gauge | `transport`, `plugin`, `operation` |
//! | `comms_peers` | gauge | `status` (`up`, `down`, `offline`) |
//! | `comms_inbox_depth` (received, not yet taken by the application) | gauge | |
//! | `comms_requests_waiting` (this node's calls waiting for a response) | gauge | |
//! | `comms_requests_being_served` (requests this node's services are handling) | gauge | |
//! | `comms_request_duration_seconds` (a call with its retries, as the caller saw it) | histogram | `service`, `outcome` (`ok`, `timeout`, `error`) |
//! | `comms_rejected_envelopes_total`, `comms_duplicates_dropped_total` | counter | |
//!
//! Transport counts are the totals since the transport started and include the node's own
//! control messages (hellos, heartbeats), not only the application's.

mod endpoint;

pub(crate) use endpoint::{MetricsEndpoint, Render};

use crate::{
    admin::{NodeStatus, TransportStatus},
    error::RequestError,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use std::{fmt, time::Duration};

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// A metric read from each transport's counters: its name, its help, how to read it.
type TransportSeries = (&'static str, &'static str, fn(&TransportStatus) -> u64);

/// The `service` and `outcome` of a request.
type RequestLabels = Vec<(&'static str, String)>;

/// Buckets from 100 µs to about 3.3 s, doubling: a loopback round trip lands in the first
/// ones, a request that timed out after retries in the last.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The series recorded as requests end (everything else is read at scrape time).
#[derive(Debug)]
pub(crate) struct RequestMetrics {
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self { durations: Family::new_with_constructor(request_histogram) }
    }
}

impl RequestMetrics {
    /// Records one call of `service` (with its retries) that ended with `result` after `elapsed`.
    pub(crate) fn record<T>(&self, service: &str, result: &Result<T, RequestError>, elapsed: Duration) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(RequestError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        let labels = vec![("service", service.to_string()), ("outcome", outcome.to_string())];
        self.durations.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }
}

/// A node's metrics as OpenMetrics text: `status` (a snapshot of the node) and the request
/// latencies recorded in `requests`.
pub(crate) fn render(status: NodeStatus, requests: &RequestMetrics) -> String {
    let mut registry = Registry::default();
    registry.register(
        "comms_request_duration_seconds",
        "How long a call took as the caller saw it, retries included",
        requests.durations.clone(),
    );
    registry.register_collector(Box::new(StatusCollector(status)));
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        // Writing into a String does not fail; an encoder error would be a bug in a label.
        tracing::warn!(%error, "encoding the metrics failed");
    }
    text
}

/// Encodes one snapshot of the node.
#[derive(Debug)]
struct StatusCollector(NodeStatus);

/// One metric family: its descriptor, then each series.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut metric_encoder = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in series {
        metric.encode(metric_encoder.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric family of one series without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    metric: M,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric_type)?)
}

fn gauge(value: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let status = &self.0;
        let transports: Vec<(Labels, &TransportStatus)> = status
            .transports
            .iter()
            .map(|t| (vec![("transport", t.name.clone()), ("plugin", t.plugin.clone())], t))
            .collect();
        let counters: [TransportSeries; 8] = [
            ("comms_transport_messages_sent", "Messages the transport took to send", |t| t.messages_sent),
            ("comms_transport_bytes_sent", "Payload bytes of those messages", |t| t.bytes_sent),
            ("comms_transport_messages_received", "Messages the transport handed to the node", |t| {
                t.messages_received
            }),
            ("comms_transport_bytes_received", "Payload bytes of those messages", |t| t.bytes_received),
            ("comms_transport_send_errors", "Sends that failed", |t| t.send_errors),
            ("comms_transport_errors", "Receives that failed and the transport's own errors", |t| t.errors),
            ("comms_transport_reconnects", "Connections opened again after they were lost", |t| t.reconnects),
            (
                "comms_transport_plugin_panics",
                "Calls into the plugin that panicked (caught, returned as errors)",
                |t| t.plugin_panics,
            ),
        ];
        for (name, help, read) in counters {
            let series = transports.iter().map(|(labels, t)| (labels.clone(), ConstCounter::new(read(t))));
            family(&mut encoder, name, help, MetricType::Counter, series)?;
        }
        let settled = transports.iter().flat_map(|(labels, t)| {
            [
                ("accepted", t.settled_accepted),
                ("requeued", t.settled_requeued),
                ("rejected", t.settled_rejected),
            ]
            .into_iter()
            .map(move |(outcome, value)| {
                let mut labels = labels.clone();
                labels.push(("outcome", outcome.to_string()));
                (labels, ConstCounter::new(value))
            })
        });
        family(
            &mut encoder,
            "comms_transport_settled",
            "Received messages the node settled: accepted, requeued (to be delivered again) or rejected",
            MetricType::Counter,
            settled,
        )?;
        let depths: [TransportSeries; 2] = [
            ("comms_transport_send_queue_depth", "Messages queued for sending, not yet written", |t| {
                t.send_queue_depth
            }),
            ("comms_transport_receive_queue_depth", "Messages received, waiting for the node", |t| {
                t.receive_queue_depth
            }),
        ];
        for (name, help, read) in depths {
            let series = transports.iter().map(|(labels, t)| (labels.clone(), gauge(read(t))));
            family(&mut encoder, name, help, MetricType::Gauge, series)?;
        }
        let own = transports.iter().flat_map(|(labels, t)| {
            t.counters.iter().map(move |(name, value)| {
                let mut labels = labels.clone();
                labels.push(("name", name.clone()));
                (labels, gauge(*value))
            })
        });
        family(&mut encoder, "comms_transport_stat", "A plugin's own statistics", MetricType::Gauge, own)?;
        let blocked = transports.iter().filter_map(|(labels, t)| {
            let (operation, micros) = t.longest_blocking_poll.as_ref()?;
            let mut labels = labels.clone();
            labels.push(("operation", operation.clone()));
            Some((labels, ConstGauge::new(*micros as f64 / 1e6)))
        });
        family(
            &mut encoder,
            "comms_transport_longest_blocking_poll_seconds",
            "The longest poll of a plugin future that blocked the node's thread",
            MetricType::Gauge,
            blocked,
        )?;

        let statuses = ["up", "down", "offline"].map(|name| {
            let count = status.peers.iter().filter(|peer| peer.status == name).count() as u64;
            (vec![("status", name.to_string())], gauge(count))
        });
        family(&mut encoder, "comms_peers", "Known peers by liveness", MetricType::Gauge, statuses)?;
        single(
            &mut encoder,
            "comms_inbox_depth",
            "Messages received and not yet taken by the application",
            MetricType::Gauge,
            gauge(status.inbox_depth),
        )?;
        single(
            &mut encoder,
            "comms_requests_waiting",
            "Calls of this node waiting for a response",
            MetricType::Gauge,
            gauge(status.requests_waiting),
        )?;
        single(
            &mut encoder,
            "comms_requests_being_served",
            "Requests this node's services are handling",
            MetricType::Gauge,
            gauge(status.requests_being_served),
        )?;
        single(
            &mut encoder,
            "comms_rejected_envelopes",
            "Incoming envelopes refused by the signature checks",
            MetricType::Counter,
            ConstCounter::new(status.rejected_envelopes),
        )?;
        single(
            &mut encoder,
            "comms_duplicates_dropped",
            "Repeated messages dropped by the dedup window",
            MetricType::Counter,
            ConstCounter::new(status.duplicates_dropped),
        )
    }
}

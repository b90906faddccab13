//! A node's metrics in the Prometheus / OpenMetrics text format: [`crate::Node::metrics_text`],
//! and over HTTP at `GET /metrics`, beside a status page at `GET /`, when the config has
//!
//! ```toml
//! [metrics]
//! listen = "127.0.0.1:9464"    # off when absent; port 0 picks a free port
//! ```
//!
//! | path | what |
//! |---|---|
//! | `/` | the status page: one HTML file with its CSS and JavaScript, nothing loaded from elsewhere |
//! | `/status.json` | the node's [`crate::admin::NodeStatus`] as JSON, plus `peer_transports` (peer id → names of the transports in its record) |
//! | `/history.json` | `{"interval_ms": 1000, "capacity": 600, "samples": [...]}`, oldest sample first |
//! | `/metrics` | the OpenMetrics text below |
//!
//! The status page shows the cluster as this node sees it and refreshes every 2 s: the node's
//! id and uptime; its transports (plugin and version, address, messages sent and received,
//! errors, reconnects, queue depths); its peers (up, down or offline, through which transports,
//! when last heard from); the services it announces and the topics it subscribes to; and two
//! plots over the history: messages per second sent and received (over all transports, control
//! messages included), and the latency of this node's calls (mean and estimated 99th
//! percentile, in ms). Names that come from peers or the application are shown as text, never
//! interpreted as markup.
//!
//! The history holds one sample per second, at most 600 of them (the last 10 minutes; about
//! 60 KB), in memory only: it starts empty when the node starts and is taken only while the
//! endpoint is configured. A sample holds the messages sent and received per second, the calls
//! that ended per second with their mean, median and 99th percentile (the last two estimated
//! from the histogram's buckets, so exact to within a factor of 2), the inbox depth and the
//! peers up.
//!
//! Everything the endpoint serves is read-only (only `GET`; nothing changes the node) and
//! **unauthenticated**: whoever reaches the address can read the node's id, peers, services and
//! traffic. Keep `listen` on loopback or a private address, behind a proxy that
//! authenticates if it must be reached from elsewhere.
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
mod history;

pub(crate) use endpoint::{Documents, MetricsEndpoint, Render};
pub(crate) use history::{sample, History};

use crate::{
    admin::{NodeStatus, TransportStatus},
    error::RequestError,
};
use history::LatencyCounts;
pub(crate) use history::LatencyTotals;
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
use serde::Serialize;
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Weak},
    time::Duration,
};

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// A metric read from each transport's counters: its name, its help, how to read it.
type TransportSeries = (&'static str, &'static str, fn(&TransportStatus) -> u64);

/// The `service` and `outcome` of a request.
type RequestLabels = Vec<(&'static str, String)>;

/// The request histogram's buckets (upper bounds; one more, unbounded, above them).
const LATENCY_BUCKETS: usize = 16;

/// Buckets from 100 µs to about 3.3 s, doubling: a loopback round trip lands in the first
/// ones, a request that timed out after retries in the last.
fn latency_bucket_bounds() -> [f64; LATENCY_BUCKETS] {
    let mut bounds = [0.0; LATENCY_BUCKETS];
    for (bound, value) in bounds.iter_mut().zip(exponential_buckets(0.0001, 2.0, LATENCY_BUCKETS as u16)) {
        *bound = value;
    }
    bounds
}

fn request_histogram() -> Histogram {
    Histogram::new(latency_bucket_bounds())
}

/// The series recorded as requests end (everything else is read at scrape time).
#[derive(Debug)]
pub(crate) struct RequestMetrics {
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// The same durations, all services and outcomes together, for the status page's history.
    overall: LatencyCounts,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self { durations: Family::new_with_constructor(request_histogram), overall: LatencyCounts::default() }
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
        self.overall.observe(elapsed);
    }

    /// Every call recorded so far, whatever its service and outcome: count, sum and buckets.
    pub(crate) fn latency_totals(&self) -> LatencyTotals {
        self.overall.totals()
    }
}

/// What the endpoint and the history's sampler read from a node (the node's driver implements
/// it, so that this module does not depend on the driver).
pub(crate) trait NodeView: Send + Sync + 'static {
    /// The node's status now.
    fn status(&self) -> NodeStatus;
    /// [`render`] of the node.
    fn metrics_text(&self) -> String;
    /// Per peer, the names of the transports in its record.
    fn peer_transports(&self) -> BTreeMap<String, Vec<String>>;
    /// Every call recorded so far ([`RequestMetrics::latency_totals`]).
    fn latency_totals(&self) -> LatencyTotals;
}

/// What the endpoint serves of one node, read when asked from the node, which it holds weakly
/// (so that the endpoint never keeps a closed node alive), and from its history.
pub(crate) struct NodeDocuments {
    node: Weak<dyn NodeView>,
    history: Arc<History>,
}

impl std::fmt::Debug for NodeDocuments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDocuments").finish_non_exhaustive()
    }
}

impl NodeDocuments {
    pub(crate) fn new(node: Weak<dyn NodeView>, history: Arc<History>) -> Self {
        Self { node, history }
    }
}

/// The JSON document of `GET /status.json`: the node's [`NodeStatus`], and the transports
/// through which each peer can be reached (the names of the transports in its record), which
/// the status does not carry.
#[derive(Debug, Serialize)]
struct StatusDocument {
    #[serde(flatten)]
    status: NodeStatus,
    peer_transports: BTreeMap<String, Vec<String>>,
}

impl Documents for NodeDocuments {
    fn metrics(&self) -> Option<String> {
        self.node.upgrade().map(|driver| driver.metrics_text())
    }

    fn status_json(&self) -> Option<String> {
        let driver = self.node.upgrade()?;
        let document = StatusDocument { status: driver.status(), peer_transports: driver.peer_transports() };
        Some(serde_json::to_string(&document).unwrap_or_else(|error| {
            // Strings and integers only: serializing them does not fail.
            tracing::warn!(%error, "encoding the status failed");
            String::from("{}")
        }))
    }

    fn history_json(&self) -> Option<String> {
        // Only while the node runs, like the other documents.
        self.node.upgrade()?;
        Some(self.history.to_json())
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

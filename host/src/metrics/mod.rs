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
//! | `comms_transport_messages_sent_total`, `..._bytes_sent_total`, `..._messages_received_total`, `..._bytes_received_total`, `..._send_errors_total`, `..._errors_total`, `..._reconnects_total` | counter | `transport`, `plugin` |
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

pub(crate) use endpoint::MetricsEndpoint;

use crate::{driver::Driver, error::RequestError, PeerStatus};
use comms_plugin_api::host_side::TransportCounters;
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
use std::{
    fmt,
    sync::{Arc, Weak},
    time::Duration,
};

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// A metric read from each transport's counters: its name, its help, how to read it.
type TransportSeries = (&'static str, &'static str, fn(&TransportCounters) -> u64);

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

/// The node's metrics, encoded as OpenMetrics text.
pub(crate) fn render(driver: &Arc<Driver>) -> String {
    let mut registry = Registry::default();
    registry.register(
        "comms_request_duration_seconds",
        "How long a call took as the caller saw it, retries included",
        driver.request_metrics.durations.clone(),
    );
    registry.register_collector(Box::new(NodeCollector(Arc::downgrade(driver))));
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        // Writing into a String does not fail; an encoder error would be a bug in a label.
        tracing::warn!(%error, "encoding the metrics failed");
    }
    text
}

/// Reads the node's state on each scrape.
struct NodeCollector(Weak<Driver>);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

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

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(driver) = self.0.upgrade() else { return Ok(()) };
        let transports: Vec<_> = driver
            .transports
            .iter()
            .map(|t| {
                let labels: Labels = vec![("transport", t.name.clone()), ("plugin", t.plugin.clone())];
                (labels, t.loaded.stats(), t.loaded.blocking_poll())
            })
            .collect();
        let counters: [TransportSeries; 7] = [
            ("comms_transport_messages_sent", "Messages the transport took to send", |s| s.messages_sent),
            ("comms_transport_bytes_sent", "Payload bytes of those messages", |s| s.bytes_sent),
            ("comms_transport_messages_received", "Messages the transport handed to the node", |s| {
                s.messages_received
            }),
            ("comms_transport_bytes_received", "Payload bytes of those messages", |s| s.bytes_received),
            ("comms_transport_send_errors", "Sends that failed", |s| s.send_errors),
            ("comms_transport_errors", "Receives that failed and the transport's own errors", |s| s.errors),
            ("comms_transport_reconnects", "Connections opened again after they were lost", |s| {
                s.transport.reconnects
            }),
        ];
        for (name, help, read) in counters {
            let series =
                transports.iter().map(|(labels, stats, _)| (labels.clone(), ConstCounter::new(read(stats))));
            family(&mut encoder, name, help, MetricType::Counter, series)?;
        }
        let depths: [TransportSeries; 2] = [
            ("comms_transport_send_queue_depth", "Messages queued for sending, not yet written", |s| {
                s.transport.send_queue_depth
            }),
            ("comms_transport_receive_queue_depth", "Messages received, waiting for the node", |s| {
                s.transport.receive_queue_depth
            }),
        ];
        for (name, help, read) in depths {
            let series = transports.iter().map(|(labels, stats, _)| (labels.clone(), gauge(read(stats))));
            family(&mut encoder, name, help, MetricType::Gauge, series)?;
        }
        let own = transports.iter().flat_map(|(labels, stats, _)| {
            stats.transport.counters.iter().map(move |(name, value)| {
                let mut labels = labels.clone();
                labels.push(("name", name.clone()));
                (labels, gauge(*value))
            })
        });
        family(&mut encoder, "comms_transport_stat", "A plugin's own statistics", MetricType::Gauge, own)?;
        let blocked = transports.iter().filter_map(|(labels, _, blocking)| {
            let blocking = blocking.as_ref()?;
            let mut labels = labels.clone();
            labels.push(("operation", blocking.operation.to_string()));
            Some((labels, ConstGauge::new(blocking.duration.as_secs_f64())))
        });
        family(
            &mut encoder,
            "comms_transport_longest_blocking_poll_seconds",
            "The longest poll of a plugin future that blocked the node's thread",
            MetricType::Gauge,
            blocked,
        )?;

        let peers = driver.peers();
        let count = |status: PeerStatus| peers.iter().filter(|peer| peer.status == status).count() as u64;
        let statuses = [PeerStatus::Up, PeerStatus::Down, PeerStatus::Offline]
            .map(|status| (vec![("status", status.name().to_string())], gauge(count(status))));
        family(&mut encoder, "comms_peers", "Known peers by liveness", MetricType::Gauge, statuses)?;

        let node = driver.queue_depths();
        single(
            &mut encoder,
            "comms_inbox_depth",
            "Messages received and not yet taken by the application",
            MetricType::Gauge,
            gauge(node.inbox),
        )?;
        single(
            &mut encoder,
            "comms_requests_waiting",
            "Calls of this node waiting for a response",
            MetricType::Gauge,
            gauge(node.requests_waiting),
        )?;
        single(
            &mut encoder,
            "comms_requests_being_served",
            "Requests this node's services are handling",
            MetricType::Gauge,
            gauge(node.requests_being_served),
        )?;
        single(
            &mut encoder,
            "comms_rejected_envelopes",
            "Incoming envelopes refused by the signature checks",
            MetricType::Counter,
            ConstCounter::new(driver.rejected.get()),
        )?;
        single(
            &mut encoder,
            "comms_duplicates_dropped",
            "Repeated messages dropped by the dedup window",
            MetricType::Counter,
            ConstCounter::new(driver.duplicates()),
        )
    }
}

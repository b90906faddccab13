//! The node's own status ([`crate::admin`]): read from the driver's state, answered as the
//! built-in service [`crate::admin::STATUS_SERVICE`].

use super::Driver;
use crate::admin::{NodeStatus, PeerSummary, TransportStatus};
use std::sync::{atomic::Ordering, Weak};

impl Driver {
    /// This node's [`NodeStatus`] now.
    pub(crate) fn status(&self) -> NodeStatus {
        let record = self.engine().record().clone();
        let depths = self.queue_depths();
        NodeStatus {
            id: self.id.to_string(),
            uptime_ms: millis(self.started.elapsed()),
            transports: self
                .serving_transports()
                .into_iter()
                .map(|(_, t)| {
                    let stats = t.loaded.stats();
                    TransportStatus {
                        name: t.name.clone(),
                        plugin: t.plugin.clone(),
                        plugin_version: t.plugin_version.clone(),
                        local_address: t.loaded.info().local_address.clone(),
                        messages_sent: stats.messages_sent,
                        bytes_sent: stats.bytes_sent,
                        messages_received: stats.messages_received,
                        bytes_received: stats.bytes_received,
                        send_errors: stats.send_errors,
                        errors: stats.errors,
                        reconnects: stats.transport.reconnects,
                        send_queue_depth: stats.transport.send_queue_depth,
                        receive_queue_depth: stats.transport.receive_queue_depth,
                        counters: stats.transport.counters.into_iter().collect(),
                        longest_blocking_poll: t.loaded.blocking_poll().map(|poll| {
                            let micros = u64::try_from(poll.duration.as_micros()).unwrap_or(u64::MAX);
                            (poll.operation.to_string(), micros)
                        }),
                        settled_accepted: t.settle_lane.counts().accepted.load(Ordering::Relaxed),
                        settled_requeued: t.settle_lane.counts().requeued.load(Ordering::Relaxed),
                        settled_rejected: t.settle_lane.counts().rejected.load(Ordering::Relaxed),
                        plugin_panics: t.loaded.panics(),
                    }
                })
                .collect(),
            peers: self
                .peers()
                .into_iter()
                .map(|peer| PeerSummary {
                    id: peer.record.id.to_string(),
                    status: peer.status.name().to_string(),
                    last_seen_ms: millis(peer.last_seen),
                })
                .collect(),
            services: record.services,
            topics: record.topics,
            inbox_depth: depths.inbox,
            requests_waiting: depths.requests_waiting,
            requests_being_served: depths.requests_being_served,
            rejected_envelopes: self.rejected.get(),
            duplicates_dropped: self.duplicates(),
        }
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The handler of [`STATUS_SERVICE`]; holds the node weakly, so that serving it never keeps a
/// node alive.
pub(super) fn status_handler(codec: crate::Codec, node: Weak<Driver>) -> crate::service::Handler {
    crate::service::ServiceHandler::new(codec, move |_request: crate::Received<()>| {
        let status = node.upgrade().map(|driver| driver.status());
        async move { status.ok_or("the node has stopped") }
    })
    .0
}

impl Driver {
    /// The node's metrics as OpenMetrics text ([`crate::metrics`]).
    pub(crate) fn metrics_text(&self) -> String {
        crate::metrics::render(self.status(), &self.request_metrics)
    }
}

impl crate::metrics::NodeView for Driver {
    fn status(&self) -> NodeStatus {
        Driver::status(self)
    }

    fn metrics_text(&self) -> String {
        Driver::metrics_text(self)
    }

    fn peer_transports(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.peers()
            .into_iter()
            .map(|peer| {
                let transports = peer.record.addresses.into_iter().map(|(transport, _)| transport).collect();
                (peer.record.id.to_string(), transports)
            })
            .collect()
    }

    fn latency_totals(&self) -> crate::metrics::LatencyTotals {
        self.request_metrics.latency_totals()
    }
}

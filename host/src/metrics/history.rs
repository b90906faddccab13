//! The status page's history: one sample per second of what the node did, the last
//! [`CAPACITY`] of them (10 minutes), held in memory while the metrics endpoint runs.
//!
//! A sample is the difference between two cumulative readings taken a second apart
//! ([`Sample::between`], pure arithmetic, tested below); the sampler task ([`sample`]) takes the
//! readings. Nothing is stored on disk and nothing survives the node: a restarted node starts
//! with an empty history.

use super::NodeView;
use super::{latency_bucket_bounds, LATENCY_BUCKETS};
use crate::admin::NodeStatus;
use serde::Serialize;
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError, Weak,
    },
    time::Duration,
};
use tokio::{sync::watch, time::MissedTickBehavior};

/// Samples kept: 600 one-second samples, the last 10 minutes. The oldest is dropped when a new
/// one comes, so the history never holds more than this (about 100 bytes each).
pub(crate) const CAPACITY: usize = 600;

/// How often a sample is taken.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// The durations of every call of this node, whatever its service and outcome, counted per
/// bucket of the request histogram. The Prometheus histogram keeps one series per service and
/// outcome and does not let its buckets be read back; this keeps the total the history needs at
/// the cost of three more atomic additions per call.
#[derive(Debug, Default)]
pub(crate) struct LatencyCounts {
    count: AtomicU64,
    sum_micros: AtomicU64,
    /// Calls per bucket (not cumulative): bucket `i` holds the durations up to bound `i` and
    /// above bound `i - 1`; the last one, those above the largest bound.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
}

impl LatencyCounts {
    /// Counts one call that took `elapsed`.
    pub(crate) fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket =
            latency_bucket_bounds().iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BUCKETS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals so far. The three kinds of counter are read one after the other, so a call
    /// that ends meanwhile may be in one and not yet in another: a sample is off by that call
    /// at most, and the next one makes up for it.
    pub(crate) fn totals(&self) -> LatencyTotals {
        LatencyTotals {
            count: self.count.load(Ordering::Relaxed),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
            buckets: std::array::from_fn(|bucket| self.buckets[bucket].load(Ordering::Relaxed)),
        }
    }
}

/// A reading of [`LatencyCounts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LatencyTotals {
    pub(crate) count: u64,
    pub(crate) sum_micros: u64,
    pub(crate) buckets: [u64; LATENCY_BUCKETS + 1],
}

/// What the node had done by one moment: cumulative counts and current gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reading {
    /// Time since the node started.
    pub(crate) uptime_ms: u64,
    /// Messages all transports took to send (the node's control messages included).
    pub(crate) sent: u64,
    /// Messages all transports handed to the node.
    pub(crate) received: u64,
    pub(crate) latency: LatencyTotals,
    pub(crate) inbox_depth: u64,
    pub(crate) peers_up: u64,
}

impl Reading {
    /// The reading of `status` and `latency`, taken together.
    pub(crate) fn new(status: &NodeStatus, latency: LatencyTotals) -> Self {
        let sum = |read: fn(&crate::admin::TransportStatus) -> u64| {
            status.transports.iter().map(read).fold(0u64, u64::saturating_add)
        };
        Self {
            uptime_ms: status.uptime_ms,
            sent: sum(|t| t.messages_sent),
            received: sum(|t| t.messages_received),
            latency,
            inbox_depth: status.inbox_depth,
            peers_up: status.peers.iter().filter(|peer| peer.status == "up").count() as u64,
        }
    }
}

/// One point of the history: what happened between two readings, per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// When the interval ended, in milliseconds since the node started.
    pub(crate) uptime_ms: u64,
    /// Messages sent per second, over all transports.
    pub(crate) sent_per_second: f64,
    /// Messages received per second, over all transports.
    pub(crate) received_per_second: f64,
    /// Calls of this node that ended, per second.
    pub(crate) requests_per_second: f64,
    /// Mean duration of those calls, in milliseconds; `None` when none ended.
    pub(crate) latency_mean_ms: Option<f64>,
    /// Median, estimated from the histogram buckets (exact to within a bucket, a factor of 2).
    pub(crate) latency_p50_ms: Option<f64>,
    /// 99th percentile, estimated the same way.
    pub(crate) latency_p99_ms: Option<f64>,
    /// Messages received and not yet taken by the application, at the end of the interval.
    pub(crate) inbox_depth: u64,
    /// Peers up at the end of the interval.
    pub(crate) peers_up: u64,
}

impl Sample {
    /// What happened from `before` to `after`. Counts that went down (they do not, but a
    /// transport's plugin keeps them) count as 0 rather than wrapping.
    pub(crate) fn between(before: &Reading, after: &Reading) -> Self {
        // At least a millisecond, so that two readings in the same millisecond cannot divide by 0.
        let seconds = after.uptime_ms.saturating_sub(before.uptime_ms).max(1) as f64 / 1000.0;
        let rate = |before: u64, after: u64| after.saturating_sub(before) as f64 / seconds;
        let calls = after.latency.count.saturating_sub(before.latency.count);
        let buckets: [u64; LATENCY_BUCKETS + 1] =
            std::array::from_fn(|i| after.latency.buckets[i].saturating_sub(before.latency.buckets[i]));
        let (mean, p50, p99) = if calls == 0 {
            (None, None, None)
        } else {
            let sum_micros = after.latency.sum_micros.saturating_sub(before.latency.sum_micros);
            (
                Some(sum_micros as f64 / calls as f64 / 1000.0),
                quantile(&buckets, 0.5).map(|seconds| seconds * 1000.0),
                quantile(&buckets, 0.99).map(|seconds| seconds * 1000.0),
            )
        };
        Self {
            uptime_ms: after.uptime_ms,
            sent_per_second: rate(before.sent, after.sent),
            received_per_second: rate(before.received, after.received),
            requests_per_second: calls as f64 / seconds,
            latency_mean_ms: mean,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            inbox_depth: after.inbox_depth,
            peers_up: after.peers_up,
        }
    }
}

/// The `q` quantile (0 to 1) of the durations counted in `buckets`, in seconds, by linear
/// interpolation inside the bucket it falls in (as Prometheus' `histogram_quantile` does). A
/// quantile in the last, unbounded bucket is reported as its lower bound. `None` when empty.
fn quantile(buckets: &[u64; LATENCY_BUCKETS + 1], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let bounds = latency_bucket_bounds();
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        if *count > 0 && (below + count) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let Some(upper) = bounds.get(i) else { return Some(lower) };
            let within = (rank - below as f64).max(0.0) / *count as f64;
            return Some(lower + (upper - lower) * within);
        }
        below += count;
    }
    Some(bounds[LATENCY_BUCKETS - 1])
}

/// The last [`CAPACITY`] samples, oldest first.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

/// The JSON document of `GET /history.json`.
#[derive(Serialize)]
struct HistoryDocument<'a> {
    interval_ms: u64,
    capacity: usize,
    samples: &'a VecDeque<Sample>,
}

impl History {
    /// Adds `sample`, dropping the oldest one when the history is full.
    pub(crate) fn push(&self, sample: Sample) {
        // A panic while holding the lock cannot leave the queue half-changed: use it anyway.
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() >= CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The history as JSON: `{"interval_ms": 1000, "capacity": 600, "samples": [...]}`, oldest
    /// sample first.
    pub(crate) fn to_json(&self) -> String {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let document = HistoryDocument {
            interval_ms: u64::try_from(INTERVAL.as_millis()).unwrap_or(u64::MAX),
            capacity: CAPACITY,
            samples: &samples,
        };
        serde_json::to_string(&document).unwrap_or_else(|error| {
            // Numbers and strings only: serializing them does not fail (NaN is not produced).
            tracing::warn!(%error, "encoding the history failed");
            String::from("{}")
        })
    }
}

/// Starts the task that adds a sample to `history` every [`INTERVAL`]. It holds the node
/// weakly, so it never keeps a node alive, and ends when the node stops (`shutdown` turns
/// true, or its sender is dropped with the node).
pub(crate) fn sample(
    node: Weak<dyn NodeView>,
    history: Arc<History>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(INTERVAL);
        // After a stall (a suspended machine, a busy runtime), one sample spans the gap rather
        // than a burst of samples a few microseconds apart.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut previous: Option<Reading> = None;
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stopped| *stopped) => return,
                _ = ticks.tick() => {}
            }
            let Some(driver) = node.upgrade() else { return };
            let reading = Reading::new(&driver.status(), driver.latency_totals());
            drop(driver);
            if let Some(previous) = &previous {
                history.push(Sample::between(previous, &reading));
            }
            previous = Some(reading);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(uptime_ms: u64, sent: u64, received: u64, latency: LatencyTotals) -> Reading {
        Reading { uptime_ms, sent, received, latency, inbox_depth: 3, peers_up: 2 }
    }

    #[test]
    fn a_sample_is_the_rate_between_two_readings() {
        let before = reading(10_000, 100, 50, LatencyTotals::default());
        let after = reading(12_000, 300, 51, LatencyTotals::default());
        let sample = Sample::between(&before, &after);
        assert_eq!(sample.uptime_ms, 12_000);
        assert_eq!(sample.sent_per_second, 100.0, "200 messages in 2 s");
        assert_eq!(sample.received_per_second, 0.5);
        assert_eq!(sample.requests_per_second, 0.0);
        assert_eq!(
            (sample.latency_mean_ms, sample.latency_p50_ms, sample.latency_p99_ms),
            (None, None, None)
        );
        assert_eq!((sample.inbox_depth, sample.peers_up), (3, 2), "gauges are the later reading's");
    }

    #[test]
    fn counts_that_go_down_and_readings_in_the_same_millisecond_give_finite_rates() {
        let before = reading(5_000, 10, 10, LatencyTotals::default());
        let after = reading(5_000, 4, 12, LatencyTotals::default());
        let sample = Sample::between(&before, &after);
        assert_eq!(sample.sent_per_second, 0.0);
        assert_eq!(sample.received_per_second, 2000.0, "2 messages over the 1 ms minimum");
    }

    #[test]
    fn latency_is_the_mean_and_quantiles_of_the_calls_that_ended_in_between() {
        let counts = LatencyCounts::default();
        counts.observe(Duration::from_millis(1));
        let before = reading(0, 0, 0, counts.totals());
        // 99 calls of 150 µs (the 2nd bucket: 100 to 200 µs) and one of 2 s.
        for _ in 0..99 {
            counts.observe(Duration::from_micros(150));
        }
        counts.observe(Duration::from_secs(2));
        let after = reading(1_000, 0, 0, counts.totals());
        let sample = Sample::between(&before, &after);
        assert_eq!(sample.requests_per_second, 100.0, "the call before the first reading is not counted");
        let mean = sample.latency_mean_ms.unwrap();
        assert!((mean - (99.0 * 0.15 + 2000.0) / 100.0).abs() < 1e-9, "{mean}");
        let p50 = sample.latency_p50_ms.unwrap();
        assert!((0.1..=0.2).contains(&p50), "the median is in the 100-200 µs bucket: {p50} ms");
        let p99 = sample.latency_p99_ms.unwrap();
        assert!((0.1..=0.2).contains(&p99), "99 of 100 calls are fast: {p99} ms");
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket_and_stop_at_the_last_bound() {
        let bounds = latency_bucket_bounds();
        let mut buckets = [0u64; LATENCY_BUCKETS + 1];
        buckets[3] = 4;
        // Ranks 1 to 4 spread evenly over (bounds[2], bounds[3]]: the median is half way.
        let median = quantile(&buckets, 0.5).unwrap();
        assert!((median - (bounds[2] + bounds[3]) / 2.0).abs() < 1e-12, "{median}");
        assert_eq!(quantile(&buckets, 1.0), Some(bounds[3]));
        let mut slow = [0u64; LATENCY_BUCKETS + 1];
        slow[LATENCY_BUCKETS] = 1;
        assert_eq!(quantile(&slow, 0.99), Some(bounds[LATENCY_BUCKETS - 1]), "above the last bound");
        assert_eq!(quantile(&[0; LATENCY_BUCKETS + 1], 0.5), None);
    }

    #[test]
    fn the_history_keeps_the_last_capacity_samples_oldest_first() {
        let history = History::default();
        let empty = reading(0, 0, 0, LatencyTotals::default());
        for second in 1..=(CAPACITY as u64 + 5) {
            let next = reading(second * 1000, second, 0, LatencyTotals::default());
            history.push(Sample::between(&empty, &next));
        }
        let json: serde_json::Value = serde_json::from_str(&history.to_json()).unwrap();
        assert_eq!(json["interval_ms"], 1000);
        assert_eq!(json["capacity"], CAPACITY);
        let samples = json["samples"].as_array().unwrap();
        assert_eq!(samples.len(), CAPACITY);
        assert_eq!(samples[0]["uptime_ms"], 6_000, "the 5 oldest were dropped");
        assert_eq!(samples[CAPACITY - 1]["uptime_ms"], (CAPACITY as u64 + 5) * 1000);
        assert_eq!(samples[0]["latency_mean_ms"], serde_json::Value::Null);
    }
}

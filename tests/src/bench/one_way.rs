//! One-way runs of the broker benchmarks (AMQP, NATS, PostgreSQL): a sender keeps a window of
//! sends in flight, a receiver takes every message, and each message carries its send time in
//! its first 8 bytes, so that the receiver measures one-way latency under load. Throughput is
//! measured from the first send to the last receive. The raw-client variants of those
//! benchmarks use the same payloads and summaries, so comms and the raw client are measured alike.

use futures::StreamExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Messages per second, first send to last receive.
    pub per_second: f64,
    /// One-way latency percentiles, µs (NaN when the run measured none).
    pub p50_us: f64,
    /// See `p50_us`.
    pub p99_us: f64,
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A payload of `size` bytes (at least 8) stamped with the current time.
pub fn stamped_payload(size: usize) -> Vec<u8> {
    let mut payload = vec![0x5a; size.max(8)];
    payload[..8].copy_from_slice(&now_nanos().to_be_bytes());
    payload
}

/// Nanoseconds since `payload` was stamped by [`stamped_payload`].
pub fn latency_nanos(payload: &[u8]) -> u64 {
    let sent = payload.get(..8).and_then(|bytes| bytes.try_into().ok()).map_or(0, u64::from_be_bytes);
    now_nanos().saturating_sub(sent)
}

/// A run of `messages` that took `elapsed`, with one-way latencies in nanoseconds.
pub fn summarize(elapsed: Duration, messages: usize, mut latencies: Vec<u64>) -> Run {
    latencies.sort_unstable();
    let at = |q: f64| match latencies.len() {
        0 => f64::NAN,
        n => latencies[((n - 1) as f64 * q) as usize] as f64 / 1000.0,
    };
    Run { per_second: messages as f64 / elapsed.as_secs_f64(), p50_us: at(0.5), p99_us: at(0.99) }
}

/// The median run by throughput, with the lowest and highest throughput of all.
pub fn median(mut runs: Vec<Run>) -> (Run, f64, f64) {
    runs.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    (runs[runs.len() / 2], runs[0].per_second, runs[runs.len() - 1].per_second)
}

/// Prints the header of the table that [`print_row`] fills.
pub fn print_header() {
    println!("| variant | payload | msg/s (min-max) | MB/s | one-way p50 | one-way p99 |");
    println!("|---|---|---|---|---|---|");
}

/// Prints the median of `runs` as a table row; returns its throughput.
pub fn print_row(variant: &str, size: usize, runs: Vec<Run>) -> f64 {
    let (run, low, high) = median(runs);
    println!(
        "| {variant} | {size} B | {:.0} ({low:.0}-{high:.0}) | {:.2} | {:.0} µs | {:.0} µs |",
        run.per_second,
        run.per_second * size as f64 / 1e6,
        run.p50_us,
        run.p99_us
    );
    run.per_second
}

/// Sends `messages` stamped payloads of `size` bytes from `sender` to node `to` with `window`
/// sends in flight ([`comms_host::Node::send_raw`], each complete when the transport says the
/// message is stored), while `receiver` takes them all, one [`comms_host::Node::receive_envelope`]
/// each; closes both nodes.
pub async fn through_nodes(
    sender: comms_host::Node,
    receiver: comms_host::Node,
    to: &str,
    size: usize,
    messages: usize,
    window: usize,
) -> Result<Run, String> {
    let started = Instant::now();
    let receiving = receive_in_background(receiver, messages, 1);
    publish_only(&sender, to, size, messages, window).await?;
    finish(started, sender, receiving, messages).await
}

/// As [`through_nodes`], in the shape of a program that writes and reads in batches: the sender
/// sends `batch` per [`comms_host::Node::send_raw_many`] call, one call after the other (see
/// [`publish_batched`]), and the receiver takes up to `take` at a time with
/// [`comms_host::Node::receive_envelopes`].
pub async fn through_nodes_batched(
    sender: comms_host::Node,
    receiver: comms_host::Node,
    to: &str,
    size: usize,
    messages: usize,
    batch: usize,
    take: usize,
) -> Result<Run, String> {
    let started = Instant::now();
    let receiving = receive_in_background(receiver, messages, take);
    publish_batched(&sender, to, size, messages, batch).await?;
    finish(started, sender, receiving, messages).await
}

type Receiving = tokio::task::JoinHandle<Result<Vec<u64>, String>>;

/// Takes `messages` stamped messages at `receiver` (one `receive_envelope` each when `take` is
/// 1, else `receive_envelopes(take)`), then closes it; their one-way latencies.
fn receive_in_background(receiver: comms_host::Node, messages: usize, take: usize) -> Receiving {
    tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(messages);
        while latencies.len() < messages {
            let failed = |error| format!("receiving message {}: {error}", latencies.len());
            if take == 1 {
                let envelope = receiver.receive_envelope().await.map_err(failed)?;
                latencies.push(latency_nanos(envelope.payload.as_slice()));
            } else {
                let wanted = take.min(messages - latencies.len());
                let envelopes = receiver.receive_envelopes(wanted).await.map_err(failed)?;
                latencies.extend(envelopes.iter().map(|envelope| latency_nanos(envelope.payload.as_slice())));
            }
        }
        receiver.close().await.map_err(|error| format!("closing the receiver: {error}"))?;
        Ok(latencies)
    })
}

/// Waits for the receiver, closes the sender and sums the run up.
async fn finish(
    started: Instant,
    sender: comms_host::Node,
    receiving: Receiving,
    messages: usize,
) -> Result<Run, String> {
    let latencies = receiving.await.map_err(|error| format!("receiving task: {error}"))??;
    let elapsed = started.elapsed();
    sender.close().await.map_err(|error| format!("closing the sender: {error}"))?;
    Ok(summarize(elapsed, messages, latencies))
}

/// Sends `messages` payloads of `size` bytes from `sender` to node `to` with `window` sends in
/// flight and returns the rate (messages per second) at which the sends completed.
pub async fn publish_only(
    sender: &comms_host::Node,
    to: &str,
    size: usize,
    messages: usize,
    window: usize,
) -> Result<f64, String> {
    let headers = vec![("content-type".to_string(), super::RAW_CONTENT_TYPE.to_string())];
    let started = Instant::now();
    let sent: Vec<Result<(), String>> = futures::stream::iter(0..messages)
        .map(|n| {
            let (headers, payload) = (headers.clone(), stamped_payload(size));
            async move {
                sender
                    .send_raw(to, headers, payload, None)
                    .await
                    .map(drop)
                    .map_err(|error| format!("sending message {n}: {error}"))
            }
        })
        .buffer_unordered(window)
        .collect()
        .await;
    sent.into_iter().collect::<Result<(), String>>()?;
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Sends `messages` payloads of `size` bytes from `sender` to node `to`, `batch` per
/// [`comms_host::Node::send_raw_many`] call, one call after the other; the rate at which the
/// sends completed.
pub async fn publish_batched(
    sender: &comms_host::Node,
    to: &str,
    size: usize,
    messages: usize,
    batch: usize,
) -> Result<f64, String> {
    let headers = vec![("content-type".to_string(), super::RAW_CONTENT_TYPE.to_string())];
    let started = Instant::now();
    let mut sent = 0;
    while sent < messages {
        let now = batch.min(messages - sent);
        let payloads: Vec<Vec<u8>> = (0..now).map(|_| stamped_payload(size)).collect();
        sender
            .send_raw_many(to, headers.clone(), payloads)
            .await
            .map_err(|error| format!("sending messages {sent}..{}: {error}", sent + now))?;
        sent += now;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Takes `messages` messages at `receiver` and returns the rate at which they came.
pub async fn receive_only(receiver: &comms_host::Node, messages: usize) -> Result<f64, String> {
    let started = Instant::now();
    for n in 0..messages {
        receiver.receive_envelope().await.map_err(|error| format!("receiving message {n}: {error}"))?;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_as_a_small_latency_and_a_median_is_the_middle_run() {
        let payload = stamped_payload(3);
        assert_eq!(payload.len(), 8, "a payload holds at least its stamp");
        assert!(latency_nanos(&payload) < 10_000_000_000);
        // Too short to hold a stamp: counted from the epoch, so it stands out, never panics.
        assert!(latency_nanos(&[1, 2]) > 1_000_000_000 * 3600 * 24 * 365);
        let run = |per_second| Run { per_second, p50_us: 1.0, p99_us: 2.0 };
        let (middle, low, high) = median(vec![run(5.0), run(1.0), run(3.0)]);
        assert_eq!((middle.per_second, low, high), (3.0, 1.0, 5.0));
        let summary = summarize(Duration::from_secs(2), 10, vec![3_000, 1_000, 2_000]);
        assert_eq!(summary.per_second, 5.0);
        assert_eq!(summary.p50_us, 2.0);
    }
}

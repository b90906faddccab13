//! What every benchmark program shares: the `COMMS_BENCH_SCALE` setting, time-limited steps,
//! failing with a message instead of hanging, percentiles; [`one_way`] the windowed one-way runs
//! of the broker benchmarks.

pub mod one_way;

use std::{future::Future, time::Duration};

/// The `COMMS_BENCH_SCALE` multiplier for message counts (default 1). Ends the program with a
/// message when it is not a positive number.
pub fn scale(bench: &str) -> f64 {
    match std::env::var("COMMS_BENCH_SCALE") {
        Err(_) => 1.0,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(scale) if scale.is_finite() && scale > 0.0 => scale,
            _ => fail(bench, &format!("COMMS_BENCH_SCALE must be a positive number, not `{text}`")),
        },
    }
}

/// The `COMMS_BENCH_PLUGIN_THREADS` setting: worker threads for the loaded plugin's runtime, for
/// [`comms_host::PluginLibrary::load_with_threads`] (0, the default: the plugin's own default).
/// Ends the program with a message when it is not a number.
pub fn plugin_threads(bench: &str) -> u32 {
    match std::env::var("COMMS_BENCH_PLUGIN_THREADS") {
        Err(_) => 0,
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            fail(bench, &format!("COMMS_BENCH_PLUGIN_THREADS must be a number of threads, not `{text}`"))
        }),
    }
}

/// The payload sizes to measure: `defaults`, or the comma-separated byte counts of
/// `COMMS_BENCH_PAYLOADS` (`COMMS_BENCH_PAYLOADS=64` measures 64 B only). Ends the program with
/// a message when an entry is not a number.
pub fn payload_sizes(bench: &str, defaults: &[usize]) -> Vec<usize> {
    match std::env::var("COMMS_BENCH_PAYLOADS") {
        Err(_) => defaults.to_vec(),
        Ok(list) => list
            .split(',')
            .map(|size| {
                size.trim().parse().unwrap_or_else(|_| {
                    fail(bench, &format!("COMMS_BENCH_PAYLOADS must list byte counts, not `{list}`"))
                })
            })
            .collect(),
    }
}

/// `count` times `scale`, at least 1.
pub fn scaled(count: usize, scale: f64) -> usize {
    ((count as f64 * scale).round() as usize).max(1)
}

/// Ends the benchmark `bench` with a message, without waiting for tasks that may be stuck.
pub fn fail(bench: &str, message: &str) -> ! {
    eprintln!("{bench} benchmark failed: {message}");
    std::process::exit(1)
}

/// Runs `work` on a tokio runtime of 2 workers, spawned (so that the benchmark itself runs on
/// the workers and not on the main thread), and shuts the runtime down (waiting 1 s at most for
/// tasks that may be stuck); its result, or the end of the program with a message naming
/// `bench`.
pub fn run_on_two_workers<T: Send + 'static>(
    bench: &str,
    work: impl Future<Output = Result<T, String>> + Send + 'static,
) -> T {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|error| fail(bench, &format!("starting the tokio runtime: {error}")));
    let outcome = runtime.block_on(async move { tokio::spawn(work).await });
    let value = match outcome {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => fail(bench, &error),
        Err(error) => fail(bench, &format!("the benchmark task panicked: {error}")),
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    value
}

/// Runs one step of a benchmark under a time limit; the error names the step.
pub async fn step<T>(
    what: &str,
    limit: Duration,
    work: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!("{what}: not done within {} s; the benchmark is stuck", limit.as_secs())),
    }
}

/// The `percent` percentile of sorted durations, in microseconds (NaN when empty).
pub fn percentile_micros(sorted: &[Duration], percent: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile_micros(&sorted, 50), 50.0);
        assert_eq!(percentile_micros(&sorted, 99), 99.0);
        assert!(percentile_micros(&[], 50).is_nan());
        assert_eq!(scaled(1000, 0.25), 250);
        assert_eq!(scaled(1, 0.01), 1);
    }
}

/// The content type the node pairs' messages carry: raw bytes, no codec.
pub const RAW_CONTENT_TYPE: &str = "application/octet-stream";

/// Two comms nodes, built by the caller over any transport: `sender` sends to `receiver`, which
/// answers pings. Shared by the benchmarks that compare variants of one transport.
#[derive(Debug)]
pub struct NodePair {
    sender: comms_host::Node,
    receiver: comms_host::Node,
    receiver_id: comms_host::NodeId,
    headers: Vec<(String, String)>,
}

impl NodePair {
    /// A pair of built nodes; `sender` must reach `receiver_id`.
    pub fn new(sender: comms_host::Node, receiver: comms_host::Node, receiver_id: &str) -> Self {
        let headers = vec![("content-type".to_string(), RAW_CONTENT_TYPE.to_string())];
        Self { sender, receiver, receiver_id: comms_host::NodeId::new(receiver_id), headers }
    }

    /// A task that takes `count` messages at the receiver, each checked for its size, one at a
    /// time (`batch` `None`) or up to `batch` per [`comms_host::Node::receive_envelopes`] call;
    /// it ends with the time the last one arrived.
    fn count_received(
        &self,
        count: usize,
        expected: usize,
        batch: Option<usize>,
    ) -> tokio::task::JoinHandle<Result<std::time::Instant, String>> {
        let receiver = self.receiver.clone();
        // Each message is looked at where it lies (as an application reading payloads would),
        // not moved out of the received vector, and a single receive builds no vector.
        let check = move |n: usize, envelope: &comms_host::Envelope| {
            if envelope.payload.len() == expected {
                Ok(())
            } else {
                Err(format!("message {n} has {} bytes, expected {expected}", envelope.payload.len()))
            }
        };
        tokio::spawn(async move {
            let mut n = 0;
            while n < count {
                let received = |error| format!("receiving message {n}: {error}");
                match batch {
                    None => {
                        check(n, &receiver.receive_envelope().await.map_err(received)?)?;
                        n += 1;
                    }
                    Some(batch) => {
                        let envelopes =
                            receiver.receive_envelopes(batch.min(count - n)).await.map_err(received)?;
                        for envelope in &envelopes {
                            check(n, envelope)?;
                            n += 1;
                        }
                    }
                }
            }
            Ok(std::time::Instant::now())
        })
    }

    /// Sends `count` messages of `payload` one after another; the time until the receiver has
    /// them all (each checked for its size).
    pub async fn throughput(&self, count: usize, payload: &[u8]) -> Result<Duration, String> {
        let counter = self.count_received(count, payload.len(), None);
        // One buffer shared by every message, as the raw baseline writes every frame from one
        // slice: the comparison is of the paths, not of allocating payloads.
        let payload = comms_host::Payload::from(payload.to_vec());
        let start = std::time::Instant::now();
        for n in 0..count {
            self.sender
                .send_raw(self.receiver_id.clone(), self.headers.clone(), payload.clone(), None)
                .await
                .map_err(|error| format!("sending message {n}: {error}"))?;
        }
        let end = counter.await.map_err(|error| format!("receiving task: {error}"))??;
        Ok(end - start)
    }

    /// As [`NodePair::throughput`], the sender handing `batch` messages at a time to
    /// [`comms_host::Node::send_raw_many`] (one crossing of the plugin boundary per batch) and
    /// the receiver taking up to `batch` at a time with
    /// [`comms_host::Node::receive_envelopes`] (one step through its engine per batch).
    pub async fn throughput_batched(
        &self,
        count: usize,
        payload: &[u8],
        batch: usize,
    ) -> Result<Duration, String> {
        let counter = self.count_received(count, payload.len(), Some(batch));
        let payload = comms_host::Payload::from(payload.to_vec());
        let start = std::time::Instant::now();
        let mut sent = 0;
        while sent < count {
            let now = batch.min(count - sent);
            let payloads = (0..now).map(|_| payload.clone());
            self.sender
                .send_raw_many(self.receiver_id.clone(), self.headers.clone(), payloads)
                .await
                .map_err(|error| format!("sending messages {sent}..{}: {error}", sent + now))?;
            sent += now;
        }
        let end = counter.await.map_err(|error| format!("receiving task: {error}"))??;
        Ok(end - start)
    }

    /// `count` round trips one at a time (the receiver answers each); appends each round-trip
    /// time to `rtts`.
    pub async fn ping_pong(
        &self,
        count: usize,
        payload: &[u8],
        rtts: &mut Vec<Duration>,
    ) -> Result<(), String> {
        let echo = {
            let node = self.receiver.clone();
            let headers = self.headers.clone();
            tokio::spawn(async move {
                for n in 0..count {
                    let ping = node
                        .receive_envelope()
                        .await
                        .map_err(|error| format!("receiving ping {n}: {error}"))?;
                    node.send_raw(ping.from, headers.clone(), ping.payload, Some(ping.id))
                        .await
                        .map_err(|error| format!("sending pong {n}: {error}"))?;
                }
                Ok::<(), String>(())
            })
        };
        let shared = comms_host::Payload::from(payload.to_vec());
        for n in 0..count {
            let start = std::time::Instant::now();
            let id = self
                .sender
                .send_raw(self.receiver_id.clone(), self.headers.clone(), shared.clone(), None)
                .await
                .map_err(|error| format!("sending ping {n}: {error}"))?;
            let pong = self
                .sender
                .receive_envelope()
                .await
                .map_err(|error| format!("receiving pong {n}: {error}"))?;
            rtts.push(start.elapsed());
            if pong.correlation_id != Some(id) || pong.payload.len() != payload.len() {
                return Err(format!("pong {n} does not answer ping {n}"));
            }
        }
        echo.await.map_err(|error| format!("echo task: {error}"))?
    }

    /// Closes both nodes.
    pub async fn close(&self) -> Result<(), String> {
        self.sender.close().await.map_err(|error| format!("closing the sender: {error}"))?;
        self.receiver.close().await.map_err(|error| format!("closing the receiver: {error}"))
    }
}

/// Two transports of one plugin driven directly through the host-side API
/// ([`comms_plugin_api::host_side::LoadedTransport`]), without a `Node`: `sender` sends to
/// `receiver`, which answers pings. It measures the plugin boundary and the transport alone,
/// with single awaited sends or with batched sends
/// ([`comms_plugin_api::host_side::LoadedTransport::send_batch`]).
///
/// Every message carries the same payload buffer (cloning a payload shares it), as a program
/// sending one prepared buffer would; the envelope's ids and names are its own.
#[derive(Debug)]
pub struct TransportPair {
    sender: std::sync::Arc<comms_plugin_api::host_side::LoadedTransport>,
    receiver: std::sync::Arc<comms_plugin_api::host_side::LoadedTransport>,
    sender_id: comms_host::NodeId,
    receiver_id: comms_host::NodeId,
    /// Where the sender reaches the receiver, and the receiver the sender.
    receiver_address: String,
    sender_address: String,
    next_id: u128,
}

impl TransportPair {
    /// Two transports of `library`, each with its own config table (TOML text).
    pub async fn start(
        library: &comms_host::PluginLibrary,
        instance: &str,
        sender_config: &str,
        receiver_config: &str,
    ) -> Result<Self, String> {
        let sender_id = comms_host::NodeId::new(format!("{instance}-sender"));
        let receiver_id = comms_host::NodeId::new(format!("{instance}-receiver"));
        let sender = library
            .new_transport(&sender_id, instance, sender_config)
            .await
            .map_err(|error| format!("starting the sending transport: {error}"))?;
        let receiver = library
            .new_transport(&receiver_id, instance, receiver_config)
            .await
            .map_err(|error| format!("starting the receiving transport: {error}"))?;
        Ok(Self {
            sender_address: sender.info().local_address.clone(),
            receiver_address: receiver.info().local_address.clone(),
            sender: std::sync::Arc::new(sender),
            receiver: std::sync::Arc::new(receiver),
            sender_id,
            receiver_id,
            next_id: 1,
        })
    }

    fn envelope(&mut self, payload: &comms_host::Payload) -> comms_host::Envelope {
        self.next_id += 1;
        comms_host::Envelope::new(
            comms_host::MessageId::from_u128(self.next_id),
            self.sender_id.clone(),
            comms_plugin_api::Destination::Node(self.receiver_id.clone()),
            payload.clone(),
        )
    }

    /// Sends `count` messages of `payload`, one awaited `send` each (`batch` `None`) or in
    /// batches of `batch` items; the time until the receiver has them all (each checked for
    /// its size).
    pub async fn throughput(
        &mut self,
        count: usize,
        payload: &[u8],
        batch: Option<usize>,
    ) -> Result<Duration, String> {
        let receiver = std::sync::Arc::clone(&self.receiver);
        let expected = payload.len();
        let counter = tokio::spawn(async move {
            let mut received = 0;
            while received < count {
                let batch = receiver
                    .receive(1024)
                    .await
                    .map_err(|error| format!("receiving message {received}: {error}"))?;
                if batch.is_empty() {
                    return Err(format!("the receiver closed after {received} messages"));
                }
                for inbound in &batch {
                    if inbound.envelope.payload.len() != expected {
                        return Err(format!(
                            "message {received} has {} bytes, expected {expected}",
                            inbound.envelope.payload.len()
                        ));
                    }
                    received += 1;
                }
            }
            Ok(std::time::Instant::now())
        });
        let payload = comms_host::Payload::from(payload.to_vec());
        let start = std::time::Instant::now();
        match batch {
            None => {
                for n in 0..count {
                    let envelope = self.envelope(&payload);
                    self.sender
                        .send(&self.receiver_address, envelope)
                        .await
                        .map_err(|error| format!("sending message {n}: {error}"))?;
                }
            }
            Some(size) => {
                let address = comms_plugin_api::Text::from(self.receiver_address.as_str());
                let mut sent = 0;
                while sent < count {
                    let items: Vec<comms_plugin_api::Outbound> = (0..size.min(count - sent))
                        .map(|_| comms_plugin_api::Outbound {
                            address: address.clone(),
                            envelope: self.envelope(&payload),
                        })
                        .collect();
                    let items_in_batch = items.len();
                    if let Some(failure) = self.sender.send_batch(items).await.first() {
                        return Err(format!("sending message {}: {}", sent + failure.index, failure.error));
                    }
                    sent += items_in_batch;
                }
            }
        }
        let end = counter.await.map_err(|error| format!("receiving task: {error}"))??;
        Ok(end - start)
    }

    /// `count` round trips one at a time (the receiver answers each with a message of the same
    /// payload correlated to the ping); appends each round-trip time to `rtts`.
    pub async fn ping_pong(
        &mut self,
        count: usize,
        payload: &[u8],
        rtts: &mut Vec<Duration>,
    ) -> Result<(), String> {
        let echo = {
            let receiver = std::sync::Arc::clone(&self.receiver);
            let address = self.sender_address.clone();
            let (from, to) = (self.receiver_id.clone(), self.sender_id.clone());
            tokio::spawn(async move {
                let mut answered = 0;
                while answered < count {
                    let pings = receiver
                        .receive(16)
                        .await
                        .map_err(|error| format!("receiving ping {answered}: {error}"))?;
                    if pings.is_empty() {
                        return Err(format!("the receiver closed after {answered} pings"));
                    }
                    for ping in pings {
                        let pong = comms_host::Envelope::new(
                            comms_host::MessageId::from_u128(u128::MAX - ping.envelope.id.as_u128()),
                            from.clone(),
                            comms_plugin_api::Destination::Node(to.clone()),
                            ping.envelope.payload,
                        )
                        .with_correlation_id(Some(ping.envelope.id));
                        receiver
                            .send(&address, pong)
                            .await
                            .map_err(|error| format!("sending pong {answered}: {error}"))?;
                        answered += 1;
                    }
                }
                Ok::<(), String>(())
            })
        };
        let payload = comms_host::Payload::from(payload.to_vec());
        for n in 0..count {
            let ping = self.envelope(&payload);
            let id = ping.id;
            let start = std::time::Instant::now();
            self.sender
                .send(&self.receiver_address, ping)
                .await
                .map_err(|error| format!("sending ping {n}: {error}"))?;
            let pongs =
                self.sender.receive(1).await.map_err(|error| format!("receiving pong {n}: {error}"))?;
            rtts.push(start.elapsed());
            match pongs.first() {
                Some(pong)
                    if pong.envelope.correlation_id == Some(id)
                        && pong.envelope.payload.len() == payload.len() => {}
                _ => return Err(format!("pong {n} does not answer ping {n}")),
            }
        }
        echo.await.map_err(|error| format!("echo task: {error}"))?
    }

    /// Closes both transports.
    pub async fn close(&self) -> Result<(), String> {
        self.sender.close().await.map_err(|error| format!("closing the sender: {error}"))?;
        self.receiver.close().await.map_err(|error| format!("closing the receiver: {error}"))
    }
}

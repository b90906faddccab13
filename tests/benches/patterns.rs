//! Request/response and publish/subscribe fan-out of comms over the TCP plugin on loopback.
//!
//! Run it with
//!
//! ```text
//! cargo bench -p comms-tests --bench patterns
//! COMMS_BENCH_SCALE=0.1 cargo bench -p comms-tests --bench patterns   # quicker, noisier
//! ```
//!
//! Every node is a separate [`Node`] in this process with its own TCP transport from
//! `libcomms_tcp.so`, loaded with [`PluginLibrary::load`] as users get it, listening on a free
//! loopback port and wired to its peers by static discovery. Liveness is on (a heartbeat every
//! 200 ms, peers down after 5 s of silence), and every measurement starts only once the
//! services or subscriptions it needs have been announced (the caller's `peers()` shows them).
//! Payloads are 64 bytes (`Vec<u8>`, through the default binary codec). It prints two tables (to
//! stdout; progress goes to stderr):
//!
//! - **request/response**: a server node serves an echo service (`Received<Vec<u8>>` answered
//!   with the same bytes), a client node calls it with [`Node::request_with`] (one attempt,
//!   10 s timeout: a failure is reported, not retried away). With 1 requester and with 64
//!   requesters (tokio tasks sharing clones of the client `Node`), the same total number of
//!   requests is made; reported are round trips per second (total requests over the wall time
//!   from the first request to the last response) and the 50th/99th percentile of the round-trip
//!   latency in microseconds. Every echo is checked against its request;
//! - **publish/subscribe fan-out**: one publisher node and 1 or 10 subscriber nodes, each
//!   subscribed to `bench.>`; the publisher publishes N messages on `bench.x` as fast as
//!   [`Node::publish`] returns. Reported are the publish rate (N over the publisher's loop), the
//!   delivered rate (N times the subscribers, over the time from the first publish until the
//!   last subscriber has received all N) and the 50th/99th percentile of the publish→receive
//!   latency over all deliveries: the payload carries the send time (nanoseconds since a base
//!   `Instant` shared by the whole process), the receiving task subtracts it from its own clock.
//!   Under a full-speed burst this latency is mostly queueing, not the latency of a lone message.
//!
//! Counts: 20,000 requests per requester setting and 20,000 published messages per fan-out
//! setting, each multiplied by the environment variable `COMMS_BENCH_SCALE` (a float, default 1),
//! each after a warm-up of a tenth as many (at least 200) that is not measured.
//!
//! Everything runs on a tokio multi-thread runtime with 2 workers (each TCP plugin also runs its
//! own runtime, as it always does). Every step has a time limit: a stuck benchmark ends with exit
//! code 1 and a message naming the step instead of hanging.

use comms_host::{Node, PeerStatus, PluginLibrary, Received, RequestOptions, Subscription};
use std::{
    convert::Infallible,
    future::Future,
    time::{Duration, Instant},
};

/// Payload size, in bytes.
const PAYLOAD_BYTES: usize = 64;
/// Concurrent requesters measured.
const REQUESTERS: [usize; 2] = [1, 64];
/// Subscriber nodes measured.
const SUBSCRIBERS: [usize; 2] = [1, 10];
/// The echo service.
const SERVICE: &str = "bench.echo";
/// Where the fan-out publishes.
const TOPIC: &str = "bench.x";
/// What the subscribers subscribe to.
const PATTERN: &str = "bench.>";
/// Liveness of every node.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one request (a single attempt).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of one step (setup, announcements, one warm-up, one measurement, closing),
/// multiplied by the scale when above 1.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// Time limit of waiting for announcements (heartbeats every 200 ms bring them).
const ANNOUNCE_LIMIT: Duration = Duration::from_secs(15);
/// How often `peers()` is polled while waiting for announcements.
const POLL: Duration = Duration::from_millis(20);
/// The TCP plugin's configuration: any free loopback port.
const TCP_CONFIG: &str = r#"listen = "127.0.0.1:0""#;

/// Counts and limits, from the environment.
#[derive(Debug, Clone, Copy)]
struct Settings {
    scale: f64,
    requests: usize,
    messages: usize,
    step_limit: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let scale = match std::env::var("COMMS_BENCH_SCALE") {
            Err(_) => 1.0,
            Ok(text) => match text.trim().parse::<f64>() {
                Ok(scale) if scale.is_finite() && scale > 0.0 => scale,
                _ => fail(&format!("COMMS_BENCH_SCALE must be a positive number, not `{text}`")),
            },
        };
        Self {
            scale,
            requests: scaled(20_000, scale),
            messages: scaled(20_000, scale),
            step_limit: STEP_LIMIT.mul_f64(scale.max(1.0)),
        }
    }

    fn warm_up_requests(&self) -> usize {
        (self.requests / 10).max(200)
    }

    fn warm_up_messages(&self) -> usize {
        (self.messages / 10).max(200)
    }
}

fn scaled(count: usize, scale: f64) -> usize {
    ((count as f64 * scale).round() as usize).max(1)
}

/// Ends the benchmark with a message, without waiting for tasks that may be stuck.
fn fail(message: &str) -> ! {
    eprintln!("patterns benchmark failed: {message}");
    std::process::exit(1)
}

/// Runs one step under a time limit.
async fn step<T>(
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

/// Builds a node with one TCP transport from `library`, knowing `peers`.
async fn build_node(id: &str, library: &PluginLibrary, peers: &[&Node]) -> Result<Node, String> {
    let mut builder = Node::builder(id).liveness(Some(HEARTBEAT_INTERVAL), PEER_TIMEOUT).transport_library(
        "tcp",
        library.clone(),
        TCP_CONFIG,
    );
    for peer in peers {
        let address = peer.transports()[0].local_address.clone();
        builder = builder.static_peer(peer.id().as_str(), [("tcp", address.as_str())]);
    }
    builder.build().await.map_err(|error| format!("building node {id}: {error}"))
}

/// Polls `node.peers()` until `ready` says yes.
async fn until(node: &Node, ready: impl Fn(&Node) -> bool) -> Result<(), String> {
    while !ready(node) {
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Live peers of `node` whose record satisfies `matches`.
fn live_peers(node: &Node, matches: impl Fn(&comms_host::NodeRecord) -> bool) -> usize {
    node.peers().iter().filter(|peer| peer.status == PeerStatus::Up && matches(&peer.record)).count()
}

/// A payload of [`PAYLOAD_BYTES`] with two numbers in its first 16 bytes.
fn payload(buffer: &mut [u8], first: u64, second: u64) {
    buffer[..8].copy_from_slice(&first.to_le_bytes());
    buffer[8..16].copy_from_slice(&second.to_le_bytes());
}

fn field(bytes: &[u8], index: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
    u64::from_le_bytes(word)
}

/// The `percent` percentile (nearest rank) of sorted samples, in microseconds.
fn percentile(sorted: &[Duration], percent: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// One line of the request/response table.
#[derive(Debug)]
struct RequestRow {
    requesters: usize,
    requests: usize,
    elapsed: Duration,
    p50_micros: f64,
    p99_micros: f64,
}

/// Makes `total` echo requests from `requesters` tasks sharing `client`; returns the wall time
/// and every round-trip time.
async fn run_requests(
    client: &Node,
    requesters: usize,
    total: usize,
) -> Result<(Duration, Vec<Duration>), String> {
    let options = RequestOptions { timeout: REQUEST_TIMEOUT, attempts: 1, backoff: Duration::ZERO };
    let start = Instant::now();
    let tasks: Vec<_> = (0..requesters)
        .map(|requester| {
            let count = total / requesters + usize::from(requester < total % requesters);
            let client = client.clone();
            let options = options.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count);
                let mut request = vec![0u8; PAYLOAD_BYTES];
                for n in 0..count {
                    payload(&mut request, requester as u64, n as u64);
                    let sent = Instant::now();
                    let echo: Vec<u8> = client
                        .request_with(SERVICE, &request, &options)
                        .await
                        .map_err(|error| format!("requester {requester}, request {n}: {error}"))?;
                    latencies.push(sent.elapsed());
                    if echo != request {
                        return Err(format!("requester {requester}, request {n}: the echo differs"));
                    }
                }
                Ok::<_, String>((latencies, Instant::now()))
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    let mut end = start;
    for task in tasks {
        let (latencies, done) = task.await.map_err(|error| format!("requester task: {error}"))??;
        all.extend(latencies);
        end = end.max(done);
    }
    Ok((end - start, all))
}

async fn request_response(settings: Settings, library: PluginLibrary) -> Result<Vec<RequestRow>, String> {
    let limit = settings.step_limit;
    let (server, client) = step("request/response: starting the nodes", limit, async {
        let server = build_node("rr-server", &library, &[]).await?;
        server
            .serve(SERVICE, |request: Received<Vec<u8>>| async move { Ok::<_, Infallible>(request.message) })
            .await
            .map_err(|error| format!("serving {SERVICE}: {error}"))?;
        let client = build_node("rr-client", &library, &[&server]).await?;
        Ok((server, client))
    })
    .await?;
    step(
        &format!("request/response: waiting for the client to learn of service `{SERVICE}`"),
        ANNOUNCE_LIMIT,
        until(&client, |client| live_peers(client, |r| r.services.iter().any(|s| s == SERVICE)) > 0),
    )
    .await?;
    let mut rows = Vec::new();
    for requesters in REQUESTERS {
        eprintln!("request/response, {requesters} requester(s): warming up");
        let what = format!("request/response, {requesters} requester(s): warm-up");
        step(&what, limit, run_requests(&client, requesters, settings.warm_up_requests())).await?;
        eprintln!("request/response, {requesters} requester(s): {} requests", settings.requests);
        let what = format!("request/response, {requesters} requester(s): measurement");
        let (elapsed, mut latencies) =
            step(&what, limit, run_requests(&client, requesters, settings.requests)).await?;
        latencies.sort();
        rows.push(RequestRow {
            requesters,
            requests: settings.requests,
            elapsed,
            p50_micros: percentile(&latencies, 50),
            p99_micros: percentile(&latencies, 99),
        });
    }
    step("request/response: closing the client", limit, async {
        client.close().await.map_err(|error| error.to_string())
    })
    .await?;
    step("request/response: closing the server", limit, async {
        server.close().await.map_err(|error| error.to_string())
    })
    .await?;
    Ok(rows)
}

/// One line of the fan-out table.
#[derive(Debug)]
struct FanOutRow {
    subscribers: usize,
    messages: usize,
    publish_time: Duration,
    delivery_time: Duration,
    p50_micros: f64,
    p99_micros: f64,
    /// Deliveries whose sequence number was not the next expected one.
    out_of_order: usize,
}

/// What one publishing phase measured, with the subscriptions handed back.
struct Phase {
    subscriptions: Vec<Subscription<Vec<u8>>>,
    publish_time: Duration,
    delivery_time: Duration,
    latencies: Vec<Duration>,
    out_of_order: usize,
}

/// Publishes `count` messages and waits until every subscription has received them all.
async fn publish_phase(
    publisher: &Node,
    subscriptions: Vec<Subscription<Vec<u8>>>,
    count: usize,
    base: Instant,
) -> Result<Phase, String> {
    let subscribers = subscriptions.len();
    let receivers: Vec<_> = subscriptions
        .into_iter()
        .enumerate()
        .map(|(index, mut subscription)| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count);
                let mut out_of_order = 0;
                for n in 0..count {
                    let received = match subscription.next().await {
                        Some(Ok(received)) => received,
                        Some(Err(error)) => return Err(format!("subscriber {index}, message {n}: {error}")),
                        None => {
                            return Err(format!("subscriber {index}: subscription ended after {n} messages"))
                        }
                    };
                    let now = base.elapsed();
                    let message = received.message;
                    if message.len() != PAYLOAD_BYTES {
                        return Err(format!("subscriber {index}, message {n}: {} bytes", message.len()));
                    }
                    if field(&message, 0) != n as u64 {
                        out_of_order += 1;
                    }
                    latencies.push(now.saturating_sub(Duration::from_nanos(field(&message, 1))));
                }
                Ok::<_, String>((subscription, Instant::now(), latencies, out_of_order))
            })
        })
        .collect();
    let start = Instant::now();
    let mut message = vec![0u8; PAYLOAD_BYTES];
    for n in 0..count {
        payload(&mut message, n as u64, base.elapsed().as_nanos() as u64);
        let handed = publisher
            .publish(TOPIC, &message)
            .await
            .map_err(|error| format!("publishing message {n}: {error}"))?;
        if handed != subscribers {
            return Err(format!("message {n} was handed to {handed} subscribers, expected {subscribers}"));
        }
    }
    let publish_time = start.elapsed();
    let mut phase = Phase {
        subscriptions: Vec::with_capacity(subscribers),
        publish_time,
        delivery_time: publish_time,
        latencies: Vec::with_capacity(count * subscribers),
        out_of_order: 0,
    };
    for receiver in receivers {
        let (subscription, done, latencies, out_of_order) =
            receiver.await.map_err(|error| format!("subscriber task: {error}"))??;
        phase.subscriptions.push(subscription);
        phase.delivery_time = phase.delivery_time.max(done - start);
        {
            let mut sorted = latencies.clone();
            sorted.sort();
            let (argmax, max) = latencies.iter().enumerate().max_by_key(|(_, l)| **l).map(|(i, l)| (i, *l)).unwrap_or_default();
            eprintln!("DEBUG sub done {:?} p50 {:.0} p99 {:.0} max {:?} at msg {argmax}", done - start, percentile(&sorted, 50), percentile(&sorted, 99), max);
        }
        phase.latencies.extend(latencies);
        phase.out_of_order += out_of_order;
    }
    Ok(phase)
}

async fn fan_out(
    settings: Settings,
    library: &PluginLibrary,
    subscribers: usize,
    base: Instant,
) -> Result<FanOutRow, String> {
    let limit = settings.step_limit;
    let tag = format!("fan-out to {subscribers}");
    let (publisher, nodes, subscriptions) = step(&format!("{tag}: starting the nodes"), limit, async {
        let publisher = build_node(&format!("fan{subscribers}-publisher"), library, &[]).await?;
        let mut nodes = Vec::with_capacity(subscribers);
        let mut subscriptions = Vec::with_capacity(subscribers);
        for index in 0..subscribers {
            let id = format!("fan{subscribers}-subscriber-{index}");
            let node = build_node(&id, library, &[&publisher]).await?;
            let subscription = node
                .subscribe::<Vec<u8>>(PATTERN)
                .await
                .map_err(|error| format!("subscribing {id} to {PATTERN}: {error}"))?;
            nodes.push(node);
            subscriptions.push(subscription);
        }
        Ok((publisher, nodes, subscriptions))
    })
    .await?;
    step(
        &format!("{tag}: waiting for the publisher to learn of {subscribers} subscription(s)"),
        ANNOUNCE_LIMIT,
        until(&publisher, |publisher| {
            live_peers(publisher, |r| r.topics.iter().any(|t| t == PATTERN)) >= subscribers
        }),
    )
    .await?;
    eprintln!("{tag}: warming up");
    let warm_up = step(
        &format!("{tag}: warm-up"),
        limit,
        publish_phase(&publisher, subscriptions, settings.warm_up_messages(), base),
    )
    .await?;
    eprintln!("{tag}: publishing {} messages", settings.messages);
    let mut phase = step(
        &format!("{tag}: measurement"),
        limit,
        publish_phase(&publisher, warm_up.subscriptions, settings.messages, base),
    )
    .await?;
    phase.latencies.sort();
    drop(phase.subscriptions);
    for node in &nodes {
        step(&format!("{tag}: closing {}", node.id()), limit, async {
            node.close().await.map_err(|error| error.to_string())
        })
        .await?;
    }
    step(&format!("{tag}: closing the publisher"), limit, async {
        publisher.close().await.map_err(|error| error.to_string())
    })
    .await?;
    Ok(FanOutRow {
        subscribers,
        messages: settings.messages,
        publish_time: phase.publish_time,
        delivery_time: phase.delivery_time,
        p50_micros: percentile(&phase.latencies, 50),
        p99_micros: percentile(&phase.latencies, 99),
        out_of_order: phase.out_of_order + warm_up.out_of_order,
    })
}

async fn run(
    settings: Settings,
    library: PluginLibrary,
) -> Result<(Vec<RequestRow>, Vec<FanOutRow>), String> {
    // The clock publish→receive latencies are measured against.
    let base = Instant::now();
    let requests = request_response(settings, library.clone()).await?;
    let mut fan_outs = Vec::new();
    for subscribers in SUBSCRIBERS {
        fan_outs.push(fan_out(settings, &library, subscribers, base).await?);
    }
    Ok((requests, fan_outs))
}

fn print_report(settings: &Settings, requests: &[RequestRow], fan_outs: &[FanOutRow]) {
    println!();
    println!(
        "Request/response over TCP on loopback (libcomms_tcp.so), {PAYLOAD_BYTES} B echo, \
         {} requests per line (COMMS_BENCH_SCALE={})",
        settings.requests, settings.scale
    );
    println!();
    println!(
        "| {:>10} | {:>8} | {:>8} | {:>13} | {:>8} | {:>8} |",
        "requesters", "requests", "time s", "round trips/s", "p50 µs", "p99 µs"
    );
    println!("|{:->12}|{:->10}|{:->10}|{:->15}|{:->10}|{:->10}|", "", "", "", "", "", "");
    for row in requests {
        println!(
            "| {:>10} | {:>8} | {:>8.2} | {:>13.0} | {:>8.1} | {:>8.1} |",
            row.requesters,
            row.requests,
            row.elapsed.as_secs_f64(),
            row.requests as f64 / row.elapsed.as_secs_f64(),
            row.p50_micros,
            row.p99_micros
        );
    }
    println!();
    println!(
        "Publish/subscribe fan-out over TCP on loopback (libcomms_tcp.so), {PAYLOAD_BYTES} B messages on \
         `{TOPIC}`, subscribers on `{PATTERN}`, {} messages per line",
        settings.messages
    );
    println!();
    println!(
        "| {:>11} | {:>8} | {:>13} | {:>15} | {:>8} | {:>8} |",
        "subscribers", "messages", "publish msg/s", "delivered msg/s", "p50 µs", "p99 µs"
    );
    println!("|{:->13}|{:->10}|{:->15}|{:->17}|{:->10}|{:->10}|", "", "", "", "", "", "");
    for row in fan_outs {
        println!(
            "| {:>11} | {:>8} | {:>13.0} | {:>15.0} | {:>8.1} | {:>8.1} |",
            row.subscribers,
            row.messages,
            row.messages as f64 / row.publish_time.as_secs_f64(),
            (row.messages * row.subscribers) as f64 / row.delivery_time.as_secs_f64(),
            row.p50_micros,
            row.p99_micros
        );
    }
    println!();
    println!("p50/p99: request round trip, and publish→receive over all deliveries (queueing included).");
    for row in fan_outs.iter().filter(|row| row.out_of_order > 0) {
        println!(
            "warning: fan-out to {}: {} deliveries arrived out of order",
            row.subscribers, row.out_of_order
        );
    }
}

fn main() {
    let settings = Settings::from_env();
    eprintln!("building the plugin libraries (comms_tests::artifacts)...");
    let tcp_plugin = &comms_tests::artifacts().tcp_plugin;
    let library = PluginLibrary::load(tcp_plugin)
        .unwrap_or_else(|error| fail(&format!("loading {}: {error}", tcp_plugin.display())));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|error| fail(&format!("starting the tokio runtime: {error}")));
    let started = Instant::now();
    // Spawned, so that the benchmark itself runs on the two workers and not on the main thread.
    let outcome = runtime.block_on(async move { tokio::spawn(run(settings, library)).await });
    let (requests, fan_outs) = match outcome {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => fail(&error),
        Err(error) => fail(&format!("the benchmark task panicked: {error}")),
    };
    print_report(&settings, &requests, &fan_outs);
    println!();
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
    runtime.shutdown_timeout(Duration::from_secs(1));
}

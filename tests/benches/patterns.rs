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
//! 200 ms, peers down after 5 s of silence), and measuring starts only once the services or
//! subscriptions it needs have been announced (the caller's `peers()` shows them). Payloads are
//! 64 bytes (`Vec<u8>`, through the default binary codec). It prints two tables (to stdout;
//! progress goes to stderr):
//!
//! - **request/response**: a server node serves an echo service (`Received<Vec<u8>>` answered
//!   with the same bytes), a client node calls it with [`Node::request_with`] (one attempt, 10 s
//!   timeout: a failure is reported, not retried away), with 1 requester and with 64 requesters
//!   (tokio tasks sharing clones of the client `Node`) making the same number of requests in all.
//!   Reported: round trips per second (the requests of a round over its wall time, from the first
//!   request to the last response) and the 50th/99th percentile of the round-trip time in
//!   microseconds. Every echo is checked against its request;
//! - **publish/subscribe fan-out**: one publisher node and 1 or 10 subscriber nodes, each
//!   subscribed to `bench.>`; the publisher publishes N messages on `bench.x` as fast as
//!   [`Node::publish`] returns. Reported: the publish rate (N over the publisher's loop), the
//!   delivered rate (N times the subscribers, over the time from the first publish until the last
//!   subscriber has received all N) and the 50th/99th percentile of the publish→receive latency
//!   over all deliveries: the payload carries its send time (nanoseconds since an `Instant` shared
//!   by the whole process) and the receiving task subtracts it from its own reading of that clock.
//!   Under a full-speed burst this latency is mostly time spent queued (in the plugin's queues and
//!   the sockets), not the latency of a lone message.
//!
//! Counts: 20,000 requests per round and requester setting, 20,000 published messages per round
//! and fan-out setting, each multiplied by the environment variable `COMMS_BENCH_SCALE` (a float,
//! default 1), after an unmeasured warm-up of a tenth as many (at least 200). There are 5 rounds;
//! the rounds alternate between the settings of a pattern so that a slow phase of the machine hits
//! them all; rates are the median round's, and the spread between rounds is printed too.
//!
//! Everything runs on a tokio multi-thread runtime with 2 workers (each TCP plugin also runs its
//! own runtime, as it always does). Every step has a time limit: a stuck benchmark ends with exit
//! code 1 and a message naming the step instead of hanging.
//!
//! One trap this benchmark avoids: [`Node::publish`] completes without ever returning `Pending`
//! while the plugin's per-peer queues have room (tokio's cooperative budget does not reach into
//! the plugin, which has its own copy of tokio), so a publishing loop keeps its worker thread to
//! itself. A task spawned just before it sits in that worker's LIFO slot, which the other worker
//! cannot steal from, and is not polled until the loop ends: a subscriber task spawned that way
//! received nothing for the whole burst (some 700 ms, p99 latency 650 ms with 10 subscribers,
//! the loopback socket buffers holding the backlog). So each round waits until every receiving
//! task has started before it publishes.

use comms_host::{Node, PeerStatus, PluginLibrary, Received, RequestOptions, Subscription};
use comms_tests::bench::{percentile_micros, scaled, step};
use std::{
    convert::Infallible,
    time::{Duration, Instant},
};

/// Payload size, in bytes.
const PAYLOAD_BYTES: usize = 64;
/// Measured rounds per setting; the rates reported are the median round's.
const ROUNDS: usize = 5;
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
        let scale = comms_tests::bench::scale("patterns");
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

/// The rounds of one setting, pooled.
#[derive(Debug, Default)]
struct Rounds {
    /// Per round: the wall time of the whole round, and for fan-out the publisher's loop.
    elapsed: Vec<Duration>,
    publishing: Vec<Duration>,
    /// Every latency sample of every round.
    latencies: Vec<Duration>,
    /// Fan-out: deliveries whose sequence number was not the next expected one.
    out_of_order: usize,
}

/// One line of a table.
#[derive(Debug)]
struct Row {
    /// Requesters or subscribers.
    parallel: usize,
    /// Requests or published messages per round.
    per_round: usize,
    /// Median of the rounds: operations per second.
    rate: f64,
    /// Median of the rounds: published messages per second (fan-out only).
    publish_rate: f64,
    /// Slowest and fastest round, in operations per second.
    range: (f64, f64),
    p50_micros: f64,
    p99_micros: f64,
    out_of_order: usize,
}

impl Row {
    fn new(parallel: usize, per_round: usize, operations: usize, mut rounds: Rounds) -> Self {
        rounds.elapsed.sort();
        rounds.publishing.sort();
        rounds.latencies.sort();
        let rate = |time: &Duration| operations as f64 / time.as_secs_f64();
        let median = |times: &[Duration]| times.get(times.len() / 2).map_or(f64::NAN, |t| t.as_secs_f64());
        Self {
            parallel,
            per_round,
            rate: operations as f64 / median(&rounds.elapsed),
            publish_rate: per_round as f64 / median(&rounds.publishing),
            range: (
                rounds.elapsed.last().map_or(f64::NAN, rate),
                rounds.elapsed.first().map_or(f64::NAN, rate),
            ),
            p50_micros: percentile_micros(&rounds.latencies, 50),
            p99_micros: percentile_micros(&rounds.latencies, 99),
            out_of_order: rounds.out_of_order,
        }
    }
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

/// Closes `nodes` all at once (one after the other, each would heartbeat those already gone).
async fn close_all(nodes: &[&Node]) -> Result<(), String> {
    let closes = nodes.iter().map(|node| async move {
        node.close().await.map_err(|error| format!("closing node {}: {error}", node.id()))
    });
    futures::future::join_all(closes).await.into_iter().collect()
}

async fn request_response(settings: Settings, library: &PluginLibrary) -> Result<Vec<Row>, String> {
    let limit = settings.step_limit;
    let (server, client) = step("request/response: starting the nodes", limit, async {
        let server = build_node("rr-server", library, &[]).await?;
        server
            .serve(SERVICE, |request: Received<Vec<u8>>| async move { Ok::<_, Infallible>(request.message) })
            .await
            .map_err(|error| format!("serving {SERVICE}: {error}"))?;
        let client = build_node("rr-client", library, &[&server]).await?;
        Ok((server, client))
    })
    .await?;
    step(
        &format!("request/response: waiting for the client to learn of service `{SERVICE}`"),
        ANNOUNCE_LIMIT,
        until(&client, |client| live_peers(client, |r| r.services.iter().any(|s| s == SERVICE)) > 0),
    )
    .await?;
    for requesters in REQUESTERS {
        eprintln!("request/response, {requesters} requester(s): warming up");
        let what = format!("request/response, {requesters} requester(s): warm-up");
        step(&what, limit, run_requests(&client, requesters, settings.warm_up_requests())).await?;
    }
    let mut rounds: Vec<Rounds> = REQUESTERS.iter().map(|_| Rounds::default()).collect();
    for round in 1..=ROUNDS {
        eprintln!("request/response: round {round} of {ROUNDS}");
        for (requesters, rounds) in REQUESTERS.into_iter().zip(&mut rounds) {
            let what = format!("request/response, {requesters} requester(s): round {round}");
            let (elapsed, latencies) =
                step(&what, limit, run_requests(&client, requesters, settings.requests)).await?;
            rounds.elapsed.push(elapsed);
            rounds.latencies.extend(latencies);
        }
    }
    step("request/response: closing the nodes", limit, close_all(&[&client, &server])).await?;
    Ok(REQUESTERS
        .into_iter()
        .zip(rounds)
        .map(|(requesters, rounds)| Row::new(requesters, settings.requests, settings.requests, rounds))
        .collect())
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
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers.max(1));
    let receivers: Vec<_> = subscriptions
        .into_iter()
        .enumerate()
        .map(|(index, mut subscription)| {
            let ready = ready_tx.clone();
            tokio::spawn(async move {
                let _ = ready.send(()).await;
                drop(ready);
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
    drop(ready_tx);
    // Every receiving task must have started before publishing: a task just spawned sits in its
    // worker's LIFO slot, where no other worker can steal it, and a publishing loop whose sends
    // all complete at once never yields that worker (see the module documentation).
    for _ in 0..subscribers {
        if ready_rx.recv().await.is_none() {
            break;
        }
    }
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
        phase.latencies.extend(latencies);
        phase.out_of_order += out_of_order;
    }
    Ok(phase)
}

/// One publisher and its subscriber nodes.
struct FanOut {
    tag: String,
    publisher: Node,
    subscribers: Vec<Node>,
    subscriptions: Vec<Subscription<Vec<u8>>>,
}

impl FanOut {
    async fn start(library: &PluginLibrary, subscribers: usize) -> Result<Self, String> {
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
        let tag = format!("fan-out to {subscribers}");
        Ok(Self { tag, publisher, subscribers: nodes, subscriptions })
    }

    async fn wait_for_subscriptions(&self) -> Result<(), String> {
        let expected = self.subscribers.len();
        until(&self.publisher, |publisher| {
            live_peers(publisher, |r| r.topics.iter().any(|t| t == PATTERN)) >= expected
        })
        .await
    }

    async fn publish(
        &mut self,
        count: usize,
        base: Instant,
        limit: Duration,
        what: &str,
    ) -> Result<Phase, String> {
        let subscriptions = std::mem::take(&mut self.subscriptions);
        let what = format!("{}: {what}", self.tag);
        let mut phase =
            step(&what, limit, publish_phase(&self.publisher, subscriptions, count, base)).await?;
        self.subscriptions = std::mem::take(&mut phase.subscriptions);
        Ok(phase)
    }

    async fn close(self, limit: Duration) -> Result<(), String> {
        drop(self.subscriptions);
        let mut nodes: Vec<&Node> = self.subscribers.iter().collect();
        nodes.push(&self.publisher);
        step(&format!("{}: closing the nodes", self.tag), limit, close_all(&nodes)).await
    }
}

async fn fan_outs(settings: Settings, library: &PluginLibrary, base: Instant) -> Result<Vec<Row>, String> {
    let limit = settings.step_limit;
    let mut fan_outs = Vec::new();
    for subscribers in SUBSCRIBERS {
        let fan_out = step(
            &format!("fan-out to {subscribers}: starting the nodes"),
            limit,
            FanOut::start(library, subscribers),
        )
        .await?;
        step(
            &format!("fan-out to {subscribers}: waiting for the publisher to learn of every subscription"),
            ANNOUNCE_LIMIT,
            fan_out.wait_for_subscriptions(),
        )
        .await?;
        fan_outs.push(fan_out);
    }
    for fan_out in &mut fan_outs {
        eprintln!("{}: warming up", fan_out.tag);
        fan_out.publish(settings.warm_up_messages(), base, limit, "warm-up").await?;
    }
    let mut rounds: Vec<Rounds> = SUBSCRIBERS.iter().map(|_| Rounds::default()).collect();
    for round in 1..=ROUNDS {
        eprintln!("fan-out: round {round} of {ROUNDS}");
        for (fan_out, rounds) in fan_outs.iter_mut().zip(&mut rounds) {
            let phase = fan_out.publish(settings.messages, base, limit, &format!("round {round}")).await?;
            rounds.elapsed.push(phase.delivery_time);
            rounds.publishing.push(phase.publish_time);
            rounds.latencies.extend(phase.latencies);
            rounds.out_of_order += phase.out_of_order;
        }
    }
    for fan_out in fan_outs {
        fan_out.close(limit).await?;
    }
    Ok(SUBSCRIBERS
        .into_iter()
        .zip(rounds)
        .map(|(subscribers, rounds)| {
            Row::new(subscribers, settings.messages, settings.messages * subscribers, rounds)
        })
        .collect())
}

async fn run(settings: Settings, library: PluginLibrary) -> Result<(Vec<Row>, Vec<Row>), String> {
    // The clock publish→receive latencies are measured against.
    let base = Instant::now();
    let requests = request_response(settings, &library).await?;
    let fan_outs = fan_outs(settings, &library, base).await?;
    Ok((requests, fan_outs))
}

fn print_report(settings: &Settings, requests: &[Row], fan_outs: &[Row]) {
    println!();
    println!(
        "TCP plugin (libcomms_tcp.so) over loopback, {PAYLOAD_BYTES} B payloads; rates: median of {ROUNDS} \
         rounds; latencies: percentiles over all rounds (COMMS_BENCH_SCALE={})",
        settings.scale
    );
    println!();
    println!("Request/response (echo service, one client node, one server node)");
    println!();
    println!(
        "| {:>10} | {:>14} | {:>13} | {:>8} | {:>8} |",
        "requesters", "requests/round", "round trips/s", "p50 µs", "p99 µs"
    );
    println!("|{:->12}|{:->16}|{:->15}|{:->10}|{:->10}|", "", "", "", "", "");
    for row in requests {
        println!(
            "| {:>10} | {:>14} | {:>13.0} | {:>8.1} | {:>8.1} |",
            row.parallel, row.per_round, row.rate, row.p50_micros, row.p99_micros
        );
    }
    println!();
    println!("Publish/subscribe fan-out (`{TOPIC}` to subscribers of `{PATTERN}`, one node each)");
    println!();
    println!(
        "| {:>11} | {:>14} | {:>13} | {:>15} | {:>8} | {:>8} |",
        "subscribers", "messages/round", "publish msg/s", "delivered msg/s", "p50 µs", "p99 µs"
    );
    println!("|{:->13}|{:->16}|{:->15}|{:->17}|{:->10}|{:->10}|", "", "", "", "", "", "");
    for row in fan_outs {
        println!(
            "| {:>11} | {:>14} | {:>13.0} | {:>15.0} | {:>8.1} | {:>8.1} |",
            row.parallel, row.per_round, row.publish_rate, row.rate, row.p50_micros, row.p99_micros
        );
    }
    println!();
    println!("p50/p99: request round trip; publish→receive over all deliveries (queueing included).");
    println!();
    println!("spread between rounds (slowest .. fastest):");
    for row in requests {
        let (slowest, fastest) = row.range;
        println!("  {:>2} requester(s):  {slowest:>7.0} .. {fastest:.0} round trips/s", row.parallel);
    }
    for row in fan_outs {
        let (slowest, fastest) = row.range;
        println!("  {:>2} subscriber(s): {slowest:>7.0} .. {fastest:.0} delivered msg/s", row.parallel);
    }
    for row in fan_outs.iter().filter(|row| row.out_of_order > 0) {
        println!(
            "warning: fan-out to {}: {} deliveries arrived out of order",
            row.parallel, row.out_of_order
        );
    }
}

fn main() {
    let settings = Settings::from_env();
    eprintln!("building the plugin libraries (comms_tests::artifacts)...");
    let tcp_plugin = &comms_tests::artifacts().tcp_plugin;
    let library = PluginLibrary::load(tcp_plugin)
        .unwrap_or_else(|error| fail(&format!("loading {}: {error}", tcp_plugin.display())));
    let started = Instant::now();
    let (requests, fan_outs) = comms_tests::bench::run_on_two_workers("patterns", run(settings, library));
    print_report(&settings, &requests, &fan_outs);
    println!();
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
}

/// Ends the benchmark with a message, without waiting for tasks that may be stuck.
fn fail(message: &str) -> ! {
    comms_tests::bench::fail("patterns", message)
}

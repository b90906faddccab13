//! What the size of a node's peer table costs a message: the same traffic between two nodes,
//! once with nothing else known and once with [`EXTRA_PEERS`] more peers known to both.
//!
//! Run it with
//!
//! ```text
//! cargo bench -p comms-tests --bench peer_table
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench peer_table   # quicker, noisier
//! ```
//!
//! Two nodes, a server and a client, on the in-memory transport (`libcomms_memory.so`, loaded
//! as users get it), so that the transport costs little and the engine's share shows. The extra
//! peers come from static discovery, at memory addresses nobody listens on: they are never heard
//! from, and stay up until the peer timeout (an hour here, as is the heartbeat interval, so
//! that no heartbeat goes to them while measuring). Liveness is on: every message moves the
//! sender's expiry. Three patterns, each measured with and without the extra peers in
//! alternating rounds:
//!
//! - **send**: the client sends N messages to the server with [`Node::send_raw`], each awaited;
//!   the server takes them with [`Node::receive_envelopes`];
//! - **request**: the client calls the server's echo service N times, one call at a time;
//! - **publish**: the client publishes N messages on a topic the server subscribes to, each
//!   awaited; the server's subscription drains meanwhile (a subscription that falls behind
//!   loses publications, so only the publisher's loop is timed).
//!
//! Reported: messages (or round trips) per second, the median round's, and the ratio with the
//! extra peers over without. Aim: at least 0.9 (what a message costs does not grow with the
//! table). Until 2026-12-05 the engine walked the table for its next deadline twice per step
//! that takes received messages (per message when they come one at a time), once per request
//! for the service's replicas and once per publication for the topic's subscribers: requests
//! then measured 0.34 to 0.36 and publications 0.59 to 0.61 here.
//!
//! Counts: 20,000 messages per round and pattern, times `COMMS_BENCH_SCALE`, after a warm-up of
//! a tenth as many. Every step has a time limit: a stuck benchmark ends with exit code 1 and a
//! message naming the step.

use comms_host::{Node, PluginLibrary, RequestOptions};
use comms_tests::bench::{scaled, step};
use std::{
    convert::Infallible,
    time::{Duration, Instant},
};

/// Peers known besides the two nodes, in the measured setting.
const EXTRA_PEERS: usize = 1_000;
/// Measured rounds per setting; the rates reported are the median round's.
const ROUNDS: usize = 5;
const PAYLOAD: [u8; 64] = [7; 64];
const SERVICE: &str = "bench.echo";
const TOPIC: &str = "bench.news";
/// Long enough that neither heartbeats nor expiry happen while measuring.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
const PEER_TIMEOUT: Duration = Duration::from_secs(7200);
/// Time limit of one step (setup, one round, closing), multiplied by the scale when above 1.
const STEP_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pattern {
    Send,
    Request,
    Publish,
}

const PATTERNS: [Pattern; 3] = [Pattern::Send, Pattern::Request, Pattern::Publish];

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Send => "send (awaited, one at a time)",
            Pattern::Request => "request (one at a time)",
            Pattern::Publish => "publish (awaited, one at a time)",
        }
    }
}

/// A server and a client, knowing each other and `extra` more peers.
struct Pair {
    server: Node,
    client: Node,
    /// The server's subscription to [`TOPIC`] (taken by the receiving task while publishing).
    subscription: Option<comms_host::Subscription<Vec<u8>>>,
}

async fn build_node(
    id: &str,
    library: &PluginLibrary,
    peer: Option<&Node>,
    extra: usize,
) -> Result<Node, String> {
    let config = format!("address = \"memory://bench-{id}-{extra}\"");
    let mut builder = Node::builder(id).liveness(Some(HEARTBEAT_INTERVAL), PEER_TIMEOUT).transport_library(
        "memory",
        library.clone(),
        &config,
    );
    if let Some(peer) = peer {
        let address = peer.transports()[0].local_address.clone();
        builder = builder.static_peer(peer.id().as_str(), [("memory", address.as_str())]);
    }
    for n in 0..extra {
        builder = builder
            .static_peer(&format!("absent-{n}"), [("memory", format!("memory://absent-{n}").as_str())]);
    }
    builder.build().await.map_err(|error| format!("building node {id}: {error}"))
}

impl Pair {
    async fn start(library: &PluginLibrary, extra: usize) -> Result<Self, String> {
        let server = build_node("server", library, None, extra).await?;
        server
            .serve(SERVICE, |request: comms_host::Received<Vec<u8>>| async move {
                Ok::<_, Infallible>(request.message)
            })
            .await
            .map_err(|error| format!("serving {SERVICE}: {error}"))?;
        let subscription =
            server.subscribe::<Vec<u8>>(TOPIC).await.map_err(|error| format!("subscribing: {error}"))?;
        let client = build_node("client", library, Some(&server), extra).await?;
        client.wait_for_service(SERVICE, Duration::from_secs(30)).await.map_err(|error| error.to_string())?;
        client
            .wait_for_subscriber(TOPIC, Duration::from_secs(30))
            .await
            .map_err(|error| error.to_string())?;
        let known = client.peers().len();
        if known < extra + 1 {
            return Err(format!("the client knows {known} peers, not {}", extra + 1));
        }
        Ok(Self { server, client, subscription: Some(subscription) })
    }

    /// `count` messages of `pattern`; the time from the first to the last one taken.
    async fn run(&mut self, pattern: Pattern, count: usize) -> Result<Duration, String> {
        let started = Instant::now();
        match pattern {
            Pattern::Send => {
                let server = self.server.clone();
                let receiving = tokio::spawn(async move {
                    let mut taken = 0;
                    while taken < count {
                        taken +=
                            server.receive_envelopes(256).await.map_err(|error| error.to_string())?.len();
                    }
                    Ok::<_, String>(())
                });
                for n in 0..count {
                    self.client
                        .send_raw("server", Vec::<(String, String)>::new(), PAYLOAD.to_vec(), None)
                        .await
                        .map_err(|error| format!("send {n}: {error}"))?;
                }
                receiving.await.map_err(|error| error.to_string())??;
            }
            Pattern::Request => {
                let options =
                    RequestOptions { attempts: 1, timeout: Duration::from_secs(10), ..Default::default() };
                for n in 0..count {
                    let echo: Vec<u8> = self
                        .client
                        .request_with(SERVICE, &PAYLOAD.to_vec(), &options)
                        .await
                        .map_err(|error| format!("request {n}: {error}"))?;
                    if echo != PAYLOAD {
                        return Err(format!("request {n}: the echo differs"));
                    }
                }
            }
            Pattern::Publish => {
                // A subscription that falls behind loses publications (at most once, as with
                // NATS), so only the publisher's loop is timed; the subscriber drains meanwhile.
                let mut subscription = self.subscription.take().ok_or("the subscription is gone")?;
                let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
                let receiving = tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut stopped => return Ok::<_, String>(subscription),
                            received = subscription.next() => match received {
                                Some(Ok(_)) => {}
                                Some(Err(error)) => return Err(format!("a publication: {error}")),
                                None => return Err("the subscription ended".to_string()),
                            },
                        }
                    }
                });
                for n in 0..count {
                    let reached = self
                        .client
                        .publish(TOPIC, &PAYLOAD.to_vec())
                        .await
                        .map_err(|error| format!("publish {n}: {error}"))?;
                    if reached != 1 {
                        return Err(format!("publish {n} reached {reached} subscribers, not 1"));
                    }
                }
                let took = started.elapsed();
                let _ = stop.send(());
                self.subscription = Some(receiving.await.map_err(|error| error.to_string())??);
                return Ok(took);
            }
        }
        Ok(started.elapsed())
    }

    async fn close(self) -> Result<(), String> {
        drop(self.subscription);
        self.client.close().await.map_err(|error| format!("closing the client: {error}"))?;
        self.server.close().await.map_err(|error| format!("closing the server: {error}"))
    }
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

async fn run(
    library: PluginLibrary,
    messages: usize,
    limit: Duration,
) -> Result<Vec<(Pattern, f64, f64)>, String> {
    let settings = [0, EXTRA_PEERS];
    let mut pairs = Vec::new();
    for extra in settings {
        eprintln!("starting two nodes knowing {extra} more peers");
        pairs.push(
            step(&format!("starting with {extra} more peers"), limit, Pair::start(&library, extra)).await?,
        );
    }
    let mut rates = vec![vec![Vec::new(); settings.len()]; PATTERNS.len()];
    for (p, pattern) in PATTERNS.into_iter().enumerate() {
        for (pair, extra) in pairs.iter_mut().zip(settings) {
            step(
                &format!("{} warm-up, {extra} more peers", pattern.name()),
                limit,
                pair.run(pattern, (messages / 10).max(100)),
            )
            .await?;
        }
        for round in 1..=ROUNDS {
            for (s, (pair, extra)) in pairs.iter_mut().zip(settings).enumerate() {
                let what = format!("{}, round {round}, {extra} more peers", pattern.name());
                eprintln!("{what}");
                let took = step(&what, limit, pair.run(pattern, messages)).await?;
                rates[p][s].push(messages as f64 / took.as_secs_f64());
            }
        }
    }
    for pair in pairs {
        step("closing", limit, pair.close()).await?;
    }
    Ok(PATTERNS
        .into_iter()
        .zip(rates)
        .map(|(pattern, mut by_setting)| {
            let with = median(by_setting.pop().unwrap_or_default());
            let without = median(by_setting.pop().unwrap_or_default());
            (pattern, without, with)
        })
        .collect())
}

fn main() {
    let scale = comms_tests::bench::scale("peer_table");
    let messages = scaled(20_000, scale);
    let limit = STEP_LIMIT.mul_f64(scale.max(1.0));
    eprintln!("building the plugin libraries (comms_tests::artifacts)...");
    let memory_plugin = &comms_tests::artifacts().memory_plugin;
    let library = PluginLibrary::load(memory_plugin)
        .unwrap_or_else(|error| fail(&format!("loading {}: {error}", memory_plugin.display())));
    let started = Instant::now();
    let rows = comms_tests::bench::run_on_two_workers("peer_table", run(library, messages, limit));
    println!();
    println!(
        "Two nodes on the memory transport, {messages} messages of 64 B per round, median of {ROUNDS} rounds \
         (COMMS_BENCH_SCALE={scale})"
    );
    println!();
    println!(
        "| pattern | msg/s, 2 peers known | msg/s, {} peers known | ratio (aim >= 0.9) |",
        EXTRA_PEERS + 2
    );
    println!("|---|---|---|---|");
    for (pattern, without, with) in rows {
        println!("| {} | {without:.0} | {with:.0} | {:.2} |", pattern.name(), with / without);
    }
    println!();
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
}

/// Ends the benchmark with a message, without waiting for tasks that may be stuck.
fn fail(message: &str) -> ! {
    comms_tests::bench::fail("peer_table", message)
}

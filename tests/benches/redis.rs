//! Redis throughput and latency of comms, compared with a raw redis-rs program doing the same
//! broker operations.
//!
//! ```text
//! cargo bench -p comms-tests --bench redis
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench redis   # quicker, noisier
//! ```
//!
//! Needs the Redis at 127.0.0.1:6379 (keys under `comms-bench-<pid>:`, deleted at the end).
//! Variants, each for payloads of 64 B and 1 KiB:
//!
//! - **comms confirm**: two [`Node`]s over `libcomms_redis.so` loaded at run time, default
//!   config (`confirm_sends = true`: `send` returns once Redis answered the `XADD`), the
//!   receiver reading with `XREADGROUP COUNT 256` and settling with `XACK` + `XDEL`; the
//!   application takes what arrived up to 256 at a time ([`Node::receive_envelopes`], as the raw
//!   receiver handles a whole `XREADGROUP` reply) and sends one shared payload buffer (clones of
//!   one [`comms_host::Payload`], as the raw sender writes one slice);
//! - **comms queued**: the same with `confirm_sends = false`: `send` returns once queued, the
//!   plugin writes queued messages in pipelines;
//! - **raw sequential**: redis-rs, a multiplexed connection, one `XADD` of the same fields the
//!   plugin writes (`v`, `id`, `from`, `headers`, `payload`) awaited after the other (what
//!   `confirm` does per message); the receiver on two connections of its own (as the plugin's
//!   receiving node): `XREADGROUP COUNT 256 BLOCK` on one, then `XACK` + `XDEL` in one pipeline
//!   per batch on the other;
//! - **raw pipelined**: the same receiver; the sender writes `XADD`s in pipelines of 256.
//!
//! Throughput: one sender sends N messages, one receiver takes them; time from the first send to
//! the last receive, median of 5 rounds. The variants take turns round by round (after a
//! warm-up of each), so that the machine's changes of speed during a run fall on all of them
//! alike; each ratio is printed with the range of its rounds' own ratios (comms and raw of the
//! same round), which shows how far one run can be trusted. Latency: ping-pong (send, the other
//! side answers into the sender's inbox), p50 and p99 of the round trip. Counts: 50,000 (64 B)
//! / 30,000 (1 KiB) per round and 2,000 ping-pongs, times `COMMS_BENCH_SCALE`. The aim is
//! comms >= 0.9x raw.
//!
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the plugin's runtime N worker threads (default: the
//! plugin's own, 2).

use comms_host::{Node, NodeId, PluginLibrary};
use redis::{aio::MultiplexedConnection, streams::StreamReadReply, Value};
use std::time::{Duration, Instant};

const PAYLOAD_SIZES: [usize; 2] = [64, 1024];
const ROUNDS: usize = 5;
const BATCH: usize = 256;
const URL: &str = "redis://127.0.0.1:6379";
const STEP_LIMIT: Duration = Duration::from_secs(120);

fn fail(message: &str) -> ! {
    comms_tests::bench::fail("redis", message)
}

fn scaled(count: usize) -> usize {
    comms_tests::bench::scaled(count, comms_tests::bench::scale("redis")).max(10)
}

/// Runs one step under [`STEP_LIMIT`]; a failure ends the benchmark naming the step.
async fn step<T>(what: &str, work: impl std::future::Future<Output = Result<T, String>>) -> T {
    comms_tests::bench::step(what, STEP_LIMIT, work).await.unwrap_or_else(|error| fail(&error))
}

/// Two comms nodes over the Redis plugin.
struct CommsPair {
    sender: Node,
    receiver: Node,
    receiver_id: NodeId,
    headers: Vec<(String, String)>,
}

impl CommsPair {
    async fn start(library: &PluginLibrary, prefix: &str, tag: &str, confirm: bool) -> Result<Self, String> {
        let config = format!("prefix = \"{prefix}\"\nconfirm_sends = {confirm}\n");
        let (sender_id, receiver_id) = (format!("{tag}-sender"), format!("{tag}-receiver"));
        let inbox = |id: &str| format!("{prefix}:inbox:{id}");
        let build = |id: &str, peer: &str| {
            Node::builder(id)
                .transport_library("redis", library.clone(), &config)
                .static_peer(peer, [("redis", inbox(peer).as_str())])
                .build()
        };
        let receiver = build(&receiver_id, &sender_id).await.map_err(|e| e.to_string())?;
        let sender = build(&sender_id, &receiver_id).await.map_err(|e| e.to_string())?;
        let headers = vec![("content-type".to_string(), "application/octet-stream".to_string())];
        Ok(Self { sender, receiver, receiver_id: NodeId::new(receiver_id), headers })
    }

    async fn throughput(&self, count: usize, payload: &[u8]) -> Result<Duration, String> {
        let receiver = self.receiver.clone();
        let counter = tokio::spawn(async move {
            let mut received = 0;
            while received < count {
                let batch = receiver
                    .receive_envelopes(BATCH)
                    .await
                    .map_err(|error| format!("receiving {received}: {error}"))?;
                received += batch.len();
            }
            Ok::<_, String>(Instant::now())
        });
        let payload = comms_host::Payload::from(payload.to_vec());
        let start = Instant::now();
        for n in 0..count {
            self.sender
                .send_raw(self.receiver_id.clone(), self.headers.clone(), payload.clone(), None)
                .await
                .map_err(|error| format!("sending {n}: {error}"))?;
        }
        let end = counter.await.map_err(|error| error.to_string())??;
        Ok(end - start)
    }

    async fn ping_pong(&self, count: usize, payload: &[u8], rtts: &mut Vec<Duration>) -> Result<(), String> {
        let echo = {
            let (node, headers) = (self.receiver.clone(), self.headers.clone());
            tokio::spawn(async move {
                for n in 0..count {
                    let ping = node.receive_envelope().await.map_err(|error| format!("ping {n}: {error}"))?;
                    node.send_raw(ping.from, headers.clone(), ping.payload, Some(ping.id))
                        .await
                        .map_err(|error| format!("pong {n}: {error}"))?;
                }
                Ok::<(), String>(())
            })
        };
        let payload = comms_host::Payload::from(payload.to_vec());
        for n in 0..count {
            let start = Instant::now();
            self.sender
                .send_raw(self.receiver_id.clone(), self.headers.clone(), payload.clone(), None)
                .await
                .map_err(|error| format!("ping {n}: {error}"))?;
            self.sender.receive_envelope().await.map_err(|error| format!("pong {n}: {error}"))?;
            rtts.push(start.elapsed());
        }
        echo.await.map_err(|error| error.to_string())?
    }

    async fn close(self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
    }
}

/// What redis-rs gives a user who writes it by hand: an inbox stream with a consumer group.
struct RawInbox {
    key: String,
    /// For `XADD`s to this inbox and `XACK`s.
    commands: MultiplexedConnection,
    /// For the blocking `XREADGROUP`.
    reading: MultiplexedConnection,
}

impl RawInbox {
    async fn open(client: &redis::Client, key: String) -> Result<Self, String> {
        let commands = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        let mut reading = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        let _: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut reading)
            .await;
        Ok(Self { key, commands, reading })
    }

    /// The same entry the plugin writes for a message to a node: version, id, sender, headers
    /// (the content type) and payload.
    fn xadd(&self, payload: &[u8]) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.key).arg("*").arg("v").arg("1");
        cmd.arg("id").arg(format!("{:032x}", rand::random::<u128>())).arg("from").arg("raw-sender");
        cmd.arg("headers").arg(r#"[["content-type","application/octet-stream"]]"#);
        cmd.arg("payload").arg(payload);
        cmd
    }

    /// Takes up to a batch, acknowledges and deletes it, returns the payloads.
    async fn take(&mut self) -> Result<Vec<Vec<u8>>, String> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut self.reading)
            .await
            .map_err(|e| e.to_string())?;
        let entries: Vec<_> =
            reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&self.key).arg("g").arg(&ids).ignore();
        pipe.cmd("XDEL").arg(&self.key).arg(&ids).ignore();
        let () = pipe.query_async(&mut self.commands).await.map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .map(|e| match e.map.get("payload") {
                Some(Value::BulkString(bytes)) => bytes.clone(),
                _ => Vec::new(),
            })
            .collect())
    }
}

async fn raw_throughput(
    client: &redis::Client,
    prefix: &str,
    count: usize,
    payload: &[u8],
    pipelined: bool,
) -> Result<Duration, String> {
    let key = format!("{prefix}:raw:{}", rand::random::<u32>());
    let mut inbox = RawInbox::open(client, key.clone()).await?;
    // The sender is another program than the receiver, as the comms sender is another node:
    // a connection of its own, not the one that carries the receiver's `XACK`s.
    let commands = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let mut sender = RawInbox { key, commands, reading: inbox.reading.clone() };
    let counter = tokio::spawn(async move {
        let mut received = 0;
        while received < count {
            received += inbox.take().await?.len();
        }
        Ok::<_, String>(Instant::now())
    });
    let start = Instant::now();
    if pipelined {
        for chunk in (0..count).collect::<Vec<_>>().chunks(BATCH) {
            let mut pipe = redis::pipe();
            for _ in chunk {
                pipe.add_command(sender.xadd(payload)).ignore();
            }
            let () = pipe.query_async(&mut sender.commands).await.map_err(|e| e.to_string())?;
        }
    } else {
        for _ in 0..count {
            let _: String =
                sender.xadd(payload).query_async(&mut sender.commands).await.map_err(|e| e.to_string())?;
        }
    }
    let end = counter.await.map_err(|e| e.to_string())??;
    Ok(end - start)
}

async fn raw_ping_pong(
    client: &redis::Client,
    prefix: &str,
    count: usize,
    payload: &[u8],
    rtts: &mut Vec<Duration>,
) -> Result<(), String> {
    let mut ping_inbox =
        RawInbox::open(client, format!("{prefix}:raw-ping:{}", rand::random::<u32>())).await?;
    let mut pong_inbox =
        RawInbox::open(client, format!("{prefix}:raw-pong:{}", rand::random::<u32>())).await?;
    let (ping_cmd, pong_cmd) = (ping_inbox.xadd(payload), pong_inbox.xadd(payload));
    let mut pong_writer = ping_inbox.commands.clone();
    let echo = tokio::spawn(async move {
        let mut answered = 0;
        while answered < count {
            for _ in ping_inbox.take().await? {
                let _: String = pong_cmd.query_async(&mut pong_writer).await.map_err(|e| e.to_string())?;
                answered += 1;
            }
        }
        Ok::<(), String>(())
    });
    let mut writer = pong_inbox.commands.clone();
    for _ in 0..count {
        let start = Instant::now();
        let _: String = ping_cmd.query_async(&mut writer).await.map_err(|e| e.to_string())?;
        while pong_inbox.take().await?.is_empty() {}
        rtts.push(start.elapsed());
    }
    echo.await.map_err(|e| e.to_string())?
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

/// The four ways of moving the same messages, measured in turn.
#[derive(Debug, Clone, Copy)]
enum Variant {
    CommsConfirm,
    CommsQueued,
    RawSequential,
    RawPipelined,
}

impl Variant {
    const ALL: [Variant; 4] =
        [Self::CommsConfirm, Self::CommsQueued, Self::RawSequential, Self::RawPipelined];

    fn label(self) -> &'static str {
        match self {
            Self::CommsConfirm => "comms confirm",
            Self::CommsQueued => "comms queued",
            Self::RawSequential => "raw sequential",
            Self::RawPipelined => "raw pipelined",
        }
    }
}

struct Row {
    variant: &'static str,
    payload: usize,
    rate: f64,
    p50: f64,
    p99: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        fail("no Redis at 127.0.0.1:6379");
    }
    let threads = comms_tests::bench::plugin_threads("redis");
    let library = PluginLibrary::load_with_threads(&comms_tests::artifacts().redis_plugin, threads)
        .unwrap_or_else(|e| fail(&e.to_string()));
    let client = redis::Client::open(URL).unwrap_or_else(|e| fail(&e.to_string()));
    let prefix = format!("comms-bench-{}", std::process::id());
    let mut rows = Vec::new();
    // The ratio of each round's pair (comms / raw, same round), min..max, per payload size.
    let mut round_ratios = Vec::new();
    for payload_size in PAYLOAD_SIZES {
        let payload = vec![0xa5u8; payload_size];
        let count = scaled(if payload_size <= 64 { 50_000 } else { 30_000 });
        let pings = scaled(2_000);
        eprintln!(
            "{payload_size} B: {count} messages x {ROUNDS} rounds of every variant, in turn; {pings} ping-pongs each"
        );
        let tag = |variant: Variant| format!("{}-{payload_size}", variant.label().replace(' ', "-"));
        let confirm =
            step("starting nodes", CommsPair::start(&library, &prefix, &tag(Variant::CommsConfirm), true))
                .await;
        let queued =
            step("starting nodes", CommsPair::start(&library, &prefix, &tag(Variant::CommsQueued), false))
                .await;
        let run = |variant: Variant, count: usize| {
            let (confirm, queued, client, prefix, payload) = (&confirm, &queued, &client, &prefix, &payload);
            async move {
                match variant {
                    Variant::CommsConfirm => confirm.throughput(count, payload).await,
                    Variant::CommsQueued => queued.throughput(count, payload).await,
                    Variant::RawSequential => raw_throughput(client, prefix, count, payload, false).await,
                    Variant::RawPipelined => raw_throughput(client, prefix, count, payload, true).await,
                }
            }
        };
        // Every variant runs its round before any runs the next, so that a change in the
        // machine's speed during the run falls on all of them alike.
        for variant in Variant::ALL {
            step("warm-up", run(variant, count / 10)).await;
        }
        let mut durations: [Vec<Duration>; 4] = Default::default();
        for _ in 0..ROUNDS {
            for variant in Variant::ALL {
                durations[variant as usize].push(step("throughput", run(variant, count)).await);
            }
        }
        let spread = |comms: Variant, raw: Variant| {
            let ratios: Vec<f64> = (0..ROUNDS)
                .map(|round| {
                    durations[raw as usize][round].as_secs_f64()
                        / durations[comms as usize][round].as_secs_f64()
                })
                .collect();
            (ratios.iter().copied().fold(f64::INFINITY, f64::min), ratios.iter().copied().fold(0.0, f64::max))
        };
        round_ratios.push((
            payload_size,
            spread(Variant::CommsConfirm, Variant::RawSequential),
            spread(Variant::CommsQueued, Variant::RawPipelined),
        ));
        for variant in Variant::ALL {
            let mut rtts = Vec::new();
            match variant {
                Variant::CommsConfirm => {
                    step("ping-pong", confirm.ping_pong(pings, &payload, &mut rtts)).await
                }
                Variant::CommsQueued => step("ping-pong", queued.ping_pong(pings, &payload, &mut rtts)).await,
                _ => step("ping-pong", raw_ping_pong(&client, &prefix, pings, &payload, &mut rtts)).await,
            }
            let mut taken = durations[variant as usize].clone();
            taken.sort();
            rtts.sort();
            rows.push(Row {
                variant: variant.label(),
                payload: payload_size,
                rate: count as f64 / taken[ROUNDS / 2].as_secs_f64(),
                p50: percentile(&rtts, 0.5),
                p99: percentile(&rtts, 0.99),
            });
        }
        confirm.close().await;
        queued.close().await;
    }
    // Delete what the benchmark left (streams of closed nodes, raw inboxes).
    if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut connection).await;
        }
    }

    println!("| variant | payload | msg/s | MB/s | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} B | {:.0} | {:.2} | {:.0} | {:.0} |",
            row.variant,
            row.payload,
            row.rate,
            row.rate * row.payload as f64 / 1e6,
            row.p50,
            row.p99
        );
    }
    println!();
    for (payload, confirmed, queued) in round_ratios {
        let rate = |variant: Variant| {
            rows.iter().find(|r| r.variant == variant.label() && r.payload == payload).map_or(0.0, |r| r.rate)
        };
        println!(
            "{payload} B: comms confirm / raw sequential = {:.2} (rounds {:.2}..{:.2}), comms queued / raw pipelined = \
             {:.2} (rounds {:.2}..{:.2}) (aim >= 0.9)",
            rate(Variant::CommsConfirm) / rate(Variant::RawSequential),
            confirmed.0,
            confirmed.1,
            rate(Variant::CommsQueued) / rate(Variant::RawPipelined),
            queued.0,
            queued.1
        );
    }
}

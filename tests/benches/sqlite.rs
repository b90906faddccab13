//! SQLite throughput, latency and idle cost of comms, compared with a raw rusqlite program doing
//! the same inserts and claims.
//!
//! ```text
//! cargo bench -p comms-tests --bench sqlite
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench sqlite   # quicker, noisier
//! ```
//!
//! Every variant uses a fresh database file in the temp directory (WAL, `synchronous = NORMAL`,
//! the plugin's defaults) and moves payloads of 64 B and 1 KiB:
//!
//! - **comms 1 sender**: two [`Node`]s over `libcomms_sqlite.so` loaded at run time; one task
//!   sends with [`Node::send_raw`], each send awaited until its row is committed; the receiving
//!   node claims rows in batches (lease), routes them and settles them (deletes the rows);
//! - **comms 32 senders**: the same with 32 concurrent sending tasks, so that the plugin's
//!   database thread commits many sends per transaction (group commit);
//! - **raw 1 row/commit**: rusqlite by hand on the same schema: one thread inserts one row per
//!   transaction, another claims up to 256 rows with `BEGIN IMMEDIATE` + `UPDATE ... RETURNING`
//!   (the lease) and deletes them in a second transaction, sleeping 1 ms when it finds nothing;
//! - **raw 256 rows/commit**: the same, inserting 256 rows per transaction.
//!
//! Throughput is from the first send to the last receive, the median of 3 rounds. Latency under
//! load is measured on every message of those rounds (send time stamp in the payload, read at
//! receive): p50 and p99. Ping-pong is one message answered by the other node, p50/p99 of the
//! round trip, unloaded. Idle CPU: the process's CPU time (`/proc/self/stat`) while two nodes
//! wait for messages that do not come, with the default `poll_max_ms = 100`.
//!
//! Counts: 20,000 messages per round and 1,000 ping-pongs, times `COMMS_BENCH_SCALE`.
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the plugin's runtime N worker threads (default: the
//! plugin's own, 1).

use comms_host::{Node, NodeId, PluginLibrary};
use comms_tests::artifacts;
use rusqlite::{params, Connection};
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

const PAYLOAD_SIZES: [usize; 2] = [64, 1024];
const ROUNDS: usize = 3;
const CONCURRENT_SENDERS: usize = 32;
const BATCH: usize = 256;
/// Transports waiting at once for the idle measurement (one alone is below the clock's resolution).
const IDLE_TRANSPORTS: usize = 10;
/// Total send rate of the paced variant, which measures latency under a steady load.
const PACED_RATE: f64 = 10_000.0;
/// Config of the variants that leave the receiver to polling, as a receiver in another process is.
const POLLED: &str = "in_process_wakeup = false\n";
const STEP_LIMIT: Duration = Duration::from_secs(300);

fn fail(message: &str) -> ! {
    comms_tests::bench::fail("sqlite", message)
}

fn scaled(count: usize) -> usize {
    comms_tests::bench::scaled(count, comms_tests::bench::scale("sqlite")).max(CONCURRENT_SENDERS * 4)
}

/// Runs one step under [`STEP_LIMIT`]; a failure ends the benchmark naming the step.
async fn step<T>(what: &str, work: impl std::future::Future<Output = Result<T, String>>) -> T {
    comms_tests::bench::step(what, STEP_LIMIT, work).await.unwrap_or_else(|error| fail(&error))
}

/// Nanoseconds since the benchmark started: the send time stamp carried in every payload.
fn stamp() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn stamped(size: usize) -> Vec<u8> {
    let mut payload = vec![0x5a; size.max(8)];
    payload[..8].copy_from_slice(&stamp().to_be_bytes());
    payload
}

fn age(payload: &[u8]) -> Duration {
    let sent = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
    Duration::from_nanos(stamp().saturating_sub(sent))
}

fn fresh_db(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("comms-bench-sqlite-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|error| fail(&format!("temp dir: {error}")));
    dir.join("comms.db")
}

fn remove_db(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Two comms nodes sharing one database file.
struct CommsPair {
    sender: Node,
    receiver: Node,
    receiver_id: NodeId,
    headers: Vec<(String, String)>,
    path: PathBuf,
}

impl CommsPair {
    async fn start(library: &PluginLibrary, tag: &str, extra: &str) -> Result<Self, String> {
        let path = fresh_db(tag);
        let config = format!("database = {:?}\n{extra}", path);
        let (sender_id, receiver_id) = (format!("{tag}-sender"), format!("{tag}-receiver"));
        let build = |id: &str, peer: &str| {
            Node::builder(id)
                .transport_library("sqlite", library.clone(), &config)
                .static_peer(peer, [("sqlite", peer)])
                .build()
        };
        let receiver = build(&receiver_id, &sender_id).await.map_err(|e| e.to_string())?;
        let sender = build(&sender_id, &receiver_id).await.map_err(|e| e.to_string())?;
        let headers = vec![("content-type".to_string(), "application/octet-stream".to_string())];
        Ok(Self { sender, receiver, receiver_id: NodeId::new(receiver_id), headers, path })
    }

    async fn throughput(
        &self,
        count: usize,
        size: usize,
        senders: usize,
        rate: Option<f64>,
        latencies: &mut Vec<Duration>,
    ) -> Result<Duration, String> {
        let receiver = self.receiver.clone();
        let counter = tokio::spawn(async move {
            let mut ages = Vec::with_capacity(count);
            for n in 0..count {
                let envelope =
                    receiver.receive_envelope().await.map_err(|error| format!("receiving {n}: {error}"))?;
                ages.push(age(&envelope.payload));
            }
            Ok::<_, String>((Instant::now(), ages))
        });
        let start = Instant::now();
        let per_sender = count / senders;
        let tasks: Vec<_> = (0..senders)
            .map(|s| {
                let (node, to, headers) =
                    (self.sender.clone(), self.receiver_id.clone(), self.headers.clone());
                let mine = if s + 1 == senders { count - per_sender * (senders - 1) } else { per_sender };
                // Paced: sender `s` sends its n-th message at start + (n * senders + s) / rate.
                let pace = rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
                let start = tokio::time::Instant::from_std(start);
                tokio::spawn(async move {
                    for n in 0..mine {
                        if let Some(pace) = pace {
                            tokio::time::sleep_until(start + pace * (n * senders + s) as u32).await;
                        }
                        node.send_raw(to.clone(), headers.clone(), stamped(size), None)
                            .await
                            .map_err(|error| format!("sending {n}: {error}"))?;
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(|error| error.to_string())??;
        }
        let (end, ages) = counter.await.map_err(|error| error.to_string())??;
        latencies.extend(ages);
        Ok(end - start)
    }

    async fn ping_pong(&self, count: usize, size: usize, rtts: &mut Vec<Duration>) -> Result<(), String> {
        let echo = {
            let (node, headers) = (self.receiver.clone(), self.headers.clone());
            tokio::spawn(async move {
                for n in 0..count {
                    let ping = node.receive_envelope().await.map_err(|error| format!("ping {n}: {error}"))?;
                    node.send_raw(ping.from, headers.clone(), ping.payload.to_vec(), Some(ping.id))
                        .await
                        .map_err(|error| format!("pong {n}: {error}"))?;
                }
                Ok::<(), String>(())
            })
        };
        for n in 0..count {
            let start = Instant::now();
            self.sender
                .send_raw(self.receiver_id.clone(), self.headers.clone(), stamped(size), None)
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
        remove_db(&self.path);
    }
}

/// The same schema and statements as the plugin, written by hand.
fn raw_open(path: &Path) -> Connection {
    let connection = Connection::open(path).unwrap_or_else(|error| fail(&format!("raw open: {error}")));
    connection.busy_timeout(Duration::from_secs(5)).unwrap_or_else(|error| fail(&error.to_string()));
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS mailbox (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, envelope BLOB NOT NULL,
                 enqueued_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                 locked_until INTEGER NOT NULL DEFAULT 0, owner TEXT);
             CREATE INDEX IF NOT EXISTS mailbox_by_recipient ON mailbox (recipient, id);",
        )
        .unwrap_or_else(|error| fail(&format!("raw schema: {error}")));
    connection
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Raw rusqlite: one thread inserts `count` rows, `per_commit` per transaction; another claims
/// and deletes them. Returns the time from the first insert to the last delete.
fn raw_throughput(count: usize, size: usize, per_commit: usize, latencies: &mut Vec<Duration>) -> Duration {
    let path = fresh_db(&format!("raw-{per_commit}-{size}"));
    drop(raw_open(&path));
    let consumer_path = path.clone();
    let consumer = std::thread::spawn(move || {
        let mut connection = raw_open(&consumer_path);
        let mut ages = Vec::with_capacity(count);
        while ages.len() < count {
            let transaction = connection
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap_or_else(|error| fail(&format!("raw claim: {error}")));
            let now = now_ms();
            let rows: Vec<(i64, Vec<u8>)> = transaction
                .prepare_cached(
                    "UPDATE mailbox SET owner = 'raw', locked_until = ?1, attempts = attempts + 1
                     WHERE id IN (SELECT id FROM mailbox WHERE recipient = 'r' AND locked_until <= ?2
                                  ORDER BY id LIMIT ?3)
                     RETURNING id, envelope",
                )
                .and_then(|mut statement| {
                    statement
                        .query_map(params![now + 30_000, now, BATCH as i64], |row| {
                            Ok((row.get(0)?, row.get(1)?))
                        })?
                        .collect()
                })
                .unwrap_or_else(|error| fail(&format!("raw claim: {error}")));
            transaction.commit().unwrap_or_else(|error| fail(&format!("raw claim: {error}")));
            if rows.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let transaction = connection
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap_or_else(|error| fail(&format!("raw delete: {error}")));
            for (id, envelope) in &rows {
                ages.push(age(envelope));
                transaction
                    .prepare_cached("DELETE FROM mailbox WHERE id = ?1 AND owner = 'raw'")
                    .and_then(|mut statement| statement.execute(params![id]))
                    .unwrap_or_else(|error| fail(&format!("raw delete: {error}")));
            }
            transaction.commit().unwrap_or_else(|error| fail(&format!("raw delete: {error}")));
        }
        (Instant::now(), ages)
    });
    let start = Instant::now();
    let mut connection = raw_open(&path);
    let mut sent = 0;
    while sent < count {
        let transaction = connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap_or_else(|error| fail(&format!("raw insert: {error}")));
        for _ in 0..per_commit.min(count - sent) {
            transaction
                .prepare_cached("INSERT INTO mailbox (recipient, envelope, enqueued_at) VALUES ('r', ?1, ?2)")
                .and_then(|mut statement| statement.execute(params![stamped(size), now_ms()]))
                .unwrap_or_else(|error| fail(&format!("raw insert: {error}")));
            sent += 1;
        }
        transaction.commit().unwrap_or_else(|error| fail(&format!("raw insert: {error}")));
    }
    let (end, ages) = consumer.join().unwrap_or_else(|_| fail("raw consumer panicked"));
    latencies.extend(ages);
    remove_db(&path);
    end - start
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the file; the name ends at field 2, so they are 11 and 12 here.
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

struct Row {
    variant: String,
    size: usize,
    rates: Vec<f64>,
    latencies: Vec<Duration>,
}

impl Row {
    fn print(&mut self) {
        self.rates.sort_by(f64::total_cmp);
        self.latencies.sort_unstable();
        let median = self.rates[self.rates.len() / 2];
        println!(
            "| {:<24} | {:>6} | {:>9.0} | {:>6.1} | {:>8.2} | {:>8.2} | {:>6.0}-{:<6.0} |",
            self.variant,
            self.size,
            median,
            median * self.size as f64 / 1e6,
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.rates[0],
            self.rates[self.rates.len() - 1],
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let threads = comms_tests::bench::plugin_threads("sqlite");
    let library = PluginLibrary::load_with_threads(&artifacts().sqlite_plugin, threads)
        .unwrap_or_else(|error| fail(&error.to_string()));
    let count = scaled(20_000);
    let pings = scaled(1_000);
    let _ = stamp();

    // Idle cost first, while nothing else runs in the process.
    let idle_window = Duration::from_secs_f64((10.0 * comms_tests::bench::scale("sqlite")).clamp(3.0, 10.0));
    let measure_idle = || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu_before, wall_before) = (process_cpu(), Instant::now());
        tokio::time::sleep(idle_window).await;
        (process_cpu() - cpu_before).as_secs_f64() / wall_before.elapsed().as_secs_f64() * 100.0
    };
    let idle_path = fresh_db("idle-transports");
    let idle_config = format!("database = {:?}\n", idle_path);
    let mut waiting = Vec::new();
    for n in 0..IDLE_TRANSPORTS {
        let transport = library
            .new_transport(&NodeId::new(format!("idle-{n}")), "sqlite", &idle_config)
            .await
            .unwrap_or_else(|error| fail(&error.to_string()));
        let transport = std::sync::Arc::new(transport);
        let receiving = std::sync::Arc::clone(&transport);
        waiting.push((transport, tokio::spawn(async move { receiving.receive(16).await })));
    }
    let idle_transport_cpu = measure_idle().await / IDLE_TRANSPORTS as f64;
    for (transport, task) in waiting {
        let _ = transport.close().await;
        let _ = task.await;
    }
    remove_db(&idle_path);
    eprintln!("idle: {idle_transport_cpu:.3}% of one core per idle transport");
    let idle = step("idle pair", CommsPair::start(&library, "idle", "")).await;
    let idle_node_cpu = measure_idle().await / 2.0;
    idle.close().await;
    eprintln!("idle: {idle_node_cpu:.3}% of one core per idle node");

    let mut rows = Vec::new();
    let mut pongs = Vec::new();
    for size in PAYLOAD_SIZES {
        let mut comms_one = Row { variant: "comms 1 sender".into(), size, rates: vec![], latencies: vec![] };
        let mut comms_many = Row {
            variant: format!("comms {CONCURRENT_SENDERS} senders"),
            size,
            rates: vec![],
            latencies: vec![],
        };
        let mut comms_paced = Row {
            variant: format!("comms paced {}k msg/s", PACED_RATE / 1000.0),
            size,
            rates: vec![],
            latencies: vec![],
        };
        let mut comms_polled = Row {
            variant: format!("comms paced {}k, polled", PACED_RATE / 1000.0),
            size,
            rates: vec![],
            latencies: vec![],
        };
        let mut raw_one = Row { variant: "raw 1 row/commit".into(), size, rates: vec![], latencies: vec![] };
        let mut raw_batch =
            Row { variant: format!("raw {BATCH} rows/commit"), size, rates: vec![], latencies: vec![] };
        for round in 0..ROUNDS {
            eprintln!("payload {size} B, round {}/{ROUNDS}", round + 1);
            for (n, (row, senders, rate, extra)) in [
                (&mut comms_one, 1, None, ""),
                (&mut comms_many, CONCURRENT_SENDERS, None, ""),
                (&mut comms_paced, CONCURRENT_SENDERS, Some(PACED_RATE), ""),
                (&mut comms_polled, CONCURRENT_SENDERS, Some(PACED_RATE), POLLED),
            ]
            .into_iter()
            .enumerate()
            {
                let tag = format!("t{size}-{round}-{n}");
                let pair = step("starting nodes", CommsPair::start(&library, &tag, extra)).await;
                let elapsed =
                    step("comms throughput", pair.throughput(count, size, senders, rate, &mut row.latencies))
                        .await;
                row.rates.push(count as f64 / elapsed.as_secs_f64());
                pair.close().await;
            }
            let (one, batch) = (&mut raw_one, &mut raw_batch);
            let elapsed = tokio::task::block_in_place(|| raw_throughput(count, size, 1, &mut one.latencies));
            one.rates.push(count as f64 / elapsed.as_secs_f64());
            let elapsed =
                tokio::task::block_in_place(|| raw_throughput(count, size, BATCH, &mut batch.latencies));
            batch.rates.push(count as f64 / elapsed.as_secs_f64());
        }
        rows.extend([comms_one, comms_many, comms_paced, comms_polled, raw_one, raw_batch]);

        for (label, extra) in [("woken", ""), ("polled", POLLED)] {
            let pair =
                step("starting nodes", CommsPair::start(&library, &format!("ping{size}-{label}"), extra))
                    .await;
            let mut rtts = Vec::with_capacity(pings);
            step("ping-pong", pair.ping_pong(pings, size, &mut rtts)).await;
            rtts.sort_unstable();
            pongs.push((size, label, percentile(&rtts, 0.5), percentile(&rtts, 0.99)));
            pair.close().await;
        }
    }

    println!();
    println!("SQLite, {count} messages per round, median of {ROUNDS} rounds (msg/s range over rounds):");
    println!();
    println!(
        "| variant                  | bytes  | msg/s     | MB/s   | p50 ms   | p99 ms   | range         |"
    );
    println!(
        "|--------------------------|--------|-----------|--------|----------|----------|---------------|"
    );
    for row in &mut rows {
        row.print();
    }
    println!();
    for (size, label, p50, p99) in pongs {
        println!(
            "ping-pong through comms, {size} B, {label}: round trip p50 {p50:.2} ms, p99 {p99:.2} ms ({pings} round trips)"
        );
    }
    println!(
        "idle, poll_max_ms = 100: {idle_transport_cpu:.3}% of one core per waiting transport ({IDLE_TRANSPORTS} \
         measured together); {idle_node_cpu:.3}% per node of an idle pair of Nodes (default liveness: a \
         heartbeat message per second each way)"
    );
}

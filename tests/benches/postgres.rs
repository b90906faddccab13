//! PostgreSQL throughput of comms (`plugins/postgres`, loaded at run time), against a raw
//! tokio-postgres program doing the same database work, and against Watermill's published
//! figures for its SQL adapter on PostgreSQL (3,800 msg/s published, 455 msg/s subscribed).
//!
//! ```text
//! cargo bench -p comms-tests --bench postgres
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench postgres   # quicker, noisier
//! ```
//!
//! Needs the PostgreSQL at 127.0.0.1:5432 (database `test`, user `postgres`, trust auth); every
//! run works in a schema of its own and drops it. Payloads of 64 B and 1 KiB, three phases:
//!
//! - **publish**: N messages sent with `WINDOW` sends in flight, nobody receiving; rate at which
//!   the sends completed (each is committed when it completes). comms also with `WINDOW`
//!   messages per [`Node::send_raw_many`] call, one call after the other, as the raw program
//!   writes them (then "subscribe" takes both batches);
//! - **subscribe**: a receiver starts and takes those N messages; rate from its start to the
//!   last message (each claimed, handed over and deleted);
//! - **one-way**: sender and receiver at once, with one-way latency (p50, p99) under that load;
//!   comms also in the raw program's shape: `WINDOW` messages per `send_raw_many` call, one call
//!   after the other, and the receiver taking up to `CLAIM` at a time with
//!   [`Node::receive_envelopes`].
//!
//! Variants:
//!
//! - **comms**: [`Node`]s on `libcomms_postgres.so`, default config (the plugin writes queued
//!   sends in one statement per batch, claims batches with `FOR UPDATE SKIP LOCKED` under a lease,
//!   and is woken by `LISTEN/NOTIFY`);
//! - **raw tokio-postgres**: the same tables and statements by hand, as a user who knows the
//!   pattern writes them: a mailbox table, sends written `WINDOW` rows per `INSERT ... unnest`
//!   statement (autocommit), a receiver claiming up to 256 rows with `UPDATE ... FOR UPDATE SKIP
//!   LOCKED RETURNING`, then deleting them; an empty mailbox is polled again after 1 ms;
//! - **raw tokio-postgres, woken**: the same program doing the wake-up work that comms does (and
//!   that a receiver needs so as not to poll an idle mailbox): each insert is followed by a
//!   `pg_notify` of the mailbox's channel in a statement of its own, pipelined with the insert
//!   (one round trip), and the receiver `LISTEN`s on its connection and claims again when
//!   notified instead of after 1 ms (with a 5 s safety poll, the plugin's default `poll_ms`);
//! - **raw tokio-postgres, woken, message fields**: the woken program carrying what a comms
//!   message carries besides its payload, as the raw NATS program of `benches/nats.rs` carries
//!   comms' headers: each row also holds a message id (16 bytes) and the sender and headers as
//!   a JSON object (`json`), as the columns of Watermill's SQL schema do (`uuid`, `payload`,
//!   `metadata`); the sender writes them per message and the receiver reads and parses them.
//!   The two variants before it store bare payloads: what a program that needs no id, sender
//!   or headers gets away with.
//!
//! `COMMS_BENCH_PAYLOADS=64` measures that payload size only (a comma-separated list of byte
//! counts).
//!
//! Messages per run: 10,000 times `COMMS_BENCH_SCALE`, median of 3 runs. Aims: comms >= 0.9x
//! raw, and 10x Watermill (38,000 published, 4,550 subscribed msg/s).
//!
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the plugin's runtime N worker threads (default: the
//! plugin's own, 2).
//! `COMMS_BENCH_POSTGRES_PLUGIN=/path/to/libcomms_postgres.so` measures that build of the plugin
//! instead of building `plugins/postgres` (to compare two builds in alternating runs).

use comms_host::{Node, PluginLibrary};
use comms_tests::bench::{
    one_way::{self, latency_nanos, stamped_payload, summarize, Run},
    RAW_CONTENT_TYPE,
};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};

const CONNECTION: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
const URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Sends in flight at once (comms), rows per insert (raw).
const WINDOW: usize = 64;
/// Rows claimed at once by the raw receiver (the plugin's default `batch_size` is the same).
const CLAIM: i64 = 256;
const RUNS: usize = 3;
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// Watermill's SQL adapter on PostgreSQL, published figures (msg/s).
const WATERMILL_PUBLISH: f64 = 3_800.0;
const WATERMILL_SUBSCRIBE: f64 = 455.0;

fn fail(message: &str) -> ! {
    comms_tests::bench::fail("postgres", message)
}

async fn connect() -> Result<Client, String> {
    let (client, connection) =
        tokio_postgres::connect(CONNECTION, NoTls).await.map_err(|error| format!("connecting: {error}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A connection whose notifications wake the returned [`Notify`] (which holds one wake-up at most,
/// so a notification that comes while the receiver claims is not missed).
async fn connect_woken() -> Result<(Client, Arc<Notify>), String> {
    let (client, mut connection) =
        tokio_postgres::connect(CONNECTION, NoTls).await.map_err(|error| format!("connecting: {error}"))?;
    let woken = Arc::new(Notify::new());
    let wake = Arc::clone(&woken);
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Ok((client, woken))
}

/// How the raw receiver learns that its mailbox holds something new.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wake {
    /// It claims again 1 ms after finding the mailbox empty; nobody notifies.
    Poll,
    /// Every insert notifies the mailbox's channel; an empty mailbox waits for a notification.
    Notify,
}

/// What a raw row carries besides its recipient and payload.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fields {
    /// Nothing: the payload alone.
    Bare,
    /// A message id and the sender and headers (JSON), as a comms envelope carries them.
    Message,
}

/// The sender and headers of a raw message with [`Fields::Message`], as its `metadata` column
/// holds them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Metadata {
    from: String,
    headers: Vec<(String, String)>,
}

/// The safety poll of the woken raw receiver (the plugin's default `poll_ms`).
const SAFETY_POLL: Duration = Duration::from_secs(5);

/// The notification channel of the raw program's mailbox in `schema`.
fn channel(schema: &str) -> String {
    format!("{schema}_mailbox")
}

fn schema_name(variant: &str, run: usize, size: usize) -> String {
    format!("comms_bench_{}_{variant}_{run}_{size}", std::process::id())
}

async fn drop_schema(schema: &str) {
    if let Ok(client) = connect().await {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
    }
}

/// The three phases of one run.
#[derive(Debug, Clone, Copy)]
struct Phases {
    publish: f64,
    /// comms only: `WINDOW` messages per `send_raw_many` call (the raw program's `publish`).
    publish_batched: f64,
    subscribe: f64,
    one_way: Run,
    /// comms only: one-way with `WINDOW` messages per `send_raw_many` call and the receiver
    /// taking up to `CLAIM` at a time (the raw program's `one_way`).
    one_way_batched: Run,
}

async fn comms_node(
    library: &PluginLibrary,
    id: &str,
    schema: &str,
    peer: Option<&str>,
) -> Result<Node, String> {
    let config = format!("url = \"{URL}\"\nschema = \"{schema}\"\n");
    let mut builder = Node::builder(id).liveness(None, Duration::from_secs(5)).transport_library(
        "postgres",
        library.clone(),
        &config,
    );
    if let Some(peer) = peer {
        // A PostgreSQL node's address is its node id.
        builder = builder.static_peer(peer, [("postgres", peer)]);
    }
    builder.build().await.map_err(|error| format!("node {id}: {error}"))
}

async fn comms_run(
    library: &PluginLibrary,
    run: usize,
    size: usize,
    messages: usize,
) -> Result<Phases, String> {
    let schema = schema_name("comms", run, size);
    let result = async {
        let sender = comms_node(library, "sender", &schema, Some("receiver")).await?;
        let publish = one_way::publish_only(&sender, "receiver", size, messages, WINDOW).await?;
        let publish_batched = one_way::publish_batched(&sender, "receiver", size, messages, WINDOW).await?;
        let started = Instant::now();
        let receiver = comms_node(library, "receiver", &schema, None).await?;
        one_way::receive_only(&receiver, 2 * messages).await?;
        let subscribe = 2.0 * messages as f64 / started.elapsed().as_secs_f64();
        let one_way = one_way::through_nodes(sender, receiver, "receiver", size, messages, WINDOW).await?;
        let sender = comms_node(library, "sender", &schema, Some("receiver")).await?;
        let receiver = comms_node(library, "receiver", &schema, None).await?;
        let take = CLAIM as usize;
        let one_way_batched =
            one_way::through_nodes_batched(sender, receiver, "receiver", size, messages, WINDOW, take)
                .await?;
        Ok(Phases { publish, publish_batched, subscribe, one_way, one_way_batched })
    }
    .await;
    drop_schema(&schema).await;
    result
}

/// The raw program's mailbox, in `schema`.
async fn raw_mailbox(client: &Client, schema: &str, fields: Fields) -> Result<(), String> {
    let message_fields = match fields {
        Fields::Bare => "",
        Fields::Message => "message_id bytea NOT NULL, metadata json NOT NULL,",
    };
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\";
             CREATE TABLE \"{schema}\".mailbox (
                 id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 recipient    text        NOT NULL,
                 {message_fields}
                 payload      bytea       NOT NULL,
                 owner        text,
                 locked_until timestamptz NOT NULL DEFAULT '-infinity',
                 attempts     integer     NOT NULL DEFAULT 0);
             CREATE INDEX ON \"{schema}\".mailbox (recipient, id);"
        ))
        .await
        .map_err(|error| format!("creating the mailbox: {error}"))
}

/// Sends `messages` payloads in inserts of `WINDOW` rows (each followed by a notification when
/// `wake` is [`Wake::Notify`]); the rate at which they committed.
async fn raw_publish(
    client: &Client,
    schema: &str,
    size: usize,
    messages: usize,
    (wake, fields): (Wake, Fields),
) -> Result<f64, String> {
    let insert = match fields {
        Fields::Bare => format!(
            "INSERT INTO \"{schema}\".mailbox (recipient, payload) SELECT 'receiver', p FROM unnest($1::bytea[]) AS p"
        ),
        Fields::Message => format!(
            "INSERT INTO \"{schema}\".mailbox (recipient, message_id, metadata, payload)
             SELECT 'receiver', i, m::json, p FROM unnest($1::bytea[], $2::text[], $3::bytea[]) AS r(i, m, p)"
        ),
    };
    let insert = client.prepare(&insert).await.map_err(|error| format!("preparing the insert: {error}"))?;
    let notify = client
        .prepare("SELECT pg_notify($1, '')")
        .await
        .map_err(|error| format!("preparing the notification: {error}"))?;
    let channel = channel(schema);
    // Ids as comms makes them: unique per process run, then counted.
    let id_prefix: u64 = rand::random();
    let started = Instant::now();
    let mut sent = 0;
    while sent < messages {
        let rows = WINDOW.min(messages - sent);
        let payloads: Vec<Vec<u8>> = (0..rows).map(|_| stamped_payload(size)).collect();
        let (ids, metadata): (Vec<[u8; 16]>, Vec<String>) = match fields {
            Fields::Bare => Default::default(),
            Fields::Message => (sent..sent + rows)
                .map(|n| {
                    let id = (u128::from(id_prefix) << 64 | n as u128).to_be_bytes();
                    let headers = vec![("content-type".to_string(), RAW_CONTENT_TYPE.to_string())];
                    let metadata = Metadata { from: "sender".to_string(), headers };
                    (id, serde_json::to_string(&metadata).expect("metadata is JSON"))
                })
                .unzip(),
        };
        let ids_parameter: Vec<&[u8]> = ids.iter().map(|id| id.as_slice()).collect();
        let channel_parameter = [&channel as _];
        let rows_parameter: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match fields {
            Fields::Bare => vec![&payloads],
            Fields::Message => vec![&ids_parameter, &metadata, &payloads],
        };
        let inserting = client.execute(&insert, &rows_parameter);
        if wake == Wake::Notify {
            // Both statements go out at once (the client pipelines them) and the server runs
            // them in order, each its own transaction: the notification follows the commit.
            let notifying = client.query_one(&notify, &channel_parameter);
            futures::try_join!(inserting, notifying).map_err(|error| format!("inserting: {error}"))?;
        } else {
            inserting.await.map_err(|error| format!("inserting: {error}"))?;
        }
        sent += rows;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Claims, takes and deletes `messages` messages; their one-way latencies. An empty mailbox is
/// claimed again after 1 ms, or, with `woken`, once a notification (or the safety poll) comes.
async fn raw_receive(
    client: &Client,
    schema: &str,
    messages: usize,
    woken: Option<&Notify>,
    fields: Fields,
) -> Result<Vec<u64>, String> {
    let returned = match fields {
        Fields::Bare => "m.id, m.payload",
        Fields::Message => "m.id, m.payload, m.message_id, m.metadata::text",
    };
    let claim = client
        .prepare(&format!(
            "UPDATE \"{schema}\".mailbox m
             SET owner = 'receiver', locked_until = now() + interval '30 seconds', attempts = m.attempts + 1
             FROM (SELECT id FROM \"{schema}\".mailbox
                   WHERE recipient = 'receiver' AND locked_until <= now()
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) free
             WHERE m.id = free.id
             RETURNING {returned}"
        ))
        .await
        .map_err(|error| format!("preparing the claim: {error}"))?;
    let delete = client
        .prepare(&format!("DELETE FROM \"{schema}\".mailbox WHERE id = ANY($1) AND owner = 'receiver'"))
        .await
        .map_err(|error| format!("preparing the delete: {error}"))?;
    let mut latencies = Vec::with_capacity(messages);
    while latencies.len() < messages {
        let rows = client.query(&claim, &[&CLAIM]).await.map_err(|error| format!("claiming: {error}"))?;
        if rows.is_empty() {
            match woken {
                Some(woken) => {
                    let _ = tokio::time::timeout(SAFETY_POLL, woken.notified()).await;
                }
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
            continue;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.get::<_, i64>(0));
            latencies.push(latency_nanos(row.get::<_, &[u8]>(1)));
            if fields == Fields::Message {
                // What the application gets besides the payload: the id, the sender, the headers.
                if row.get::<_, &[u8]>(2).len() != 16 {
                    return Err("a message id that is not 16 bytes".to_string());
                }
                let metadata: Metadata = serde_json::from_str(row.get::<_, &str>(3))
                    .map_err(|error| format!("reading a message's metadata: {error}"))?;
                if metadata.from.is_empty() {
                    return Err("a message without its sender".to_string());
                }
            }
        }
        client.execute(&delete, &[&ids]).await.map_err(|error| format!("deleting: {error}"))?;
    }
    Ok(latencies)
}

/// The raw program's variants: how its receiver wakes, what its rows carry, its name.
const RAW_VARIANTS: [(Wake, Fields, &str); 3] = [
    (Wake::Poll, Fields::Bare, "raw tokio-postgres"),
    (Wake::Notify, Fields::Bare, "raw tokio-postgres, woken"),
    (Wake::Notify, Fields::Message, "raw tokio-postgres, woken, message fields"),
];

async fn raw_run(
    run: usize,
    size: usize,
    messages: usize,
    (wake, fields, _): (Wake, Fields, &str),
) -> Result<Phases, String> {
    // Short: the notification channel's name is the schema's and at most 63 bytes.
    let variant = match (wake, fields) {
        (Wake::Poll, _) => "raw",
        (Wake::Notify, Fields::Bare) => "rawwoken",
        (Wake::Notify, Fields::Message) => "rawfields",
    };
    let schema = schema_name(variant, run, size);
    let result = async {
        let sender = connect().await?;
        raw_mailbox(&sender, &schema, fields).await?;
        let publish = raw_publish(&sender, &schema, size, messages, (wake, fields)).await?;
        let started = Instant::now();
        let (receiver, woken) = connect_woken().await?;
        if wake == Wake::Notify {
            let listen = format!("LISTEN \"{}\"", channel(&schema));
            receiver.batch_execute(&listen).await.map_err(|error| format!("listening: {error}"))?;
        }
        let woken = (wake == Wake::Notify).then_some(woken);
        raw_receive(&receiver, &schema, messages, woken.as_deref(), fields).await?;
        let subscribe = messages as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let receiving = {
            let schema = schema.clone();
            tokio::spawn(
                async move { raw_receive(&receiver, &schema, messages, woken.as_deref(), fields).await },
            )
        };
        raw_publish(&sender, &schema, size, messages, (wake, fields)).await?;
        let latencies = receiving.await.map_err(|error| format!("receiving task: {error}"))??;
        let one_way = summarize(started.elapsed(), messages, latencies);
        Ok(Phases { publish, publish_batched: publish, subscribe, one_way, one_way_batched: one_way })
    }
    .await;
    drop_schema(&schema).await;
    result
}

fn main() {
    if !comms_tests::broker_available("PostgreSQL", comms_tests::POSTGRES) {
        return;
    }
    let scale = comms_tests::bench::scale("postgres");
    let messages = comms_tests::bench::scaled(10_000, scale).max(100);
    let threads = comms_tests::bench::plugin_threads("postgres");
    let plugin = match std::env::var_os("COMMS_BENCH_POSTGRES_PLUGIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => comms_tests::artifacts().postgres_plugin().to_path_buf(),
    };
    let library = PluginLibrary::load_with_threads(&plugin, threads)
        .unwrap_or_else(|error| fail(&format!("loading the PostgreSQL plugin: {error}")));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("PostgreSQL, {messages} messages per run, {WINDOW} sends in flight, median of {RUNS} runs\n");
    // Per size: comms' runs, then each raw variant's runs (in `RAW_VARIANTS`' order).
    let mut results: Vec<(usize, Vec<Phases>, Vec<Vec<Phases>>)> = Vec::new();
    for size in comms_tests::bench::payload_sizes("postgres", &[64, 1024]) {
        let (mut comms, mut raw) = (Vec::new(), vec![Vec::new(); RAW_VARIANTS.len()]);
        for run in 0..RUNS {
            // Each run starts with another variant: the server's background work (checkpoints,
            // autovacuum) that a variant's writes leave falls on a different one each run.
            let mut order: Vec<usize> = (0..=RAW_VARIANTS.len()).collect();
            let variants = order.len();
            order.rotate_left(run % variants);
            for variant in order {
                let Some(raw_variant) = variant.checked_sub(1).map(|index| RAW_VARIANTS[index]) else {
                    eprintln!("run {run}, {size} B: comms");
                    let step = comms_tests::bench::step(
                        "comms",
                        STEP_LIMIT,
                        comms_run(&library, run, size, messages),
                    );
                    comms.push(runtime.block_on(step).unwrap_or_else(|error| fail(&error)));
                    continue;
                };
                let name = raw_variant.2;
                eprintln!("run {run}, {size} B: {name}");
                let step =
                    comms_tests::bench::step(name, STEP_LIMIT, raw_run(run, size, messages, raw_variant));
                raw[variant - 1].push(runtime.block_on(step).unwrap_or_else(|error| fail(&error)));
            }
        }
        results.push((size, comms, raw));
    }
    println!("Publish and subscribe (msg/s, median of {RUNS}; Watermill on PostgreSQL: {WATERMILL_PUBLISH} / {WATERMILL_SUBSCRIBE})\n");
    println!("| variant | payload | publish | publish, {WINDOW} per call | subscribe | publish / Watermill | subscribe / Watermill |");
    println!("|---|---|---|---|---|---|---|");
    let median_of = |runs: &[Phases], pick: fn(&Phases) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    // Per size, per raw variant: comms / raw for publish, publish in batches, subscribe.
    let mut ratios = Vec::new();
    for (size, comms, raw) in &results {
        let variants = std::iter::once(("comms (plugin, Node API)", comms))
            .chain(RAW_VARIANTS.iter().map(|variant| variant.2).zip(raw));
        let mut rates = Vec::new();
        for (variant, runs) in variants {
            let (publish, subscribe) = (median_of(runs, |p| p.publish), median_of(runs, |p| p.subscribe));
            let batched = median_of(runs, |p| p.publish_batched);
            println!(
                "| {variant} | {size} B | {publish:.0} | {batched:.0} | {subscribe:.0} | {:.1}x | {:.1}x |",
                publish / WATERMILL_PUBLISH,
                subscribe / WATERMILL_SUBSCRIBE
            );
            rates.push((publish, batched, subscribe));
        }
        let against = |raw: &(f64, f64, f64)| (rates[0].0 / raw.0, rates[0].1 / raw.1, rates[0].2 / raw.2);
        ratios.push((*size, rates[1..].iter().map(against).collect::<Vec<_>>()));
    }
    println!("\nOne-way, sender and receiver at once\n");
    one_way::print_header();
    let mut one_way_ratios = Vec::new();
    for (size, comms, raw) in &results {
        let batched_variant = format!("comms, {WINDOW} per call, up to {CLAIM} taken at once");
        let single =
            one_way::print_row("comms (plugin, Node API)", *size, comms.iter().map(|p| p.one_way).collect());
        let batched =
            one_way::print_row(&batched_variant, *size, comms.iter().map(|p| p.one_way_batched).collect());
        let against: Vec<(f64, f64)> = RAW_VARIANTS
            .iter()
            .zip(raw)
            .map(|(variant, runs)| {
                let raw = one_way::print_row(variant.2, *size, runs.iter().map(|p| p.one_way).collect());
                (single / raw, batched / raw)
            })
            .collect();
        one_way_ratios.push(against);
    }
    println!();
    for ((size, rates), one_way) in ratios.into_iter().zip(one_way_ratios) {
        for ((variant, (publish, batched, subscribe)), (one_way, one_way_batched)) in
            RAW_VARIANTS.iter().zip(rates).zip(one_way)
        {
            let baseline = variant.2;
            println!(
                "{size} B: comms / {baseline}: publish {publish:.2} ({WINDOW} per call {batched:.2}), subscribe \
                 {subscribe:.2}, one-way {one_way:.2} ({WINDOW} per call {one_way_batched:.2}) (aim >= 0.9)"
            );
        }
    }
}

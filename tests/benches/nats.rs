//! NATS JetStream throughput and latency of comms (`plugins/nats`, loaded at run time), against
//! a raw async-nats program doing the same broker work.
//!
//! ```text
//! cargo bench -p comms-tests --bench nats
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench nats   # quicker, noisier
//! ```
//!
//! Needs the NATS server with JetStream at 127.0.0.1:4222; every run makes a stream of its own
//! and deletes it. Two variants, payloads of 64 B and 1 KiB:
//!
//! - **comms**: two [`Node`]s on `libcomms_nats.so`; the sender keeps `WINDOW` sends in flight
//!   ([`Node::send_raw`] completes when the stream stored the message), the receiver takes them
//!   with [`Node::receive_envelope`] (the node acknowledges each one to the server once the
//!   application took it);
//! - **raw async-nats**: the same by hand, as its documentation shows: a work-queue stream on
//!   file storage, `publish_with_headers` with the headers the plugin writes (id, sender,
//!   headers), `WINDOW` publish acknowledgements awaited at once, a durable pull consumer with
//!   explicit acks read through `messages()`, one `ack` per message.
//!
//! Each message carries its send time; the receiver reports one-way latency under that load
//! (p50, p99) and throughput from the first send to the last receive. Messages per run: 20,000
//! times `COMMS_BENCH_SCALE`, median of 3 runs. The aim is comms >= 0.9x raw.
//!
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the plugin's runtime N worker threads (default: the
//! plugin's own, 1). `COMMS_BENCH_NATS_PLUGIN=/path/to/libcomms_nats.so` measures that build of
//! the plugin instead of building `plugins/nats` (to compare two builds in alternating runs). `COMMS_BENCH_ONLY=comms` (or `raw`) runs one variant alone, e.g. to count
//! the CPU time it takes of the client and of the server.

use async_nats::{
    jetstream::{self, consumer::pull, stream},
    HeaderMap,
};
use comms_host::{Node, PluginLibrary};
use comms_tests::bench::one_way::{self, latency_nanos, stamped_payload, summarize, Run};
use futures::StreamExt;
use std::time::{Duration, Instant};

const URL: &str = "nats://127.0.0.1:4222";
/// Sends in flight at once.
const WINDOW: usize = 64;
const RUNS: usize = 3;
const STEP_LIMIT: Duration = Duration::from_secs(300);

fn fail(message: &str) -> ! {
    comms_tests::bench::fail("nats", message)
}

/// Names of one run's own: the stream and the subject prefix.
fn names(variant: &str, run: usize, size: usize) -> (String, String) {
    let unique = format!("{}_{variant}_{run}_{size}", std::process::id());
    (format!("comms_bench_{unique}"), format!("b{unique}"))
}

async fn delete_stream(name: &str) {
    if let Ok(client) = async_nats::connect(URL).await {
        let _ = jetstream::new(client).delete_stream(name).await;
    }
}

async fn comms_run(library: &PluginLibrary, run: usize, size: usize, messages: usize) -> Result<Run, String> {
    let (stream, prefix) = names("comms", run, size);
    let config = format!("url = \"{URL}\"\nstream = \"{stream}\"\nprefix = \"{prefix}\"\n");
    let id = |role: &str| format!("bench-{run}-{size}-{role}");
    let receiver = Node::builder(id("receiver"))
        .liveness(None, Duration::from_secs(5))
        .transport_library("nats", library.clone(), &config)
        .build()
        .await
        .map_err(|error| format!("receiver node: {error}"))?;
    let address = receiver.transports()[0].local_address.clone();
    let sender = Node::builder(id("sender"))
        .liveness(None, Duration::from_secs(5))
        .transport_library("nats", library.clone(), &config)
        .static_peer(&id("receiver"), [("nats", address.as_str())])
        .build()
        .await
        .map_err(|error| format!("sender node: {error}"))?;
    let result = one_way::through_nodes(sender, receiver, &id("receiver"), size, messages, WINDOW).await;
    delete_stream(&stream).await;
    result
}

async fn raw_run(run: usize, size: usize, messages: usize) -> Result<Run, String> {
    let (stream_name, prefix) = names("raw", run, size);
    let inbox = format!("{prefix}.inbox.receiver");
    let connect = || async { async_nats::connect(URL).await.map_err(|error| format!("connecting: {error}")) };
    let (publisher, consumer_client) = (jetstream::new(connect().await?), jetstream::new(connect().await?));
    let stream = publisher
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}.inbox.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("creating the stream: {error}"))?;
    let consumer: pull::Stream = consumer_client
        .get_stream(&stream_name)
        .await
        .map_err(|error| format!("getting the stream: {error}"))?
        .create_consumer(pull::Config {
            durable_name: Some("receiver".to_string()),
            filter_subject: inbox.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("creating the consumer: {error}"))?
        .messages()
        .await
        .map_err(|error| format!("starting to consume: {error}"))?;
    drop(stream);
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        let mut consumer = consumer;
        let mut latencies = Vec::with_capacity(messages);
        while latencies.len() < messages {
            let message = match consumer.next().await {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(format!("consuming: {error}")),
                None => return Err("the consumer ended".to_string()),
            };
            latencies.push(latency_nanos(&message.payload));
            message.ack().await.map_err(|error| format!("acknowledging: {error}"))?;
        }
        Ok(latencies)
    });
    let sent: Vec<Result<(), String>> = futures::stream::iter(0..messages)
        .map(|n| {
            let (publisher, inbox) = (&publisher, inbox.clone());
            async move {
                let mut headers = HeaderMap::new();
                headers.insert("Comms-Id", format!("{n:032x}").as_str());
                headers.insert("Comms-From", "sender");
                headers.insert("Comms-Headers", r#"[["content-type","application/octet-stream"]]"#);
                let acknowledged = publisher
                    .publish_with_headers(inbox, headers, stamped_payload(size).into())
                    .await
                    .map_err(|error| format!("publishing {n}: {error}"))?;
                acknowledged.await.map(drop).map_err(|error| format!("publish {n} not stored: {error}"))
            }
        })
        .buffer_unordered(WINDOW)
        .collect()
        .await;
    sent.into_iter().collect::<Result<(), String>>()?;
    let latencies = receiving.await.map_err(|error| format!("receiving task: {error}"))??;
    let elapsed = started.elapsed();
    delete_stream(&stream_name).await;
    Ok(summarize(elapsed, messages, latencies))
}

fn main() {
    if !comms_tests::broker_available("NATS", comms_tests::NATS) {
        return;
    }
    let scale = comms_tests::bench::scale("nats");
    let messages = comms_tests::bench::scaled(20_000, scale).max(100);
    let threads = comms_tests::bench::plugin_threads("nats");
    let plugin = match std::env::var_os("COMMS_BENCH_NATS_PLUGIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => comms_tests::artifacts().nats_plugin().to_path_buf(),
    };
    let library = PluginLibrary::load_with_threads(&plugin, threads)
        .unwrap_or_else(|error| fail(&format!("loading the NATS plugin: {error}")));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!(
        "NATS JetStream, {messages} messages per run, {WINDOW} sends in flight, median of {RUNS} runs\n"
    );
    one_way::print_header();
    let only = std::env::var("COMMS_BENCH_ONLY").unwrap_or_default();
    let (run_comms, run_raw) = (only != "raw", only != "comms");
    let mut ratios = Vec::new();
    for size in [64usize, 1024] {
        let (mut comms, mut raw) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            if run_comms {
                eprintln!("run {run}, {size} B: comms");
                let step =
                    comms_tests::bench::step("comms", STEP_LIMIT, comms_run(&library, run, size, messages));
                comms.push(runtime.block_on(step).unwrap_or_else(|error| fail(&error)));
            }
            if run_raw {
                eprintln!("run {run}, {size} B: raw async-nats");
                let step =
                    comms_tests::bench::step("raw async-nats", STEP_LIMIT, raw_run(run, size, messages));
                raw.push(runtime.block_on(step).unwrap_or_else(|error| fail(&error)));
            }
        }
        // A variant left out (COMMS_BENCH_ONLY) gives no row, and its ratio is NaN.
        let comms =
            if run_comms { one_way::print_row("comms (plugin, Node API)", size, comms) } else { f64::NAN };
        let raw = if run_raw { one_way::print_row("raw async-nats", size, raw) } else { f64::NAN };
        ratios.push((size, comms / raw));
    }
    println!();
    for (size, ratio) in ratios {
        println!("{size} B: comms / raw async-nats = {ratio:.2} (aim >= 0.9)");
    }
}

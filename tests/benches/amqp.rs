//! AMQP (RabbitMQ) throughput and latency of comms, against a raw lapin program doing the same
//! broker operations.
//!
//! ```text
//! cargo bench -p comms-tests --bench amqp
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench amqp   # quicker, noisier
//! ```
//!
//! Needs the RabbitMQ of this machine (127.0.0.1:5672, guest/guest). Two variants, payloads of
//! 64 B and 1 KiB:
//!
//! - **comms**: two [`Node`]s on `libcomms_amqp.so` loaded dynamically; the sender calls
//!   [`Node::send_raw`] with up to `WINDOW` sends in flight (each completes when the broker has
//!   confirmed the message), the receiver takes them with [`Node::receive_envelope`] (the node
//!   acknowledges each one to the broker once it is in its inbox);
//! - **raw lapin**: the same operations by hand: a durable queue, a publishing channel in
//!   confirm mode, `mandatory` persistent publishes with a `message_id`, `WINDOW` publishes
//!   awaiting their confirms at once, a consumer with prefetch 256 and manual acks (one
//!   `basic.ack` per message, as a straightforward program does).
//!
//! Each message carries its send time; the receiver reports one-way latency under that load
//! (p50, p99) and throughput from the first send to the last receive. Messages per run: 20,000
//! times `COMMS_BENCH_SCALE` (default 1), median of 3 runs.
//!
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the plugin's runtime N worker threads (default: the
//! plugin's own, 2).

use comms_host::{Node, PluginLibrary};
use comms_tests::bench::one_way::{self, latency_nanos, stamped_payload, summarize, Run};
use futures::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Connection, ConnectionProperties,
};
use std::{sync::Arc, time::Duration};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Sends in flight at once.
const WINDOW: usize = 64;
const RUNS: usize = 3;

async fn comms_run(library: &PluginLibrary, run: usize, size: usize, messages: usize) -> Run {
    let id = |role: &str| format!("bench-{}-{run}-{size}-{role}", std::process::id());
    let config = "inbox_expires_ms = 60000";
    let receiver = Node::builder(id("receiver"))
        .liveness(None, Duration::from_secs(5))
        .transport_library("amqp", library.clone(), config)
        .build()
        .await
        .expect("receiver node");
    let address = receiver.transports()[0].local_address.clone();
    let sender = Node::builder(id("sender"))
        .liveness(None, Duration::from_secs(5))
        .transport_library("amqp", library.clone(), config)
        .static_peer(&id("receiver"), [("amqp", address.as_str())])
        .build()
        .await
        .expect("sender node");
    one_way::through_nodes(sender, receiver, &id("receiver"), size, messages, WINDOW)
        .await
        .unwrap_or_else(|error| comms_tests::bench::fail("amqp", &error))
}

async fn raw_run(run: usize, size: usize, messages: usize) -> Run {
    let queue = format!("bench-raw-{}-{run}-{size}", std::process::id());
    let connect = || Connection::connect(URL, ConnectionProperties::default());
    let (publisher_connection, consumer_connection) = (connect().await.unwrap(), connect().await.unwrap());
    let publisher = publisher_connection.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    publisher.queue_declare(queue.as_str().into(), durable, arguments).await.unwrap();
    let consumer_channel = consumer_connection.create_channel().await.unwrap();
    consumer_channel.basic_qos(256, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let receiving = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(messages);
        while latencies.len() < messages {
            let delivery = consumer.next().await.expect("a delivery").expect("no consumer error");
            latencies.push(latency_nanos(&delivery.data));
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        latencies
    });
    let publisher = Arc::new(publisher);
    futures::stream::iter(0..messages)
        .for_each_concurrent(WINDOW, |n| {
            let (publisher, queue) = (Arc::clone(&publisher), queue.as_str());
            async move {
                let properties = BasicProperties::default()
                    .with_message_id(format!("{n:032x}").into())
                    .with_delivery_mode(2);
                let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
                let confirm = publisher
                    .basic_publish("".into(), queue.into(), options, &stamped_payload(size), properties)
                    .await;
                assert!(confirm.unwrap().await.unwrap().is_ack());
            }
        })
        .await;
    let latencies = receiving.await.expect("receiver task");
    let elapsed = started.elapsed();
    let _ = publisher_connection.close(200, "done".into()).await;
    let _ = consumer_connection.close(200, "done".into()).await;
    summarize(elapsed, messages, latencies)
}

fn main() {
    if !comms_tests::broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let scale = comms_tests::bench::scale("amqp");
    let messages = ((20_000.0 * scale) as usize).max(100);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let threads = comms_tests::bench::plugin_threads("amqp");
    let library = PluginLibrary::load_with_threads(&comms_tests::artifacts().amqp_plugin, threads)
        .unwrap_or_else(|error| {
            comms_tests::bench::fail("amqp", &format!("loading libcomms_amqp.so: {error}"))
        });
    println!("AMQP, {messages} messages per run, {WINDOW} sends in flight, median of {RUNS} runs\n");
    one_way::print_header();
    let mut ratios = Vec::new();
    for size in [64usize, 1024] {
        let mut comms = Vec::new();
        let mut raw = Vec::new();
        for run in 0..RUNS {
            eprintln!("run {run}, {size} B: comms");
            comms.push(runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(300), comms_run(&library, run, size, messages))
                    .await
                    .expect("a comms run finished within 300 s")
            }));
            eprintln!("run {run}, {size} B: raw lapin");
            raw.push(runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(300), raw_run(run, size, messages))
                    .await
                    .expect("a raw run finished within 300 s")
            }));
        }
        ratios.push(("comms", size, one_way::print_row("comms (plugin, Node API)", size, comms)));
        ratios.push(("raw", size, one_way::print_row("raw lapin", size, raw)));
    }
    println!();
    for size in [64usize, 1024] {
        let rate = |prefix: &str| {
            ratios.iter().find(|(name, s, _)| *s == size && *name == prefix).map_or(0.0, |r| r.2)
        };
        println!("{size} B: comms / raw lapin = {:.2} (aim >= 0.9)", rate("comms") / rate("raw"));
    }
}

//! The thread budget with every in-tree plugin library loaded in one process
//! (`comms_tests::every_plugin`: the eleven libraries of `backends/`, two nodes).
//!
//! Each library runs one tokio runtime whose workers carry its name (`comms-<plugin>`), sized by
//! the plugin's `Plugin::WORKER_THREADS` (the host's `plugin_threads` can override it; here it
//! does not). A plugin that starts more threads than it declares, or a default that grows, fails
//! here with the counts by name.

use comms_tests::{
    broker_available,
    every_plugin::EveryPlugin,
    threads::{self, plugin_threads_started},
    REDIS,
};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// The threads two running nodes with every in-tree plugin start, by name.
fn budget() -> BTreeMap<String, usize> {
    [
        // One worker: the host drives its sockets, or the work is elsewhere (a database
        // thread, blocking threads, the callers' polls), or one task does it all.
        ("comms-tcp", 1),
        ("comms-memory", 1),
        ("comms-sqlite", 1),
        ("comms-compress", 1),
        ("comms-chunk", 1),
        ("comms-faults", 1),
        ("comms-gossip", 1),
        ("comms-kademlia", 1),
        // Two workers: their connections' I/O runs on their own runtime (UDP's sockets,
        // Redis' TLS connections and subscriptions, RabbitMQ's consumers).
        ("comms-udp", 2),
        ("comms-redis", 2),
        ("comms-amqp", 2),
        // Threads of their own: the SQLite transport's database thread, lapin's I/O loop.
        ("comms-sqlite-db", 1),
        ("lapin-io-loop", 1),
    ]
    .into_iter()
    .map(|(name, count)| (name.to_string(), count))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_in_tree_plugin_loaded_keeps_to_the_thread_budget() {
    if !broker_available("Redis", REDIS) || !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let before = threads::by_name();
    let everything = EveryPlugin::start("thread-budget").await.unwrap_or_else(|error| panic!("{error}"));
    // Opening a SQLite database runs on a blocking thread of its runtime, which carries the
    // runtime's name and ends after 10 s idle: the count settles once it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut started = plugin_threads_started(&before);
    while started != budget() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        started = plugin_threads_started(&before);
    }
    eprintln!("threads started by two nodes with every in-tree plugin: {}", threads::describe(&started));
    assert_eq!(started, budget(), "threads started, by name (left), against the budget (right)");
    everything.close().await.unwrap_or_else(|error| panic!("{error}"));
}

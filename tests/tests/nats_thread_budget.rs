//! The NATS plugin's thread budget: one runtime worker (`Plugin::WORKER_THREADS = 1`, named
//! `comms-nats`) however many transports and discoveries it serves. A default that grows, or a
//! plugin that starts threads it does not declare, fails here with the counts by name.

#[path = "support/nats.rs"]
mod support;

use comms_plugin_api::{host_side::PluginLibrary, NodeId};
use comms_tests::{artifacts, broker_available, threads, NATS};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};
use support::Deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transports_and_a_discovery_run_on_one_plugin_worker() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let before = threads::by_name();
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let deployment = Deployment::new(NATS, "thread-budget");
    let mut transports = Vec::new();
    for id in ["alice", "bob"] {
        let transport = library
            .new_transport(&NodeId::new(id), "nats", &deployment.transport_config(""))
            .await
            .unwrap_or_else(|error| panic!("transport {id}: {error}"));
        transports.push(transport);
    }
    let discovery = library
        .new_discovery(&NodeId::new("alice"), "nats", &deployment.discovery_config(""))
        .await
        .unwrap_or_else(|error| panic!("discovery: {error}"));

    // Resolving the server's address runs on a blocking thread of the plugin's runtime, which
    // carries its name and ends after 10 s idle: the count settles once it has.
    let budget = BTreeMap::from([("comms-nats".to_string(), 1)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut started = threads::plugin_threads_started(&before);
    while started != budget && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        started = threads::plugin_threads_started(&before);
    }
    eprintln!("plugin threads started: {}", threads::describe(&started));
    assert_eq!(started, budget, "threads started, by name (left), against the budget (right)");

    discovery.close().await.unwrap_or_else(|error| panic!("{error}"));
    for transport in transports {
        transport.close().await.unwrap_or_else(|error| panic!("{error}"));
    }
}

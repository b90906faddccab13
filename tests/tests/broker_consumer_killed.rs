//! A consumer killed with SIGKILL loses nothing, on the plugins shipped on their own
//! (`plugins/nats`, `plugins/postgres`): a child process opens node `worker`'s transport, takes
//! a batch without settling it, and is killed (no close, no release). The next instance of
//! `worker` gets every message, the killed one's batch included, and that batch only once the
//! server gave up on the dead consumer: NATS after `ack_wait_ms`, PostgreSQL after `lease_ms`.
//!
//! The child is this test binary itself (`comms_tests::child_process`); it loads the plugin's
//! `.so` like any user.

#[path = "support/nats.rs"]
mod nats_support;
#[path = "support/postgres.rs"]
mod postgres_support;

use comms_host::PluginLibrary;
use comms_plugin_api::{
    host_side::LoadedTransport, Destination, Envelope, MessageId, NodeId, Settlement, SettlementOutcome,
};
use comms_tests::{
    artifacts, broker_available,
    child_process::{self, read_marked, var, MARK},
    NATS, POSTGRES,
};
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

const ROLE: &str = "COMMS_CONSUMER_KILLED_ROLE";
const MESSAGES: u32 = 200;
/// Messages the killed consumer takes before it is killed (it may prefetch more).
const CLAIMED: u32 = 50;
/// NATS `ack_wait_ms` and PostgreSQL `lease_ms`: how long the server waits for a consumer.
const GIVE_UP_MS: u64 = 2000;

fn message(to: &str, sequence: u32) -> Envelope {
    Envelope::new(
        MessageId::from_u128(u128::from(sequence) + 1),
        NodeId::new("producer"),
        Destination::Node(NodeId::new(to)),
        sequence.to_be_bytes().repeat(16),
    )
}

fn intact(envelope: &Envelope) -> bool {
    let sequence = (envelope.id.as_u128() - 1) as u32;
    envelope.payload.as_slice() == sequence.to_be_bytes().repeat(16).as_slice()
}

async fn open(plugin: &Path, kind: &str, node: &str, config: &str) -> LoadedTransport {
    let library = PluginLibrary::load(plugin).unwrap_or_else(|error| panic!("{error}"));
    library.new_transport(&NodeId::new(node), kind, config).await.unwrap_or_else(|error| panic!("{error}"))
}

/// The child side: does nothing in a normal test run. Opens `worker`, takes one batch, reports
/// it and waits to be killed without settling.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else { return };
    assert_eq!(role, "claim-and-hang", "unknown child role");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let transport = open(var("PLUGIN").as_ref(), &var("KIND"), "worker", &var("CONFIG")).await;
        let batch = transport.receive(CLAIMED).await.unwrap();
        let ids: Vec<String> = batch.iter().map(|i| i.envelope.id.as_u128().to_string()).collect();
        println!("{MARK}claimed {}", ids.join(","));
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

/// Sends [`MESSAGES`] to `worker` at `address`, lets a child take a batch and kills it, then
/// checks that a new `worker` gets every message, the killed batch no sooner than the server's
/// give-up time after the kill.
async fn killed_consumer_loses_nothing(plugin: &Path, kind: &str, config: &str, address: &str) {
    let producer = open(plugin, kind, "producer", config).await;
    for sequence in 0..MESSAGES {
        producer.send(address, message("worker", sequence)).await.unwrap();
    }

    let mut victim = child_process::spawn(
        ROLE,
        "claim-and-hang",
        &[
            ("PLUGIN", plugin.display().to_string()),
            ("KIND", kind.to_string()),
            ("CONFIG", config.to_string()),
        ],
    );
    let lines = read_marked(&mut victim, |line| line.starts_with("claimed "));
    let claimed: Vec<u128> = lines
        .last()
        .and_then(|line| line.strip_prefix("claimed "))
        .expect("the child took a batch")
        .split(',')
        .filter(|id| !id.is_empty())
        .map(|id| id.parse().unwrap())
        .collect();
    assert!(!claimed.is_empty(), "the child took at least one message");
    victim.kill().unwrap(); // SIGKILL: no close, no settlement, no release.
    victim.wait().unwrap();
    let killed = Instant::now();

    let successor = open(plugin, kind, "worker", config).await;
    let mut arrival: BTreeMap<u128, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrival.len() < MESSAGES as usize && Instant::now() < deadline {
        let Ok(batch) = tokio::time::timeout(Duration::from_secs(10), successor.receive(64)).await else {
            break;
        };
        let batch = batch.unwrap();
        for inbound in &batch {
            assert!(intact(&inbound.envelope), "message {} damaged", inbound.envelope.id);
            arrival.entry(inbound.envelope.id.as_u128()).or_insert(killed.elapsed());
        }
        let accept = batch
            .iter()
            .map(|i| Settlement { delivery_tag: i.delivery_tag, outcome: SettlementOutcome::ACCEPTED })
            .collect();
        successor.settle(accept).await.unwrap();
    }
    let missing: Vec<u32> = (0..MESSAGES).filter(|s| !arrival.contains_key(&(u128::from(*s) + 1))).collect();
    assert!(missing.is_empty(), "{kind}: messages never delivered after the kill: {missing:?}");
    let earliest = claimed.iter().map(|id| arrival[id]).min().unwrap();
    // The server's clock for the dead consumer started when it took the batch, before the kill.
    assert!(
        earliest >= Duration::from_millis(GIVE_UP_MS / 2),
        "{kind}: a message the killed consumer held came again {earliest:?} after the kill, before the \
         server's {GIVE_UP_MS} ms were up"
    );
    producer.close().await.unwrap();
    successor.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_consumer_killed_mid_batch_loses_nothing() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = nats_support::Deployment::new(NATS, "killed");
    let config = deployment.transport_config(&format!("ack_wait_ms = {GIVE_UP_MS}"));
    let address = format!("{}.inbox.worker", deployment.prefix);
    killed_consumer_loses_nothing(artifacts().nats_plugin(), "nats", &config, &address).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_consumer_killed_mid_batch_loses_nothing() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let schema = postgres_support::Schema::new("killed");
    let config = schema.config(&format!("lease_ms = {GIVE_UP_MS}"));
    // A PostgreSQL node's address is its node id.
    killed_consumer_loses_nothing(artifacts().postgres_plugin(), "postgres", &config, "worker").await;
}

//! Fault injection around a real transport (the in-memory plugin, loaded from its `.so`): the
//! injected faults show up in what arrives, exactly as the counters say, and a seed replays.

use comms_host::fault_injection::{FaultConfig, FaultInjector};
use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, MessageId, NodeId, Payload,
};
use comms_tests::artifacts;
use std::{sync::Arc, time::Duration};

const MESSAGES: u128 = 1_000;

/// A memory transport for node `node`; queues hold every message a test sends.
async fn transport(node: &str) -> Arc<LoadedTransport> {
    let library = PluginLibrary::load(&artifacts().memory_plugin).expect("load libcomms_memory.so");
    let transport = library.new_transport(&NodeId::new(node), "memory", "queue_capacity = 4096").await;
    Arc::new(transport.expect("start a memory transport"))
}

fn envelope(n: u128) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("sender"),
        Destination::Node(NodeId::new("receiver")),
        Payload::from(n.to_be_bytes().to_vec()),
    )
}

/// Sends `MESSAGES` envelopes through a new injector from a new sender to a new receiver, and
/// returns the ids that arrived, in arrival order, with the injector.
async fn run(faults: FaultConfig) -> (Vec<u128>, FaultInjector) {
    let sender = transport("sender").await;
    let receiver = transport("receiver").await;
    let address = receiver.info().local_address.clone();
    let injector = FaultInjector::new(faults).unwrap();
    for n in 0..MESSAGES {
        injector.send(&sender, &address, envelope(n)).await.unwrap();
    }
    injector.flush().await;
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    // Closed and flushed: `receive` hands out what is queued, then an empty batch.
    let mut ids = Vec::new();
    loop {
        let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(4096))
            .await
            .expect("a closed memory transport does not block")
            .unwrap();
        if batch.is_empty() {
            return (ids, injector);
        }
        ids.extend(batch.into_iter().map(|inbound| inbound.envelope.id.as_u128()));
    }
}

#[tokio::test]
async fn dropped_messages_are_exactly_the_missing_ones() {
    let (ids, injector) = run(FaultConfig { drop: 0.1, seed: 11, ..FaultConfig::default() }).await;
    let counters = injector.counters();
    assert_eq!(ids.len() as u64, MESSAGES as u64 - counters.dropped, "{counters:?}");
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5; this band is over five of them.
    assert!((50..=150).contains(&counters.dropped), "{counters:?}");
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "without delay or reorder the order is kept");
    assert_eq!((counters.duplicated, counters.delayed, counters.reordered), (0, 0, 0));
}

#[tokio::test]
async fn duplicate_one_delivers_everything_twice() {
    let (ids, injector) = run(FaultConfig { duplicate: 1.0, ..FaultConfig::default() }).await;
    let expected: Vec<u128> = (0..MESSAGES).flat_map(|n| [n, n]).collect();
    assert_eq!(ids, expected);
    assert_eq!(injector.counters().duplicated, MESSAGES as u64);
}

#[test]
fn the_same_seed_replays_the_same_arrivals() {
    let faults =
        FaultConfig { drop: 0.1, duplicate: 0.1, reorder: 0.2, seed: 2024, ..FaultConfig::default() };
    // On a current-thread runtime the reorder timers cannot fire while the sending loop runs
    // (every send completes without yielding), so arrivals depend on the seed alone.
    let arrivals = || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (ids, injector) = runtime.block_on(run(faults.clone()));
        (ids, injector.counters())
    };
    let (first, first_counters) = arrivals();
    let (second, second_counters) = arrivals();
    assert_eq!(first, second);
    assert_eq!(first_counters, second_counters);
    assert!(first_counters.dropped > 0 && first_counters.duplicated > 0 && first_counters.reordered > 0);
    let expected_len = MESSAGES as u64 - first_counters.dropped + first_counters.duplicated;
    assert_eq!(first.len() as u64, expected_len);
    assert!(first.windows(2).any(|pair| pair[0] > pair[1]), "some messages were reordered");

    let other_seed = FaultConfig { seed: 2025, ..faults.clone() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (third, _) = runtime.block_on(run(other_seed));
    assert_ne!(first, third, "another seed gives other faults");
}

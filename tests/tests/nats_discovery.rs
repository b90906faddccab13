//! The NATS discovery plugin on its own: two nodes find each other, an update and a withdraw
//! are seen at once, and a node that stops without withdrawing disappears when its record is
//! not rewritten for the TTL. Each test uses a key-value bucket of its own, deleted at the end.

#[path = "support/nats.rs"]
mod support;

use comms_plugin_api::{
    host_side::{LoadedDiscovery, PluginLibrary},
    NodeId, NodeRecord, PeerEventKind,
};
use comms_tests::{artifacts, broker_available, next_event_about, NATS};
use std::time::Duration;
use support::Deployment;

fn record(id: &str, service: &str) -> NodeRecord {
    let mut value = NodeRecord::new(NodeId::new(id));
    value.addresses = vec![("nats".into(), format!("comms.inbox.{id}"))];
    value.services = vec![service.into()];
    value.topics = vec!["orders.>".into()];
    value.metadata = vec![("zone".into(), "eu".into())];
    // Attributes of a later contract: a discovery stores and returns them.
    value.extensions.set("later-contract", vec![0, 1, 0xff]);
    value
}

async fn open(library: &PluginLibrary, id: &str, config: &str) -> LoadedDiscovery {
    library.new_discovery(&NodeId::new(id), "nats", config).await.unwrap_or_else(|error| panic!("{error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_find_each_other_and_a_stopped_node_disappears() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let deployment = Deployment::new(NATS, "discovery");
    let config = deployment.discovery_config("ttl_ms = 900\nscan_interval_ms = 100\n");
    let watcher = open(&library, "watcher", &config).await;
    let alice = open(&library, "alice", &config).await;

    watcher.announce(record("watcher", "audit")).await.unwrap();
    alice.announce(record("alice", "billing")).await.unwrap();
    let joined = next_event_about(&watcher, "alice", Duration::from_secs(3)).await;
    assert_eq!(joined.kind, PeerEventKind::Joined);
    assert_eq!(joined.record, record("alice", "billing"), "the record arrives intact");
    assert_eq!(next_event_about(&alice, "watcher", Duration::from_secs(3)).await.kind, PeerEventKind::Joined);
    assert_eq!(watcher.peers().await.unwrap(), vec![record("alice", "billing")]);
    assert_eq!(alice.peers().await.unwrap(), vec![record("watcher", "audit")], "a node is not its own peer");

    alice.announce(record("alice", "shipping")).await.unwrap();
    let updated = next_event_about(&watcher, "alice", Duration::from_secs(3)).await;
    assert_eq!(
        (updated.kind, updated.record.services),
        (PeerEventKind::Updated, vec!["shipping".to_string()])
    );

    // Heartbeats keep the record alive well past its TTL: nothing about alice comes meanwhile.
    let quiet =
        tokio::time::timeout(Duration::from_millis(2000), next_event_about(&watcher, "alice", Duration::MAX));
    assert!(quiet.await.is_err(), "an event about alice although her heartbeat runs");
    assert_eq!(
        watcher.peers().await.unwrap().len(),
        1,
        "alice's record vanished although her heartbeat runs"
    );

    alice.withdraw(&NodeId::new("alice")).await.unwrap();
    let left = next_event_about(&watcher, "alice", Duration::from_millis(800)).await;
    assert_eq!(left.kind, PeerEventKind::Left, "withdraw is seen at once");
    assert!(watcher.peers().await.unwrap().is_empty());
    alice.close().await.unwrap();

    // A node that stops without withdrawing (as if it crashed) leaves when its TTL runs out.
    let bob = open(&library, "bob", &config).await;
    bob.announce(record("bob", "search")).await.unwrap();
    assert_eq!(next_event_about(&watcher, "bob", Duration::from_secs(3)).await.kind, PeerEventKind::Joined);
    bob.close().await.unwrap();
    let started = tokio::time::Instant::now();
    let left = next_event_about(&watcher, "bob", Duration::from_secs(5)).await;
    assert_eq!(left.kind, PeerEventKind::Left);
    assert!(started.elapsed() >= Duration::from_millis(300), "bob left before his record could expire");
    assert_eq!(left.record, record("bob", "search"), "Left carries the last record");
    assert!(watcher.peers().await.unwrap().is_empty(), "the expired record is gone from the bucket");

    watcher.close().await.unwrap();
    assert!(watcher.next_event().await.unwrap().is_none(), "next_event ends once closed");
}

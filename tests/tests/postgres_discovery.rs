//! The PostgreSQL discovery plugin on its own (`libcomms_postgres.so` from `plugins/postgres`):
//! two nodes find each other, joins, updates and withdrawals arrive through LISTEN/NOTIFY (long
//! before the next heartbeat tick could show them), and a node that stops refreshing its row
//! disappears after `peer_timeout_ms`.

#[path = "support/postgres.rs"]
mod support;

use support::{psql, Schema};

use comms_plugin_api::{
    host_side::{LoadedDiscovery, PluginLibrary},
    NodeId, NodeRecord, PeerEventKind,
};
use comms_tests::{artifacts, broker_available, next_event_about, POSTGRES};
use std::time::Duration;

fn record(id: &str, service: &str) -> NodeRecord {
    let mut value = NodeRecord::new(NodeId::new(id));
    value.addresses = vec![("postgres".into(), id.into())];
    value.services = vec![service.into()];
    value.topics = vec!["orders.>".into()];
    value.metadata = vec![("zone".into(), "eu".into())];
    // Attributes of a later contract: a discovery stores and returns them.
    value.extensions.set("later-contract", vec![0, 1, 0xff]);
    value
}

async fn open(library: &PluginLibrary, id: &str, config: &str) -> LoadedDiscovery {
    library
        .new_discovery(&NodeId::new(id), "postgres", config)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_find_each_other_and_changes_arrive_by_notification() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("discovery");
    // Heartbeat ticks 10 s apart: every event below must come from a notification, within 3 s.
    let config = schema.config("heartbeat_ms = 10000\npeer_timeout_ms = 30000\n");
    let alice = open(&library, "alice", &config).await;
    let bob = open(&library, "bob", &config).await;
    let soon = Duration::from_secs(3);

    alice.announce(record("alice", "billing")).await.unwrap();
    bob.announce(record("bob", "search")).await.unwrap();
    let joined = next_event_about(&bob, "alice", soon).await;
    assert_eq!(joined.kind, PeerEventKind::Joined);
    assert_eq!(joined.record, record("alice", "billing"), "the record arrives intact");
    assert_eq!(next_event_about(&alice, "bob", soon).await.kind, PeerEventKind::Joined);
    assert_eq!(alice.peers().await.unwrap(), vec![record("bob", "search")]);
    assert_eq!(bob.peers().await.unwrap(), vec![record("alice", "billing")], "a node is not its own peer");

    alice.announce(record("alice", "shipping")).await.unwrap();
    let updated = next_event_about(&bob, "alice", soon).await;
    assert_eq!(
        (updated.kind, updated.record.services),
        (PeerEventKind::Updated, vec!["shipping".to_string()])
    );

    alice.withdraw(&NodeId::new("alice")).await.unwrap();
    let left = next_event_about(&bob, "alice", soon).await;
    assert_eq!(left.kind, PeerEventKind::Left, "withdraw is seen at once");
    assert!(bob.peers().await.unwrap().is_empty());

    // Closing removes the node's row: its peers see it leave at once.
    alice.announce(record("alice", "billing")).await.unwrap();
    assert_eq!(next_event_about(&bob, "alice", soon).await.kind, PeerEventKind::Joined);
    alice.close().await.unwrap();
    assert_eq!(next_event_about(&bob, "alice", soon).await.kind, PeerEventKind::Left);

    bob.close().await.unwrap();
    assert!(bob.next_event().await.unwrap().is_none(), "next_event ends once closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_refreshing_its_row_expires_and_a_live_one_does_not() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("expiry");
    let config = schema.config("heartbeat_ms = 200\npeer_timeout_ms = 800\n");
    let watcher = open(&library, "watcher", &config).await;
    let alice = open(&library, "alice", &config).await;
    alice.announce(record("alice", "billing")).await.unwrap();
    assert_eq!(next_event_about(&watcher, "alice", Duration::from_secs(3)).await.kind, PeerEventKind::Joined);

    // Carol is a node that crashed: her row was written once (as any program may write it) and
    // is never refreshed.
    psql(&format!(
        "INSERT INTO \"{}\".comms_registry (node_id, record, heartbeat_at) VALUES ('carol', \
         '{{\"addresses\":[{{\"transport\":\"postgres\",\"address\":\"carol\"}}],\"services\":[\"search\"],\
         \"topics\":[],\"metadata\":[]}}', now())",
        schema.0
    ));
    let joined = next_event_about(&watcher, "carol", Duration::from_secs(3)).await;
    assert_eq!(
        (joined.kind, joined.record.services.clone()),
        (PeerEventKind::Joined, vec!["search".to_string()])
    );
    let started = tokio::time::Instant::now();
    let left = next_event_about(&watcher, "carol", Duration::from_secs(5)).await;
    assert_eq!(left.kind, PeerEventKind::Left);
    assert!(started.elapsed() >= Duration::from_millis(400), "carol left before her row could expire");
    assert_eq!(left.record, joined.record, "Left carries the last record");

    // Alice's heartbeat kept her row fresh all along, well past the peer timeout.
    assert_eq!(watcher.peers().await.unwrap(), vec![record("alice", "billing")]);
    alice.close().await.unwrap();
    watcher.close().await.unwrap();
}

//! The Redis discovery plugin on its own: join, update, withdraw, and expiry of a node that
//! stops without withdrawing (its record's TTL runs out).

use comms_plugin_api::{
    host_side::{LoadedDiscovery, PluginLibrary},
    NodeId, NodeRecord, PeerEventKind,
};
use comms_tests::{artifacts, broker_available, next_event_about};
use std::time::Duration;

const REDIS: &str = "127.0.0.1:6379";

fn prefix() -> String {
    format!("comms-test-{}-{:06x}-discovery", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

fn record(id: &str, service: &str) -> NodeRecord {
    {
        let mut value = NodeRecord::new(NodeId::new(id));
        value.addresses = vec![("redis".into(), format!("comms:inbox:{id}"))];
        value.services = vec![service.into()];
        value.topics = vec!["orders.>".into()];
        value.metadata = vec![("zone".into(), "eu".into())];
        // Attributes of a later contract: a discovery stores and returns them.
        value.extensions.set("later-contract", vec![0, 1, 0xff]);
        value
    }
}

async fn open(library: &PluginLibrary, id: &str, config: &str) -> LoadedDiscovery {
    library.new_discovery(&NodeId::new(id), "redis", config).await.unwrap_or_else(|error| panic!("{error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_update_withdraw_and_expiry() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let prefix = prefix();
    // A long scan interval: join, update and withdraw must come from notifications.
    let watcher_config =
        format!("prefix = \"{prefix}\"\nttl_ms = 800\nheartbeat_ms = 200\nscan_interval_ms = 300\n");
    let watcher = open(&library, "watcher", &watcher_config).await;
    let alice = open(&library, "alice", &watcher_config).await;

    alice.announce(record("alice", "billing")).await.unwrap();
    let joined = next_event_about(&watcher, "alice", Duration::from_secs(3)).await;
    assert_eq!(joined.kind, PeerEventKind::Joined);
    assert_eq!(joined.record, record("alice", "billing"), "the record arrives intact");
    assert_eq!(watcher.peers().await.unwrap(), vec![record("alice", "billing")]);
    assert!(alice.peers().await.unwrap().is_empty(), "a node is not its own peer");

    alice.announce(record("alice", "shipping")).await.unwrap();
    let updated = next_event_about(&watcher, "alice", Duration::from_secs(3)).await;
    assert_eq!(
        (updated.kind, updated.record.services),
        (PeerEventKind::Updated, vec!["shipping".to_string()])
    );

    // Heartbeats keep the record alive well past its TTL.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(watcher.peers().await.unwrap().len(), 1, "alice expired although her heartbeat runs");

    alice.withdraw(&NodeId::new("alice")).await.unwrap();
    let left = next_event_about(&watcher, "alice", Duration::from_millis(600)).await;
    assert_eq!(left.kind, PeerEventKind::Left, "withdraw is seen at once");
    assert!(watcher.peers().await.unwrap().is_empty());
    alice.close().await.unwrap();

    // A node that stops without withdrawing (as if it crashed) leaves when its TTL runs out.
    let bob = open(&library, "bob", &watcher_config).await;
    bob.announce(record("bob", "search")).await.unwrap();
    assert_eq!(next_event_about(&watcher, "bob", Duration::from_secs(3)).await.kind, PeerEventKind::Joined);
    bob.close().await.unwrap();
    let started = tokio::time::Instant::now();
    let left = next_event_about(&watcher, "bob", Duration::from_secs(5)).await;
    assert_eq!(left.kind, PeerEventKind::Left);
    assert!(started.elapsed() >= Duration::from_millis(300), "bob left before his record could expire");
    assert_eq!(left.record, record("bob", "search"), "Left carries the last record");

    watcher.close().await.unwrap();
    assert!(watcher.next_event().await.unwrap().is_none(), "next_event ends once closed");
}

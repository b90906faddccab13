//! Discovery through a registry: a store (a database table) that holds one row per announced
//! node, with its record and a heartbeat time stamp. [`RegistryDiscovery`] is the whole
//! [`Discovery`] over any [`RegistryStore`]; a backend writes only the store's statements.
//!
//! How it works: a background task refreshes the heartbeats of the nodes this instance announced
//! every `heartbeat` and reads the live rows (heartbeat younger than `peer_timeout`, or marked
//! offline) to turn the differences into join / update / leave events, also at once when the
//! store says something changed ([`RegistryStore::changed`], PostgreSQL's notifications). A node
//! that stops without withdrawing is seen leaving when its heartbeat is `peer_timeout` old (at
//! the next read after that). Every 60th tick, rows whose heartbeat is
//! [`GARBAGE_AFTER_TIMEOUTS`] peer timeouts old (a node that crashed and never came back) are
//! deleted by whichever instance sees them.
//!
//! Guarantees and limits:
//! - an offline record ([`NodeRecord::is_offline`]: the node closed, its mailbox keeps its
//!   messages) is stored without expiry, not refreshed, and not removed on close: it stays until
//!   the node announces itself again or withdraws;
//! - `close` removes the rows of the live nodes this instance announced, so peers see them leave
//!   at once;
//! - any program can write into the store: a row that does not decode
//!   ([`RegistryRowRecord`]), or whose record breaks the
//!   limits of one ([`NodeRecord::check`]), is ignored (and logged at debug level);
//! - events wait in a [`peer_events`](crate::peer_events) queue: one per node, the latest.

use crate::{
    async_trait,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    record_json::RegistryRowRecord,
    snapshot_changes, Discovery, NodeId, NodeRecord, PeerEvent, PluginError,
};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::sync::watch;

/// Nodes whose events may wait for `next_event` before the background task waits.
const EVENT_QUEUE: usize = 1024;

/// Rows whose heartbeat is older than this many peer timeouts are deleted.
pub const GARBAGE_AFTER_TIMEOUTS: u32 = 10;

/// Ticks between two deletions of long-dead rows.
const GARBAGE_EVERY_TICKS: u64 = 60;

/// The statements of one registry. Every method is one round trip (or one transaction) to the
/// store; errors name what failed.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Writes each `(node id, record)` row (the record as
    /// [`RegistryRowRecord`] JSON) with a fresh heartbeat,
    /// or, if `offline`, with one that never goes stale; replaces a row of the same node id.
    async fn upsert(&self, rows: Vec<(String, String)>, offline: bool) -> Result<(), PluginError>;

    /// Deletes the rows of `ids`.
    async fn delete(&self, ids: Vec<String>) -> Result<(), PluginError>;

    /// `(node id, record)` of every row whose heartbeat is younger than `peer_timeout`, or that
    /// is offline.
    async fn live_rows(&self, peer_timeout: Duration) -> Result<Vec<(String, String)>, PluginError>;

    /// Deletes the rows that are not offline and whose heartbeat is older than `age`.
    async fn delete_older_than(&self, age: Duration) -> Result<(), PluginError>;

    /// Completes when the store says that a row appeared, changed or went, so that the rows are
    /// read at once rather than at the next heartbeat. The default never completes.
    async fn changed(&self) {
        std::future::pending::<()>().await;
    }

    /// Called once by `close`, after the rows are removed: let go of connections.
    fn close(&self) {}

    /// What the discovery is, for errors: "sqlite discovery on `comms.db`".
    fn describe(&self) -> String;
}

/// How often a [`RegistryDiscovery`] refreshes and reads, and when a row is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryTimes {
    /// Between two heartbeats (and two reads of the rows).
    pub heartbeat: Duration,
    /// A row whose heartbeat is older is a node that left.
    pub peer_timeout: Duration,
}

struct Shared<S> {
    store: S,
    times: RegistryTimes,
    node: NodeId,
    /// This instance's own live records, by node id: refreshed by the heartbeat, never reported
    /// as peers.
    announced: Mutex<BTreeMap<String, NodeRecord>>,
}

impl<S: RegistryStore> Shared<S> {
    fn announced(&self) -> MutexGuard<'_, BTreeMap<String, NodeRecord>> {
        self.announced.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live records, except this instance's own nodes.
    async fn live_peers(&self) -> Result<BTreeMap<String, NodeRecord>, PluginError> {
        let mut own: Vec<String> = self.announced().keys().cloned().collect();
        own.push(self.node.as_str().to_string());
        let rows = self.store.live_rows(self.times.peer_timeout).await?;
        let mut peers = BTreeMap::new();
        for (id, json) in rows {
            if own.contains(&id) {
                continue;
            }
            let record = match serde_json::from_str::<RegistryRowRecord>(&json) {
                Ok(stored) => stored.into_record(id.clone()),
                Err(error) => {
                    tracing::debug!(node = %id, %error, "unreadable registry row ignored");
                    continue;
                }
            };
            if let Err(error) = record.check() {
                tracing::debug!(node = %id, %error, "registry row ignored");
                continue;
            }
            peers.insert(id, record);
        }
        Ok(peers)
    }

    /// Refreshes the rows of every announced node.
    async fn heartbeat(&self) -> Result<(), PluginError> {
        let rows: Vec<(String, String)> =
            self.announced().iter().map(|(id, record)| (id.clone(), encode(record))).collect();
        if rows.is_empty() {
            return Ok(());
        }
        self.store.upsert(rows, false).await
    }
}

/// The stored record: the row shape of [`crate::record_json`].
fn encode(record: &NodeRecord) -> String {
    // Plain strings and vectors: serializing them cannot fail.
    serde_json::to_string(&RegistryRowRecord::from(record)).unwrap_or_default()
}

/// A [`Discovery`] over the registry `S`; see the module docs.
pub struct RegistryDiscovery<S> {
    shared: Arc<Shared<S>>,
    events: PeerEventQueue,
    closed: watch::Sender<bool>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<S: RegistryStore> std::fmt::Debug for RegistryDiscovery<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryDiscovery")
            .field("store", &self.shared.store.describe())
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

impl<S: RegistryStore> RegistryDiscovery<S> {
    /// Starts the heartbeat and watch task of node `node` over `store`. Must run inside a tokio
    /// runtime.
    pub fn start(node: NodeId, store: S, times: RegistryTimes) -> Self {
        let shared = Arc::new(Shared { store, times, node, announced: Mutex::default() });
        let (sender, events) = peer_event_queue(EVENT_QUEUE);
        let closed = watch::channel(false).0;
        let watcher = tokio::spawn(watch(Arc::clone(&shared), sender, closed.subscribe()));
        Self { shared, events, closed, watcher: Mutex::new(Some(watcher)) }
    }

    /// The store, e.g. for a backend's own checks in tests.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    fn check_open(&self) -> Result<(), PluginError> {
        if *self.closed.borrow() {
            return Err(PluginError::closed(&self.shared.store.describe()));
        }
        Ok(())
    }
}

/// The heartbeat and watch loop.
async fn watch<S: RegistryStore>(
    shared: Arc<Shared<S>>,
    events: PeerEventSender,
    mut closed: watch::Receiver<bool>,
) {
    let mut known: BTreeMap<String, NodeRecord> = BTreeMap::new();
    let mut ticker = tokio::time::interval(shared.times.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let what = shared.store.describe();
    loop {
        let tick = tokio::select! {
            _ = ticker.tick() => true,
            () = shared.store.changed() => false,
            _ = closed.wait_for(|closed| *closed) => return,
        };
        if tick {
            ticks += 1;
            if let Err(error) = shared.heartbeat().await {
                tracing::warn!(%error, "{what}: heartbeat failed; retrying");
            }
            if ticks % GARBAGE_EVERY_TICKS == 1 {
                let age = shared.times.peer_timeout.saturating_mul(GARBAGE_AFTER_TIMEOUTS);
                if let Err(error) = shared.store.delete_older_than(age).await {
                    tracing::debug!(%error, "{what}: deleting long-dead registry rows failed");
                }
            }
        }
        let live = match shared.live_peers().await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%error, "{what}: could not read the registry; retrying");
                continue;
            }
        };
        let changes = snapshot_changes(&known, &live);
        known = live;
        for change in changes {
            tokio::select! {
                sent = events.send(change) => if !sent { return },
                _ = closed.wait_for(|closed| *closed) => return,
            }
        }
    }
}

#[async_trait]
impl<S: RegistryStore> Discovery for RegistryDiscovery<S> {
    /// Writes the record with a fresh heartbeat (an offline one without expiry); the background
    /// task keeps a live one fresh.
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        self.check_open()?;
        let id = record.id.as_str().to_string();
        let row = vec![(id.clone(), encode(&record))];
        let offline = record.is_offline();
        {
            let mut announced = self.shared.announced();
            if offline {
                announced.remove(&id);
            } else {
                announced.insert(id, record);
            }
        }
        self.shared.store.upsert(row, offline).await
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        self.check_open()?;
        self.shared.announced().remove(node.as_str());
        self.shared.store.delete(vec![node.as_str().to_string()]).await
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        self.check_open()?;
        Ok(self.shared.live_peers().await?.into_values().collect())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.closed.subscribe()).await)
    }

    /// Stops the heartbeat and removes the rows of the live nodes this instance announced, so
    /// that peers see them leave at once. Idempotent.
    async fn close(&self) -> Result<(), PluginError> {
        if self.closed.send_replace(true) {
            return Ok(());
        }
        if let Some(watcher) = self.watcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            watcher.abort();
        }
        let ids: Vec<String> = std::mem::take(&mut *self.shared.announced()).into_keys().collect();
        let removed = if ids.is_empty() { Ok(()) } else { self.shared.store.delete(ids).await };
        self.shared.store.close();
        removed
    }
}

impl<S> Drop for RegistryDiscovery<S> {
    fn drop(&mut self) {
        // Dropped without close: stop the task (the rows expire).
        if let Some(watcher) = self.watcher.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            watcher.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerEventKind;
    use std::collections::HashMap;
    use tokio::time::Instant;

    /// A registry in memory: `None` for an offline row's heartbeat (it never goes stale).
    #[derive(Default)]
    struct Rows(Mutex<HashMap<String, (String, Option<Instant>)>>);

    #[derive(Clone, Default)]
    struct MemoryStore(Arc<Rows>);

    impl MemoryStore {
        fn rows(&self) -> MutexGuard<'_, HashMap<String, (String, Option<Instant>)>> {
            self.0 .0.lock().unwrap()
        }
    }

    #[async_trait]
    impl RegistryStore for MemoryStore {
        async fn upsert(&self, rows: Vec<(String, String)>, offline: bool) -> Result<(), PluginError> {
            let heartbeat = (!offline).then(Instant::now);
            self.rows().extend(rows.into_iter().map(|(id, record)| (id, (record, heartbeat))));
            Ok(())
        }

        async fn delete(&self, ids: Vec<String>) -> Result<(), PluginError> {
            self.rows().retain(|id, _| !ids.contains(id));
            Ok(())
        }

        async fn live_rows(&self, peer_timeout: Duration) -> Result<Vec<(String, String)>, PluginError> {
            let live = |beat: &Option<Instant>| beat.is_none_or(|beat| beat.elapsed() < peer_timeout);
            Ok(self
                .rows()
                .iter()
                .filter(|(_, (_, beat))| live(beat))
                .map(|(id, (r, _))| (id.clone(), r.clone()))
                .collect())
        }

        async fn delete_older_than(&self, age: Duration) -> Result<(), PluginError> {
            self.rows().retain(|_, (_, beat)| beat.is_none_or(|beat| beat.elapsed() < age));
            Ok(())
        }

        fn describe(&self) -> String {
            "memory discovery".into()
        }
    }

    const TIMES: RegistryTimes =
        RegistryTimes { heartbeat: Duration::from_millis(100), peer_timeout: Duration::from_millis(500) };

    fn record(id: &str, service: &str) -> NodeRecord {
        let mut record = NodeRecord::new(id);
        record.services.push(service.into());
        record
    }

    async fn next(discovery: &RegistryDiscovery<MemoryStore>) -> (PeerEventKind, String, NodeRecord) {
        let event = discovery.next_event().await.unwrap().expect("an event");
        (event.kind, event.record.id.as_str().to_string(), event.record)
    }

    #[tokio::test(start_paused = true)]
    async fn peers_join_change_and_leave_when_they_stop_refreshing_but_offline_records_stay() {
        let store = MemoryStore::default();
        let alice = RegistryDiscovery::start("alice".into(), store.clone(), TIMES);
        let bob = RegistryDiscovery::start("bob".into(), store.clone(), TIMES);
        alice.announce(record("alice", "v1")).await.unwrap();
        bob.announce(record("bob", "b")).await.unwrap();
        assert_eq!(next(&bob).await, (PeerEventKind::Joined, "alice".into(), record("alice", "v1")));
        assert_eq!(bob.peers().await.unwrap(), vec![record("alice", "v1")], "not itself");
        assert_eq!(next(&alice).await.1, "bob");

        alice.announce(record("alice", "v2")).await.unwrap();
        assert_eq!(next(&bob).await, (PeerEventKind::Updated, "alice".into(), record("alice", "v2")));

        // Heartbeats keep alice live well past the timeout.
        tokio::time::sleep(TIMES.peer_timeout * 4).await;
        assert_eq!(bob.peers().await.unwrap().len(), 1);

        // Dropped without close: no more heartbeats, and bob sees alice leave after the timeout.
        let dropped_at = Instant::now();
        drop(alice);
        assert_eq!(next(&bob).await.0, PeerEventKind::Left);
        let waited = dropped_at.elapsed();
        assert!(
            waited >= TIMES.peer_timeout - TIMES.heartbeat
                && waited <= TIMES.peer_timeout + TIMES.heartbeat * 2,
            "{waited:?}"
        );

        // An offline record is never refreshed and never goes stale; close leaves it.
        let carol = RegistryDiscovery::start("carol".into(), store.clone(), TIMES);
        let mut offline = record("carol", "c");
        offline.mark_offline();
        carol.announce(offline.clone()).await.unwrap();
        carol.close().await.unwrap();
        assert_eq!(next(&bob).await, (PeerEventKind::Joined, "carol".into(), offline.clone()));
        tokio::time::sleep(TIMES.peer_timeout * 4).await;
        assert_eq!(bob.peers().await.unwrap(), vec![offline]);
    }

    #[tokio::test(start_paused = true)]
    async fn rows_that_are_not_records_are_ignored_and_close_removes_the_live_rows_it_announced() {
        let store = MemoryStore::default();
        let reader = RegistryDiscovery::start("reader".into(), store.clone(), TIMES);
        store.upsert(vec![("garbage".into(), "{not json".into())], true).await.unwrap();
        let oversized = record("huge", &"s".repeat(crate::node_limits::MAX_RECORD_BYTES + 1));
        store.upsert(vec![("huge".into(), encode(&oversized))], true).await.unwrap();
        store.upsert(vec![("bad\nid".into(), encode(&record("bad\nid", "x")))], true).await.unwrap();
        assert_eq!(reader.peers().await.unwrap(), vec![], "three rows in the store, none a valid record");

        let writer = RegistryDiscovery::start("writer".into(), store.clone(), TIMES);
        writer.announce(record("writer", "w")).await.unwrap();
        writer.announce(record("second", "w")).await.unwrap();
        assert_eq!(reader.peers().await.unwrap().len(), 2);
        writer.close().await.unwrap();
        assert!(!store.rows().contains_key("writer") && !store.rows().contains_key("second"));
        assert!(writer
            .announce(record("writer", "w"))
            .await
            .unwrap_err()
            .to_string()
            .contains("memory discovery"));
        assert_eq!(writer.next_event().await.unwrap(), None, "closed");
    }
}

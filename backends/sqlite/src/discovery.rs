//! Discovery through the shared file: the `comms_registry` table, one row per announced node with
//! its record as JSON and a heartbeat time stamp.
//!
//! A background task refreshes the heartbeats of the nodes this instance announced every
//! `heartbeat_ms`, and reads the live rows (heartbeat younger than `peer_timeout_ms`) to turn
//! the differences into join / update / leave events. Rows whose heartbeat is far older than the
//! timeout (a node that crashed and never came back) are deleted by whichever instance sees them.

use crate::{
    config::SqliteConfig,
    schema::{self, db_error, now_ms},
};
use comms_plugin_api::{
    async_trait,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    record_json::RegistryRowRecord,
    Discovery, ErrorCode, NodeId, NodeRecord, PeerEvent, PluginError,
};
use rusqlite::{params, Connection};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::watch;

/// Nodes whose events may wait for `next_event` before the watcher waits (one event per node:
/// see [`comms_plugin_api::peer_events`]).
const EVENT_QUEUE: usize = 1024;

/// Rows whose heartbeat is older than this many peer timeouts are deleted.
const GARBAGE_AFTER_TIMEOUTS: i64 = 10;

struct Shared {
    config: SqliteConfig,
    connection: Mutex<Connection>,
    /// This instance's own records, by node id: refreshed by the heartbeat, never reported as
    /// peers.
    announced: Mutex<BTreeMap<String, NodeRecord>>,
    node: NodeId,
}

impl Shared {
    /// Runs `work` on the connection, on a blocking thread.
    async fn with_db<T: Send + 'static>(
        self: &Arc<Self>,
        what: &'static str,
        work: impl FnOnce(&Connection, &SqliteConfig) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, PluginError> {
        let shared = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let connection = shared.connection.lock().unwrap_or_else(|p| p.into_inner());
            work(&connection, &shared.config).map_err(|error| db_error(what, &shared.config, error))
        })
        .await
        .map_err(|error| PluginError::new(ErrorCode::OTHER, format!("{what}: {error}")))?
    }

    fn own_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            self.announced.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        ids.push(self.node.as_str().to_string());
        ids
    }

    /// The live rows, except this instance's own nodes.
    async fn live_peers(self: &Arc<Self>) -> Result<BTreeMap<String, NodeRecord>, PluginError> {
        let own = self.own_ids();
        let timeout = i64::try_from(self.config.peer_timeout_ms).unwrap_or(i64::MAX);
        let rows = self
            .with_db("reading the node registry", move |connection, _| {
                let mut select = connection
                    .prepare_cached("SELECT node_id, record FROM comms_registry WHERE heartbeat_at > ?1")?;
                let rows = select.query_map(params![now_ms().saturating_sub(timeout)], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let mut peers = BTreeMap::new();
        for (id, json) in rows {
            if own.contains(&id) {
                continue;
            }
            match serde_json::from_str::<RegistryRowRecord>(&json) {
                Ok(stored) => {
                    peers.insert(id.clone(), stored.into_record(id));
                }
                Err(error) => tracing::debug!(node = %id, %error, "unreadable registry row ignored"),
            }
        }
        Ok(peers)
    }

    /// Writes (or refreshes) the rows of every announced node.
    async fn heartbeat(self: &Arc<Self>) -> Result<(), PluginError> {
        let records: Vec<(String, String)> = self
            .announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, record)| (id.clone(), encode(record)))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        self.with_db("refreshing heartbeats in the node registry", move |connection, _| {
            upsert(connection, &records, now_ms())
        })
        .await
    }
}

/// The `record` column: the row shape of [`comms_plugin_api::record_json`] (the PostgreSQL
/// plugin writes the same).
fn encode(record: &NodeRecord) -> String {
    // Plain strings and vectors: serializing them cannot fail.
    serde_json::to_string(&RegistryRowRecord::from(record)).unwrap_or_default()
}

/// Runs `work` in a `BEGIN IMMEDIATE` transaction: the write lock is taken (waiting up to the
/// busy timeout) before anything is read, so the transaction can never fail to upgrade.
fn immediate<T>(connection: &Connection, work: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    match work() {
        Ok(value) => {
            connection.execute_batch("COMMIT")?;
            Ok(value)
        }
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

/// Writes `records` with a fresh heartbeat (`now`), or with one that never goes stale
/// (`i64::MAX`) for an offline record.
fn upsert(connection: &Connection, records: &[(String, String)], heartbeat_at: i64) -> rusqlite::Result<()> {
    immediate(connection, || {
        let mut statement = connection.prepare_cached(
            "INSERT INTO comms_registry (node_id, record, heartbeat_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (node_id) DO UPDATE SET record = excluded.record, heartbeat_at = excluded.heartbeat_at",
        )?;
        for (id, record) in records {
            statement.execute(params![id, record, heartbeat_at])?;
        }
        Ok(())
    })
}

/// Discovery through the `comms_registry` table of the shared file; see the module docs.
pub struct SqliteDiscovery {
    shared: Arc<Shared>,
    events: PeerEventQueue,
    closed: watch::Sender<bool>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for SqliteDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDiscovery")
            .field("node", &self.shared.node)
            .field("database", &self.shared.config.database)
            .finish_non_exhaustive()
    }
}

impl SqliteDiscovery {
    /// Validates `config`, opens the database and starts the heartbeat and watch task. Must run
    /// inside a tokio runtime.
    pub async fn open(node: NodeId, config: SqliteConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let opened = config.clone();
        let connection =
            tokio::task::spawn_blocking(move || schema::open(&opened)).await.map_err(|error| {
                PluginError::new(ErrorCode::OTHER, format!("opening the database: {error}"))
            })??;
        let shared = Arc::new(Shared {
            config,
            connection: Mutex::new(connection),
            announced: Mutex::default(),
            node,
        });
        let (sender, events) = peer_event_queue(EVENT_QUEUE);
        let closed = watch::channel(false).0;
        let watcher = tokio::spawn(watch(Arc::clone(&shared), sender, closed.subscribe()));
        Ok(Self { shared, events, closed, watcher: Mutex::new(Some(watcher)) })
    }

    fn check_open(&self) -> Result<(), PluginError> {
        if *self.closed.borrow() {
            return Err(PluginError::closed(&format!(
                "sqlite discovery on `{}`",
                self.shared.config.path_text()
            )));
        }
        Ok(())
    }
}

/// The heartbeat and watch loop.
async fn watch(shared: Arc<Shared>, events: PeerEventSender, mut closed: watch::Receiver<bool>) {
    let mut known: BTreeMap<String, NodeRecord> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(shared.config.heartbeat_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = closed.wait_for(|closed| *closed) => return,
        }
        ticks += 1;
        if let Err(error) = shared.heartbeat().await {
            tracing::warn!(%error, "sqlite discovery heartbeat failed; retrying");
        }
        if ticks % 60 == 1 {
            let horizon =
                i64::try_from(shared.config.peer_timeout_ms).unwrap_or(i64::MAX) * GARBAGE_AFTER_TIMEOUTS;
            let collected = shared
                .with_db("deleting long-dead registry rows", move |connection, _| {
                    connection.execute(
                        "DELETE FROM comms_registry WHERE heartbeat_at < ?1",
                        params![now_ms().saturating_sub(horizon)],
                    )
                })
                .await;
            if let Err(error) = collected {
                tracing::debug!(%error, "garbage collection of the registry failed");
            }
        }
        let live = match shared.live_peers().await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%error, "sqlite discovery could not read the registry; retrying");
                continue;
            }
        };
        let changes = comms_plugin_api::snapshot_changes(&known, &live);
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
impl Discovery for SqliteDiscovery {
    /// Writes the record with a fresh heartbeat; the background task keeps it fresh. An offline
    /// record ([`NodeRecord::is_offline`]: the node closed, its mailbox keeps its messages) is
    /// written with a heartbeat that never goes stale and is not refreshed, nor removed on
    /// close: it stays until the node announces itself again or withdraws.
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        self.check_open()?;
        let row = vec![(record.id.as_str().to_string(), encode(&record))];
        let heartbeat_at = if record.is_offline() { i64::MAX } else { now_ms() };
        {
            let mut announced = self.shared.announced.lock().unwrap_or_else(|p| p.into_inner());
            if record.is_offline() {
                announced.remove(record.id.as_str());
            } else {
                announced.insert(record.id.as_str().to_string(), record);
            }
        }
        self.shared
            .with_db("announcing in the node registry", move |connection, _| {
                upsert(connection, &row, heartbeat_at)
            })
            .await
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        self.check_open()?;
        self.shared.announced.lock().unwrap_or_else(|p| p.into_inner()).remove(node.as_str());
        let id = node.as_str().to_string();
        self.shared
            .with_db("withdrawing from the node registry", move |connection, _| {
                connection.execute("DELETE FROM comms_registry WHERE node_id = ?1", params![id]).map(drop)
            })
            .await
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        self.check_open()?;
        Ok(self.shared.live_peers().await?.into_values().collect())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.closed.subscribe()).await)
    }

    /// Stops the heartbeat and removes the rows of the nodes this instance announced, so that
    /// peers see them leave at once. Idempotent.
    async fn close(&self) -> Result<(), PluginError> {
        if self.closed.send_replace(true) {
            return Ok(());
        }
        if let Some(watcher) = self.watcher.lock().unwrap_or_else(|p| p.into_inner()).take() {
            watcher.abort();
        }
        let ids: Vec<String> =
            std::mem::take(&mut *self.shared.announced.lock().unwrap_or_else(|p| p.into_inner()))
                .into_keys()
                .collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.shared
            .with_db("removing this node from the node registry", move |connection, _| {
                immediate(connection, || {
                    for id in &ids {
                        connection.execute("DELETE FROM comms_registry WHERE node_id = ?1", params![id])?;
                    }
                    Ok(())
                })
            })
            .await
    }
}

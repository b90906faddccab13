//! Discovery through the database: `<schema>.comms_registry` holds one row per announced node
//! with its record (JSON text) and a heartbeat time stamp.
//!
//! A background task refreshes the heartbeats of the nodes this instance announced every
//! `heartbeat_ms` and reads the live rows (heartbeat younger than `peer_timeout_ms`, or marked
//! offline) to turn the differences into join / update / leave events. A trigger notifies the
//! schema's registry channel when a row appears, changes its record or goes (not on heartbeats),
//! and the task, which `LISTEN`s to it, reads the rows at once: joins, updates and withdrawals
//! are seen within a round trip; a node that stops without withdrawing is seen leaving when its
//! heartbeat is `peer_timeout_ms` old (at the next tick after that). Rows whose heartbeat is far
//! older (a node that crashed and never came back) are deleted by whichever instance sees them.

use crate::{config::PostgresConfig, link::Link, schema};
use comms_plugin_api::{
    async_trait,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    record_json::RegistryRowRecord,
    Discovery, IncidentCounters, NodeId, NodeRecord, PeerEvent, PluginError,
};
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
const GARBAGE_AFTER_TIMEOUTS: f64 = 10.0;

/// The `record` column: the row shape of [`comms_plugin_api::record_json`] (the SQLite plugin
/// writes the same).
fn encode(record: &NodeRecord) -> String {
    // Plain strings and vectors: serializing them cannot fail.
    serde_json::to_string(&RegistryRowRecord::from(record)).unwrap_or_default()
}

/// The SQL of one schema.
#[derive(Debug)]
struct Statements {
    upsert: String,
    live: String,
    withdraw: String,
    garbage: String,
}

impl Statements {
    fn new(schema: &str) -> Self {
        let registry = format!("\"{schema}\".comms_registry");
        Self {
            upsert: format!(
                "INSERT INTO {registry} (node_id, record, heartbeat_at, offline) VALUES ($1, $2, now(), $3)
                 ON CONFLICT (node_id) DO UPDATE
                 SET record = excluded.record, heartbeat_at = excluded.heartbeat_at, offline = excluded.offline"
            ),
            live: format!(
                "SELECT node_id, record FROM {registry}
                 WHERE offline OR heartbeat_at > now() - $1::float8 * interval '1 millisecond'"
            ),
            withdraw: format!("DELETE FROM {registry} WHERE node_id = ANY($1)"),
            garbage: format!(
                "DELETE FROM {registry} WHERE NOT offline AND heartbeat_at < now() - $1::float8 * interval '1 millisecond'"
            ),
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: PostgresConfig,
    link: Link,
    statements: Statements,
    /// This instance's own live records, by node id: refreshed by the heartbeat, never reported
    /// as peers.
    announced: Mutex<BTreeMap<String, NodeRecord>>,
    node: NodeId,
}

impl Shared {
    fn own_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            self.announced.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        ids.push(self.node.as_str().to_string());
        ids
    }

    /// The live rows, except this instance's own nodes.
    async fn live_peers(&self) -> Result<BTreeMap<String, NodeRecord>, PluginError> {
        let own = self.own_ids();
        let timeout = self.config.peer_timeout_ms as f64;
        let rows = self
            .link
            .run("reading the node registry", |client| async move {
                client.query(&self.statements.live, &[&timeout]).await
            })
            .await?;
        let mut peers = BTreeMap::new();
        for row in rows {
            let (id, json): (String, String) = (row.get(0), row.get(1));
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
            // Any program can write into the table: a record must meet the limits of one.
            if let Err(error) = record.check() {
                tracing::debug!(%error, "registry row ignored");
                continue;
            }
            peers.insert(id, record);
        }
        Ok(peers)
    }

    async fn upsert(&self, id: &str, record: &str, offline: bool) -> Result<(), PluginError> {
        self.link
            .run("announcing in the node registry", |client| async move {
                client.execute(&self.statements.upsert, &[&id, &record, &offline]).await
            })
            .await
            .map(drop)
    }

    /// Refreshes the rows of every announced node.
    async fn heartbeat(&self) -> Result<(), PluginError> {
        let records: Vec<(String, String)> = self
            .announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, record)| (id.clone(), encode(record)))
            .collect();
        for (id, record) in &records {
            self.upsert(id, record, false).await?;
        }
        Ok(())
    }

    async fn delete(&self, ids: &[String]) -> Result<(), PluginError> {
        self.link
            .run("removing nodes from the node registry", |client| async move {
                client.execute(&self.statements.withdraw, &[&ids]).await
            })
            .await
            .map(drop)
    }
}

/// Discovery through `<schema>.comms_registry`; see the module docs.
#[derive(Debug)]
pub struct PostgresDiscovery {
    shared: Arc<Shared>,
    events: PeerEventQueue,
    closed: watch::Sender<bool>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PostgresDiscovery {
    /// Validates `config`, connects, creates or migrates the schema, and starts the heartbeat
    /// and watch task.
    pub async fn open(node: NodeId, config: PostgresConfig) -> Result<Self, PluginError> {
        // Heartbeats need no flush: a lost one is written again a heartbeat later.
        let link = Link::open(&config, false, Arc::new(IncidentCounters::default())).await?;
        {
            let mut dedicated = link.dedicated().await?;
            schema::migrate(&link, &mut dedicated, &config.schema).await?;
        }
        let schema_name = config.schema.as_str();
        let channel = link
            .run("naming the notification channel", |client| async move {
                client.query_one("SELECT 'comms_registry_' || md5($1)", &[&schema_name]).await
            })
            .await?
            .get::<_, String>(0);
        link.listen(channel).await?;
        let shared = Arc::new(Shared {
            statements: Statements::new(&config.schema),
            config,
            link,
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
                "postgres discovery (schema `{}`)",
                self.shared.config.schema
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
        let tick = tokio::select! {
            _ = ticker.tick() => true,
            _ = shared.link.wake().notified() => false,
            _ = closed.wait_for(|closed| *closed) => return,
        };
        if tick {
            ticks += 1;
            if let Err(error) = shared.heartbeat().await {
                tracing::warn!(%error, "postgres discovery heartbeat failed; retrying");
            }
            if ticks % 60 == 1 {
                let horizon = shared.config.peer_timeout_ms as f64 * GARBAGE_AFTER_TIMEOUTS;
                let collected = shared
                    .link
                    .run("deleting long-dead registry rows", |client| {
                        let shared = &shared;
                        async move { client.execute(&shared.statements.garbage, &[&horizon]).await }
                    })
                    .await;
                if let Err(error) = collected {
                    tracing::debug!(%error, "garbage collection of the registry failed");
                }
            }
        }
        let live = match shared.live_peers().await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%error, "postgres discovery could not read the registry; retrying");
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
impl Discovery for PostgresDiscovery {
    /// Writes the record with a fresh heartbeat; the background task keeps it fresh. An offline
    /// record ([`NodeRecord::is_offline`]: the node closed, its mailbox keeps its messages) is
    /// stored without expiry, not refreshed, and not removed on close: it stays until the node
    /// announces itself again or withdraws.
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        self.check_open()?;
        let id = record.id.as_str().to_string();
        let encoded = encode(&record);
        let offline = record.is_offline();
        {
            let mut announced = self.shared.announced.lock().unwrap_or_else(|p| p.into_inner());
            if offline {
                announced.remove(&id);
            } else {
                announced.insert(id.clone(), record);
            }
        }
        self.shared.upsert(&id, &encoded, offline).await
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        self.check_open()?;
        self.shared.announced.lock().unwrap_or_else(|p| p.into_inner()).remove(node.as_str());
        self.shared.delete(&[node.as_str().to_string()]).await
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
        let removed = if ids.is_empty() { Ok(()) } else { self.shared.delete(&ids).await };
        self.shared.link.close();
        removed
    }
}

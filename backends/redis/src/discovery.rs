//! Redis discovery: node records as keys with a TTL refreshed by heartbeats, join / leave
//! notifications over pub/sub, and a periodic scan that notices expiries (a node that crashed)
//! and anything a notification missed.
//!
//! - record: key `<prefix>:node:<id>`, a JSON string (see [`RecordJson`]) with `PX ttl_ms`;
//! - notifications: channel `<prefix>:nodes`, JSON `{"event":"announce","record":{..}}` or
//!   `{"event":"withdraw","id":".."}`.

use crate::{
    config::RedisDiscoveryConfig,
    connect::{self, RedisUrl},
    connection::Connection,
    topic_pattern::escape_into,
    transport::closing,
};
use comms_plugin_api::{
    async_trait,
    backoff::Backoff,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    Discovery, ErrorCode, NodeId, NodeRecord, PeerEvent, PeerEventKind, PluginError,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{sync::watch, task::JoinHandle};

/// Nodes whose events may wait for `next_event` before the watcher waits (one event per node:
/// see [`comms_plugin_api::peer_events`]).
const EVENT_QUEUE: usize = 256;

/// A node record as stored (and as another program can write it): the keyed shape of
/// [`comms_plugin_api::record_json`].
pub use comms_plugin_api::record_json::RecordJson;

/// A notification on `<prefix>:nodes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Notification {
    Announce { record: RecordJson },
    Withdraw { id: String },
}

struct Shared {
    url: RedisUrl,
    config: RedisDiscoveryConfig,
    node: NodeId,
    connection: Connection,
    /// This node's record while announced; the heartbeat re-writes it.
    own: Mutex<Option<String>>,
    events: PeerEventSender,
    shutdown: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn key(&self, id: &str) -> String {
        format!("{}:node:{id}", self.config.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:nodes", self.config.prefix)
    }

    fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Writes a record with the TTL, or without one (`expires: false`, an offline record).
    async fn write_record(&self, key: &str, json: &str, expires: bool) -> Result<(), PluginError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("SET");
        command.arg(key).arg(json);
        if expires {
            command.arg("PX").arg(self.config.ttl_ms);
        }
        let result: Result<(), _> = command.query_async(&mut connection).await;
        result.map_err(|error| self.url.error(&format!("writing the node record `{key}`"), &error))
    }

    async fn notify(&self, notification: &Notification) -> Result<(), PluginError> {
        let text = serde_json::to_string(notification).unwrap_or_default();
        let mut connection = self.connection.clone();
        let result: Result<i64, _> =
            redis::cmd("PUBLISH").arg(self.channel()).arg(text).query_async(&mut connection).await;
        result.map(drop).map_err(|error| self.url.error("publishing a discovery notification", &error))
    }

    /// Every record in Redis now, this node's included.
    async fn scan(&self) -> Result<HashMap<String, NodeRecord>, PluginError> {
        let mut pattern = String::new();
        escape_into(&mut pattern, &self.config.prefix);
        pattern.push_str(":node:*");
        let mut connection = self.connection.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut connection)
                .await
                .map_err(|error| self.url.error("listing node records", &error))?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort_unstable();
        keys.dedup();
        let mut records = HashMap::new();
        for chunk in keys.chunks(200) {
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(chunk)
                .query_async(&mut connection)
                .await
                .map_err(|error| self.url.error("reading node records", &error))?;
            for (key, value) in chunk.iter().zip(values) {
                let Some(json) = value else { continue };
                match serde_json::from_str::<RecordJson>(&json) {
                    Ok(record) => {
                        records.insert(record.id.clone(), NodeRecord::from(record));
                    }
                    Err(error) => {
                        tracing::debug!(%key, %error, "ignoring a node record that is not valid JSON")
                    }
                }
            }
        }
        Ok(records)
    }
}

/// The Redis discovery: see the module documentation.
pub struct RedisDiscovery {
    shared: Arc<Shared>,
    events: PeerEventQueue,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for RedisDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDiscovery")
            .field("url", &self.shared.url)
            .field("node", &self.shared.node)
            .finish()
    }
}

impl RedisDiscovery {
    /// Connects (retrying with backoff) and starts the heartbeat and the watcher.
    pub async fn connect(node: NodeId, config: RedisDiscoveryConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let url = RedisUrl::new(&config.url, &config.tls_files())?;
        let what = format!("the redis discovery of node `{node}`");
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let connection = url.connect(&what, &config.connect_backoff(), timeout).await?;
        let (events, receiver) = peer_event_queue(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            url,
            config,
            node,
            connection,
            own: Mutex::new(None),
            events,
            shutdown: watch::channel(false).0,
        });
        let tasks = vec![
            tokio::spawn(heartbeat(Arc::clone(&shared))),
            tokio::spawn(watch_peers(Arc::clone(&shared))),
        ];
        Ok(Self { shared, events: receiver, tasks: Mutex::new(tasks) })
    }

    fn closed(&self) -> PluginError {
        PluginError::closed(&format!("the redis discovery of node `{}`", self.shared.node))
    }
}

#[async_trait]
impl Discovery for RedisDiscovery {
    /// Writes the record with its TTL (refreshed by the heartbeat from now on) and notifies. An
    /// offline record ([`NodeRecord::is_offline`]: the node closed, its inbox stream keeps its
    /// messages) is written without a TTL and not refreshed: it stays until the node announces
    /// itself again or withdraws.
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.closed());
        }
        let json = RecordJson::from(&record);
        let text = serde_json::to_string(&json).map_err(|error| {
            PluginError::new(ErrorCode::MALFORMED, format!("cannot encode the node record: {error}"))
        })?;
        let key = self.shared.key(record.id.as_str());
        let expires = !record.is_offline();
        if record.id == self.shared.node {
            *lock(&self.shared.own) = expires.then(|| text.clone());
        }
        self.shared.write_record(&key, &text, expires).await?;
        self.shared.notify(&Notification::Announce { record: json }).await
    }

    /// Deletes the record and notifies; peers see the node leave at once.
    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        if node == self.shared.node {
            lock(&self.shared.own).take();
        }
        let key = self.shared.key(node.as_str());
        let mut connection = self.shared.connection.clone();
        let result: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut connection).await;
        result
            .map_err(|error| self.shared.url.error(&format!("deleting the node record `{key}`"), &error))?;
        self.shared.notify(&Notification::Withdraw { id: node.to_string() }).await
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        if self.shared.is_closed() {
            return Err(self.closed());
        }
        let mut peers: Vec<NodeRecord> =
            self.shared.scan().await?.into_values().filter(|record| record.id != self.shared.node).collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(peers)
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.shared.shutdown.subscribe()).await)
    }

    /// Stops the heartbeat and the watcher. The record is not deleted (that is `withdraw`): a
    /// node closed without withdrawing leaves when its record expires.
    async fn close(&self) -> Result<(), PluginError> {
        if self.shared.shutdown.send_replace(true) {
            return Ok(());
        }
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        Ok(())
    }
}

/// Re-writes this node's record every `heartbeat` so that it outlives its TTL (also re-creating
/// it after a Redis restart).
async fn heartbeat(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut ticker = tokio::time::interval(shared.config.heartbeat());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = closing(&mut shutdown) => return,
        }
        let own = lock(&shared.own).clone();
        if let Some(json) = own {
            if let Err(error) = shared.write_record(&shared.key(shared.node.as_str()), &json, true).await {
                tracing::warn!(%error, "refreshing this node's record failed; retrying at the next heartbeat");
            }
        }
    }
}

/// Turns notifications and scans into events, diffing against what it knew.
async fn watch_peers(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut known: HashMap<String, NodeRecord> = HashMap::new();
    let mut ticker = tokio::time::interval(shared.config.scan_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let backoff =
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2), attempts: u32::MAX };
    let mut attempt = 0;
    let mut notifications: Option<redis::aio::PubSubStream> = None;
    loop {
        if notifications.is_none() {
            notifications = subscribe_notifications(&shared).await;
            if notifications.is_none() {
                attempt += 1;
            } else {
                attempt = 0;
            }
        }
        let pause = backoff.delay_after(attempt.max(1)).unwrap_or(backoff.max);
        let events = tokio::select! {
            message = async {
                match notifications.as_mut() {
                    Some(stream) => stream.next().await,
                    None => {
                        tokio::time::sleep(pause).await;
                        None
                    }
                }
            } => match message {
                Some(message) => notified(&shared, &mut known, message.get_payload_bytes()),
                None => {
                    notifications = None;
                    Vec::new()
                }
            },
            _ = ticker.tick() => match shared.scan().await {
                Ok(records) => rescanned(&shared, &mut known, records),
                Err(error) => {
                    tracing::debug!(%error, "listing node records failed; retrying at the next scan");
                    Vec::new()
                }
            },
            _ = closing(&mut shutdown) => return,
        };
        for event in events {
            tokio::select! {
                sent = shared.events.send(event) => if !sent { return },
                _ = closing(&mut shutdown) => return,
            }
        }
    }
}

async fn subscribe_notifications(shared: &Shared) -> Option<redis::aio::PubSubStream> {
    let client = shared.url.client().ok()?;
    let limit = Duration::from_millis(shared.config.command_timeout_ms);
    let mut pubsub = match tokio::time::timeout(limit, connect::pubsub(client)).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(error)) => {
            tracing::debug!(error = %shared.url.scrub(&error.to_string()), "subscribing to discovery notifications failed");
            return None;
        }
        Err(_) => return None,
    };
    match tokio::time::timeout(limit, pubsub.subscribe(shared.channel())).await {
        Ok(Ok(())) => Some(pubsub.into_on_message()),
        _ => None,
    }
}

fn change(known: &mut HashMap<String, NodeRecord>, record: NodeRecord) -> Option<PeerEvent> {
    match known.insert(record.id.to_string(), record.clone()) {
        None => Some(PeerEvent { kind: PeerEventKind::Joined, record }),
        Some(previous) if previous != record => Some(PeerEvent { kind: PeerEventKind::Updated, record }),
        Some(_) => None,
    }
}

fn notified(shared: &Shared, known: &mut HashMap<String, NodeRecord>, payload: &[u8]) -> Vec<PeerEvent> {
    let notification = match serde_json::from_slice::<Notification>(payload) {
        Ok(notification) => notification,
        Err(error) => {
            tracing::debug!(%error, "ignoring a discovery notification that is not valid JSON");
            return Vec::new();
        }
    };
    match notification {
        Notification::Announce { record } if record.id != shared.node.as_str() => {
            change(known, NodeRecord::from(record)).into_iter().collect()
        }
        Notification::Withdraw { id } if id != shared.node.as_str() => known
            .remove(&id)
            .map(|record| PeerEvent { kind: PeerEventKind::Left, record })
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

fn rescanned(
    shared: &Shared,
    known: &mut HashMap<String, NodeRecord>,
    mut records: HashMap<String, NodeRecord>,
) -> Vec<PeerEvent> {
    records.remove(shared.node.as_str());
    let mut events: Vec<PeerEvent> = Vec::new();
    let gone: Vec<String> = known.keys().filter(|id| !records.contains_key(*id)).cloned().collect();
    for id in gone {
        if let Some(record) = known.remove(&id) {
            events.push(PeerEvent { kind: PeerEventKind::Left, record });
        }
    }
    let mut records: Vec<NodeRecord> = records.into_values().collect();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    events.extend(records.into_iter().filter_map(|record| change(known, record)));
    events
}

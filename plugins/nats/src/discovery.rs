//! NATS discovery: node records in a JetStream key-value bucket, watched for changes.
//!
//! - record: key [`crate::subject::token`]`(<node id>)` in the bucket `bucket`, a JSON object
//!   ([`RecordJson`]); `announce` writes it and a heartbeat rewrites it every `ttl_ms / 3`;
//! - changes: every discovery watches the whole bucket: a new key is a join, a changed record an
//!   update, a deleted key a leave;
//! - expiry: a record that has not been rewritten for `ttl_ms` (its node crashed) is a leave,
//!   and the watcher that notices it deletes it from the bucket. Time is measured on the
//!   watcher's own clock from the moment it saw the record's last write, so clocks need not
//!   agree; a record already in the bucket when a watcher starts gets a full `ttl_ms` from then.
//!   An offline record ([`NodeRecord::is_offline`]) never expires.
//!
//! The bucket keeps one revision per key and no age limit (expiry is the watchers' job, so
//! that offline records can stay).

use crate::{config::NatsDiscoveryConfig, connect, subject};
use async_nats::jetstream::{
    self,
    kv::{self, Operation},
};
use bytes::Bytes;
use comms_plugin_api::{
    async_trait,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender},
    runtime::{self, Task},
    Discovery, ErrorCode, IncidentCounters, NodeId, NodeRecord, PeerEvent, PeerEventKind, PluginError,
};
use futures::StreamExt;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::{sync::watch, time::Instant};

/// Nodes whose events may wait for `next_event` before the watcher waits (one event per node:
/// see [`comms_plugin_api::peer_events`]).
const EVENT_QUEUE: usize = 256;

/// A node record as stored (and as another program can write it): the keyed shape of
/// [`comms_plugin_api::record_json`].
pub use comms_plugin_api::record_json::RecordJson;

/// A record as a watcher knows it.
struct Known {
    record: NodeRecord,
    revision: u64,
    seen: Instant,
}

struct Shared {
    config: NatsDiscoveryConfig,
    node: NodeId,
    client: async_nats::Client,
    kv: kv::Store,
    /// This node's record while announced (and not offline); the heartbeat rewrites it.
    own: Mutex<Option<Bytes>>,
    events: PeerEventSender,
    shutdown: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update leaves the data consistent, even after a panic.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn closing(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

fn parse(value: &[u8]) -> Result<NodeRecord, String> {
    let json: RecordJson = serde_json::from_slice(value).map_err(|error| error.to_string())?;
    let record = NodeRecord::from(json);
    record.check()?;
    Ok(record)
}

impl Shared {
    fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.config.ttl_ms)
    }

    fn error(&self, what: &str, error: impl std::fmt::Display) -> PluginError {
        PluginError::retryable(
            ErrorCode::UNREACHABLE,
            format!("{what}: {}", connect::scrub(&self.config.connection(), &error.to_string())),
        )
    }
}

/// Discovery through a JetStream key-value bucket: see the module documentation.
pub struct NatsDiscovery {
    shared: Arc<Shared>,
    events: PeerEventQueue,
    tasks: Mutex<Vec<Task>>,
}

impl std::fmt::Debug for NatsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDiscovery")
            .field("url", &connect::redacted(&self.shared.config.connection()))
            .field("bucket", &self.shared.config.bucket)
            .field("node", &self.shared.node)
            .finish()
    }
}

impl NatsDiscovery {
    /// Connects (retrying with backoff), creates the bucket if it does not exist, and starts
    /// watching it and sending heartbeats. Must run inside a tokio runtime.
    pub async fn connect(node: NodeId, config: NatsDiscoveryConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let what = format!("the nats discovery of node `{node}`");
        let client =
            connect::connect(&config.connection(), &what, &Arc::new(IncidentCounters::default())).await?;
        let mut context = jetstream::new(client.clone());
        context.set_timeout(Duration::from_millis(config.request_timeout_ms));
        // The bucket's stream is made here, as the key-value convention describes it, rather than
        // with `create_key_value`: that one first asks for the account's limits, an answer the
        // client cannot read from a 2.9 server.
        let stream = jetstream::stream::Config {
            name: format!("KV_{}", config.bucket),
            description: Some("comms node records".to_string()),
            subjects: vec![format!("$KV.{}.>", config.bucket)],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        };
        let bucket_error = |error: &dyn std::fmt::Display| {
            PluginError::retryable(
                ErrorCode::UNREACHABLE,
                format!("{what}: creating the key-value bucket `{}`: {error}", config.bucket),
            )
        };
        context.get_or_create_stream(stream).await.map_err(|error| bucket_error(&error))?;
        let store =
            context.get_key_value(config.bucket.clone()).await.map_err(|error| bucket_error(&error))?;
        let (events, receiver) = peer_event_queue(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            config,
            node,
            client,
            kv: store,
            own: Mutex::new(None),
            events,
            shutdown: watch::channel(false).0,
        });
        let tasks = vec![
            runtime::spawn(heartbeat(Arc::clone(&shared))),
            runtime::spawn(watch_records(Arc::clone(&shared))),
        ];
        Ok(Self { shared, events: receiver, tasks: Mutex::new(tasks) })
    }

    fn closed(&self) -> PluginError {
        PluginError::closed(&format!("the nats discovery of node `{}`", self.shared.node))
    }
}

#[async_trait]
impl Discovery for NatsDiscovery {
    /// Writes the record (and, for this node, keeps rewriting it until withdrawn or offline).
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.closed());
        }
        let json = serde_json::to_vec(&RecordJson::from(&record)).map_err(|error| {
            PluginError::new(ErrorCode::MALFORMED, format!("cannot encode the node record: {error}"))
        })?;
        let value = Bytes::from(json);
        if record.id == self.shared.node {
            *lock(&self.shared.own) = (!record.is_offline()).then(|| value.clone());
        }
        let key = subject::token(record.id.as_str());
        self.shared
            .kv
            .put(&key, value)
            .await
            .map(drop)
            .map_err(|error| self.shared.error(&format!("writing the node record `{key}`"), error))
    }

    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        if node == self.shared.node {
            lock(&self.shared.own).take();
        }
        let key = subject::token(node.as_str());
        self.shared
            .kv
            .delete(&key)
            .await
            .map_err(|error| self.shared.error(&format!("deleting the node record `{key}`"), error))
    }

    /// The records in the bucket now, but this node's, read from the server.
    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        if self.shared.is_closed() {
            return Err(self.closed());
        }
        let what = "listing the node records";
        // The keys come from the stream's own subject list (`STREAM.INFO` with a subject filter,
        // paged), not from `kv.keys()`: that one is a consumer that stops once the server
        // reports nothing pending, and under load (nats-server 2.9.10) it ended before
        // delivering any key: CI saw `peers()` empty right after the join event of the record
        // it should list. A subject whose last message is a delete marker is listed too; `get`
        // answers `None` for it.
        let prefix = self.shared.kv.prefix.as_str();
        let mut subjects = self
            .shared
            .kv
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|error| self.shared.error(what, error))?;
        let mut keys = std::collections::BTreeSet::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|error| self.shared.error(what, error))?;
            if let Some(key) = subject.strip_prefix(prefix) {
                keys.insert(key.to_string());
            }
        }
        let mut peers = Vec::new();
        for key in keys {
            let Some(value) =
                self.shared.kv.get(key.as_str()).await.map_err(|error| self.shared.error(what, error))?
            else {
                continue;
            };
            match parse(&value) {
                Ok(record) if record.id != self.shared.node => peers.push(record),
                Ok(_) => {}
                Err(error) => tracing::debug!(%key, %error, "ignoring a node record that is not valid"),
            }
        }
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(peers)
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.events.next(self.shared.shutdown.subscribe()).await)
    }

    /// Stops the heartbeat and the watcher. The record stays until withdrawn or expired.
    async fn close(&self) -> Result<(), PluginError> {
        if self.shared.shutdown.send_replace(true) {
            return Ok(());
        }
        let tasks: Vec<Task> = lock(&self.tasks).drain(..).collect();
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(2), task.wait()).await.is_err() {
                task.abort();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.client.drain()).await;
        Ok(())
    }
}

async fn heartbeat(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut ticker = tokio::time::interval(shared.ttl() / 3);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = closing(&mut shutdown) => return,
        }
        let own = lock(&shared.own).clone();
        if let Some(value) = own {
            if let Err(error) = shared.kv.put(subject::token(shared.node.as_str()), value).await {
                tracing::warn!(error = %connect::scrub(&shared.config.connection(), &error.to_string()),
                    "refreshing this node's record failed; retrying at the next heartbeat");
            }
        }
    }
}

/// What one bucket change means for the watcher's view, as events to send.
fn apply(shared: &Shared, known: &mut HashMap<String, Known>, entry: kv::Entry) -> Option<PeerEvent> {
    match entry.operation {
        Operation::Delete | Operation::Purge => {
            known.remove(&entry.key).map(|gone| PeerEvent { kind: PeerEventKind::Left, record: gone.record })
        }
        Operation::Put => {
            let record = match parse(&entry.value) {
                Ok(record) => record,
                Err(error) => {
                    tracing::debug!(key = %entry.key, %error, "ignoring a node record that is not valid");
                    return None;
                }
            };
            if record.id == shared.node {
                return None;
            }
            let previous = known.insert(
                entry.key,
                Known { record: record.clone(), revision: entry.revision, seen: Instant::now() },
            );
            match previous {
                None => Some(PeerEvent { kind: PeerEventKind::Joined, record }),
                Some(previous) if previous.record != record => {
                    Some(PeerEvent { kind: PeerEventKind::Updated, record })
                }
                Some(_) => None,
            }
        }
    }
}

/// Records not rewritten for the TTL: removed from the view and, if still at the revision seen
/// last, from the bucket.
async fn expire(shared: &Shared, known: &mut HashMap<String, Known>) -> Vec<PeerEvent> {
    let ttl = shared.ttl();
    let expired: Vec<String> = known
        .iter()
        .filter(|(_, known)| !known.record.is_offline() && known.seen.elapsed() > ttl)
        .map(|(key, _)| key.clone())
        .collect();
    let mut events = Vec::new();
    for key in expired {
        let Some(gone) = known.remove(&key) else { continue };
        // A node that rewrote its record meanwhile keeps it: the revision no longer matches.
        let _ = shared.kv.delete_expect_revision(&key, Some(gone.revision)).await;
        tracing::info!(node = %gone.record.id, "a node record expired");
        events.push(PeerEvent { kind: PeerEventKind::Left, record: gone.record });
    }
    events
}

async fn watch_records(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(shared.config.scan_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut delay = Duration::from_millis(100);
    loop {
        let mut changes = tokio::select! {
            watch = shared.kv.watch_all() => match watch {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!(error = %connect::scrub(&shared.config.connection(), &error.to_string()),
                        "watching the node records failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closing(&mut shutdown) => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
            _ = closing(&mut shutdown) => return,
        };
        delay = Duration::from_millis(100);
        loop {
            let events = tokio::select! {
                change = changes.next() => match change {
                    Some(Ok(entry)) => apply(&shared, &mut known, entry).into_iter().collect(),
                    // The watch ended or failed: start a new one (it replays the current records).
                    _ => break,
                },
                _ = ticker.tick() => expire(&shared, &mut known).await,
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
}

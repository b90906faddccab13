//! AMQP discovery: announcements on a fanout exchange, heartbeats, expiry.
//!
//! Every instance binds its own exclusive queue to the fanout exchange, so every node sees
//! every announcement. A node re-announces itself every `heartbeat_interval_ms`, and at once
//! when it hears a node it did not know (so a newcomer learns the others within a round trip).
//! A peer leaves when it withdraws or when it has not been heard from for the `expires_in_ms`
//! its last announcement stated.

use crate::{config::AmqpDiscoveryConfig, connection};
use comms_plugin_api::{
    async_trait,
    log_rate::LogRateLimit,
    peer_events::{peer_event_queue, PeerEventQueue, PeerEventSender, QueueFull},
    record_json::ExtensionsJson,
    redact::redact_url,
    Discovery, ErrorCode, NodeId, NodeRecord, PeerEvent, PeerEventKind, PluginError,
};
use futures::StreamExt;
use lapin::{
    options::{
        BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
    BasicProperties, Channel, Connection, ExchangeKind,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{sync::watch, time::Instant};

/// Version of the announcement format below.
pub const ANNOUNCEMENT_VERSION: u32 = 1;

/// Nodes whose events may wait for `next_event` (one event per node: see
/// [`comms_plugin_api::peer_events`]); an event about one more node is dropped and logged (the
/// peer list stays right).
const EVENT_CAPACITY: usize = 1024;

/// One message on the discovery exchange (JSON, content type `application/json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// [`ANNOUNCEMENT_VERSION`].
    pub v: u32,
    /// `announce` or `withdraw`.
    pub kind: String,
    /// The node.
    pub id: String,
    /// `{transport, address}` per transport (announce only).
    #[serde(default)]
    pub addresses: Vec<AnnouncedAddress>,
    /// Services served.
    #[serde(default)]
    pub services: Vec<String>,
    /// Topic patterns subscribed to.
    #[serde(default)]
    pub topics: Vec<String>,
    /// `[name, value]` pairs.
    #[serde(default)]
    pub metadata: Vec<(String, String)>,
    /// Silence after which peers consider the node gone.
    #[serde(default)]
    pub expires_in_ms: u64,
    /// `[key, hex]` pairs (the record's extensions), left out when there are none.
    #[serde(default, skip_serializing_if = "ExtensionsJson::is_empty")]
    pub extensions: ExtensionsJson,
}

/// One address in an [`Announcement`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedAddress {
    /// Transport name (the config table name, e.g. `amqp`).
    pub transport: String,
    /// Its address (for the AMQP transport, the inbox queue).
    pub address: String,
}

impl Announcement {
    fn announce(record: &NodeRecord, expires_in: Duration) -> Self {
        Self {
            v: ANNOUNCEMENT_VERSION,
            kind: "announce".into(),
            id: record.id.as_str().to_string(),
            addresses: record
                .addresses
                .iter()
                .map(|(transport, address)| AnnouncedAddress {
                    transport: transport.clone(),
                    address: address.clone(),
                })
                .collect(),
            services: record.services.clone(),
            topics: record.topics.clone(),
            metadata: record.metadata.clone(),
            expires_in_ms: expires_in.as_millis() as u64,
            extensions: ExtensionsJson(record.extensions.clone()),
        }
    }

    fn withdraw(node: &NodeId) -> Self {
        Self {
            v: ANNOUNCEMENT_VERSION,
            kind: "withdraw".into(),
            id: node.as_str().to_string(),
            addresses: Vec::new(),
            services: Vec::new(),
            topics: Vec::new(),
            metadata: Vec::new(),
            expires_in_ms: 0,
            extensions: ExtensionsJson::default(),
        }
    }

    fn record(&self) -> NodeRecord {
        {
            let mut value = NodeRecord::new(NodeId::new(self.id.clone()));
            value.addresses =
                self.addresses.iter().map(|a| (a.transport.clone(), a.address.clone())).collect();
            value.services = self.services.clone();
            value.topics = self.topics.clone();
            value.metadata = self.metadata.clone();
            value.extensions = self.extensions.0.clone();
            value
        }
    }
}

/// What changed after one announcement, in the pure peer table.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: HashMap<String, (NodeRecord, Instant)>,
}

impl PeerTable {
    /// Applies `announcement` heard at `now`; returns the event it causes, if any.
    pub fn apply(&mut self, announcement: &Announcement, now: Instant) -> Option<PeerEvent> {
        match announcement.kind.as_str() {
            "announce" => {
                let record = announcement.record();
                let expiry = now + Duration::from_millis(announcement.expires_in_ms.max(1));
                match self.peers.insert(announcement.id.clone(), (record.clone(), expiry)) {
                    None => Some(PeerEvent { kind: PeerEventKind::Joined, record }),
                    Some((old, _)) if old != record => {
                        Some(PeerEvent { kind: PeerEventKind::Updated, record })
                    }
                    Some(_) => None,
                }
            }
            "withdraw" => self
                .peers
                .remove(&announcement.id)
                .map(|(record, _)| PeerEvent { kind: PeerEventKind::Left, record }),
            _ => None,
        }
    }

    /// Removes the peers silent past their expiry; returns their `Left` events.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerEvent> {
        let gone: Vec<String> =
            self.peers.iter().filter(|(_, (_, expiry))| *expiry <= now).map(|(id, _)| id.clone()).collect();
        gone.into_iter()
            .filter_map(|id| self.peers.remove(&id))
            .map(|(record, _)| PeerEvent { kind: PeerEventKind::Left, record })
            .collect()
    }

    /// The known peers, sorted by id.
    pub fn records(&self) -> Vec<NodeRecord> {
        let mut records: Vec<NodeRecord> = self.peers.values().map(|(record, _)| record.clone()).collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    }

    /// Whether `id` is known.
    pub fn knows(&self, id: &str) -> bool {
        self.peers.contains_key(id)
    }
}

/// Discovery over an AMQP fanout exchange; see the module docs.
#[derive(Debug)]
pub struct AmqpDiscovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: NodeId,
    config: AmqpDiscoveryConfig,
    url: String,
    /// The broker URL and TLS settings, to connect with.
    broker: connection::Broker,
    own: Mutex<Option<NodeRecord>>,
    table: Mutex<PeerTable>,
    events_tx: PeerEventSender,
    events_rx: PeerEventQueue,
    /// The channel announcements are published on, while connected.
    channel: watch::Sender<Option<Channel>>,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
}

struct Session {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

impl AmqpDiscovery {
    /// Connects (retrying per `connect_attempts`) and starts listening. Must run inside a tokio
    /// runtime.
    pub async fn connect(node: NodeId, config: AmqpDiscoveryConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let broker = connection::Broker::new(&config.url, &config.tls_files())?;
        let (events_tx, events_rx) = peer_event_queue(EVENT_CAPACITY);
        let inner = Arc::new(Inner {
            url: redact_url(&config.url),
            broker,
            node,
            config,
            own: Mutex::new(None),
            table: Mutex::new(PeerTable::default()),
            events_tx,
            events_rx,
            channel: watch::channel(None).0,
            closed: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
        });
        let backoff = inner.config.backoff();
        let session = connection::retry(&backoff, |_| open_session(&inner, 0)).await.map_err(
            |(mut error, attempts)| {
                if !connection::is_fatal(&error) {
                    error.message = format!("{} ({attempts} attempts)", error.message);
                }
                error
            },
        )?;
        inner.channel.send_replace(Some(session.channel.clone()));
        tokio::spawn(run(Arc::clone(&inner), session));
        Ok(Self { inner })
    }
}

async fn open_session(inner: &Inner, generation: u64) -> Result<Session, PluginError> {
    let url = inner.config.url.as_str();
    let name = format!("comms {} discovery", inner.node);
    let connection = connection::connect_once(&inner.broker, &name).await?;
    let fail = |what: &'static str| move |error: lapin::Error| connection::amqp_error(url, what, &error);
    let set_up = async {
        let channel = connection.create_channel().await.map_err(fail("opening a channel"))?;
        let exchange = ShortString::try_new(inner.config.exchange.as_str())
            .map_err(|_| PluginError::invalid_config("key `exchange`: longer than 255 bytes"))?;
        let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel
            .exchange_declare(exchange.clone(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await
            .map_err(fail("declaring the discovery exchange"))?;
        let queue = format!("comms.discovery.{}.{:x}.{generation}", inner.node, std::process::id());
        let queue = ShortString::try_new(queue)
            .map_err(|_| PluginError::invalid_config("the node id is too long for an AMQP queue name"))?;
        let private =
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        channel
            .queue_declare(queue.clone(), private, FieldTable::default())
            .await
            .map_err(fail("declaring the discovery queue"))?;
        channel
            .queue_bind(
                queue.clone(),
                exchange,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("binding the discovery queue"))?;
        let no_ack = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
        let consumer = channel
            .basic_consume(queue, "".into(), no_ack, FieldTable::default())
            .await
            .map_err(fail("consuming the discovery queue"))?;
        Ok::<_, PluginError>((channel, consumer))
    };
    match set_up.await {
        Ok((channel, consumer)) => Ok(Session { connection, channel, consumer }),
        Err(error) => {
            connection::close(&connection).await;
            Err(error)
        }
    }
}

impl Inner {
    fn emit(&self, event: PeerEvent) {
        // Rate-limited: announcements from many unknown nodes (a hostile publisher's) must not
        // flood the log too.
        static EVENTS_DROPPED: LogRateLimit = LogRateLimit::standard();
        if let Err(QueueFull(event)) = self.events_tx.push(event) {
            if let Some(repeats) = EVENTS_DROPPED.check() {
                tracing::warn!(
                    node = %event.record.id,
                    "AMQP discovery: peer events are not being read; an event was dropped{repeats}"
                );
            }
        }
    }

    async fn publish(&self, announcement: &Announcement) -> Result<(), PluginError> {
        let Some(channel) = self.channel.borrow().clone() else {
            return Err(PluginError::retryable(
                ErrorCode::UNREACHABLE,
                format!("no connection to the AMQP broker at {} (reconnecting)", self.url),
            ));
        };
        let body = serde_json::to_vec(announcement).map_err(|error| {
            PluginError::new(ErrorCode::OTHER, format!("encoding an announcement: {error}"))
        })?;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type("comms.announcement".into());
        channel
            .basic_publish(
                self.config.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .map(drop)
            .map_err(|error| connection::amqp_error(&self.config.url, "publishing an announcement", &error))
    }

    async fn announce_own(&self) {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(record) = own {
            if let Err(error) = self.publish(&Announcement::announce(&record, self.config.expiry())).await {
                tracing::debug!(%error, "AMQP discovery heartbeat not sent");
            }
        }
    }

    /// Handles one message from the exchange; `true` if this node should answer with its own
    /// announcement (a newcomer).
    fn heard(&self, body: &[u8]) -> bool {
        let announcement: Announcement = match serde_json::from_slice(body) {
            Ok(announcement) => announcement,
            Err(error) => {
                tracing::warn!(%error, "AMQP discovery: an undecodable announcement was ignored");
                return false;
            }
        };
        if announcement.id == self.node.as_str() {
            return false;
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let newcomer = announcement.kind == "announce" && !table.knows(&announcement.id);
        if let Some(event) = table.apply(&announcement, Instant::now()) {
            self.emit(event);
        }
        newcomer
    }

    fn expire(&self) {
        let gone = self.table.lock().unwrap_or_else(|p| p.into_inner()).expire(Instant::now());
        for event in gone {
            self.emit(event);
        }
    }
}

/// Listens, heartbeats and expires until closed; reconnects when the connection drops.
async fn run(inner: Arc<Inner>, mut session: Session) {
    let mut shutdown = inner.shutdown.subscribe();
    let interval = Duration::from_millis(inner.config.heartbeat_interval_ms);
    let mut generation = 0u64;
    loop {
        inner.channel.send_replace(Some(session.channel.clone()));
        inner.announce_own().await;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = tokio::select! {
                _ = connection::closing(&mut shutdown) => true,
                _ = ticker.tick() => {
                    inner.expire();
                    if !connection::healthy(&session.connection, &[&session.channel]) {
                        break;
                    }
                    inner.announce_own().await;
                    false
                }
                delivery = session.consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        if inner.heard(&delivery.data) {
                            inner.announce_own().await;
                        }
                        false
                    }
                    _ => break,
                }
            };
            if stop {
                inner.channel.send_replace(None);
                connection::close(&session.connection).await;
                return;
            }
        }
        tracing::warn!(url = %inner.url, node = %inner.node, "AMQP discovery lost its connection; reconnecting");
        inner.channel.send_replace(None);
        connection::close(&session.connection).await;
        let backoff = comms_plugin_api::backoff::Backoff { attempts: u32::MAX, ..inner.config.backoff() };
        let mut attempt = 0;
        session = loop {
            attempt += 1;
            generation += 1;
            match open_session(&inner, generation).await {
                Ok(session) => break session,
                Err(error) => {
                    if connection::is_fatal(&error) {
                        tracing::error!(url = %inner.url, attempt, %error, "AMQP discovery could not reconnect");
                    } else {
                        tracing::warn!(url = %inner.url, attempt, %error, "AMQP discovery could not reconnect");
                    }
                    inner.expire();
                    let delay = backoff.delay_after(attempt).unwrap_or(backoff.max);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = connection::closing(&mut shutdown) => return,
                    }
                }
            }
        };
    }
}

#[async_trait]
impl Discovery for AmqpDiscovery {
    /// Publishes `record` now and with every heartbeat from now on. While the connection is
    /// down it goes out as soon as the connection is back.
    async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(PluginError::closed("AMQP discovery"));
        }
        *inner.own.lock().unwrap_or_else(|p| p.into_inner()) = Some(record.clone());
        match inner.publish(&Announcement::announce(&record, inner.config.expiry())).await {
            Err(error) if error.code == ErrorCode::UNREACHABLE => {
                tracing::debug!(%error, "announcement deferred until the connection is back");
                Ok(())
            }
            other => other,
        }
    }

    /// Stops the heartbeats and tells every peer that `node` left.
    async fn withdraw(&self, node: NodeId) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(PluginError::closed("AMQP discovery"));
        }
        {
            let mut own = inner.own.lock().unwrap_or_else(|p| p.into_inner());
            if own.as_ref().is_some_and(|record| record.id == node) {
                *own = None;
            }
        }
        inner.publish(&Announcement::withdraw(&node)).await
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        Ok(self.inner.table.lock().unwrap_or_else(|p| p.into_inner()).records())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        Ok(self.inner.events_rx.next(self.inner.shutdown.subscribe()).await)
    }

    async fn close(&self) -> Result<(), PluginError> {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            self.inner.shutdown.send_replace(true);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, service: &str) -> NodeRecord {
        {
            let mut value = NodeRecord::new(NodeId::new(id));
            value.addresses = vec![("amqp".into(), format!("comms.inbox.{id}"))];
            value.services = vec![service.into()];
            value.topics = vec!["orders.>".into()];
            value.metadata = vec![("zone".into(), "eu".into())];
            value
        }
    }

    #[test]
    fn announcements_are_json_and_carry_the_whole_record() {
        let announcement = Announcement::announce(&record("a", "echo"), Duration::from_secs(3));
        let json = serde_json::to_string(&announcement).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"kind":"announce","id":"a","addresses":[{"transport":"amqp","address":"comms.inbox.a"}],"services":["echo"],"topics":["orders.>"],"metadata":[["zone","eu"]],"expires_in_ms":3000}"#
        );
        let back: Announcement = serde_json::from_str(&json).unwrap();
        assert_eq!(back.record(), record("a", "echo"));
        // A minimal withdrawal from another program.
        let minimal: Announcement = serde_json::from_str(r#"{"v":1,"kind":"withdraw","id":"a"}"#).unwrap();
        assert_eq!(minimal.kind, "withdraw");
    }

    /// A discovery stores and returns a record's extensions; an announcement without them is
    /// written as before (above).
    #[test]
    fn announcements_carry_the_records_extensions() {
        let mut with = record("a", "echo");
        with.extensions.set("future", vec![1, 2, 3]);
        let json = serde_json::to_string(&Announcement::announce(&with, Duration::from_secs(3))).unwrap();
        assert!(json.ends_with(r#""expires_in_ms":3000,"extensions":[["future","010203"]]}"#), "{json}");
        assert_eq!(serde_json::from_str::<Announcement>(&json).unwrap().record(), with);
    }

    #[test]
    fn join_update_withdraw_and_expiry() {
        let mut table = PeerTable::default();
        let now = Instant::now();
        let first = Announcement::announce(&record("a", "echo"), Duration::from_secs(3));
        assert_eq!(table.apply(&first, now).map(|e| e.kind), Some(PeerEventKind::Joined));
        assert_eq!(table.apply(&first, now).map(|e| e.kind), None, "a heartbeat changes nothing");
        let changed = Announcement::announce(&record("a", "other"), Duration::from_secs(3));
        assert_eq!(table.apply(&changed, now).map(|e| e.kind), Some(PeerEventKind::Updated));
        let withdraw = Announcement::withdraw(&NodeId::new("a"));
        let left = table.apply(&withdraw, now).unwrap();
        assert_eq!((left.kind, left.record), (PeerEventKind::Left, record("a", "other")));
        assert!(table.records().is_empty());

        let b = Announcement::announce(&record("b", "echo"), Duration::from_secs(3));
        table.apply(&b, now);
        assert!(table.expire(now + Duration::from_secs(2)).is_empty());
        let expired = table.expire(now + Duration::from_secs(3));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].kind, PeerEventKind::Left);
        assert!(!table.knows("b"));
    }
}

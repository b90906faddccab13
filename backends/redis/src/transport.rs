//! The Redis transport: an inbox stream per node read through a consumer group, a pipelining
//! writer, and pub/sub for topics. See the crate documentation for the guarantees.

use crate::{
    config::RedisTransportConfig,
    connect::{is_connection_error, RedisUrl},
    connection::Connection,
    requeued::{self, Requeued},
    stream_entry,
    topics::TopicSubscriber,
};
use comms_plugin_api::{
    async_trait,
    backoff::Backoff,
    host_driven, inbound, queued,
    runtime::{self, Task},
    wire, Capabilities, Destination, Envelope, ErrorCode, Inbound, IncidentCounters, NodeId, PluginError,
    Settlement, SettlementOutcome, Transport, TransportInfo, TransportStats,
};
use redis::{
    streams::{StreamAutoClaimReply, StreamClaimReply, StreamId, StreamInfoConsumersReply, StreamReadReply},
    Value,
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};
use tokio::{
    sync::{mpsc, watch, Semaphore},
    time::Instant,
};

/// Delivery tags of topic messages have this bit set: they are not stream entries and need no
/// acknowledgement.
pub(crate) const TOPIC_TAG: u64 = 1 << 63;

/// Idle time given to the entries a closing consumer hands back, so that the next consumer of
/// the inbox claims them at once (ten days, in milliseconds).
const HANDED_BACK_IDLE_MS: u64 = 10 * 24 * 3600 * 1000;

/// The cursor that starts (and, returned, ends) an `XAUTOCLAIM` scan.
const STREAM_START: &str = "0-0";

/// Most bytes of payload written in one pipeline.
const PIPELINE_BYTES: usize = 4 * 1024 * 1024;

/// What the process-wide consumer names end with, so that two instances never share one.
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// The inbox stream of `node`: also the transport's address.
pub fn inbox_key(prefix: &str, node: &str) -> String {
    format!("{prefix}:inbox:{node}")
}

/// One message on its way to Redis.
enum Outgoing {
    /// `XADD` to an inbox stream.
    Entry { key: String, fields: Vec<(&'static str, Vec<u8>)> },
    /// `PUBLISH` on a topic channel.
    Publish { channel: String, bytes: Vec<u8> },
}

impl Outgoing {
    fn size(&self) -> usize {
        match self {
            Self::Entry { fields, .. } => fields.iter().map(|(_, value)| value.len()).sum(),
            Self::Publish { bytes, .. } => bytes.len(),
        }
    }

    /// What the writer does with the result of a queued message: the sender is gone, so a
    /// failure can only be logged.
    fn finish(self, result: Result<(), PluginError>) {
        if let Err(error) = result {
            tracing::warn!(%error, "a queued message could not be written to Redis and is lost");
        }
    }
}

/// Entries handed to the host and not settled yet: delivery tag <-> stream entry id.
#[derive(Debug, Default)]
struct InFlight {
    by_tag: HashMap<u64, String>,
    by_entry: HashMap<String, u64>,
}

/// State shared by the transport, its reader and writer tasks and its topic subscriber.
pub(crate) struct Shared {
    pub(crate) url: RedisUrl,
    pub(crate) config: RedisTransportConfig,
    node: NodeId,
    inbox: String,
    dead_letter: String,
    consumer: String,
    commands: Connection,
    in_flight: Mutex<InFlight>,
    /// Entries settled `REJECTED_REQUEUE`, to be claimed again by the reader once due.
    requeued: Mutex<Requeued>,
    /// Messages the host may hold unsettled; the reader takes one per entry it delivers.
    permits: Semaphore,
    next_tag: AtomicU64,
    pub(crate) inbound: mpsc::Sender<Inbound>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Failed commands (retried or not) and recoveries after them, for `stats()`.
    pub(crate) incidents: IncidentCounters,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few map operations that leave the data consistent, even after a panic.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!("the redis transport of node `{}`", self.node))
    }

    pub(crate) fn next_topic_tag(&self) -> u64 {
        TOPIC_TAG | self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.config.command_timeout_ms)
    }
}

/// Completes once `shutdown` is set.
pub(crate) async fn closing(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

/// A Redis transport: see the crate documentation.
pub struct RedisTransport {
    shared: Arc<Shared>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    outgoing: Mutex<Option<mpsc::Sender<Outgoing>>>,
    writer: Mutex<Option<Task>>,
    reader: Mutex<Option<Task>>,
    topics: TopicSubscriber,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("url", &self.shared.url)
            .field("inbox", &self.shared.inbox)
            .field("consumer", &self.shared.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisTransport {
    /// Connects (retrying with backoff), creates the node's inbox stream and consumer group if
    /// they do not exist, and starts reading. Must run inside a tokio runtime.
    pub async fn connect(node: NodeId, config: RedisTransportConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let url = RedisUrl::new(&config.url, &config.tls_files())?;
        let what = format!("the redis transport of node `{node}`");
        let backoff = config.connect_backoff();
        let command_timeout = Duration::from_millis(config.command_timeout_ms);
        let commands = url.connect(&what, &backoff, command_timeout).await?;
        let blocking =
            url.connect(&what, &backoff, command_timeout + Duration::from_millis(config.block_ms)).await?;
        let inbox = inbox_key(&config.prefix, node.as_str());
        let consumer =
            format!("{node}-{:08x}{:x}", rand::random::<u32>(), INSTANCE.fetch_add(1, Ordering::Relaxed));
        let (inbound, receiver) = mpsc::channel(config.max_unsettled + 256);
        let (outgoing, queue) = mpsc::channel(config.send_queue);
        let shared = Arc::new(Shared {
            dead_letter: format!("{inbox}:dead-letter"),
            permits: Semaphore::new(config.max_unsettled),
            url,
            node,
            inbox,
            consumer,
            commands,
            in_flight: Mutex::default(),
            requeued: Mutex::default(),
            next_tag: AtomicU64::new(1),
            inbound,
            shutdown: watch::channel(false).0,
            incidents: IncidentCounters::default(),
            config,
        });
        create_group(&shared, &mut shared.commands.clone()).await?;
        // On the host's executor when it offers to run plugin tasks: with the connections'
        // sockets on the host's reactor, a reply then wakes the host thread that handles it,
        // never a plugin thread first.
        let writer = runtime::spawn(write_loop(Arc::clone(&shared), queue));
        let reader = runtime::spawn(read_loop(Arc::clone(&shared), blocking));
        Ok(Self {
            topics: TopicSubscriber::new(Arc::clone(&shared)),
            shared,
            receiver: tokio::sync::Mutex::new(receiver),
            outgoing: Mutex::new(Some(outgoing)),
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The inbox stream this transport reads (its address).
    pub fn inbox(&self) -> &str {
        &self.shared.inbox
    }

    /// This instance's consumer name in the inbox's consumer group.
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    fn too_large(&self, size: usize) -> PluginError {
        PluginError::new(
            ErrorCode::TOO_LARGE,
            format!(
                "payload of {size} bytes exceeds max_message_size {} of the redis transport",
                self.shared.config.max_message_size
            ),
        )
    }

    /// With `confirm_sends`: writes the message itself and returns Redis' answer, retrying
    /// across reconnects until Redis answers or the transport closes (concurrent sends share
    /// the connection's pipeline). Without: queues it for the writer task.
    async fn enqueue(&self, outgoing: Outgoing) -> Result<(), PluginError> {
        if !self.shared.config.confirm_sends {
            let queue = lock(&self.outgoing).clone().ok_or_else(|| self.shared.closed_error())?;
            return queue.send(outgoing).await.map_err(|_| self.shared.closed_error());
        }
        let command = command(&self.shared, &outgoing);
        let mut connection = self.shared.commands.clone();
        let mut delay = Duration::from_millis(20);
        let mut failed = false;
        loop {
            let result: Result<Value, redis::RedisError> = command.query_async(&mut connection).await;
            match result {
                Ok(reply) => {
                    if failed {
                        self.shared.incidents.reconnected();
                    }
                    return outcome(&outgoing, &reply);
                }
                Err(error) if is_connection_error(&error) => {
                    failed = true;
                    self.shared.incidents.failed();
                    if self.shared.is_closed() {
                        return Err(PluginError::new(
                            ErrorCode::CLOSED,
                            "the redis transport closed before Redis confirmed the message; it may or may not \
                             have been stored",
                        ));
                    }
                    tracing::warn!(error = %self.shared.url.scrub(&error.to_string()), url = %self.shared.url.redacted(),
                        "writing to Redis failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(error) => return Err(self.shared.url.error("writing a message", &error)),
            }
        }
    }
}

#[async_trait]
impl Transport for RedisTransport {
    /// `ENCRYPTED` with a `rediss://` URL: the link to Redis is TLS and Redis was
    /// authenticated by its certificate.
    fn info(&self) -> TransportInfo {
        let tls = if self.shared.url.is_tls() { Capabilities::ENCRYPTED } else { Capabilities::NONE };
        TransportInfo::new(
            Capabilities::ORDERED
                | Capabilities::ACKNOWLEDGEMENTS
                | Capabilities::DURABLE
                | Capabilities::NATIVE_TOPICS
                | Capabilities::RELIABLE
                | tls,
            self.shared.inbox.clone(),
            self.shared.config.max_message_size,
        )
    }

    /// `XADD`s the envelope to the inbox stream `address`, or `PUBLISH`es a topic message when
    /// `address` is empty.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        let size = envelope.payload.len();
        if size as u64 > self.shared.config.max_message_size {
            return Err(self.too_large(size));
        }
        if address.is_empty() {
            let Destination::Topic(topic) = &envelope.to else {
                return Err(PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    "an empty address is only for topic messages; a node or service message needs the \
                     receiver's inbox address",
                ));
            };
            let channel = crate::topic_pattern::channel(&self.shared.config.prefix, topic);
            let mut bytes = Vec::new();
            wire::encode_envelope(&envelope, &mut bytes).map_err(|error| {
                PluginError::new(ErrorCode::MALFORMED, format!("cannot encode the message: {error}"))
            })?;
            return self.enqueue(Outgoing::Publish { channel, bytes }).await;
        }
        let expected = format!("{}:inbox:", self.shared.config.prefix);
        if !address.starts_with(&expected) || address.len() == expected.len() {
            return Err(PluginError::new(
                ErrorCode::INVALID_ADDRESS,
                format!("`{address}` is not a redis inbox address (`{expected}<node id>`)"),
            ));
        }
        let fields = stream_entry::encode(&envelope, &address[expected.len()..]);
        let key = address.to_string();
        self.enqueue(Outgoing::Entry { key, fields }).await
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        if self.shared.is_closed() {
            return Ok(Vec::new());
        }
        let mut receiver = self.receiver.lock().await;
        let mut shutdown = self.shared.shutdown.subscribe();
        Ok(inbound::receive_batch(&mut receiver, max_batch, &mut shutdown).await)
    }

    /// `ACCEPTED`: `XACK` and `XDEL`. `REJECTED_DISCARD`: moved to the dead-letter stream
    /// (copied, then `XACK` and `XDEL`), logged. `REJECTED_REQUEUE`: the entry stays pending and
    /// is claimed and delivered again at once, or once its `requeue_delay_ms` is over.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        let mut done = Vec::new();
        let mut requeue = Vec::new();
        let mut discarded = Vec::new();
        {
            let mut in_flight = lock(&self.shared.in_flight);
            for settlement in settlements {
                if settlement.delivery_tag & TOPIC_TAG != 0 {
                    continue;
                }
                let Some(entry) = in_flight.by_tag.remove(&settlement.delivery_tag) else { continue };
                in_flight.by_entry.remove(&entry);
                match settlement.outcome {
                    SettlementOutcome::REJECTED_REQUEUE => requeue.push(entry),
                    SettlementOutcome::REJECTED_DISCARD => {
                        discarded.push((entry, comms_plugin_api::inbound::DISCARDED_BY_RECEIVER.to_string()))
                    }
                    _ => done.push(entry),
                }
            }
        }
        let settled = done.len() + requeue.len() + discarded.len();
        // An entry held for a requeue delay keeps its permit until it is taken again.
        let kept = if self.shared.config.requeue_delay().is_immediate() { 0 } else { requeue.len() };
        if !requeue.is_empty() {
            hold_requeued(&self.shared, requeue).await;
        }
        let mut result = if done.is_empty() { Ok(()) } else { acknowledge(&self.shared, &done).await };
        if !discarded.is_empty() {
            // On failure the entries stay pending: claimed after claim_idle_ms and delivered again.
            let moved = dead_letter(&self.shared, discarded).await;
            result = result.and(moved);
        }
        self.shared.permits.add_permits(settled - kept);
        result
    }

    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        self.topics.subscribe(pattern).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        self.topics.unsubscribe(pattern).await
    }

    /// Queued sends, received entries waiting for `receive`, failed Redis commands and the
    /// recoveries after them; `redis.unsettled`: entries delivered and not yet settled, or
    /// requeued and held for their delay (they keep their place in `max_unsettled`);
    /// `redis.held`: of those, the held ones;
    /// `io.host_driven_sockets`: sockets of this plugin library the host's reactor drives now.
    fn stats(&self) -> TransportStats {
        let mut stats = self.shared.incidents.stats();
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            stats.send_queue_depth = queued(outgoing);
        }
        stats.receive_queue_depth = queued(&self.shared.inbound);
        let unsettled =
            self.shared.config.max_unsettled.saturating_sub(self.shared.permits.available_permits());
        stats.counters.push(("redis.unsettled".to_string(), unsettled as u64));
        let held = lock(&self.shared.requeued).held_for_delay();
        stats.counters.push(("redis.held".to_string(), held as u64));
        stats.counters.push(("io.host_driven_sockets".to_string(), host_driven::host_driven_sockets()));
        stats
    }

    /// Writes what is queued (within `close_timeout_ms`), stops reading, and hands the entries
    /// the host has not settled back to the inbox, where the next consumer takes them at once.
    async fn close(&self) -> Result<(), PluginError> {
        if self.shared.shutdown.send_replace(true) {
            return Ok(());
        }
        let mut problems = Vec::new();
        drop(lock(&self.outgoing).take());
        let writer = lock(&self.writer).take();
        if let Some(mut writer) = writer {
            let limit = Duration::from_millis(self.shared.config.close_timeout_ms);
            if tokio::time::timeout(limit, writer.wait()).await.is_err() {
                writer.abort();
                problems.push(format!(
                    "queued messages could not be written to Redis within close_timeout_ms ({} ms) and are lost",
                    limit.as_millis()
                ));
            }
        }
        let reader = lock(&self.reader).take();
        if let Some(mut reader) = reader {
            reader.wait().await;
        }
        self.topics.close().await;
        // Entries read but not settled, and entries waiting to be delivered again.
        let mut handed_back: Vec<String> = {
            let mut in_flight = lock(&self.shared.in_flight);
            in_flight.by_entry.clear();
            in_flight.by_tag.drain().map(|(_, entry)| entry).collect()
        };
        handed_back.extend(lock(&self.shared.requeued).drain());
        self.receiver.lock().await.close();
        if let Err(error) = hand_back(&self.shared, &handed_back).await {
            problems.push(format!(
                "{} unsettled messages could not be handed back and will be delivered again after \
                 claim_idle_ms: {error}",
                handed_back.len()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PluginError::new(
                ErrorCode::OTHER,
                format!(
                    "closing the redis transport of node `{}`: {}",
                    self.shared.node,
                    problems.join("; ")
                ),
            ))
        }
    }
}

/// Creates the inbox stream and its consumer group, unless they exist.
async fn create_group(shared: &Shared, connection: &mut Connection) -> Result<(), PluginError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&shared.inbox)
        .arg(&shared.config.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(connection)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        Err(error) => Err(shared.url.error(&format!("creating the inbox stream `{}`", shared.inbox), &error)),
    }
}

/// `XACK` + `XDEL` for `entries`, retried a few times when the connection fails.
async fn acknowledge(shared: &Shared, entries: &[String]) -> Result<(), PluginError> {
    let mut pipe = redis::pipe();
    pipe.cmd("XACK").arg(&shared.inbox).arg(&shared.config.group).arg(entries).ignore();
    pipe.cmd("XDEL").arg(&shared.inbox).arg(entries).ignore();
    let backoff = Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(1), attempts: 5 };
    backoff
        .retry(|_| {
            let mut connection = shared.commands.clone();
            let pipe = &pipe;
            async move {
                let result: Result<(), redis::RedisError> = pipe.query_async(&mut connection).await;
                match result {
                    Err(error) if is_connection_error(&error) => Err(error),
                    other => Ok(other),
                }
            }
        })
        .await
        .map_err(|(error, _)| error)
        .and_then(|result| result)
        .map_err(|error| {
            shared.url.error(
                &format!(
                    "acknowledging {} messages of `{}` (they will be delivered again)",
                    entries.len(),
                    shared.inbox
                ),
                &error,
            )
        })
}

/// `XCLAIM` of the inbox entries `ids` to this consumer, whatever their idle time; the caller
/// adds the options (`IDLE`, `JUSTID`).
fn claim_to_self<T: redis::ToRedisArgs>(shared: &Shared, ids: T) -> redis::Cmd {
    let mut command = redis::cmd("XCLAIM");
    command.arg(&shared.inbox).arg(&shared.config.group).arg(&shared.consumer).arg(0).arg(ids);
    command
}

/// Makes `entries` claimable by the next consumer at once (`XCLAIM ... IDLE`), and removes this
/// consumer from the group when it holds nothing.
async fn hand_back(shared: &Shared, entries: &[String]) -> Result<(), PluginError> {
    let mut connection = shared.commands.clone();
    if !entries.is_empty() {
        let result: Result<Value, _> = claim_to_self(shared, entries)
            .arg("IDLE")
            .arg(HANDED_BACK_IDLE_MS)
            .arg("JUSTID")
            .query_async(&mut connection)
            .await;
        return result.map(drop).map_err(|error| shared.url.error("handing back unsettled messages", &error));
    }
    let pending: Result<Value, _> = redis::cmd("XPENDING")
        .arg(&shared.inbox)
        .arg(&shared.config.group)
        .arg("-")
        .arg("+")
        .arg(1)
        .arg(&shared.consumer)
        .query_async(&mut connection)
        .await;
    if matches!(pending, Ok(Value::Array(ref entries)) if entries.is_empty()) {
        let _: Result<Value, _> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(&shared.inbox)
            .arg(&shared.config.group)
            .arg(&shared.consumer)
            .query_async(&mut connection)
            .await;
    }
    Ok(())
}

/// Takes queued messages and writes them in pipelines, retrying across reconnects until Redis
/// has them or the transport is closed.
async fn write_loop(shared: Arc<Shared>, mut queue: mpsc::Receiver<Outgoing>) {
    let mut connection = shared.commands.clone();
    let batch_limit = shared.config.send_queue.max(1);
    while let Some(first) = queue.recv().await {
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < batch_limit && bytes < PIPELINE_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.size();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        write_batch(&shared, &mut connection, batch).await;
    }
}

fn command(shared: &Shared, outgoing: &Outgoing) -> redis::Cmd {
    match outgoing {
        Outgoing::Entry { key, fields, .. } => {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key).arg("NOMKSTREAM");
            if shared.config.max_inbox_len > 0 {
                cmd.arg("MAXLEN").arg("~").arg(shared.config.max_inbox_len);
            }
            cmd.arg("*");
            for (name, value) in fields {
                cmd.arg(*name).arg(value.as_slice());
            }
            cmd
        }
        Outgoing::Publish { channel, bytes, .. } => {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(bytes.as_slice());
            cmd
        }
    }
}

fn outcome(outgoing: &Outgoing, reply: &Value) -> Result<(), PluginError> {
    match (outgoing, reply) {
        (Outgoing::Entry { key, .. }, Value::Nil) => Err(PluginError::retryable(
            ErrorCode::UNREACHABLE,
            format!("no inbox stream `{key}` in Redis: no node has ever received on it (or Redis lost it)"),
        )),
        _ => Ok(()),
    }
}

async fn write_batch(shared: &Shared, connection: &mut Connection, batch: Vec<Outgoing>) {
    let mut pipe = redis::pipe();
    for outgoing in &batch {
        pipe.add_command(command(shared, outgoing));
    }
    let mut delay = Duration::from_millis(20);
    let mut failed = false;
    loop {
        let result: Result<Vec<Value>, redis::RedisError> = pipe.query_async(connection).await;
        match result {
            Ok(replies) => {
                if failed {
                    shared.incidents.reconnected();
                }
                for (outgoing, reply) in
                    batch.into_iter().zip(replies.iter().chain(std::iter::repeat(&Value::Okay)))
                {
                    let result = outcome(&outgoing, reply);
                    outgoing.finish(result);
                }
                return;
            }
            Err(error) if is_connection_error(&error) => {
                failed = true;
                shared.incidents.failed();
                // Kept until Redis has it: a batch may be written twice (same message ids).
                tracing::warn!(error = %shared.url.scrub(&error.to_string()), url = %shared.url.redacted(),
                    messages = batch.len(), "writing to Redis failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(_) => {
                // A command was refused (wrong key type, out of memory, ...): find out which.
                for outgoing in batch {
                    let result: Result<Value, _> = command(shared, &outgoing).query_async(connection).await;
                    let result = match result {
                        Ok(reply) => outcome(&outgoing, &reply),
                        Err(error) => Err(shared.url.error("writing a message", &error)),
                    };
                    outgoing.finish(result);
                }
                return;
            }
        }
    }
}

/// Reads the inbox: entries handed back or left by crashed consumers first, then new ones.
async fn read_loop(shared: Arc<Shared>, mut connection: Connection) {
    let mut shutdown = shared.shutdown.subscribe();
    let claim_every = Duration::from_millis((shared.config.claim_idle_ms / 2).max(50));
    let mut next_claim = Instant::now();
    let mut next_keep = Instant::now();
    // Where an unfinished claim pass goes on: a pass claims every idle entry before the reader
    // waits `claim_every` again, however many `read_batch`es that takes.
    let mut claim_cursor: Option<String> = None;
    let mut delay = Duration::from_millis(50);
    while !shared.is_closed() {
        // Requeued entries waiting for their delay are kept from looking idle, also while the
        // host holds all it may.
        if Instant::now() >= next_keep {
            keep_held(&shared, &mut connection).await;
            next_keep = Instant::now() + claim_every;
        }
        // Prefetch limit: wait until the host settled something, or a requeued entry that kept
        // its permit comes due.
        let held_until = match shared.config.requeue_delay().is_immediate() {
            true => None,
            false => lock(&shared.requeued).next_due(),
        };
        tokio::select! {
            permit = shared.permits.acquire() => drop(permit),
            _ = tokio::time::sleep_until(held_until.unwrap_or(next_keep)), if held_until.is_some() => {}
            _ = tokio::time::sleep_until(next_keep) => continue,
            _ = closing(&mut shutdown) => return,
        }
        let room = shared.permits.available_permits().min(shared.config.read_batch);
        let read = async {
            let mut entries = claim_requeued(&shared, &mut connection, room).await?;
            let mut claiming = false;
            if entries.len() < room && (claim_cursor.is_some() || Instant::now() >= next_claim) {
                let cursor = claim_cursor.take().unwrap_or_else(|| STREAM_START.to_string());
                let pass = claim_idle(&shared, &mut connection, room - entries.len(), cursor).await?;
                entries.extend(pass.claimed);
                match pass.next_cursor {
                    Some(cursor) => {
                        claim_cursor = Some(cursor);
                        claiming = true;
                    }
                    None => {
                        next_claim = Instant::now() + claim_every;
                        remove_idle_consumers(&shared, &mut connection).await;
                    }
                }
            }
            // Entries claimed again were delivered before: those past `max_attempts` go to the
            // dead letters instead.
            let (entries, exhausted) = past_max_attempts(&shared, &mut connection, entries).await?;
            // While a claim pass is unfinished, go on with it rather than block on new entries.
            if entries.is_empty() && exhausted.is_empty() && !claiming {
                // Blocks no longer than until the next requeued entry is due.
                let until_due = lock(&shared.requeued)
                    .next_due()
                    .map(|due| due.saturating_duration_since(Instant::now()));
                let block = until_due.map_or(shared.config.block_ms, |until| {
                    (until.as_millis() as u64).clamp(1, shared.config.block_ms)
                });
                return Ok((read_new(&shared, &mut connection, room, block).await?, exhausted));
            }
            Ok::<_, redis::RedisError>((entries, exhausted))
        };
        match read.await {
            Ok((entries, exhausted)) => {
                delay = Duration::from_millis(50);
                if !exhausted.is_empty() {
                    let reasons =
                        exhausted.into_iter().map(|id| (id, inbound::MAX_ATTEMPTS_REASON.to_string()));
                    if let Err(error) = dead_letter(&shared, reasons.collect()).await {
                        // They stay pending: claimed again after claim_idle_ms, and moved then.
                        tracing::warn!(%error, "inbox entries past max_attempts not moved yet");
                    }
                }
                if !deliver(&shared, entries, &mut shutdown).await {
                    return;
                }
            }
            Err(error) if error.code() == Some("NOGROUP") => {
                // The stream or its group is gone (Redis restarted without persistence, or the key
                // was deleted): make them again.
                claim_cursor = None;
                tracing::warn!(inbox = %shared.inbox, "the inbox stream or its consumer group vanished; recreating it");
                if let Err(error) = create_group(&shared, &mut connection).await {
                    tracing::warn!(%error, "recreating the inbox failed");
                }
            }
            Err(error) => {
                shared.incidents.failed();
                tracing::warn!(inbox = %shared.inbox, url = %shared.url.redacted(),
                    error = %shared.url.scrub(&error.to_string()), "reading the inbox failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = closing(&mut shutdown) => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn claim_requeued(
    shared: &Shared,
    connection: &mut Connection,
    room: usize,
) -> Result<Vec<StreamId>, redis::RedisError> {
    let taken = lock(&shared.requeued).take_due(Instant::now(), room);
    if taken.entries.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = taken.entries.iter().map(|entry| entry.id.as_str()).collect();
    let reply: Result<StreamClaimReply, _> = claim_to_self(shared, &ids).query_async(connection).await;
    match reply {
        Ok(reply) => {
            // Delivering takes them again.
            shared.permits.add_permits(taken.permits);
            Ok(reply.ids)
        }
        Err(error) => {
            // Try again next time.
            let now = Instant::now();
            let mut waiting = lock(&shared.requeued);
            taken.entries.into_iter().for_each(|entry| waiting.hold(requeued::Entry { due: now, ..entry }));
            Err(error)
        }
    }
}

/// Splits entries claimed again into those to deliver and the ids of those already delivered
/// `max_attempts` times. Redis counts the deliveries of a pending entry: `XREADGROUP` makes it 1,
/// and each `XCLAIM` or `XAUTOCLAIM` adds one, so a claimed entry whose count is above
/// `max_attempts` is on a delivery past the limit. One pipelined `XPENDING` per entry, only for
/// entries claimed again (requeued, or left by a consumer): new entries cost nothing more.
async fn past_max_attempts(
    shared: &Shared,
    connection: &mut Connection,
    entries: Vec<StreamId>,
) -> Result<(Vec<StreamId>, Vec<String>), redis::RedisError> {
    if entries.is_empty() {
        return Ok((entries, Vec::new()));
    }
    let ids: Vec<&str> = entries.iter().map(|entry| entry.id.as_str()).collect();
    let counts = delivery_counts(shared, connection, &ids).await?;
    let limit = u64::from(shared.config.max_attempts);
    let (mut deliver, mut exhausted) = (Vec::with_capacity(entries.len()), Vec::new());
    for (entry, count) in entries.into_iter().zip(counts) {
        match count {
            // No longer pending: its count is unknown, and it is delivered as it is.
            Some(deliveries) if deliveries > limit => exhausted.push(entry.id),
            _ => deliver.push(entry),
        }
    }
    Ok((deliver, exhausted))
}

/// Redis' delivery count of each pending entry of `ids` (`None` for one no longer pending): one
/// pipelined `XPENDING` per entry.
async fn delivery_counts(
    shared: &Shared,
    connection: &mut Connection,
    ids: &[&str],
) -> Result<Vec<Option<u64>>, redis::RedisError> {
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("XPENDING").arg(&shared.inbox).arg(&shared.config.group).arg(id).arg(id).arg(1);
    }
    // Each answer: the entry's (id, consumer, idle ms, deliveries), or nothing.
    let answers: Vec<Vec<(String, String, u64, u64)>> = pipe.query_async(connection).await?;
    Ok(answers.into_iter().map(|answer| answer.first().map(|(_, _, _, deliveries)| *deliveries)).collect())
}

/// Hands requeued entries to the reader: due at once, or after their requeue delay for the
/// delivery they are on (Redis' count; the first delay if it cannot be read).
async fn hold_requeued(shared: &Shared, entries: Vec<String>) {
    let delay = shared.config.requeue_delay();
    let counts = if delay.is_immediate() {
        Vec::new()
    } else {
        let ids: Vec<&str> = entries.iter().map(String::as_str).collect();
        let mut connection = shared.commands.clone();
        delivery_counts(shared, &mut connection, &ids).await.unwrap_or_else(|error| {
            tracing::debug!(error = %shared.url.scrub(&error.to_string()),
                "reading the delivery counts of requeued entries failed; they wait the first delay");
            Vec::new()
        })
    };
    let now = Instant::now();
    let mut waiting = lock(&shared.requeued);
    for (index, id) in entries.into_iter().enumerate() {
        let deliveries = counts.get(index).copied().flatten().unwrap_or(1);
        let due = now + delay.after(deliveries);
        waiting.hold(requeued::Entry { id, due, keeps_permit: !delay.is_immediate() });
    }
}

/// Keeps the requeued entries still waiting for their delay from looking idle (`XCLAIM` to
/// this consumer with `JUSTID`, which resets their idle time and counts no delivery), so that
/// no claim pass, this instance's or another's, delivers them before they are due.
async fn keep_held(shared: &Shared, connection: &mut Connection) {
    let held = lock(&shared.requeued).held(Instant::now());
    if held.is_empty() {
        return;
    }
    let touched: Result<Value, _> = claim_to_self(shared, &held).arg("JUSTID").query_async(connection).await;
    if let Err(error) = touched {
        tracing::debug!(error = %shared.url.scrub(&error.to_string()),
            "refreshing the requeued entries failed; trying again at the next claim pass");
    }
}

/// What one call of [`claim_idle`] took, and where the pass goes on (`None`: it is finished).
struct ClaimPass {
    claimed: Vec<StreamId>,
    next_cursor: Option<String>,
}

/// Most `XAUTOCLAIM`s per call: each scans at most 10 x `COUNT` pending entries (Redis' own
/// bound), so that a long pending list of a live consumer is scanned over several calls and
/// never holds up the reader.
const CLAIMS_PER_CALL: usize = 16;

/// Claims up to `room` entries pending for longer than `claim_idle_ms`, from `cursor` on.
async fn claim_idle(
    shared: &Shared,
    connection: &mut Connection,
    room: usize,
    mut cursor: String,
) -> Result<ClaimPass, redis::RedisError> {
    let mut claimed = Vec::new();
    let mut calls = 0;
    let finished = loop {
        if claimed.len() >= room || calls == CLAIMS_PER_CALL {
            break false;
        }
        calls += 1;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&shared.inbox)
            .arg(&shared.config.group)
            .arg(&shared.consumer)
            .arg(shared.config.claim_idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(room - claimed.len())
            .query_async(connection)
            .await?;
        {
            // Entries this consumer still has with the host are not lost, only slow; requeued
            // ones come again when due.
            let in_flight = lock(&shared.in_flight);
            let requeued = lock(&shared.requeued);
            claimed.extend(reply.claimed.into_iter().filter(|entry| {
                !in_flight.by_entry.contains_key(&entry.id) && !requeued.contains(&entry.id)
            }));
        }
        cursor = reply.next_stream_id;
        if cursor == STREAM_START {
            break true;
        }
    };
    if !claimed.is_empty() {
        tracing::info!(inbox = %shared.inbox, count = claimed.len(), "claimed messages left pending by another consumer");
    }
    Ok(ClaimPass { claimed, next_cursor: (!finished).then_some(cursor) })
}

/// Removes `consumer` (in `ARGV[2]`) from group `ARGV[1]` of stream `KEYS[1]` only if it has
/// nothing pending, in one step: `XGROUP DELCONSUMER` forgets a consumer's pending entries,
/// which would then never be delivered again.
const DELETE_IF_NOTHING_PENDING: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
";

/// Removes the group's consumers idle past `consumer_idle_ms` with nothing pending (crashed
/// instances whose entries were claimed). Failures are logged: the next pass tries again.
async fn remove_idle_consumers(shared: &Shared, connection: &mut Connection) {
    let bound = shared.config.consumer_idle_ms;
    if bound == 0 {
        return;
    }
    let consumers: Result<StreamInfoConsumersReply, _> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&shared.inbox)
        .arg(&shared.config.group)
        .query_async(connection)
        .await;
    let consumers = match consumers {
        Ok(reply) => reply.consumers,
        Err(error) => {
            tracing::debug!(inbox = %shared.inbox, error = %shared.url.scrub(&error.to_string()),
                "listing the consumers of the inbox failed");
            return;
        }
    };
    for consumer in consumers {
        if consumer.name == shared.consumer || consumer.pending > 0 || (consumer.idle as u64) < bound {
            continue;
        }
        let removed: Result<i64, _> = redis::cmd("EVAL")
            .arg(DELETE_IF_NOTHING_PENDING)
            .arg(1)
            .arg(&shared.inbox)
            .arg(&shared.config.group)
            .arg(&consumer.name)
            .query_async(connection)
            .await;
        match removed {
            Ok(0) => {
                tracing::info!(inbox = %shared.inbox, consumer = %consumer.name, idle_ms = consumer.idle,
                "removed a consumer of the inbox that was idle with nothing pending")
            }
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(inbox = %shared.inbox, error = %shared.url.scrub(&error.to_string()),
                "removing an idle consumer failed")
            }
        }
    }
}

async fn read_new(
    shared: &Shared,
    connection: &mut Connection,
    room: usize,
    block_ms: u64,
) -> Result<Vec<StreamId>, redis::RedisError> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&shared.config.group)
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(room.max(1))
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(&shared.inbox)
        .arg(">")
        .query_async(connection)
        .await?;
    Ok(reply.map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect()).unwrap_or_default())
}

/// Registers and hands entries to the host's queue; `false` once the transport is closing.
async fn deliver(shared: &Shared, entries: Vec<StreamId>, shutdown: &mut watch::Receiver<bool>) -> bool {
    let mut refused = Vec::new();
    for entry in entries {
        // A program that is not comms (or a node with a larger limit) can write any size.
        let size = stream_entry::payload_len(&entry.map).unwrap_or(0);
        if let Some(reason) = inbound::oversized_reason(size, shared.config.max_message_size) {
            refused.push((entry.id, reason));
            continue;
        }
        let envelope = match stream_entry::decode(&entry.map, &shared.node) {
            Ok(envelope) => envelope,
            Err(reason) => {
                refused.push((entry.id, reason));
                continue;
            }
        };
        let tag = shared.next_tag.fetch_add(1, Ordering::Relaxed) & !TOPIC_TAG;
        {
            let mut in_flight = lock(&shared.in_flight);
            if in_flight.by_entry.contains_key(&entry.id) {
                continue;
            }
            in_flight.by_entry.insert(entry.id.clone(), tag);
            in_flight.by_tag.insert(tag, entry.id);
        }
        if let Ok(permit) = shared.permits.try_acquire() {
            permit.forget();
        }
        let inbound = Inbound { envelope, delivery_tag: tag };
        tokio::select! {
            sent = shared.inbound.send(inbound) => if sent.is_err() { return false },
            _ = closing(shutdown) => return false,
        }
    }
    if !refused.is_empty() {
        for _ in &refused {
            shared.incidents.failed();
        }
        if let Err(error) = dead_letter(shared, refused).await {
            tracing::warn!(%error, "refused inbox entries not moved yet");
        }
    }
    true
}

/// Moves entries to `<inbox>:dead-letter` with their reasons (see [`crate::dead_letter`]).
async fn dead_letter(shared: &Shared, entries: Vec<(String, String)>) -> Result<(), PluginError> {
    for (entry, reason) in &entries {
        tracing::warn!(inbox = %shared.inbox, %entry, %reason, dead_letter = %shared.dead_letter,
            "inbox entry moved to the dead-letter stream");
    }
    let mut connection = shared.commands.clone();
    crate::dead_letter::move_entries(
        &mut connection,
        &shared.inbox,
        &shared.dead_letter,
        &shared.config.group,
        &entries,
        shared.command_timeout(),
    )
    .await
    .map_err(|error| {
        shared.url.error(
            &format!(
                "moving {} entries of `{}` to the dead-letter stream (they stay pending and are tried again)",
                entries.len(),
                shared.inbox
            ),
            &error,
        )
    })
}

//! The NATS transport: a durable pull consumer per node on the deployment's JetStream stream,
//! confirmed publishes, settlement by acknowledgement, and core NATS subjects for topics (or,
//! with `durable_topics`, a durable pull consumer per subscription on the topic stream, read and
//! settled like the inbox). See the crate documentation for the guarantees.

use crate::{
    config::NatsTransportConfig,
    connect::{self, redacted},
    durable_topics,
    format::{self, header},
    subject,
};
use async_nats::{
    jetstream::{
        self,
        consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
        context::PublishErrorKind,
        stream::{RetentionPolicy, StorageType},
    },
    Client, HeaderMap, Subject,
};
use bytes::Bytes;
use comms_plugin_api::{
    async_trait, inbound, queued,
    runtime::{self, Task},
    Capabilities, Destination, Envelope, ErrorCode, Inbound, IncidentCounters, NodeId, Outbound, PluginError,
    SendFailure, Settlement, SettlementOutcome, Transport, TransportInfo, TransportStats,
};
use futures::StreamExt;
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

/// Delivery tags of core NATS topic messages have this bit set: they are not stream messages
/// and need no acknowledgement. (Durable topic messages are stream messages: their tags do not
/// have it.)
const TOPIC_TAG: u64 = 1 << 63;

/// Room left for the headers below the server's `max_payload` when `max_message_size` is not
/// set: a NATS message's limit counts headers and payload together.
const HEADER_ALLOWANCE: u64 = 64 * 1024;

/// Topic messages waiting for `receive` besides the stream's.
const TOPIC_QUEUE: usize = 1024;

/// Added to the remaining life of this transport's last pull request when it hands messages
/// back at close (see [`Shared::hand_back`]): the server times the request from when it got it.
const PULL_EXPIRY_MARGIN: Duration = Duration::from_millis(200);

/// How long a send retries a publish the server did not confirm (a restart, a lost
/// connection) before it fails.
const SEND_RETRY_LIMIT: Duration = Duration::from_secs(30);

/// Which stream a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The deployment's stream: this node's inbox.
    Inbox,
    /// The topic stream (`durable_topics`): one of this node's subscriptions.
    Topics,
}

/// A stream message handed to the host and not settled yet.
#[derive(Debug)]
struct InFlight {
    /// Where its acknowledgement goes.
    reply: Subject,
    /// The stream it is in, and its sequence there, to copy it to the dead letters.
    source: Source,
    sequence: u64,
    /// Its deliveries so far, this one included: picks its requeue delay.
    delivered: u64,
}

struct Shared {
    config: NatsTransportConfig,
    node: NodeId,
    client: Client,
    jetstream: jetstream::Context,
    stream: jetstream::stream::Stream,
    /// The topic stream, with `durable_topics`.
    topic_stream: Option<jetstream::stream::Stream>,
    inbox: String,
    /// `<prefix>.inbox.`: what every inbox address starts with.
    inbox_prefix: String,
    dead_letter: String,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    /// Messages the host may hold unsettled; the reader takes one per message it delivers.
    permits: Semaphore,
    next_tag: AtomicU64,
    inbound: mpsc::Sender<Inbound>,
    /// When the last pull request of any of this transport's readers expires on the server.
    pulls_until: Mutex<Option<Instant>>,
    shutdown: watch::Sender<bool>,
    incidents: Arc<IncidentCounters>,
    dead_letters: AtomicU64,
    max_message_size: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one map operation that leaves the data consistent, even after a panic.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Completes once `shutdown` is set.
/// The answer that hands a message back to the server: delivered again at once, or after
/// `delay` (JetStream's `-NAK` with a delay in nanoseconds, nats-server 2.7.1 and later).
fn negative_acknowledgement(delay: Duration) -> Bytes {
    if delay.is_zero() {
        return Bytes::from_static(b"-NAK");
    }
    Bytes::from(format!("-NAK {{\"delay\": {}}}", delay.as_nanos()))
}

async fn closing(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

impl Shared {
    fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!("the nats transport of node `{}`", self.node))
    }

    /// A pull request is about to be made that lasts until `expires` from now.
    fn pulling(&self, expires: Duration) {
        let until = Instant::now() + expires;
        let mut latest = lock(&self.pulls_until);
        if latest.is_none_or(|latest| latest < until) {
            *latest = Some(until);
        }
    }

    /// Hands a message this transport took back to the server (a negative acknowledgement), for
    /// the next consumer of the same durable consumer, at close. A pull request of ours may
    /// still be waiting on the server although its reader stopped (the server does not drop it
    /// when the reply subscription goes away): nats-server 2.9 would deliver the message to it,
    /// where it is lost until `ack_wait_ms`. So while one may be waiting, the message comes
    /// back once it has expired (a delayed negative acknowledgement), at most
    /// `fetch_expires_ms` later.
    async fn hand_back(&self, reply: Subject) {
        let waiting = lock(&self.pulls_until).and_then(|until| until.checked_duration_since(Instant::now()));
        let answer = match waiting {
            Some(left) => {
                Bytes::from(format!("-NAK {{\"delay\":{}}}", (left + PULL_EXPIRY_MARGIN).as_nanos()))
            }
            None => Bytes::from_static(b"-NAK"),
        };
        let _ = self.client.publish(reply, answer).await;
    }

    fn scrub(&self, text: &str) -> String {
        connect::scrub(&self.config.connection(), text)
    }

    fn too_large(&self, size: usize) -> PluginError {
        PluginError::new(
            ErrorCode::TOO_LARGE,
            format!(
                "payload of {size} bytes exceeds max_message_size {} of the nats transport",
                self.max_message_size
            ),
        )
    }

    /// A request the server answers: the server handles a connection's commands in order, so
    /// once the answer is here it has every command sent before. (`Client::flush` only writes
    /// the client's buffer to the socket.)
    async fn round_trip(&self) -> Result<(), String> {
        // `$JS.API.INFO` answers on every JetStream server; its content does not matter here.
        match self.client.request("$JS.API.INFO", Bytes::new()).await {
            Ok(_) => Ok(()),
            Err(error) => Err(format!("no answer from NATS: {}", self.scrub(&error.to_string()))),
        }
    }

    /// Publishes to the stream and waits for its confirmation, retrying what a restart or a
    /// lost connection fails for up to [`SEND_RETRY_LIMIT`]. A retried publish may be stored
    /// twice (the receiver then gets the message twice, with the same id).
    async fn publish_confirmed(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> Result<(), PluginError> {
        let deadline = Instant::now() + SEND_RETRY_LIMIT;
        let mut delay = Duration::from_millis(20);
        loop {
            let attempt = async {
                let pending = self
                    .jetstream
                    .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
                    .await?;
                pending.await.map(drop)
            };
            let error = match attempt.await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let retry = match error.kind() {
                PublishErrorKind::MaxPayloadExceeded => {
                    return Err(PluginError::new(
                        ErrorCode::TOO_LARGE,
                        format!(
                            "the message ({} bytes of payload and its headers) exceeds the NATS server's max_payload",
                            payload.len()
                        ),
                    ))
                }
                // No stream answered: the server restarts (JetStream is not up yet) or the
                // stream was deleted; both are worth a few retries.
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => true,
                _ => false,
            };
            let message = self.scrub(&error.to_string());
            if !retry {
                return Err(PluginError::new(
                    ErrorCode::OTHER,
                    format!("publishing to `{subject}` failed: {message}"),
                ));
            }
            self.incidents.failed();
            if self.is_closed() {
                return Err(PluginError::new(
                    ErrorCode::CLOSED,
                    "the nats transport closed before NATS confirmed the message; it may or may not have been stored",
                ));
            }
            if Instant::now() + delay > deadline {
                return Err(PluginError::retryable(
                    ErrorCode::UNREACHABLE,
                    format!(
                        "NATS at {} did not confirm the message to `{subject}` within {} s: {message}",
                        redacted(&self.config.connection()),
                        SEND_RETRY_LIMIT.as_secs()
                    ),
                ));
            }
            tracing::warn!(%subject, error = %message, "publishing to JetStream failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Copies a stream message to the dead-letter subject with `reason`, then terminates it
    /// (the server never delivers it again). On failure nothing is terminated: the message is
    /// delivered again after `ack_wait_ms` and moved then.
    async fn move_to_dead_letter(
        &self,
        reply: Subject,
        original_subject: &str,
        sequence: u64,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), PluginError> {
        let mut headers = headers.cloned().unwrap_or_default();
        headers.insert(header::DEAD_LETTER_REASON, reason.replace(['\r', '\n'], " "));
        headers.insert(header::DEAD_LETTER_SUBJECT, original_subject);
        headers.insert(header::DEAD_LETTER_SEQUENCE, sequence.to_string());
        self.publish_confirmed(&self.dead_letter, &headers, payload).await?;
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.incidents.failed();
        tracing::warn!(inbox = %self.inbox, sequence, %reason, dead_letter = %self.dead_letter,
            "message moved to the dead letters");
        self.client.publish(reply, Bytes::from_static(b"+TERM")).await.map_err(|error| {
            PluginError::new(ErrorCode::OTHER, format!("terminating a dead letter: {error}"))
        })
    }

    /// Moves the stream message `sequence` to the dead letters: the settle path, where only its
    /// sequence is at hand.
    async fn discard(&self, in_flight: InFlight, reason: &str) -> Result<(), PluginError> {
        let stream = match in_flight.source {
            Source::Inbox => &self.stream,
            Source::Topics => self.topic_stream.as_ref().unwrap_or(&self.stream),
        };
        let message = stream.get_raw_message(in_flight.sequence).await.map_err(|error| {
            PluginError::new(
                ErrorCode::OTHER,
                format!(
                    "reading message {} of the stream `{}` to dead-letter it: {error}",
                    in_flight.sequence,
                    stream.cached_info().config.name
                ),
            )
        })?;
        self.move_to_dead_letter(
            in_flight.reply,
            message.subject.as_str(),
            in_flight.sequence,
            Some(&message.headers),
            &message.payload,
            reason,
        )
        .await
    }
}

/// A NATS JetStream transport: see the crate documentation.
pub struct NatsTransport {
    shared: Arc<Shared>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    reader: Mutex<Option<Task>>,
    /// Topic pattern -> the task that forwards its subscription's messages (a core NATS
    /// subscription, or with `durable_topics` the reader of its durable consumer).
    topics: Mutex<HashMap<String, Task>>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("url", &redacted(&self.shared.config.connection()))
            .field("stream", &self.shared.config.stream)
            .field("inbox", &self.shared.inbox)
            .finish_non_exhaustive()
    }
}

fn setup_error(what: &str, error: impl std::fmt::Display) -> PluginError {
    PluginError::retryable(ErrorCode::UNREACHABLE, format!("{what}: {error}"))
}

impl NatsTransport {
    /// Connects (retrying with backoff), creates the stream and the node's durable consumer if
    /// they do not exist, and starts reading. Must run inside a tokio runtime.
    pub async fn connect(node: NodeId, config: NatsTransportConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let what = format!("the nats transport of node `{node}`");
        let incidents = Arc::new(IncidentCounters::default());
        let client = connect::connect(&config.connection(), &what, &incidents).await?;
        if !client.server_info().jetstream {
            let needs =
                if config.durable_topics { "its inboxes and `durable_topics = true`" } else { "its inboxes" };
            return Err(PluginError::new(
                ErrorCode::UNSUPPORTED,
                format!(
                    "{what}: the NATS server at {} does not have JetStream enabled (start it with `-js`), which \
                     {needs} need",
                    redacted(&config.connection())
                ),
            ));
        }
        let max_payload = client.server_info().max_payload as u64;
        let ceiling = max_payload.saturating_sub(HEADER_ALLOWANCE).max(max_payload / 2);
        let max_message_size = match config.max_message_size {
            Some(size) if size > ceiling => {
                return Err(PluginError::invalid_config(format!(
                    "key `max_message_size`: {size} is above what the server takes ({ceiling} bytes: its \
                     max_payload of {max_payload} less room for headers)"
                )))
            }
            Some(size) => size,
            None => ceiling,
        };
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(Duration::from_millis(config.request_timeout_ms));
        let inboxes = format!("{}.inbox.>", config.prefix);
        let dead_letters = format!("{}.dead-letter.>", config.prefix);
        let stream = jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: config.stream.clone(),
                subjects: vec![inboxes.clone(), dead_letters.clone()],
                // A message leaves the stream once its node acknowledged it; dead letters stay
                // until someone consumes them.
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|error| {
                setup_error(&format!("{what}: creating the JetStream stream `{}`", config.stream), error)
            })?;
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.contains(&inboxes) || !subjects.contains(&dead_letters) {
            return Err(PluginError::invalid_config(format!(
                "keys `stream` and `prefix`: the existing stream `{}` holds the subjects {subjects:?}, not `{inboxes}` \
                 and `{dead_letters}`; use another stream name or the prefix it was made for",
                config.stream
            )));
        }
        let inbox = subject::inbox(&config.prefix, node.as_str());
        let consumer_config = pull::Config {
            durable_name: Some(subject::token(node.as_str())),
            description: Some(format!("comms inbox of node {node}")),
            filter_subject: inbox.clone(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            // Unlimited at the server: the transport counts deliveries itself and moves a
            // message to the dead letters, where the server would only stop delivering it.
            max_deliver: -1,
            ..Default::default()
        };
        let consumer: PullConsumer = match stream.create_consumer(consumer_config.clone()).await {
            Ok(consumer) => consumer,
            // Another instance of this node made it with other settings: use it as it is.
            Err(create_error) => stream.get_consumer(&subject::token(node.as_str())).await.map_err(|_| {
                setup_error(&format!("{what}: creating the consumer of `{inbox}`"), create_error)
            })?,
        };
        let topic_stream = match config.durable_topics {
            true => Some(durable_topics::open_stream(&jetstream, &config, &what).await?),
            false => None,
        };
        let (inbound, receiver) = mpsc::channel(config.max_unsettled + TOPIC_QUEUE);
        let shared = Arc::new(Shared {
            dead_letter: subject::dead_letter(&config.prefix, node.as_str()),
            permits: Semaphore::new(config.max_unsettled),
            inbox_prefix: format!("{}.inbox.", config.prefix),
            inbox,
            node,
            client,
            jetstream,
            stream,
            topic_stream,
            in_flight: Mutex::default(),
            next_tag: AtomicU64::new(1),
            inbound,
            pulls_until: Mutex::default(),
            shutdown: watch::channel(false).0,
            incidents,
            dead_letters: AtomicU64::new(0),
            max_message_size,
            config,
        });
        let reader = runtime::spawn(read_loop(Arc::clone(&shared), consumer, Source::Inbox));
        Ok(Self {
            shared,
            receiver: tokio::sync::Mutex::new(receiver),
            reader: Mutex::new(Some(reader)),
            topics: Mutex::default(),
        })
    }

    /// The inbox subject this transport reads (its address).
    pub fn inbox(&self) -> &str {
        &self.shared.inbox
    }

    /// Checks an item and turns it into subject, headers and payload, and whether it goes to a
    /// stream (with a confirmation) rather than core NATS (a topic message without
    /// `durable_topics`).
    fn prepare(
        &self,
        address: &str,
        envelope: &Envelope,
    ) -> Result<(bool, String, HeaderMap, Bytes), PluginError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        let size = envelope.payload.len();
        if size as u64 > self.shared.max_message_size {
            return Err(self.shared.too_large(size));
        }
        let inbox_prefix = &self.shared.inbox_prefix;
        // A node message on that node's own inbox: the reader knows the destination from it.
        let destination_implied = match &envelope.to {
            Destination::Node(node) => address
                .strip_prefix(inbox_prefix)
                .is_some_and(|token| subject::is_token_of(node.as_str(), token)),
            _ => false,
        };
        let headers = format::encode(envelope, destination_implied)?;
        let payload = Bytes::copy_from_slice(envelope.payload.as_slice());
        if address.is_empty() {
            let Destination::Topic(topic) = &envelope.to else {
                return Err(PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    "an empty address is only for topic messages; a node or service message needs the receiver's \
                     inbox subject",
                ));
            };
            if topic.contains(['*', '>']) {
                return Err(PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    format!("topic `{topic}` contains a wildcard; wildcards are for subscriptions"),
                ));
            }
            let subject = subject::topic(&self.shared.config.prefix, topic)?;
            return Ok((self.shared.config.durable_topics, subject, headers, payload));
        }
        let valid = address.strip_prefix(inbox_prefix).is_some_and(|token| {
            !token.is_empty() && !token.contains(['.', '*', '>']) && !token.chars().any(char::is_whitespace)
        });
        if !valid {
            return Err(PluginError::new(
                ErrorCode::INVALID_ADDRESS,
                format!("`{address}` is not a nats inbox address (`{inbox_prefix}<node>`)"),
            ));
        }
        Ok((true, address.to_string(), headers, payload))
    }

    async fn publish_topic(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), PluginError> {
        self.shared.client.publish_with_headers(subject.clone(), headers, payload).await.map_err(|error| {
            PluginError::new(ErrorCode::OTHER, format!("publishing on `{subject}` failed: {error}"))
        })
    }
}

#[async_trait]
impl Transport for NatsTransport {
    /// Ordered, acknowledged, durable and reliable (a JetStream stream), with native topics
    /// (core NATS). Not `ENCRYPTED`: TLS to the server protects the link to it, not the
    /// messages from other clients of the server. `BATCHED_SEND`: a batch waits for its
    /// confirmations together.
    fn info(&self) -> TransportInfo {
        TransportInfo::new(
            Capabilities::ORDERED
                | Capabilities::ACKNOWLEDGEMENTS
                | Capabilities::DURABLE
                | Capabilities::NATIVE_TOPICS
                | Capabilities::RELIABLE
                | Capabilities::BATCHED_SEND,
            self.shared.inbox.clone(),
            self.shared.max_message_size,
        )
    }

    /// Publishes to the inbox subject `address` and returns once the stream stored the message;
    /// with an empty `address`, publishes a topic message on core NATS (returns once the client
    /// buffered it), or with `durable_topics` through the topic stream (returns once it stored
    /// the message).
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        let (stored, subject, headers, payload) = self.prepare(address, &envelope)?;
        if stored {
            self.shared.publish_confirmed(&subject, &headers, &payload).await
        } else {
            self.publish_topic(subject, headers, payload).await
        }
    }

    /// Publishes every item before waiting for any confirmation: one round trip for the batch,
    /// in batch order per address.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        for (index, outbound) in batch.iter().enumerate() {
            let (stored, subject, headers, payload) =
                match self.prepare(&outbound.address, &outbound.envelope) {
                    Ok(prepared) => prepared,
                    Err(error) => {
                        failures.push(SendFailure { index, error });
                        continue;
                    }
                };
            if !stored {
                if let Err(error) = self.publish_topic(subject, headers, payload).await {
                    failures.push(SendFailure { index, error });
                }
                continue;
            }
            pending
                .push((index, self.shared.jetstream.publish_with_headers(subject, headers, payload).await));
        }
        for (index, sent) in pending {
            let confirmed = match sent {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            // Whatever failed is prepared again and sent on its own, with the retries and errors
            // of `send` (keeping a copy of every item for this rare case would cost every send).
            if !confirmed {
                let outbound = &batch[index];
                let sent = match self.prepare(&outbound.address, &outbound.envelope) {
                    Ok((_, subject, headers, payload)) => {
                        self.shared.publish_confirmed(&subject, &headers, &payload).await
                    }
                    Err(error) => Err(error),
                };
                if let Err(error) = sent {
                    failures.push(SendFailure { index, error });
                }
            }
        }
        failures.sort_by_key(|failure| failure.index);
        failures
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        if self.shared.is_closed() {
            return Ok(Vec::new());
        }
        let mut receiver = self.receiver.lock().await;
        let mut shutdown = self.shared.shutdown.subscribe();
        Ok(inbound::receive_batch(&mut receiver, max_batch, &mut shutdown).await)
    }

    /// `ACCEPTED`: acknowledged (the stream deletes it). `REJECTED_REQUEUE`: negatively
    /// acknowledged, delivered again at once or, with `requeue_delay_ms`, after its delay (a
    /// `-NAK` with a delay). `REJECTED_DISCARD`: copied to the dead letters with the reason,
    /// then terminated.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        let mut replies = Vec::new();
        let mut discarded = Vec::new();
        let delay = self.shared.config.requeue_delay();
        {
            let mut in_flight = lock(&self.shared.in_flight);
            for settlement in settlements {
                if settlement.delivery_tag & TOPIC_TAG != 0 {
                    continue;
                }
                let Some(entry) = in_flight.remove(&settlement.delivery_tag) else { continue };
                match settlement.outcome {
                    SettlementOutcome::REJECTED_REQUEUE => {
                        let answer = negative_acknowledgement(delay.after(entry.delivered));
                        replies.push((entry.reply, answer));
                    }
                    SettlementOutcome::REJECTED_DISCARD => discarded.push(entry),
                    _ => replies.push((entry.reply, Bytes::from_static(b"+ACK"))),
                }
            }
        }
        let settled = replies.len() + discarded.len();
        let mut result = Ok(());
        for (reply, answer) in replies {
            // Buffered by the client and written in order; a lost acknowledgement only means
            // the message is delivered again after ack_wait_ms.
            if let Err(error) = self.shared.client.publish(reply, answer).await {
                result = Err(PluginError::new(ErrorCode::OTHER, format!("acknowledging a message: {error}")));
            }
        }
        for entry in discarded {
            if let Err(error) = self.shared.discard(entry, inbound::DISCARDED_BY_RECEIVER).await {
                tracing::warn!(%error, "a refused message was not moved to the dead letters; it comes again after ack_wait_ms");
                result = Err(error);
            }
        }
        self.shared.permits.add_permits(settled);
        result
    }

    /// Subscribes on core NATS (`<prefix>.topic.<pattern>`, wildcards as they are) and returns
    /// once the server has the subscription. With `durable_topics`: creates (or binds again) the
    /// subscription's durable consumer on the topic stream and starts reading it; what was kept
    /// for it while this node was away comes first.
    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        let subject = subject::topic(&self.shared.config.prefix, pattern)?;
        if lock(&self.topics).contains_key(pattern) {
            return Ok(());
        }
        if let Some(stream) = &self.shared.topic_stream {
            let consumer = durable_topics::bind_consumer(
                stream,
                &self.shared.config,
                self.shared.node.as_str(),
                pattern,
                &subject,
            )
            .await?;
            let task = runtime::spawn(read_loop(Arc::clone(&self.shared), consumer, Source::Topics));
            if let Some(mut previous) = lock(&self.topics).insert(pattern.to_string(), task) {
                previous.abort();
            }
            return Ok(());
        }
        let subscriber = self.shared.client.subscribe(subject.clone()).await.map_err(|error| {
            PluginError::new(ErrorCode::OTHER, format!("subscribing to `{subject}` failed: {error}"))
        })?;
        // Once the server answered a request sent after the subscription, it has the
        // subscription: a publication from anyone after this call returned reaches it.
        self.shared.round_trip().await.map_err(|error| {
            PluginError::new(ErrorCode::OTHER, format!("subscribing to `{subject}`: {error}"))
        })?;
        let task = runtime::spawn(forward_topic(Arc::clone(&self.shared), subscriber));
        if let Some(mut previous) = lock(&self.topics).insert(pattern.to_string(), task) {
            previous.abort();
        }
        Ok(())
    }

    /// Ends the subscription to `pattern`. With `durable_topics`, deletes its durable consumer
    /// (also one this node made in an earlier run): nothing is kept for it any more. Messages it
    /// already handed to the host are still settled as usual.
    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        if let Some(stream) = &self.shared.topic_stream {
            subject::topic(&self.shared.config.prefix, pattern)?;
            let task = lock(&self.topics).remove(pattern);
            if let Some(mut task) = task {
                task.abort();
                task.wait().await;
            }
            return durable_topics::delete_consumer(stream, self.shared.node.as_str(), pattern).await;
        }
        let task = lock(&self.topics).remove(pattern);
        if let Some(mut task) = task {
            task.abort();
            task.wait().await;
            // The subscriber was dropped with the task (an UNSUB); the round trip makes sure the
            // server has it before this returns.
            self.shared.round_trip().await.map_err(|error| {
                PluginError::new(ErrorCode::OTHER, format!("unsubscribing from `{pattern}`: {error}"))
            })?;
        }
        Ok(())
    }

    /// Received messages waiting for `receive`, publishes that had to be retried, connections
    /// lost and regained; `nats.unsettled`: messages delivered and not yet settled;
    /// `nats.dead_letters`: messages moved to the dead letters.
    fn stats(&self) -> TransportStats {
        let mut stats = self.shared.incidents.stats();
        stats.receive_queue_depth = queued(&self.shared.inbound);
        let unsettled =
            self.shared.config.max_unsettled.saturating_sub(self.shared.permits.available_permits());
        stats.counters.push(("nats.unsettled".to_string(), unsettled as u64));
        stats
            .counters
            .push(("nats.dead_letters".to_string(), self.shared.dead_letters.load(Ordering::Relaxed)));
        stats
    }

    /// Stops reading, hands the messages the host has not settled back to the stream (a
    /// negative acknowledgement: the next consumer of the inbox, or of a durable topic
    /// subscription, gets them without waiting for `ack_wait_ms`, see `Shared::hand_back`),
    /// and closes the connection after the server has every acknowledgement (within
    /// `close_timeout_ms`). Durable topic consumers are kept.
    async fn close(&self) -> Result<(), PluginError> {
        if self.shared.shutdown.send_replace(true) {
            return Ok(());
        }
        let limit = Duration::from_millis(self.shared.config.close_timeout_ms);
        // The readers stop on their own at the shutdown signal, with everything they handed to
        // the host in `in_flight`; core NATS forwarders hold nothing to hand back.
        let mut readers: Vec<Task> = lock(&self.topics).drain().map(|(_, task)| task).collect();
        readers.extend(lock(&self.reader).take());
        let stopped = tokio::time::timeout(limit, async {
            for reader in &mut readers {
                reader.wait().await;
            }
        })
        .await;
        if stopped.is_err() {
            for reader in &mut readers {
                reader.abort();
            }
        }
        let handed_back: Vec<InFlight> =
            lock(&self.shared.in_flight).drain().map(|(_, entry)| entry).collect();
        for entry in handed_back {
            self.shared.hand_back(entry.reply).await;
        }
        self.receiver.lock().await.close();
        let flushed = tokio::time::timeout(limit, self.shared.client.flush()).await;
        let _ = tokio::time::timeout(limit, self.shared.client.drain()).await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            _ => Err(PluginError::new(
                ErrorCode::OTHER,
                format!(
                    "closing the nats transport of node `{}`: acknowledgements could not be flushed within \
                     close_timeout_ms ({} ms); those messages will be delivered again",
                    self.shared.node,
                    limit.as_millis()
                ),
            )),
        }
    }
}

/// Pulls a consumer (the inbox, or a durable topic subscription), as much at a time as the host
/// may still hold unsettled.
async fn read_loop(shared: Arc<Shared>, consumer: PullConsumer, source: Source) {
    let name = consumer.cached_info().name.clone();
    let mut shutdown = shared.shutdown.subscribe();
    let expires = Duration::from_millis(shared.config.fetch_expires_ms);
    let mut delay = Duration::from_millis(50);
    while !shared.is_closed() {
        // Prefetch limit: wait until the host settled something.
        let permit = tokio::select! {
            permit = shared.permits.acquire() => permit,
            _ = closing(&mut shutdown) => return,
        };
        drop(permit);
        let room = shared.permits.available_permits().clamp(1, shared.config.fetch_batch);
        shared.pulling(expires);
        let batch = tokio::select! {
            batch = consumer.batch().max_messages(room).expires(expires).messages() => batch,
            _ = closing(&mut shutdown) => return,
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                shared.incidents.failed();
                tracing::warn!(consumer = %name, error = %shared.scrub(&error.to_string()),
                    "pulling from the consumer failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = closing(&mut shutdown) => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = closing(&mut shutdown) => return,
                next = batch.next() => next,
            };
            match next {
                None => break,
                Some(Ok(message)) => {
                    delay = Duration::from_millis(50);
                    if !take(&shared, message, source, &mut shutdown).await {
                        return;
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(consumer = %name, error = %shared.scrub(&error.to_string()),
                        "a pull request ended with an error");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closing(&mut shutdown) => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                    break;
                }
            }
        }
    }
}

/// Hands one stream message to the host, or moves it to the dead letters; `false` once the
/// transport is closing.
async fn take(
    shared: &Shared,
    message: jetstream::Message,
    source: Source,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let (delivered, sequence) = match message.info() {
        Ok(info) => (info.delivered, info.stream_sequence),
        // Not a JetStream delivery (nothing to acknowledge): ignore it.
        Err(_) => return true,
    };
    let Some(reply) = message.reply.clone() else { return true };
    let refusal = if delivered > i64::from(shared.config.max_deliveries) {
        Some(format!(
            "delivered {} times without being accepted (max_deliveries {})",
            delivered - 1,
            shared.config.max_deliveries
        ))
    } else {
        inbound::oversized_reason(message.payload.len(), shared.max_message_size)
    };
    let default_to = match source {
        Source::Inbox => Some(Destination::node(shared.node.clone())),
        Source::Topics => {
            subject::topic_of(&shared.config.prefix, message.subject.as_str()).map(Destination::topic)
        }
    };
    let decoded = match (refusal, default_to) {
        (Some(reason), _) => Err(reason),
        (None, None) => {
            Err(format!("subject `{}` is not a topic subject of this deployment", message.subject))
        }
        (None, Some(default_to)) => format::decode(message.headers.as_ref(), &message.payload, default_to),
    };
    let envelope = match decoded {
        Ok(envelope) => envelope,
        Err(reason) => {
            let moved = shared
                .move_to_dead_letter(
                    reply,
                    message.subject.as_str(),
                    sequence,
                    message.headers.as_ref(),
                    &message.payload,
                    &reason,
                )
                .await;
            if let Err(error) = moved {
                tracing::warn!(%error, "a refused message was not moved to the dead letters; it comes again after ack_wait_ms");
            }
            return true;
        }
    };
    // One permit per message the host holds unsettled, given back when it is settled. Readers
    // of several consumers share the permits: a reader may have pulled more than is left, and
    // then waits here for the host to settle something.
    // Waiting (with the shutdown watched) only when no permit is free: the common case costs
    // no future per message.
    let permit = match shared.permits.try_acquire() {
        Ok(permit) => Some(permit),
        Err(_) => tokio::select! {
            biased;
            _ = closing(shutdown) => None,
            permit = shared.permits.acquire() => permit.ok(),
        },
    };
    let Some(permit) = permit else {
        // Closing: hand it back rather than leave it until ack_wait_ms.
        shared.hand_back(reply).await;
        return false;
    };
    permit.forget();
    let tag = shared.next_tag.fetch_add(1, Ordering::Relaxed) & !TOPIC_TAG;
    let delivered = u64::try_from(delivered).unwrap_or(1);
    lock(&shared.in_flight).insert(tag, InFlight { reply, source, sequence, delivered });
    let inbound = Inbound { envelope, delivery_tag: tag };
    // The queue has room for every permit, so this waits only for topic messages ahead of it.
    let inbound = match shared.inbound.try_send(inbound) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
        Err(mpsc::error::TrySendError::Full(inbound)) => inbound,
    };
    tokio::select! {
        sent = shared.inbound.send(inbound) => sent.is_ok(),
        _ = closing(shutdown) => false,
    }
}

/// Forwards the messages of one topic subscription to the host (at most once: they need no
/// settlement). Ends when the subscription ends or the task is stopped.
async fn forward_topic(shared: Arc<Shared>, mut subscriber: async_nats::Subscriber) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let message = tokio::select! {
            message = subscriber.next() => message,
            _ = closing(&mut shutdown) => return,
        };
        let Some(message) = message else { return };
        let Some(topic) = subject::topic_of(&shared.config.prefix, message.subject.as_str()) else {
            continue;
        };
        if let Some(reason) = inbound::oversized_reason(message.payload.len(), shared.max_message_size) {
            shared.incidents.failed();
            tracing::debug!(%reason, "topic message dropped");
            continue;
        }
        let envelope =
            match format::decode(message.headers.as_ref(), &message.payload, Destination::topic(topic)) {
                Ok(envelope) => envelope,
                Err(reason) => {
                    shared.incidents.failed();
                    tracing::debug!(subject = %message.subject, %reason, "malformed topic message dropped");
                    continue;
                }
            };
        let tag = TOPIC_TAG | shared.next_tag.fetch_add(1, Ordering::Relaxed);
        let inbound = Inbound { envelope, delivery_tag: tag };
        tokio::select! {
            sent = shared.inbound.send(inbound) => if sent.is_err() { return },
            _ = closing(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requeue_without_a_delay_is_a_plain_nak_and_with_one_carries_it_in_nanoseconds() {
        assert_eq!(negative_acknowledgement(Duration::ZERO), Bytes::from_static(b"-NAK"));
        assert_eq!(
            negative_acknowledgement(Duration::from_millis(1_500)),
            Bytes::from_static(b"-NAK {\"delay\": 1500000000}")
        );
    }
}

//! The AMQP transport: a durable inbox queue per node, a topic queue per instance, publisher
//! confirms, manual acknowledgements, reconnection.

use crate::{
    acks::{self, AckAction, AckTracker, Source},
    config::{AmqpConfig, QueueType},
    connection, dead_letter, format,
    redeliveries::Redeliveries,
    topics,
    unroutable::{self, UnroutableLog},
};
use comms_plugin_api::{
    async_trait, queued, redact::redact_url, Capabilities, Destination, Envelope, ErrorCode, Inbound,
    IncidentCounters, NodeId, PluginError, Settlement, Transport, TransportInfo, TransportStats,
};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
        BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    Channel, Confirmation, Connection, ExchangeKind,
};
use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

/// How often the supervisor checks that the connection is still up (besides being told).
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long `close` waits for sends in flight before closing the connection under them.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A transport over an AMQP broker; see the crate documentation for the format and guarantees.
#[derive(Debug)]
pub struct AmqpTransport {
    inner: Arc<Inner>,
}

/// One working connection with its channels.
struct Link {
    generation: u32,
    connection: Connection,
    publisher: Channel,
    inbox: Channel,
    topics: Channel,
    topic_queue: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl Link {
    fn healthy(&self) -> bool {
        connection::healthy(&self.connection, &[&self.publisher, &self.inbox, &self.topics])
    }

    fn channel(&self, source: Source) -> &Channel {
        match source {
            Source::Inbox => &self.inbox,
            Source::Topics => &self.topics,
        }
    }
}

#[derive(Debug, Default)]
struct Trackers {
    generation: u32,
    inbox: AckTracker,
    topics: AckTracker,
}

impl Trackers {
    fn get(&mut self, source: Source) -> &mut AckTracker {
        match source {
            Source::Inbox => &mut self.inbox,
            Source::Topics => &mut self.topics,
        }
    }
}

#[derive(Debug)]
struct Inner {
    node: NodeId,
    config: AmqpConfig,
    /// The broker URL with its password redacted, for logs and errors.
    url: String,
    /// The broker URL and TLS settings, to connect with.
    broker: connection::Broker,
    /// The inbox queue: this transport's address.
    inbox_queue: String,
    link: watch::Sender<Option<Arc<Link>>>,
    next_generation: AtomicU32,
    /// Told the generation of a link someone saw fail.
    failures: mpsc::Sender<u32>,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    /// comms patterns subscribed to; bound again after a reconnect.
    patterns: Mutex<BTreeSet<String>>,
    trackers: Mutex<Trackers>,
    /// Redeliveries on a classic inbox and on the topic queue, counted by this process (a
    /// quorum inbox counts them itself).
    redeliveries: Mutex<Redeliveries>,
    /// Keeps the order of settlements on the wire the order they were planned in.
    settling: tokio::sync::Mutex<()>,
    /// Sends hold it shared; `close` takes it exclusively to wait for them.
    in_flight: tokio::sync::RwLock<()>,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Lost connections, failed reconnect attempts and restorations, for `stats()`.
    incidents: IncidentCounters,
    /// Addresses whose sends came back (no queue), each logged once.
    unroutable: UnroutableLog,
}

impl AmqpTransport {
    /// Connects (retrying per `connect_attempts`), declares the inbox `<queue_prefix><node>`
    /// and starts consuming. Must run inside a tokio runtime.
    pub async fn connect(node: NodeId, config: AmqpConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let inbox_queue = format!("{}{}", config.queue_prefix, node.as_str());
        if ShortString::try_new(inbox_queue.as_str()).is_err() {
            return Err(PluginError::invalid_config(format!(
                "the inbox queue name (key `queue_prefix` + node id `{node}`) is longer than AMQP's 255 bytes"
            )));
        }
        let broker = connection::Broker::new(&config.url, &config.tls_files())?;
        let capacity = usize::from(config.prefetch) * 2;
        let (inbound_tx, inbound_rx) = mpsc::channel(capacity);
        let (failures, failures_rx) = mpsc::channel(16);
        let inner = Arc::new(Inner {
            url: redact_url(&config.url),
            broker,
            node,
            inbox_queue,
            link: watch::channel(None).0,
            next_generation: AtomicU32::new(1),
            failures,
            inbound_tx,
            inbound_rx: tokio::sync::Mutex::new(inbound_rx),
            patterns: Mutex::new(BTreeSet::new()),
            trackers: Mutex::new(Trackers::default()),
            settling: tokio::sync::Mutex::new(()),
            in_flight: tokio::sync::RwLock::new(()),
            closed: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            incidents: IncidentCounters::default(),
            unroutable: UnroutableLog::default(),
            redeliveries: Mutex::default(),
            config,
        });
        comms_plugin_api::demote_to_debug(unroutable::LAPIN_RETURNS_TARGET);
        let backoff = inner.config.backoff();
        let first = connection::retry(&backoff, |attempt| {
            let inner = Arc::clone(&inner);
            async move {
                establish(&inner).await.inspect_err(|error| {
                    tracing::warn!(url = %inner.url, attempt, %error, "AMQP transport could not start");
                })
            }
        })
        .await;
        let link = match first {
            Ok(link) => link,
            Err((error, _)) if connection::is_fatal(&error) => return Err(error),
            Err((error, attempts)) if error.code == ErrorCode::UNREACHABLE => {
                return Err(PluginError::retryable(
                    ErrorCode::UNREACHABLE,
                    format!("AMQP broker at {} unreachable after {attempts} attempts: {error}", inner.url),
                ))
            }
            Err((error, _)) => return Err(error),
        };
        inner.link.send_replace(Some(link));
        tokio::spawn(supervise(Arc::clone(&inner), failures_rx));
        Ok(Self { inner })
    }

    /// The inbox queue name, which is also the address peers send to.
    pub fn inbox_queue(&self) -> &str {
        &self.inner.inbox_queue
    }
}

fn shortstr(text: &str, what: &str) -> Result<ShortString, PluginError> {
    ShortString::try_new(text).map_err(|_| {
        PluginError::new(ErrorCode::INVALID_ADDRESS, format!("{what} is longer than AMQP's 255 bytes"))
    })
}

/// The inbox's `queue.declare` arguments: its expiry, kind and dead-letter exchange.
fn inbox_arguments(config: &AmqpConfig) -> FieldTable {
    let mut arguments = FieldTable::default();
    if let Some(expires) = config.inbox_expires_ms {
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expires as i64));
    }
    dead_letter::queue_arguments(config, &mut arguments);
    if config.inbox_queue_type == QueueType::Quorum {
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        if !config.dead_letter_exchange.is_empty() {
            // The broker's own dead letters (REJECTED_DISCARD) leave the queue only once the
            // dead-letter queue confirmed them; RabbitMQ needs `reject-publish` for it, which
            // changes nothing here (the inbox has no length limit).
            arguments.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
            arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        }
    }
    arguments
}

/// Opens a connection and everything on it, and starts the consumers. One attempt.
async fn establish(inner: &Arc<Inner>) -> Result<Arc<Link>, PluginError> {
    let name = format!("comms {} transport", inner.node);
    let connection = connection::connect_once(&inner.broker, &name).await?;
    let result = set_up(inner, &connection).await;
    if result.is_err() {
        connection::close(&connection).await;
    }
    result.map(|(parts, consumers)| {
        let link = Arc::new(Link::from_parts(connection, parts));
        {
            let mut trackers = inner.trackers.lock().unwrap_or_else(|p| p.into_inner());
            trackers.generation = link.generation;
            trackers.inbox.reset();
            trackers.topics.reset();
        }
        for (source, consumer) in consumers {
            tokio::spawn(consume(Arc::clone(inner), Arc::clone(&link), source, consumer));
        }
        link
    })
}

type Consumers = Vec<(Source, lapin::Consumer)>;

async fn set_up(inner: &Inner, connection: &Connection) -> Result<(LinkParts, Consumers), PluginError> {
    let config = &inner.config;
    let url = config.url.as_str();
    let fail = |what: &str| {
        let what = what.to_string();
        move |error: lapin::Error| connection::amqp_error(url, &what, &error)
    };
    let publisher = connection.create_channel().await.map_err(fail("opening a channel"))?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(fail("enabling confirms"))?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    publisher
        .exchange_declare(
            shortstr(&config.topic_exchange, "key `topic_exchange`")?,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(fail(&format!("declaring the topic exchange `{}`", config.topic_exchange)))?;

    dead_letter::declare(&publisher, config).await?;
    if !config.discovery_exchange.is_empty() {
        // So that a program that is not comms can announce itself before any comms node with
        // AMQP discovery ran (publishing to a missing exchange closes the publisher's channel).
        publisher
            .exchange_declare(
                shortstr(&config.discovery_exchange, "key `discovery_exchange`")?,
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(fail(&format!("declaring the discovery exchange `{}`", config.discovery_exchange)))?;
    }

    let inbox = connection.create_channel().await.map_err(fail("opening a channel"))?;
    let queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let arguments = inbox_arguments(config);
    inbox.queue_declare(inner.inbox_queue.as_str().into(), queue, arguments).await.map_err(|error| {
        let mut error = connection::amqp_error(url, &format!("declaring the inbox queue `{}`", inner.inbox_queue), &error);
        if error.message.contains("PRECONDITION_FAILED") {
            error.code = ErrorCode::INVALID_CONFIG;
            error.retryable = false;
            error.message.push_str(
                " (the queue exists with other arguments: keys `inbox_expires_ms`, `inbox_queue_type` and \
                 `dead_letter_exchange` must match how it was first declared; an inbox made before comms declared a dead-letter exchange \
                 by default needs `dead_letter_exchange = \"\"`, or delete the queue)",
            );
        }
        error
    })?;
    inbox
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(fail("setting the prefetch"))?;

    let topics = connection.create_channel().await.map_err(fail("opening a channel"))?;
    let generation = inner.next_generation.fetch_add(1, Ordering::Relaxed) & acks::GENERATION_MASK;
    // A new name per connection: the broker may not have noticed yet that the previous
    // connection, which owned the old exclusive queue, is gone.
    let topic_queue = format!("comms.topics.{}.{:x}.{generation}", inner.node, std::process::id());
    let private =
        QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    let mut arguments = FieldTable::default();
    dead_letter::queue_arguments(config, &mut arguments);
    topics
        .queue_declare(shortstr(&topic_queue, "the topic queue name")?, private, arguments)
        .await
        .map_err(fail("declaring the topic queue"))?;
    topics
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(fail("setting the prefetch"))?;
    let patterns: Vec<String> =
        inner.patterns.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
    for pattern in patterns {
        bind(&topics, &topic_queue, &config.topic_exchange, &pattern, url).await?;
    }

    let tag = |source: &str| format!("comms-{source}-{}-{generation}", inner.node);
    let manual = BasicConsumeOptions::default();
    let inbox_consumer = inbox
        .basic_consume(
            inner.inbox_queue.as_str().into(),
            shortstr(&tag("inbox"), "consumer tag")?,
            manual,
            FieldTable::default(),
        )
        .await
        .map_err(fail("consuming the inbox"))?;
    let topic_consumer = topics
        .basic_consume(
            topic_queue.as_str().into(),
            shortstr(&tag("topics"), "consumer tag")?,
            manual,
            FieldTable::default(),
        )
        .await
        .map_err(fail("consuming the topic queue"))?;
    Ok((
        LinkParts { generation, publisher, inbox, topics, topic_queue },
        vec![(Source::Inbox, inbox_consumer), (Source::Topics, topic_consumer)],
    ))
}

/// A [`Link`] without its connection yet (so that `set_up` can borrow the connection).
struct LinkParts {
    generation: u32,
    publisher: Channel,
    inbox: Channel,
    topics: Channel,
    topic_queue: String,
}

impl Link {
    fn from_parts(connection: Connection, parts: LinkParts) -> Self {
        Self {
            generation: parts.generation,
            connection,
            publisher: parts.publisher,
            inbox: parts.inbox,
            topics: parts.topics,
            topic_queue: parts.topic_queue,
        }
    }
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    pattern: &str,
    url: &str,
) -> Result<(), PluginError> {
    let key = topics::binding_key(pattern)?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            shortstr(&key, &format!("topic pattern `{pattern}`"))?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| connection::amqp_error(url, &format!("subscribing to `{pattern}`"), &error))
}

/// Reads one consumer until its connection ends, handing each delivery to `receive`.
async fn consume(inner: Arc<Inner>, link: Arc<Link>, source: Source, mut consumer: lapin::Consumer) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = connection::closing(&mut shutdown) => return,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                tracing::debug!(url = %inner.url, %error, "AMQP consumer failed");
                let _ = inner.failures.try_send(link.generation);
                return;
            }
            None => {
                let _ = inner.failures.try_send(link.generation);
                return;
            }
        };
        let Some(inbound) = inbound(&inner, &link, source, delivery).await else { continue };
        let sent = tokio::select! {
            sent = inner.inbound_tx.send(inbound) => sent.is_ok(),
            _ = connection::closing(&mut shutdown) => false,
        };
        if !sent {
            return;
        }
    }
}

/// The delivery as the host gets it, or `None` (after dead-lettering it) for a message that is
/// not a comms message or is too large.
async fn inbound(inner: &Inner, link: &Link, source: Source, mut delivery: Delivery) -> Option<Inbound> {
    let tag = delivery.delivery_tag;
    let earlier = earlier_deliveries(inner, source, &delivery);
    // Which delivery of the message this is, for the requeue delay.
    let delivery_number = earlier.map_or(1, |earlier| earlier + 1);
    // A program that is not comms (or a node with a larger limit) can publish any size.
    let refused =
        comms_plugin_api::inbound::oversized_reason(delivery.data.len(), inner.config.max_message_size)
            .or_else(|| dead_letter::past_delivery_limit(earlier?, inner.config.max_attempts()));
    let parsed = match refused {
        Some(reason) => Err(reason),
        None => {
            let routing_key = delivery.routing_key.as_str().to_string();
            let node = &inner.node;
            let default_to = || match source {
                Source::Inbox => Destination::Node(node.clone()),
                Source::Topics => Destination::topic(routing_key),
            };
            format::envelope_from(&delivery.properties, &mut delivery.data, default_to)
        }
    };
    match parsed {
        Ok(envelope) => {
            let mut trackers = inner.trackers.lock().unwrap_or_else(|p| p.into_inner());
            if trackers.generation != link.generation {
                return None;
            }
            trackers.get(source).delivered(tag, delivery_number);
            Some(Inbound { envelope, delivery_tag: acks::encode(link.generation, source, tag) })
        }
        Err(reason) => {
            let refusal = dead_letter::Refusal {
                publisher: &link.publisher,
                consumer: link.channel(source),
                queue: match source {
                    Source::Inbox => &inner.inbox_queue,
                    Source::Topics => &link.topic_queue,
                },
                exchange: &inner.config.dead_letter_exchange,
            };
            dead_letter::refuse(refusal, delivery, &reason).await;
            None
        }
    }
}

/// How often `delivery`'s message was delivered before and not accepted: counted by the broker
/// on a quorum inbox, by this process on a classic one and on the topic queue (always classic:
/// it is exclusive to its connection) ([`Redeliveries`]); `None` for a message without a
/// readable id, which is refused anyway.
fn earlier_deliveries(inner: &Inner, source: Source, delivery: &Delivery) -> Option<u64> {
    match (source, inner.config.inbox_queue_type) {
        (Source::Inbox, QueueType::Quorum) => dead_letter::earlier_deliveries(delivery),
        // A first delivery: nothing to count (and no lock taken on the common path).
        _ if !delivery.redelivered => Some(0),
        _ => Some(inner.redeliveries().redelivered(message_id(delivery)?)),
    }
}

/// The id of `delivery`'s message, if it has a readable one.
fn message_id(delivery: &Delivery) -> Option<u128> {
    let id = delivery.properties.message_id().as_ref()?;
    Some(format::parse_message_id(id.as_str())?.as_u128())
}

/// Hands a message the host requeued back to its queue once `delay` is over
/// (`basic.nack(requeue)`). Until then it stays unacknowledged: it takes one of the queue's
/// `prefetch` slots, and if the connection is lost or the transport closes meanwhile, the
/// broker requeues it at once (as any unsettled delivery), and nothing is sent here.
async fn requeue_later(inner: Arc<Inner>, link: Arc<Link>, source: Source, tag: u64, delay: Duration) {
    let mut shutdown = inner.shutdown.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = connection::closing(&mut shutdown) => return,
    }
    // In order with the settlements planned around it: no multiple ack can be planned between
    // the release and the nack.
    let _order = inner.settling.lock().await;
    let held = {
        let mut trackers = inner.trackers.lock().unwrap_or_else(|p| p.into_inner());
        trackers.generation == link.generation && trackers.get(source).release(tag)
    };
    if !held {
        return;
    }
    let options = BasicNackOptions { multiple: false, requeue: true };
    if let Err(error) = link.channel(source).basic_nack(tag, options).await {
        tracing::debug!(url = %inner.url, %error, "requeueing a held message failed; the broker delivers it again once the connection is replaced");
        inner.report_failure(&link);
    }
}

/// Watches the link; rebuilds it (forever, with backoff) when it fails, until the transport
/// closes.
async fn supervise(inner: Arc<Inner>, mut failures: mpsc::Receiver<u32>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let current = inner.link.borrow().clone();
        let broken = match &current {
            Some(link) => {
                tokio::select! {
                    _ = connection::closing(&mut shutdown) => return,
                    failed = failures.recv() => failed == Some(link.generation) || !link.healthy(),
                    _ = tokio::time::sleep(HEALTH_CHECK_INTERVAL) => !link.healthy(),
                }
            }
            None => true,
        };
        if !broken {
            continue;
        }
        if let Some(link) = current {
            inner.incidents.failed();
            tracing::warn!(url = %inner.url, node = %inner.node, "AMQP connection lost; reconnecting");
            inner.link.send_replace(None);
            connection::close(&link.connection).await;
        }
        let mut attempt = 0u32;
        loop {
            if *shutdown.borrow() {
                return;
            }
            attempt += 1;
            match establish(&inner).await {
                Ok(link) => {
                    inner.incidents.reconnected();
                    tracing::info!(url = %inner.url, node = %inner.node, attempt, "AMQP connection restored");
                    inner.link.send_replace(Some(link));
                    break;
                }
                Err(error) => {
                    inner.incidents.failed();
                    let delay = reconnect_delay(&inner.config, attempt);
                    if connection::is_fatal(&error) {
                        // The broker's certificate changed under a running node: keep trying at
                        // the longest delay (an operator may fix it) and say why at error level.
                        tracing::error!(url = %inner.url, attempt, %error, "reconnecting to the AMQP broker failed");
                    } else {
                        tracing::warn!(url = %inner.url, attempt, %error, "reconnecting to the AMQP broker failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = connection::closing(&mut shutdown) => return,
                    }
                }
            }
        }
    }
}

fn reconnect_delay(config: &AmqpConfig, attempt: u32) -> Duration {
    let backoff = comms_plugin_api::backoff::Backoff { attempts: u32::MAX, ..config.backoff() };
    backoff.delay_after(attempt).unwrap_or(backoff.max)
}

impl Inner {
    /// The count of redeliveries on classic queues.
    fn redeliveries(&self) -> std::sync::MutexGuard<'_, Redeliveries> {
        self.redeliveries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!("AMQP transport `{}`", self.inbox_queue))
    }

    /// The current link, waiting for a reconnect until `deadline`.
    async fn link_before(&self, deadline: Instant, what: &str) -> Result<Arc<Link>, PluginError> {
        let mut link = self.link.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            found = tokio::time::timeout_at(deadline, link.wait_for(Option::is_some)) => match found {
                Ok(Ok(link)) => Ok(link.clone().expect("waited for Some")),
                _ => Err(PluginError::retryable(
                    ErrorCode::UNREACHABLE,
                    format!("{what}: no connection to the AMQP broker at {} (reconnecting)", self.url),
                )),
            },
            _ = connection::closing(&mut shutdown) => Err(self.closed_error()),
        }
    }

    fn report_failure(&self, link: &Link) {
        let _ = self.failures.try_send(link.generation);
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    /// `ENCRYPTED` with an `amqps://` URL: the link to the broker is TLS and the broker was
    /// authenticated by its certificate.
    fn info(&self) -> TransportInfo {
        let tls = if self.inner.broker.is_tls() { Capabilities::ENCRYPTED } else { Capabilities::NONE };
        TransportInfo::new(
            Capabilities::ORDERED
                | Capabilities::ACKNOWLEDGEMENTS
                | Capabilities::DURABLE
                | Capabilities::NATIVE_TOPICS
                | Capabilities::RELIABLE
                | tls,
            self.inner.inbox_queue.clone(),
            self.inner.config.max_message_size,
        )
    }

    /// Publishes with `mandatory` to the inbox queue `address` (through the default exchange),
    /// or for a topic with an empty address to the topic exchange, and completes when the broker
    /// has confirmed it (written it to disk for a durable inbox).
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(inner.closed_error());
        }
        let size = envelope.payload.len() as u64;
        if size > inner.config.max_message_size {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!("payload of {size} bytes exceeds max_message_size {}", inner.config.max_message_size),
            ));
        }
        let (exchange, routing_key, mandatory) = match (&envelope.to, address) {
            (Destination::Topic(topic), "") => (inner.config.topic_exchange.as_str(), topic.as_str(), false),
            (_, "") => {
                return Err(PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    "an empty address is only for publishing to a topic",
                ))
            }
            (_, queue) => ("", queue, true),
        };
        let exchange = shortstr(exchange, "the exchange name")?;
        let routing_key = shortstr(routing_key, &format!("address `{routing_key}`"))?;
        let properties = format::properties(&envelope, &inner.inbox_queue);
        let _in_flight = inner.in_flight.read().await;
        if inner.closed.load(Ordering::Acquire) {
            return Err(inner.closed_error());
        }
        let deadline = Instant::now() + Duration::from_millis(inner.config.send_timeout_ms);
        let what = if mandatory {
            format!("sending to `{routing_key}`")
        } else {
            format!("publishing to `{routing_key}`")
        };
        loop {
            let link = inner.link_before(deadline, &what).await?;
            let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
            let published = async {
                link.publisher
                    .basic_publish(
                        exchange.clone(),
                        routing_key.clone(),
                        options,
                        envelope.payload.as_slice(),
                        properties.clone(),
                    )
                    .await?
                    .await
            };
            let outcome = match tokio::time::timeout_at(deadline, published).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Err(PluginError::retryable(
                        ErrorCode::TIMEOUT,
                        format!(
                            "{what}: the AMQP broker at {} did not confirm in time; it may still deliver it",
                            inner.url
                        ),
                    ))
                }
            };
            match outcome {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {
                    if mandatory {
                        inner.unroutable.routed(routing_key.as_str());
                    }
                    return Ok(());
                }
                Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
                    if inner.unroutable.returned(routing_key.as_str()) {
                        tracing::warn!(queue = routing_key.as_str(), url = %inner.url,
                            "no queue at this address: sends to it fail (UNREACHABLE) until it exists; \
                             logged once per address");
                    }
                    return Err(PluginError::retryable(
                        ErrorCode::UNREACHABLE,
                        format!(
                            "{what}: no queue `{routing_key}` on the AMQP broker at {} ({}): that node never started or \
                             its inbox was deleted",
                            inner.url,
                            returned.reply_text.as_str()
                        ),
                    ));
                }
                Ok(Confirmation::Nack(None)) => {
                    return Err(PluginError::retryable(
                        ErrorCode::OTHER,
                        format!("{what}: the AMQP broker at {} refused the message (nack)", inner.url),
                    ))
                }
                Err(error) => {
                    // The connection or channel failed before the confirm: publish again on the
                    // next link (the broker may then hold it twice; the id tells duplicates).
                    tracing::debug!(url = %inner.url, %error, "publish failed; retrying after reconnect");
                    inner.report_failure(&link);
                    if Instant::now() >= deadline {
                        return Err(connection::amqp_error(&inner.config.url, &what, &error));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let inner = &self.inner;
        let mut inbound = inner.inbound_rx.lock().await;
        let mut shutdown = inner.shutdown.subscribe();
        if *shutdown.borrow() {
            return Ok(Vec::new());
        }
        Ok(comms_plugin_api::inbound::receive_batch(&mut inbound, max_batch, &mut shutdown).await)
    }

    /// ACCEPTED becomes `basic.ack` (one `multiple` ack for a contiguous run), REJECTED_REQUEUE
    /// `basic.nack(requeue)` (with `requeue_delay_ms`: once the delay is over, the message held
    /// unacknowledged until then), REJECTED_DISCARD `basic.reject` (dead-lettered if configured).
    /// Settlements of a connection that has since been lost are ignored: the broker delivers
    /// those messages again.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(inner.closed_error());
        }
        let Some(link) = inner.link.borrow().clone() else { return Ok(()) };
        let _order = inner.settling.lock().await;
        let plans = {
            let mut trackers = inner.trackers.lock().unwrap_or_else(|p| p.into_inner());
            if trackers.generation != link.generation {
                return Ok(());
            }
            let mut plans = Vec::with_capacity(2);
            for source in [Source::Inbox, Source::Topics] {
                let mine = settlements.iter().filter_map(|settlement| {
                    let (generation, from, tag) = acks::decode(settlement.delivery_tag);
                    (generation == link.generation && from == source).then_some((tag, settlement.outcome))
                });
                plans.push((source, trackers.get(source).plan(mine, inner.config.requeue_delay())));
            }
            plans
        };
        let mut failed = None;
        for (source, plan) in plans {
            let channel = link.channel(source);
            for action in plan {
                let sent = match action {
                    AckAction::Ack { tag, multiple } => {
                        channel.basic_ack(tag, BasicAckOptions { multiple }).await
                    }
                    AckAction::Requeue(tag) => {
                        channel.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await
                    }
                    AckAction::RequeueAfter { tag, delay } => {
                        tokio::spawn(requeue_later(Arc::clone(inner), Arc::clone(&link), source, tag, delay));
                        Ok(())
                    }
                    AckAction::Discard(tag) => {
                        channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await
                    }
                };
                if let Err(error) = sent {
                    failed.get_or_insert(error);
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(error) => {
                inner.report_failure(&link);
                let mut error =
                    connection::amqp_error(&inner.config.url, "settling received messages", &error);
                error.message.push_str("; the broker delivers the unsettled messages again");
                Err(error)
            }
        }
    }

    /// Binds this instance's topic queue to the topic exchange with `pattern` (`>` becomes
    /// `*.#`). A message matching several patterns arrives once.
    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(inner.closed_error());
        }
        topics::binding_key(pattern)?;
        inner.patterns.lock().unwrap_or_else(|p| p.into_inner()).insert(pattern.to_string());
        let deadline = Instant::now() + Duration::from_millis(inner.config.send_timeout_ms);
        let what = format!("subscribing to `{pattern}`");
        loop {
            let link = inner.link_before(deadline, &what).await?;
            match bind(
                &link.topics,
                &link.topic_queue,
                &inner.config.topic_exchange,
                pattern,
                &inner.config.url,
            )
            .await
            {
                Ok(()) => return Ok(()),
                // A reconnect binds every pattern again, this one included.
                Err(error) if error.retryable && Instant::now() < deadline => {
                    inner.report_failure(&link);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(inner.closed_error());
        }
        let key = topics::binding_key(pattern)?;
        if !inner.patterns.lock().unwrap_or_else(|p| p.into_inner()).remove(pattern) {
            return Ok(());
        }
        // Without a connection there is nothing to unbind: the next one binds only what is left.
        let Some(link) = inner.link.borrow().clone() else { return Ok(()) };
        link.topics
            .queue_unbind(
                link.topic_queue.as_str().into(),
                inner.config.topic_exchange.as_str().into(),
                shortstr(&key, "topic pattern")?,
                FieldTable::default(),
            )
            .await
            .map_err(|error| {
                inner.report_failure(&link);
                connection::amqp_error(&inner.config.url, &format!("unsubscribing from `{pattern}`"), &error)
            })
    }

    /// Deliveries waiting for `receive`, lost connections and failed reconnect attempts, and
    /// restored connections; `amqp.unsettled`: deliveries handed to the host and not settled
    /// yet, held ones included; `amqp.held`: of those, requeued ones held for their delay.
    fn stats(&self) -> TransportStats {
        let mut stats = self.inner.incidents.stats();
        stats.receive_queue_depth = queued(&self.inner.inbound_tx);
        let (unsettled, held) = {
            let trackers = self.inner.trackers.lock().unwrap_or_else(|p| p.into_inner());
            let (inbox, topics) = (&trackers.inbox, &trackers.topics);
            (inbox.outstanding() + topics.outstanding(), inbox.held() + topics.held())
        };
        stats.counters.push(("amqp.unsettled".to_string(), unsettled as u64));
        stats.counters.push(("amqp.held".to_string(), held as u64));
        stats
    }

    /// Waits (up to 5 s) for sends in flight, then closes the connection. Messages received but
    /// not settled go back to the broker's queue and are delivered again to the node's next
    /// instance; `receive` returns an empty batch from now on.
    async fn close(&self) -> Result<(), PluginError> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, inner.in_flight.write()).await;
        inner.shutdown.send_replace(true);
        if let Some(link) = inner.link.send_replace(None) {
            connection::close(&link.connection).await;
        }
        if flushed.is_err() {
            return Err(PluginError::new(
                ErrorCode::TIMEOUT,
                format!(
                    "closing the AMQP transport `{}`: sends still waiting for confirms were cut off",
                    inner.inbox_queue
                ),
            ));
        }
        Ok(())
    }
}

//! What the AMQP transport refuses or holds back, on the RabbitMQ of this machine: a message that
//! is not a comms message, or above `max_message_size`, is republished to the dead-letter
//! exchange with its reason in `comms-dead-letter-reason` and kept in the dead-letter queue; one
//! the host discards is dead-lettered by the broker into the same queue; one it requeues comes
//! again after `requeue_delay_ms`, and goes to the dead letters after `max_attempts` deliveries
//! (an inbox of either kind, and the topic queue). And the exchanges a program that is not comms publishes to
//! exist as soon as a transport started.
//!
//! The foreign messages are published with lapin, as any AMQP program could.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    inbound::{oversized_reason, MAX_ATTEMPTS_REASON},
    Destination, Envelope, Inbound, MessageId, NodeId, Payload, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, broker_available, counter};
use lapin::{
    message::BasicGetMessage,
    options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use std::time::{Duration, Instant};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Names of this test's own: node, dead-letter exchange and queue, discovery exchange.
struct Names {
    node: String,
    exchange: String,
    queue: String,
    discovery: String,
}

impl Names {
    fn new(test: &str) -> Self {
        let tag = format!("{test}-{}-{:08x}", std::process::id(), rand::random::<u32>());
        Self {
            node: format!("t-{tag}"),
            exchange: format!("t-dlx-{tag}"),
            queue: format!("t-dlq-{tag}"),
            discovery: format!("t-discovery-{tag}"),
        }
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "inbox_expires_ms = 60000\ndead_letter_exchange = \"{}\"\ndead_letter_queue = \"{}\"\n\
             discovery_exchange = \"{}\"\n{extra}",
            self.exchange, self.queue, self.discovery
        )
    }

    async fn open(&self, extra: &str) -> LoadedTransport {
        let library = PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"));
        library
            .new_transport(&NodeId::new(&self.node), "amqp", &self.config(extra))
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    async fn clean_up(&self, channel: &Channel) {
        for queue in [&self.queue, &format!("comms.inbox.{}", self.node)] {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for exchange in [&self.exchange, &self.discovery] {
            let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
    }
}

/// A test's own names, a confirm-mode channel of its own, and a transport opened with `keys`
/// whose inbox is `inbox`.
struct Setup {
    names: Names,
    _connection: Connection,
    channel: Channel,
    receiver: LoadedTransport,
    inbox: String,
}

async fn set_up(test: &str, keys: &str) -> Setup {
    let names = Names::new(test);
    let (_connection, channel) = channel().await;
    let receiver = names.open(keys).await;
    let inbox = receiver.info().local_address.clone();
    Setup { names, _connection, channel, receiver, inbox }
}

async fn channel() -> (Connection, Channel) {
    let connection = Connection::connect(URL, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    (connection, channel)
}

/// Publishes `body` to `queue` through the default exchange and waits for the broker's confirm.
async fn publish(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
    let confirm = channel.basic_publish("".into(), queue.into(), options, body, properties).await.unwrap();
    assert!(confirm.await.unwrap().is_ack());
}

/// Waits for a message in `queue` and takes it.
async fn get(channel: &Channel, queue: &str) -> BasicGetMessage {
    let started = Instant::now();
    loop {
        let options = BasicGetOptions { no_ack: true };
        if let Some(message) = channel.basic_get(queue.into(), options).await.unwrap() {
            return message;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "nothing arrived in `{queue}` within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn header(message: &BasicGetMessage, name: &str) -> String {
    match message.properties.headers().as_ref().and_then(|headers| headers.inner().get(name)) {
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        other => panic!("header `{name}`: {other:?} in {:?}", message.properties.headers()),
    }
}

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(ShortString::from(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_kept_in_the_dead_letter_queue_with_their_reason() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let Setup { names, _connection, channel, receiver, inbox } =
        set_up("refused", "max_message_size = 1024\n").await;

    // Not a comms message (no message_id), one above the limit, then one that fits.
    publish(&channel, &inbox, b"anonymous", BasicProperties::default()).await;
    publish(&channel, &inbox, &[b'x'; 2048], with_id("a1")).await;
    publish(&channel, &inbox, b"fits", with_id("a2")).await;
    let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(10)).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1, "only the comms message that fits is delivered");
    assert_eq!(batch[0].envelope.payload.as_slice(), b"fits");
    let accept = Settlement { delivery_tag: batch[0].delivery_tag, outcome: SettlementOutcome::ACCEPTED };
    receiver.settle(vec![accept]).await.unwrap();

    let first = get(&channel, &names.queue).await;
    assert_eq!(first.delivery.data, b"anonymous");
    assert_eq!(header(&first, "comms-dead-letter-reason"), "the message has no message_id property");
    assert_eq!(header(&first, "comms-dead-letter-queue"), inbox);
    let second = get(&channel, &names.queue).await;
    assert_eq!(second.delivery.data.len(), 2048, "kept whole");
    assert_eq!(second.properties.message_id().as_ref().map(|id| id.as_str()), Some("a1"));
    assert_eq!(header(&second, "comms-dead-letter-reason"), oversized_reason(2048, 1024).unwrap());

    // Nothing left in the inbox: the refused ones were acknowledged after their copy was kept.
    let nothing = tokio::time::timeout(Duration::from_millis(300), receiver.receive(10)).await;
    assert!(nothing.is_err(), "a refused message came after all: {nothing:?}");
    receiver.close().await.unwrap();
    assert!(channel
        .basic_get(inbox.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_none());
    names.clean_up(&channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_host_discards_is_kept_in_the_dead_letter_queue() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    for (queue_type, keys) in [("classic", ""), ("quorum", "inbox_queue_type = \"quorum\"\n")] {
        eprintln!("{queue_type} inbox");
        the_host_discards_a_message(keys).await;
    }
}

async fn the_host_discards_a_message(keys: &str) {
    let Setup { names, _connection, channel, receiver, inbox } = set_up("discarded", keys).await;
    publish(&channel, &inbox, b"refuse me", with_id("b1")).await;
    let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(10)).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    let discard =
        Settlement { delivery_tag: batch[0].delivery_tag, outcome: SettlementOutcome::REJECTED_DISCARD };
    receiver.settle(vec![discard]).await.unwrap();

    let dead = get(&channel, &names.queue).await;
    assert_eq!(dead.delivery.data, b"refuse me");
    // The broker dead-lettered it: its x-death header says why and where from.
    let headers = dead.properties.headers().clone().unwrap_or_default();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death header: {headers:?}")
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else { panic!("{deaths:?}") };
    let field = |name: &str| match death.inner().get(name) {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("x-death `{name}`: {other:?}"),
    };
    assert_eq!((field("reason"), field("queue")), ("rejected".to_string(), inbox.clone()));
    receiver.close().await.unwrap();
    names.clean_up(&channel).await;
}

/// A message requeued every time comes `max_attempts` times, then it is in the dead-letter queue
/// with the shared reason, and the message behind it is not held up: on a quorum inbox, whose
/// broker counts deliveries, and on a classic one, where the transport counts the redeliveries
/// it gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_requeued_past_max_attempts_becomes_a_dead_letter() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    for queue_type in ["quorum", "classic"] {
        eprintln!("{queue_type} inbox");
        requeued_past_max_attempts(&format!("inbox_queue_type = \"{queue_type}\"\nmax_attempts = 3\n")).await;
    }
}

async fn requeued_past_max_attempts(keys: &str) {
    let Setup { names, _connection, channel, receiver, inbox } = set_up("attempts", keys).await;
    let (deliveries_of_1, deliveries_of_2) =
        comms_plugin_api::testing::deliveries_of_a_message_always_requeued(
            &receiver,
            (&names.node, &inbox),
            3,
            Duration::from_millis(1500),
        )
        .await
        .unwrap();
    assert_eq!(deliveries_of_1, 3, "message 1: max_attempts deliveries, then none");
    assert_eq!(deliveries_of_2, 1, "message 2 is not held up by message 1");
    let dead = get(&channel, &names.queue).await;
    assert_eq!(dead.properties.message_id().as_ref().map(|id| id.to_string()), Some(format!("{:032x}", 1)));
    assert_eq!(header(&dead, "comms-dead-letter-reason"), MAX_ATTEMPTS_REASON);
    assert_eq!(header(&dead, "comms-dead-letter-queue"), inbox);
    receiver.close().await.unwrap();
    // Settled for good: nothing is left in the inbox, and the dead letter is there once.
    assert!(channel
        .basic_get(inbox.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_none());
    let again =
        channel.basic_get(names.queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert!(again.is_none(), "one dead letter, not more: {again:?}");
    names.clean_up(&channel).await;
}

/// The topic queue (exclusive to its connection, so always classic) has the delivery limit too:
/// a publication the subscriber requeues every time comes `max_attempts` times, then it is in the
/// dead-letter queue with the shared reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_requeued_past_max_attempts_becomes_a_dead_letter() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let Setup { names, _connection, channel, receiver, .. } =
        set_up("topic-attempts", "max_attempts = 3\n").await;
    let topic = format!("t.{}", names.node);
    receiver.subscribe(&topic).await.unwrap();
    let node = NodeId::new(&names.node);
    let to = Destination::topic(topic.clone());
    receiver
        .send("", Envelope::new(MessageId::from_u128(7), node, to, Payload::from(vec![7])))
        .await
        .unwrap();
    let mut deliveries = 0;
    while let Ok(batch) = tokio::time::timeout(Duration::from_millis(1500), receiver.receive(16)).await {
        for inbound in batch.unwrap() {
            assert_eq!(inbound.envelope.id, MessageId::from_u128(7));
            deliveries += 1;
            receiver.settle(settlement(&inbound, SettlementOutcome::REJECTED_REQUEUE)).await.unwrap();
        }
        // A transport without the limit would requeue it for ever.
        if deliveries > 9 {
            break;
        }
    }
    assert_eq!(deliveries, 3, "max_attempts deliveries, then none");
    let dead = get(&channel, &names.queue).await;
    assert_eq!(dead.properties.message_id().as_ref().map(|id| id.to_string()), Some(format!("{:032x}", 7)));
    assert_eq!(header(&dead, "comms-dead-letter-reason"), MAX_ATTEMPTS_REASON);
    let queue = header(&dead, "comms-dead-letter-queue");
    assert!(queue.starts_with(&format!("comms.topics.{}.", names.node)), "from the topic queue: {queue}");
    receiver.close().await.unwrap();
    names.clean_up(&channel).await;
}

/// With `requeue_delay_ms`, a message the receiver requeues comes again after its delay,
/// doubled at each delivery, not at once: counted by the broker on a quorum inbox, by the
/// transport on a classic one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_message_comes_again_after_its_delay_doubled_per_delivery() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    for queue_type in ["quorum", "classic"] {
        eprintln!("{queue_type} inbox");
        let keys = format!("inbox_queue_type = \"{queue_type}\"\nrequeue_delay_ms = 300\n");
        let Setup { names, _connection, channel, receiver, inbox } = set_up("requeue-delay", &keys).await;
        let gaps = comms_plugin_api::testing::gaps_between_deliveries(
            &receiver,
            (&names.node, &inbox),
            3,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        // At once (without the delay) would be a few milliseconds.
        assert!(gaps[0] >= Duration::from_millis(300), "{queue_type}, after the 1st delivery: {gaps:?}");
        assert!(gaps[1] >= Duration::from_millis(600), "{queue_type}, after the 2nd, doubled: {gaps:?}");
        receiver.close().await.unwrap();
        names.clean_up(&channel).await;
    }
}

/// Takes `count` messages from `transport`, waiting at most 10 s.
async fn take(transport: &LoadedTransport, count: u32) -> Vec<Inbound> {
    let mut taken = Vec::new();
    while taken.len() < count as usize {
        let batch = tokio::time::timeout(Duration::from_secs(10), transport.receive(count))
            .await
            .unwrap_or_else(|_| panic!("{} of {count} messages came within 10 s", taken.len()))
            .unwrap();
        taken.extend(batch);
    }
    taken
}

fn settlement(inbound: &Inbound, outcome: SettlementOutcome) -> Vec<Settlement> {
    vec![Settlement { delivery_tag: inbound.delivery_tag, outcome }]
}

/// The plugin holds a requeued message unacknowledged for its delay. Accepting the message
/// behind it meanwhile must not delete it (a batched `basic.ack` takes every earlier
/// unacknowledged message with it), and it comes again once its delay is over, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_comes_again_after_its_delay_although_a_later_one_was_accepted_meanwhile() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let Setup { names, _connection, channel, receiver, inbox } =
        set_up("held", "requeue_delay_ms = 400\n").await;
    let node = NodeId::new(&names.node);
    for n in [1u8, 2] {
        let to = Destination::node(node.clone());
        let envelope =
            Envelope::new(MessageId::from_u128(n.into()), node.clone(), to, Payload::from(vec![n]));
        receiver.send(&inbox, envelope).await.unwrap();
    }
    let taken = take(&receiver, 2).await;
    let ids: Vec<MessageId> = taken.iter().map(|inbound| inbound.envelope.id).collect();
    assert_eq!(ids, [MessageId::from_u128(1), MessageId::from_u128(2)]);
    receiver.settle(settlement(&taken[0], SettlementOutcome::REJECTED_REQUEUE)).await.unwrap();
    let requeued = Instant::now();
    receiver.settle(settlement(&taken[1], SettlementOutcome::ACCEPTED)).await.unwrap();
    // Held: counted apart, and still unsettled.
    assert_eq!((counter(&receiver, "amqp.held"), counter(&receiver, "amqp.unsettled")), (1, 1));
    let again = take(&receiver, 1).await;
    let waited = requeued.elapsed();
    assert_eq!(again[0].envelope.id, MessageId::from_u128(1), "the held message, not lost with the ack of 2");
    assert!(waited >= Duration::from_millis(400), "not before its delay: {waited:?}");
    receiver.settle(settlement(&again[0], SettlementOutcome::ACCEPTED)).await.unwrap();
    assert_eq!((counter(&receiver, "amqp.held"), counter(&receiver, "amqp.unsettled")), (0, 0));
    receiver.close().await.unwrap();
    // Both accepted once: nothing is left in the inbox.
    let left = channel.basic_get(inbox.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert!(left.is_none(), "{left:?}");
    names.clean_up(&channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_program_can_announce_itself_once_a_transport_started() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let names = Names::new("discovery");
    let (connection, channel) = channel().await;
    let passive =
        ExchangeDeclareOptions { passive: true, durable: true, ..ExchangeDeclareOptions::default() };
    let before = channel
        .exchange_declare(
            names.discovery.as_str().into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        )
        .await;
    assert!(before.is_err(), "the discovery exchange existed before the test");
    // A failed passive declaration closes the channel.
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    let transport = names.open("").await;
    channel
        .exchange_declare(
            names.discovery.as_str().into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|error| panic!("the transport did not declare the discovery exchange: {error}"));
    let announcement = br#"{"v":1,"kind":"announce","id":"python-node","addresses":[],"expires_in_ms":3000}"#;
    let confirm = channel
        .basic_publish(
            names.discovery.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            announcement,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
    transport.close().await.unwrap();
    names.clean_up(&channel).await;
}

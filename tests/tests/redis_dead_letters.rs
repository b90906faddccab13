//! What the Redis transport refuses on receipt or holds back, on the Redis of this machine:
//! entries written by another program with a payload above `max_message_size`, and entries the
//! host discards, go to `<inbox>:dead-letter` with their reason and never reach the application;
//! entries the host requeues come again after `requeue_delay_ms`, and not before.
//!
//! The foreign entries are written with redis-rs, as any program could.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    inbound::oversized_reason,
    Destination, Envelope, Inbound, MessageId, NodeId, Payload, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, broker_available, counter};
use redis::{aio::MultiplexedConnection, streams::StreamRangeReply, Value};
use std::time::{Duration, Instant};

const URL: &str = "redis://127.0.0.1:6379";

/// A prefix of this run's own, so that nothing here meets another test's keys.
fn unique_prefix() -> String {
    format!("t-dead-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

async fn raw() -> MultiplexedConnection {
    redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn open(node: &str, config: &str) -> LoadedTransport {
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    library.new_transport(&NodeId::new(node), "redis", config).await.unwrap_or_else(|error| panic!("{error}"))
}

/// Deletes every key under `prefix`.
async fn clean(connection: &mut MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(connection).await.unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(&keys).query_async(connection).await.unwrap();
    }
}

/// Waits until the dead-letter stream of `inbox` holds `count` entries and returns them.
async fn dead_letters(connection: &mut MultiplexedConnection, inbox: &str, count: usize) -> StreamRangeReply {
    let started = Instant::now();
    loop {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{inbox}:dead-letter"))
            .arg("-")
            .arg("+")
            .query_async(connection)
            .await
            .unwrap();
        if reply.ids.len() >= count {
            assert_eq!(reply.ids.len(), count, "more dead letters than expected");
            return reply;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no {count} dead letters within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text(fields: &std::collections::HashMap<String, Value>, name: &str) -> String {
    match fields.get(name) {
        Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        other => panic!("field `{name}`: {other:?}"),
    }
}

/// The same settlement for every message of `batch`.
fn settle_all(batch: &[Inbound], outcome: SettlementOutcome) -> Vec<Settlement> {
    batch.iter().map(|inbound| Settlement { delivery_tag: inbound.delivery_tag, outcome }).collect()
}

/// Waits for the inbox to hold no entry and nothing pending: everything settled.
async fn settled(connection: &mut MultiplexedConnection, inbox: &str) {
    let started = Instant::now();
    loop {
        let length: usize = redis::cmd("XLEN").arg(inbox).query_async(connection).await.unwrap();
        let pending: Vec<Value> =
            redis::cmd("XPENDING").arg(inbox).arg("comms").query_async(connection).await.unwrap();
        if length == 0 && pending.first() == Some(&Value::Int(0)) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "inbox not settled: {length} entries, {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_entry_is_dead_lettered_with_the_shared_reason_and_never_delivered() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let prefix = unique_prefix();
    let mut connection = raw().await;
    let receiver =
        open("receiver", &format!("prefix = \"{prefix}\"\nmax_message_size = 1024\nblock_ms = 100\n")).await;
    let inbox = receiver.info().local_address.clone();

    // 2 KiB from a program that ignores the 1 KiB limit, then a message that fits.
    for (id, size) in [("a1", 2048usize), ("a2", 16)] {
        let _: String = redis::cmd("XADD")
            .arg(&inbox)
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("from")
            .arg("foreign")
            .arg("payload")
            .arg(vec![b'x'; size])
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(10)).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1, "only the message that fits is delivered");
    assert_eq!((batch[0].envelope.id, batch[0].envelope.payload.len()), (MessageId::from_u128(0xa2), 16));
    receiver.settle(settle_all(&batch, SettlementOutcome::ACCEPTED)).await.unwrap();

    let dead = dead_letters(&mut connection, &inbox, 1).await;
    let fields = &dead.ids[0].map;
    assert_eq!(text(fields, "error"), oversized_reason(2048, 1024).unwrap());
    assert_eq!(text(fields, "field:id"), "a1");
    assert_eq!(text(fields, "field:payload").len(), 2048, "kept whole for whoever looks into it");
    settled(&mut connection, &inbox).await;
    let nothing = tokio::time::timeout(Duration::from_millis(300), receiver.receive(10)).await;
    assert!(nothing.is_err(), "a refused entry came after all: {nothing:?}");
    receiver.close().await.unwrap();
    clean(&mut connection, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_host_discards_goes_to_the_dead_letter_stream() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let prefix = unique_prefix();
    let mut connection = raw().await;
    let config = format!("prefix = \"{prefix}\"\nblock_ms = 100\n");
    let receiver = open("receiver", &config).await;
    let sender = open("sender", &config).await;
    let inbox = receiver.info().local_address.clone();
    let envelope = Envelope::new(
        MessageId::from_u128(7),
        NodeId::new("sender"),
        Destination::Node(NodeId::new("receiver")),
        Payload::from(b"refuse me".to_vec()),
    );
    sender.send(&inbox, envelope).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), receiver.receive(10)).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    receiver.settle(settle_all(&batch, SettlementOutcome::REJECTED_DISCARD)).await.unwrap();

    let dead = dead_letters(&mut connection, &inbox, 1).await;
    let fields = &dead.ids[0].map;
    assert!(text(fields, "error").contains("REJECTED_DISCARD"), "{fields:?}");
    assert_eq!(text(fields, "field:payload"), "refuse me");
    assert_eq!(text(fields, "field:id"), format!("{:032x}", 7));
    settled(&mut connection, &inbox).await;
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    clean(&mut connection, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_requeued_past_max_attempts_becomes_a_dead_letter() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let prefix = unique_prefix();
    let mut connection = raw().await;
    let receiver =
        open("receiver", &format!("prefix = \"{prefix}\"\nmax_attempts = 3\nblock_ms = 100\n")).await;
    let inbox = receiver.info().local_address.clone();
    // Message 1 is requeued at every delivery: 3 of them, then it goes to the dead letters.
    // Message 2 is accepted whenever it comes.
    let (deliveries_of_1, deliveries_of_2) =
        comms_plugin_api::testing::deliveries_of_a_message_always_requeued(
            &receiver,
            ("receiver", &inbox),
            3,
            Duration::from_millis(1500),
        )
        .await
        .unwrap();
    assert_eq!(deliveries_of_1, 3, "message 1: max_attempts deliveries, then none");
    assert_eq!(deliveries_of_2, 1, "message 2 is not held up by message 1");
    let dead = dead_letters(&mut connection, &inbox, 1).await;
    let fields = &dead.ids[0].map;
    assert_eq!(text(fields, "error"), comms_plugin_api::inbound::MAX_ATTEMPTS_REASON);
    assert_eq!(text(fields, "field:id"), format!("{:032x}", 1));
    settled(&mut connection, &inbox).await;
    receiver.close().await.unwrap();
    clean(&mut connection, &prefix).await;
}

/// With `requeue_delay_ms`, an entry the receiver requeues comes again after its delay, doubled
/// at each delivery (Redis counts the deliveries of a pending entry), not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_entry_comes_again_after_its_delay_doubled_per_delivery() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let prefix = unique_prefix();
    let mut connection = raw().await;
    let config = format!("prefix = \"{prefix}\"\nrequeue_delay_ms = 300\nblock_ms = 100\n");
    let receiver = open("receiver", &config).await;
    let inbox = receiver.info().local_address.clone();
    let gaps = comms_plugin_api::testing::gaps_between_deliveries(
        &receiver,
        ("receiver", &inbox),
        3,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // At once (without the delay) would be a few milliseconds.
    assert!(gaps[0] >= Duration::from_millis(300), "after the 1st delivery: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(600), "after the 2nd, doubled: {gaps:?}");
    settled(&mut connection, &inbox).await;
    receiver.close().await.unwrap();
    clean(&mut connection, &prefix).await;
}

/// A requeue delay longer than `claim_idle_ms`: the held entry stays pending under its consumer
/// all that time, and no claim pass delivers it before its delay is over: neither its own
/// consumer's nor that of another instance of the same node (which claims entries idle past
/// `claim_idle_ms`, as those of a crashed instance are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_held_longer_than_claim_idle_ms_is_not_claimed_before_its_delay() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let prefix = unique_prefix();
    let mut connection = raw().await;
    let config =
        format!("prefix = \"{prefix}\"\nrequeue_delay_ms = 2500\nclaim_idle_ms = 600\nblock_ms = 100\n");
    let first = open("receiver", &config).await;
    let inbox = first.info().local_address.clone();
    let node = NodeId::new("receiver");
    let envelope =
        Envelope::new(MessageId::from_u128(1), node.clone(), Destination::node(node), Payload::from(vec![1]));
    first.send(&inbox, envelope).await.unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(10), first.receive(1)).await.unwrap().unwrap();
    first.settle(settle_all(&taken, SettlementOutcome::REJECTED_REQUEUE)).await.unwrap();
    let requeued = Instant::now();
    // Another instance of the same node: same inbox, same group, claim passes every 300 ms.
    let second = open("receiver", &config).await;
    let (again, holder) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            again = first.receive(1) => (again.unwrap(), &first),
            again = second.receive(1) => (again.unwrap(), &second),
        }
    })
    .await
    .expect("the requeued entry comes again");
    let waited = requeued.elapsed();
    assert_eq!(again[0].envelope.id, MessageId::from_u128(1));
    assert!(waited >= Duration::from_millis(2500), "claimed before its delay: after {waited:?}");
    holder.settle(settle_all(&again, SettlementOutcome::ACCEPTED)).await.unwrap();
    settled(&mut connection, &inbox).await;
    first.close().await.unwrap();
    second.close().await.unwrap();
    clean(&mut connection, &prefix).await;
}

/// An entry held for its requeue delay keeps its place in `max_unsettled` (as an AMQP message
/// held unacknowledged keeps its prefetch slot), so the entries held at once are bounded: with
/// `max_unsettled = 2` and both requeued, the third entry waits until the first two come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_for_their_delay_count_against_max_unsettled() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let prefix = unique_prefix();
    let mut connection = raw().await;
    let config = format!(
        "prefix = \"{prefix}\"\nrequeue_delay_ms = 1500\nmax_unsettled = 2\nread_batch = 2\nblock_ms = 100\n"
    );
    let receiver = open("receiver", &config).await;
    let inbox = receiver.info().local_address.clone();
    let node = NodeId::new("receiver");
    for n in 1..=3u8 {
        let to = Destination::node(node.clone());
        let envelope =
            Envelope::new(MessageId::from_u128(n.into()), node.clone(), to, Payload::from(vec![n]));
        receiver.send(&inbox, envelope).await.unwrap();
    }
    let mut first = Vec::new();
    while first.len() < 2 {
        first.extend(
            tokio::time::timeout(Duration::from_secs(10), receiver.receive(2)).await.unwrap().unwrap(),
        );
    }
    receiver.settle(settle_all(&first, SettlementOutcome::REJECTED_REQUEUE)).await.unwrap();
    let requeued = Instant::now();
    // Counted apart, and still unsettled (they keep their permits).
    assert_eq!(counter(&receiver, "redis.held"), 2);
    assert_eq!(counter(&receiver, "redis.unsettled"), 2);
    // Both permits are kept by the held entries: entry 3 is not read meanwhile.
    let early = tokio::time::timeout(Duration::from_millis(1000), receiver.receive(2)).await;
    assert!(early.is_err(), "delivered while two entries were held with max_unsettled = 2: {early:?}");
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let batch =
            tokio::time::timeout(Duration::from_secs(10), receiver.receive(2)).await.unwrap().unwrap();
        if ids.is_empty() {
            assert!(
                requeued.elapsed() >= Duration::from_millis(1500),
                "before the delay: {:?}",
                requeued.elapsed()
            );
        }
        ids.extend(batch.iter().map(|inbound| inbound.envelope.id));
        receiver.settle(settle_all(&batch, SettlementOutcome::ACCEPTED)).await.unwrap();
    }
    ids.sort();
    assert_eq!(ids, (1..=3).map(MessageId::from_u128).collect::<Vec<_>>());
    assert_eq!((counter(&receiver, "redis.held"), counter(&receiver, "redis.unsettled")), (0, 0));
    settled(&mut connection, &inbox).await;
    receiver.close().await.unwrap();
    clean(&mut connection, &prefix).await;
}

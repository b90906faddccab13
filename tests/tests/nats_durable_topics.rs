//! Durable topics of the NATS transport (`durable_topics = true`), against the NATS server at
//! 127.0.0.1:4222: publications go through the topic stream `<stream>-topics` (interest
//! retention) and each subscription is a durable pull consumer `<node>_<fnv64(pattern)>`.
//!
//! - a subscriber that was away gets, when it subscribes again with the same node id, everything
//!   published meanwhile (a core NATS subscriber that was away gets none of it);
//! - a message requeued, or held when the transport closed, or held by a process killed with
//!   SIGKILL, comes again; an accepted one never does;
//! - `unsubscribe` deletes the consumer (also one made in an earlier run), and nothing published
//!   while unsubscribed is kept for a later subscription; `close` keeps it;
//! - a core NATS node and a durable node on one prefix both get each other's publications;
//! - wildcard patterns (`*`, `>`) are durable;
//! - the server deletes an abandoned consumer after `topic_inactive_threshold_ms`, never a
//!   running node's;
//! - a server without JetStream is a clear error; the conformance suite passes with durable
//!   topics on.
//!
//! "Nothing more comes" is checked on the server, not by waiting: once the consumer has no
//! message pending and none awaiting an acknowledgement, the server has nothing to deliver again.
//! Each test has a stream and prefix of its own, deleted at the end (with the topic stream).

#[path = "support/nats.rs"]
mod support;

use async_nats::jetstream::{self, consumer::Info};
use comms_host::conformance::{cases, run_suite, SuiteConfig};
use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, ErrorCode, Inbound, MessageId, NodeId, Payload, Settlement, SettlementOutcome,
};
use comms_tests::{
    artifacts, broker_available,
    child_process::{self, read_marked, var, MARK},
    scratch_dir, NATS,
};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};
use support::{Deployment, OwnNats};

/// Short enough that a redelivery after `ack_wait_ms` happens within a test.
const ACK_WAIT_MS: u64 = 2000;

/// A durable-topics transport table for `deployment`.
fn durable(deployment: &Deployment) -> String {
    deployment.transport_config(&format!(
        "durable_topics = true\nack_wait_ms = {ACK_WAIT_MS}\nfetch_expires_ms = 500\n"
    ))
}

/// A transport table of the same deployment without durable topics (core NATS topics).
fn core(deployment: &Deployment) -> String {
    deployment.transport_config(&format!("ack_wait_ms = {ACK_WAIT_MS}\nfetch_expires_ms = 500\n"))
}

fn library() -> PluginLibrary {
    PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"))
}

async fn open(library: &PluginLibrary, node: &str, config: &str) -> LoadedTransport {
    library.new_transport(&NodeId::new(node), "nats", config).await.unwrap_or_else(|error| panic!("{error}"))
}

/// A publication to `topic` whose id is `n + 1` and whose payload is `n`.
fn publication(topic: &str, n: u32) -> Envelope {
    Envelope::new(
        MessageId::from_u128(u128::from(n) + 1),
        NodeId::new("publisher"),
        Destination::topic(topic),
        Payload::from(n.to_be_bytes().to_vec()),
    )
}

fn number(inbound: &Inbound) -> u32 {
    u32::from_be_bytes(inbound.envelope.payload.as_slice().try_into().expect("a 4-byte payload"))
}

async fn publish(publisher: &LoadedTransport, topic: &str, numbers: impl IntoIterator<Item = u32>) {
    for n in numbers {
        // An empty address: a topic message. Returns once the topic stream stored it.
        publisher
            .send("", publication(topic, n))
            .await
            .unwrap_or_else(|error| panic!("publish {n}: {error}"));
    }
}

/// Receives until `count` messages arrived (or 15 s passed), settling none of them.
async fn take(transport: &LoadedTransport, count: usize) -> Vec<Inbound> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut taken = Vec::new();
    while taken.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, transport.receive(64)).await {
            Ok(batch) => taken.extend(batch.expect("receive")),
            Err(_) => break,
        }
    }
    taken
}

async fn settle(transport: &LoadedTransport, inbounds: &[Inbound], outcome: SettlementOutcome) {
    let settlements =
        inbounds.iter().map(|inbound| Settlement { delivery_tag: inbound.delivery_tag, outcome }).collect();
    transport.settle(settlements).await.expect("settle");
}

fn numbers(inbounds: &[Inbound]) -> Vec<u32> {
    inbounds.iter().map(number).collect()
}

/// The documented consumer name of `node`'s subscription to `pattern` (node ids of plain
/// letters, digits, `-` and `_` only): `<node>_<FNV-1a 64 of the pattern, 16 hex digits>`.
fn consumer_name(node: &str, pattern: &str) -> String {
    let hash = pattern.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{node}_{hash:016x}")
}

/// A JetStream client of the test's own, to look at the topic stream and its consumers.
async fn inspector() -> jetstream::Context {
    jetstream::new(async_nats::connect(NATS).await.expect("connect to NATS"))
}

fn topics_stream(deployment: &Deployment) -> String {
    format!("{}-topics", deployment.stream)
}

/// The consumer `name` of the topic stream, or `None` if it does not exist.
async fn consumer(js: &jetstream::Context, deployment: &Deployment, name: &str) -> Option<Info> {
    let stream = js.get_stream(topics_stream(deployment)).await.expect("the topic stream exists");
    stream.consumer_info(name).await.ok()
}

/// Messages in the topic stream.
async fn stored(js: &jetstream::Context, deployment: &Deployment) -> u64 {
    let mut stream = js.get_stream(topics_stream(deployment)).await.expect("the topic stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// Waits (at most 10 s) until the server has nothing left to deliver to the consumer `name`:
/// nothing pending, nothing awaiting an acknowledgement. Then nothing can come again.
async fn drained(js: &jetstream::Context, deployment: &Deployment, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer(js, deployment, name).await.unwrap_or_else(|| panic!("consumer {name} exists"));
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "consumer {name}: {} pending, {} awaiting acknowledgement after 10 s",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscriber_that_was_away_gets_everything_published_meanwhile() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_away");
    let library = library();
    let js = inspector().await;
    let pattern = "news.>";

    // Both subscribers subscribe once, then go away.
    let subscriber = open(&library, "away", &durable(&deployment)).await;
    subscriber.subscribe(pattern).await.unwrap();
    subscriber.close().await.unwrap();
    let core_subscriber = open(&library, "core-away", &core(&deployment)).await;
    core_subscriber.subscribe(pattern).await.unwrap();
    core_subscriber.close().await.unwrap();
    assert!(
        consumer(&js, &deployment, &consumer_name("away", pattern)).await.is_some(),
        "close keeps the durable consumer"
    );

    let publisher = open(&library, "publisher", &durable(&deployment)).await;
    publish(&publisher, "news.eu", 0..20).await;
    assert_eq!(stored(&js, &deployment).await, 20, "kept for the subscription of the node that is away");

    // Back, with the same node id: everything, in order.
    let subscriber = open(&library, "away", &durable(&deployment)).await;
    subscriber.subscribe(pattern).await.unwrap();
    let got = take(&subscriber, 20).await;
    assert_eq!(numbers(&got), (0..20).collect::<Vec<_>>(), "every publication, once, in order");
    assert!(got.iter().all(|inbound| inbound.envelope.to == Destination::topic("news.eu")));
    settle(&subscriber, &got, SettlementOutcome::ACCEPTED).await;
    drained(&js, &deployment, &consumer_name("away", pattern)).await;
    // Interest retention: acknowledged by the only subscription, so no longer kept.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(&js, &deployment).await > 0 {
        assert!(Instant::now() < deadline, "acknowledged messages still in the topic stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The contrast: the core NATS subscriber that was away got none of them. The first thing it
    // receives after subscribing again is what is published after that.
    let core_subscriber = open(&library, "core-away", &core(&deployment)).await;
    core_subscriber.subscribe(pattern).await.unwrap();
    publish(&publisher, "news.eu", [100]).await;
    let got = take(&core_subscriber, 1).await;
    assert_eq!(numbers(&got), [100], "a core NATS subscriber keeps nothing while it is away");
    // The durable subscriber gets the new one too.
    let got = take(&subscriber, 1).await;
    assert_eq!(numbers(&got), [100]);
    settle(&subscriber, &got, SettlementOutcome::ACCEPTED).await;
    for transport in [&publisher, &subscriber, &core_subscriber] {
        transport.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_durable_topic_messages_come_again_and_acknowledged_ones_do_not() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_redelivery");
    let library = library();
    let js = inspector().await;
    let pattern = "jobs.*";
    let name = consumer_name("worker", pattern);
    let publisher = open(&library, "publisher", &durable(&deployment)).await;
    let worker = open(&library, "worker", &durable(&deployment)).await;
    worker.subscribe(pattern).await.unwrap();
    publish(&publisher, "jobs.a", 0..6).await;

    // 0 and 1 accepted, 2 and 3 requeued, 4 and 5 held.
    let first = take(&worker, 6).await;
    assert_eq!(numbers(&first), [0, 1, 2, 3, 4, 5]);
    assert!(
        first.iter().all(|inbound| inbound.delivery_tag & (1 << 63) == 0),
        "durable topic messages carry acknowledgeable tags"
    );
    settle(&worker, &first[0..2], SettlementOutcome::ACCEPTED).await;
    settle(&worker, &first[2..4], SettlementOutcome::REJECTED_REQUEUE).await;
    let again = take(&worker, 2).await;
    assert_eq!(numbers(&again), [2, 3], "a requeued message comes again at once");
    assert!(again.iter().all(|inbound| inbound.envelope.id == first[number(inbound) as usize].envelope.id));
    let counters = worker.stats().transport.counters;
    assert!(
        counters.contains(&("nats.unsettled".to_string(), 4)),
        "2 and 3 again, 4 and 5 held: {counters:?}"
    );

    // Closed with 2, 3, 4 and 5 unsettled: handed back, the next instance gets them (once the
    // closed one's last pull request expired: within fetch_expires_ms, not ack_wait_ms).
    worker.close().await.unwrap();
    let worker = open(&library, "worker", &durable(&deployment)).await;
    worker.subscribe(pattern).await.unwrap();
    let mut back = take(&worker, 4).await;
    back.sort_by_key(number);
    assert_eq!(numbers(&back), [2, 3, 4, 5], "what the closed instance held, and not what it accepted");
    settle(&worker, &back, SettlementOutcome::ACCEPTED).await;
    // Nothing left to deliver: 0 and 1 (accepted before) never come again.
    drained(&js, &deployment, &name).await;

    // Still a live subscription: the next publication is the next (and only) delivery.
    publish(&publisher, "jobs.b", [6]).await;
    let next = take(&worker, 1).await;
    assert_eq!(numbers(&next), [6]);
    settle(&worker, &next, SettlementOutcome::ACCEPTED).await;
    drained(&js, &deployment, &name).await;
    publisher.close().await.unwrap();
    worker.close().await.unwrap();
}

const ROLE: &str = "COMMS_NATS_DURABLE_TOPICS_ROLE";

/// The child side: does nothing in a normal test run. Subscribes as `victim`, takes what is
/// there, reports it and waits to be killed without settling.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else { return };
    assert_eq!(role, "take-and-hang", "unknown child role");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let transport = open(&library(), "victim", &var("CONFIG")).await;
        transport.subscribe(&var("PATTERN")).await.unwrap();
        let taken = take(&transport, var("COUNT").parse().unwrap()).await;
        let numbers: Vec<String> = numbers(&taken).iter().map(u32::to_string).collect();
        println!("{MARK}took {}", numbers.join(","));
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topic_messages_held_by_a_killed_process_come_again_after_ack_wait() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_killed");
    let library = library();
    let pattern = "events.>";
    let config = durable(&deployment);
    // The subscription exists before anything is published.
    let victim = open(&library, "victim", &config).await;
    victim.subscribe(pattern).await.unwrap();
    victim.close().await.unwrap();
    let publisher = open(&library, "publisher", &config).await;
    publish(&publisher, "events.created", 0..10).await;

    let mut child = child_process::spawn(
        ROLE,
        "take-and-hang",
        &[("CONFIG", config.clone()), ("PATTERN", pattern.to_string()), ("COUNT", "10".to_string())],
    );
    let lines = read_marked(&mut child, |line| line.starts_with("took "));
    let took = lines.last().and_then(|line| line.strip_prefix("took ")).expect("the child took messages");
    assert_eq!(took, "0,1,2,3,4,5,6,7,8,9", "the child took every message");
    child.kill().unwrap(); // SIGKILL: no close, no settlement, no negative acknowledgement.
    child.wait().unwrap();
    let killed = Instant::now();

    let successor = open(&library, "victim", &config).await;
    successor.subscribe(pattern).await.unwrap();
    let mut arrival = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrival.len() < 10 && Instant::now() < deadline {
        let got = take(&successor, 10 - arrival.len()).await;
        for inbound in &got {
            arrival.entry(number(inbound)).or_insert(killed.elapsed());
        }
        settle(&successor, &got, SettlementOutcome::ACCEPTED).await;
    }
    assert_eq!(
        arrival.keys().copied().collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>(),
        "every message came again"
    );
    let earliest = arrival.values().min().copied().unwrap_or_default();
    // The server's clock started when the child took them, before the kill.
    assert!(
        earliest >= Duration::from_millis(ACK_WAIT_MS / 2),
        "a message the killed process held came again {earliest:?} after the kill, before ack_wait_ms"
    );
    drained(&inspector().await, &deployment, &consumer_name("victim", pattern)).await;
    publisher.close().await.unwrap();
    successor.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_deletes_the_durable_consumer() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_unsubscribe");
    let library = library();
    let js = inspector().await;
    let pattern = "alerts.*";
    let name = consumer_name("quitter", pattern);
    let publisher = open(&library, "publisher", &durable(&deployment)).await;
    let quitter = open(&library, "quitter", &durable(&deployment)).await;
    quitter.subscribe(pattern).await.unwrap();
    let info = consumer(&js, &deployment, &name).await.expect("subscribe made the durable consumer");
    assert_eq!(info.config.filter_subject, format!("{}.topic.{pattern}", deployment.prefix));
    assert_eq!(info.config.ack_wait, Duration::from_millis(ACK_WAIT_MS));
    // The default `topic_inactive_threshold_ms`: the server removes it a day after its last pull.
    assert_eq!(info.config.inactive_threshold, Duration::from_secs(86_400));

    quitter.unsubscribe(pattern).await.unwrap();
    assert!(consumer(&js, &deployment, &name).await.is_none(), "unsubscribe deleted the consumer");
    quitter.unsubscribe(pattern).await.expect("unsubscribing again is not an error");
    // Nobody is interested any more: a publication is not kept.
    publish(&publisher, "alerts.fire", [0]).await;
    assert_eq!(stored(&js, &deployment).await, 0, "nothing kept without a subscription");

    // A later subscription is a new one: it starts with what is published after it.
    quitter.subscribe(pattern).await.unwrap();
    publish(&publisher, "alerts.flood", [1]).await;
    let got = take(&quitter, 1).await;
    assert_eq!(numbers(&got), [1], "what was published while unsubscribed is not delivered");
    settle(&quitter, &got, SettlementOutcome::ACCEPTED).await;
    drained(&js, &deployment, &name).await;

    // Unsubscribing also ends a subscription of an earlier run (the node gives it up for good).
    quitter.close().await.unwrap();
    assert!(consumer(&js, &deployment, &name).await.is_some(), "close keeps the consumer");
    let quitter = open(&library, "quitter", &durable(&deployment)).await;
    quitter.unsubscribe(pattern).await.unwrap();
    assert!(
        consumer(&js, &deployment, &name).await.is_none(),
        "unsubscribe deleted the earlier run's consumer"
    );
    publisher.close().await.unwrap();
    quitter.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deletes_the_consumer_when_its_last_subscription_ends_and_keeps_it_when_it_closes() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_node_unsubscribe");
    let js = inspector().await;
    let node = comms_host::Node::builder("leaver")
        .transport_library("nats", library(), &durable(&deployment))
        .build()
        .await
        .unwrap();
    let name = consumer_name("leaver", "alerts.>");
    let first = node.subscribe::<u32>("alerts.>").await.unwrap();
    let second = node.subscribe::<u32>("alerts.>").await.unwrap();
    assert!(consumer(&js, &deployment, &name).await.is_some(), "subscribing made the consumer");
    first.unsubscribe().await.unwrap();
    assert!(consumer(&js, &deployment, &name).await.is_some(), "another subscription still has the pattern");
    second.unsubscribe().await.unwrap();
    assert!(consumer(&js, &deployment, &name).await.is_none(), "the last subscription deleted the consumer");

    // Closing the node keeps a subscription's consumer: what is published meanwhile waits.
    let kept = node.subscribe::<u32>("alerts.>").await.unwrap();
    node.close().await.unwrap();
    drop(kept);
    let publisher = open(&library(), "publisher", &durable(&deployment)).await;
    publish(&publisher, "alerts.fire", [7]).await;
    assert!(consumer(&js, &deployment, &name).await.is_some(), "closing kept the consumer");
    assert_eq!(stored(&js, &deployment).await, 1, "the publication waits for the closed node");
    publisher.close().await.unwrap();
}

/// Through the `Node` API: the backlog kept for a node's subscription while it was away
/// reaches the application when it subscribes again. (The consumer starts delivering as soon as
/// the transport subscribes; the node must know the subscription by then, or it would take
/// those messages for nobody's and acknowledge them away.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_subscribes_again_gets_the_backlog_through_its_subscription() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_node_backlog");
    let build = || {
        comms_host::Node::builder("returner")
            .transport_library("nats", library(), &durable(&deployment))
            .build()
    };
    let node = build().await.unwrap();
    let subscription = node.subscribe::<u32>("news.>").await.unwrap();
    node.close().await.unwrap();
    drop(subscription);
    let publisher = open(&library(), "publisher", &durable(&deployment)).await;
    publish(&publisher, "news.today", 0..50).await;

    let node = build().await.unwrap();
    let mut subscription = node.subscribe::<u32>("news.>").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 50 {
        let next = tokio::time::timeout(Duration::from_secs(10), subscription.next_envelope())
            .await
            .unwrap_or_else(|_| panic!("only {} of the 50 kept messages came: {got:?}", got.len()))
            .expect("a message");
        got.push(u32::from_be_bytes(next.payload.as_slice().try_into().expect("4 bytes")));
    }
    assert_eq!(got, (0..50).collect::<Vec<_>>(), "the whole backlog, in order");
    node.close().await.unwrap();
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_and_durable_nodes_both_receive_each_others_publications() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_mixed");
    let library = library();
    let js = inspector().await;
    let pattern = "mixed.>";
    let durable_node = open(&library, "durable-node", &durable(&deployment)).await;
    let core_node = open(&library, "core-node", &core(&deployment)).await;
    durable_node.subscribe(pattern).await.unwrap();
    core_node.subscribe(pattern).await.unwrap();

    // From the durable node (JetStream publish), then from the core node (core NATS publish,
    // which the topic stream captures too).
    publish(&durable_node, "mixed.a", [0]).await;
    publish(&core_node, "mixed.b", [1]).await;
    for (node, transport) in [("durable", &durable_node), ("core", &core_node)] {
        let mut got = take(transport, 2).await;
        got.sort_by_key(number);
        assert_eq!(numbers(&got), [0, 1], "the {node} node got both publications");
        assert_eq!(got[0].envelope.to, Destination::topic("mixed.a"));
        assert_eq!(got[1].envelope.to, Destination::topic("mixed.b"));
        settle(transport, &got, SettlementOutcome::ACCEPTED).await;
    }
    // Each once: nothing more for the durable subscription.
    drained(&js, &deployment, &consumer_name("durable-node", pattern)).await;
    durable_node.close().await.unwrap();
    core_node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_patterns_are_durable() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_wildcards");
    let library = library();
    let js = inspector().await;
    let patterns = ["orders.*", "audit.>", "billing.eu"];
    let node = open(&library, "wild", &durable(&deployment)).await;
    for pattern in patterns {
        node.subscribe(pattern).await.unwrap();
    }
    node.close().await.unwrap();

    let publisher = open(&library, "publisher", &durable(&deployment)).await;
    let published = [
        ("orders.eu", true),
        ("orders.us.east", false),
        ("audit.login.failed", true),
        ("audit", false),
        ("billing.eu", true),
        ("billing.us", false),
    ];
    for (n, (topic, _)) in published.iter().enumerate() {
        publish(&publisher, topic, [n as u32]).await;
    }

    let node = open(&library, "wild", &durable(&deployment)).await;
    for pattern in patterns {
        node.subscribe(pattern).await.unwrap();
    }
    let wanted: Vec<u32> = (0..published.len() as u32).filter(|n| published[*n as usize].1).collect();
    let mut got = take(&node, wanted.len()).await;
    got.sort_by_key(number);
    assert_eq!(numbers(&got), wanted, "what matches the patterns, kept while the node was away");
    for inbound in &got {
        assert_eq!(inbound.envelope.to, Destination::topic(published[number(inbound) as usize].0));
    }
    settle(&node, &got, SettlementOutcome::ACCEPTED).await;
    // Nothing else for any of the subscriptions, and nothing left in the stream.
    for pattern in patterns {
        drained(&js, &deployment, &consumer_name("wild", pattern)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(&js, &deployment).await > 0 {
        assert!(
            Instant::now() < deadline,
            "messages left in the topic stream after every subscription accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publisher.close().await.unwrap();
    node.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topics_on_a_server_without_jetstream_is_a_clear_error() {
    let dir = scratch_dir("nats-no-jetstream");
    // The helper starts servers with `-js`; a later `-js=false` turns JetStream off again.
    let Some(server) = OwnNats::start_with(&dir, &["-js=false"]) else { return };
    let config = format!("url = \"{}\"\ndurable_topics = true\nconnect_attempts = 1\n", server.url());
    let error = library()
        .new_transport(&NodeId::new("no-js"), "nats", &config)
        .await
        .map(drop)
        .expect_err("no JetStream");
    assert_eq!(error.code, ErrorCode::UNSUPPORTED, "{error}");
    assert!(error.message.contains("JetStream"), "{error}");
    assert!(error.message.contains("`durable_topics = true`"), "the error names the key: {error}");
    assert!(error.message.contains(&server.url()), "the error names the server: {error}");
}

#[tokio::test]
async fn durable_topic_keys_are_checked_by_name() {
    let library = library();
    let cases = [
        ("durable_topics = true\ntopic_max_bytes = 10\n", "topic_max_bytes"),
        ("durable_topics = true\ntopic_max_age_ms = 0\n", "topic_max_age_ms"),
        ("durable_topics = true\ntopic_inactive_threshold_ms = 100\n", "topic_inactive_threshold_ms"),
        ("durable_topics = \"yes\"\n", "durable_topics"),
    ];
    for (config, key) in cases {
        // Checked before any connection: no server needed.
        let error = library
            .new_transport(
                &NodeId::new("bad-config"),
                "nats",
                &format!("url = \"nats://127.0.0.1:1\"\n{config}"),
            )
            .await
            .map(drop)
            .expect_err(config);
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{config}: {error}");
        assert!(error.message.contains(key), "{config}: the error names `{key}`: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_with_durable_topics() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_conformance");
    let config =
        deployment.transport_config("durable_topics = true\nack_wait_ms = 2000\nfetch_expires_ms = 1000\n");
    let report = run_suite(&library(), &SuiteConfig::new(config)).await;
    print!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    assert_eq!(report.skipped_names(), ["encrypted_links"], "no other case may be skipped: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_subscription_is_deleted_after_the_inactive_threshold_and_a_live_one_is_not() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "durable_inactive");
    let library = library();
    let js = inspector().await;
    let config = deployment.transport_config(
        "durable_topics = true\nfetch_expires_ms = 200\ntopic_inactive_threshold_ms = 1000\n",
    );
    let pattern = "status.>";
    let live = open(&library, "live", &config).await;
    live.subscribe(pattern).await.unwrap();
    let gone = open(&library, "gone", &config).await;
    gone.subscribe(pattern).await.unwrap();
    gone.close().await.unwrap();

    // Nobody pulls from `gone`'s consumer any more: the server deletes it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while consumer(&js, &deployment, &consumer_name("gone", pattern)).await.is_some() {
        assert!(Instant::now() < deadline, "the abandoned consumer was not deleted 15 s after its last pull");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The running node pulled all along: its consumer is there, and works.
    assert!(
        consumer(&js, &deployment, &consumer_name("live", pattern)).await.is_some(),
        "a live consumer was deleted"
    );
    publish(&live, "status.up", [7]).await;
    let got = take(&live, 1).await;
    assert_eq!(numbers(&got), [7]);
    settle(&live, &got, SettlementOutcome::ACCEPTED).await;
    live.close().await.unwrap();
}

//! Publish / subscribe with topic patterns, over TCP and over the in-memory transport: the host
//! fans out to the subscribers it learned of through heartbeats.

use comms_host::{Node, PluginLibrary, Subscription};
use comms_tests::artifacts;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderEvent {
    order: u32,
    kind: String,
}

const WAIT: Duration = Duration::from_secs(10);

/// Builds `ids` as nodes that all know each other, over `plugin`.
async fn mesh(plugin: &PluginLibrary, config: impl Fn(&str) -> String, ids: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for id in ids {
        let mut builder = Node::builder(*id)
            .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
            .transport_library("wire", plugin.clone(), &config(id));
        for earlier in &nodes {
            let address = earlier.transports()[0].local_address.clone();
            builder = builder.static_peer(earlier.id().as_str(), [("wire", address.as_str())]);
        }
        nodes.push(builder.build().await.unwrap());
    }
    nodes
}

async fn next(subscription: &mut Subscription<OrderEvent>) -> OrderEvent {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap()
        .message
}

async fn nothing_more(subscription: &mut Subscription<OrderEvent>) {
    let more = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
    assert!(more.is_err(), "{} got a message it did not subscribe to", subscription.pattern());
}

/// Waits until `publisher` knows every pattern of `expected` subscribers.
async fn until_known(publisher: &Node, subscribers: usize) {
    let started = tokio::time::Instant::now();
    while publisher.peers().iter().filter(|p| !p.record.topics.is_empty()).count() < subscribers {
        assert!(
            started.elapsed() < WAIT,
            "subscriptions never reached the publisher: {:?}",
            publisher.peers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn patterns_route_and_isolate(plugin: PluginLibrary, config: impl Fn(&str) -> String) {
    let nodes = mesh(&plugin, config, &["publisher", "created", "everything", "payments"]).await;
    let (publisher, created, everything, payments) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    let mut created_sub = created.subscribe::<OrderEvent>("orders.*.created").await.unwrap();
    let mut everything_sub = everything.subscribe::<OrderEvent>("orders.>").await.unwrap();
    let mut payments_sub = payments.subscribe::<OrderEvent>("payments.>").await.unwrap();
    let mut local_sub = publisher.subscribe::<OrderEvent>("orders.eu.*").await.unwrap();
    until_known(publisher, 3).await;

    for order in 0..20 {
        let event = OrderEvent { order, kind: "created".into() };
        let delivered = publisher.publish("orders.eu.created", &event).await.unwrap();
        assert_eq!(delivered, 3, "two remote subscribers and this node's own");
        publisher.publish("orders.eu.shipped", &OrderEvent { order, kind: "shipped".into() }).await.unwrap();
    }
    for order in 0..20 {
        assert_eq!(next(&mut created_sub).await, OrderEvent { order, kind: "created".into() });
        assert_eq!(next(&mut everything_sub).await, OrderEvent { order, kind: "created".into() });
        assert_eq!(next(&mut everything_sub).await, OrderEvent { order, kind: "shipped".into() });
        assert_eq!(next(&mut local_sub).await, OrderEvent { order, kind: "created".into() });
        assert_eq!(next(&mut local_sub).await, OrderEvent { order, kind: "shipped".into() });
    }
    nothing_more(&mut created_sub).await;
    nothing_more(&mut payments_sub).await;

    // Unsubscribing (dropping) is announced: the publisher stops sending there.
    drop(created_sub);
    let started = tokio::time::Instant::now();
    while publisher.peers().iter().any(|p| p.record.id.as_str() == "created" && !p.record.topics.is_empty()) {
        assert!(started.elapsed() < WAIT, "the unsubscription never reached the publisher");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered =
        publisher.publish("orders.us.created", &OrderEvent { order: 99, kind: "created".into() }).await;
    assert_eq!(delivered.unwrap(), 1, "only `orders.>` is left remotely");

    assert!(publisher.publish("orders.*", &0u8).await.is_err(), "wildcards are for subscriptions");
    assert!(publisher.subscribe::<u8>("orders..x").await.is_err());
    for node in nodes {
        node.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_patterns_over_tcp() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    patterns_route_and_isolate(tcp, |_| String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_patterns_over_memory() {
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    patterns_route_and_isolate(memory, |id| format!("address = \"memory://pubsub-{id}\"")).await;
}

#[tokio::test]
async fn subscriptions_end_when_the_node_closes() {
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    let node = Node::builder("ends").transport_library("wire", memory, "").build().await.unwrap();
    let mut subscription = node.subscribe::<OrderEvent>("a.>").await.unwrap();
    node.publish("a.b", &OrderEvent { order: 1, kind: "x".into() }).await.unwrap();
    node.close().await.unwrap();
    assert_eq!(next(&mut subscription).await.order, 1, "what arrived before close is still handed out");
    let end =
        tokio::time::timeout(WAIT, subscription.next()).await.expect("the stream ends, it does not hang");
    assert!(end.is_none());
}

//! Whole nodes over Redis: the redis transport and the redis discovery together, loaded as
//! `libcomms_redis.so`. Request / response, point to point, native topics, join and leave.
//! Every test uses its own key prefix and deletes its keys at the end.

use comms_host::{Node, PeerStatus, PluginLibrary, Received};
use comms_tests::{artifacts, broker_available};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const REDIS: &str = "127.0.0.1:6379";
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Event {
    n: u32,
    topic: String,
}

fn prefix(test: &str) -> String {
    format!("comms-test-{}-{:06x}-{test}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

async fn node(library: &PluginLibrary, id: &str, prefix: &str) -> Node {
    let transport = format!("prefix = \"{prefix}\"\nblock_ms = 200\n");
    let discovery =
        format!("prefix = \"{prefix}\"\nttl_ms = 1500\nheartbeat_ms = 200\nscan_interval_ms = 200\n");
    Node::builder(id)
        .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
        .transport_library("redis", library.clone(), &transport)
        .discovery_library(library.clone(), &discovery)
        .build()
        .await
        .unwrap_or_else(|error| panic!("node {id}: {error}"))
}

async fn next(subscription: &mut comms_host::Subscription<Event>) -> Event {
    let mut received =
        tokio::time::timeout(WAIT, subscription.next()).await.expect("a topic message").unwrap().unwrap();
    received.ack();
    received.message
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    let started = tokio::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "{what} did not happen within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_call_send_and_publish_over_redis() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let prefix = prefix("nodes");
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    let server = node(&library, "server", &prefix).await;
    let client = node(&library, "client", &prefix).await;

    // Discovery: the client learns of the server's service through Redis.
    server
        .serve("math.add", |request: Received<Add>| async move {
            Ok::<_, String>(request.message.a + request.message.b)
        })
        .await
        .unwrap();
    until("the client learning of math.add", || {
        client.peers().iter().any(|peer| peer.record.services.iter().any(|s| s == "math.add"))
    })
    .await;

    // Request / response: the response comes back to the client's own inbox stream.
    for a in 0..20 {
        let sum: i64 =
            tokio::time::timeout(WAIT, client.request("math.add", &Add { a, b: 1 })).await.unwrap().unwrap();
        assert_eq!(sum, a + 1);
    }

    // Point to point.
    for n in 0..50 {
        client.send("server", &Event { n, topic: "direct".into() }).await.unwrap();
    }
    for n in 0..50 {
        let mut received = tokio::time::timeout(WAIT, server.receive::<Event>()).await.unwrap().unwrap();
        assert!(received.needs_acknowledgement(), "a Redis inbox entry waits for the application");
        received.ack();
        assert!(!received.needs_acknowledgement());
        assert_eq!(received.message, Event { n, topic: "direct".into() }, "in order, none lost");
        assert_eq!(received.from.as_str(), "client");
    }

    // Native topics: patterns map onto Redis channel patterns, exact comms semantics.
    let mut one_segment = server.subscribe::<Event>("orders.*").await.unwrap();
    let mut everything = client.subscribe::<Event>("orders.>").await.unwrap();
    for (n, topic) in ["orders.eu", "orders.eu.created", "payments.eu"].iter().enumerate() {
        client.publish(topic, &Event { n: n as u32, topic: topic.to_string() }).await.unwrap();
    }
    assert_eq!(next(&mut one_segment).await.topic, "orders.eu");
    assert_eq!(next(&mut everything).await.topic, "orders.eu");
    assert_eq!(next(&mut everything).await.topic, "orders.eu.created");
    let more = tokio::time::timeout(Duration::from_millis(300), one_segment.next()).await;
    assert!(more.is_err(), "`orders.*` got a message of another topic: {more:?}");
    let more = tokio::time::timeout(Duration::from_millis(300), everything.next()).await;
    assert!(more.is_err(), "`orders.>` got a message of another topic: {more:?}");

    // Leave: the server closes cleanly, and since its inbox stream keeps what is sent to it, it
    // leaves an offline record: peers see it go offline and can still send to it (before, its
    // record was withdrawn and a send failed with "unknown peer").
    server.close().await.unwrap();
    let offline = |node: &Node| {
        node.peers()
            .iter()
            .any(|peer| peer.record.id.as_str() == "server" && peer.status == PeerStatus::Offline)
    };
    until("the client seeing the server go offline", || offline(&client)).await;
    client.send("server", &Event { n: 100, topic: "while away".into() }).await.unwrap();
    // A node started after the server left learns its offline record from discovery.
    let late = node(&library, "late", &prefix).await;
    until("a node started later seeing the offline server", || offline(&late)).await;
    late.send("server", &Event { n: 101, topic: "while away".into() }).await.unwrap();
    // The server comes back to both.
    let server = node(&library, "server", &prefix).await;
    let mut back = Vec::new();
    for _ in 0..2 {
        let mut received = tokio::time::timeout(WAIT, server.receive::<Event>()).await.unwrap().unwrap();
        received.ack();
        back.push((received.from.to_string(), received.message.n));
    }
    back.sort();
    assert_eq!(back, vec![("client".to_string(), 100), ("late".to_string(), 101)]);
    until("the client seeing the server up again", || {
        client.peers().iter().any(|peer| peer.record.id.as_str() == "server" && peer.status == PeerStatus::Up)
    })
    .await;
    server.close().await.unwrap();
    late.close().await.unwrap();
    client.close().await.unwrap();
    comms_tests::delete_redis_keys(&prefix).await;
}

//! Nodes on the AMQP plugin (transport and discovery both), on the RabbitMQ of this machine:
//! they find each other through the fanout exchange, call services, publish and subscribe
//! through the topic exchange, and see a peer leave.

use comms_host::{Node, PluginLibrary, Received, Subscription};
use comms_plugin_api::PeerEventKind;
use comms_tests::{artifacts, broker_available};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u32,
    region: String,
}

fn library() -> PluginLibrary {
    PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"))
}

/// Node ids unique to this run, so that runs do not see each other's leftovers.
fn unique(name: &str) -> String {
    format!("amqp-test-{}-{name}", std::process::id())
}

async fn node(id: &str, library: &PluginLibrary) -> Node {
    Node::builder(id)
        .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
        .transport_library("amqp", library.clone(), "inbox_expires_ms = 60000")
        .discovery_library(library.clone(), "heartbeat_interval_ms = 200")
        .build()
        .await
        .unwrap_or_else(|error| panic!("building node {id}: {error}"))
}

async fn next(subscription: &mut Subscription<Order>) -> Order {
    match tokio::time::timeout(Duration::from_secs(10), subscription.next()).await {
        Ok(Some(Ok(mut received))) => {
            received.ack();
            received.message
        }
        other => panic!("expected a published message, got {other:?}"),
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what} did not happen within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_discover_each_other_call_services_and_publish_through_the_broker() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let library = library();
    let (server_id, client_id) = (unique("server"), unique("client"));
    let server = node(&server_id, &library).await;
    let client = node(&client_id, &library).await;
    let mut events = Box::pin(client.peer_events());

    server
        .serve("orders.count", |request: Received<Vec<Order>>| async move {
            Ok::<_, String>(request.message.len())
        })
        .await
        .unwrap();
    wait_until("the client learning the server's service", || {
        client.peers().iter().any(|p| p.record.id.as_str() == server_id && !p.record.services.is_empty())
    })
    .await;
    let orders = vec![Order { id: 1, region: "eu".into() }, Order { id: 2, region: "us".into() }];
    let count: usize = client.request("orders.count", &orders).await.unwrap();
    assert_eq!(count, 2);

    // Point to point, both ways.
    client.send(server_id.as_str(), &orders[0]).await.unwrap();
    let mut received: Received<Order> = server.receive().await.unwrap();
    received.ack();
    assert_eq!((&received.message, received.from.as_str()), (&orders[0], client_id.as_str()));

    // Topics through the topic exchange: `>` and `*` patterns, each message once per node.
    let topic = |rest: &str| format!("{}.orders.{rest}", unique("t"));
    let mut everything = server.subscribe::<Order>(&topic(">")).await.unwrap();
    let mut eu_only = server.subscribe::<Order>(&topic("eu")).await.unwrap();
    client.publish(&topic("eu"), &orders[0]).await.unwrap();
    client.publish(&topic("us.east"), &orders[1]).await.unwrap();
    let first = next(&mut everything).await;
    let second = next(&mut everything).await;
    assert_eq!([first, second], [orders[0].clone(), orders[1].clone()]);
    assert_eq!(next(&mut eu_only).await, orders[0]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), eu_only.next()).await.is_err(),
        "`us.east` does not match the exact pattern"
    );

    // Leaving: the client sees the server go.
    server.close().await.unwrap();
    let left = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            if event.kind == PeerEventKind::Left && event.record.id.as_str() == server_id {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(left, Ok(true), "the client never saw the server leave");
    client.close().await.unwrap();
}

//! No cold start: a node that has just started learns the services and topics of the peers
//! discovery names within a round trip (its hello is answered with their records), not at their
//! next heartbeat; `request` waits for a replica on its first attempt; `wait_for_peer`,
//! `wait_for_service` and `wait_for_subscriber` let an application wait for what it needs.
//!
//! Every node here heartbeats once a minute, so a test that passes did not get its records from a
//! heartbeat.

use comms_host::{Node, PluginLibrary, Received, WaitError};
use comms_tests::artifacts;
use std::time::Duration;

/// Far longer than any test here runs: records come from hellos, never from heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(60);

async fn node(tcp: &PluginLibrary, id: &str, peers: &[(&str, &str)]) -> Node {
    let mut builder =
        Node::builder(id).liveness(Some(HEARTBEAT), HEARTBEAT * 3).transport_library("tcp", tcp.clone(), "");
    for (peer, address) in peers {
        builder = builder.static_peer(peer, [("tcp", *address)]);
    }
    builder.build().await.unwrap()
}

fn address(node: &Node) -> String {
    node.transports()[0].local_address.clone()
}

/// Defect: a client started after its server failed with "no live replica serves `echo`" until
/// the server's next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_just_started_calls_a_service_at_once() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let server = node(&tcp, "cold-server", &[]).await;
    server
        .serve("echo", |request: Received<String>| async move { Ok::<_, String>(request.message) })
        .await
        .unwrap();
    let client = node(&tcp, "cold-client", &[("cold-server", &address(&server))]).await;

    let answer: String = client.request("echo", "right away").await.unwrap();
    assert_eq!(answer, "right away");

    // The server learnt the client's record from its hello, with no heartbeat either.
    server.wait_for_peer("cold-client", Duration::from_secs(5)).await.unwrap();
    client.close().await.unwrap();
    server.close().await.unwrap();
}

/// Defect: `comms publish` right after start reached "0 subscriber node(s)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_just_started_reaches_the_subscribers_it_discovered() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let subscriber = node(&tcp, "cold-subscriber", &[]).await;
    let mut orders = subscriber.subscribe::<u32>("orders.>").await.unwrap();
    let publisher = node(&tcp, "cold-publisher", &[("cold-subscriber", &address(&subscriber))]).await;

    publisher.wait_for_subscriber("orders.eu.created", Duration::from_secs(5)).await.unwrap();
    let reached = publisher.publish("orders.eu.created", &7u32).await.unwrap();
    assert_eq!(reached, 1, "the subscriber met at start is reached");
    let received =
        tokio::time::timeout(Duration::from_secs(5), orders.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(received.message, 7);

    drop(orders);
    publisher.close().await.unwrap();
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_what_never_comes_ends_with_an_error_naming_it() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let lonely = node(&tcp, "cold-lonely", &[]).await;
    let wait = Duration::from_millis(200);

    let error = lonely.wait_for_peer("ghost", wait).await.unwrap_err();
    assert!(matches!(error, WaitError::TimedOut { .. }), "{error}");
    assert!(error.to_string().contains("peer `ghost`"), "{error}");
    let error = lonely.wait_for_service("nobody.serves.this", wait).await.unwrap_err();
    assert!(error.to_string().contains("a replica of `nobody.serves.this`"), "{error}");
    let error = lonely.wait_for_subscriber("nobody.listens", wait).await.unwrap_err();
    assert!(error.to_string().contains("a subscriber of `nobody.listens`"), "{error}");

    // What the node itself serves or subscribes to counts at once.
    lonely.serve("local", |r: Received<u8>| async move { Ok::<_, String>(r.message) }).await.unwrap();
    lonely.wait_for_service("local", wait).await.unwrap();
    let _subscription = lonely.subscribe::<u8>("here.*").await.unwrap();
    lonely.wait_for_subscriber("here.now", wait).await.unwrap();

    lonely.close().await.unwrap();
    let error = lonely.wait_for_peer("ghost", wait).await.unwrap_err();
    assert!(matches!(error, WaitError::Closed), "{error}");
}

/// A service that appears while a request waits for its first replica is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_replica_that_appears_meanwhile() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let server = node(&tcp, "late-server", &[]).await;
    let client = node(&tcp, "late-client", &[("late-server", &address(&server))]).await;
    client.wait_for_peer("late-server", Duration::from_secs(5)).await.unwrap();
    server.wait_for_peer("late-client", Duration::from_secs(5)).await.unwrap();

    let request = {
        let client = client.clone();
        tokio::spawn(async move { client.request::<_, String>("late.echo", "waited").await })
    };
    // Serving announces the new record to the peers the server knows, at once.
    server
        .serve("late.echo", |request: Received<String>| async move { Ok::<_, String>(request.message) })
        .await
        .unwrap();
    assert_eq!(request.await.unwrap().unwrap(), "waited");

    client.close().await.unwrap();
    server.close().await.unwrap();
}

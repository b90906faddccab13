//! Request / response: typed calls, remote errors versus timeouts, late responses, retries and
//! replicas, over TCP and the in-memory transport.

use comms_host::{Node, PluginLibrary, Received, RequestError, RequestOptions};
use comms_tests::artifacts;
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, time::Duration};

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sum {
    value: i64,
    served_by: String,
}

async fn pair(plugin: &PluginLibrary, config: &dyn Fn(&str) -> String) -> (Node, Node) {
    let server = Node::builder("server")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_library("wire", plugin.clone(), &config("server"))
        .build()
        .await
        .unwrap();
    let address = server.transports()[0].local_address.clone();
    let client = Node::builder("client")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_library("wire", plugin.clone(), &config("client"))
        .static_peer("server", [("wire", address.as_str())])
        .build()
        .await
        .unwrap();
    (server, client)
}

async fn wait_for_service(client: &Node, service: &str, replicas: usize) {
    let started = tokio::time::Instant::now();
    while client.peers().iter().filter(|p| p.record.services.iter().any(|s| s == service)).count() < replicas
    {
        assert!(started.elapsed() < Duration::from_secs(10), "service `{service}` never announced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn calls_errors_and_late_responses(plugin: PluginLibrary, config: &dyn Fn(&str) -> String) {
    let (server, client) = pair(&plugin, config).await;
    server
        .serve("math.add", |request: Received<Add>| async move {
            Ok::<_, String>(Sum { value: request.message.a + request.message.b, served_by: "server".into() })
        })
        .await
        .unwrap();
    server
        .serve("math.divide", |request: Received<Add>| async move {
            if request.message.b == 0 {
                Err("division by zero".to_string())
            } else {
                Ok(request.message.a / request.message.b)
            }
        })
        .await
        .unwrap();
    server
        .serve("slow", |request: Received<u64>| async move {
            tokio::time::sleep(Duration::from_millis(request.message)).await;
            Ok::<_, String>(request.message)
        })
        .await
        .unwrap();
    wait_for_service(&client, "slow", 1).await;

    for i in 0..50 {
        let sum: Sum = client.request("math.add", &Add { a: i, b: 2 * i }).await.unwrap();
        assert_eq!(sum, Sum { value: 3 * i, served_by: "server".into() });
    }

    // A handler's error comes back as a remote error, at once, not retried into a timeout.
    let once =
        RequestOptions { timeout: Duration::from_secs(5), attempts: 3, backoff: Duration::from_millis(10) };
    let started = tokio::time::Instant::now();
    let error = client.request_with::<_, i64>("math.divide", &Add { a: 1, b: 0 }, &once).await.unwrap_err();
    assert!(
        matches!(&error, RequestError::Remote { message, .. } if message == "division by zero"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "remote errors are not retried");

    // A timeout is a timeout, distinct from a remote error.
    let quick = RequestOptions { timeout: Duration::from_millis(100), attempts: 1, backoff: Duration::ZERO };
    let error = client.request_with::<_, u64>("slow", &400u64, &quick).await.unwrap_err();
    assert!(matches!(error, RequestError::Timeout { attempts: 1, .. }), "{error}");

    // The late answer to that request (400 ms) must not be taken for the next request's answer.
    let answer: u64 = client.request_with("slow", &700u64, &RequestOptions::default()).await.unwrap();
    assert_eq!(answer, 700);

    let error = client.request::<_, u64>("no.such.service", &1u8).await.unwrap_err();
    assert!(matches!(error, RequestError::NoReplica { .. }), "{error}");

    client.close().await.unwrap();
    server.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_over_tcp() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    calls_errors_and_late_responses(tcp, &|_| String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_over_memory() {
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    calls_errors_and_late_responses(memory, &|id| format!("address = \"memory://rr-{id}\"")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_spread_over_replicas_and_skip_a_closed_one() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b", "replica-c"] {
        let node = Node::builder(name)
            .liveness(Some(Duration::from_millis(100)), Duration::from_secs(1))
            .transport_library("tcp", tcp.clone(), "")
            .build()
            .await
            .unwrap();
        let me = name.to_string();
        node.serve("math.add", move |request: Received<Add>| {
            let me = me.clone();
            async move { Ok::<_, String>(Sum { value: request.message.a + request.message.b, served_by: me }) }
        })
        .await
        .unwrap();
        replicas.push(node);
    }
    let mut client = Node::builder("client")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(1))
        .transport_library("tcp", tcp, "");
    for replica in &replicas {
        let address = replica.transports()[0].local_address.clone();
        client = client.static_peer(replica.id().as_str(), [("tcp", address.as_str())]);
    }
    let client = client.build().await.unwrap();
    wait_for_service(&client, "math.add", 3).await;

    let mut served = HashMap::<String, u32>::new();
    for i in 0..90 {
        let sum: Sum = client.request("math.add", &Add { a: i, b: 1 }).await.unwrap();
        assert_eq!(sum.value, i + 1);
        *served.entry(sum.served_by).or_default() += 1;
    }
    assert_eq!(served.len(), 3, "every replica served: {served:?}");
    assert!(served.values().all(|n| *n >= 10), "spread reasonably: {served:?}");

    // A replica that leaves gracefully says goodbye: no request goes to it afterwards.
    replicas.remove(0).close().await.unwrap();
    let started = tokio::time::Instant::now();
    while client
        .peers()
        .iter()
        .any(|p| p.record.id.as_str() == "replica-a" && p.status == comms_host::PeerStatus::Up)
    {
        // The goodbye is processed on arrival, long before the 1 s peer timeout could expire.
        assert!(started.elapsed() < Duration::from_millis(500), "the goodbye did not mark replica-a down");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut served = HashMap::<String, u32>::new();
    for i in 0..30 {
        let options =
            RequestOptions { timeout: Duration::from_secs(2), attempts: 1, backoff: Duration::ZERO };
        let sum: Sum = client.request_with("math.add", &Add { a: i, b: 1 }, &options).await.unwrap();
        *served.entry(sum.served_by).or_default() += 1;
    }
    assert!(!served.contains_key("replica-a"), "{served:?}");
    client.close().await.unwrap();
    for replica in replicas {
        replica.close().await.unwrap();
    }
}

//! The in-memory transport as applications use it: nodes of one process, `libcomms_memory.so`
//! loaded at run time, no network.

use comms_host::{BuildError, Node, PluginLibrary, SendError};
use comms_plugin_api::ErrorCode;
use comms_tests::artifacts;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    sequence: u32,
    item: String,
    quantity: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Confirmation {
    sequence: u32,
}

fn memory() -> PluginLibrary {
    PluginLibrary::load(&artifacts().memory_plugin).expect("load libcomms_memory.so")
}

/// A node with one memory transport at `address` (unique per test: tests share the registry of
/// the one loaded library) that knows `peers` by their memory addresses.
async fn node(id: &str, config: &str, peers: &[(&str, &str)]) -> Node {
    let mut builder = Node::builder(id).transport_library("memory", memory(), config);
    for (peer, address) in peers {
        builder = builder.static_peer(peer, [("memory", *address)]);
    }
    builder.build().await.unwrap()
}

#[tokio::test]
async fn two_nodes_exchange_typed_messages_in_order() {
    let shop =
        node("shop", r#"address = "memory://typed-shop""#, &[("client", "memory://typed-client")]).await;
    let client =
        node("client", r#"address = "memory://typed-client""#, &[("shop", "memory://typed-shop")]).await;
    assert_eq!(client.transports()[0].local_address, "memory://typed-client");
    for sequence in 0..200 {
        let order = Order { sequence, item: format!("item-{sequence}"), quantity: (sequence % 7) as u16 };
        client.send("shop", &order).await.unwrap();
    }
    for sequence in 0..200 {
        let received = shop.receive::<Order>().await.unwrap();
        assert_eq!(received.from.as_str(), "client");
        let expected = Order { sequence, item: format!("item-{sequence}"), quantity: (sequence % 7) as u16 };
        assert_eq!(received.message, expected);
        shop.send(received.from, &Confirmation { sequence }).await.unwrap();
    }
    for sequence in 0..200 {
        let received = client.receive::<Confirmation>().await.unwrap();
        assert_eq!((received.from.as_str(), received.message), ("shop", Confirmation { sequence }));
    }
    client.close().await.unwrap();
    shop.close().await.unwrap();
}

#[tokio::test]
async fn sending_to_an_unknown_address_names_it_and_is_retryable() {
    let lonely = node("lonely", "", &[("ghost", "memory://nobody-listens-here")]).await;
    let error = lonely.send("ghost", &1u32).await.unwrap_err();
    let SendError::Transport { error: cause, .. } = &error else {
        panic!("expected a transport error, got {error}");
    };
    assert_eq!(cause.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(cause.retryable, "{error}");
    assert!(error.to_string().contains("`memory://nobody-listens-here`"), "{error}");
    lonely.close().await.unwrap();
}

#[tokio::test]
async fn an_address_already_in_use_is_a_config_error_naming_the_key() {
    let first = node("first", r#"address = "memory://in-use""#, &[]).await;
    let error = Node::builder("second")
        .transport_library("memory", memory(), r#"address = "memory://in-use""#)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(error, BuildError::Config(_)), "{error}");
    let message = error.to_string();
    assert!(message.contains("[transports.memory]") && message.contains("key `address`"), "{message}");
    assert!(message.contains("already in use"), "{message}");
    first.close().await.unwrap();
}

#[tokio::test]
async fn backpressure_loses_nothing_and_keeps_the_order() {
    const MESSAGES: u32 = 10_000;
    let receiver = Node::builder("slow")
        .transport_library("memory", memory(), "address = \"memory://pressure-slow\"\nqueue_capacity = 4")
        .receive_queue_capacity(8)
        .build()
        .await
        .unwrap();
    let sender = node("fast", "", &[("slow", "memory://pressure-slow")]).await;
    let sending = tokio::spawn({
        let sender = sender.clone();
        async move {
            for n in 0..MESSAGES {
                sender.send("slow", &n).await.unwrap();
            }
        }
    });
    let receiving = async {
        for n in 0..MESSAGES {
            let received = receiver.receive::<u32>().await.unwrap();
            assert_eq!(received.message, n, "in order, none lost");
            if n % 1_000 == 0 {
                // Let the queues fill up so that the sender really waits.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), receiving).await.expect("all messages arrive");
    sending.await.unwrap();
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

//! Unit tests through the host-side API, with the plugin linked into the test binary, against
//! the Redis at 127.0.0.1:6379 (skipped with a message when there is none, failed in CI).

use crate::RedisPlugin;
use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Capabilities, Destination, Envelope, ErrorCode, MessageId, NodeId, Payload, Settlement,
    SettlementOutcome,
};
use std::time::Duration;

fn redis_available() -> bool {
    let up = std::net::TcpStream::connect_timeout(&"127.0.0.1:6379".parse().unwrap(), Duration::from_secs(2))
        .is_ok();
    if !up {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Redis at 127.0.0.1:6379 is not reachable in CI"
        );
        eprintln!("SKIPPED: Redis at 127.0.0.1:6379 is not reachable");
    }
    up
}

fn unique(role: &str) -> String {
    format!("unit-{}-{:08x}-{role}", std::process::id(), rand::random::<u32>())
}

/// Deletes an inbox a test made (a closed node's inbox stays in Redis, by design).
async fn delete(inbox: &str) {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL").arg(inbox).query_async(&mut connection).await.unwrap();
}

fn envelope(to: &str, n: u128) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("sender"),
        Destination::Node(NodeId::new(to)),
        Payload::from(vec![n as u8; 3]),
    )
    .with_headers(vec![("n".into(), n.to_string())])
}

async fn open(node: &str, config: &str) -> LoadedTransport {
    PluginLibrary::linked::<RedisPlugin>().new_transport(&NodeId::new(node), "redis", config).await.unwrap()
}

const FAST: &str = "claim_idle_ms = 1000\nblock_ms = 100";

#[tokio::test]
async fn delivers_and_redelivers_a_rejected_message_with_the_same_id() {
    if !redis_available() {
        return;
    }
    let node = unique("receiver");
    let receiver = open(&node, FAST).await;
    let sender = open(&unique("sender"), FAST).await;
    let info = receiver.info().clone();
    assert!(info.capabilities.contains(Capabilities::ACKNOWLEDGEMENTS | Capabilities::NATIVE_TOPICS));
    assert_eq!(info.local_address, format!("comms:inbox:{node}"));
    sender.send(&info.local_address, envelope(&node, 7)).await.unwrap();
    let first = receiver.receive(10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].envelope, envelope(&node, 7));
    let reject =
        Settlement { delivery_tag: first[0].delivery_tag, outcome: SettlementOutcome::REJECTED_REQUEUE };
    receiver.settle(vec![reject]).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), receiver.receive(10)).await.unwrap().unwrap();
    assert_eq!(again[0].envelope.id, MessageId::from_u128(7));
    assert_ne!(again[0].delivery_tag, first[0].delivery_tag);
    let accept = Settlement { delivery_tag: again[0].delivery_tag, outcome: SettlementOutcome::ACCEPTED };
    receiver.settle(vec![accept]).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(500), receiver.receive(10)).await;
    assert!(nothing.is_err(), "an accepted message came again: {nothing:?}");
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    delete(&info.local_address).await;
    delete(&sender.info().local_address).await;
}

#[tokio::test]
async fn a_send_to_an_inbox_nobody_reads_is_unreachable() {
    if !redis_available() {
        return;
    }
    let sender = open(&unique("sender"), "").await;
    let error = sender.send("comms:inbox:nobody-ever-here", envelope("nobody", 1)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.message.contains("comms:inbox:nobody-ever-here"), "{error}");
    let error = sender.send("elsewhere", envelope("nobody", 1)).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_ADDRESS, "{error}");
    sender.close().await.unwrap();
    delete(&sender.info().local_address).await;
}

#[tokio::test]
async fn an_unreachable_redis_fails_after_retries_naming_the_url_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "url = \"redis://user:sup3rsecret@127.0.0.1:{port}/0\"\nconnect_attempts = 2\nconnect_backoff_ms = 10"
    );
    let library = PluginLibrary::linked::<RedisPlugin>();
    let error = library.new_transport(&NodeId::new("x"), "redis", &config).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.message.contains(&format!("redis://user:***@127.0.0.1:{port}/0")), "{error}");
    assert!(error.message.contains("after 2 attempts"), "{error}");
    assert!(!error.message.contains("sup3rsecret"), "{error}");
    let error = library.new_discovery(&NodeId::new("x"), "redis", &config).await.unwrap_err();
    assert!(!error.message.contains("sup3rsecret"), "{error}");
}

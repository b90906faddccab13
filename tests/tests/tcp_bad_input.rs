//! Garbage sent to the TCP listener closes only the offending connection; the node keeps serving
//! a well-behaved peer, and nothing bogus reaches the application.

use comms_host::{Node, PluginLibrary};
use comms_tests::artifacts;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MAX_FRAME: u32 = 4096;

fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

fn hello(node: &str) -> Vec<u8> {
    let mut body = vec![1u8];
    body.extend_from_slice(b"COMMS");
    body.push(1);
    body.extend_from_slice(&(node.len() as u16).to_be_bytes());
    body.extend_from_slice(node.as_bytes());
    frame(&body)
}

/// Sends `bytes` and asserts the node closes the connection (EOF or reset) within 5 s.
async fn assert_closed_after(address: &str, what: &str, bytes: &[u8]) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "{what}: the node kept the connection open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_random_input_only_closes_that_connection() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let config = format!("max_frame_size = {MAX_FRAME}\nhandshake_timeout_ms = 2000");
    let target =
        Node::builder("target").transport_library("tcp", tcp.clone(), &config).build().await.unwrap();
    let address = target.transports()[0].local_address.clone();
    let peer = Node::builder("peer")
        .transport_library("tcp", tcp, "")
        .static_peer("target", [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();

    let mut random = StdRng::seed_from_u64(0x5eed);
    let noise: Vec<u8> = (0..8192).map(|_| random.gen()).collect();
    let mut oversized = hello("mallory");
    oversized.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
    oversized.extend_from_slice(&[2u8; 64]);
    let mut malformed_envelope = hello("mallory");
    malformed_envelope.extend(frame(&[2, 1, 0, 0, 0]));
    let mut unknown_kind = hello("mallory");
    unknown_kind.extend(frame(&[9, 9, 9]));
    let mut bad_version = hello("mallory");
    bad_version[4 + 6] = 42;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise),
        ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("oversized frame", oversized),
        ("malformed envelope", malformed_envelope),
        ("unknown frame kind", unknown_kind),
        ("wrong protocol version", bad_version),
        ("huge hello length", u32::MAX.to_be_bytes().to_vec()),
    ];

    let mut expected = 0u32;
    for (what, bytes) in &cases {
        assert_closed_after(&address, what, bytes).await;
        // Between each attack the well-behaved peer is served as before.
        for _ in 0..50 {
            peer.send("target", &expected).await.unwrap();
            expected += 1;
        }
    }
    // A connection that never says hello is dropped after the handshake timeout.
    assert_closed_after(&address, "silent connection", &[]).await;
    peer.send("target", &expected).await.unwrap();
    expected += 1;

    for i in 0..expected {
        let received =
            tokio::time::timeout(Duration::from_secs(10), target.receive::<u32>()).await.unwrap().unwrap();
        assert_eq!(received.from.as_str(), "peer", "only the peer's messages reach the application");
        assert_eq!(received.message, i);
    }
    let nothing_more = tokio::time::timeout(Duration::from_millis(300), target.receive::<u32>()).await;
    assert!(nothing_more.is_err(), "garbage must not turn into messages");
    peer.close().await.unwrap();
    target.close().await.unwrap();
}

#[tokio::test]
async fn a_peer_that_comes_back_is_reconnected() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let first = Node::builder("target").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    let address = first.transports()[0].local_address.clone();
    let sender = Node::builder("sender")
        .transport_library("tcp", tcp.clone(), "")
        .static_peer("target", [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();
    sender.send("target", "before").await.unwrap();
    assert_eq!(first.receive::<String>().await.unwrap().message, "before");
    first.close().await.unwrap();

    // The same address comes back as a new process would.
    let second = Node::builder("target")
        .transport_library("tcp", tcp, &format!("listen = {address:?}"))
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sender.send("target", "after").await.unwrap();
    let received =
        tokio::time::timeout(Duration::from_secs(10), second.receive::<String>()).await.unwrap().unwrap();
    assert_eq!(received.message, "after");
    sender.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_peer_fails_the_send_after_the_retries_instead_of_hanging() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let closed_port = comms_tests::free_address();
    let sender = Node::builder("sender")
        .transport_library(
            "tcp",
            tcp,
            "reconnect_attempts = 3\nreconnect_initial_backoff_ms = 10\nsend_queue_capacity = 4",
        )
        .static_peer("ghost", [("tcp", closed_port.as_str())])
        .build()
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(error) = sender.send("ghost", "anyone?").await {
                return error;
            }
        }
    })
    .await
    .expect("sends fail instead of waiting forever");
    let message = outcome.to_string();
    assert!(message.contains("unreachable after 3 attempts") && message.contains(&closed_port), "{message}");
    // The sends that said Ok before were given up on with the peer: close says so.
    let error = sender.close().await.expect_err("the queued messages were not delivered");
    assert!(error.undelivered >= 1, "{error}");
}

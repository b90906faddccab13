//! A message `send` took and the transport then gave up on is never silent (issue 18, point
//! 5): `Node::flush` and `Node::close` report it, with the count, and `comms send` exits
//! non-zero. Before, 1,025 sends to a peer nobody listened on returned `Ok`, `close()` returned
//! `Ok` in no time, and `comms send` printed `sent … to h3-a` and exited 0.
//!
//! Nothing listens on the peer's address: the TCP writer's dials are refused at once, and it
//! gives up after `reconnect_attempts`. Framework messages to the same peer (the hello at
//! start, heartbeats, the goodbye) are given up on too, and are not counted.

use comms_host::{FlushError, Node, PluginLibrary};
use comms_tests::{artifacts, refusing_address, scratch_dir, write_config};

/// Gives up on an unreachable peer after 3 quick attempts (20 + 40 ms of backoff).
const QUICK_GIVE_UP: &str = "reconnect_attempts = 3\nreconnect_initial_backoff_ms = 20\n";

/// The node, and the socket that keeps its peer's address refusing.
async fn node_with_an_unreachable_peer(id: &str) -> (Node, tokio::net::TcpSocket) {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let (held, nobody) = refusing_address();
    let node = Node::builder(id)
        .transport_library("tcp", tcp, QUICK_GIVE_UP)
        .static_peer("ghost", [("tcp", nobody.as_str())])
        .build()
        .await
        .unwrap();
    (node, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_reports_each_message_given_up_on_once_and_close_then_has_nothing_more() {
    let (node, _held) = node_with_an_unreachable_peer("flusher").await;
    for i in 0..100 {
        node.send("ghost", &format!("message {i}")).await.expect("queued: send says Ok");
    }
    match node.flush().await {
        Err(FlushError::Undelivered { count, by_transport }) => {
            assert_eq!(count, 100, "every message sent, and no framework message");
            assert_eq!(by_transport, vec![("tcp".to_string(), 100)]);
        }
        other => panic!("expected 100 undelivered messages, got {other:?}"),
    }
    let message = node.flush().await.map(|()| "ok").unwrap_or("an error");
    assert_eq!(message, "ok", "reported once: nothing new since");
    node.close().await.expect("nothing left to report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reports_the_messages_given_up_on_with_their_count() {
    let (node, _held) = node_with_an_unreachable_peer("closer").await;
    for i in 0..25 {
        node.send("ghost", &format!("message {i}")).await.expect("queued: send says Ok");
    }
    let error = node.close().await.expect_err("25 messages were not delivered");
    assert_eq!(error.undelivered, 25, "{error}");
    let text = error.to_string();
    assert!(text.contains("25 messages were sent but not delivered"), "{text}");
    assert!(text.contains("transport `tcp` gave up on 25"), "{text}");
}

/// Over the chunk layer the TCP transport queues parts, not messages: a message given up on
/// still counts once (by its last part), not once per part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cut_into_parts_counts_once() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let chunk = PluginLibrary::load(&artifacts().chunk_plugin).unwrap();
    let (_held, nobody) = refusing_address();
    let node = Node::builder("cutter")
        .transport_library("tcp", tcp, QUICK_GIVE_UP)
        .layer_library(chunk, "part_size = 1024")
        .static_peer("ghost", [("tcp", nobody.as_str())])
        .build()
        .await
        .unwrap();
    for i in 0..10u8 {
        // 3,000 bytes: three parts of 1,000.
        node.send_raw("ghost", Vec::new(), vec![i; 3000], None).await.expect("queued: send says Ok");
    }
    // A small message goes whole.
    node.send("ghost", &"small").await.expect("queued");
    match node.flush().await {
        Err(FlushError::Undelivered { count, .. }) => {
            assert_eq!(count, 11, "ten messages of three parts and one whole message, each once");
        }
        other => panic!("expected 11 undelivered messages, got {other:?}"),
    }
    node.close().await.expect("nothing left to report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_were_delivered_leave_flush_and_close_clean() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let receiver = Node::builder("receiver").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    let address = receiver.transports()[0].local_address.clone();
    let sender = Node::builder("sender")
        .transport_library("tcp", tcp, "")
        .static_peer("receiver", [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();
    for i in 0..100 {
        sender.send("receiver", &i).await.unwrap();
    }
    sender.flush().await.expect("all written");
    for _ in 0..100 {
        receiver.receive::<i32>().await.unwrap();
    }
    sender.close().await.expect("nothing undelivered");
    receiver.close().await.unwrap();
}

#[test]
fn comms_send_to_a_node_nobody_listens_for_fails_and_says_so() {
    let artifacts = artifacts();
    let dir = scratch_dir("send-undelivered");
    let (_held, nobody) = refusing_address();
    let config = write_config(
        &dir,
        "sender.toml",
        &format!(
            "[node]\nid = \"sender\"\nplugin_dirs = [{:?}]\n\n[transports.tcp]\n{QUICK_GIVE_UP}\n\
             [discovery]\npeers = [{{ id = \"h3-a\", addresses = {{ tcp = {:?} }} }}]\n",
            artifacts.plugin_dir.to_str().unwrap(),
            nobody
        ),
    );
    let output = std::process::Command::new(&artifacts.comms_bin)
        .args(["send", "--wait-ms", "0", "--to", "h3-a", "hello", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {}\n{stdout}\n{stderr}", output.status);
    assert!(!stdout.contains("sent"), "{stdout}");
    assert!(stderr.contains("1 message was sent but not delivered"), "{stderr}");
}

//! What a node on the AMQP plugin logs about a static peer that never started (no inbox queue
//! on the broker), with heartbeats every 50 ms: one short line for the address, not a record
//! of every returned heartbeat (lapin logs each at `WARN`, with the whole message).
//!
//! The plugin is loaded from its library file, so its records reach this test's subscriber
//! through the host, as in a real node.

use comms_host::{Node, PluginLibrary};
use comms_tests::{artifacts, broker_available, capture_logs};
use std::time::{Duration, Instant};

const HEARTBEAT: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_peer_without_a_queue_is_logged_once_in_one_short_line() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let captured = capture_logs("warn");

    let tag = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let (node_id, ghost) = (format!("t-logs-{tag}"), format!("t-ghost-{tag}"));
    let ghost_queue = format!("comms.inbox.{ghost}");
    let config = "inbox_expires_ms = 60000\ndead_letter_exchange = \"\"\ndead_letter_queue = \"\"\n\
                  discovery_exchange = \"\"\n";
    let library = PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"));
    let node = Node::builder(node_id.as_str())
        .liveness(Some(HEARTBEAT), Duration::from_secs(5))
        .transport_library("amqp", library, config)
        .static_peer(&ghost, [("amqp", ghost_queue.as_str())])
        .build()
        .await
        .unwrap_or_else(|error| panic!("{error}"));

    let started = Instant::now();
    while !captured.text().contains(&ghost_queue) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nothing said the peer's queue is missing within 10 s:\n{}",
            captured.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Twenty more heartbeats come back from the broker meanwhile.
    tokio::time::sleep(HEARTBEAT * 20).await;
    node.close().await.unwrap();

    let text = captured.text();
    let about_the_peer: Vec<&str> =
        text.lines().filter(|line| line.contains(&ghost) || line.contains("returned")).collect();
    assert_eq!(about_the_peer.len(), 1, "one line for the missing queue:\n{text}");
    assert!(about_the_peer[0].len() < 400, "a short line: {}", about_the_peer[0]);
    assert!(!text.contains("BasicReturnMessage"), "lapin's record of each return reached the log:\n{text}");
}

//! A node's subscriptions at a transport with native topics follow the application's: the
//! pattern is unsubscribed there when the last subscription to it ends while the node runs
//! (`Subscription::unsubscribe`, or a drop), and left subscribed when the node closes, for its
//! next run. Checked on SQLite, whose subscriptions are rows of `comms_subscription` that last
//! across restarts (the NATS durable consumers are checked in `nats_durable_topics.rs`).

use comms_host::Node;
use comms_tests::{artifacts, scratch_dir};
use std::{path::Path, time::Duration};

/// The patterns `node` is subscribed to in the database, sorted. Read by another process
/// (Python's sqlite3): a second copy of SQLite in this process (the test's, beside the plugin's)
/// would see stale pages and, closing its file, drop the plugin's locks.
fn subscribed(database: &Path, node: &str) -> Vec<String> {
    let script = "import sqlite3, sys\n\
                  rows = sqlite3.connect(sys.argv[1]).execute(\n\
                  'SELECT pattern FROM comms_subscription WHERE node_id = ? ORDER BY pattern', (sys.argv[2],))\n\
                  print('\\n'.join(row[0] for row in rows))";
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(database)
        .arg(node)
        .output()
        .expect("run python3");
    assert!(output.status.success(), "python3: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_subscription_to_a_pattern_unsubscribes_it_at_the_transport_and_a_close_keeps_it() {
    let dir = scratch_dir("native-unsubscribe");
    let database = dir.join("comms.db");
    let node = Node::builder("unsubscriber")
        .plugin_dir(artifacts().plugin_dir.clone())
        .transport("sqlite", "sqlite", &format!("database = {database:?}\npoll_max_ms = 20"))
        .build()
        .await
        .unwrap();
    let first = node.subscribe::<u32>("news.>").await.unwrap();
    let second = node.subscribe::<u32>("news.>").await.unwrap();
    let other = node.subscribe::<u32>("other").await.unwrap();
    assert_eq!(subscribed(&database, "unsubscriber"), ["news.>", "other"]);

    // Another subscription still has the pattern: it stays.
    first.unsubscribe().await.unwrap();
    assert_eq!(
        subscribed(&database, "unsubscriber"),
        ["news.>", "other"],
        "one subscription to news.> is left"
    );
    second.unsubscribe().await.unwrap();
    assert_eq!(subscribed(&database, "unsubscriber"), ["other"], "the last one unsubscribed it");

    // Dropping does it too, in a task of the node's.
    drop(other);
    let started = tokio::time::Instant::now();
    while !subscribed(&database, "unsubscriber").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the dropped subscription stayed at the transport: {:?}",
            subscribed(&database, "unsubscriber")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A subscription dropped and made again at once ends up subscribed.
    let again = node.subscribe::<u32>("again").await.unwrap();
    drop(again);
    let again = node.subscribe::<u32>("again").await.unwrap();
    let kept = node.subscribe::<u32>("kept").await.unwrap();
    // A probe through the same lock as the drop's task gives that task its turn.
    node.subscribe::<u32>("probe").await.unwrap().unsubscribe().await.unwrap();
    assert_eq!(subscribed(&database, "unsubscriber"), ["again", "kept"]);

    // A node that closes keeps its subscriptions at the transport, for its next run.
    node.close().await.unwrap();
    kept.unsubscribe().await.unwrap();
    drop(again);
    assert_eq!(subscribed(&database, "unsubscriber"), ["again", "kept"], "closing left them subscribed");
}

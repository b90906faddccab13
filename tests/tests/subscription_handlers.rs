//! `Node::subscribe_with`: a handler per message, acknowledged when it returns `Ok`, delivered
//! again when it fails (here through SQLite, a transport with acknowledgements and native
//! topics: no server needed).

use comms_host::{Node, Received};
use comms_tests::{artifacts, scratch_dir, write_config};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::mpsc;

fn node_config(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    let database = dir.join("comms.db");
    let text = format!(
        "[node]\nid = \"{id}\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 200\npeer_timeout_ms = 2000\n\n\
         [transports.sqlite]\ndatabase = {database:?}\npoll_max_ms = 50\n",
        artifacts().plugin_dir
    );
    write_config(dir, &format!("{id}.toml"), &text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_gets_the_message_again_and_a_successful_one_does_not() {
    let dir = scratch_dir("subscribe-with");
    let alice = Node::from_config(node_config(&dir, "alice")).await.unwrap();
    let bob = Node::from_config(node_config(&dir, "bob")).await.unwrap();

    // Fails the first time it sees a number, succeeds the second time.
    let attempts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let (done, mut handled) = mpsc::channel(16);
    let handler = {
        let attempts = Arc::clone(&attempts);
        move |received: Received<u32>| {
            let attempts = Arc::clone(&attempts);
            let done = done.clone();
            async move {
                let attempt = {
                    let mut attempts = attempts.lock().unwrap();
                    let attempt = attempts.entry(received.message).or_insert(0);
                    *attempt += 1;
                    *attempt
                };
                if attempt == 1 {
                    return Err(format!("first attempt at {}", received.message));
                }
                done.send(received.message).await.map_err(|e| e.to_string())
            }
        }
    };
    let subscription = bob.subscribe_with("jobs.>", handler).await.unwrap();
    assert_eq!(subscription.pattern(), "jobs.>");

    for n in 1..=3u32 {
        alice.publish("jobs.new", &n).await.unwrap();
    }
    let mut succeeded = Vec::new();
    while succeeded.len() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(10), handled.recv()).await.expect("handled in time");
        succeeded.push(n.unwrap());
    }
    succeeded.sort();
    assert_eq!(succeeded, vec![1, 2, 3]);
    // Handled once it succeeded: a third delivery would show up as a third attempt.
    let more = tokio::time::timeout(Duration::from_millis(500), handled.recv()).await;
    assert!(more.is_err(), "an acknowledged message came again: {more:?}");
    assert_eq!(attempts.lock().unwrap().values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);

    drop(subscription);
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

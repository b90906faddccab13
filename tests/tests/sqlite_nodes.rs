//! Nodes configured from files with the SQLite transport and the SQLite discovery, as a user
//! writes them: they find each other through the registry table, send to each other, publish
//! through the plugin's native topics, and a message sent to a node that is down waits for it.

use comms_host::{Node, PeerStatus};
use comms_tests::{artifacts, scratch_dir, write_config};
use serde::{Deserialize, Serialize};
use std::{path::Path, time::Duration};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Greeting {
    text: String,
    n: u32,
}

const WAIT: Duration = Duration::from_secs(10);

fn node_config(dir: &Path, id: &str) -> std::path::PathBuf {
    let database = dir.join("comms.db");
    let text = format!(
        "[node]\nid = \"{id}\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 200\npeer_timeout_ms = 2000\n\n\
         [transports.sqlite]\ndatabase = {database:?}\npoll_max_ms = 50\n\n\
         [discovery]\nplugin = \"sqlite\"\ndatabase = {database:?}\nheartbeat_ms = 100\npeer_timeout_ms = 1000\n",
        artifacts().plugin_dir
    );
    write_config(dir, &format!("{id}.toml"), &text)
}

async fn until(node: &Node, what: &str, condition: impl Fn(&Node) -> bool) {
    let started = tokio::time::Instant::now();
    while !condition(node) {
        assert!(started.elapsed() < WAIT, "{}: {what} did not happen: {:?}", node.id(), node.peers());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until_peer(node: &Node, peer: &str) {
    let started = tokio::time::Instant::now();
    while !node.peers().iter().any(|p| p.record.id.as_str() == peer) {
        assert!(started.elapsed() < WAIT, "{} never discovered {peer}: {:?}", node.id(), node.peers());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_from_config_files_discover_each_other_send_and_publish() {
    let dir = scratch_dir("sqlite-nodes");
    let alice = Node::from_config(node_config(&dir, "alice")).await.unwrap_or_else(|error| panic!("{error}"));
    let bob = Node::from_config(node_config(&dir, "bob")).await.unwrap_or_else(|error| panic!("{error}"));
    until_peer(&alice, "bob").await;

    let greeting = Greeting { text: "hello über sqlite".into(), n: 1 };
    alice.send("bob", &greeting).await.unwrap();
    let mut received =
        tokio::time::timeout(WAIT, bob.receive::<Greeting>()).await.expect("within 10 s").unwrap();
    received.ack();
    assert_eq!((received.from.as_str(), &received.message), ("alice", &greeting));

    let mut orders = bob.subscribe::<Greeting>("orders.>").await.unwrap();
    alice.publish("orders.eu.created", &Greeting { text: "order".into(), n: 2 }).await.unwrap();
    alice.publish("billing.eu", &Greeting { text: "not for bob".into(), n: 3 }).await.unwrap();
    let mut event = tokio::time::timeout(WAIT, orders.next()).await.expect("within 10 s").unwrap().unwrap();
    event.ack();
    assert_eq!(event.message.n, 2);
    assert!(tokio::time::timeout(Duration::from_millis(300), orders.next()).await.is_err(), "only orders.>");

    // bob goes away cleanly and leaves an offline record (his mailbox keeps what is sent to him):
    // alice, and carol who starts after he left, send meanwhile; it waits in the file for the
    // next bob. Before, his record was withdrawn and carol's send failed with "unknown peer".
    bob.close().await.unwrap();
    let offline = |node: &Node| {
        node.peers().iter().any(|peer| peer.record.id.as_str() == "bob" && peer.status == PeerStatus::Offline)
    };
    until(&alice, "bob offline", offline).await;
    alice.send("bob", &Greeting { text: "while you were out".into(), n: 4 }).await.unwrap();
    let carol = Node::from_config(node_config(&dir, "carol")).await.unwrap();
    until(&carol, "bob offline", offline).await;
    carol.send("bob", &Greeting { text: "from a newcomer".into(), n: 5 }).await.unwrap();
    let bob = Node::from_config(node_config(&dir, "bob")).await.unwrap();
    let mut numbers = Vec::new();
    for _ in 0..2 {
        let mut received =
            tokio::time::timeout(WAIT, bob.receive::<Greeting>()).await.expect("within 10 s").unwrap();
        received.ack();
        numbers.push(received.message.n);
    }
    numbers.sort();
    assert_eq!(numbers, vec![4, 5]);

    carol.close().await.unwrap();
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_misspelt_key_names_the_key_and_the_file() {
    let dir = scratch_dir("sqlite-bad-key");
    let text = format!(
        "[node]\nid = \"x\"\nplugin_dirs = [{:?}]\n\n[transports.sqlite]\ndatabase = {:?}\nlease = 5\n",
        artifacts().plugin_dir,
        dir.join("comms.db")
    );
    let path = write_config(&dir, "x.toml", &text);
    let error = match Node::from_config(&path).await {
        Ok(_) => panic!("a config with an unknown key was accepted"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("lease"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

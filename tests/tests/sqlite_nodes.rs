//! Nodes configured from files with the SQLite transport and the SQLite discovery, as a user
//! writes them: they find each other through the registry table, send to each other, publish
//! through the plugin's native topics, and a message sent to a node that is down waits for it.
//! Rows no comms node wrote (wrong types, oversized) are dead-lettered without stopping the
//! node, and what waits for a static peer that never runs stays bounded.

use comms_host::{Node, PeerStatus};
use comms_plugin_api::{inbound::oversized_reason, wire, Destination, Envelope, MessageId, NodeId};
use comms_tests::{artifacts, child_process::MARK, scratch_dir, write_config};
use rusqlite::types::ValueRef;
use serde::{Deserialize, Serialize};
use std::{
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Greeting {
    text: String,
    n: u32,
}

const WAIT: Duration = Duration::from_secs(10);

fn node_config(dir: &Path, id: &str) -> std::path::PathBuf {
    node_config_with(dir, id, "")
}

/// The config of node `id`, with `transport` added to its `[transports.sqlite]` table.
fn node_config_with(dir: &Path, id: &str, transport: &str) -> std::path::PathBuf {
    let database = dir.join("comms.db");
    let text = format!(
        "[node]\nid = \"{id}\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 200\npeer_timeout_ms = 2000\n\n\
         [transports.sqlite]\ndatabase = {database:?}\npoll_max_ms = 50\n{transport}\n\n\
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
    // bob's subscription outlives him too: his copy of this publication waits for him.
    alice.publish("orders.eu.updated", &Greeting { text: "order changed".into(), n: 6 }).await.unwrap();
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
    // The direct messages came, so bob's mailbox has been read; the topic copy waited for his
    // application to subscribe again (before, it arrived first and was dropped as a publication
    // nobody here subscribed to).
    let mut orders = bob.subscribe::<Greeting>("orders.>").await.unwrap();
    let mut event = tokio::time::timeout(WAIT, orders.next())
        .await
        .expect("the kept copy, within 10 s")
        .unwrap()
        .unwrap();
    event.ack();
    assert_eq!(event.message.n, 6);

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

/// Set in a child process of this test binary: the database `sql_child` opens.
const SQL_CHILD: &str = "COMMS_SQLITE_NODES_SQL_DATABASE";

/// Runs one SQL statement on `database` in a child process (this test binary, see `sql_child`)
/// and returns its rows, each value as text (NULL as `NULL`, a blob in hex). Never in this
/// process while a node runs: the plugin loaded here has its own copy of SQLite, and closing a
/// connection of a second copy drops the plugin's POSIX locks on the file (docs/sqlite.md, "One
/// SQLite per process"); the test saw "database disk image is malformed".
fn sql(database: &Path, statement: &str) -> Vec<Vec<String>> {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "sql_child", "--nocapture", "--test-threads", "1"])
        .env(SQL_CHILD, database)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a child process");
    child.stdin.take().expect("piped stdin").write_all(statement.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "`{statement}` failed");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        // libtest may print `test sql_child ... ` on the same line, before the mark.
        .filter_map(|line| line.find(MARK).map(|at| line[at + MARK.len()..].to_string()))
        .map(|row| row.split('\t').map(str::to_string).collect())
        .collect()
}

/// The child side of [`sql`]: does nothing in a normal test run.
#[test]
fn sql_child() {
    let Some(database) = std::env::var_os(SQL_CHILD) else { return };
    let mut statement = String::new();
    std::io::stdin().read_to_string(&mut statement).unwrap();
    let connection = rusqlite::Connection::open(database).unwrap();
    let mut prepared = connection.prepare(&statement).unwrap();
    let columns = prepared.column_count();
    let mut rows = prepared.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        let values: Vec<String> = (0..columns)
            .map(|column| match row.get_ref(column).unwrap() {
                ValueRef::Null => "NULL".to_string(),
                ValueRef::Integer(value) => value.to_string(),
                ValueRef::Real(value) => value.to_string(),
                ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
                ValueRef::Blob(bytes) => bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
            })
            .collect();
        println!("{MARK}{}", values.join("\t"));
    }
}

fn sql_i64(database: &Path, statement: &str) -> i64 {
    let rows = sql(database, statement);
    rows[0][0].parse().unwrap_or_else(|_| panic!("`{statement}` gave {rows:?}"))
}

/// `(row id, reason)` of every dead letter, by row id.
fn dead_letters(database: &Path) -> Vec<(i64, String)> {
    sql(database, "SELECT id, reason FROM comms_dead_letter ORDER BY id")
        .into_iter()
        .map(|row| (row[0].parse().unwrap(), row[1].clone()))
        .collect()
}

/// Inserts a row into `recipient`'s mailbox as a program that is not comms might; `envelope`
/// is an SQL literal. Returns the row id.
fn insert_row(database: &Path, recipient: &str, envelope: &str) -> i64 {
    sql_i64(
        database,
        &format!(
            "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at) VALUES ('{recipient}', {envelope}, 0) \
             RETURNING id"
        ),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_node_cannot_take_are_dead_lettered_and_it_keeps_receiving() {
    // Before: bob's claims failed for ever on the TEXT envelope ("Invalid column type Text"),
    // and nothing behind it reached him; a payload over his limit was delivered.
    let dir = scratch_dir("sqlite-hostile-rows");
    let database = dir.join("comms.db");
    let bob = Node::from_config(node_config_with(&dir, "bob", "max_message_size = 65536")).await.unwrap();
    let alice = Node::from_config(node_config(&dir, "alice")).await.unwrap();
    until_peer(&alice, "bob").await;

    let text_row = insert_row(&database, "bob", "'{\"text\":\"hi\"}'");
    let big = Envelope::new(
        MessageId::from_u128(1),
        NodeId::new("mallory"),
        Destination::Node(NodeId::new("bob")),
        vec![7u8; 65537],
    );
    let mut encoded = Vec::new();
    wire::encode_envelope(&big, &mut encoded).unwrap();
    let big_row = insert_row(&database, "bob", &format!("x'{}'", hex(&encoded)));
    // alice's own limit is the default 8 MiB: her transport takes it, bob's refuses it.
    alice.send("bob", &Greeting { text: "x".repeat(100_000), n: 1 }).await.unwrap();
    let greeting = Greeting { text: "still there?".into(), n: 2 };
    alice.send("bob", &greeting).await.unwrap();

    let mut received =
        tokio::time::timeout(WAIT, bob.receive::<Greeting>()).await.expect("within 10 s").unwrap();
    received.ack();
    assert_eq!(received.message, greeting, "the message behind the bad rows");
    let dead = dead_letters(&database);
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert_eq!(
        dead[0],
        (text_row, "envelope column holds TEXT, not a BLOB in the wire encoding".to_string())
    );
    assert_eq!(dead[1], (big_row, oversized_reason(65537, 65536).unwrap()));
    // The payload of alice's large greeting is its encoding, a few bytes over 100,000.
    let alice_big =
        sql(&database, &format!("SELECT hex(envelope) FROM comms_dead_letter WHERE id = {}", dead[2].0));
    let alice_big = unhex(&alice_big[0][0]);
    let payload_len = wire::decode_envelope(&alice_big).unwrap().payload.len();
    assert!(payload_len > 100_000, "{payload_len}");
    assert_eq!(dead[2].1, oversized_reason(payload_len, 65536).unwrap());

    alice.close().await.unwrap();
    bob.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_waits_for_a_static_peer_that_never_runs_stays_bounded() {
    // Before: a heartbeat row a second (here every 20 ms) for ever in ghost's mailbox.
    let dir = scratch_dir("sqlite-ghost");
    let database = dir.join("comms.db");
    let text = format!(
        "[node]\nid = \"alice\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 20\npeer_timeout_ms = 2000\n\n\
         [transports.sqlite]\ndatabase = {database:?}\n\n\
         [discovery]\npeers = [{{ id = \"ghost\", addresses = {{ sqlite = \"ghost\" }} }}]\n",
        artifacts().plugin_dir
    );
    let alice = Node::from_config(write_config(&dir, "alice.toml", &text)).await.unwrap();
    for n in 0..3 {
        alice.send("ghost", &Greeting { text: "for later".into(), n }).await.unwrap();
    }
    // Every row ever written gets a new id (AUTOINCREMENT): wait for 50 more heartbeats.
    let written = || sql_i64(&database, "SELECT seq FROM sqlite_sequence WHERE name = 'comms_mailbox'");
    let first = written();
    let started = tokio::time::Instant::now();
    while written() < first + 50 {
        assert!(started.elapsed() < WAIT, "alice wrote {} rows in 10 s", written() - first);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting = || -> Vec<(String, i64)> {
        sql(
            &database,
            "SELECT IFNULL(replace_key, 'application'), COUNT(*) FROM comms_mailbox WHERE recipient = 'ghost'
             GROUP BY 1 ORDER BY 1",
        )
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap()))
        .collect()
    };
    let total = sql_i64(&database, "SELECT COUNT(*) FROM comms_mailbox WHERE recipient = 'ghost'");
    assert!(total <= 5, "{total} rows wait for ghost (3 application messages, a hello, a heartbeat)");
    let expected = |extra: &[&str]| {
        let mut rows: Vec<(String, i64)> = ["application", "heartbeat:alice", "hello:alice"]
            .iter()
            .chain(extra)
            .map(|k| (k.to_string(), 1))
            .collect();
        rows[0].1 = 3;
        rows.sort();
        rows
    };
    assert_eq!(waiting(), expected(&[]), "every application message, the newest heartbeat and hello");
    alice.close().await.unwrap();
    assert_eq!(waiting(), expected(&["goodbye:alice"]), "and the goodbye");
    let _ = std::fs::remove_dir_all(&dir);
}

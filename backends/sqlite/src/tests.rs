//! Unit tests through the host-side API, with the plugin linked into the test binary and a real
//! database file per test.

use crate::{SqlitePlugin, SCHEMA_VERSION};
use comms_plugin_api::{
    host_side::{LoadedDiscovery, LoadedTransport, PluginLibrary},
    Destination, Envelope, ErrorCode, MessageId, NodeId, NodeRecord, Payload, PeerEventKind, PluginError,
    Settlement, SettlementOutcome,
};
use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A fresh directory and the config text pointing at a database in it, plus `extra` keys.
fn database(name: &str, extra: &str) -> (PathBuf, String) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("comms-sqlite-unit-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("comms.db");
    let config = format!("database = {:?}\n{extra}", path);
    (path, config)
}

fn envelope(n: u128, to: &str, size: usize) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new("sender"),
        Destination::Node(NodeId::new(to)),
        Payload::from(vec![n as u8; size]),
    )
    .with_headers(vec![("n".to_string(), n.to_string())])
}

async fn transport(node: &str, config: &str) -> Result<LoadedTransport, PluginError> {
    PluginLibrary::linked::<SqlitePlugin>().new_transport(&NodeId::new(node), "sqlite", config).await
}

async fn discovery(node: &str, config: &str) -> LoadedDiscovery {
    PluginLibrary::linked::<SqlitePlugin>().new_discovery(&NodeId::new(node), "sqlite", config).await.unwrap()
}

async fn receive_ids(transport: &LoadedTransport, max: u32) -> Vec<(u128, u64)> {
    tokio::time::timeout(Duration::from_secs(10), transport.receive(max))
        .await
        .expect("a message arrives")
        .unwrap()
        .into_iter()
        .map(|inbound| (inbound.envelope.id.as_u128(), inbound.delivery_tag))
        .collect()
}

async fn settle(transport: &LoadedTransport, tag: u64, outcome: SettlementOutcome) {
    transport.settle(vec![Settlement { delivery_tag: tag, outcome }]).await.unwrap();
}

fn count(path: &PathBuf, sql: &str) -> i64 {
    rusqlite::Connection::open(path).unwrap().query_row(sql, [], |row| row.get(0)).unwrap()
}

#[tokio::test]
async fn bad_config_names_the_key() {
    let (_, config) = database("config", "");
    for (extra, key) in [
        ("lease_ms = 0", "lease_ms"),
        ("poll_min_ms = 10\npoll_max_ms = 5", "poll_max_ms"),
        ("max_message_size = 0", "max_message_size"),
        ("synchronous = \"sometimes\"", "synchronous"),
        ("heartbeat_ms = 1000\npeer_timeout_ms = 500", "peer_timeout_ms"),
    ] {
        let error = transport("bad", &format!("{config}\n{extra}")).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::INVALID_CONFIG, "{extra}: {error}");
        assert!(error.message.contains(&format!("key `{key}`")), "{extra}: {error}");
    }
    let error = transport("bad", "").await.unwrap_err();
    assert!(error.message.contains("key `database`: required"), "{error}");
    let error = transport("bad", &format!("{config}\nlease = 3")).await.unwrap_err();
    assert!(error.message.contains("unknown field `lease`"), "{error}");
}

#[tokio::test]
async fn a_new_file_gets_the_schema_and_a_newer_schema_is_refused() {
    let (path, config) = database("schema", "");
    transport("a", &config).await.unwrap().close().await.unwrap();
    assert_eq!(count(&path, "PRAGMA user_version"), SCHEMA_VERSION);
    let mode: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // Reopening a current file changes nothing.
    transport("a", &config).await.unwrap().close().await.unwrap();

    rusqlite::Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
    let error = transport("a", &config).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNSUPPORTED, "{error}");
    assert!(
        error.message.contains(&format!("schema version 99, newer than version {SCHEMA_VERSION}")),
        "{error}"
    );
    assert!(error.message.contains(&path.display().to_string()), "names the file: {error}");
    assert_eq!(count(&path, "PRAGMA user_version"), 99, "the file was left untouched");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_with_its_name() {
    let (path, config) = database("garbage", "");
    std::fs::write(&path, vec![0x42; 8192]).unwrap();
    let error = transport("a", &config).await.unwrap_err();
    assert!(error.message.contains(&path.display().to_string()), "{error}");
}

#[tokio::test]
async fn an_unsettled_message_is_delivered_again_after_its_lease() {
    let (_, config) = database("lease", "lease_ms = 300");
    let sender = transport("sender", &config).await.unwrap();
    let first = transport("worker", &config).await.unwrap();
    sender.send("worker", envelope(1, "worker", 10)).await.unwrap();
    assert_eq!(receive_ids(&first, 10).await.len(), 1);

    // Another instance of the same node (think: a restarted process) sees it only after the lease.
    let second = transport("worker", &config).await.unwrap();
    let started = Instant::now();
    let again = receive_ids(&second, 10).await;
    assert_eq!(again.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1]);
    assert!(started.elapsed() >= Duration::from_millis(250), "redelivered before the lease ended");
    settle(&second, again[0].1, SettlementOutcome::ACCEPTED).await;
    // The first instance's late settlement touches nothing: the row is gone or not its own.
    first
        .settle(vec![Settlement { delivery_tag: again[0].1, outcome: SettlementOutcome::ACCEPTED }])
        .await
        .unwrap();
    for t in [sender, first, second] {
        t.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_requeued_message_comes_again_at_once_to_a_receive_already_waiting() {
    // Long lease and poll interval: only the wake-up after the requeue can bring it back quickly.
    let (_, config) = database("requeue", "lease_ms = 60000\npoll_min_ms = 5000\npoll_max_ms = 5000");
    let sender = transport("sender", &config).await.unwrap();
    let receiver = std::sync::Arc::new(transport("receiver", &config).await.unwrap());
    sender.send("receiver", envelope(4, "receiver", 1)).await.unwrap();
    let first = receive_ids(&receiver, 10).await;
    let waiting = tokio::spawn({
        let receiver = std::sync::Arc::clone(&receiver);
        async move { receiver.receive(10).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requeued = Instant::now();
    settle(&receiver, first[0].1, SettlementOutcome::REJECTED_REQUEUE).await;
    let again = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!(again[0].envelope.id.as_u128(), 4);
    assert!(requeued.elapsed() < Duration::from_secs(2), "took {:?}", requeued.elapsed());
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

/// With `requeue_delay_ms`, a requeued message can be claimed again after its delay, doubled at
/// each delivery, not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_message_comes_again_after_its_delay_doubled_per_delivery() {
    let (path, config) = database(
        "requeue-delay",
        "requeue_delay_ms = 300
lease_ms = 60000",
    );
    let receiver = transport("receiver", &config).await.unwrap();
    let gaps = comms_plugin_api::testing::gaps_between_deliveries(
        &receiver,
        ("receiver", "receiver"),
        3,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // At once (the default) would be a few milliseconds; the lease 60 s.
    assert!(gaps[0] >= Duration::from_millis(300), "after the 1st delivery: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(600), "after the 2nd, doubled: {gaps:?}");
    assert!(gaps.iter().all(|gap| *gap < Duration::from_secs(5)), "well before the lease: {gaps:?}");
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_mailbox"), 0, "the last delivery was accepted");
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn close_hands_unsettled_messages_to_the_next_instance_at_once() {
    let (_, config) = database("release", "lease_ms = 60000");
    let sender = transport("sender", &config).await.unwrap();
    let first = transport("worker", &config).await.unwrap();
    for n in 0..3 {
        sender.send("worker", envelope(n, "worker", 10)).await.unwrap();
    }
    assert_eq!(receive_ids(&first, 10).await.len(), 3);
    first.close().await.unwrap();
    let second = transport("worker", &config).await.unwrap();
    let ids: Vec<u128> = receive_ids(&second, 10).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, [0, 1, 2], "released at close, in order, long before the 60 s lease");
    sender.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test]
async fn a_message_that_keeps_failing_goes_to_the_dead_letter_table() {
    let (path, config) = database("dead-letter", "max_attempts = 2");
    let sender = transport("sender", &config).await.unwrap();
    let receiver = transport("receiver", &config).await.unwrap();
    sender.send("receiver", envelope(7, "receiver", 10)).await.unwrap();
    for _ in 0..2 {
        let got = receive_ids(&receiver, 10).await;
        assert_eq!(got.len(), 1);
        settle(&receiver, got[0].1, SettlementOutcome::REJECTED_REQUEUE).await;
    }
    sender.send("receiver", envelope(8, "receiver", 10)).await.unwrap();
    let got = receive_ids(&receiver, 10).await;
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [8],
        "7 was delivered twice, then dead-lettered"
    );
    settle(&receiver, got[0].1, SettlementOutcome::REJECTED_DISCARD).await;
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_mailbox"), 0);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_dead_letter"), 2);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_dead_letter WHERE reason LIKE '%max_attempts%'"), 1);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_dead_letter WHERE reason LIKE '%DISCARD%'"), 1);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn a_malformed_row_is_dead_lettered_and_the_next_message_still_arrives() {
    let (path, config) = database("malformed", "");
    let receiver = transport("receiver", &config).await.unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at) VALUES ('receiver', x'09FFFF', 0)",
            [],
        )
        .unwrap();
    let sender = transport("sender", &config).await.unwrap();
    sender.send("receiver", envelope(5, "receiver", 3)).await.unwrap();
    let got = receive_ids(&receiver, 10).await;
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [5]);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_dead_letter WHERE reason LIKE '%wire%'"), 1);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn a_lock_held_within_the_busy_timeout_is_waited_for_and_a_longer_one_is_a_timeout() {
    let (path, config) = database("busy", "busy_timeout_ms = 2000");
    let sender = transport("sender", &config).await.unwrap();
    let receiver = transport("receiver", &config).await.unwrap();
    let hold = |millis: u64| {
        let path = path.clone();
        let (locked, is_locked) = std::sync::mpsc::sync_channel(1);
        let holder = std::thread::spawn(move || {
            let connection = rusqlite::Connection::open(&path).unwrap();
            connection.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(millis));
            connection.execute_batch("COMMIT").unwrap();
        });
        is_locked.recv().unwrap();
        holder
    };
    let holder = hold(500);
    sender.send("receiver", envelope(1, "receiver", 1)).await.expect("waits for the lock instead of failing");
    holder.join().unwrap();
    assert_eq!(receive_ids(&receiver, 10).await.len(), 1);

    let impatient =
        transport("impatient", &format!("database = {path:?}\nbusy_timeout_ms = 100")).await.unwrap();
    let holder = hold(1500);
    let error = impatient.send("receiver", envelope(2, "receiver", 1)).await.unwrap_err();
    holder.join().unwrap();
    assert_eq!(error.code, ErrorCode::TIMEOUT, "{error}");
    assert!(error.retryable, "{error}");
    assert!(
        error.message.contains("busy_timeout_ms (100 ms)") && error.message.contains("comms.db"),
        "{error}"
    );
    for t in [sender, receiver, impatient] {
        t.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_write_from_another_connection_is_seen_within_the_poll_bound() {
    let (path, config) = database("poll", "poll_max_ms = 50");
    let receiver = std::sync::Arc::new(transport("receiver", &config).await.unwrap());
    let waiting = tokio::spawn({
        let receiver = std::sync::Arc::clone(&receiver);
        async move { receiver.receive(10).await.unwrap() }
    });
    // Idle for a while, so the interval is at its bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut encoded = Vec::new();
    comms_plugin_api::wire::encode_envelope(&envelope(3, "receiver", 4), &mut encoded).unwrap();
    // A raw connection: no in-process wake-up, only polling can find it.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at) VALUES ('receiver', ?1, 0)",
            [encoded],
        )
        .unwrap();
    let written = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    // 50 ms bound plus scheduling slack on a loaded CI machine.
    assert!(written.elapsed() < Duration::from_millis(1000), "took {:?}", written.elapsed());
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn delivered_rows_are_removed_and_the_file_stops_growing() {
    let (path, config) = database("retention", "");
    let sender = transport("sender", &config).await.unwrap();
    let receiver = transport("receiver", &config).await.unwrap();
    let size = || count(&path, "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size");
    let mut sizes = Vec::new();
    for round in 0..4u128 {
        for n in 0..300 {
            sender.send("receiver", envelope(round * 1000 + n, "receiver", 1024)).await.unwrap();
        }
        let mut received = 0;
        while received < 300 {
            let batch = receive_ids(&receiver, 256).await;
            received += batch.len();
            let accept = batch
                .iter()
                .map(|(_, tag)| Settlement { delivery_tag: *tag, outcome: SettlementOutcome::ACCEPTED })
                .collect();
            receiver.settle(accept).await.unwrap();
        }
        sizes.push(size());
    }
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_mailbox"), 0, "accepted rows are deleted");
    assert!(sizes[3] <= sizes[1], "the file reuses freed pages: sizes per round {sizes:?}");
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn a_send_to_itself_wakes_its_own_receive_at_once() {
    // Also without in-process wake-ups for others: its own commits do not change data_version.
    for wakeup in [true, false] {
        let extra = format!("poll_min_ms = 1000\npoll_max_ms = 1000\nin_process_wakeup = {wakeup}");
        let (_, config) = database("self", &extra);
        let node = std::sync::Arc::new(transport("self", &config).await.unwrap());
        let waiting = tokio::spawn({
            let node = std::sync::Arc::clone(&node);
            async move { node.receive(10).await.unwrap().len() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = Instant::now();
        node.send("self", envelope(1, "self", 1)).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap(), 1);
        assert!(sent.elapsed() < Duration::from_millis(900), "woken, not polled: {:?}", sent.elapsed());
        node.close().await.unwrap();
    }
}

#[tokio::test]
async fn topics_reach_each_matching_node_once_and_subscriptions_outlive_a_restart() {
    let (_, config) = database("topics", "");
    let publisher = transport("publisher", &config).await.unwrap();
    let both = transport("both", &config).await.unwrap();
    both.subscribe("orders.*").await.unwrap();
    both.subscribe("orders.>").await.unwrap();
    both.close().await.unwrap();
    let mut message = envelope(9, "x", 2);
    message.to = Destination::Topic("orders.eu".into());
    publisher.send("", message.clone()).await.unwrap();
    let both = transport("both", &config).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), both.receive(10)).await.is_err(),
        "the copy waits until the restarted node subscribes again"
    );
    // Held for the first matching pattern in byte order.
    both.subscribe("orders.*").await.unwrap();
    assert_eq!(receive_ids(&both, 10).await.len(), 1, "one copy although two patterns match");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), both.receive(10)).await.is_err(),
        "no second copy arrives"
    );
    let error = both.subscribe("orders.>.x").await.unwrap_err();
    assert_eq!(error.code, ErrorCode::INVALID_ADDRESS, "{error}");
    message.to = Destination::Topic("orders.*".into());
    let error = publisher.send("", message).await.unwrap_err();
    assert!(error.message.contains("wildcard"), "{error}");
    publisher.close().await.unwrap();
    both.close().await.unwrap();
}

async fn next_event(discovery: &LoadedDiscovery) -> comms_plugin_api::PeerEvent {
    tokio::time::timeout(Duration::from_secs(5), discovery.next_event()).await.unwrap().unwrap().unwrap()
}

fn record(id: &str) -> NodeRecord {
    {
        let mut value = NodeRecord::new(NodeId::new(id));
        value.addresses = vec![("sqlite".into(), id.into())];
        value.services = vec!["billing".into()];
        value.topics = vec!["orders.>".into()];
        value.metadata = vec![("zone".into(), "eu".into())];
        // Attributes of a later contract: a discovery stores and returns them.
        value.extensions.set("later-contract", vec![0, 1, 0xff]);
        value
    }
}

#[tokio::test]
async fn discovery_lists_peers_and_reports_joins_updates_and_leaves() {
    let (_, config) = database("discovery", "heartbeat_ms = 50\npeer_timeout_ms = 400");
    let alice = discovery("alice", &config).await;
    let bob = discovery("bob", &config).await;
    alice.announce(record("alice")).await.unwrap();
    bob.announce(record("bob")).await.unwrap();
    let peers = alice.peers().await.unwrap();
    assert_eq!(peers, vec![record("bob")], "the peers, without the node itself");

    let joined = next_event(&alice).await;
    assert_eq!((joined.kind, joined.record.id.as_str()), (PeerEventKind::Joined, "bob"));
    let mut changed = record("bob");
    changed.services.push("audit".into());
    bob.announce(changed.clone()).await.unwrap();
    let updated = next_event(&alice).await;
    assert_eq!((updated.kind, &updated.record), (PeerEventKind::Updated, &changed));
    bob.withdraw(&NodeId::new("bob")).await.unwrap();
    assert_eq!(next_event(&alice).await.kind, PeerEventKind::Left);
    bob.close().await.unwrap();
    alice.close().await.unwrap();
    assert!(alice.next_event().await.unwrap().is_none(), "closed");
}

#[tokio::test]
async fn a_node_whose_heartbeat_stops_is_gone_after_the_timeout() {
    let (path, config) = database("expiry", "heartbeat_ms = 50\npeer_timeout_ms = 300");
    let watcher = discovery("watcher", &config).await;
    // A node that announced itself and then died: its heartbeat is never refreshed.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO comms_registry (node_id, record, heartbeat_at) VALUES ('ghost', ?1, ?2)",
            rusqlite::params![
                r#"{"addresses":[],"services":[],"topics":[],"metadata":[]}"#,
                crate::schema::now_ms()
            ],
        )
        .unwrap();
    let event =
        tokio::time::timeout(Duration::from_secs(5), watcher.next_event()).await.unwrap().unwrap().unwrap();
    assert_eq!((event.kind, event.record.id.as_str()), (PeerEventKind::Joined, "ghost"));
    let started = Instant::now();
    let event =
        tokio::time::timeout(Duration::from_secs(5), watcher.next_event()).await.unwrap().unwrap().unwrap();
    assert_eq!((event.kind, event.record.id.as_str()), (PeerEventKind::Left, "ghost"));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(watcher.peers().await.unwrap().is_empty());
    watcher.close().await.unwrap();
}

/// Inserts a mailbox row for `recipient` as a program that is not comms might: any values, any
/// types, straight into the table.
fn insert_raw(path: &PathBuf, recipient: &str, envelope: rusqlite::types::Value) -> i64 {
    insert_raw_with(path, recipient, envelope, "0", "0")
}

/// Like [`insert_raw`], with SQL expressions for `attempts` and `locked_until`.
fn insert_raw_with(
    path: &PathBuf,
    recipient: &str,
    envelope: rusqlite::types::Value,
    attempts: &str,
    locked_until: &str,
) -> i64 {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .execute(
            &format!(
                "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at, attempts, locked_until)
                 VALUES (?1, ?2, 0, {attempts}, {locked_until})"
            ),
            rusqlite::params![recipient, envelope],
        )
        .unwrap();
    connection.last_insert_rowid()
}

fn encoded(envelope: &Envelope) -> rusqlite::types::Value {
    let mut bytes = Vec::new();
    comms_plugin_api::wire::encode_envelope(envelope, &mut bytes).unwrap();
    rusqlite::types::Value::Blob(bytes)
}

/// `(row id, reason)` of every dead letter, by row id.
fn dead_letters(path: &PathBuf) -> Vec<(i64, String)> {
    let connection = rusqlite::Connection::open(path).unwrap();
    let mut select = connection.prepare("SELECT id, reason FROM comms_dead_letter ORDER BY id").unwrap();
    let rows = select.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

async fn accept_all(transport: &LoadedTransport, received: &[(u128, u64)]) {
    let accept = received
        .iter()
        .map(|(_, tag)| Settlement { delivery_tag: *tag, outcome: SettlementOutcome::ACCEPTED })
        .collect();
    transport.settle(accept).await.unwrap();
}

#[tokio::test]
async fn undecodable_rows_of_every_type_are_dead_lettered_with_their_reason_and_later_rows_flow() {
    // Before: the TEXT envelope made every claim fail ("Invalid column type Text") and roll back,
    // so attempts stayed 0 and nothing behind it was ever delivered.
    use rusqlite::types::Value;
    let (path, config) = database("hostile-rows", "");
    let receiver = transport("receiver", &config).await.unwrap();
    let valid = || encoded(&envelope(1, "receiver", 3));
    let hostile = [
        (
            insert_raw(&path, "receiver", Value::Text("hello".into())),
            "envelope column holds TEXT, not a BLOB in the wire encoding".to_string(),
        ),
        (
            insert_raw(&path, "receiver", Value::Integer(42)),
            "envelope column holds INTEGER, not a BLOB in the wire encoding".into(),
        ),
        (
            insert_raw(&path, "receiver", Value::Real(1.5)),
            "envelope column holds REAL, not a BLOB in the wire encoding".into(),
        ),
        (
            insert_raw(&path, "receiver", Value::Blob(vec![9, 0xFF, 0xFF])),
            "not a valid wire-encoded envelope: unsupported wire version 9 (this node speaks version 1)"
                .into(),
        ),
        (
            insert_raw(&path, "receiver", Value::Blob(Vec::new())),
            "not a valid wire-encoded envelope: envelope truncated while reading version".into(),
        ),
        (
            insert_raw_with(&path, "receiver", valid(), "'many'", "0"),
            "attempts column holds TEXT, not an INTEGER".into(),
        ),
        (
            insert_raw_with(&path, "receiver", valid(), "2.5", "0"),
            "attempts column holds REAL, not an INTEGER".into(),
        ),
        (
            insert_raw_with(&path, "receiver", valid(), "0", "'soon'"),
            "locked_until column holds TEXT, not an INTEGER".into(),
        ),
        (
            insert_raw_with(&path, "receiver", valid(), "0", "0.5"),
            "locked_until column holds REAL, not an INTEGER".into(),
        ),
        (
            insert_raw_with(&path, "receiver", valid(), "0", "x'00'"),
            "locked_until column holds BLOB, not an INTEGER".into(),
        ),
    ];
    // NULL cannot get in: the schema refuses it (and a row that had one would be dead-lettered
    // like the others, see `mailbox::tests`).
    let null = rusqlite::Connection::open(&path).unwrap().execute(
        "INSERT INTO comms_mailbox (recipient, envelope, enqueued_at) VALUES ('receiver', NULL, 0)",
        [],
    );
    assert!(null.is_err(), "the schema refuses a NULL envelope");
    let raw_valid = insert_raw(&path, "receiver", encoded(&envelope(2, "receiver", 3)));
    let sender = transport("sender", &config).await.unwrap();
    sender.send("receiver", envelope(3, "receiver", 3)).await.unwrap();

    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(receive_ids(&receiver, 10).await);
    }
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [2, 3], "the valid rows, in order");
    assert_eq!(got[0].1, raw_valid as u64);
    accept_all(&receiver, &got).await;
    assert_eq!(dead_letters(&path), hostile.to_vec(), "each row with its own reason");
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_mailbox"), 0);
    // The dead letter keeps the row as it was written, for the operator to look at.
    let kept: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT envelope FROM comms_dead_letter WHERE id = ?1", [hostile[0].0], |row| row.get(0))
        .unwrap();
    assert_eq!(kept, "hello");
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn an_oversized_message_is_dead_lettered_on_receipt_with_the_shared_reason() {
    // The sender's limit (4096) is larger than the receiver's (1024): before, the receiver
    // delivered whatever the table held.
    let (path, config) = database("oversized", "");
    let receiver = transport("receiver", &format!("{config}\nmax_message_size = 1024")).await.unwrap();
    let sender = transport("sender", &format!("{config}\nmax_message_size = 4096")).await.unwrap();
    sender.send("receiver", envelope(1, "receiver", 2000)).await.unwrap();
    let raw = insert_raw(&path, "receiver", encoded(&envelope(2, "receiver", 5000)));
    sender.send("receiver", envelope(3, "receiver", 1024)).await.unwrap();

    let got = receive_ids(&receiver, 10).await;
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [3], "only the one that fits");
    accept_all(&receiver, &got).await;
    let reason = |len| comms_plugin_api::inbound::oversized_reason(len, 1024).unwrap();
    let dead = dead_letters(&path);
    assert_eq!(
        dead.iter().map(|(_, reason)| reason.clone()).collect::<Vec<_>>(),
        [reason(2000), reason(5000)]
    );
    assert_eq!(dead[1].0, raw);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_mailbox"), 0);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

fn framework_message(n: u128, from: &str, to: &str, kind: &str) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new(from),
        Destination::Node(NodeId::new(to)),
        b"{}".to_vec(),
    )
    .with_header(comms_plugin_api::framework::KIND_HEADER, kind)
}

#[tokio::test]
async fn a_heartbeat_replaces_an_older_unclaimed_one_and_application_messages_are_all_kept() {
    // Before: one row per heartbeat, for ever, in the mailbox of a node that never runs.
    let (path, config) = database("replace", "");
    let alice = transport("alice", &config).await.unwrap();
    let carol = transport("carol", &config).await.unwrap();
    for n in 100..110 {
        alice.send("ghost", framework_message(n, "alice", "ghost", "heartbeat")).await.unwrap();
    }
    alice.send("ghost", envelope(1, "ghost", 5)).await.unwrap();
    alice.send("ghost", framework_message(200, "alice", "ghost", "hello")).await.unwrap();
    for n in 110..120 {
        alice.send("ghost", framework_message(n, "alice", "ghost", "heartbeat")).await.unwrap();
    }
    alice.send("ghost", envelope(2, "ghost", 5)).await.unwrap();
    for n in 300..305 {
        carol.send("ghost", framework_message(n, "carol", "ghost", "heartbeat")).await.unwrap();
    }
    alice.send("ghost", framework_message(201, "alice", "ghost", "hello")).await.unwrap();
    alice.send("ghost", framework_message(400, "alice", "ghost", "response")).await.unwrap();
    alice.send("ghost", framework_message(401, "alice", "ghost", "response")).await.unwrap();
    alice.send("ghost", envelope(3, "ghost", 5)).await.unwrap();
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM comms_mailbox WHERE recipient = 'ghost'"),
        8,
        "3 application messages, 2 responses, the newest heartbeat of each sender, the newest hello"
    );

    let ghost = transport("ghost", &config).await.unwrap();
    let got = receive_ids(&ghost, 100).await;
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [1, 119, 2, 304, 201, 400, 401, 3],
        "what was sent, minus older copies of the same kind from the same sender, in order"
    );
    // A heartbeat that is claimed (being handled) is not replaced: only unclaimed ones are.
    alice.send("ghost", framework_message(120, "alice", "ghost", "heartbeat")).await.unwrap();
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM comms_mailbox WHERE recipient = 'ghost' AND replace_key = 'heartbeat:alice'"),
        2
    );
    accept_all(&ghost, &got).await;
    assert_eq!(receive_ids(&ghost, 100).await.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [120]);
    for t in [alice, carol, ghost] {
        t.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_version_1_file_is_migrated_and_keeps_its_messages() {
    let (path, config) = database("migrate-v1", "");
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection.execute_batch(crate::schema::MIGRATIONS[0]).unwrap();
        connection.execute_batch("PRAGMA user_version = 1").unwrap();
    }
    insert_raw(&path, "receiver", encoded(&envelope(1, "receiver", 3)));
    let receiver = transport("receiver", &config).await.unwrap();
    assert_eq!(count(&path, "PRAGMA user_version"), SCHEMA_VERSION);
    let got = receive_ids(&receiver, 10).await;
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1]);
    accept_all(&receiver, &got).await;
    receiver.close().await.unwrap();
}

#[tokio::test]
async fn topic_copies_written_while_a_node_is_away_wait_for_its_subscription_and_direct_ones_do_not() {
    let (path, config) = database("held-topics", "");
    let publisher = transport("publisher", &config).await.unwrap();
    let away = transport("away", &config).await.unwrap();
    away.subscribe("orders.*").await.unwrap();
    away.subscribe("audit.>").await.unwrap();
    away.close().await.unwrap();
    for (n, topic) in [(1, "orders.eu"), (2, "audit.log"), (3, "orders.us")] {
        let mut message = envelope(n, "x", 2);
        message.to = Destination::Topic(topic.into());
        publisher.send("", message).await.unwrap();
    }
    publisher.send("away", envelope(4, "away", 2)).await.unwrap();

    let away = transport("away", &config).await.unwrap();
    let direct = receive_ids(&away, 10).await;
    assert_eq!(
        direct.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [4],
        "only the direct message comes before any subscription"
    );
    accept_all(&away, &direct).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), away.receive(10)).await.is_err());

    // Subscribing again releases that pattern's copies, in order, and only those.
    away.subscribe("orders.*").await.unwrap();
    let orders = receive_ids(&away, 10).await;
    assert_eq!(orders.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 3]);
    accept_all(&away, &orders).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), away.receive(10)).await.is_err());

    // Ending a subscription hands over the copies that waited for it (the host drops what no
    // subscription matches), so none waits for ever.
    away.unsubscribe("audit.>").await.unwrap();
    let audit = receive_ids(&away, 10).await;
    assert_eq!(audit.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [2]);
    accept_all(&away, &audit).await;
    assert_eq!(count(&path, "SELECT COUNT(*) FROM comms_mailbox"), 0);
    publisher.close().await.unwrap();
    away.close().await.unwrap();
}

//! The conformance suite against the PostgreSQL plugin as users load it
//! (`libcomms_postgres.so`, built on its own from `plugins/postgres`), with the PostgreSQL at
//! 127.0.0.1:5432 (database `test`, trust authentication). Every case applies: the plugin
//! declares ordered, acknowledgements, durable, native topics and reliable. Each test works in a
//! schema of its own and drops it at the end.

#[path = "support/postgres.rs"]
mod support;

use support::{psql, Schema};

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig},
    Node, PluginLibrary,
};
use comms_plugin_api::{Capabilities, ErrorCode, NodeId};
use comms_tests::{artifacts, broker_available, scratch_dir, write_config, POSTGRES};
use std::{
    process::Command,
    time::{Duration, Instant},
};

/// The two runs of the whole suite (loaded here, and `comms check` in a process of its own) take
/// turns: at once they would need about 120 connections in `concurrent_receivers`, more than
/// the server's default `max_connections` of 100, and share 2 cores.
static WHOLE_SUITE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_plugin_loaded_dynamically_passes_every_case() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let _turn = WHOLE_SUITE.lock().await;
    let schema = Schema::new("conformance");
    // A safety poll of 1 s: every wake-up the suite waits for must come from LISTEN/NOTIFY or a
    // lease, or the cases would be slow.
    let report = run_suite(&library, &SuiteConfig::new(schema.config("poll_ms = 1000\n"))).await;
    print!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    // A database connection has no links of comms' own to encrypt.
    assert_eq!(report.skipped_names(), ["encrypted_links"], "no other case may be skipped:\n{report}");
    let info = report.info.clone().expect("create_transport found the capabilities");
    for flag in [
        Capabilities::ORDERED,
        Capabilities::ACKNOWLEDGEMENTS,
        Capabilities::DURABLE,
        Capabilities::NATIVE_TOPICS,
        Capabilities::RELIABLE,
    ] {
        assert!(info.capabilities.contains(flag), "{:?} lacks {:?}", info.capabilities, flag.names());
    }
    assert_eq!(
        psql(&format!("SELECT count(*) FROM \"{}\".comms_mailbox WHERE owner IS NOT NULL", schema.0)),
        "0",
        "every transport released its leases on close"
    );
}

#[test]
fn comms_check_passes_on_the_plugin() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let plugin = artifacts().postgres_plugin();
    let _turn = WHOLE_SUITE.blocking_lock();
    let schema = Schema::new("check");
    let dir = scratch_dir("postgres-check");
    let config = write_config(&dir, "postgres.toml", &schema.config(""));
    let output = Command::new(&artifacts().comms_bin)
        .arg("check")
        .arg(plugin)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run comms");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(" 0 failed, 1 skipped"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_and_left_untouched() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("newer");
    let config = schema.config("");
    let node = NodeId::new("alice");
    let transport =
        library.new_transport(&node, "postgres", &config).await.unwrap_or_else(|error| panic!("{error}"));
    transport.close().await.unwrap();
    assert_eq!(psql(&format!("SELECT version FROM \"{}\".comms_schema_version", schema.0)), "3");
    psql(&format!("UPDATE \"{}\".comms_schema_version SET version = 99", schema.0));
    let error = match library.new_transport(&node, "postgres", &config).await {
        Ok(_) => panic!("a schema of version 99 was opened"),
        Err(error) => error,
    };
    assert_eq!(error.code, ErrorCode::UNSUPPORTED, "{error}");
    assert!(error.message.contains("version 99") && error.message.contains("upgrade the plugin"), "{error}");
    assert!(error.message.contains(&schema.0), "names the schema: {error}");
    assert_eq!(
        psql(&format!("SELECT version FROM \"{}\".comms_schema_version", schema.0)),
        "99",
        "untouched"
    );
}

/// Takes `count` messages from `transport` (claims them without settling), or fails after 10 s.
async fn take(transport: &comms_plugin_api::host_side::LoadedTransport, count: usize) -> Vec<Vec<u8>> {
    let taking = async {
        let mut payloads = Vec::new();
        while payloads.len() < count {
            let batch = transport
                .receive((count - payloads.len()) as u32)
                .await
                .unwrap_or_else(|error| panic!("{error}"));
            assert!(!batch.is_empty(), "an open transport's receive returned nothing");
            payloads.extend(batch.into_iter().map(|inbound| inbound.envelope.payload.as_slice().to_vec()));
        }
        payloads
    };
    tokio::time::timeout(Duration::from_secs(10), taking)
        .await
        .unwrap_or_else(|_| panic!("{count} messages not taken within 10 s"))
}

/// Schema version 3 dropped version 1's index on `owner`: a schema of version 2 is migrated,
/// and a closing receiver still frees at once the messages it claimed and did not settle (now
/// found through `recipient`), and only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_schema_is_migrated_and_a_closing_receiver_frees_what_it_claimed() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("release");
    let s = &schema.0;
    // Leases far longer than the test: a claimed message comes back only if its receiver frees it.
    let config = schema.config("lease_ms = 600000\n");
    let open = |node: &'static str| {
        let (library, config) = (library.clone(), config.clone());
        async move { library.new_transport(&NodeId::new(node), "postgres", &config).await }
    };
    open("alice").await.unwrap_or_else(|error| panic!("{error}")).close().await.unwrap();
    psql(&format!(
        "UPDATE \"{s}\".comms_schema_version SET version = 2;
         CREATE INDEX comms_mailbox_by_owner ON \"{s}\".comms_mailbox (owner) WHERE owner IS NOT NULL"
    ));
    let alice = open("alice").await.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(psql(&format!("SELECT version FROM \"{s}\".comms_schema_version")), "3");
    let owner_index = format!(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = '{s}' AND indexname = 'comms_mailbox_by_owner'"
    );
    assert_eq!(psql(&owner_index), "0", "migration 3 drops the index on owner");

    for (node, payload) in [("alice", "01"), ("alice", "02"), ("alice", "03"), ("bob", "04")] {
        psql(&format!("SELECT \"{s}\".comms_send('{node}', '\\x{payload}'::bytea)"));
    }
    let bob = open("bob").await.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(take(&bob, 1).await, [vec![4u8]]);
    let mut taken = take(&alice, 3).await;
    taken.sort();
    assert_eq!(taken, [vec![1u8], vec![2], vec![3]]);
    alice.close().await.unwrap();

    let again = open("alice").await.unwrap_or_else(|error| panic!("{error}"));
    let mut retaken = take(&again, 3).await;
    retaken.sort();
    assert_eq!(retaken, taken, "the closed receiver's claims are free again at once");
    let bobs = psql(&format!(
        "SELECT count(*) FROM \"{s}\".comms_mailbox WHERE recipient = 'bob' AND owner IS NOT NULL"
    ));
    assert_eq!(bobs, "1", "alice's close leaves bob's claim alone");
    again.close().await.unwrap();
    bob.close().await.unwrap();
}

/// A hello, heartbeat or goodbye replaces the older one waiting in the same mailbox (the
/// plugin's replacing insert), so heartbeats to a node that never runs do not pile up; an
/// application message is never replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_waits_for_a_node_that_never_runs_stays_bounded() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let schema = Schema::new("ghost");
    let s = &schema.0;
    let alice = Node::builder("alice")
        .liveness(Some(Duration::from_millis(20)), Duration::from_secs(2))
        .transport_library("postgres", library.clone(), &schema.config(""))
        .static_peer("ghost", [("postgres", "ghost")])
        .build()
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    for n in 0..3u8 {
        alice.send_raw("ghost", Vec::<(String, String)>::new(), vec![n], None).await.unwrap();
    }
    // Every row ever written draws a new id: wait until 50 more were written (heartbeats).
    let written =
        || -> i64 { psql(&format!("SELECT last_value FROM \"{s}\".comms_mailbox_id_seq")).parse().unwrap() };
    let first = written();
    let started = Instant::now();
    while written() < first + 50 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "alice wrote {} rows in 20 s",
            written() - first
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting = || {
        psql(&format!(
            "SELECT coalesce(replace_key, 'application') || '=' || count(*) FROM \"{s}\".comms_mailbox
             WHERE recipient = 'ghost' GROUP BY replace_key ORDER BY 1"
        ))
    };
    let expected = "application=3\nheartbeat:alice=1\nhello:alice=1";
    // Two heartbeats written in one batch both stay until the next one replaces them: look
    // again for a moment before calling it a pile.
    let mut seen = waiting();
    while seen != expected && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = waiting();
    }
    assert_eq!(seen, expected, "every application message, the newest heartbeat and hello");
    alice.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_the_key_and_an_unreachable_server_fails_clearly_without_the_password() {
    let library =
        PluginLibrary::load(artifacts().postgres_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let node = NodeId::new("alice");
    let open = |config: String| {
        let library = &library;
        let node = &node;
        async move {
            match library.new_transport(node, "postgres", &config).await {
                Ok(_) => panic!("opened with {config}"),
                Err(error) => error,
            }
        }
    };
    let error = open("lease = 5\n".into()).await;
    assert!(error.message.contains("`lease`"), "{error}");
    let error = open("schema = \"no-dashes\"\n".into()).await;
    assert_eq!(error.code, ErrorCode::INVALID_CONFIG);
    assert!(error.message.contains("key `schema`"), "{error}");
    let error = open("url = \"postgres://u@h:notaport/db\"\n".into()).await;
    assert!(error.message.contains("key `url`"), "{error}");

    // Nothing listens on port 9 of loopback: refused at once, so the attempts are quick.
    let closed_port = "postgres://app:s3cret-password@127.0.0.1:9/test";
    let started = std::time::Instant::now();
    let error = open(format!("url = \"{closed_port}\"\nconnect_attempts = 3\n")).await;
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.retryable, "{error}");
    assert!(error.message.contains("after 3 attempts") && error.message.contains("127.0.0.1:9"), "{error}");
    assert!(!error.message.contains("s3cret"), "the password leaked: {error}");
    // Backoff: 100 ms then 200 ms between the three attempts.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "no backoff: {:?}",
        started.elapsed()
    );
}

/// With `requeue_delay_ms`, a message the receiver requeues can be claimed again after its delay,
/// doubled at each delivery, not at once: and an idle receiver takes it then, by the lease it saw
/// end, not at its safety poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_message_comes_again_after_its_delay_doubled_per_delivery() {
    if !broker_available("PostgreSQL", POSTGRES) {
        return;
    }
    let library = comms_plugin_api::host_side::PluginLibrary::load(artifacts().postgres_plugin()).unwrap();
    let schema = Schema::new("requeue_delay");
    let config = schema.config("requeue_delay_ms = 300\npoll_ms = 20000\n");
    let node = "rd-receiver";
    let receiver = library.new_transport(&NodeId::new(node), "postgres", &config).await.unwrap();
    let gaps = comms_plugin_api::testing::gaps_between_deliveries(
        &receiver,
        (node, node),
        3,
        Duration::from_secs(15),
    )
    .await
    .unwrap();
    // At once (the old behaviour) would be a few milliseconds; the safety poll 20 s.
    assert!(gaps[0] >= Duration::from_millis(300), "after the 1st delivery: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(600), "after the 2nd, doubled: {gaps:?}");
    assert!(gaps.iter().all(|gap| *gap < Duration::from_secs(5)), "well before the safety poll: {gaps:?}");
    let waiting = psql(&format!("SELECT count(*) FROM \"{}\".comms_mailbox", schema.0));
    assert_eq!(waiting, "0", "the last delivery was accepted");
    receiver.close().await.unwrap();
}

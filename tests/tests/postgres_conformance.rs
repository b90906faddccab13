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
    PluginLibrary,
};
use comms_plugin_api::{Capabilities, ErrorCode, NodeId};
use comms_tests::{artifacts, broker_available, scratch_dir, write_config, POSTGRES};
use std::process::Command;

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
    assert_eq!(psql(&format!("SELECT version FROM \"{}\".comms_schema_version", schema.0)), "2");
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

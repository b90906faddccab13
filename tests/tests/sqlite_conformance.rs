//! The conformance suite against the SQLite plugin as users load it (`libcomms_sqlite.so`): every
//! case applies (it declares ordered, acknowledgements, durable, native topics, reliable) and every
//! case must pass.

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig},
    PluginLibrary,
};
use comms_plugin_api::Capabilities;
use comms_tests::{artifacts, scratch_dir};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_plugin_passes_every_case() {
    let dir = scratch_dir("sqlite-conformance");
    let config = format!("database = {:?}", dir.join("comms.db"));
    let library = PluginLibrary::load(&artifacts().sqlite_plugin).unwrap_or_else(|error| panic!("{error}"));
    let report = run_suite(&library, &SuiteConfig::new(config)).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    // A database file has no links to encrypt.
    assert_eq!(
        report.skipped_names(),
        ["batches_and_sends_at_once", "encrypted_links"],
        "only the cases of capabilities it lacks are skipped:\n{report}"
    );
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
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sqlite_plugin_passes_from_a_current_thread_runtime_with_fsync_on_every_commit() {
    let dir = scratch_dir("sqlite-conformance-full");
    let config = format!("database = {:?}\nsynchronous = \"full\"\npoll_max_ms = 20", dir.join("comms.db"));
    let library = PluginLibrary::load(&artifacts().sqlite_plugin).unwrap_or_else(|error| panic!("{error}"));
    // Twice the default time per case: every commit here waits for the disk, and
    // `concurrent_receivers` (55 transports, each with its own database thread, taking turns at
    // one database's write lock) took longer than the default's 24 s for its messages on a
    // machine with twice as much work as cores (4,094 of 5,000 had arrived, the rest still being
    // sent). What this test checks is that nothing is lost or refused with fsync on every
    // commit; the default suite above checks the pace.
    let suite = SuiteConfig { case_timeout: Duration::from_secs(60), ..SuiteConfig::new(config) };
    let report = run_suite(&library, &suite).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.skipped_names(), ["batches_and_sends_at_once", "encrypted_links"], "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

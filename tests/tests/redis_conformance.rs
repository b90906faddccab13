//! The conformance suite against the Redis plugin as users load it (`libcomms_redis.so`), with
//! the Redis at 127.0.0.1:6379. Every case applies: the plugin declares ordered,
//! acknowledgements, durable, native topics and reliable.

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig},
    PluginLibrary,
};
use comms_tests::{artifacts, broker_available};

const REDIS: &str = "127.0.0.1:6379";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_plugin_loaded_dynamically_passes_every_case() {
    if !broker_available("Redis", REDIS) {
        return;
    }
    let library = PluginLibrary::load(&artifacts().redis_plugin).unwrap_or_else(|error| panic!("{error}"));
    // A key prefix of this run's own (deleted at the end), and a short claim time so that
    // nothing in the suite waits long for a redelivery.
    let prefix =
        format!("comms-test-{}-{:06x}-conformance", std::process::id(), rand::random::<u32>() & 0xff_ffff);
    let config =
        format!("url = \"redis://{REDIS}\"\nprefix = \"{prefix}\"\nclaim_idle_ms = 2000\nblock_ms = 200\n");
    let report = run_suite(&library, &SuiteConfig::new(config)).await;
    print!("{report}");
    comms_tests::delete_redis_keys(&prefix).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "{report}");
    // Encryption is checked only with link security of the suite's own (TLS: broker_tls.rs).
    assert_eq!(
        report.skipped_names(),
        ["batches_and_sends_at_once", "encrypted_links"],
        "only the cases of capabilities it lacks are skipped: {report}"
    );
}

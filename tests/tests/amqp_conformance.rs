//! The conformance suite against the AMQP plugin as users load it, on the RabbitMQ of this
//! machine (127.0.0.1:5672, guest/guest).

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig},
    PluginLibrary,
};
use comms_plugin_api::Capabilities;
use comms_tests::{artifacts, broker_available};

/// Inboxes the suite creates disappear from the broker ten minutes after their node closed.
const CONFIG: &str = "inbox_expires_ms = 600000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_plugin_passes_every_case_with_every_capability() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let library = PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"));
    let report = run_suite(&library, &SuiteConfig::new(CONFIG)).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    // Encryption needs TLS to the broker, which this config does not use.
    assert_eq!(
        report.skipped_names(),
        ["batches_and_sends_at_once", "encrypted_links"],
        "only the cases of capabilities it lacks are skipped:\n{report}"
    );
    let declared = report.info.as_ref().map(|info| info.capabilities).unwrap_or_default();
    assert_eq!(
        declared,
        Capabilities::ORDERED
            | Capabilities::ACKNOWLEDGEMENTS
            | Capabilities::DURABLE
            | Capabilities::NATIVE_TOPICS
            | Capabilities::RELIABLE,
        "{report}"
    );
}

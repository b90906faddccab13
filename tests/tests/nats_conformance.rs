//! The conformance suite against the NATS plugin as users load it (`libcomms_nats.so`, built on
//! its own from `plugins/nats`), with the NATS server (JetStream on) at 127.0.0.1:4222. Every
//! case applies but `encrypted_links`: the plugin declares ordered, acknowledgements, durable,
//! native topics and reliable. Each test works in a stream and subject prefix of its own,
//! deleted at the end.

#[path = "support/nats.rs"]
mod support;

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig},
    PluginLibrary,
};
use comms_tests::{artifacts, broker_available, scratch_dir, write_config, NATS};
use std::process::Command;
use support::Deployment;

/// A short redelivery time, so that nothing in the suite waits long for one.
const SUITE_SETTINGS: &str = "ack_wait_ms = 2000\nfetch_expires_ms = 1000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_plugin_loaded_dynamically_passes_every_case() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let deployment = Deployment::new(NATS, "conformance");
    let report = run_suite(&library, &SuiteConfig::new(deployment.transport_config(SUITE_SETTINGS))).await;
    print!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    // Encryption is checked only with link security of the suite's own; the plugin does not
    // declare it (TLS to the server does not hide messages from its other clients).
    assert_eq!(report.skipped_names(), ["encrypted_links"], "no other case may be skipped: {report}");
}

#[test]
fn comms_check_passes_on_the_nats_plugin() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let deployment = Deployment::new(NATS, "check");
    let dir = scratch_dir("nats-check");
    let config = write_config(&dir, "nats.toml", &deployment.transport_config(SUITE_SETTINGS));
    let output = Command::new(&artifacts().comms_bin)
        .arg("check")
        .arg(artifacts().nats_plugin())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run comms");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for case in cases() {
        let line = stdout
            .lines()
            .find(|line| line.split(' ').nth(1).map(|name| name.trim_end_matches(':')) == Some(case.name))
            .unwrap_or_else(|| panic!("no line for {}:\n{stdout}", case.name));
        let expected = if case.name == "encrypted_links" { "SKIP " } else { "PASS " };
        assert!(line.starts_with(expected), "{line}\n{stdout}");
    }
}

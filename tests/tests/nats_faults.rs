//! Faults of the NATS transport, for real: a nats-server of the test's own (JetStream on, its
//! own store directory, a free port) killed and restarted in the middle of a stream. No message
//! whose `send` returned may be lost, the sends wait for the server instead of failing, and the
//! receiver resumes on its own. Also: a server that is not there at start is retried, then
//! named without the password.

use comms_plugin_api::{host_side::PluginLibrary, ErrorCode, NodeId};
use comms_tests::{artifacts, free_address, scratch_dir};
use restart_mid_stream::{OwnServer, Restart};
use std::time::{Duration, Instant};
use support::OwnNats;

#[path = "support/restart_mid_stream.rs"]
mod restart_mid_stream;
#[path = "support/nats.rs"]
mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream_loses_no_acknowledged_message() {
    let dir = scratch_dir("nats-restart");
    let Some(nats) = OwnNats::start(&dir) else { return };
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let config = format!(
        "url = \"{}\"\nack_wait_ms = 1000\nfetch_expires_ms = 500\nrequest_timeout_ms = 1000\n",
        nats.url()
    );
    let case = Restart {
        plugin: "nats",
        server_name: "the NATS server",
        library: &library,
        config: &config,
        send_limit: Duration::from_secs(30),
        // The plugin keeps its pull consumer across the outage: a receive waits, it never fails.
        receive_may_fail: false,
    };
    restart_mid_stream::nothing_acknowledged_is_lost(case, nats).await;
}

impl OwnServer for OwnNats {
    fn kill(&mut self) {
        OwnNats::kill(self);
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        OwnNats::spawn(self)
    }
}

#[tokio::test]
async fn unreachable_nats_at_start_is_retried_then_named_without_the_password() {
    // Nothing listens on this port.
    let address = free_address();
    let config = format!("url = \"nats://admin:t0p-s3cret@{address}\"\nconnect_attempts = 3\n");
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let started = Instant::now();
    let error = library
        .new_transport(&NodeId::new("nobody"), "nats", &config)
        .await
        .map(drop)
        .expect_err("nothing listens there");
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.message.contains("after 3 attempts"), "{error}");
    assert!(error.message.contains(&address), "the error names the server: {error}");
    assert!(!error.message.contains("t0p-s3cret"), "the password leaked: {error}");
    // Two pauses between three attempts: 100 ms, then 200 ms.
    assert!(started.elapsed() >= Duration::from_millis(300), "no backoff between the attempts");
}

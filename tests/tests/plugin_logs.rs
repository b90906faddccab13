//! A dynamically loaded plugin logs through the host: its records reach the host's `tracing`
//! subscriber, filtered by the host's rules with the plugin's own targets, and a panic inside it
//! is one log line, not Rust's banner.
//!
//! The plugin is `libcomms_fixture_panicking.so`, loaded from disk: its copy of `tracing` and of
//! std are its own, so nothing but the forwarding of the contract can bring its records here.

use comms_host::{Node, PluginLibrary};
use comms_tests::{artifacts, capture_logs};
use std::process::Command;

#[tokio::test]
async fn plugin_records_reach_the_host_subscriber_filtered_by_the_host_rules() {
    // The rule names the plugin's own target: debug for it, warn for everything else.
    let captured = capture_logs("warn,comms_fixture_panicking=debug");

    let library = PluginLibrary::load(&artifacts().panicking_plugin).unwrap();
    let node = Node::builder("logs").transport_library("loop", library, "").build().await.unwrap();
    node.close().await.unwrap();

    let text = captured.text();
    let line = text
        .lines()
        .find(|line| line.contains("loop transport ready"))
        .unwrap_or_else(|| panic!("the plugin's debug record did not reach the host's log:\n{text}"));
    assert!(
        line.contains("DEBUG comms_fixture_panicking: loop transport ready, panicking in Nothing node=logs"),
        "formatted like the host's own records, with the plugin's target and fields: {line}"
    );
    assert!(!text.contains("(trace)"), "a level the host's rule filters out is not forwarded:\n{text}");
}

/// Runs `scenario` of this file in a child process and returns its standard error.
fn child_stderr(scenario: &str, backtrace: bool) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", "panic_scenario", "--nocapture", "--test-threads", "1"]);
    command.env("COMMS_PANIC_SCENARIO", scenario);
    if backtrace {
        command.env("RUST_BACKTRACE", "1");
    } else {
        command.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "the child failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stderr).unwrap()
}

/// The child side of [`a_panic_in_a_plugin_is_one_log_line`]: does nothing unless the parent
/// asked for a scenario.
#[test]
fn panic_scenario() {
    let Ok(scenario) = std::env::var("COMMS_PANIC_SCENARIO") else { return };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let library = PluginLibrary::load(&artifacts().panicking_plugin).unwrap();
        let config = format!("panic_in = \"{scenario}\"");
        let node = Node::builder("panics").transport_library("loop", library, &config).build().await.unwrap();
        for _ in 0..3 {
            assert!(node.send("panics", "boom").await.is_err(), "the panic comes back as an error");
        }
        node.close().await.unwrap();
    });
}

#[test]
fn a_panic_in_a_plugin_is_one_log_line() {
    let _ = artifacts();
    let stderr = child_stderr("send", false);
    let panics: Vec<&str> = stderr.lines().filter(|line| line.contains("panicked")).collect();
    assert_eq!(panics.len(), 3, "one line per panic:\n{stderr}");
    for line in &panics {
        assert!(line.contains("ERROR comms_plugin::panic: plugin panicking panicked at "), "{line}");
        assert!(line.contains("deliberate panic in send"), "{line}");
        assert!(line.contains("RUST_BACKTRACE=1"), "says how to get the backtrace: {line}");
    }
    assert!(!stderr.contains("thread '"), "no Rust panic banner:\n{stderr}");
    assert!(!stderr.contains("stack backtrace"), "no backtrace unless asked:\n{stderr}");

    let with_backtrace = child_stderr("send", true);
    assert!(!with_backtrace.contains("thread '"), "no Rust panic banner:\n{with_backtrace}");
    assert!(
        with_backtrace.lines().count() > stderr.lines().count() + 3,
        "RUST_BACKTRACE=1 adds the backtrace to the record:\n{with_backtrace}"
    );
}

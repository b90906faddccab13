//! The conformance suite against every transport plugin as users load it (`.so` files), through
//! the library API and through `comms check`.

use comms_host::{
    conformance::{cases, run_suite, CaseOutcome, SuiteConfig, SuiteReport},
    PluginLibrary,
};
use comms_plugin_api::Capabilities;
use comms_tests::{artifacts, scratch_dir, write_config, ORDERED_RELIABLE_SKIPS, POINT_TO_POINT_SKIPS};
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

async fn suite(plugin: &Path, config_toml: &str) -> SuiteReport {
    let library = PluginLibrary::load(plugin).unwrap_or_else(|error| panic!("{error}"));
    run_suite(&library, &SuiteConfig::new(config_toml)).await
}

fn assert_passes_skipping(report: &SuiteReport, skips: &[&str]) {
    assert!(report.passed(), "{}:\n{report}", report.plugin);
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    assert_eq!(report.skipped_names(), skips, "{}:\n{report}", report.plugin);
    for case in &report.cases {
        assert!(case.passed() || case.skipped(), "{case}");
    }
}

fn assert_passes_point_to_point(report: &SuiteReport) {
    assert_passes_skipping(report, &POINT_TO_POINT_SKIPS);
}

// The host must work from a current-thread runtime (tokio's test default) and a multi-thread
// one alike; the plugins are spread over both.

#[tokio::test]
async fn tcp_plugin_loaded_dynamically_passes() {
    assert_passes_point_to_point(&suite(&artifacts().tcp_plugin, "").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_uds_plugin_passes() {
    assert_passes_point_to_point(&suite(&artifacts().uds_plugin, "").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_plugin_loaded_dynamically_passes() {
    let report = suite(&artifacts().memory_plugin, "").await;
    assert_passes_skipping(&report, &ORDERED_RELIABLE_SKIPS);
    let declared = report.info.as_ref().map(|info| info.capabilities).unwrap_or_default();
    assert_eq!(declared, Capabilities::ORDERED | Capabilities::RELIABLE, "{report}");
}

/// The reliability case, alone and with a short time limit (a failing run waits for it).
async fn reliable_delivery(plugin: &Path, config_toml: &str, assume: Capabilities) -> SuiteReport {
    let library = PluginLibrary::load(plugin).unwrap_or_else(|error| panic!("{error}"));
    let config = SuiteConfig {
        filter: Some("reliable_delivery".into()),
        assume,
        case_timeout: Duration::from_secs(15),
        ..SuiteConfig::new(config_toml)
    };
    run_suite(&library, &config).await
}

/// UDP in reliable mode declares `reliable` and keeps it through a cut link (its address is
/// ip:port, so the relay phase runs), where the same plugin in best-effort mode fails the case
/// when told to assume it (and TCP, which does not declare it, fails it whenever the cut took
/// messages in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_delivery_passes_reliable_udp_and_fails_best_effort_transports() {
    let report =
        reliable_delivery(&artifacts().udp_plugin, "listen = \"127.0.0.1:0\"", Capabilities::NONE).await;
    let case = report.case("reliable_delivery").expect("reported");
    assert!(case.passed(), "{report}");
    assert!(!case.notes.iter().any(|note| note.contains("link outage was not checked")), "{case}");

    // Best-effort UDP loses every datagram the relay drops during the outage: the case must see it.
    let report = reliable_delivery(
        &artifacts().udp_plugin,
        "listen = \"127.0.0.1:0\"\nmode = \"best-effort\"",
        Capabilities::RELIABLE,
    )
    .await;
    let case = report.case("reliable_delivery").expect("reported");
    match &case.outcome {
        CaseOutcome::Failed(why) => assert!(why.contains("missing"), "{why}"),
        other => panic!("{}: reliable_delivery should fail, got {other:?}\n{report}", report.plugin),
    }

    // TCP loses what was in flight when the link was cut, if anything was: on a loaded machine
    // the receiver may have taken everything in before the cut (its reader drains the socket
    // even while the host does not receive), and the messages after it are written again after
    // reconnecting. When it does lose, the case must say what is missing.
    let report =
        reliable_delivery(&artifacts().tcp_plugin, "listen = \"127.0.0.1:0\"", Capabilities::RELIABLE).await;
    let case = report.case("reliable_delivery").expect("reported");
    if let CaseOutcome::Failed(why) = &case.outcome {
        assert!(why.contains("missing"), "{why}");
    }
}

#[tokio::test]
async fn tcp_plugin_passes_with_an_explicit_config() {
    let report = suite(&artifacts().tcp_plugin, "listen = \"127.0.0.1:0\"\nmax_frame_size = 65536").await;
    assert_passes_point_to_point(&report);
    assert_eq!(
        report.info.map(|info| info.max_message_size),
        Some(65536 - 1024),
        "max_frame_size minus the room reserved for the envelope header"
    );
}

fn comms_check(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(&artifacts().comms_bin).arg("check").args(args).output().expect("run comms");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8 output");
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[test]
fn comms_check_on_tcp_prints_one_line_per_case_and_succeeds() {
    let dir = scratch_dir("check-tcp");
    let config = write_config(&dir, "tcp.toml", "listen = \"127.0.0.1:0\"\n");
    let tcp = artifacts().tcp_plugin.to_str().unwrap();
    for args in [vec![tcp], vec![tcp, "--config", config.to_str().unwrap()]] {
        let (success, stdout, stderr) = comms_check(&args);
        assert!(success, "{stdout}\n{stderr}");
        for case in cases() {
            let line = stdout
                .lines()
                .find(|line| line.split(' ').nth(1).map(|n| n.trim_end_matches(':')) == Some(case.name));
            let line = line.unwrap_or_else(|| panic!("no line for {}:\n{stdout}", case.name));
            let expected = if POINT_TO_POINT_SKIPS.contains(&case.name) { "SKIP " } else { "PASS " };
            assert!(line.starts_with(expected), "{line}");
        }
        assert_eq!(stdout.lines().last(), Some("12 passed, 0 failed, 7 skipped"), "{stdout}");
        assert!(
            stdout.contains("SKIP redelivery_after_reject: needs capability acknowledgements"),
            "{stdout}"
        );
    }
}

#[test]
fn comms_check_fails_clearly_on_a_file_that_is_not_a_plugin() {
    let dir = scratch_dir("check-not-a-plugin");
    let file = write_config(&dir, "libcomms_fake.so", "not an ELF file");
    let (success, stdout, stderr) = comms_check(&[file.to_str().unwrap()]);
    assert!(!success);
    assert!(stdout.is_empty(), "nothing runs: {stdout}");
    assert!(stderr.contains(&format!("{} is not a comms plugin", file.display())), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    let (success, _, stderr) = comms_check(&[dir.join("missing.so").to_str().unwrap()]);
    assert!(!success);
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn comms_check_reports_a_config_the_plugin_refuses_as_a_failure() {
    let dir = scratch_dir("check-bad-config");
    let tcp = artifacts().tcp_plugin.to_str().unwrap();

    let bad_key = write_config(&dir, "bad-key.toml", "lisen = \"127.0.0.1:0\"\n");
    let (success, stdout, _) = comms_check(&[tcp, "--config", bad_key.to_str().unwrap()]);
    assert!(!success, "{stdout}");
    let create =
        stdout.lines().find(|l| l.starts_with("FAIL create_transport: ")).expect("create_transport fails");
    assert!(create.contains("lisen"), "names the key: {create}");
    assert_eq!(stdout.lines().last(), Some("0 passed, 1 failed, 18 skipped"), "{stdout}");

    let not_toml = write_config(&dir, "not-toml.toml", "listen = \n");
    let (success, stdout, stderr) = comms_check(&[tcp, "--config", not_toml.to_str().unwrap()]);
    assert!(!success);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("not-toml.toml line 1"), "{stderr}");
}

/// A plugin that sleeps on the host's thread in `receive` (here for 5 s per call): `comms check`
/// names it in `no_blocking_polls`, in the poll watch's words, and stops early instead of
/// running every case into its time limit and blaming lost messages.
#[test]
fn comms_check_fails_a_plugin_that_blocks_the_thread_quickly_and_names_it() {
    let dir = scratch_dir("check-blocking");
    let config = write_config(&dir, "blocking.toml", "block_in = \"receive\"\nblock_ms = 5000\n");
    let plugin = artifacts().panicking_plugin.to_str().unwrap();
    let started = Instant::now();
    let (success, stdout, _) = comms_check(&[plugin, "--config", config.to_str().unwrap()]);
    let took = started.elapsed();
    assert!(!success, "{stdout}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{stdout}");
    assert!(stdout.lines().any(|line| line == "PASS create_transport"), "{stdout}");
    let verdict = stdout.lines().find(|line| line.starts_with("FAIL no_blocking_polls: ")).expect("reported");
    assert!(
        verdict.contains(
            "plugin panicking blocked a thread for 5.0 s in receive: use tokio::time or spawn_blocking"
        ),
        "{verdict}"
    );
    assert!(!stdout.contains("missing"), "no lost messages are blamed: {stdout}");
    let not_run = stdout.lines().filter(|line| line.contains(": not run: plugin panicking blocks")).count();
    assert!(not_run >= 10, "the cases after the blocking one are not run:\n{stdout}");
    eprintln!("comms check of a blocking plugin took {took:?}");
}

/// `comms check --list` prints every case, what it checks and what turns it on, as the
/// Markdown table docs/writing-a-plugin.md carries.
#[test]
fn comms_check_lists_every_case_with_the_capability_that_turns_it_on() {
    let output = Command::new(&artifacts().comms_bin).args(["check", "--list"]).output().expect("run comms");
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");
    assert_eq!(stdout.lines().count(), cases().len() + 2, "{stdout}");
    for case in cases() {
        let row = stdout.lines().find(|line| line.starts_with(&format!("| `{}` |", case.name)));
        let row = row.unwrap_or_else(|| panic!("no row for {}:\n{stdout}", case.name));
        assert!(row.contains(case.summary), "{row}");
    }
    for (case, flag) in [
        ("order_per_sender", "`ordered`"),
        ("redelivery_after_reject", "`acknowledgements`"),
        ("durable_resume", "`durable`"),
        ("reliable_delivery", "`reliable`"),
        ("topic_isolation", "`native-topics`"),
        ("encrypted_links", "`encrypted`"),
        ("no_blocking_polls", "always"),
    ] {
        let row = stdout.lines().find(|line| line.starts_with(&format!("| `{case}` |"))).expect("listed");
        assert!(row.ends_with(&format!("| {flag} |")), "{row}");
    }
}

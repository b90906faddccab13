//! The conformance suite against every transport plugin as users load it (`.so` files), through
//! the library API and through `comms check`.

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig, SuiteReport},
    PluginLibrary,
};
use comms_tests::{artifacts, scratch_dir, write_config};
use std::{path::Path, process::Command};

/// What a point-to-point transport without acknowledgements, durability or native topics skips.
const POINT_TO_POINT_SKIPS: [&str; 4] =
    ["redelivery_after_reject", "durable_resume", "topic_isolation", "topic_fan_out"];

async fn suite(plugin: &Path, config_toml: &str) -> SuiteReport {
    let library = PluginLibrary::load(plugin).unwrap_or_else(|error| panic!("{error}"));
    run_suite(&library, &SuiteConfig::new(config_toml)).await
}

fn assert_passes_point_to_point(report: &SuiteReport) {
    assert!(report.passed(), "{}:\n{report}", report.plugin);
    assert_eq!(report.cases.len(), cases().len(), "every case is reported:\n{report}");
    assert_eq!(report.skipped_names(), POINT_TO_POINT_SKIPS, "{}:\n{report}", report.plugin);
    for case in &report.cases {
        assert!(case.passed() || case.skipped(), "{case}");
    }
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
    assert_passes_point_to_point(&suite(&artifacts().memory_plugin, "").await);
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
        assert_eq!(stdout.lines().last(), Some("9 passed, 0 failed, 4 skipped"), "{stdout}");
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
    assert_eq!(stdout.lines().last(), Some("0 passed, 1 failed, 12 skipped"), "{stdout}");

    let not_toml = write_config(&dir, "not-toml.toml", "listen = \n");
    let (success, stdout, stderr) = comms_check(&[tcp, "--config", not_toml.to_str().unwrap()]);
    assert!(!success);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("not-toml.toml line 1"), "{stderr}");
}

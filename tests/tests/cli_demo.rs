//! The README's first command: `comms demo` runs with no setup and exits successfully.

use comms_tests::artifacts;

#[test]
fn comms_demo_exchanges_messages_over_the_loaded_plugin() {
    let output = std::process::Command::new(&artifacts().comms_bin)
        .args(["demo", "--messages", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("loaded plugin `tcp`"), "{stdout}");
    assert_eq!(stdout.matches("alice <- bob").count(), 5, "{stdout}");
    assert!(stdout.contains("demo finished: 5 messages each way"), "{stdout}");
}

#[test]
fn comms_demo_says_how_to_build_the_plugin_when_it_is_missing() {
    let empty = comms_tests::scratch_dir("no-plugins");
    // A copy of the binary in a directory without plugins, so the executable's directory has none.
    let binary = empty.join("comms");
    std::fs::copy(&artifacts().comms_bin, &binary).unwrap();
    let output =
        std::process::Command::new(&binary).env_remove("COMMS_PLUGIN_PATH").arg("demo").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cargo build --workspace"), "{stderr}");
}

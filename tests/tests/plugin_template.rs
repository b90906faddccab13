//! `comms plugins new`: the crate it generates builds on its own, outside any workspace, and
//! passes `comms check` as generated.

use comms_tests::{artifacts, cargo, scratch_dir, target_dir, workspace_root};
use std::process::{Command, Output};

fn comms(args: &[&str]) -> Output {
    Command::new(&artifacts().comms_bin).args(args).output().expect("run comms")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_generated_plugin_builds_and_passes_comms_check() {
    let artifacts = artifacts();
    let crate_dir = scratch_dir("plugin-template").join("comms-template-probe");
    let dir = crate_dir.to_str().expect("a UTF-8 scratch path");

    let created = comms(&["plugins", "new", "template-probe", "--dir", dir]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    for file in ["Cargo.toml", "src/lib.rs", "README.md", ".gitignore"] {
        assert!(crate_dir.join(file).is_file(), "{file} generated");
    }
    let readme = std::fs::read_to_string(crate_dir.join("README.md")).unwrap();
    assert!(readme.contains("comms check target/debug/libcomms_template_probe.so"), "{readme}");

    // The versions the workspace is tested with (and built: its target directory already holds
    // most dependencies, which makes this build take seconds instead of minutes).
    std::fs::copy(workspace_root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    let manifest = crate_dir.join("Cargo.toml");
    cargo(&["build", "--manifest-path", manifest.to_str().unwrap()], &target_dir());
    let library = artifacts.plugin_dir.join(format!(
        "{}comms_template_probe{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(library.is_file(), "{} built", library.display());

    let check = Command::new(&artifacts.comms_bin).arg("check").arg(&library).output().unwrap();
    let stdout = text(&check.stdout);
    assert!(check.status.success(), "comms check failed:\n{stdout}\n{}", text(&check.stderr));
    let cases: Vec<&str> = stdout
        .lines()
        .filter(|line| ["PASS ", "FAIL ", "SKIP "].iter().any(|o| line.starts_with(o)))
        .collect();
    assert!(cases.len() >= 10, "every case reported:\n{stdout}");
    for case in &cases {
        let skipped_with_reason = case
            .strip_prefix("SKIP ")
            .is_some_and(|rest| rest.split_once(": ").is_some_and(|(_, why)| !why.is_empty()));
        assert!(case.starts_with("PASS ") || skipped_with_reason, "{case}\n{stdout}");
    }
    assert!(stdout.contains("PASS create_transport") && stdout.contains(" 0 failed"), "{stdout}");
    let _ = std::fs::remove_file(&library);
}

#[test]
fn nothing_is_overwritten_and_bad_names_are_refused() {
    let scratch = scratch_dir("plugin-template-refusals");
    let existing = scratch.join("taken");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "mine").unwrap();

    let refused = comms(&["plugins", "new", "probe", "--dir", existing.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("already exists") && stderr.contains("taken"), "{stderr}");
    assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 1, "nothing written");
    assert_eq!(std::fs::read_to_string(existing.join("keep.txt")).unwrap(), "mine");

    for bad in ["Probe", "my probe", "../probe", "9p"] {
        let dir = scratch.join("bad");
        let refused = comms(&["plugin", "new", bad, "--dir", dir.to_str().unwrap()]);
        assert!(!refused.status.success(), "{bad}");
        assert!(text(&refused.stderr).contains("invalid plugin name"), "{bad}: {}", text(&refused.stderr));
        assert!(!dir.exists(), "{bad}: nothing created");
    }

    let elsewhere = scratch.join("elsewhere");
    let not_api =
        comms(&["plugins", "new", "probe", "--dir", elsewhere.to_str().unwrap(), "--plugin-api", "/"]);
    assert!(!not_api.status.success());
    assert!(text(&not_api.stderr).contains("no comms-plugin-api at /"), "{}", text(&not_api.stderr));
    assert!(!elsewhere.exists());
}

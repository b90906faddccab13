//! Loading plugins at run time: several at once, plugins built for other versions of the
//! contract (an older minor, a newer minor: loaded; another major, a broken layout: refused
//! clearly), the host unharmed by any of it.

use comms_host::{
    conformance::{self, SuiteConfig},
    BuildError, Node, PluginLibrary,
};
use comms_plugin_api::host_side::LoadError;
use comms_tests::{artifacts, scratch_dir, write_config};
use std::process::Command;

/// What the wrong-layout fixture's refusal must say: its `Envelope` has one field more.
const ENVELOPE_MISMATCH: &str = "Transport::send(envelope): Envelope has 8 fields, this host expects 7";

/// What the next-minor fixture has that this host does not know.
const NEXT_MINOR_ADDITIONS: &str = "PluginModule::config_help, Transport::flush";

/// abi_stable's words, which no message of the loader may contain.
const ABI_STABLE_WORDS: [&str; 4] = ["param_", "VTable", "__returns", "_TO"];

#[tokio::test]
async fn two_separately_built_plugins_work_in_one_host_at_once() {
    let artifacts = artifacts();
    let dir = scratch_dir("two-plugins");
    let tcp = PluginLibrary::load(&artifacts.tcp_plugin).expect("tcp loads");
    let uds = PluginLibrary::load(&artifacts.uds_plugin).expect("uds (third-party, built on its own) loads");
    assert_eq!(tcp.description().name, "tcp");
    assert_eq!(uds.description().name, "uds");

    let b_socket = dir.join("b.sock");
    let b_socket = b_socket.to_str().unwrap();
    let b = Node::builder("b")
        .transport_library("uds", uds.clone(), &format!("listen = {b_socket:?}"))
        .build()
        .await
        .unwrap();
    let c = Node::builder("c").transport_library("tcp", tcp.clone(), "").build().await.unwrap();
    let c_address = c.transports()[0].local_address.clone();
    // `a` has both transports and reaches each peer through the one that peer listens on.
    let a_socket = dir.join("a.sock");
    let a = Node::builder("a")
        .transport_library("tcp", tcp, "")
        .transport_library("uds", uds, &format!("listen = {:?}", a_socket.to_str().unwrap()))
        .static_peer("b", [("uds", b_socket)])
        .static_peer("c", [("tcp", c_address.as_str())])
        .build()
        .await
        .unwrap();
    let plugins: Vec<String> = a.transports().into_iter().map(|t| t.plugin).collect();
    assert_eq!(plugins, ["tcp", "uds"]);

    for i in 0..100u32 {
        a.send("b", &format!("to b over uds {i}")).await.unwrap();
        a.send("c", &format!("to c over tcp {i}")).await.unwrap();
    }
    for i in 0..100u32 {
        assert_eq!(b.receive::<String>().await.unwrap().message, format!("to b over uds {i}"));
        assert_eq!(c.receive::<String>().await.unwrap().message, format!("to c over tcp {i}"));
    }
    for node in [a, b, c] {
        node.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_plugin_built_from_the_frozen_contract_1_0_loads_and_passes_the_conformance_suite() {
    let path = &artifacts().contract_fixtures().v1_plugin;
    let library = PluginLibrary::load(path).expect("a plugin built for contract 1.0 loads");
    let description = library.description();
    assert_eq!(description.name, "fixture-v1");
    assert_eq!(description.interface_version.to_string(), "1.0");
    let report = conformance::run_suite(&library, &SuiteConfig::default()).await;
    assert!(report.passed(), "{report}");
    // It declares ordered delivery: the suite checked it.
    assert!(report.case("order_per_sender").is_some_and(|case| case.passed()), "{report}");
}

#[test]
fn comms_check_passes_the_frozen_v1_plugin() {
    let artifacts = artifacts();
    let path = &artifacts.contract_fixtures().v1_plugin;
    let output = Command::new(&artifacts.comms_bin).arg("check").arg(path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "comms check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[tokio::test]
async fn a_plugin_built_for_a_newer_minor_loads_works_and_the_host_names_what_it_will_not_use() {
    let path = &artifacts().contract_fixtures().next_minor_plugin;
    let library = PluginLibrary::load(path).expect("a plugin built for contract 1.3 loads into a 1.2 host");
    assert_eq!(library.description().interface_version.to_string(), "1.3");

    let b = Node::builder("b").transport_library("fixture", library.clone(), "").build().await.unwrap();
    let b_address = b.transports()[0].local_address.clone();
    let a = Node::builder("a")
        .transport_library("fixture", library, "")
        .static_peer("b", [("fixture", b_address.as_str())])
        .build()
        .await
        .unwrap();
    for i in 0..50u32 {
        a.send("b", &format!("through contract 1.3, {i}")).await.unwrap();
    }
    for i in 0..50u32 {
        assert_eq!(b.receive::<String>().await.unwrap().message, format!("through contract 1.3, {i}"));
    }
    for node in [a, b] {
        node.close().await.unwrap();
    }
}

#[test]
fn loading_a_newer_minor_logs_once_what_the_host_will_not_use_and_inspect_shows_it() {
    let artifacts = artifacts();
    let path = &artifacts.contract_fixtures().next_minor_plugin;
    let output = Command::new(&artifacts.comms_bin)
        .args(["plugins", "inspect"])
        .arg(path)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let logged: Vec<&str> = stderr.lines().filter(|line| line.contains("will not use")).collect();
    assert_eq!(logged.len(), 1, "logged once: {stderr}");
    assert!(logged[0].contains(NEXT_MINOR_ADDITIONS), "{}", logged[0]);
    assert!(logged[0].contains("1.3") && logged[0].contains(&path.display().to_string()), "{}", logged[0]);
    assert!(stdout.contains("interface:   1.3 (newer than this host's 1.2)"), "{stdout}");
    assert!(stdout.contains(&format!("not used:    {NEXT_MINOR_ADDITIONS}")), "{stdout}");
}

#[test]
fn a_plugin_built_for_another_major_is_refused_in_one_line_naming_both_versions() {
    let path = &artifacts().contract_fixtures().next_major_plugin;
    let error = PluginLibrary::load(path).unwrap_err();
    assert!(matches!(error, LoadError::IncompatibleVersion { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "names the file: {message}");
    assert!(message.contains("interface 2.0"), "names the plugin's version: {message}");
    let host = PluginLibrary::interface_version().to_string();
    assert!(message.contains(&format!("speaks {host}")), "names the host's version: {message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
}

#[test]
fn a_plugin_with_a_broken_layout_is_refused_in_the_contracts_words() {
    let path = &artifacts().contract_fixtures().wrong_layout_plugin;
    let error = PluginLibrary::load(path).unwrap_err();
    let LoadError::IncompatibleLayout { mismatch, details, .. } = &error else {
        panic!("expected a layout error, got {error}");
    };
    assert_eq!(mismatch, ENVELOPE_MISMATCH);
    let message = error.to_string();
    assert!(message.starts_with(&format!("{}: {ENVELOPE_MISMATCH}", path.display())), "{message}");
    assert_eq!(message.lines().count(), 1, "the short form is one line: {message}");
    for word in ABI_STABLE_WORDS {
        assert!(!message.contains(word) && !details.contains(word), "`{word}` in:\n{message}\n{details}");
    }
    let lines = details.lines().count();
    assert!((4..=100).contains(&lines), "the long form has {lines} lines:\n{details}");
    assert!(details.contains("Transport::send(envelope): Envelope\n"), "the path to it: {details}");
    assert!(details.contains("priority: u8    <- differs"), "both sides of Envelope: {details}");
    assert_eq!(error.details(), Some(details.as_str()));
}

#[test]
fn files_that_are_not_plugins_get_clear_errors_and_the_host_keeps_working() {
    let dir = scratch_dir("not-plugins");
    let text = write_config(&dir, "libcomms_text.so", "not a library");
    let error = PluginLibrary::load(&text).unwrap_err();
    assert!(matches!(error, LoadError::NotAPlugin { .. }), "{error:?}");
    assert!(error.to_string().contains("is not a comms plugin"), "{error}");

    let missing = dir.join("libcomms_missing.so");
    let error = PluginLibrary::load(&missing).unwrap_err();
    assert!(matches!(error, LoadError::NotFound { .. }), "{error:?}");
    assert!(error.to_string().contains("libcomms_missing.so"), "{error}");

    // A real shared library that is not a comms plugin: the test binary's own libc will do.
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib/libc.so.6"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists());
    if let Some(libc) = libc {
        let error = PluginLibrary::load(&libc).unwrap_err();
        assert!(error.to_string().contains("exports no abi_stable root module"), "{error}");
    }

    // After all of that, a good plugin still loads and works in this same process.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
        let node = Node::builder("survivor").transport_library("tcp", tcp, "").build().await.unwrap();
        node.send("survivor", "still here").await.unwrap();
        assert_eq!(node.receive::<String>().await.unwrap().message, "still here");
        node.close().await.unwrap();
    });
}

#[tokio::test]
async fn node_config_naming_an_incompatible_plugin_fails_with_the_path() {
    let artifacts = artifacts();
    let dir = scratch_dir("config-incompatible");
    let config = write_config(
        &dir,
        "node.toml",
        &format!(
            "[node]\nid = \"x\"\n[transports.next]\npath = {:?}\n",
            artifacts.contract_fixtures().next_major_plugin.to_str().unwrap()
        ),
    );
    let error = Node::from_config(&config).await.unwrap_err();
    assert!(matches!(error, BuildError::Load { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("transport `next`"), "{message}");
    assert!(message.contains("2.0"), "{message}");
}

#[test]
fn comms_plugins_inspect_exits_zero_for_a_plugin_and_nonzero_with_the_reason_otherwise() {
    let artifacts = artifacts();
    let ok = Command::new(&artifacts.comms_bin)
        .args(["plugins", "inspect"])
        .arg(&artifacts.uds_plugin)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains("name:        uds"), "{stdout}");

    let fixtures = artifacts.contract_fixtures();
    let v1 = Command::new(&artifacts.comms_bin)
        .args(["plugins", "inspect"])
        .arg(&fixtures.v1_plugin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&v1.stdout);
    assert!(v1.status.success(), "{}", String::from_utf8_lossy(&v1.stderr));
    assert!(stdout.contains("interface:   1.0 ("), "{stdout}");
    assert!(!stdout.contains("not used:"), "{stdout}");

    for (path, expected) in
        [(&fixtures.next_major_plugin, "interface 2.0"), (&fixtures.wrong_layout_plugin, ENVELOPE_MISMATCH)]
    {
        let refused =
            Command::new(&artifacts.comms_bin).args(["plugins", "inspect"]).arg(path).output().unwrap();
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(expected) && stderr.contains(&path.display().to_string()), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "short without --verbose: {stderr}");
    }
    let verbose = Command::new(&artifacts.comms_bin)
        .args(["plugins", "inspect", "--verbose"])
        .arg(&fixtures.wrong_layout_plugin)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    let lines = stderr.lines().count();
    assert!(
        lines > 3 && lines <= 102,
        "--verbose adds the long form, at most ~100 lines ({lines}):\n{stderr}"
    );
    assert!(stderr.contains("Transport::send(envelope): Envelope\n"), "{stderr}");

    let list = Command::new(&artifacts.comms_bin)
        .args(["plugins", "list", "--dir"])
        .arg(&artifacts.plugin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success());
    assert!(stdout.contains("tcp") && stdout.contains("uds") && stdout.contains("panicking"), "{stdout}");
}

//! Layers (contract 1.2) as a node and `comms check` stack them: the conformance suite on a stack
//! of loaded `.so` files, and the config errors that name the key, the file, the plugin and the
//! contract versions.

use comms_host::{
    conformance::{cases, run_suite, SuiteConfig, SuiteLayer},
    Node, PluginLibrary,
};
use comms_tests::{artifacts, scratch_dir, write_config, ORDERED_RELIABLE_SKIPS, POINT_TO_POINT_SKIPS};
use std::{path::Path, process::Command};

fn load(path: &Path) -> PluginLibrary {
    PluginLibrary::load(path).unwrap_or_else(|error| panic!("{error}"))
}

fn layer(path: &Path, config_toml: &str) -> SuiteLayer {
    SuiteLayer { library: load(path), config_toml: config_toml.into() }
}

/// Compression (of everything from 64 bytes) and chunking (into 16 KiB parts, up to 8 MiB) over
/// TCP keep every promise TCP makes: the suite's large and at-the-limit messages go as parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compress_and_chunk_over_tcp_pass_the_conformance_suite() {
    let config = SuiteConfig {
        layers: vec![
            layer(&artifacts().compress_plugin, "threshold = 64"),
            layer(&artifacts().chunk_plugin, "part_size = 16384\nmax_message_size = 8388608"),
        ],
        ..SuiteConfig::new("")
    };
    let report = run_suite(&load(&artifacts().tcp_plugin), &config).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.cases.len(), cases().len(), "{report}");
    assert_eq!(report.skipped_names(), POINT_TO_POINT_SKIPS, "{report}");
    let info = report.info.as_ref().expect("the stack's info");
    assert_eq!(info.max_message_size, 8 << 20, "the stack declares the chunk layer's limit");
}

/// A layer passes its transport's guarantees up: chunking over the ordered, reliable in-memory
/// transport is still ordered and reliable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_over_memory_keeps_order_and_reliability() {
    let config = SuiteConfig {
        layers: vec![layer(&artifacts().chunk_plugin, "part_size = 4096\nmax_message_size = 1048576")],
        ..SuiteConfig::new("")
    };
    let report = run_suite(&load(&artifacts().memory_plugin), &config).await;
    assert!(report.passed(), "{report}");
    assert_eq!(report.skipped_names(), ORDERED_RELIABLE_SKIPS, "{report}");
}

/// `comms check` reads `layers` from its `--config` file, as a node reads it from a transport's
/// table, and says what it checks.
#[test]
fn comms_check_runs_the_suite_on_a_stack() {
    let dir = scratch_dir("check-stack");
    let config = write_config(
        &dir,
        "stack.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nlayers = [{{ path = {:?}, threshold = 64 }}]\n",
            artifacts().compress_plugin
        ),
    );
    let output = Command::new(&artifacts().comms_bin)
        .args(["check", artifacts().tcp_plugin.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .output()
        .expect("run comms");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("checking layer `compress` over plugin `tcp`"), "{stdout}");
    assert!(stdout.trim_end().ends_with("12 passed, 0 failed, 7 skipped"), "{stdout}");
}

/// Builds a node from `[transports.tcp]` with `transport_keys` and returns the error's text.
async fn build_error(name: &str, transport_keys: &str) -> (String, std::path::PathBuf) {
    let dir = scratch_dir(&format!("layer-errors-{name}"));
    let text = format!(
        "[node]\nid = \"x\"\nplugin_dirs = [{:?}]\n[transports.tcp]\nlisten = \"127.0.0.1:0\"\n{transport_keys}\n",
        artifacts().plugin_dir
    );
    let path = write_config(&dir, "node.toml", &text);
    match Node::from_config(&path).await {
        Ok(node) => {
            node.close().await.ok();
            panic!("{transport_keys}: the node was built")
        }
        Err(error) => (error.to_string(), path),
    }
}

#[tokio::test]
async fn bad_layer_configs_name_the_key_the_file_and_the_plugin() {
    let (message, path) = build_error("not-a-list", "layers = \"compress\"").await;
    assert!(
        message.contains("`transports.tcp.layers`") && message.contains(&path.display().to_string()),
        "{message}"
    );

    let (message, _) = build_error("no-plugin", "layers = [{ threshold = 1 }]").await;
    assert!(message.contains("`transports.tcp.layers[0].plugin`: missing"), "{message}");

    let (message, _) = build_error("unknown", "layers = [\"compress\", \"nonesuch\"]").await;
    assert!(message.contains("nonesuch") && message.contains("libcomms_nonesuch.so"), "{message}");

    let (message, path) = build_error("bad-key", "layers = [{ plugin = \"compress\", levle = 3 }]").await;
    assert!(
        message.contains("levle")
            && message.contains("transports.tcp.layers[0]")
            && message.contains(&path.display().to_string()),
        "{message}"
    );

    // A transport plugin is not a layer.
    let (message, _) = build_error("not-a-layer", "layers = [\"tcp\"]").await;
    assert!(message.contains("plugin `tcp` provides no layer"), "{message}");
}

/// A plugin built for contract 1.0 loads as a transport, but cannot be a layer: the error names
/// its contract version and the one layers need.
#[tokio::test]
async fn a_plugin_built_before_layers_is_refused_as_a_layer_naming_the_versions() {
    let v1 = &artifacts().contract_fixtures().v1_plugin;
    let (message, _) = build_error("v1", &format!("layers = [{{ path = {v1:?} }}]")).await;
    assert!(
        message.contains("is built for comms plugin interface 1.0; layers need 1.2 or newer"),
        "{message}"
    );
}

/// The built-in `faults` layer is named like any other, with its own keys; dropping everything
/// is visible end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_faults_layer_is_stacked_by_name() {
    let dir = scratch_dir("layer-faults");
    let address = comms_tests::free_address();
    let receiver = write_config(
        &dir,
        "receiver.toml",
        &format!(
            "[node]\nid = \"receiver\"\nplugin_dirs = [{:?}]\n[transports.tcp]\nlisten = {address:?}\n",
            artifacts().plugin_dir
        ),
    );
    let sender = write_config(
        &dir,
        "sender.toml",
        &format!(
            "[node]\nid = \"sender\"\nplugin_dirs = [{:?}]\n[transports.tcp]\nlisten = \"127.0.0.1:0\"\n\
             layers = [\"compress\", {{ plugin = \"faults\", drop = 1.0 }}]\n\
             [discovery]\npeers = [{{ id = \"receiver\", addresses = {{ tcp = {address:?} }} }}]\n",
            artifacts().plugin_dir
        ),
    );
    let receiver = Node::from_config(&receiver).await.expect("receiver");
    let sender = Node::from_config(&sender).await.expect("sender");
    for i in 0..20 {
        sender.send("receiver", &format!("dropped {i}")).await.expect("a dropped message is sent, silently");
    }
    let nothing =
        tokio::time::timeout(std::time::Duration::from_millis(500), receiver.receive::<String>()).await;
    assert!(nothing.is_err(), "every message is dropped by the faults layer: {nothing:?}");
    sender.close().await.expect("close sender");
    receiver.close().await.expect("close receiver");
}

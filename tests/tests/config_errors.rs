//! A bad config gets an error that names the key and the file; nothing starts half-way.

use comms_host::{BuildError, Node};
use comms_tests::{artifacts, scratch_dir, write_config};

fn plugin_dirs() -> String {
    format!("plugin_dirs = [{:?}]", artifacts().plugin_dir.to_str().unwrap())
}

async fn build_error(name: &str, text: &str) -> (String, String) {
    let dir = scratch_dir(name);
    let path = write_config(&dir, "node.toml", text);
    let error = Node::from_config(&path).await.expect_err("the config is bad");
    (error.to_string(), path.display().to_string())
}

#[tokio::test]
async fn unknown_host_key_names_key_and_file() {
    let (message, file) = build_error("host-key", "[node]\nid = \"a\"\ncodecs = \"json\"\n").await;
    assert!(message.contains("`codecs`") && message.contains(&file), "{message}");
}

#[tokio::test]
async fn unknown_plugin_key_names_key_table_and_file() {
    let text = format!("[node]\nid = \"a\"\n{}\n[transports.tcp]\nmax_frame_sise = 10\n", plugin_dirs());
    let (message, file) = build_error("plugin-key", &text).await;
    assert!(message.contains("`max_frame_sise`"), "{message}");
    assert!(message.contains("[transports.tcp]") && message.contains(&file), "{message}");
}

#[tokio::test]
async fn mistyped_plugin_key_names_the_key() {
    let text = format!("[node]\nid = \"a\"\n{}\n[transports.tcp]\nmax_frame_size = \"big\"\n", plugin_dirs());
    let (message, file) = build_error("plugin-type", &text).await;
    assert!(message.contains("`max_frame_size`") && message.contains(&file), "{message}");
}

#[tokio::test]
async fn bad_value_for_a_known_key_names_it() {
    let text =
        format!("[node]\nid = \"a\"\n{}\n[transports.tcp]\nlisten = \"not an address\"\n", plugin_dirs());
    let (message, _) = build_error("listen", &text).await;
    assert!(message.contains("`listen`") && message.contains("not an address"), "{message}");
}

#[tokio::test]
async fn missing_plugin_names_the_file_looked_for_and_where() {
    let text = format!("[node]\nid = \"a\"\n{}\n[transports.carrier-pigeon]\n", plugin_dirs());
    let dir = scratch_dir("missing");
    let path = write_config(&dir, "node.toml", &text);
    let error = Node::from_config(&path).await.unwrap_err();
    assert!(matches!(error, BuildError::PluginNotFound { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("libcomms_carrier_pigeon"), "{message}");
    assert!(message.contains(artifacts().plugin_dir.to_str().unwrap()), "{message}");
}

#[tokio::test]
async fn a_node_without_transports_is_refused() {
    let (message, _) = build_error("no-transport", "[node]\nid = \"a\"\n").await;
    assert!(message.contains("no transport configured"), "{message}");
}

/// A config file and a builder are checked by the same rules: before, the builder accepted a
/// peer timeout shorter than the heartbeat interval, which the config file refused.
#[tokio::test]
async fn config_files_and_builders_refuse_the_same_settings() {
    let text = format!(
        "[node]\nid = \"a\"\n{}\nheartbeat_interval_ms = 1000\npeer_timeout_ms = 500\n[transports.tcp]\n",
        plugin_dirs()
    );
    let (message, file) = build_error("liveness", &text).await;
    assert!(message.contains("`node.peer_timeout_ms`") && message.contains(&file), "{message}");

    let tcp = comms_host::PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let second = std::time::Duration::from_secs(1);
    let error = Node::builder("a")
        .liveness(Some(second), second / 2)
        .transport_library("tcp", tcp, "")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(error, BuildError::InvalidSettings(_)), "{error}");
    assert!(
        error.to_string().contains("`node.peer_timeout_ms`: must be longer than heartbeat_interval_ms"),
        "{error}"
    );
}

#[test]
fn the_cli_reports_a_bad_key_with_the_file_and_fails() {
    let dir = scratch_dir("cli");
    let path = write_config(&dir, "node.toml", "[node]\nidd = \"a\"\n");
    let output = std::process::Command::new(&artifacts().comms_bin)
        .args(["recv", "--count", "1", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`idd`") && stderr.contains(&path.display().to_string()), "{stderr}");
}

/// Issue 18: ids `""` and with a newline or NUL were accepted (forged log lines, broker names
/// that fail later). Refused at configuration, naming the key and the file, by config files
/// and builders alike, for the node and for the peers of static discovery.
#[tokio::test]
async fn an_invalid_node_id_is_refused_naming_the_key_and_the_file() {
    for (name, id) in [("empty", r#""""#), ("newline", r#""a\nINFO forged""#), ("nul", r#""nul\u0000""#)] {
        let text = format!("[node]\nid = {id}\n{}\n[transports.tcp]\n", plugin_dirs());
        let (message, file) = build_error(&format!("id-{name}"), &text).await;
        assert!(message.contains("key `node.id`") && message.contains(&file), "{name}: {message}");
    }
    let (message, _) = build_error("id-control", "[node]\nid = \"a\\u001b[31m\"\n").await;
    assert!(message.contains("control character U+001B"), "{message}");

    let tcp = comms_host::PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let error = Node::builder("a\nb").transport_library("tcp", tcp, "").build().await.unwrap_err();
    assert!(matches!(error, BuildError::InvalidSettings(_)), "{error}");
    assert!(
        error.to_string().contains("key `node.id`: \"a\\nb\" contains the control character U+000A"),
        "{error}"
    );

    let text = format!(
        "[node]\nid = \"a\"\n{}\n[transports.tcp]\n[discovery]\npeers = [{{ id = \"\", addresses = {{ tcp = \"127.0.0.1:1\" }} }}]\n",
        plugin_dirs()
    );
    let (message, file) = build_error("peer-id", &text).await;
    assert!(message.contains("`peers[0].id`") && message.contains("is empty"), "{message}");
    assert!(message.contains("[discovery]") && message.contains(&file), "{message}");
}

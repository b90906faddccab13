//! The Python client (`clients/python`, written from `docs/wire.md` alone) and a comms node
//! exchange every kind of message on each broker backend: point to point both ways, a request
//! each way (the Python program calls the node's service and serves one the node calls),
//! and a publication each way. The node runs here, in process, loading the plugin as users do;
//! the Python program is `clients/python/examples/interop.py`, and what it received is
//! checked here field by field from the JSON lines it prints.
//!
//! Also runs the Python package's unit tests, which check the shared wire test vectors
//! (`docs/wire-vectors.json`) that `tests/tests/wire_vectors.rs` checks in Rust.
//!
//! In CI (`CI=true`) a missing python3, redis-py, pika or broker fails the test; elsewhere it
//! skips with a printed reason.

use comms_host::{Codec, Node, PluginLibrary, Received};
use comms_tests::{artifacts, broker_available, python_available, scratch_dir, workspace_root};
use serde_json::{json, Value};
use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

const STEP: Duration = Duration::from_secs(20);

fn unique(name: &str) -> String {
    format!("{name}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

/// The comms side of `interop.py`'s scenario, on a node whose only transport is `transport`
/// (the plugin at `plugin`, with `config`), against the Python node `py`. `backend_args` are
/// the script's backend options. Returns the JSON lines the script printed, by step.
async fn exchange(
    transport: &str,
    plugin: &Path,
    config: &str,
    backend_args: Vec<String>,
) -> std::collections::HashMap<String, Value> {
    let library = PluginLibrary::load(plugin).unwrap_or_else(|error| panic!("{error}"));
    let me = unique("rs-node");
    let py = unique("py-node");
    let node = Node::builder(me.as_str())
        .codec(Codec::Json)
        .transport_library(transport, library, config)
        .build()
        .await
        .unwrap_or_else(|error| panic!("the {transport} node does not start: {error}"));
    node.serve("rs.echo", |request: Received<Value>| async move {
        Ok::<_, String>(json!({ "echo": request.message }))
    })
    .await
    .unwrap();
    let mut news = node.subscribe::<Value>("rs-test.*").await.unwrap();

    let script = workspace_root().join("clients/python/examples/interop.py");
    let mut command = Command::new("python3");
    command.arg(script).args([transport, py.as_str(), me.as_str()]).args(backend_args);
    // No __pycache__ written into the source tree.
    command.env("PYTHONDONTWRITEBYTECODE", "1");
    let python = tokio::task::spawn_blocking(move || {
        command.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("run python3")
    });

    // Python -> comms, point to point: a JSON message, as the application sees it.
    let mut greeting = tokio::time::timeout(STEP, node.receive::<Value>())
        .await
        .expect("the Python program's message arrives")
        .unwrap();
    assert_eq!(greeting.from.as_str(), py);
    assert_eq!(greeting.message, json!({"greeting": "hello from python", "n": 1}));
    assert_eq!(greeting.headers.get("content-type"), Some("application/json"));
    let greeting_id = greeting.id;
    greeting.ack();

    // The Python program has called rs.echo meanwhile; then it subscribes and says so.
    let mut subscribed =
        tokio::time::timeout(STEP, node.receive::<Value>()).await.expect("told subscribed").unwrap();
    assert_eq!(subscribed.message, json!({"subscribed": "py-test.*"}));
    subscribed.ack();
    node.publish("py-test.news", &json!({"headline": "from rust"})).await.unwrap();

    // Python -> comms, topic.
    let mut headline = tokio::time::timeout(STEP, news.next())
        .await
        .expect("the Python publication arrives")
        .expect("subscription open")
        .unwrap();
    assert_eq!(headline.from.as_str(), py);
    assert_eq!(headline.message, json!({"headline": "from python"}));
    headline.ack();

    // comms -> Python, request: the Python program serves py.reverse (announced in its hello).
    let reversed: Value = tokio::time::timeout(STEP, node.request("py.reverse", &json!({"text": "comms"})))
        .await
        .expect("the Python service answers in time")
        .unwrap_or_else(|error| panic!("requesting py.reverse failed: {error}"));
    assert_eq!(reversed, json!({"reversed": "smmoc"}));

    // comms -> Python, point to point.
    node.send(py.as_str(), &json!({"bye": "from rust"})).await.unwrap();

    let output = tokio::time::timeout(Duration::from_secs(60), python)
        .await
        .expect("the Python program finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "interop.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    node.close().await.unwrap();
    let steps: std::collections::HashMap<String, Value> = stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .map(|line| (line["step"].as_str().unwrap().to_string(), line))
        .collect();
    let step =
        |name: &str| steps.get(name).unwrap_or_else(|| panic!("no step `{name}` in\n{stdout}")).clone();
    assert_eq!(step("sent")["id"], greeting_id.to_string(), "the id the Python program gave is kept");
    assert!(step("peer")["services"].as_array().unwrap().contains(&json!("rs.echo")), "{stdout}");
    assert_eq!(step("response")["value"], json!({"echo": {"text": "ping"}}));
    let publication = step("publication");
    assert_eq!(publication["topic"], "py-test.news");
    assert_eq!(publication["sender"], me.as_str());
    assert_eq!(publication["content_type"], "application/json");
    assert_eq!(publication["value"], json!({"headline": "from rust"}));
    let request = step("request");
    assert_eq!(request["service"], "py.reverse");
    assert_eq!(request["sender"], me.as_str());
    assert_eq!(request["value"], json!({"text": "comms"}));
    let message = step("message");
    assert_eq!(message["sender"], me.as_str());
    assert_eq!(message["content_type"], "application/json");
    assert_eq!(message["value"], json!({"bye": "from rust"}));
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_and_node_exchange_everything_over_redis() {
    if !broker_available("Redis", "127.0.0.1:6379") || !python_available(&["redis"]) {
        return;
    }
    let prefix = unique("comms-test-python");
    let config = format!("prefix = \"{prefix}\"\nblock_ms = 200\n");
    exchange("redis", &artifacts().redis_plugin, &config, vec![format!("prefix={prefix}")]).await;

    comms_tests::delete_redis_keys(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_and_node_exchange_everything_over_amqp() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") || !python_available(&["pika"]) {
        return;
    }
    exchange("amqp", &artifacts().amqp_plugin, "inbox_expires_ms = 60000\n", Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_and_node_exchange_everything_over_sqlite() {
    if !python_available(&["sqlite3"]) {
        return;
    }
    let database = scratch_dir("python-client").join("comms.db");
    let config = format!("database = \"{}\"\npoll_max_ms = 20\n", database.display());
    exchange("sqlite", &artifacts().sqlite_plugin, &config, vec![format!("database={}", database.display())])
        .await;
}

#[test]
fn python_client_checks_the_shared_wire_vectors() {
    if !python_available(&[]) {
        return;
    }
    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "clients/python/tests", "-v"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(workspace_root())
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python client's unit tests failed:\n{stderr}");
    assert!(stderr.contains("test_every_envelope_encodes_to_its_bytes_and_back"), "{stderr}");
    assert!(stderr.trim_end().ends_with("OK"), "{stderr}");
}

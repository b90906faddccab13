//! `comms recv` and `comms run` print a JSON payload as JSON on one line (an object as the
//! object, a JSON string as its text), so that their output can be piped into `jq`.

use comms_host::{Codec, Node, PluginLibrary};
use comms_tests::{artifacts, free_address, scratch_dir, start_and_wait_for, write_config};
use serde_json::json;
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

/// Starts `comms ARGS --config` on a TCP node `id` listening on `address`; returns the process
/// and a reader of its standard output.
fn start(
    args: &[&str],
    id: &str,
    address: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let dir = scratch_dir("cli-json");
    let config = write_config(
        &dir,
        "node.toml",
        &format!(
            "[node]\nid = {id:?}\nplugin_dirs = [{:?}]\n\n[transports.tcp]\nlisten = {address:?}\n",
            artifacts().plugin_dir.to_str().unwrap()
        ),
    );
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(args).arg("--config").arg(&config).stdout(Stdio::piped());
    let mut child = start_and_wait_for(command, "transport `tcp`");
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    (child, stdout)
}

async fn send_three(to: &str, address: &str) {
    let library = PluginLibrary::load(&artifacts().tcp_plugin).unwrap_or_else(|error| panic!("{error}"));
    let sender = Node::builder(format!("json-sender-{}", std::process::id()))
        .codec(Codec::Json)
        .transport_library("tcp", library, &format!("listen = {:?}", free_address()))
        .static_peer(to, [("tcp", address)])
        .build()
        .await
        .unwrap();
    sender.send(to, &json!({"order": 42, "items": ["tea", "milk"], "note": "two\nlines"})).await.unwrap();
    sender.send(to, "plain text").await.unwrap();
    sender.send(to, &json!([1, 2.5, null])).await.unwrap();
    sender.close().await.unwrap();
}

fn lines(stdout: &mut BufReader<std::process::ChildStdout>, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read stdout");
            line.trim_end_matches('\n').to_string()
        })
        .collect()
}

const EXPECTED: [&str; 3] =
    [r#"{"items":["tea","milk"],"note":"two\nlines","order":42}"#, "plain text", "[1,2.5,null]"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comms_recv_prints_json_payloads_as_json() {
    let address = free_address();
    let (mut recv, mut stdout) = start(&["recv", "--count", "3"], "json-recv", &address);
    send_three("json-recv", &address).await;
    assert_eq!(lines(&mut stdout, 3), EXPECTED);
    let status =
        tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || recv.wait()))
            .await
            .expect("comms recv exits after --count messages");
    assert!(status.unwrap().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comms_run_prints_json_payloads_as_json_after_the_sender() {
    let address = free_address();
    let (mut run, mut stdout) = start(&["run"], "json-run", &address);
    send_three("json-run", &address).await;
    let printed = lines(&mut stdout, 3);
    let _ = run.kill();
    let _ = run.wait();
    let sender = format!("json-sender-{}: ", std::process::id());
    let expected: Vec<String> = EXPECTED.iter().map(|line| format!("{sender}{line}")).collect();
    assert_eq!(printed, expected);
}

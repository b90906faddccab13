//! Two OS processes exchange 10,000 messages over the TCP plugin: none lost, order kept.
//!
//! The other process is the `comms` command (`comms run --echo`), configured by a file, which
//! sends every message back to its sender; this process sends 10,000 and must get all 10,000
//! back, in order. The child's printed output must list them all, in order, too.

use comms_host::{Node, PluginLibrary};
use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use std::{
    process::{Command, Stdio},
    time::Duration,
};

const MESSAGES: u32 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_between_two_processes_none_lost_order_kept() {
    let artifacts = artifacts();
    let dir = scratch_dir("two-processes");
    let echo_address = free_address();
    let tcp = PluginLibrary::load(&artifacts.tcp_plugin).unwrap();
    let tester = Node::builder("tester")
        .transport_library("tcp", tcp, "")
        .static_peer("echo", [("tcp", echo_address.as_str())])
        .build()
        .await
        .unwrap();
    let tester_address = tester.transports()[0].local_address.clone();

    let config = write_config(
        &dir,
        "echo.toml",
        &format!(
            "[node]\nid = \"echo\"\nplugin_dirs = [{:?}]\n\n[transports.tcp]\nlisten = {echo_address:?}\n\n\
             [discovery]\npeers = [{{ id = \"tester\", addresses = {{ tcp = {tester_address:?} }} }}]\n",
            artifacts.plugin_dir.to_str().unwrap()
        ),
    );
    let output_path = dir.join("echo.out");
    let mut command = Command::new(&artifacts.comms_bin);
    command
        .args(["run", "--echo", "--config"])
        .arg(&config)
        .stdout(std::fs::File::create(&output_path).unwrap());
    let mut child = comms_tests::start_and_wait_for(command, "transport `tcp`");

    let sender = tester.clone();
    let sending = tokio::spawn(async move {
        for i in 0..MESSAGES {
            sender.send("echo", &format!("message {i}")).await.unwrap();
        }
    });
    for i in 0..MESSAGES {
        let echoed = tokio::time::timeout(Duration::from_secs(30), tester.receive::<String>())
            .await
            .unwrap_or_else(|_| panic!("echo {i} did not arrive within 30 s"))
            .unwrap();
        assert_eq!(echoed.from.as_str(), "echo");
        assert_eq!(echoed.message, format!("message {i}"), "lost or reordered");
    }
    sending.await.unwrap();
    tester.close().await.unwrap();

    // SIGTERM: the child closes gracefully and has printed every message, in order.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "comms run exits cleanly on SIGTERM: {status}");
    let printed = std::fs::read_to_string(&output_path).unwrap();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), MESSAGES as usize);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("tester: message {i}"));
    }
}

#[test]
fn comms_send_and_comms_recv_talk_across_processes() {
    let artifacts = artifacts();
    let dir = scratch_dir("send-recv");
    let receiver_address = free_address();
    let plugin_dirs = format!("plugin_dirs = [{:?}]", artifacts.plugin_dir.to_str().unwrap());
    let receiver_config = write_config(
        &dir,
        "receiver.toml",
        &format!(
            "[node]\nid = \"receiver\"\n{plugin_dirs}\n[transports.tcp]\nlisten = {receiver_address:?}\n"
        ),
    );
    let sender_config = write_config(
        &dir,
        "sender.toml",
        &format!(
            "[node]\nid = \"sender\"\ncodec = \"json\"\n{plugin_dirs}\n[transports.tcp]\n\n[discovery]\n\
             peers = [{{ id = \"receiver\", addresses = {{ tcp = {receiver_address:?} }} }}]\n"
        ),
    );
    let mut command = Command::new(&artifacts.comms_bin);
    command.args(["recv", "--count", "3", "--config"]).arg(&receiver_config).stdout(Stdio::piped());
    let receiver = comms_tests::start_and_wait_for(command, "transport `tcp`");
    for text in ["one", "two words", "three"] {
        let sent = Command::new(&artifacts.comms_bin)
            .args(["send", "--to", "receiver", "--config"])
            .arg(&sender_config)
            .arg(text)
            .output()
            .unwrap();
        assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    }
    let output = receiver.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "one\ntwo words\nthree\n");
}

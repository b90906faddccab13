//! A warning a peer can repeat once per message is rate-limited, with a count (issue 18, point
//! 4): before, 100,000 messages to a node id the receiver is not wrote 100,000 WARN lines (20 MB
//! of log). Now a few lines per interval are written, and the next line after the interval
//! says how many were left out.
//!
//! The receiver is the `comms` command (`comms run`), its log read from its standard error. The
//! sender knows two nodes at the receiver's address, the receiver and `somebody-else`: what it
//! sends to `somebody-else` reaches the receiver, which drops it with a warning. A message to
//! the receiver itself, sent after them on the same link (in order), marks that all arrived.

use comms_host::{Node, PluginLibrary};
use comms_plugin_api::log_rate::{STANDARD_BURST, STANDARD_INTERVAL};
use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

const MISADDRESSED: u64 = 1_000;
const WARNING: &str = "message for another node dropped";

/// Reads lines from `stdout` until one contains `marker`.
fn wait_for_line(stdout: &mut impl BufRead, marker: &str) {
    let mut line = String::new();
    while !line.contains(marker) {
        line.clear();
        let read = stdout.read_line(&mut line).expect("read the receiver's output");
        assert!(read > 0, "the receiver exited before printing `{marker}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_misaddressed_messages_write_a_few_warnings_and_then_their_count() {
    let artifacts = artifacts();
    let dir = scratch_dir("repeated-warnings");
    let address = free_address();
    let config = write_config(
        &dir,
        "receiver.toml",
        &format!(
            "[node]\nid = \"receiver\"\nplugin_dirs = [{:?}]\n\n[transports.tcp]\nlisten = {address:?}\n",
            artifacts.plugin_dir.to_str().unwrap()
        ),
    );
    let mut child = Command::new(&artifacts.comms_bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let reader = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("transport `tcp`") {
                    let _ = ready_tx.try_send(());
                }
                log.lock().unwrap().push(line);
            }
        })
    };
    ready_rx.recv().expect("the receiver started");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());

    let tcp = PluginLibrary::load(&artifacts.tcp_plugin).unwrap();
    let sender = Node::builder("sender")
        .transport_library("tcp", tcp, "")
        .static_peer("receiver", [("tcp", address.as_str())])
        .static_peer("somebody-else", [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();
    for i in 0..MISADDRESSED {
        sender.send("somebody-else", &format!("not yours {i}")).await.unwrap();
    }
    sender.send("receiver", "marker-1").await.unwrap();
    let mut stdout = tokio::task::spawn_blocking(move || {
        wait_for_line(&mut stdout, "marker-1");
        stdout
    })
    .await
    .unwrap();

    // The count comes with the first warning of the next interval: the interval itself is
    // what is tested here, so this waits for it to pass.
    tokio::time::sleep(STANDARD_INTERVAL).await;
    sender.send("somebody-else", "one more").await.unwrap();
    sender.send("receiver", "marker-2").await.unwrap();
    tokio::task::spawn_blocking(move || wait_for_line(&mut stdout, "marker-2")).await.unwrap();
    sender.close().await.unwrap();
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    reader.join().unwrap();

    let log = log.lock().unwrap();
    let warnings: Vec<&String> = log.iter().filter(|line| line.contains(WARNING)).collect();
    assert!(
        warnings.len() as u64 <= STANDARD_BURST + 1,
        "{} warnings for {} misaddressed messages:\n{}",
        warnings.len(),
        MISADDRESSED + 1,
        warnings.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    let left_out = MISADDRESSED - STANDARD_BURST;
    let count = format!("(and {left_out} more like this in the last");
    assert!(
        warnings.last().is_some_and(|line| line.contains(&count)),
        "the warning after the interval counts the {left_out} left out:\n{}",
        warnings.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
}

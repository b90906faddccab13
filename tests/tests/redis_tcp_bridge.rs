//! Two OS processes on different backends talk through one bridge node: `comms recv` speaks only
//! Redis, `comms send` only TCP, and a `comms run` with both transports and `relay = true`
//! forwards between them.

use comms_tests::{artifacts, broker_available, free_address, scratch_dir, write_config};
use std::{
    path::Path,
    process::{Child, Command, Stdio},
};
fn spawn_until(args: &[&str], config: &Path, ready: &str) -> Child {
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(args).arg("--config").arg(config).stdout(Stdio::piped());
    comms_tests::start_and_wait_for(command, ready)
}

#[test]
fn a_redis_node_and_a_tcp_node_talk_through_a_bridge_process() {
    if !broker_available("Redis", "127.0.0.1:6379") {
        return;
    }
    let dir = scratch_dir("redis-tcp-bridge");
    let prefix = format!("comms-bridge-test-{}", std::process::id());
    let redis = format!("url = \"redis://127.0.0.1:6379\"\nprefix = {prefix:?}");
    let plugin_dirs = format!("plugin_dirs = [{:?}]", artifacts().plugin_dir.to_str().unwrap());
    let bridge_tcp = free_address();
    let redis_inbox = |node: &str| format!("{prefix}:inbox:{node}");

    let receiver = write_config(
        &dir,
        "redis-only.toml",
        &format!("[node]\nid = \"redis-only\"\n{plugin_dirs}\n\n[transports.redis]\n{redis}\n"),
    );
    let bridge = write_config(
        &dir,
        "bridge.toml",
        &format!(
            "[node]\nid = \"bridge\"\nrelay = true\n{plugin_dirs}\n\n[transports.redis]\n{redis}\n\n\
             [transports.tcp]\nlisten = {bridge_tcp:?}\n\n\
             [discovery]\npeers = [{{ id = \"redis-only\", addresses = {{ redis = {:?} }} }}]\n",
            redis_inbox("redis-only")
        ),
    );
    let sender = write_config(
        &dir,
        "tcp-only.toml",
        &format!(
            "[node]\nid = \"tcp-only\"\n{plugin_dirs}\n\n[transports.tcp]\n\n\
             [discovery]\npeers = [{{ id = \"redis-only\", addresses = {{ tcp = {bridge_tcp:?} }} }}]\n"
        ),
    );

    let receiving = spawn_until(&["recv", "--count", "3"], &receiver, "transport `redis`");
    let mut relaying = spawn_until(&["run"], &bridge, "transport `tcp`");
    for text in ["over tcp", "through the bridge", "into redis"] {
        let sent = Command::new(&artifacts().comms_bin)
            .args(["send", "--to", "redis-only", "--config"])
            .arg(&sender)
            .arg(text)
            .output()
            .unwrap();
        assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    }
    let output = receiving.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "over tcp\nthrough the bridge\ninto redis\n");

    let _ = Command::new("kill").arg(relaying.id().to_string()).status();
    assert!(relaying.wait().unwrap().success(), "the bridge exits cleanly on SIGTERM");
    let bridge_output = relaying.wait_with_output().map(|o| o.stdout).unwrap_or_default();
    assert!(bridge_output.is_empty(), "the bridge relays, it keeps nothing for itself");
    // Leave no test keys behind.
    let _ = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "--scan", "--pattern", &format!("{prefix}:*")])
        .output()
        .map(|keys| {
            for key in String::from_utf8_lossy(&keys.stdout).lines() {
                let _ = Command::new("redis-cli").args(["-h", "127.0.0.1", "DEL", key]).output();
            }
        });
}

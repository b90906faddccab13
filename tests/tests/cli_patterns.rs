//! The pattern commands, as a user runs them: `comms echo-service` + `comms request`,
//! `comms subscribe` + `comms publish`, `comms peers`.

use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

fn config(dir: &Path, id: &str, listen: &str, peers: &[(&str, &str)]) -> PathBuf {
    let peers: Vec<String> = peers
        .iter()
        .map(|(id, address)| format!("{{ id = {id:?}, addresses = {{ tcp = {address:?} }} }}"))
        .collect();
    write_config(
        dir,
        &format!("{id}.toml"),
        &format!(
            "[node]\nid = {id:?}\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\npeer_timeout_ms = 1000\n\n\
             [transports.tcp]\nlisten = {listen:?}\n\n[discovery]\npeers = [{}]\n",
            artifacts().plugin_dir.to_str().unwrap(),
            peers.join(", ")
        ),
    )
}

fn comms(args: &[&str], config: &Path) -> Output {
    Command::new(&artifacts().comms_bin).args(args).arg("--config").arg(config).output().unwrap()
}
fn spawn_until(args: &[&str], config: &Path, ready: &str) -> Child {
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(args).arg("--config").arg(config).stdout(Stdio::piped());
    comms_tests::start_and_wait_for(command, ready)
}

#[test]
fn echo_service_request_publish_subscribe_and_peers_from_the_command_line() {
    let dir = scratch_dir("cli-patterns");
    let (server_address, listener_address, client_address) = (free_address(), free_address(), free_address());
    let server = config(&dir, "server", &server_address, &[]);
    let listener = config(&dir, "listener", &listener_address, &[]);
    let client = config(
        &dir,
        "client",
        &client_address,
        &[("server", &server_address), ("listener", &listener_address)],
    );

    let mut echo = spawn_until(&["echo-service", "--service", "echo"], &server, "serving `echo`");
    let answered = comms(&["request", "echo", "hello there"], &client);
    assert!(answered.status.success(), "{}", String::from_utf8_lossy(&answered.stderr));
    assert_eq!(String::from_utf8_lossy(&answered.stdout), "hello there\n");

    let missing = comms(&["request", "--attempts", "1", "no-such-service", "x"], &client);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no live replica serves `no-such-service`"));

    let subscriber = spawn_until(&["subscribe", "--count", "2", "news.>"], &listener, "subscribed to news.>");
    // The client learns of the subscription through the listener's first heartbeat after it
    // hears from the client, so give publish a moment (--wait-ms) to hear it.
    for text in ["first", "second"] {
        let published = comms(&["publish", "--wait-ms", "500", "news.local", text], &client);
        assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
        assert!(String::from_utf8_lossy(&published.stdout).contains("to 1 subscriber node(s)"));
    }
    let output = subscriber.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "first\nsecond\n");

    let peers = comms(&["peers", "--wait-ms", "1500"], &client);
    let table = String::from_utf8_lossy(&peers.stdout);
    assert!(peers.status.success());
    let server_line = table.lines().find(|l| l.starts_with("server")).unwrap_or_else(|| panic!("{table}"));
    assert!(server_line.contains(" up ") && server_line.contains("echo"), "{table}");
    assert!(server_line.contains(&format!("tcp={server_address}")), "{table}");
    let listener_line =
        table.lines().find(|l| l.starts_with("listener")).unwrap_or_else(|| panic!("{table}"));
    assert!(listener_line.contains(" down "), "the listener has exited: {table}");

    let _ = Command::new("kill").arg(echo.id().to_string()).status();
    assert!(echo.wait().unwrap().success(), "echo-service exits cleanly on SIGTERM");
}

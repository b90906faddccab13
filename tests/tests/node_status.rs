//! Remote status (`comms_host::admin`): a node asked over comms, through the TCP plugin loaded as
//! users load it, reports what it runs and what it did; `comms status NODE` prints it and
//! `comms top` shows it live.

use comms_host::{admin::NodeStatus, Node, PluginLibrary, Received, RequestError};
use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use std::{path::Path, process::Command, time::Duration};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reports_its_transports_peers_services_and_topics_to_a_peer() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let server = Node::builder("server")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_library("tcp", tcp.clone(), "listen = \"127.0.0.1:0\"")
        .build()
        .await
        .unwrap();
    server
        .serve("echo", |request: Received<String>| async move { Ok::<_, String>(request.message) })
        .await
        .unwrap();
    let _news = server.subscribe::<String>("news.>").await.unwrap();
    let client = Node::builder("client")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_library("tcp", tcp, "listen = \"127.0.0.1:0\"")
        .static_peer("server", [("tcp", server.transports()[0].local_address.as_str())])
        .build()
        .await
        .unwrap();
    for n in 0..5u32 {
        client.send("server", &n).await.unwrap();
    }
    for _ in 0..5 {
        server.receive::<u32>().await.unwrap().ack();
    }

    let status = client.remote_status("server", Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.id, "server");
    assert_eq!(status.services, ["echo"], "the built-in status service is answered, not announced");
    assert_eq!(status.topics, ["news.>"]);
    assert_eq!(status.transports.len(), 1);
    let transport = &status.transports[0];
    assert_eq!((transport.name.as_str(), transport.plugin.as_str()), ("tcp", "tcp"));
    assert_eq!(transport.local_address, server.transports()[0].local_address);
    assert!(transport.messages_received >= 6, "5 messages and the status request: {transport:?}");
    assert_eq!(transport.send_errors + transport.errors, 0, "{transport:?}");
    let open = transport.counters.iter().find(|(name, _)| name == "tcp.connections.open");
    assert_eq!(open.map(|(_, value)| *value), Some(1), "the plugin's own counters come along: {transport:?}");
    assert_eq!(status.inbox_depth, 0, "every message was taken");
    let client_peer =
        status.peers.iter().find(|peer| peer.id == "client").expect("the server knows the client");
    assert_eq!(client_peer.status, "up");
    assert!(status.uptime_ms > 0);
    assert_eq!(status.requests_being_served, 1, "the status request itself, answered while served");
    let local = server.status();
    assert_eq!((local.id, local.services, local.topics), (status.id, status.services, status.topics));
    assert_eq!(local.requests_being_served, 0);

    // Not announced: no replica to choose, and the records stay the application's.
    assert_eq!(server.record().services, ["echo"]);
    let unnamed = client.request::<_, NodeStatus>(comms_host::admin::STATUS_SERVICE, &()).await;
    assert!(matches!(unnamed, Err(RequestError::NoReplica { .. })), "{unnamed:?}");
    let unknown = client.remote_status("nobody", Duration::from_millis(200)).await;
    assert!(unknown.is_err(), "{unknown:?}");

    client.close().await.unwrap();
    server.close().await.unwrap();
}

fn config(dir: &Path, id: &str, listen: &str, peers: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!("{id}.toml"),
        &format!(
            "[node]\nid = {id:?}\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\n\n\
             [transports.tcp]\nlisten = {listen:?}\n\n[discovery]\npeers = [{peers}]\n",
            artifacts().plugin_dir
        ),
    )
}

#[test]
fn comms_status_prints_a_running_node_as_a_table_and_as_json() {
    let dir = scratch_dir("cli-status");
    let server_address = free_address();
    let server = config(&dir, "server", &server_address, "");
    let client = config(
        &dir,
        "client",
        &free_address(),
        &format!("{{ id = \"server\", addresses = {{ tcp = {server_address:?} }} }}"),
    );
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(["echo-service", "--service", "echo", "--config"]).arg(&server);
    let mut echo = comms_tests::start_and_wait_for(command, "serving `echo`");

    let table = Command::new(&artifacts().comms_bin)
        .args(["status", "server", "--config"])
        .arg(&client)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{}{text}", String::from_utf8_lossy(&table.stderr));
    assert!(text.starts_with("node server (up "), "{text}");
    assert!(text.contains("services: echo"), "{text}");
    assert!(text.lines().any(|line| line.starts_with("tcp ") && line.contains(&server_address)), "{text}");

    let json = Command::new(&artifacts().comms_bin)
        .args(["status", "server", "--json", "--config"])
        .arg(&client)
        .output()
        .unwrap();
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let status: NodeStatus = serde_json::from_slice(&json.stdout).expect("--json prints a NodeStatus");
    assert_eq!(status.id, "server");
    assert_eq!(status.services, ["echo"]);

    let missing = Command::new(&artifacts().comms_bin)
        .args(["status", "nobody", "--wait-ms", "300", "--config"])
        .arg(&client)
        .output()
        .unwrap();
    assert!(!missing.status.success(), "asking a node nobody knows fails");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("nobody"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // `comms top`: frames of every node that is up, this one included, with rates from the
    // second frame on.
    let top = Command::new(&artifacts().comms_bin)
        .args(["top", "--count", "2", "--interval-ms", "400", "--config"])
        .arg(&client)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{}{text}", String::from_utf8_lossy(&top.stderr));
    let frames: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(frames.len(), 2, "two frames: {text}");
    for frame in &frames {
        assert!(frame.starts_with("node "), "{frame}");
        assert!(frame.contains("in msg/s"), "{frame}");
    }
    let server_row = |frame: &str| frame.lines().find(|line| line.starts_with("server ")).map(str::to_string);
    let first = server_row(frames[0]).expect("the server in the first frame");
    assert!(frames[0].lines().any(|line| line.starts_with("client ")), "{text}");
    let second = server_row(frames[1]).expect("the server in the second frame");
    let columns: Vec<&str> = second.split_whitespace().collect();
    // The status requests of the first frame reached it: a measured rate, not `-`.
    assert!(columns[2].parse::<f64>().is_ok_and(|rate| rate > 0.0), "in msg/s of: {second}");
    assert_eq!(first.split_whitespace().nth(2), Some("-"), "no rate in the first frame: {first}");
    assert_eq!(columns.last(), Some(&"1/1"), "the server knows the client, up: {second}");

    let _ = Command::new("kill").arg(echo.id().to_string()).status();
    assert!(echo.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

//! Reloading a running node (`Node::reload`, `comms_host::reload`): the TCP plugin swapped for a
//! separately built newer version (`tests/fixtures/tcp-next`) under a steady stream of messages
//! with requests in flight, on a fixed port (the old transport must close before the new one
//! can listen) and on a port of its own (the new one starts beside the old); transports added
//! and removed; the discovery replaced; and configurations that cannot be applied live refused
//! with a reason while the node keeps running.

use comms_host::{builder::PluginSource, Node, NodeBuilder, Received, ReloadError};
use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use std::{
    collections::HashSet,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

const WAIT: Duration = Duration::from_secs(20);
/// Messages per 10 ms tick: 10k msg/s.
const PER_TICK: u64 = 100;

/// The server node, on the TCP plugin at `plugin` listening on `listen`; the same settings
/// every time, so that a reload changes the plugin only.
fn server_config(plugin: &Path, listen: &str) -> NodeBuilder {
    Node::builder("server")
        .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
        // TCP is at-most-once but writes a failed batch again: repeats are dropped by id.
        .dedup_window(200_000)
        .receive_queue_capacity(4096)
        .transport_from(
            "tcp".into(),
            PluginSource::Path(plugin.to_path_buf()),
            format!("listen = \"{listen}\""),
        )
}

async fn client(server: &Node) -> Node {
    let tcp = artifacts().tcp_plugin.clone();
    Node::builder("client")
        .liveness(Some(Duration::from_millis(200)), Duration::from_secs(3))
        .dedup_window(200_000)
        .transport_from("tcp".into(), PluginSource::Path(tcp), "listen = \"127.0.0.1:0\"".into())
        .static_peer("server", [("tcp", server.transports()[0].local_address.as_str())])
        .build()
        .await
        .expect("client")
}

/// Receives numbers on `node` until `stop`; returns them, and counts them in `count`.
fn collect(
    node: Node,
    count: Arc<AtomicU64>,
    expected: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<HashSet<u64>> {
    tokio::spawn(async move {
        let mut seen = HashSet::new();
        loop {
            let total = expected.load(Ordering::SeqCst);
            if total != u64::MAX && seen.len() as u64 >= total {
                return seen;
            }
            match tokio::time::timeout(WAIT, node.receive::<u64>()).await {
                Ok(Ok(received)) => {
                    seen.insert(received.message);
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(error)) => panic!("receive failed: {error}"),
                Err(_) => return seen,
            }
        }
    })
}

/// Sends 0, 1, 2, ... from `from` to `to`, `per_tick` every 10 ms, until `stop`; returns how
/// many it sent (every send must succeed).
fn stream(
    from: Node,
    to: &'static str,
    per_tick: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut next = 0u64;
        let mut ticks = tokio::time::interval(Duration::from_millis(10));
        while !stop.load(Ordering::SeqCst) {
            ticks.tick().await;
            for _ in 0..per_tick {
                if let Err(error) = from.send(to, &next).await {
                    panic!("send {next} to {to} failed during the reload: {error}");
                }
                next += 1;
            }
        }
        next
    })
}

/// Requests to the server's `echo` service, one after another, until `stop`; returns how many
/// were answered (every one must be).
fn requests(client: Node, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut answered = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let answer: Result<u64, _> = client.request("echo", &answered).await;
            match answer {
                Ok(value) => assert_eq!(value, answered),
                Err(error) => panic!("request {answered} failed during the reload: {error}"),
            }
            answered += 1;
        }
        answered
    })
}

async fn wait_for(what: &str, count: &AtomicU64, at_least: u64) {
    let waited = async {
        while count.load(Ordering::SeqCst) < at_least {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(WAIT, waited).await.is_err() {
        panic!("{what}: {} of {at_least} within {WAIT:?}", count.load(Ordering::SeqCst));
    }
}

/// The swap under load; `listen`: the server's listen address before and after.
async fn swap_under_load(listen: &str) {
    let old = artifacts().tcp_plugin.clone();
    let next = artifacts().tcp_next_plugin().to_path_buf();
    let server = server_config(&old, listen).build().await.expect("server");
    assert_eq!(server.transports()[0].plugin_version, "0.1.0");
    server
        .serve("echo", |request: Received<u64>| async move { Ok::<u64, String>(request.message) })
        .await
        .expect("serve");
    let client = client(&server).await;
    server.wait_for_peer("client", WAIT).await.expect("the server knows the client");

    let stop = Arc::new(AtomicBool::new(false));
    let (at_server, at_client) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (server_total, client_total) =
        (Arc::new(AtomicU64::new(u64::MAX)), Arc::new(AtomicU64::new(u64::MAX)));
    let server_seen = collect(server.clone(), Arc::clone(&at_server), Arc::clone(&server_total));
    let client_seen = collect(client.clone(), Arc::clone(&at_client), Arc::clone(&client_total));
    let to_server = stream(client.clone(), "server", PER_TICK, Arc::clone(&stop));
    let to_client = stream(server.clone(), "client", PER_TICK / 5, Arc::clone(&stop));
    let calls: Vec<_> = (0..4).map(|_| requests(client.clone(), Arc::clone(&stop))).collect();
    wait_for("messages before the reload", &at_server, 3_000).await;

    let report = server.reload(server_config(&next, listen)).await.expect("the reload applies");
    assert_eq!(report.replaced, vec!["tcp".to_string()], "{report}");
    assert!(report.warnings.is_empty(), "{report}");
    assert_eq!(server.transports()[0].plugin_version, "0.1.1", "the node runs the new build");
    assert_eq!(server.status().transports[0].plugin_version, "0.1.1");

    let after = at_server.load(Ordering::SeqCst) + 3_000;
    wait_for("messages after the reload", &at_server, after).await;
    stop.store(true, Ordering::SeqCst);
    let sent_to_server = to_server.await.expect("client stream");
    let sent_to_client = to_client.await.expect("server stream");
    let mut answered = 0;
    for call in calls {
        answered += call.await.expect("requests");
    }
    server_total.store(sent_to_server, Ordering::SeqCst);
    client_total.store(sent_to_client, Ordering::SeqCst);
    let (server_seen, client_seen) = (server_seen.await.expect("server"), client_seen.await.expect("client"));
    let missing = |seen: &HashSet<u64>, total: u64| (0..total).filter(|n| !seen.contains(n)).count();
    assert_eq!(
        missing(&server_seen, sent_to_server),
        0,
        "lost on the way to the server, of {sent_to_server}"
    );
    assert_eq!(
        missing(&client_seen, sent_to_client),
        0,
        "lost on the way to the client, of {sent_to_client}"
    );
    assert!(answered > 0, "requests were in flight");
    println!(
        "swap on {listen}: {sent_to_server} messages to the server, {sent_to_client} from it, {answered} requests, none lost or failed"
    );
    client.flush().await.expect("the client gave up on nothing");
    server.flush().await.expect("the server gave up on nothing");
    client.close().await.expect("client closes");
    server.close().await.expect("server closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tcp_plugin_replaces_the_old_on_the_same_port_under_load_and_nothing_is_lost() {
    swap_under_load(&free_address()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tcp_plugin_starts_beside_the_old_on_a_new_port_and_nothing_is_lost() {
    swap_under_load("127.0.0.1:0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_are_added_and_removed_and_the_discovery_replaced_on_a_running_node() {
    let tcp = artifacts().tcp_plugin.clone();
    let listen = "listen = \"127.0.0.1:0\"".to_string();
    let builder = |names: &[&str], peers: &[(&str, &str)]| {
        let mut builder =
            Node::builder("server").liveness(Some(Duration::from_millis(100)), Duration::from_secs(2));
        for name in names {
            builder =
                builder.transport_from(name.to_string(), PluginSource::Path(tcp.clone()), listen.clone());
        }
        for (id, address) in peers {
            builder = builder.static_peer(id, [("b", *address)]);
        }
        builder
    };
    let server = builder(&["a"], &[]).build().await.expect("server");
    let client = Node::builder("client")
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_from("a".into(), PluginSource::Path(tcp.clone()), listen.clone())
        .transport_from("b".into(), PluginSource::Path(tcp.clone()), listen.clone())
        .static_peer("server", [("a", server.transports()[0].local_address.as_str())])
        .build()
        .await
        .expect("client");
    client.send("server", &1u64).await.expect("send over a");
    assert_eq!(server.receive::<u64>().await.expect("1").message, 1);

    // Transport `b` added, then `a` removed: the client learns the new record and sends over `b`.
    let client_b = client.transports()[1].local_address.clone();
    let report = server.reload(builder(&["a", "b"], &[])).await.expect("b added");
    assert_eq!(report.added, vec!["b".to_string()], "{report}");
    let report = server.reload(builder(&["b"], &[])).await.expect("a removed");
    assert_eq!(report.removed, vec!["a".to_string()], "{report}");
    let names: Vec<String> = server.transports().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["b".to_string()]);
    let record_has_only_b = async {
        loop {
            let record =
                client.peers().into_iter().find(|p| p.record.id.as_str() == "server").map(|p| p.record);
            if record.is_some_and(|r| r.addresses.len() == 1 && r.addresses[0].0 == "b") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, record_has_only_b).await.expect("the client learns that the server left `a`");
    client.send("server", &2u64).await.expect("send over b");
    assert_eq!(tokio::time::timeout(WAIT, server.receive::<u64>()).await.expect("2").expect("2").message, 2);

    // The discovery replaced: a static peer added is known at once.
    let report = server.reload(builder(&["b"], &[("client", client_b.as_str())])).await.expect("discovery");
    assert!(report.discovery_replaced, "{report}");
    assert!(server.peers().iter().any(|p| p.record.id.as_str() == "client"));
    let again = server.reload(builder(&["b"], &[("client", client_b.as_str())])).await.expect("the same");
    assert!(again.is_empty(), "the same configuration changes nothing: {again}");
    client.close().await.expect("client closes");
    server.close().await.expect("server closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_change_live_is_refused_with_the_key_and_the_node_keeps_its_configuration() {
    let dir = scratch_dir("reload-refused");
    let plugins = artifacts().plugin_dir.display().to_string();
    let text = |codec: &str, transports: &str| {
        format!("[node]\nid = \"n\"\ncodec = \"{codec}\"\nplugin_dirs = [\"{plugins}\"]\n\n{transports}")
    };
    let tcp = "[transports.tcp]\nlisten = \"127.0.0.1:0\"\n";
    let path = write_config(&dir, "node.toml", &text("binary", tcp));
    let node = Node::from_config(&path).await.expect("node");
    let before = node.transports()[0].local_address.clone();

    // The same file read again (what SIGHUP does): nothing changes.
    assert!(node.reload_file(None).await.expect("same file").is_empty());

    // A fixed setting and a new transport listed first: refused, each with its reason.
    let changed = write_config(&dir, "changed.toml", &text("json", &format!("[transports.udp]\n\n{tcp}")));
    match node.reload_file(Some(&changed)).await {
        Err(ReloadError::Refused { file, reasons }) => {
            assert_eq!(file.as_deref(), Some(changed.as_path()));
            assert!(reasons.iter().any(|r| r.contains("key `node.codec` cannot change")), "{reasons:?}");
            assert!(reasons.iter().any(|r| r.contains("`udp` is new")), "{reasons:?}");
            let message = ReloadError::Refused { file, reasons }.to_string();
            assert!(
                message.contains("changed.toml") && message.contains("keeps its configuration"),
                "{message}"
            );
        }
        other => panic!("must be refused: {other:?}"),
    }
    // A plugin that cannot start: the node keeps the transport it had.
    let broken =
        write_config(&dir, "broken.toml", &text("binary", "[transports.tcp]\nlisten = \"not an address\"\n"));
    let error = node.reload_file(Some(&broken)).await.expect_err("cannot start");
    assert!(error.to_string().contains("keeps the transport it had"), "{error}");
    assert!(error.to_string().contains("listen"), "the plugin's reason is given: {error}");
    assert_eq!(node.transports().len(), 1);
    assert_eq!(node.transports()[0].local_address, before, "the same transport runs on");
    node.send("n", &7u64).await.expect("the node still sends to itself");
    assert_eq!(node.receive::<u64>().await.expect("7").message, 7);
    let built_in_code = Node::builder("m").transport_from(
        "tcp".into(),
        PluginSource::Path(artifacts().tcp_plugin.clone()),
        String::new(),
    );
    let in_code = built_in_code.build().await.expect("m");
    assert!(matches!(in_code.reload_file(None).await, Err(ReloadError::NoConfigFile)));
    in_code.close().await.expect("m closes");
    node.close().await.expect("node closes");
}

/// `comms reload NODE` from an admin, and `SIGHUP`, make a `comms run` process read its config
/// file again: a transport is added, then removed. (Refusing a node that is not an admin is the
/// check `comms shutdown` shares, tested in `remote_shutdown.rs`.)
#[test]
fn comms_reload_and_sighup_apply_the_config_file_of_a_running_node() {
    use comms_plugin_api::security::Identity;
    use std::process::Command;
    let dir = scratch_dir("cli-reload");
    let (server_key, admin_key) = (Identity::generate(), Identity::generate());
    server_key.save_new(&dir.join("server.key")).expect("server key");
    admin_key.save_new(&dir.join("admin.key")).expect("admin key");
    let server_id = server_key.public_key().node_id(Some("server"));
    let server_address = free_address();
    let node = |name: &str| {
        format!(
            "[node]\nid = {name:?}\nkey_file = \"{name}.key\"\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\n\n\
             [security]\nsignatures = \"require\"\n",
            artifacts().plugin_dir
        )
    };
    let server_text = |extra: &str| {
        format!(
            "{}\n[admin]\nkeys = [\"{}\"]\n\n[transports.tcp]\nlisten = {server_address:?}\n{extra}",
            node("server"),
            admin_key.public_key().to_hex()
        )
    };
    let server = write_config(&dir, "server.toml", &server_text(""));
    let admin_text = |name: &str| {
        format!(
            "{}\n[transports.tcp]\nlisten = {:?}\n\n[discovery]\npeers = [{{ id = \"{server_id}\", addresses = {{ tcp = \
             {server_address:?} }} }}]\n",
            node(name),
            free_address()
        )
    };
    let admin = write_config(&dir, "admin.toml", &admin_text("admin"));
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(["run", "--config"]).arg(&server);
    let (running, stderr) = comms_tests::start_and_follow(command, "transport `tcp`");
    let running = comms_tests::KillOnDrop(running);

    let extra = "\n[transports.second]\nplugin = \"tcp\"\nlisten = \"127.0.0.1:0\"\n";
    write_config(&dir, "server.toml", &server_text(extra));
    let output = Command::new(&artifacts().comms_bin)
        .args(["reload", server_id.as_str(), "--config"])
        .arg(&admin)
        .output()
        .expect("comms reload");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}{stdout}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), format!("node {server_id} reloaded its config file: added transport `second`"));

    // SIGHUP: the file read again, the transport removed.
    write_config(&dir, "server.toml", &server_text(""));
    let pid = running.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    let said = loop {
        let line = stderr.recv_timeout(WAIT).expect("comms run reports the reload");
        if line.contains("SIGHUP") {
            break line;
        }
    };
    assert!(said.contains("config file reloaded: removed transport `second`"), "{said}");

    drop(running);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A newer build installed over a loaded plugin's file (written beside it and renamed into
/// place, as package managers do) cannot be loaded from that path again: the reload is refused
/// with the way out, the node keeps running, and the same build under a new file name loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_replaced_at_its_loaded_path_is_refused_and_a_new_file_name_is_loaded() {
    let dir = scratch_dir("reload-same-path");
    let installed = dir.join("libcomms_tcp.so");
    std::fs::copy(&artifacts().tcp_plugin, &installed).expect("install 0.1.0");
    let text = |plugin: &Path| {
        format!("[node]\nid = \"n\"\n\n[transports.tcp]\npath = {plugin:?}\nlisten = \"127.0.0.1:0\"\n")
    };
    let config = write_config(&dir, "node.toml", &text(&installed));
    let node = Node::from_config(&config).await.expect("node");
    assert!(node.reload_file(None).await.expect("nothing changed").is_empty());

    let staged = dir.join("libcomms_tcp.so.new");
    std::fs::copy(artifacts().tcp_next_plugin(), &staged).expect("stage 0.1.1");
    std::fs::rename(&staged, &installed).expect("rename over the loaded file");
    match node.reload_file(None).await {
        Err(ReloadError::Refused { reasons, .. }) => {
            assert_eq!(reasons.len(), 1, "{reasons:?}");
            let reason = &reasons[0];
            assert!(
                reason.contains(&format!("{} of transport `tcp` changed on disk", installed.display())),
                "{reason}"
            );
            assert!(reason.contains("under a new file name"), "{reason}");
        }
        other => panic!("a changed file at the loaded path must be refused: {other:?}"),
    }
    assert_eq!(node.transports()[0].plugin_version, "0.1.0", "the loaded build runs on");
    node.send("n", &1u64).await.expect("the node still sends to itself");
    assert_eq!(node.receive::<u64>().await.expect("1").message, 1);

    let renamed = dir.join("libcomms_tcp-0.1.1.so");
    std::fs::copy(artifacts().tcp_next_plugin(), &renamed).expect("install 0.1.1 under a new name");
    write_config(&dir, "node.toml", &text(&renamed));
    let report = node.reload_file(None).await.expect("a new file name is loaded");
    assert_eq!(report.replaced, ["tcp"]);
    assert_eq!(node.transports()[0].plugin_version, "0.1.1");
    node.close().await.expect("node closes");
}

/// The same for a layer: a new build renamed over a loaded layer's file is refused, naming the
/// layer and its transport, and the stack runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_file_replaced_at_its_loaded_path_is_refused() {
    let dir = scratch_dir("reload-layer-same-path");
    let installed = dir.join("libcomms_compress.so");
    std::fs::copy(&artifacts().compress_plugin, &installed).expect("install the compress layer");
    let text = format!(
        "[node]\nid = \"n\"\n\n[transports.tcp]\nlisten = \"127.0.0.1:0\"\nlayers = [{{ path = {installed:?} }}]\n"
    );
    let config = write_config(&dir, "node.toml", &text);
    let node = Node::from_config(&config).await.expect("node");
    assert!(node.reload_file(None).await.expect("nothing changed").is_empty());

    // Another build at the same path (a different file: the chunk layer), renamed into place.
    let staged = dir.join("libcomms_compress.so.new");
    std::fs::copy(&artifacts().chunk_plugin, &staged).expect("stage");
    std::fs::rename(&staged, &installed).expect("rename over the loaded file");
    match node.reload_file(None).await {
        Err(ReloadError::Refused { reasons, .. }) => {
            assert_eq!(reasons.len(), 1, "{reasons:?}");
            assert!(reasons[0].contains("of layer `file "), "{reasons:?}");
            assert!(reasons[0].contains("of transport `tcp` changed on disk"), "{reasons:?}");
        }
        other => panic!("a changed layer file at the loaded path must be refused: {other:?}"),
    }
    node.send("n", &"still compressed".repeat(100)).await.expect("the node still sends to itself");
    assert_eq!(node.receive::<String>().await.expect("echo").message, "still compressed".repeat(100));
    node.close().await.expect("node closes");
}

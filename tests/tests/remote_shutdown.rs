//! Remote shutdown (`comms_host::admin::SHUTDOWN_SERVICE`): a node closes gracefully when a node
//! whose key is in its `[admin] keys` asks, over the TCP plugin loaded as users load it, and
//! refuses anyone else; without required signatures the admin keys are refused at build time;
//! `comms shutdown NODE` stops a `comms run` process.

use comms_host::{Node, NodeId, PluginLibrary, ReceiveError, RequestError, Security, SignatureMode};
use comms_plugin_api::security::Identity;
use comms_tests::{artifacts, free_address, scratch_dir, write_config, KillOnDrop};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

const WAIT: Duration = Duration::from_secs(10);

/// A node on the loaded TCP plugin that signs everything and checks every signature.
async fn signed_node(
    tcp: &PluginLibrary,
    label: &str,
    identity: &Identity,
    admins: &[&Identity],
    peers: &[(&Node, &Identity)],
) -> Node {
    let mut builder = Node::builder(label)
        .identity(identity.clone())
        .security(Security { signatures: SignatureMode::Require, ..Security::default() })
        .admin_keys(admins.iter().map(|admin| admin.public_key().to_hex()))
        .liveness(Some(Duration::from_millis(100)), Duration::from_secs(2))
        .transport_library("tcp", tcp.clone(), "listen = \"127.0.0.1:0\"");
    for (peer, _) in peers {
        builder =
            builder.static_peer(peer.id().as_str(), [("tcp", peer.transports()[0].local_address.as_str())]);
    }
    builder.build().await.unwrap_or_else(|error| panic!("node {label}: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_shuts_a_node_down_gracefully_and_nobody_else_can() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let (server_key, admin_key, intruder_key) =
        (Identity::generate(), Identity::generate(), Identity::generate());
    let server = signed_node(&tcp, "server", &server_key, &[&admin_key], &[]).await;
    let admin = signed_node(&tcp, "admin", &admin_key, &[], &[(&server, &server_key)]).await;
    let intruder = signed_node(&tcp, "intruder", &intruder_key, &[], &[(&server, &server_key)]).await;
    let server_id = server.id().clone();

    // Anyone else is refused, with the reason, and the node keeps running.
    let refused = intruder.remote_shutdown(server_id.clone(), WAIT).await;
    match &refused {
        Err(RequestError::Remote { message, .. }) => {
            assert!(message.contains("may not shut down"), "{message}");
            assert!(message.contains("[admin] keys"), "{message}");
        }
        other => panic!("the intruder must be refused: {other:?}"),
    }
    let status = intruder.remote_status(server_id.clone(), WAIT).await.expect("still running");
    assert_eq!(status.id, server_id.as_str());

    // A node with no admin keys refuses every caller (the server heard from the intruder).
    let no_admins = server.remote_shutdown(intruder.id().clone(), WAIT).await;
    match &no_admins {
        Err(RequestError::Remote { message, .. }) => {
            assert!(message.contains("has no `[admin] keys`"), "{message}")
        }
        other => panic!("a node without admin keys must refuse: {other:?}"),
    }

    // A message sent before the shutdown is still there for the application afterwards.
    admin.send(server_id.clone(), "before the shutdown").await.unwrap();
    let answer = admin.remote_shutdown(server_id.clone(), WAIT).await.expect("the admin is obeyed");
    assert_eq!(answer, format!("node {server_id} is shutting down"));
    tokio::time::timeout(WAIT, server.closed()).await.expect("the node closed");
    let kept = tokio::time::timeout(WAIT, server.receive::<String>()).await.expect("no hang").unwrap();
    assert_eq!(kept.message, "before the shutdown");
    let after =
        tokio::time::timeout(WAIT, server.receive::<String>()).await.expect("receive ends, not hangs");
    assert!(matches!(after, Err(ReceiveError::Closed)), "{after:?}");
    server.close().await.expect("closing again is a no-op");
    // Peers were told: the admin sees the server leave.
    let gone = admin.remote_status(server_id, Duration::from_millis(500)).await;
    assert!(gone.is_err(), "a closed node does not answer: {gone:?}");

    admin.close().await.unwrap();
    intruder.close().await.unwrap();
}

/// Admin keys need required signatures (else a caller's id proves nothing), and `*` is refused;
/// both errors name the file and the key.
#[tokio::test]
async fn admin_keys_without_required_signatures_are_refused_naming_the_key() {
    let dir = scratch_dir("admin-config");
    let key = Identity::generate();
    key.save_new(&dir.join("node.key")).unwrap();
    let memory = format!(
        "[transports.memory]\npath = \"{}\"\naddress = \"memory://admin-{}\"\n",
        artifacts().memory_plugin.display(),
        std::process::id()
    );
    let cases = [
        (
            "signatures = \"sign\"",
            format!("keys = [\"{}\"]", key.public_key().to_hex()),
            "signatures = \"require\"",
        ),
        ("signatures = \"require\"", "keys = [\"*\"]".to_string(), "every node shut this one down"),
        ("signatures = \"require\"", "keys = [\"not-a-key\"]".to_string(), "`not-a-key` is neither"),
    ];
    for (n, (signatures, keys, reason)) in cases.iter().enumerate() {
        let path = write_config(
            &dir,
            &format!("node{n}.toml"),
            &format!(
                "[node]\nid = \"a\"\nkey_file = \"node.key\"\n\n[security]\n{signatures}\n\n[admin]\n{keys}\n\n{memory}"
            ),
        );
        let error = match Node::from_config(&path).await {
            Ok(node) => panic!("{keys} with {signatures}: node {} started", node.id()),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("admin.keys"), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains(reason), "{error}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let plugins = format!("plugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\n", artifacts().plugin_dir);
    write_config(
        dir,
        &format!("{name}.toml"),
        &format!("[node]\nid = {name:?}\nkey_file = \"{name}.key\"\n{plugins}{body}"),
    )
}

#[test]
fn comms_shutdown_stops_a_running_node() {
    let dir = scratch_dir("cli-shutdown");
    let (server_key, admin_key) = (Identity::generate(), Identity::generate());
    server_key.save_new(&dir.join("server.key")).unwrap();
    admin_key.save_new(&dir.join("admin.key")).unwrap();
    let server_address = free_address();
    let security = "\n[security]\nsignatures = \"require\"\n";
    let server = config(
        &dir,
        "server",
        &format!(
            "{security}\n[admin]\nkeys = [\"{}\"]\n\n[transports.tcp]\nlisten = {server_address:?}\n",
            admin_key.public_key().to_hex()
        ),
    );
    let server_id: NodeId = server_key.public_key().node_id(Some("server"));
    let admin = config(
        &dir,
        "admin",
        &format!(
            "{security}\n[transports.tcp]\nlisten = {:?}\n\n[discovery]\npeers = [{{ id = \"{server_id}\", \
             addresses = {{ tcp = {server_address:?} }} }}]\n",
            free_address()
        ),
    );
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(["run", "--config"]).arg(&server);
    let (child, server_log) = comms_tests::start_and_follow(command, "transport `tcp`");
    let mut running = KillOnDrop(child);

    let output = Command::new(&artifacts().comms_bin)
        .args(["shutdown", server_id.as_str(), "--config"])
        .arg(&admin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // What the server said and whether it still runs: a refused connection means it stopped
        // listening.
        let server_state = running.0.try_wait().unwrap();
        let server_lines: Vec<String> = server_log.try_iter().collect();
        panic!(
            "comms shutdown failed: {}{stdout}\nthe server ({server_state:?} = still running if None) \
             logged: {server_lines:#?}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(stdout.trim(), format!("node {server_id} is shutting down"));

    // The `comms run` process ends by itself, successfully.
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < WAIT, "comms run did not exit after the shutdown");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

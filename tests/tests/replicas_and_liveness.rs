//! Services with replicas in separate OS processes, one killed in the middle of a load; peers
//! declared down by missed heartbeats or at once by a goodbye.

use comms_host::{Node, PeerEventKind, PluginLibrary, RequestOptions};
use comms_tests::{artifacts, free_address, scratch_dir, write_config};
use futures::StreamExt;
use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Starts `comms echo-service` as node `id` listening on `address`, knowing the client.
fn start_replica(dir: &std::path::Path, id: &str, address: &str, client_address: &str) -> Child {
    let config = write_config(
        dir,
        &format!("{id}.toml"),
        &format!(
            "[node]\nid = {id:?}\nplugin_dirs = [{:?}]\nheartbeat_interval_ms = 100\npeer_timeout_ms = 600\n\n\
             [transports.tcp]\nlisten = {address:?}\n\n\
             [discovery]\npeers = [{{ id = \"client\", addresses = {{ tcp = {client_address:?} }} }}]\n",
            artifacts().plugin_dir.to_str().unwrap()
        ),
    );
    let mut command = Command::new(&artifacts().comms_bin);
    command.args(["echo-service", "--service", "echo", "--config"]).arg(config).stdout(Stdio::null());
    comms_tests::start_and_wait_for(command, "serving `echo`")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_costs_no_request() {
    let dir = scratch_dir("replicas");
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let addresses: Vec<String> = (0..3).map(|_| free_address()).collect();
    let mut client = Node::builder("client")
        .liveness(Some(Duration::from_millis(100)), Duration::from_millis(600))
        .request_options(RequestOptions {
            timeout: Duration::from_millis(500),
            attempts: 4,
            backoff: Duration::from_millis(20),
        })
        .transport_library("tcp", tcp, "reconnect_attempts = 2\nconnect_timeout_ms = 200");
    for (i, address) in addresses.iter().enumerate() {
        client = client.static_peer(&format!("replica-{i}"), [("tcp", address.as_str())]);
    }
    let client = client.build().await.unwrap();
    let client_address = client.transports()[0].local_address.clone();
    let mut children: Vec<Child> = addresses
        .iter()
        .enumerate()
        .map(|(i, address)| start_replica(&dir, &format!("replica-{i}"), address, &client_address))
        .collect();
    let started = tokio::time::Instant::now();
    while client.peers().iter().filter(|p| p.record.services.contains(&"echo".to_string())).count() < 3 {
        assert!(started.elapsed() < Duration::from_secs(10), "replicas never announced `echo`");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut callers = Vec::new();
    for caller in 0..8 {
        let client = client.clone();
        callers.push(tokio::spawn(async move {
            for i in 0..60 {
                let text = format!("caller {caller} request {i}");
                let answer: String =
                    client.request("echo", &text).await.unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(answer, text);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut victim = children.remove(1);
    victim.kill().unwrap(); // SIGKILL: no goodbye, connections reset mid-request.
    victim.wait().unwrap();
    for caller in callers {
        caller.await.unwrap();
    }
    // Killed without a goodbye, the replica is declared down once its heartbeats stop.
    let killed_at = tokio::time::Instant::now();
    while client
        .peers()
        .iter()
        .any(|p| p.record.id.as_str() == "replica-1" && p.status == comms_host::PeerStatus::Up)
    {
        assert!(killed_at.elapsed() < Duration::from_secs(5), "the killed replica was never declared down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    client.close().await.unwrap();
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

async fn next_event(
    events: &mut (impl futures::Stream<Item = comms_host::PeerEvent> + Unpin),
) -> comms_host::PeerEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("an event within 10 s").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_means_down_a_goodbye_means_down_now() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let timeout = Duration::from_millis(800);
    let watcher = Node::builder("watcher")
        .liveness(Some(Duration::from_millis(100)), timeout)
        .transport_library("tcp", tcp.clone(), "")
        .build()
        .await
        .unwrap();
    let mut events = Box::pin(watcher.peer_events());
    let watcher_address = watcher.transports()[0].local_address.clone();
    let peer = |id: &'static str, heartbeats: bool| {
        let tcp = tcp.clone();
        let watcher_address = watcher_address.clone();
        async move {
            let interval = heartbeats.then_some(Duration::from_millis(100));
            Node::builder(id)
                .liveness(interval, Duration::from_secs(30))
                .transport_library("tcp", tcp, "")
                .static_peer("watcher", [("tcp", watcher_address.as_str())])
                .build()
                .await
                .unwrap()
        }
    };
    // A graceful leave is seen at once, long before the timeout.
    let polite = peer("polite", true).await;
    let joined = next_event(&mut events).await;
    assert_eq!((joined.kind, joined.record.id.as_str()), (PeerEventKind::Joined, "polite"));
    let started = tokio::time::Instant::now();
    polite.close().await.unwrap();
    let left = next_event(&mut events).await;
    assert_eq!((left.kind, left.record.id.as_str()), (PeerEventKind::Left, "polite"));
    assert!(started.elapsed() < timeout / 2, "goodbye took {:?}", started.elapsed());

    // A peer that stops sending heartbeats (here: it sends one announcement and then nothing)
    // is declared down after the timeout.
    let silent = peer("silent", false).await;
    let joined = next_event(&mut events).await;
    assert_eq!((joined.kind, joined.record.id.as_str()), (PeerEventKind::Joined, "silent"));
    let started = tokio::time::Instant::now();
    let left = next_event(&mut events).await;
    assert_eq!((left.kind, left.record.id.as_str()), (PeerEventKind::Left, "silent"));
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(150) && waited < timeout * 3,
        "declared down after {waited:?}"
    );

    // Heard from again: joined again.
    silent.send("watcher", "I'm back").await.unwrap();
    let rejoined = next_event(&mut events).await;
    assert_eq!((rejoined.kind, rejoined.record.id.as_str()), (PeerEventKind::Joined, "silent"));
    silent.close().await.unwrap();
    watcher.close().await.unwrap();
}

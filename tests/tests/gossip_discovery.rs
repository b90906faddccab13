//! The gossip discovery plugin as users load it (`libcomms_gossip.so`): in-process nodes on
//! loopback with the TCP transport find each other and a service through one seed and call it;
//! a `comms` process killed with SIGKILL (no leave, no goodbye) is reported LEFT by the failure
//! detector alone. The protocol itself is tested without sockets in
//! `backends/gossip/tests/simulation.rs`.

use comms_host::{Node, PeerStatus, PluginLibrary, Received};
use comms_plugin_api::{NodeId, NodeRecord, PeerEventKind};
use comms_tests::{artifacts, free_udp_address, next_event_about, nodes_with_discovery};
use std::time::{Duration, Instant};

/// Fast periods so the test takes seconds: suspicion timeout 4 · 1 · 200 ms = 0.8 s.
const SETTINGS: &str = "protocol_period_ms = 200\nprobe_timeout_ms = 100\n";

fn load(path: &std::path::Path) -> PluginLibrary {
    PluginLibrary::load(path).unwrap_or_else(|error| panic!("{error}"))
}

fn discovery_config(listen: &str, seed: &str) -> String {
    format!("listen = \"{listen}\"\nseeds = [\"{seed}\"]\n{SETTINGS}")
}

/// Polls `condition` every 20 ms until it holds, failing after `limit`.
async fn until(what: &str, limit: Duration, condition: impl Fn() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_find_each_other_through_one_seed_call_a_service_and_see_a_leave() {
    const NODES: usize = 8;
    const SERVER: usize = 5;
    let gossip = load(&artifacts().gossip_plugin);
    let seed = free_udp_address();
    // The plugin on its own, beside the nodes: what gossip reports, apart from what the hosts
    // learn from each other's hellos and goodbyes.
    let watcher = gossip
        .new_discovery(&NodeId::new("gossip-watcher"), "gossip", &discovery_config("127.0.0.1:0", &seed))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    watcher.announce(NodeRecord::new("gossip-watcher")).await.unwrap();
    let started = Instant::now();
    // Node 0 is the seed.
    let mut nodes = nodes_with_discovery("gossip", NODES, &gossip, |n| {
        let listen = if n == 0 { seed.as_str() } else { "127.0.0.1:0" };
        discovery_config(listen, &seed)
    })
    .await;
    nodes[SERVER]
        .serve("gossip.echo", |request: Received<String>| async move {
            Ok::<_, String>(format!("{} from gossip-{SERVER}", request.message))
        })
        .await
        .unwrap();

    // Every node learns every other node's record, and the server's service (a record update
    // gossiped with a higher incarnation).
    for (n, node) in nodes.iter().enumerate() {
        let knows_all = || {
            let peers = node.peers();
            let others = peers
                .iter()
                .filter(|peer| {
                    peer.record.id.as_str() != format!("gossip-{n}") && peer.status == PeerStatus::Up
                })
                .count();
            let serves = peers.iter().any(|peer| {
                peer.record.id.as_str() == format!("gossip-{SERVER}")
                    && peer.record.services.iter().any(|service| service == "gossip.echo")
            });
            others == NODES - 1 && (serves || n == SERVER)
        };
        until(&format!("gossip-{n} knowing all peers and the service"), Duration::from_secs(20), knows_all)
            .await;
    }
    eprintln!(
        "{NODES} nodes knew each other and the service {:?} after the first started",
        started.elapsed()
    );
    let gossiped = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let peers = watcher.peers().await.unwrap();
            let serves = peers.iter().any(|peer| {
                peer.id.as_str() == format!("gossip-{SERVER}")
                    && peer.services.iter().any(|s| s == "gossip.echo")
            });
            if peers.len() == NODES && serves {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    gossiped.await.expect("the watcher learns all 8 records and the service by gossip within 20 s");
    eprintln!(
        "and the gossip watcher knew all {NODES} records {:?} after the first started",
        started.elapsed()
    );

    for (n, node) in nodes.iter().enumerate() {
        if n == SERVER {
            continue;
        }
        let answer: String =
            tokio::time::timeout(Duration::from_secs(10), node.request("gossip.echo", &format!("hello {n}")))
                .await
                .expect("an answer within 10 s")
                .unwrap();
        assert_eq!(answer, format!("hello {n} from gossip-{SERVER}"));
    }

    // A node that closes leaves the gossip group gracefully: the others drop it.
    let leaving = nodes.remove(7);
    leaving.close().await.unwrap();
    let closed_at = Instant::now();
    for node in &nodes {
        let gone = || {
            !node
                .peers()
                .iter()
                .any(|peer| peer.record.id.as_str() == "gossip-7" && peer.status == PeerStatus::Up)
        };
        until(&format!("{} seeing gossip-7 leave", node.id()), Duration::from_secs(10), gone).await;
    }
    eprintln!(
        "a closed node was gone at all {} others {:?} after it closed",
        nodes.len(),
        closed_at.elapsed()
    );
    loop {
        let event = next_event_about(&watcher, "gossip-7", Duration::from_secs(5)).await;
        if event.kind == PeerEventKind::Left {
            break;
        }
    }
    eprintln!("and its graceful leave reached the gossip watcher {:?} after it closed", closed_at.elapsed());
    watcher.close().await.unwrap();
    for node in nodes {
        node.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_with_sigkill_is_reported_left_by_the_failure_detector() {
    let artifacts = artifacts();
    let dir = comms_tests::scratch_dir("gossip-killed");
    let gossip = load(&artifacts.gossip_plugin);
    let seed = free_udp_address();
    // The seed is a node of this process; a watcher (the plugin on its own) reports events.
    let seed_node = Node::builder("gossip-seed")
        .transport_library("tcp", load(&artifacts.tcp_plugin), "")
        .discovery_library(gossip.clone(), &format!("listen = \"{seed}\"\n{SETTINGS}"))
        .build()
        .await
        .unwrap();
    let watcher = gossip
        .new_discovery(&NodeId::new("gossip-watcher"), "gossip", &discovery_config("127.0.0.1:0", &seed))
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    watcher.announce(NodeRecord::new("gossip-watcher")).await.unwrap();

    let config = comms_tests::write_config(
        &dir,
        "victim.toml",
        &format!(
            "[node]\nid = \"gossip-victim\"\nplugin_dirs = [{:?}]\n\n[transports.tcp]\nlisten = \"127.0.0.1:0\"\n\n\
             [discovery]\nplugin = \"gossip\"\n{}",
            artifacts.plugin_dir.to_str().unwrap(),
            discovery_config("127.0.0.1:0", &seed)
        ),
    );
    let mut command = std::process::Command::new(&artifacts.comms_bin);
    command.args(["run", "--echo", "--config"]).arg(&config).stdout(std::process::Stdio::null());
    let mut victim = comms_tests::KillOnDrop(comms_tests::start_and_wait_for(command, "transport `tcp`"));

    let joined = next_event_about(&watcher, "gossip-victim", Duration::from_secs(20)).await;
    assert_eq!(joined.kind, PeerEventKind::Joined);
    until("the seed node learning of the victim", Duration::from_secs(20), || {
        seed_node.peers().iter().any(|peer| peer.record.id.as_str() == "gossip-victim")
    })
    .await;
    // It is really there: it echoes a message back through the address it gossiped.
    seed_node.send("gossip-victim", &"ping".to_string()).await.unwrap();
    let echo =
        tokio::time::timeout(Duration::from_secs(10), seed_node.receive::<String>()).await.unwrap().unwrap();
    assert_eq!((echo.from.as_str(), echo.message.as_str()), ("gossip-victim", "ping"));

    // SIGKILL: no withdraw, no goodbye; only failing probes tell.
    victim.0.kill().unwrap();
    let killed_at = Instant::now();
    let _ = victim.0.wait();
    let left = next_event_about(&watcher, "gossip-victim", Duration::from_secs(15)).await;
    let detected = killed_at.elapsed();
    assert_eq!(left.kind, PeerEventKind::Left, "{left:?}");
    assert!(
        left.record.addresses.iter().any(|(transport, _)| transport == "tcp"),
        "Left carries the last record"
    );
    eprintln!("a process killed with SIGKILL was reported LEFT {detected:?} later (period 200 ms, suspicion timeout 0.8 s)");
    assert!(detected < Duration::from_secs(10), "detected only after {detected:?}");
    assert!(watcher.peers().await.unwrap().iter().all(|peer| peer.id.as_str() != "gossip-victim"));
    until("the seed node dropping the victim", Duration::from_secs(10), || {
        !seed_node
            .peers()
            .iter()
            .any(|peer| peer.record.id.as_str() == "gossip-victim" && peer.status == PeerStatus::Up)
    })
    .await;

    watcher.close().await.unwrap();
    seed_node.close().await.unwrap();
}

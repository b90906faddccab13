//! The Kademlia discovery plugin as users load it (`libcomms_kademlia.so`): in-process nodes on
//! loopback with the TCP transport find each other and a service through the DHT, and call it.

use comms_host::{Node, PluginLibrary, Received};
use comms_tests::{
    artifacts, free_address, free_udp_address, nodes_with_discovery,
    noise_discovery::{noise_node, noise_watcher, watch_insiders},
};
use std::time::{Duration, Instant};

/// The tests of this file run one at a time. Each checks that nodes find each other within a
/// deadline, and the fifty processes of one of them, run beside another's eight nodes on the
/// 2-core CI machine, starved both: requests to contacts timed out, contacts were dropped
/// (two missed requests in a row) and learned again, and the deadlines passed.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn load(path: &std::path::Path) -> PluginLibrary {
    PluginLibrary::load(path).unwrap_or_else(|error| panic!("{error}"))
}

fn discovery_config(listen: &str, seed: &str) -> String {
    format!(
        "listen = \"{listen}\"\nseeds = [\"{seed}\"]\nfind_services = [\"kad.echo\"]\n\
         find_interval_ms = 200\nbootstrap_retry_ms = 100\nrequest_timeout_ms = 500\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_find_each_other_and_a_service_through_the_dht_and_call_it() {
    let _alone = ONE_AT_A_TIME.lock().await;
    eight_nodes_find_each_other_and_call_a_service(Carrier::Udp).await;
}

/// The same with the DHT's datagrams over TCP connections (`carrier = "tcp"`), as where UDP
/// does not pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_find_each_other_and_a_service_through_the_dht_over_tcp() {
    let _alone = ONE_AT_A_TIME.lock().await;
    eight_nodes_find_each_other_and_call_a_service(Carrier::Tcp).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Carrier {
    Udp,
    Tcp,
}

async fn eight_nodes_find_each_other_and_call_a_service(carrier: Carrier) {
    const NODES: usize = 8;
    const SERVER: usize = 5;
    let kademlia = load(&artifacts().kademlia_plugin);
    let (seed, carrier_line) = match carrier {
        Carrier::Udp => (free_udp_address(), ""),
        Carrier::Tcp => (free_address(), "carrier = \"tcp\"\n"),
    };
    let started = Instant::now();
    // Node 0 is the seed.
    let mut nodes = nodes_with_discovery("kad", NODES, &kademlia, |n| {
        let listen = if n == 0 { seed.as_str() } else { "127.0.0.1:0" };
        format!("{carrier_line}{}", discovery_config(listen, &seed))
    })
    .await;
    if carrier == Carrier::Tcp {
        // The seed's DHT really listens on TCP (a UDP carrier would refuse this).
        std::net::TcpStream::connect(&seed).expect("the seed's DHT listens on TCP");
    }
    nodes[SERVER]
        .serve("kad.echo", |request: Received<String>| async move {
            Ok::<_, String>(format!("{} from kad-{SERVER}", request.message))
        })
        .await
        .unwrap();

    // Every node learns every other node's record (all are contacts in a network this small)
    // and the server's service.
    let deadline = Duration::from_secs(20);
    for (n, node) in nodes.iter().enumerate() {
        loop {
            let peers = node.peers();
            let others = peers.iter().filter(|peer| peer.record.id.as_str() != format!("kad-{n}")).count();
            let serves = peers.iter().any(|peer| {
                peer.record.id.as_str() == format!("kad-{SERVER}")
                    && peer.record.services.iter().any(|service| service == "kad.echo")
            });
            if others == NODES - 1 && (serves || n == SERVER) {
                break;
            }
            assert!(
                started.elapsed() < deadline,
                "kad-{n} knows {others} of {} peers (service seen: {serves}) after {deadline:?}",
                NODES - 1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "{NODES} nodes knew each other and the service {:?} after the first started (carrier {})",
        started.elapsed(),
        if carrier == Carrier::Tcp { "tcp" } else { "udp" }
    );

    for (n, node) in nodes.iter().enumerate() {
        if n == SERVER {
            continue;
        }
        let answer: String = node.request("kad.echo", &format!("hello {n}")).await.unwrap();
        assert_eq!(answer, format!("hello {n} from kad-{SERVER}"));
    }

    // A node that closes says GOODBYE: the others drop it from their view.
    let leaving = nodes.remove(7);
    leaving.close().await.unwrap();
    let closed_at = Instant::now();
    for node in &nodes {
        while node
            .peers()
            .iter()
            .any(|peer| peer.record.id.as_str() == "kad-7" && peer.status == comms_host::PeerStatus::Up)
        {
            assert!(closed_at.elapsed() < Duration::from_secs(10), "kad-7 never left {}", node.id());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for node in nodes {
        node.close().await.unwrap();
    }
}

/// 50 `comms run --echo` processes join the DHT through one seed (this test's node); the time
/// until that node knows every one of them is printed, then each echoes a message back. k = 32 so that a node's table can hold all 50
/// (its fullest bucket holds about half of them), and a 1 s bucket refresh, so that the seed's
/// own lookups reach every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_processes_are_all_found_through_the_dht() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const PROCESSES: usize = 50;
    let artifacts = artifacts();
    let dir = comms_tests::scratch_dir("kademlia-processes");
    let seed = free_udp_address();
    let settings = "k = 32\nrefresh_interval_ms = 1000\nbootstrap_retry_ms = 200\nrequest_timeout_ms = 500\n";
    let observer = Node::builder("kad-observer")
        .transport_library("tcp", load(&artifacts.tcp_plugin), "")
        .discovery_library(load(&artifacts.kademlia_plugin), &format!("listen = \"{seed}\"\n{settings}"))
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    // Killed when the test ends, passed or not.
    let mut children: Vec<comms_tests::KillOnDrop> = Vec::new();
    for n in 0..PROCESSES {
        let config = comms_tests::write_config(
            &dir,
            &format!("proc-{n}.toml"),
            &format!(
                "[node]\nid = \"kad-proc-{n}\"\nplugin_dirs = [{:?}]\n\n[transports.tcp]\n\n\
                 [discovery]\nplugin = \"kademlia\"\nlisten = \"127.0.0.1:0\"\nseeds = [\"{seed}\"]\n{settings}",
                artifacts.plugin_dir.to_str().unwrap()
            ),
        );
        let child = std::process::Command::new(&artifacts.comms_bin)
            .args(["run", "--echo", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start comms run");
        children.push(comms_tests::KillOnDrop(child));
    }
    let spawned = started.elapsed();
    let deadline = Duration::from_secs(60);
    loop {
        let known =
            observer.peers().iter().filter(|peer| peer.record.id.as_str().starts_with("kad-proc-")).count();
        if known == PROCESSES {
            break;
        }
        for child in &mut children {
            assert!(child.0.try_wait().unwrap().is_none(), "a comms process exited early");
        }
        assert!(
            started.elapsed() < deadline,
            "the seed knows {known} of {PROCESSES} processes after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{PROCESSES} processes (spawned in {spawned:?}) were all known to the seed {:?} after the first was started",
        started.elapsed()
    );
    // Both ways: each process, found through the DHT, echoes a message back to the seed, which
    // it knows as its first contact.
    for n in 0..PROCESSES {
        observer.send(format!("kad-proc-{n}").as_str(), &format!("ping {n}")).await.unwrap();
    }
    let mut echoed = std::collections::BTreeSet::new();
    while echoed.len() < PROCESSES {
        let echo = tokio::time::timeout(Duration::from_secs(30), observer.receive::<String>())
            .await
            .unwrap_or_else(|_| panic!("only {} of {PROCESSES} echoes within 30 s", echoed.len()))
            .unwrap();
        echoed.insert(echo.message);
    }
    eprintln!("and all {PROCESSES} echoed a message {:?} after the first was started", started.elapsed());
    drop(children);
    observer.close().await.unwrap();
}

/// With `[security] links = "noise"` the host hands Kademlia the node's identity and allow list:
/// three allowed nodes find each other and a service through the DHT and call it; a fourth node
/// whose key the others do not allow (it allows them, and serves and looks up the same service)
/// bootstraps through the same seed but is never learned by them, nor learns them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_kademlia_keeps_a_node_with_a_key_not_allowed_out() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use comms_plugin_api::security::Identity;
    let dir = comms_tests::scratch_dir("kademlia-noise");
    let kademlia = load(&artifacts().kademlia_plugin);
    let seed = free_udp_address();
    let identities: Vec<Identity> = (0..5).map(|_| Identity::generate()).collect();
    let keys: Vec<String> = identities.iter().map(|identity| identity.public_key().to_hex()).collect();
    // Nodes 0, 1 and 2 and the watcher (4) allow each other; the outsider (3) is not allowed.
    let insiders = &[&keys[..3], &keys[4..]].concat();
    let ids: Vec<String> =
        (0..5).map(|n| identities[n].node_id(Some(&format!("knoise-{n}"))).to_string()).collect();
    let outsider_id = &ids[3];
    let config = |listen: &str| discovery_config(listen, &seed).replace("kad.echo", "knoise.echo");
    let started = Instant::now();
    let seed_node = noise_node(&dir, "knoise-0", &identities[0], insiders, &kademlia, &config(&seed)).await;
    // The outsider bootstraps first (it allows every key; the insiders do not allow its key), so
    // its pings and its STOREs (a provider of the service) reach the seed before the insiders'.
    let outsider =
        noise_node(&dir, "knoise-3", &identities[3], &keys, &kademlia, &config("127.0.0.1:0")).await;
    outsider
        .serve("knoise.echo", |request: Received<String>| async move {
            Ok::<_, String>(format!("{} from the outsider", request.message))
        })
        .await
        .unwrap();
    let watcher =
        noise_watcher(&dir, "kademlia", &ids[4], &identities[4], insiders, &kademlia, &config("127.0.0.1:0"))
            .await;
    let mut nodes = vec![seed_node];
    for (n, identity) in identities.iter().enumerate().take(3).skip(1) {
        let label = format!("knoise-{n}");
        nodes.push(noise_node(&dir, &label, identity, insiders, &kademlia, &config("127.0.0.1:0")).await);
    }
    nodes[2]
        .serve("knoise.echo", |request: Received<String>| async move {
            Ok::<_, String>(format!("{} from knoise-2", request.message))
        })
        .await
        .unwrap();
    // By event: the plugin (an allowed node on its own) hears of the three nodes and the
    // service, and of nothing about the outsider meanwhile.
    watch_insiders(&watcher, &ids[..3], (&ids[2], "knoise.echo"), outsider_id).await;
    let deadline = Duration::from_secs(20);
    for (n, node) in nodes.iter().enumerate() {
        loop {
            let peers = node.peers();
            let known = |id: &String| peers.iter().any(|peer| peer.record.id.as_str() == id);
            let serves = peers.iter().any(|peer| {
                peer.record.id.as_str() == ids[2] && peer.record.services.iter().any(|s| s == "knoise.echo")
            });
            if (0..3).filter(|m| *m != n).all(|m| known(&ids[m])) && (serves || n == 2) {
                break;
            }
            assert!(
                started.elapsed() < deadline,
                "knoise-{n} does not know the insiders and the service: {peers:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "3 authenticated Kademlia nodes knew each other and the service {:?} after the first started",
        started.elapsed()
    );
    for (n, node) in nodes.iter().enumerate().take(2) {
        let answer: String =
            tokio::time::timeout(Duration::from_secs(10), node.request("knoise.echo", &format!("hello {n}")))
                .await
                .expect("an answer within 10 s")
                .unwrap();
        assert_eq!(answer, format!("hello {n} from knoise-2"));
    }
    // The outsider's pings and STOREs reached the seed before the insiders bootstrapped, and the
    // insiders have since looked the service up: had anyone accepted it, they would know it.
    assert!(watcher.peers().await.unwrap().iter().all(|peer| peer.id.as_str() != outsider_id));
    for node in &nodes {
        let peers = node.peers();
        assert!(
            peers.iter().all(|peer| peer.record.id.as_str() != outsider_id),
            "{} knows the outsider: {peers:?}",
            node.id()
        );
    }
    let outsider_peers = outsider.peers();
    assert!(
        outsider_peers.iter().all(|peer| !ids[..3].contains(&peer.record.id.to_string())),
        "the outsider learned an insider: {outsider_peers:?}"
    );
    watcher.close().await.unwrap();
    outsider.close().await.unwrap();
    for node in nodes {
        node.close().await.unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

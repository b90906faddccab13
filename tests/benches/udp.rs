//! UDP plugin numbers: small-message throughput in reliable and best-effort mode over loopback,
//! MB/s for 1 MiB messages in reliable mode, each with plain and with encrypted links
//! (`security.links = "noise"`), and the time for 20 nodes to all discover each other by
//! multicast beacons.
//!
//! ```sh
//! cargo bench -p comms-tests --bench udp
//! ```
//!
//! Loopback has no loss; reliable mode still pays for acks and its window. (The rate under 5 %
//! loss between two network namespaces is printed by `tests/tests/udp_namespaces.rs`.)
//!
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the plugin's runtime N worker threads (default: the
//! plugin's own, 2).

use comms_host::{Node, PluginLibrary, Security};
use comms_plugin_api::security::{Identity, LinkMode};
use std::time::{Duration, Instant};

fn library() -> PluginLibrary {
    PluginLibrary::load_with_threads(
        &comms_tests::artifacts().udp_plugin,
        comms_tests::bench::plugin_threads("udp"),
    )
    .unwrap_or_else(|error| fail(&error.to_string()))
}

fn fail(message: &str) -> ! {
    comms_tests::bench::fail("udp", message)
}

/// A loopback address with a UDP port that is free right now.
fn free_udp_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&e.to_string()));
    socket.local_addr().unwrap_or_else(|e| fail(&e.to_string())).to_string()
}

/// Two nodes on loopback that know each other's address, with encrypted links if `secure`;
/// returns them and b's node id.
async fn pair(mode: &str, secure: bool) -> (Node, Node, String) {
    let (address_a, address_b) = (free_udp_address(), free_udp_address());
    let config = |address: &str| format!("listen = \"{address}\"\nmode = \"{mode}\"");
    let dir = comms_tests::scratch_dir("udp-bench");
    let keys: Vec<(std::path::PathBuf, String)> = ["a", "b"]
        .iter()
        .map(|label| {
            let path = dir.join(format!("{label}.key"));
            let identity = Identity::generate();
            identity.save_new(&path).unwrap_or_else(|e| fail(&e.to_string()));
            let id = if secure { identity.node_id(Some(label)).to_string() } else { label.to_string() };
            (path, id)
        })
        .collect();
    let node = |i: usize, own: &str, theirs: &str| {
        let mut builder = Node::builder(if i == 0 { "a" } else { "b" })
            .transport_library("udp", library(), &config(own))
            .static_peer(keys[1 - i].1.as_str(), [("udp", theirs)]);
        if secure {
            let security = Security {
                links: LinkMode::Noise,
                allow: vec![keys[1 - i].1.clone()],
                ..Security::default()
            };
            builder = builder.key_file(&keys[i].0).security(security);
        }
        builder.build()
    };
    let a = node(0, &address_a, &address_b).await.unwrap_or_else(|e| fail(&e.to_string()));
    let b = node(1, &address_b, &address_a).await.unwrap_or_else(|e| fail(&e.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
    (a, b, keys[1].1.clone())
}

fn links(secure: bool) -> &'static str {
    if secure {
        "noise"
    } else {
        "plain"
    }
}

/// 1 MiB messages from `a` to `b` in reliable mode: all must arrive.
async fn mebibyte_messages(secure: bool) {
    let count = comms_tests::bench::scaled(64, comms_tests::bench::scale("udp")) as usize;
    let (a, b, to) = pair("reliable", secure).await;
    let payload = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        for _ in 0..count {
            match tokio::time::timeout(Duration::from_secs(30), b.receive_envelope()).await {
                Ok(Ok(envelope)) if envelope.payload.len() == 1 << 20 => {}
                _ => fail("a 1 MiB message did not arrive in reliable mode"),
            }
        }
        b
    });
    for _ in 0..count {
        a.send_raw(to.as_str(), vec![], payload.clone(), None).await.unwrap_or_else(|e| fail(&e.to_string()));
    }
    let b = receiving.await.unwrap_or_else(|e| fail(&e.to_string()));
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "reliable, {} links: {count} x 1 MiB messages, {:.1} MB/s ({:.1} msg/s)",
        links(secure),
        (count << 20) as f64 / 1e6 / seconds,
        count as f64 / seconds
    );
    a.close().await.unwrap_or_else(|e| fail(&e.to_string()));
    b.close().await.unwrap_or_else(|e| fail(&e.to_string()));
}

async fn measure() {
    let count = comms_tests::bench::scaled(20_000, comms_tests::bench::scale("udp")) as u32;
    for (mode, secure) in
        [("reliable", false), ("reliable", true), ("best-effort", false), ("best-effort", true)]
    {
        let (a, b, to) = pair(mode, secure).await;
        let started = Instant::now();
        let receiving = tokio::spawn(async move {
            let (mut got, mut last) = (0u32, Instant::now());
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), b.receive_envelope()).await {
                (got, last) = (got + 1, Instant::now());
                if got == count {
                    break;
                }
            }
            (got, last, b)
        });
        for _ in 0..count {
            a.send_raw(to.as_str(), vec![], vec![0u8; 64], None)
                .await
                .unwrap_or_else(|e| fail(&e.to_string()));
        }
        let (got, last, b) = receiving.await.unwrap_or_else(|e| fail(&e.to_string()));
        let seconds = (last - started).as_secs_f64();
        eprintln!(
            "{mode}, {} links: {got} of {count} 64-byte messages, {:.0} msg/s",
            links(secure),
            f64::from(got) / seconds
        );
        a.close().await.unwrap_or_else(|e| fail(&e.to_string()));
        b.close().await.unwrap_or_else(|e| fail(&e.to_string()));
    }
    mebibyte_messages(false).await;
    mebibyte_messages(true).await;

    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap_or_else(|e| fail(&e.to_string()))
        .local_addr()
        .unwrap_or_else(|e| fail(&e.to_string()))
        .port();
    let discovery = format!("port = {port}");
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..20 {
        nodes.push(
            Node::builder(format!("n{i}"))
                .transport_library("udp", library(), "")
                .discovery_library(library(), &discovery)
                .build()
                .await
                .unwrap_or_else(|e| fail(&e.to_string())),
        );
    }
    while nodes.iter().any(|node| node.peers().len() < 19) {
        if started.elapsed() > Duration::from_secs(30) {
            fail("20 nodes never all discovered each other");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("20 nodes discovered each other in {:?}", started.elapsed());
    for node in nodes {
        node.close().await.unwrap_or_else(|e| fail(&e.to_string()));
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    runtime.block_on(measure());
}

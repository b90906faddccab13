//! UDP plugin numbers: small-message throughput in reliable and best-effort mode over loopback,
//! and the time for 20 nodes to all discover each other by multicast beacons.
//!
//! ```sh
//! cargo bench -p comms-tests --bench udp
//! ```
//!
//! Loopback has no loss; reliable mode still pays for acks and its window. (1 MiB messages in
//! reliable mode are exchanged by `tests/tests/udp_transport.rs`.)

use comms_host::{Node, PluginLibrary};
use std::time::{Duration, Instant};

fn library() -> PluginLibrary {
    PluginLibrary::load(&comms_tests::artifacts().udp_plugin).unwrap_or_else(|error| fail(&error.to_string()))
}

fn fail(message: &str) -> ! {
    comms_tests::bench::fail("udp", message)
}

/// A loopback address with a UDP port that is free right now.
fn free_udp_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&e.to_string()));
    socket.local_addr().unwrap_or_else(|e| fail(&e.to_string())).to_string()
}

async fn measure() {
    let count = comms_tests::bench::scaled(20_000, comms_tests::bench::scale("udp")) as u32;
    for mode in ["reliable", "best-effort"] {
        let (address_a, address_b) = (free_udp_address(), free_udp_address());
        let config = |address: &str| format!("listen = \"{address}\"\nmode = \"{mode}\"");
        let node = |id: &'static str, own: String, peer: &'static str, theirs: String| {
            let config = config(&own);
            async move {
                Node::builder(id)
                    .transport_library("udp", library(), &config)
                    .static_peer(peer, [("udp", theirs.as_str())])
                    .build()
                    .await
                    .unwrap_or_else(|e| fail(&e.to_string()))
            }
        };
        let a = node("a", address_a.clone(), "b", address_b.clone()).await;
        let b = node("b", address_b, "a", address_a).await;
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
            a.send_raw("b", vec![], vec![0u8; 64], None).await.unwrap_or_else(|e| fail(&e.to_string()));
        }
        let (got, last, b) = receiving.await.unwrap_or_else(|e| fail(&e.to_string()));
        let seconds = (last - started).as_secs_f64();
        eprintln!("{mode}: {got} of {count} 64-byte messages, {:.0} msg/s", f64::from(got) / seconds);
        a.close().await.unwrap_or_else(|e| fail(&e.to_string()));
        b.close().await.unwrap_or_else(|e| fail(&e.to_string()));
    }

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

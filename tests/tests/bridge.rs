//! A relay node with a transport on each of two backends bridges them: a node that only speaks
//! the in-memory transport and a node that only speaks TCP exchange messages through it.

use comms_host::{Node, PluginLibrary};
use comms_tests::artifacts;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_bridges_two_backends() {
    let memory = PluginLibrary::load(&artifacts().memory_plugin).unwrap();
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let bridge = Node::builder("bridge")
        .relay(true)
        .transport_library("memory", memory.clone(), "address = \"memory://bridge\"")
        .transport_library("tcp", tcp.clone(), "")
        .static_peer("memory-only", [("memory", "memory://memory-only")])
        .build()
        .await
        .unwrap();
    let bridge_tcp = bridge.transports()[1].local_address.clone();
    // Each side knows the other at the bridge's address on its own backend.
    let memory_only = Node::builder("memory-only")
        .transport_library("memory", memory, "address = \"memory://memory-only\"")
        .static_peer("tcp-only", [("memory", "memory://bridge")])
        .build()
        .await
        .unwrap();
    let tcp_only = Node::builder("tcp-only")
        .transport_library("tcp", tcp, "")
        .static_peer("memory-only", [("tcp", bridge_tcp.as_str())])
        .build()
        .await
        .unwrap();
    // The bridge learns where tcp-only is from its heartbeat.
    let started = tokio::time::Instant::now();
    while !bridge.peers().iter().any(|p| p.record.id.as_str() == "tcp-only") {
        assert!(started.elapsed() < Duration::from_secs(10), "the bridge never heard of tcp-only");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for i in 0..200u32 {
        memory_only.send("tcp-only", &i).await.unwrap();
    }
    for i in 0..200u32 {
        let received =
            tokio::time::timeout(Duration::from_secs(10), tcp_only.receive::<u32>()).await.unwrap().unwrap();
        assert_eq!((received.from.as_str(), received.message), ("memory-only", i), "relayed in order");
        tcp_only.send(received.from, &(i * 2)).await.unwrap();
    }
    for i in 0..200u32 {
        let reply = tokio::time::timeout(Duration::from_secs(10), memory_only.receive::<u32>())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((reply.from.as_str(), reply.message), ("tcp-only", i * 2));
    }
    let nothing = tokio::time::timeout(Duration::from_millis(200), bridge.receive::<u32>()).await;
    assert!(nothing.is_err(), "the bridge forwards, it does not keep other nodes' messages");
    for node in [memory_only, tcp_only, bridge] {
        node.close().await.unwrap();
    }
}

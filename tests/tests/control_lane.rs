//! A full subscriber or a saturated service slows only itself: the requests, responses and
//! heartbeats that share its transport keep flowing.
//!
//! Before: the receive loop awaited each route in turn, so a subscription whose buffer was full,
//! or a 257th concurrent request, held up everything behind it on that transport until the
//! application read (or forever).

use comms_host::{Node, PluginLibrary, Received, RequestError, RequestOptions};
use comms_tests::artifacts;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::{Notify, Semaphore};

async fn pair(tcp: &PluginLibrary, a: &str, b: &str) -> (Node, Node) {
    let liveness = (Some(Duration::from_millis(200)), Duration::from_secs(3));
    let first = Node::builder(a).liveness(liveness.0, liveness.1).transport_library("tcp", tcp.clone(), "");
    let first = first.build().await.unwrap();
    let address = first.transports()[0].local_address.clone();
    let second = Node::builder(b)
        .liveness(liveness.0, liveness.1)
        .transport_library("tcp", tcp.clone(), "")
        .static_peer(a, [("tcp", address.as_str())])
        .build()
        .await
        .unwrap();
    first.wait_for_peer(b, Duration::from_secs(5)).await.unwrap();
    second.wait_for_peer(a, Duration::from_secs(5)).await.unwrap();
    (first, second)
}

fn once(timeout_ms: u64) -> RequestOptions {
    RequestOptions { timeout: Duration::from_millis(timeout_ms), attempts: 1, ..RequestOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_holds_up_nothing_else() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let (slow, publisher) = pair(&tcp, "lane-slow-reader", "lane-publisher").await;
    slow.serve("ping", |r: Received<u32>| async move { Ok::<_, String>(r.message + 1) }).await.unwrap();
    let stuck = slow.subscribe::<u32>("flood.>").await.unwrap();
    publisher.wait_for_subscriber("flood.x", Duration::from_secs(5)).await.unwrap();

    // Four times the subscription's buffer, never read.
    let published = 4 * comms_host::subscription::SUBSCRIPTION_BUFFER as u32;
    for i in 0..published {
        publisher.publish("flood.x", &i).await.unwrap();
    }
    // The request goes over the same connection, after the flood: it is answered.
    let answer: u32 = publisher.request_with("ping", &41u32, &once(5_000)).await.unwrap();
    assert_eq!(answer, 42);
    // What did not fit was dropped and counted, not queued without bound.
    assert!(stuck.dropped() > 0, "the full subscription counts what it missed");
    assert!(stuck.dropped() < u64::from(published), "the buffer was used: {}", stuck.dropped());
    // The slow reader still sees its peer, and its peer still sees it.
    assert!(slow.peers().iter().any(|p| p.record.id.as_str() == "lane-publisher"));

    drop(stuck);
    publisher.close().await.unwrap();
    slow.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_at_its_limit_refuses_at_once_and_the_node_keeps_working() {
    let tcp = PluginLibrary::load(&artifacts().tcp_plugin).unwrap();
    let (busy, caller) = pair(&tcp, "lane-busy", "lane-caller").await;
    let limit = 256;
    let gate = Arc::new(Semaphore::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let all_held = Arc::new(Notify::new());
    {
        let (gate, holding, all_held) = (Arc::clone(&gate), Arc::clone(&holding), Arc::clone(&all_held));
        busy.serve("hold", move |r: Received<u32>| {
            let (gate, holding, all_held) = (Arc::clone(&gate), Arc::clone(&holding), Arc::clone(&all_held));
            async move {
                if holding.fetch_add(1, Ordering::SeqCst) + 1 == limit {
                    all_held.notify_one();
                }
                let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(r.message)
            }
        })
        .await
        .unwrap();
    }
    caller.serve("inner", |r: Received<u32>| async move { Ok::<_, String>(r.message * 2) }).await.unwrap();
    caller.wait_for_service("hold", Duration::from_secs(5)).await.unwrap();
    busy.wait_for_service("inner", Duration::from_secs(5)).await.unwrap();

    // Fill every slot of the busy node.
    let mut held = Vec::new();
    for i in 0..limit as u32 {
        let caller = caller.clone();
        held.push(tokio::spawn(
            async move { caller.request_with::<_, u32>("hold", &i, &once(60_000)).await },
        ));
    }
    tokio::time::timeout(Duration::from_secs(30), all_held.notified()).await.expect("every slot is taken");

    // One more is refused at once, not queued behind the others (and not left to time out).
    let error = caller.request_with::<_, u32>("hold", &999u32, &once(10_000)).await.unwrap_err();
    assert!(matches!(error, RequestError::Unavailable { .. }), "{error}");
    assert!(error.to_string().contains("limit"), "{error}");

    // The busy node still calls out and gets its answer back over the same transport.
    let doubled: u32 = busy.request_with("inner", &21u32, &once(5_000)).await.unwrap();
    assert_eq!(doubled, 42);

    gate.add_permits(limit);
    for (i, request) in held.into_iter().enumerate() {
        assert_eq!(request.await.unwrap().unwrap(), i as u32);
    }
    caller.close().await.unwrap();
    busy.close().await.unwrap();
}

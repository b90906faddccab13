//! Faults of the NATS transport, for real: a nats-server of the test's own (JetStream on, its
//! own store directory, a free port) killed and restarted in the middle of a stream. No message
//! whose `send` returned may be lost, the sends wait for the server instead of failing, and the
//! receiver resumes on its own. Also: a server that is not there at start is retried, then
//! named without the password.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, ErrorCode, MessageId, NodeId, Payload, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, free_address, scratch_dir};
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use support::OwnNats;

#[path = "support/nats.rs"]
mod support;

fn envelope(to: &str, n: u32) -> Envelope {
    Envelope::new(
        MessageId::from_u128(u128::from(n) + 1),
        NodeId::new("restart-sender"),
        Destination::Node(NodeId::new(to)),
        Payload::from(n.to_be_bytes().to_vec()),
    )
}

async fn open(library: &PluginLibrary, node: &str, config: &str) -> LoadedTransport {
    library.new_transport(&NodeId::new(node), "nats", config).await.unwrap_or_else(|error| panic!("{error}"))
}

/// Messages sent in all; the server is killed once this many sends have returned.
const MESSAGES: u32 = 600;
const KILL_AFTER: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream_loses_no_acknowledged_message() {
    let dir = scratch_dir("nats-restart");
    let Some(nats) = OwnNats::start(&dir) else { return };
    let nats = Arc::new(Mutex::new(nats));
    let url = nats.lock().unwrap().url();
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let config =
        format!("url = \"{url}\"\nack_wait_ms = 1000\nfetch_expires_ms = 500\nrequest_timeout_ms = 1000\n");
    let receiver = Arc::new(open(&library, "restart-receiver", &config).await);
    let sender = open(&library, "restart-sender", &config).await;
    let address = receiver.info().local_address.clone();
    // A second inbox nobody reads until the server is back: what it holds survives only in the
    // server's store.
    let parked = open(&library, "restart-parked", &config).await;
    let parked_address = parked.info().local_address.clone();
    parked.close().await.unwrap();
    let mut parked_sent = Vec::new();

    // The receiver takes everything and accepts it, as a host does.
    let received = Arc::new(Mutex::new(HashSet::new()));
    let duplicates = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let receiving = tokio::spawn({
        let (receiver, received, duplicates, stop) =
            (Arc::clone(&receiver), Arc::clone(&received), Arc::clone(&duplicates), Arc::clone(&stop));
        async move {
            while !stop.load(Ordering::Relaxed) {
                let batch =
                    match tokio::time::timeout(Duration::from_millis(200), receiver.receive(256)).await {
                        Err(_) => continue,
                        Ok(Ok(batch)) if batch.is_empty() => return,
                        Ok(Ok(batch)) => batch,
                        Ok(Err(error)) => panic!("receive failed: {error}"),
                    };
                let mut settlements = Vec::new();
                for inbound in batch {
                    let n = u32::from_be_bytes(inbound.envelope.payload.as_slice().try_into().unwrap());
                    if !received.lock().unwrap().insert(n) {
                        duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    settlements.push(Settlement {
                        delivery_tag: inbound.delivery_tag,
                        outcome: SettlementOutcome::ACCEPTED,
                    });
                }
                if let Err(error) = receiver.settle(settlements).await {
                    eprintln!("settle failed (those messages come again): {error}");
                }
            }
        }
    });

    // Kill the server once a third of the sends returned; bring it back half a second later.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let restarting = std::thread::spawn({
        let (nats, acknowledged) = (Arc::clone(&nats), Arc::clone(&acknowledged));
        move || {
            let started = Instant::now();
            while acknowledged.load(Ordering::Relaxed) < KILL_AFTER {
                assert!(started.elapsed() < Duration::from_secs(30), "sends stalled before the restart");
                std::thread::sleep(Duration::from_millis(1));
            }
            nats.lock().unwrap().kill();
            std::thread::sleep(Duration::from_millis(500));
            nats.lock().unwrap().spawn().unwrap();
        }
    });

    let mut sent = Vec::new();
    let mut refused = Vec::new();
    for n in 0..MESSAGES {
        match tokio::time::timeout(
            Duration::from_secs(30),
            sender.send(&address, envelope("restart-receiver", n)),
        )
        .await
        {
            Ok(Ok(())) => {
                sent.push(n);
                acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => refused.push((n, error)),
            Err(_) => panic!("send {n} did not return within 30 s (the server down and never back?)"),
        }
        if n % 4 == 0 {
            let to_parked = sender.send(&parked_address, envelope("restart-parked", n));
            match tokio::time::timeout(Duration::from_secs(30), to_parked).await {
                Ok(Ok(())) => parked_sent.push(n),
                Ok(Err(error)) => refused.push((n, error)),
                Err(_) => panic!("send {n} to the parked inbox did not return within 30 s"),
            }
        }
    }
    restarting.join().unwrap();

    let started = Instant::now();
    loop {
        let missing: Vec<u32> = {
            let received = received.lock().unwrap();
            sent.iter().copied().filter(|n| !received.contains(n)).collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of {} acknowledged messages never arrived after the restart (first: {:?})",
            missing.len(),
            sent.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    receiving.await.unwrap();
    eprintln!(
        "{} sent and acknowledged, {} refused, {} duplicates (same message id, delivered again)",
        sent.len(),
        refused.len(),
        duplicates.load(Ordering::Relaxed)
    );
    // Sends wait for the server to come back rather than fail.
    assert!(refused.is_empty(), "sends failed across the restart: {:?}", &refused[..refused.len().min(3)]);
    sender.close().await.unwrap();
    receiver.close().await.unwrap();

    // The parked node comes back after the crash and finds everything it was sent.
    let parked = open(&library, "restart-parked", &config).await;
    let mut parked_received = HashSet::new();
    let started = Instant::now();
    while parked_sent.iter().any(|n| !parked_received.contains(n)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the parked inbox lost {} of {} acknowledged messages in the crash",
            parked_sent.iter().filter(|n| !parked_received.contains(*n)).count(),
            parked_sent.len()
        );
        if let Ok(Ok(batch)) = tokio::time::timeout(Duration::from_millis(500), parked.receive(256)).await {
            let mut settlements = Vec::new();
            for inbound in batch {
                parked_received
                    .insert(u32::from_be_bytes(inbound.envelope.payload.as_slice().try_into().unwrap()));
                settlements.push(Settlement {
                    delivery_tag: inbound.delivery_tag,
                    outcome: SettlementOutcome::ACCEPTED,
                });
            }
            parked.settle(settlements).await.unwrap();
        }
    }
    parked.close().await.unwrap();
}

#[tokio::test]
async fn unreachable_nats_at_start_is_retried_then_named_without_the_password() {
    // Nothing listens on this port.
    let address = free_address();
    let config = format!("url = \"nats://admin:t0p-s3cret@{address}\"\nconnect_attempts = 3\n");
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let started = Instant::now();
    let error = library
        .new_transport(&NodeId::new("nobody"), "nats", &config)
        .await
        .map(drop)
        .expect_err("nothing listens there");
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.message.contains("after 3 attempts"), "{error}");
    assert!(error.message.contains(&address), "the error names the server: {error}");
    assert!(!error.message.contains("t0p-s3cret"), "the password leaked: {error}");
    // Two pauses between three attempts: 100 ms, then 200 ms.
    assert!(started.elapsed() >= Duration::from_millis(300), "no backoff between the attempts");
}

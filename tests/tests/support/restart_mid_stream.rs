//! One scenario for every broker plugin whose server a test can run itself: the server is killed
//! (SIGKILL, as a crash) and started again in the middle of a stream. No message whose `send`
//! returned may be lost, the sends wait for the server instead of failing, the receiver resumes
//! on its own, and an inbox nobody read during the crash still holds everything it was sent.
//!
//! The test files that use it (`redis_faults.rs`, `nats_faults.rs`) bring the server and the
//! plugin's settings; the steps and the checks are here, once.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, MessageId, NodeId, Payload, Settlement, SettlementOutcome,
};
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Messages sent in all; the server is killed once this many sends have returned.
const MESSAGES: u32 = 600;
const KILL_AFTER: usize = 200;

/// A server process of the test's own.
pub(crate) trait OwnServer: Send + 'static {
    /// Kills it as a crash would (SIGKILL: only what is on disk survives).
    fn kill(&mut self);
    /// Starts it again on the same port and store, and waits until it listens.
    fn spawn(&mut self) -> std::io::Result<()>;
}

/// What differs from one plugin to the next.
pub(crate) struct Restart<'a> {
    /// The plugin's name, as in `[transports.NAME]`.
    pub(crate) plugin: &'a str,
    /// The server as tests and logs name it ("Redis", "the NATS server").
    pub(crate) server_name: &'a str,
    pub(crate) library: &'a PluginLibrary,
    /// The transport's config, pointing at the test's own server.
    pub(crate) config: &'a str,
    /// How long one send may wait for the server to come back.
    pub(crate) send_limit: Duration,
    /// Whether `receive` may fail while the server is down (the receiver then tries again);
    /// when not, a failed `receive` fails the test.
    pub(crate) receive_may_fail: bool,
}

/// The message numbered `n` to node `to`: its payload is `n`, its id `n + 1`.
pub(crate) fn envelope(to: &str, n: u32) -> Envelope {
    Envelope::new(
        MessageId::from_u128(u128::from(n) + 1),
        NodeId::new("restart-sender"),
        Destination::Node(NodeId::new(to)),
        Payload::from(n.to_be_bytes().to_vec()),
    )
}

/// A transport of `plugin` for node `node`.
pub(crate) async fn open(library: &PluginLibrary, plugin: &str, node: &str, config: &str) -> LoadedTransport {
    library.new_transport(&NodeId::new(node), plugin, config).await.unwrap_or_else(|error| panic!("{error}"))
}

fn number(envelope: &Envelope) -> u32 {
    u32::from_be_bytes(envelope.payload.as_slice().try_into().unwrap())
}

fn accepted(delivery_tag: u64) -> Settlement {
    Settlement { delivery_tag, outcome: SettlementOutcome::ACCEPTED }
}

/// Runs the scenario against `server` (started, and stopped by its owner afterwards).
pub(crate) async fn nothing_acknowledged_is_lost<S: OwnServer>(case: Restart<'_>, server: S) {
    let Restart { plugin, server_name, library, config, send_limit, receive_may_fail } = case;
    let server = Arc::new(Mutex::new(server));
    let receiver = Arc::new(open(library, plugin, "restart-receiver", config).await);
    let sender = open(library, plugin, "restart-sender", config).await;
    let address = receiver.info().local_address.clone();
    // A second inbox nobody reads until the server is back: what it holds survives only in the
    // server's store.
    let parked = open(library, plugin, "restart-parked", config).await;
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
                        Ok(Err(error)) if receive_may_fail => {
                            eprintln!("receive failed (expected while the server is down): {error}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Ok(Err(error)) => panic!("receive failed: {error}"),
                    };
                let mut settlements = Vec::new();
                for inbound in batch {
                    if !received.lock().unwrap().insert(number(&inbound.envelope)) {
                        duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    settlements.push(accepted(inbound.delivery_tag));
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
        let (server, acknowledged) = (Arc::clone(&server), Arc::clone(&acknowledged));
        move || {
            let started = Instant::now();
            while acknowledged.load(Ordering::Relaxed) < KILL_AFTER {
                assert!(started.elapsed() < Duration::from_secs(30), "sends stalled before the restart");
                std::thread::sleep(Duration::from_millis(1));
            }
            server.lock().unwrap().kill();
            std::thread::sleep(Duration::from_millis(500));
            server.lock().unwrap().spawn().unwrap();
        }
    });

    let mut sent = Vec::new();
    let mut refused = Vec::new();
    for n in 0..MESSAGES {
        match tokio::time::timeout(send_limit, sender.send(&address, envelope("restart-receiver", n))).await {
            Ok(Ok(())) => {
                sent.push(n);
                acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => refused.push((n, error)),
            Err(_) => {
                panic!("send {n} did not return within {send_limit:?} ({server_name} down and never back?)")
            }
        }
        if n % 4 == 0 {
            let to_parked = sender.send(&parked_address, envelope("restart-parked", n));
            match tokio::time::timeout(send_limit, to_parked).await {
                Ok(Ok(())) => parked_sent.push(n),
                Ok(Err(error)) => refused.push((n, error)),
                Err(_) => panic!("send {n} to the parked inbox did not return within {send_limit:?}"),
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
    let parked = open(library, plugin, "restart-parked", config).await;
    let mut parked_received = HashSet::new();
    let started = Instant::now();
    while parked_sent.iter().any(|n| !parked_received.contains(n)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the parked inbox lost {} of {} acknowledged messages in the crash of {server_name}",
            parked_sent.iter().filter(|n| !parked_received.contains(*n)).count(),
            parked_sent.len()
        );
        if let Ok(Ok(batch)) = tokio::time::timeout(Duration::from_millis(500), parked.receive(256)).await {
            let mut settlements = Vec::new();
            for inbound in batch {
                parked_received.insert(number(&inbound.envelope));
                settlements.push(accepted(inbound.delivery_tag));
            }
            parked.settle(settlements).await.unwrap();
        }
    }
    parked.close().await.unwrap();
}

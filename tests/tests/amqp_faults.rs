//! Faults with the AMQP plugin, for real: a broker that is not there at start, and the test's
//! connections force-closed by the broker (`rabbitmqctl close_connection`) in the middle of a
//! stream. Nothing the broker confirmed to a sender may be lost.

use comms_host::PluginLibrary;
use comms_plugin_api::{
    Destination, Envelope, ErrorCode, MessageId, NodeId, Payload, Settlement, SettlementOutcome,
};
use comms_tests::{artifacts, broker_available};
use std::{
    collections::BTreeSet,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

fn library() -> PluginLibrary {
    PluginLibrary::load(&artifacts().amqp_plugin).unwrap_or_else(|error| panic!("{error}"))
}

fn envelope(n: u128, from: &str, to: &str) -> Envelope {
    Envelope::new(
        MessageId::from_u128(n),
        NodeId::new(from),
        Destination::Node(NodeId::new(to)),
        Payload::from(n.to_be_bytes().to_vec()),
    )
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_then_named_without_its_password() {
    let config = "url = \"amqp://guest:hunter2@127.0.0.1:1/%2f\"\nconnect_attempts = 3\nreconnect_initial_delay_ms = 10";
    let started = std::time::Instant::now();
    let error = library().new_transport(&NodeId::new("nobody"), "amqp", config).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(error.retryable, "{error}");
    assert!(error.message.contains("amqp://guest:***@127.0.0.1:1/%2f"), "{error}");
    assert!(error.message.contains("3 attempts"), "{error}");
    assert!(!error.message.contains("hunter2"), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(30), "the attempts were spaced by the backoff");
    let error = library().new_discovery(&NodeId::new("nobody"), "amqp", config).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::UNREACHABLE, "{error}");
    assert!(!error.message.contains("hunter2") && error.message.contains("***"), "{error}");
}

const MESSAGES: u128 = 3000;

/// Has the broker close every connection of the nodes `ids` (the plugin names each connection
/// `comms <node> transport` or `comms <node> discovery`), and no other: test binaries that use
/// the broker at the same time keep theirs. Returns how many it closed.
fn close_connections_of(ids: &[&str]) -> usize {
    let rabbitmqctl = |args: &[&str]| {
        let output = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let listed =
        rabbitmqctl(&["list_connections", "pid", "client_properties", "--no-table-headers", "--quiet"]);
    let ours = listed.lines().filter(|line| ids.iter().any(|id| line.contains(&format!("\"comms {id} "))));
    let pids: Vec<&str> = ours.filter_map(|line| line.split_whitespace().next()).collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "comms fault test"]);
    }
    pids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_mid_stream_lose_no_confirmed_message() {
    if !broker_available("RabbitMQ", "127.0.0.1:5672") {
        return;
    }
    let library = library();
    let receiver_id = format!("fault-receiver-{}", std::process::id());
    let config = "inbox_expires_ms = 60000\nreconnect_initial_delay_ms = 50\nreconnect_max_delay_ms = 500";
    let receiver = library.new_transport(&NodeId::new(&receiver_id), "amqp", config).await.unwrap();
    let sender_id = format!("fault-sender-{}", std::process::id());
    let sender = library.new_transport(&NodeId::new(&sender_id), "amqp", config).await.unwrap();
    let address = receiver.info().local_address.clone();

    let received = Arc::new(Mutex::new(BTreeSet::new()));
    let receiving = {
        let received = Arc::clone(&received);
        async move {
            let mut deliveries = 0usize;
            while received.lock().unwrap().len() < MESSAGES as usize {
                let batch = receiver.receive(256).await.expect("receive keeps working across reconnects");
                assert!(!batch.is_empty(), "receive ended although the transport is open");
                deliveries += batch.len();
                let settlements = batch
                    .iter()
                    .map(|inbound| Settlement {
                        delivery_tag: inbound.delivery_tag,
                        outcome: SettlementOutcome::ACCEPTED,
                    })
                    .collect();
                received.lock().unwrap().extend(batch.iter().map(|inbound| inbound.envelope.id.as_u128()));
                // A settlement for a connection that died is ignored or fails: both are fine,
                // the broker delivers those messages again.
                let _ = receiver.settle(settlements).await;
            }
            receiver.close().await.unwrap();
            deliveries
        }
    };
    let sending = async {
        let mut confirmed = BTreeSet::new();
        for n in 0..MESSAGES {
            sender
                .send(&address, envelope(n, &sender_id, &receiver_id))
                .await
                .unwrap_or_else(|error| panic!("send {n} failed although the broker came back: {error}"));
            confirmed.insert(n);
        }
        confirmed
    };
    let faults = {
        let received = Arc::clone(&received);
        let (receiver_id, sender_id) = (receiver_id.clone(), sender_id.clone());
        async move {
            for round in 0..2 {
                let threshold = (round + 1) * MESSAGES as usize / 4;
                while received.lock().unwrap().len() < threshold {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let closed = close_connections_of(&[&receiver_id, &sender_id]);
                assert!(
                    closed >= 2,
                    "the sender's and the receiver's connections were closed (closed {closed})"
                );
            }
        }
    };
    let run = async { tokio::join!(sending, receiving, faults) };
    let (confirmed, deliveries, ()) =
        tokio::time::timeout(Duration::from_secs(90), run).await.expect("the stream finished within 90 s");
    let received = received.lock().unwrap().clone();
    let lost: Vec<_> = confirmed.difference(&received).take(10).collect();
    assert!(lost.is_empty(), "confirmed but never received: {lost:?} ...");
    println!(
        "{} confirmed, {} delivered ({} again after a reconnect)",
        confirmed.len(),
        deliveries,
        deliveries - received.len()
    );
    sender.close().await.unwrap();
}

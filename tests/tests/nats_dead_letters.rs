//! Dead letters of the NATS transport: a message requeued by its receiver more than
//! `max_deliveries` times moves to `<prefix>.dead-letter.<node>` with the reason and is never
//! delivered again, while the messages behind it still flow.

#[path = "support/nats.rs"]
mod support;

use comms_plugin_api::{host_side::PluginLibrary, testing::deliveries_of_a_message_always_requeued, NodeId};
use comms_tests::{artifacts, broker_available, NATS};
use std::time::Duration;
use support::{jetstream_api, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_requeued_past_max_deliveries_becomes_a_dead_letter() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let deployment = Deployment::new(NATS, "dead_letters");
    let config = deployment.transport_config("max_deliveries = 3\nfetch_expires_ms = 500\n");
    let receiver = library.new_transport(&NodeId::new("dl-receiver"), "nats", &config).await.unwrap();
    let address = receiver.info().local_address.clone();

    // Message 1 is requeued at every delivery: 3 of them, then it goes to the dead letters.
    // Message 2 is accepted whenever it comes.
    let node = ("dl-receiver", address.as_str());
    let (deliveries_of_1, deliveries_of_2) =
        deliveries_of_a_message_always_requeued(&receiver, node, 3, Duration::from_millis(1500))
            .await
            .unwrap();
    assert_eq!(deliveries_of_1, 3, "message 1: max_deliveries deliveries, then none");
    assert_eq!(deliveries_of_2, 1, "message 2 is not held up by message 1");

    let counters = receiver.stats().transport.counters;
    assert!(counters.contains(&("nats.dead_letters".to_string(), 1)), "{counters:?}");
    // The dead letter is in the stream, on the node's dead-letter subject, with the reason.
    let subject = format!("{}.dead-letter.dl-receiver", deployment.prefix);
    let answer = jetstream_api(
        &deployment.server,
        &format!("$JS.API.STREAM.MSG.GET.{}", deployment.stream),
        &format!("{{\"last_by_subj\":\"{subject}\"}}"),
    )
    .unwrap();
    assert!(answer.contains(&format!("\"subject\":\"{subject}\"")), "no dead letter on {subject}: {answer}");
    receiver.close().await.unwrap();
}

/// With `requeue_delay_ms`, a message the receiver requeues comes again after its delay, doubled
/// at each delivery (a negative acknowledgement with a delay), not at once and not only after
/// `ack_wait_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_message_comes_again_after_its_delay_doubled_per_delivery() {
    if !broker_available("NATS", NATS) {
        return;
    }
    let library = PluginLibrary::load(artifacts().nats_plugin()).unwrap_or_else(|error| panic!("{error}"));
    let deployment = Deployment::new(NATS, "requeue_delay");
    let config = deployment.transport_config("requeue_delay_ms = 300\nack_wait_ms = 30000\n");
    let node = "rd-receiver";
    let receiver = library.new_transport(&NodeId::new(node), "nats", &config).await.unwrap();
    let address = receiver.info().local_address.clone();
    let gaps = comms_plugin_api::testing::gaps_between_deliveries(
        &receiver,
        (node, &address),
        3,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // At once (the old behaviour) would be a few milliseconds; the ack wait 30 s.
    assert!(gaps[0] >= Duration::from_millis(300), "after the 1st delivery: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(600), "after the 2nd, doubled: {gaps:?}");
    assert!(gaps.iter().all(|gap| *gap < Duration::from_secs(5)), "well before ack_wait_ms: {gaps:?}");
    receiver.close().await.unwrap();
}

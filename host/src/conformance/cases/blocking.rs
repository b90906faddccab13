//! A plugin's futures must not hold the host's thread: the host's poll watch times every poll,
//! and this case reports the longest.

use crate::conformance::harness::{
    describe_blocking, envelope, failed, seconds, tag_payload, unique_name, within, CaseResult, Harness,
    Settling,
};
use comms_plugin_api::{Capabilities, Destination, Outbound};
use tokio::time::Instant;

/// Messages of the case's own workload, sent one by one and again in a batch.
const MESSAGES: u32 = 20;

pub(super) async fn no_blocking_polls(h: &Harness) -> CaseResult {
    // A short workload of its own, so that the case means something when run alone (filtered):
    // every operation of the contract once or a few times.
    let limit = h.operation_limit();
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let to_receiver = || Destination::Node(receiver.node.clone());
    for i in 0..MESSAGES {
        sender.send_to(&receiver, envelope(&sender, to_receiver(), tag_payload(&[i]))).await?;
    }
    let batch = (MESSAGES..2 * MESSAGES)
        .map(|i| Outbound {
            address: receiver.address().into(),
            envelope: envelope(&sender, to_receiver(), tag_payload(&[i])),
        })
        .collect();
    let failures = within("send_batch", limit, sender.transport().send_batch(batch)).await?;
    if let Some(failure) = failures.first() {
        return Err(failed(format!("send_batch failed for item {}: {}", failure.index, failure.error)));
    }
    let _ = (sender.transport().stats(), receiver.transport().stats());
    if h.capabilities().contains(Capabilities::NATIVE_TOPICS) {
        let pattern = format!("conformance.{}.>", unique_name("blocking"));
        within("subscribe", limit, receiver.transport().subscribe(&pattern))
            .await?
            .map_err(|error| failed(format!("subscribe failed: {error}")))?;
        within("unsubscribe", limit, receiver.transport().unsubscribe(&pattern))
            .await?
            .map_err(|error| failed(format!("unsubscribe failed: {error}")))?;
    }
    // Delivery is other cases' business: wait a little, and only remark on a shortfall.
    let arrived = inbox.collect(2 * MESSAGES as usize, Instant::now() + limit).await?.len();
    if arrived < 2 * MESSAGES as usize {
        h.note(format!("{arrived} of {} messages of this case's workload arrived", 2 * MESSAGES));
    }
    for endpoint in [&sender, &receiver] {
        within("close", limit, endpoint.close())
            .await?
            .map_err(|error| failed(format!("closing {} failed: {error}", endpoint.role)))?;
    }

    let own = h.longest_blocking_poll().map(|blocked| (blocked, "this case"));
    let longest = match (own, h.earlier_blocking()) {
        (Some(own), Some(earlier)) => Some(if own.0.duration >= earlier.0.duration { own } else { earlier }),
        (own, earlier) => own.or(earlier),
    };
    let Some((blocked, during)) = longest else { return Ok(()) };
    let described = describe_blocking(h.plugin_name(), &blocked);
    if blocked.duration >= h.blocking_poll_limit() {
        return Err(failed(format!("{described} (in {during})")));
    }
    h.note(format!(
        "the longest poll held a thread for {:.2} s in {} (in {during}); under the {} that fails, and a busy \
         machine can do that by itself, but a blocking call in the plugin would show up the same way",
        blocked.duration.as_secs_f64(),
        blocked.operation,
        seconds(h.blocking_poll_limit())
    ));
    Ok(())
}

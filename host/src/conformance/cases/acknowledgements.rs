//! Settlements are honoured by transports that declare acknowledgements.

use super::envelope::ensure_intact;
use crate::conformance::harness::{
    ensure, envelope, failed, tag_payload, within, CaseResult, Harness, Settling,
};
use comms_plugin_api::{Destination, Settlement, SettlementOutcome};

pub(super) async fn redelivery_after_reject(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let mut inbox = h.inbox(&receiver, Settling::ByCase);
    let make = |i: u32| envelope(&sender, Destination::Node(receiver.node.clone()), tag_payload(&[i]));
    let (requeued, accepted, discarded) = (make(0), make(1), make(2));
    for message in [&requeued, &accepted, &discarded] {
        sender.send_to(&receiver, message.clone()).await?;
    }

    let first = inbox.collect(3, h.deadline()).await?;
    ensure!(first.len() == 3, "{} of 3 messages arrived", first.len());
    let find = |id| first.iter().find(|inbound| inbound.envelope.id == id);
    let (Some(r), Some(a), Some(d)) = (find(requeued.id), find(accepted.id), find(discarded.id)) else {
        return Err(failed("the 3 messages that arrived are not the 3 that were sent"));
    };
    ensure!(
        r.delivery_tag != a.delivery_tag
            && a.delivery_tag != d.delivery_tag
            && r.delivery_tag != d.delivery_tag,
        "three unsettled messages share delivery tags ({}, {}, {}): they cannot be settled separately",
        r.delivery_tag,
        a.delivery_tag,
        d.delivery_tag
    );
    let settle = |tag, outcome| Settlement { delivery_tag: tag, outcome };
    let settlements = vec![
        settle(r.delivery_tag, SettlementOutcome::REJECTED_REQUEUE),
        settle(a.delivery_tag, SettlementOutcome::ACCEPTED),
        settle(d.delivery_tag, SettlementOutcome::REJECTED_DISCARD),
    ];
    within("settle", limit, receiver.transport().settle(settlements))
        .await?
        .map_err(|error| failed(format!("settle failed: {error}")))?;

    let again = match inbox.next_before(h.deadline()).await? {
        Some(again) if again.envelope.id == requeued.id => again,
        Some(other) if other.envelope.id == accepted.id => {
            return Err(failed("a message settled ACCEPTED was delivered again"))
        }
        Some(other) if other.envelope.id == discarded.id => {
            return Err(failed("a message settled REJECTED_DISCARD was delivered again"))
        }
        Some(other) => return Err(failed(format!("an unknown message {} arrived", other.envelope.id))),
        None => return Err(failed("a message settled REJECTED_REQUEUE was not delivered again")),
    };
    ensure_intact("the redelivered message", &requeued, &again.envelope)?;
    let accept = vec![settle(again.delivery_tag, SettlementOutcome::ACCEPTED)];
    within("settle", limit, receiver.transport().settle(accept))
        .await?
        .map_err(|error| failed(format!("settling the redelivered message failed: {error}")))?;
    inbox.expect_nothing("every message was settled ACCEPTED or REJECTED_DISCARD").await
}

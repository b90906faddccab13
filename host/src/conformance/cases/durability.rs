//! Durable transports keep what a closed receiver had not taken yet.

use crate::conformance::harness::{
    describe_missing, ensure, envelope, failed, read_tag, tag_payload, within, CaseResult, Harness, Inbox,
    Settling,
};
use comms_plugin_api::{Capabilities, Destination, Inbound, Settlement, SettlementOutcome};
use std::collections::BTreeSet;

/// Sent before the receiver closes.
const BEFORE_CLOSE: u32 = 200;
/// The receiver takes this many (with `receive` itself, no more), then closes.
const TAKEN_BEFORE_CLOSE: usize = 50;
/// Sent while the receiver is closed, to the address it had.
const WHILE_CLOSED: u32 = 50;
/// Sent to the reopened receiver.
const AFTER_REOPEN: u32 = 100;

/// Adds the numbers of what `inbox` hands out until `done` says so or it runs dry.
async fn take(
    inbox: &mut Inbox,
    received: &mut BTreeSet<u32>,
    deadline: tokio::time::Instant,
    done: impl Fn(&BTreeSet<u32>) -> bool,
) -> CaseResult {
    while !done(received) {
        let Some(inbound) = inbox.next_before(deadline).await? else { return Ok(()) };
        record(inbox.role(), received, &inbound)?;
    }
    Ok(())
}

fn record(role: &str, received: &mut BTreeSet<u32>, inbound: &Inbound) -> CaseResult {
    match read_tag::<1>(&inbound.envelope.payload) {
        Some([i]) => {
            received.insert(i);
            Ok(())
        }
        None => Err(failed(format!("{role} got a message nobody sent it"))),
    }
}

pub(super) async fn durable_resume(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let node = h.new_node_id("durable");
    let first = h.open_node("the receiver", node.clone()).await?;
    let sender = h.open("the sender").await?;
    let message = |i: u32| envelope(&sender, Destination::Node(node.clone()), tag_payload(&[i]));
    let old_address = first.address().to_string();

    // A send that succeeded is a message the transport must deliver.
    let mut expected = BTreeSet::new();
    for i in 0..BEFORE_CLOSE {
        sender.send_to(&first, message(i)).await?;
        expected.insert(i);
    }
    // Take a few with receive itself (an inbox would take all it can), so that the transport
    // still holds the rest when the receiver closes.
    let mut received = BTreeSet::new();
    let acknowledging = h.capabilities().contains(Capabilities::ACKNOWLEDGEMENTS);
    while received.len() < TAKEN_BEFORE_CLOSE {
        let wanted = (TAKEN_BEFORE_CLOSE - received.len()) as u32;
        let batch = within("a receive", limit, first.transport().receive(wanted))
            .await?
            .map_err(|error| failed(format!("receive failed: {error}")))?;
        ensure!(!batch.is_empty(), "receive returned an empty batch (closed) although the receiver is open");
        for inbound in &batch {
            record(&first.role, &mut received, inbound)?;
        }
        if acknowledging {
            let accepted = batch
                .iter()
                .map(|inbound| Settlement {
                    delivery_tag: inbound.delivery_tag,
                    outcome: SettlementOutcome::ACCEPTED,
                })
                .collect();
            within("settle", limit, first.transport().settle(accepted))
                .await?
                .map_err(|error| failed(format!("settle failed: {error}")))?;
        }
    }
    within("closing the receiver mid-stream", limit, first.close())
        .await?
        .map_err(|error| failed(format!("closing the receiver mid-stream failed: {error}")))?;

    // While it is closed: a durable transport may keep these for it, or refuse them.
    let mut refused = None;
    for i in BEFORE_CLOSE..BEFORE_CLOSE + WHILE_CLOSED {
        match within("a send to the closed receiver", limit, sender.send(&old_address, message(i))).await? {
            Ok(()) => {
                expected.insert(i);
            }
            Err(error) => refused = Some(error),
        }
    }
    if let Some(error) = refused {
        h.note(format!("sends to the closed durable receiver were refused: {error}"));
    }

    let second = h.open_node("the reopened receiver", node.clone()).await?;
    let mut inbox = h.inbox(&second, Settling::AcceptAll);
    let start = BEFORE_CLOSE + WHILE_CLOSED;
    for i in start..start + AFTER_REOPEN {
        sender.send_to(&second, message(i)).await?;
        expected.insert(i);
    }
    take(&mut inbox, &mut received, h.deadline(), |r| expected.is_subset(r)).await?;
    let missing: Vec<u32> = expected.difference(&received).copied().collect();
    if !missing.is_empty() {
        return Err(failed(format!(
            "after the receiver took {TAKEN_BEFORE_CLOSE} of {BEFORE_CLOSE} messages, closed, and was reopened with \
             the same node id and config, {}",
            describe_missing(expected.len(), &missing)
        )));
    }
    Ok(())
}

//! `send_batch`: many envelopes, each with its own address, in one call.

use super::envelope::ensure_intact;
use crate::conformance::harness::{
    envelope, failed, pseudo_random_bytes, read_tag, within, CaseResult, Endpoint, Harness, Inbox, Settling,
};
use comms_plugin_api::{Capabilities, Destination, Envelope, ErrorCode, Outbound};
use std::collections::HashMap;

/// Items per receiver.
const PER_RECEIVER: u32 = 50;

/// Up to this `max_message_size` the batch carries one oversized item.
const LARGEST_OVERSIZED: u64 = 64 << 20;

/// A message to `receiver` whose payload starts with `[receiver, sequence]` and has a length
/// that varies with the sequence (0 to 1,500 bytes after the tag).
fn item(sender: &Endpoint, receiver: &Endpoint, which: u32, sequence: u32) -> Outbound {
    let mut payload = [which, sequence].iter().flat_map(|n| n.to_be_bytes()).collect::<Vec<u8>>();
    payload.extend(pseudo_random_bytes((sequence as usize * 31) % 1500, u64::from(sequence) << 8 | 1));
    Outbound {
        address: receiver.address().into(),
        envelope: envelope(sender, Destination::Node(receiver.node.clone()), payload),
    }
}

/// Receives `count` messages at `inbox`, checks that each is one of `sent` (by id) and intact,
/// and, when the transport is ordered, that they came in batch order.
async fn check_arrivals(
    h: &Harness,
    inbox: &mut Inbox,
    which: u32,
    sent: &HashMap<u128, Envelope>,
    count: usize,
    then_nothing: bool,
) -> CaseResult {
    let received = inbox.collect(count, h.deadline()).await?;
    if received.len() < count {
        return Err(failed(format!(
            "{} got {} of the {count} batch items addressed to it",
            inbox.role(),
            received.len()
        )));
    }
    let mut last = None;
    for inbound in &received {
        let got = &inbound.envelope;
        let Some(expected) = sent.get(&got.id.as_u128()) else {
            return Err(failed(format!("{} got a message nobody sent it ({})", inbox.role(), got.id)));
        };
        ensure_intact(&format!("a batch item to {}", inbox.role()), expected, got)?;
        let Some([to, sequence]) = got.payload.as_slice().get(..8).and_then(read_tag::<2>) else {
            return Err(failed("a batch item lost its tag"));
        };
        if to != which {
            return Err(failed(format!("a batch item for receiver {to} reached {}", inbox.role())));
        }
        if h.capabilities().contains(Capabilities::ORDERED) && last.is_some_and(|last| sequence < last) {
            return Err(failed(format!(
                "batch item {sequence} reached {} after item {}: an ordered transport keeps batch order per \
                 address",
                inbox.role(),
                last.unwrap_or_default()
            )));
        }
        last = Some(sequence);
    }
    if then_nothing {
        inbox
            .expect_nothing(
                "every batch item addressed to it had arrived (and the oversized one was refused)",
            )
            .await?;
    }
    Ok(())
}

pub(super) async fn batched_send(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let first = h.open("the first receiver").await?;
    let second = h.open("the second receiver").await?;
    let sender = h.open("the sender").await?;
    let mut inboxes = [h.inbox(&first, Settling::AcceptAll), h.inbox(&second, Settling::AcceptAll)];

    let failures = within("an empty send_batch", limit, sender.transport().send_batch(Vec::new())).await?;
    if let Some(failure) = failures.first() {
        return Err(failed(format!("an empty send_batch reported a failure: {}", failure.error)));
    }

    // Items alternate between the receivers; one oversized item sits in the middle.
    let mut batch = Vec::new();
    for sequence in 0..PER_RECEIVER {
        batch.push(item(&sender, &first, 0, sequence));
        batch.push(item(&sender, &second, 1, sequence));
    }
    let sent: HashMap<u128, Envelope> =
        batch.iter().map(|outbound| (outbound.envelope.id.as_u128(), outbound.envelope.clone())).collect();
    let max = h.max_message_size();
    let oversized_at = (max <= LARGEST_OVERSIZED).then(|| {
        let at = batch.len() / 2 + 1;
        let oversized =
            envelope(&sender, Destination::Node(first.node.clone()), vec![0x5a; max as usize + 1]);
        batch.insert(at, Outbound { address: first.address().into(), envelope: oversized });
        at
    });
    let items = batch.len();

    let failures =
        within(&format!("a send_batch of {items} items"), limit, sender.transport().send_batch(batch))
            .await?;
    for failure in &failures {
        match oversized_at {
            Some(at) if failure.index == at => {
                if failure.error.code != ErrorCode::TOO_LARGE {
                    return Err(failed(format!(
                        "the oversized batch item {at} failed with code `{}` ({}); expected `{}`",
                        failure.error.code.name(),
                        failure.error,
                        ErrorCode::TOO_LARGE.name()
                    )));
                }
            }
            _ => {
                return Err(failed(format!(
                    "batch item {} of {items} failed: {}{}",
                    failure.index,
                    failure.error,
                    if oversized_at.is_some() {
                        " (one oversized item must fail alone, the others be sent)"
                    } else {
                        ""
                    }
                )))
            }
        }
    }
    if let Some(at) = oversized_at {
        if !failures.iter().any(|failure| failure.index == at) {
            return Err(failed(format!(
                "batch item {at}, of max_message_size + 1 bytes, was not reported as failed; it must fail with \
                 TOO_LARGE"
            )));
        }
    }
    let [first_inbox, second_inbox] = &mut inboxes;
    check_arrivals(h, first_inbox, 0, &sent, PER_RECEIVER as usize, oversized_at.is_some()).await?;
    check_arrivals(h, second_inbox, 1, &sent, PER_RECEIVER as usize, false).await
}

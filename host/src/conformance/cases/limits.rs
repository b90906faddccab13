//! Limits: messages above the declared size, and addresses nobody listens on.

use super::envelope::{ensure_intact, FRAMING_ALLOWANCE};
use crate::conformance::harness::{
    envelope, failed, pseudo_random_bytes, seconds, tag_payload, within, CaseError, CaseResult, Endpoint,
    Harness, Inbox, Settling,
};
use comms_plugin_api::{Capabilities, Destination, Envelope, ErrorCode};
use tokio::time::Instant;

/// Above this `max_message_size` the suite does not build an oversized message.
const LARGEST_OVERSIZED: u64 = 256 << 20;

/// Up to this `max_message_size` the suite also sends messages at the limit.
const LARGEST_AT_LIMIT: u64 = 64 << 20;

/// Sends to the dead address while a message to a live one must get through.
const SENDS_TO_DEAD_ADDRESS: u32 = 10;

/// Sends `sent` and waits for it to arrive intact at `inbox`.
async fn deliver(
    h: &Harness,
    sender: &Endpoint,
    receiver: &Endpoint,
    inbox: &mut Inbox,
    sent: Envelope,
    what: &str,
) -> CaseResult {
    sender.send_to(receiver, sent.clone()).await.map_err(|error| match error {
        CaseError::Failed(reason) => failed(format!("{what}: {reason}")),
        skipped => skipped,
    })?;
    match inbox.next_before(h.deadline()).await? {
        Some(got) if got.envelope.id == sent.id => ensure_intact(what, &sent, &got.envelope),
        Some(got) => Err(failed(format!(
            "{what}: expected message {} but a message of {} bytes arrived (was a refused message delivered \
             after all?)",
            sent.id,
            got.envelope.payload.len()
        ))),
        None => Err(failed(format!("{what} did not arrive"))),
    }
}

pub(super) async fn oversized_message(h: &Harness) -> CaseResult {
    let max = h.max_message_size();
    if max > LARGEST_OVERSIZED {
        return Err(CaseError::Skipped(format!(
            "max_message_size is {max} bytes; the suite builds oversized messages only up to {LARGEST_OVERSIZED}"
        )));
    }
    let limit = h.operation_limit();
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let to_receiver = || Destination::Node(receiver.node.clone());

    let oversized = envelope(&sender, to_receiver(), vec![0x5a; max as usize + 1]);
    let what = format!("a send of {} bytes (max_message_size + 1)", max + 1);
    match within(&what, limit, sender.send(receiver.address(), oversized)).await? {
        Ok(()) => return Err(failed(format!("{what} was accepted; it must be refused with code TOO_LARGE"))),
        Err(error) if error.code == ErrorCode::TOO_LARGE => {}
        Err(error) => {
            return Err(failed(format!(
                "{what} was refused with code `{}` ({error}); expected `{}`",
                error.code.name(),
                ErrorCode::TOO_LARGE.name()
            )))
        }
    }
    let normal = envelope(&sender, to_receiver(), b"after the oversized message".to_vec());
    deliver(h, &sender, &receiver, &mut inbox, normal, "a normal message after the oversized one").await?;

    if max > LARGEST_AT_LIMIT || max <= FRAMING_ALLOWANCE {
        return Ok(());
    }
    let near = (max - FRAMING_ALLOWANCE) as usize;
    let below = envelope(&sender, to_receiver(), pseudo_random_bytes(near, max));
    deliver(
        h,
        &sender,
        &receiver,
        &mut inbox,
        below,
        &format!("a message of {near} bytes (max_message_size - 4 KiB)"),
    )
    .await?;

    // The contract says max_message_size is the largest *payload* accepted. A transport that
    // counts its own framing in it refuses this one; worth knowing, not worth failing over.
    let exact = envelope(&sender, to_receiver(), vec![0xa5; max as usize]);
    let what = format!("a message of exactly max_message_size ({max} bytes)");
    match within(&what, limit, sender.send(receiver.address(), exact.clone())).await? {
        Ok(()) => match inbox.next_before(h.deadline()).await? {
            Some(got) if got.envelope.id == exact.id => ensure_intact(&what, &exact, &got.envelope)?,
            Some(_) => return Err(failed(format!("{what}: another message arrived instead"))),
            None => return Err(failed(format!("{what} was accepted by send but did not arrive"))),
        },
        Err(error) if error.code == ErrorCode::TOO_LARGE => h.note(format!(
            "a payload of exactly max_message_size ({max} bytes) is refused as too large: the declared limit \
             includes the transport's own overhead, so it is not the largest payload accepted"
        )),
        Err(error) => return Err(failed(format!("{what} was refused: {error}"))),
    }
    Ok(())
}

pub(super) async fn unreachable_address(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    // An address this transport really produced, so it is well-formed, but nobody listens on it.
    let gone = h.open("an instance that is closed again").await?;
    let dead = gone.address().to_string();
    within("closing", limit, gone.close())
        .await?
        .map_err(|error| failed(format!("closing {} failed: {error}", gone.role)))?;

    let sender = h.open("the sender").await?;
    let receiver = h.open("the receiver").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let to_dead = |i: u32| envelope(&sender, Destination::Node(gone.node.clone()), tag_payload(&[i]));

    let started = Instant::now();
    let first = tokio::time::timeout(limit, sender.send(&dead, to_dead(0))).await.map_err(|_| {
        failed(format!(
            "a send to {dead}, where nobody listens, did not return within {}: a send may fail or queue, \
             never hang the caller",
            seconds(limit)
        ))
    })?;
    let first_took = started.elapsed();

    // While that address is retried (or queued for), other traffic must flow.
    let more = async {
        let mut results = Vec::new();
        for i in 1..=SENDS_TO_DEAD_ADDRESS {
            results.push(sender.send(&dead, to_dead(i)).await);
        }
        results
    };
    let live = envelope(&sender, Destination::Node(receiver.node.clone()), b"to a live address".to_vec());
    let live_id = live.id;
    let live_delivery = async {
        sender.send_to(&receiver, live).await?;
        match inbox.next_before(Instant::now() + limit).await? {
            Some(got) if got.envelope.id == live_id => Ok(()),
            Some(_) => Err(failed("the receiver got a message nobody sent it")),
            None => Err(failed(format!(
                "a message to a live address did not arrive within {} while messages to {dead} (nobody \
                 listening) were pending: one unreachable peer must not hold up the others",
                seconds(limit)
            ))),
        }
    };
    let (more, live) = futures::future::join(tokio::time::timeout(limit, more), live_delivery).await;
    live?;
    let more = more.map_err(|_| {
        failed(format!(
            "{SENDS_TO_DEAD_ADDRESS} more sends to {dead} (nobody listening) did not return within {}",
            seconds(limit)
        ))
    })?;

    let refused: Vec<_> = std::iter::once(&first).chain(&more).filter_map(|r| r.as_ref().err()).collect();
    match refused.first() {
        Some(error) => {
            let good =
                [ErrorCode::UNREACHABLE, ErrorCode::IO, ErrorCode::TIMEOUT, ErrorCode::INVALID_ADDRESS];
            if !good.contains(&error.code) {
                h.note(format!("a send to a dead address failed with code `{}`: {error}", error.code.name()));
            }
        }
        // A durable transport keeps them for the node's return: nothing to remark.
        None if h.capabilities().contains(Capabilities::DURABLE) => {}
        None => h.note(format!(
            "{} sends to {dead} (nobody listening) were all accepted (the first in {}) and no error reached \
             the caller; if the transport drops them later, the sender never learns of it",
            SENDS_TO_DEAD_ADDRESS + 1,
            seconds(first_took)
        )),
    }
    // The sender may not be able to flush what it queued for the dead address: an error from
    // close is allowed here, a close that hangs is not.
    let closed =
        within("closing the sender with messages queued for a dead address", limit, sender.close()).await?;
    if let Err(error) = closed {
        h.note(format!("closing the sender reported: {error}"));
    }
    Ok(())
}

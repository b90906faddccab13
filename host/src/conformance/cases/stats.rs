//! `stats()`: what a transport says it did matches what the suite saw it do.

use crate::conformance::harness::{
    envelope, failed, seconds, tag_payload, within, CaseError, CaseResult, Endpoint, Harness,
};
use comms_plugin_api::{
    host_side::TransportCounters, Capabilities, Destination, Outbound, Settlement, SettlementOutcome,
};
use std::time::Duration;
use tokio::time::Instant;

/// Messages sent one by one, then as many again in one batch.
const EACH_WAY: u32 = 25;

/// How long counters may lag behind what the operations returned.
const SETTLE_TIME: Duration = Duration::from_secs(2);

/// Sends to a dead address, counted in `send_errors` when refused.
const DEAD_SENDS: u32 = 3;

/// Above this `max_message_size` the case does not build an oversized message.
const LARGEST_OVERSIZED: u64 = 64 << 20;

/// The payload of message `i`: its number, then a length that varies (0 to 1,999 bytes more).
fn payload(i: u32) -> Vec<u8> {
    let mut payload = tag_payload(&[i]);
    payload.resize(4 + (i as usize * 397) % 2000, i as u8);
    payload
}

/// `stats()` of `endpoint`, failing the case if the call held the thread too long.
fn stats(h: &Harness, endpoint: &Endpoint) -> Result<TransportCounters, CaseError> {
    let started = std::time::Instant::now();
    let stats = endpoint.transport().stats();
    let took = started.elapsed();
    if took >= h.blocking_poll_limit() {
        return Err(failed(format!(
            "stats() of {} took {}: it must be cheap and must not block",
            endpoint.role,
            seconds(took)
        )));
    }
    Ok(stats)
}

/// Polls `stats()` of both ends until `holds` says so or [`SETTLE_TIME`] passes; returns the
/// last counters either way.
async fn wait_for(
    h: &Harness,
    sender: &Endpoint,
    receiver: &Endpoint,
    holds: impl Fn(&TransportCounters, &TransportCounters) -> bool,
) -> Result<(TransportCounters, TransportCounters), CaseError> {
    let deadline = Instant::now() + SETTLE_TIME;
    loop {
        let counters = (stats(h, sender)?, stats(h, receiver)?);
        if holds(&counters.0, &counters.1) || Instant::now() >= deadline {
            return Ok(counters);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn transport_stats(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let (sender_before, receiver_before) = (stats(h, &sender)?, stats(h, &receiver)?);
    let to_receiver = || Destination::Node(receiver.node.clone());

    let mut payload_bytes = 0;
    for i in 0..EACH_WAY {
        let payload = payload(i);
        payload_bytes += payload.len() as u64;
        sender.send_to(&receiver, envelope(&sender, to_receiver(), payload)).await?;
    }
    let batch: Vec<Outbound> = (EACH_WAY..2 * EACH_WAY)
        .map(|i| {
            let payload = payload(i);
            payload_bytes += payload.len() as u64;
            Outbound {
                address: receiver.address().into(),
                envelope: envelope(&sender, to_receiver(), payload),
            }
        })
        .collect();
    let failures = within("send_batch", limit, sender.transport().send_batch(batch)).await?;
    if let Some(failure) = failures.first() {
        return Err(failed(format!("send_batch failed for item {}: {}", failure.index, failure.error)));
    }
    let sent = u64::from(2 * EACH_WAY);

    // Received with `receive` itself, so that the case knows exactly what was handed out.
    let (mut received, mut received_bytes) = (0u64, 0u64);
    let acknowledging = h.capabilities().contains(Capabilities::ACKNOWLEDGEMENTS);
    while received < sent {
        let wait = h.deadline().saturating_duration_since(Instant::now());
        let Ok(batch) = tokio::time::timeout(wait, receiver.transport().receive(256)).await else {
            return Err(failed(format!("{received} of the {sent} messages sent arrived")));
        };
        let batch = batch.map_err(|error| failed(format!("receive failed: {error}")))?;
        if batch.is_empty() {
            return Err(failed("receive returned an empty batch (closed) although the receiver is open"));
        }
        received += batch.len() as u64;
        received_bytes += batch.iter().map(|inbound| inbound.envelope.payload.len() as u64).sum::<u64>();
        if acknowledging {
            let accepted = batch
                .iter()
                .map(|inbound| Settlement {
                    delivery_tag: inbound.delivery_tag,
                    outcome: SettlementOutcome::ACCEPTED,
                })
                .collect();
            within("settle", limit, receiver.transport().settle(accepted))
                .await?
                .map_err(|error| failed(format!("settle failed: {error}")))?;
        }
    }

    let (s, r) = wait_for(h, &sender, &receiver, |s, r| {
        s.messages_sent.saturating_sub(sender_before.messages_sent) >= sent
            && s.bytes_sent.saturating_sub(sender_before.bytes_sent) >= payload_bytes
            && r.messages_received.saturating_sub(receiver_before.messages_received) == received
            && r.bytes_received.saturating_sub(receiver_before.bytes_received) == received_bytes
    })
    .await?;
    let sent_count = s.messages_sent.saturating_sub(sender_before.messages_sent);
    if sent_count < sent {
        return Err(failed(format!(
            "the sender's messages_sent grew by {sent_count} after {sent} messages were sent ({EACH_WAY} with send, \
             {EACH_WAY} with send_batch)"
        )));
    }
    let sent_bytes = s.bytes_sent.saturating_sub(sender_before.bytes_sent);
    if sent_bytes < payload_bytes {
        return Err(failed(format!(
            "the sender's bytes_sent grew by {sent_bytes} after payloads of {payload_bytes} bytes were sent"
        )));
    }
    let received_count = r.messages_received.saturating_sub(receiver_before.messages_received);
    let counted_bytes = r.bytes_received.saturating_sub(receiver_before.bytes_received);
    if received_count != received || counted_bytes != received_bytes {
        return Err(failed(format!(
            "the receiver's messages_received and bytes_received grew by {received_count} and {counted_bytes}; \
             receive handed out {received} messages with {received_bytes} payload bytes"
        )));
    }

    // Refused sends: an oversized message (refused by every transport, see oversized_message)
    // and sends to an address nobody listens on (where the transport says so).
    let errors_before = stats(h, &sender)?.send_errors;
    let mut refused = 0;
    let max = h.max_message_size();
    if max <= LARGEST_OVERSIZED {
        let oversized = envelope(&sender, to_receiver(), vec![0; max as usize + 1]);
        if within("an oversized send", limit, sender.send(receiver.address(), oversized)).await?.is_err() {
            refused += 1;
        }
    }
    let gone = h.open("an instance that is closed again").await?;
    let dead = gone.address().to_string();
    within("closing", limit, gone.close())
        .await?
        .map_err(|error| failed(format!("closing {} failed: {error}", gone.role)))?;
    for i in 0..DEAD_SENDS {
        let message = envelope(&sender, Destination::Node(gone.node.clone()), tag_payload(&[i]));
        if within("a send to a dead address", limit, sender.send(&dead, message)).await?.is_err() {
            refused += 1;
        }
    }
    if refused == 0 {
        h.note("no send was refused (no oversized message built, sends to a dead address accepted): send_errors not checked");
        return Ok(());
    }
    let (s, _) =
        wait_for(h, &sender, &receiver, |s, _| s.send_errors.saturating_sub(errors_before) >= refused)
            .await?;
    let counted = s.send_errors.saturating_sub(errors_before);
    if counted < refused {
        return Err(failed(format!(
            "the sender's send_errors grew by {counted} after {refused} sends were refused with an error"
        )));
    }
    Ok(())
}

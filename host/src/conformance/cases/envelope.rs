//! What an envelope carries arrives unchanged.

use crate::conformance::harness::{
    envelope, failed, fresh_message_id, pseudo_random_bytes, CaseError, CaseResult, Harness, Settling,
};
use comms_plugin_api::{Destination, Envelope};

/// The large payload of the round trip, when the transport accepts it.
const LARGE_PAYLOAD: usize = 1 << 20;

/// Room left for the transport's own framing when the suite picks a payload size from
/// `max_message_size`.
pub(super) const FRAMING_ALLOWANCE: u64 = 4096;

pub(super) async fn round_trip(h: &Harness) -> CaseResult {
    let receiver = h.open("the receiver").await?;
    let sender = h.open("the sender").await?;
    let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
    let to_receiver = Destination::Node(receiver.node.clone());

    let mut full = envelope(&sender, to_receiver.clone(), (0..=255u8).cycle().take(4099).collect());
    full.correlation_id = Some(fresh_message_id());
    full.headers = [
        ("content-type", "application/octet-stream"),
        ("greeting", "grüße, 你好, مرحبا, 🚀"),
        ("unicode-name-é", "value"),
        ("empty-value", ""),
        ("repeated", "first"),
        ("repeated", "second"),
        ("spaces: and colons", "  leading and trailing spaces  "),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    let empty = envelope(&sender, to_receiver.clone(), Vec::new());
    let mut to_service =
        envelope(&sender, Destination::Service("conformance-service".into()), b"svc".to_vec());
    to_service.correlation_id = Some(fresh_message_id());
    let mut sent = vec![full, empty, to_service];
    if h.max_message_size() >= LARGE_PAYLOAD as u64 + FRAMING_ALLOWANCE {
        sent.push(envelope(&sender, to_receiver, pseudo_random_bytes(LARGE_PAYLOAD, 0x5eed)));
    }
    let describe = |envelope: &Envelope| match envelope.payload.len() {
        0 => "the message with an empty payload".to_string(),
        n => format!("the message with {} headers and a {n}-byte payload", envelope.headers.len()),
    };

    for envelope in &sent {
        sender.send_to(&receiver, envelope.clone()).await?;
    }
    let received = inbox.collect(sent.len(), h.deadline()).await?;
    for expected in &sent {
        let Some(got) = received.iter().find(|inbound| inbound.envelope.id == expected.id) else {
            return Err(failed(format!("{} (id {}) did not arrive", describe(expected), expected.id)));
        };
        compare(expected, &got.envelope)
            .map_err(|difference| failed(format!("{}: {difference}", describe(expected))))?;
    }
    if received.len() > sent.len() {
        return Err(failed(format!("{} messages arrived for {} sent", received.len(), sent.len())));
    }
    Ok(())
}

/// The first field in which `got` differs from `sent`.
pub(super) fn compare(sent: &Envelope, got: &Envelope) -> Result<(), String> {
    if got.from != sent.from {
        return Err(format!("sender changed from `{}` to `{}`", sent.from, got.from));
    }
    if got.to != sent.to {
        return Err(format!("destination changed from {:?} to {:?}", sent.to, got.to));
    }
    if got.correlation_id != sent.correlation_id {
        return Err(format!(
            "correlation id changed from {:?} to {:?}",
            sent.correlation_id, got.correlation_id
        ));
    }
    if got.headers != sent.headers {
        let changed = sent.headers.iter().zip(&got.headers).enumerate().find(|(_, (a, b))| a != b);
        return Err(match changed {
            Some((i, (a, b))) => format!("header {i} changed from {a:?} to {b:?}"),
            None => format!("{} headers sent, {} received", sent.headers.len(), got.headers.len()),
        });
    }
    if got.payload != sent.payload {
        let (a, b) = (sent.payload.as_slice(), got.payload.as_slice());
        let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        return Err(format!(
            "payload changed: {} bytes sent, {} received, first difference at byte {first}",
            a.len(),
            b.len()
        ));
    }
    Ok(())
}

/// [`compare`] as a case verdict.
pub(super) fn ensure_intact(what: &str, sent: &Envelope, got: &Envelope) -> Result<(), CaseError> {
    compare(sent, got).map_err(|difference| failed(format!("{what}: {difference}")))
}

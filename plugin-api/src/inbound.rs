//! Receiving: the checks every backend makes of a message it takes in (its size and, where the
//! backend counts deliveries itself, how often it was delivered and whether it decodes), and the
//! receive loop that hands messages to the host in batches.

use crate::{wire, Envelope};
use tokio::sync::{mpsc, watch};

/// The reason a backend records with a dead letter the receiving node refused for good (it
/// settled it `REJECTED_DISCARD`: not admitted by its security settings, from an invalid sender
/// id, or a message it cannot represent); the node's log says which. One wording on every
/// backend that keeps dead letters.
pub const DISCARDED_BY_RECEIVER: &str =
    "refused by the receiving node (settled REJECTED_DISCARD; its log says why)";

/// Why a received message is refused for its size, or `None` if it fits: the limit is
/// enforced where messages arrive, not only where they are sent, because a program that is not
/// comms (or a peer with a larger limit) can put anything on a broker or into a table.
///
/// Every backend uses this reason text for the dead-letter entry (or the rejection) of an
/// oversized message, so that operators see one wording whatever the transport.
pub fn oversized_reason(payload_len: usize, max_message_size: u64) -> Option<String> {
    (payload_len as u64 > max_message_size).then(|| {
        format!("message too large: {payload_len} bytes of payload, this transport accepts at most {max_message_size}")
    })
}

/// The dead-letter reason of a stored message delivered `max_attempts` times without being
/// accepted, on the backends that count deliveries (the database tables, and Redis by its
/// pending entries' delivery counts).
pub const MAX_ATTEMPTS_REASON: &str = "delivered max_attempts times without being accepted";

/// The start of the dead-letter reason of stored bytes that are not a wire-encoded envelope;
/// the decoder's error follows after `": "`.
pub const MALFORMED_REASON: &str = "not a valid wire-encoded envelope";

/// What a message stored by a backend that counts its deliveries must satisfy to be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredMessageLimits {
    /// Deliveries allowed: delivery `max_attempts` is made, the next one dead-letters.
    pub max_attempts: u64,
    /// The receiving transport's `max_message_size`.
    pub max_message_size: u64,
}

/// The envelope in `bytes`, a stored message about to be delivered for the `delivery`-th time
/// (1 for the first), or the reason it goes to the dead letters instead: [`MAX_ATTEMPTS_REASON`],
/// [`MALFORMED_REASON`] with the decoder's error, or [`oversized_reason`]. Any program can write
/// into a table, so the bytes are checked like any input, and each fault has its own reason:
/// an operator reading the dead letters can tell a writer of another wire version, an oversized
/// message and a message that kept failing apart.
pub fn check_stored_message(
    bytes: &[u8],
    delivery: u64,
    limits: &StoredMessageLimits,
) -> Result<Envelope, String> {
    if delivery > limits.max_attempts {
        return Err(MAX_ATTEMPTS_REASON.to_string());
    }
    let envelope = wire::decode_envelope(bytes).map_err(|error| format!("{MALFORMED_REASON}: {error}"))?;
    match oversized_reason(envelope.payload.len(), limits.max_message_size) {
        Some(reason) => Err(reason),
        None => Ok(envelope),
    }
}

/// Waits for at least one item from `queue` and returns it with up to `max_batch - 1` more that
/// are already waiting. Returns an empty batch once `queue` is closed and drained, or once
/// `closing` turns `true` with nothing buffered (buffered items are handed over first).
///
/// This is [`crate::Transport::receive`] for a backend whose background tasks feed a bounded
/// channel. Cancel-safe: nothing is taken from the queue unless it is returned.
pub async fn receive_batch<T>(
    queue: &mut mpsc::Receiver<T>,
    max_batch: usize,
    closing: &mut watch::Receiver<bool>,
) -> Vec<T> {
    let first = tokio::select! {
        biased;
        first = queue.recv() => first,
        _ = closing.wait_for(|closing| *closing) => queue.try_recv().ok(),
    };
    let Some(first) = first else { return Vec::new() };
    // Sized to what is waiting, not to `max_batch`: a batch of 256 envelopes is tens of KiB,
    // and allocating that for every message of a request/response exchange costs fresh pages.
    let mut batch = Vec::with_capacity((queue.len() + 1).min(max_batch.max(1)));
    batch.push(first);
    while batch.len() < max_batch {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_reason_names_both_sizes_and_only_refuses_above_the_limit() {
        assert_eq!(oversized_reason(16, 16), None);
        let reason = oversized_reason(17, 16).expect("one byte over is refused");
        assert!(reason.contains("17 bytes") && reason.contains("at most 16"), "{reason}");
    }

    #[test]
    fn a_stored_message_is_delivered_max_attempts_times_and_each_fault_has_its_reason() {
        let limits = StoredMessageLimits { max_attempts: 3, max_message_size: 4 };
        let envelope = crate::Envelope::new(
            crate::MessageId::from_u128(1),
            crate::NodeId::new("a"),
            crate::Destination::Node(crate::NodeId::new("b")),
            b"1234".to_vec(),
        );
        let mut good = Vec::new();
        wire::encode_envelope(&envelope, &mut good).unwrap();
        assert_eq!(check_stored_message(&good, 1, &limits).unwrap().payload.as_slice(), b"1234");
        assert!(check_stored_message(&good, 3, &limits).is_ok(), "the third delivery of three");
        assert_eq!(check_stored_message(&good, 4, &limits).unwrap_err(), MAX_ATTEMPTS_REASON);
        assert_eq!(check_stored_message(&good, u64::MAX, &limits).unwrap_err(), MAX_ATTEMPTS_REASON);
        let truncated = check_stored_message(&good[..good.len() - 1], 1, &limits).unwrap_err();
        assert!(truncated.starts_with(&format!("{MALFORMED_REASON}: ")), "{truncated}");
        let small = StoredMessageLimits { max_message_size: 3, ..limits };
        assert_eq!(check_stored_message(&good, 1, &small).unwrap_err(), oversized_reason(4, 3).unwrap());
    }

    #[tokio::test]
    async fn batches_what_is_waiting_and_ends_when_closing() {
        let (sender, mut queue) = mpsc::channel(16);
        let (closing_tx, mut closing) = watch::channel(false);
        for i in 0..5 {
            sender.send(i).await.unwrap();
        }
        assert_eq!(receive_batch(&mut queue, 3, &mut closing).await, vec![0, 1, 2]);
        closing_tx.send_replace(true);
        assert_eq!(receive_batch(&mut queue, 10, &mut closing).await, vec![3, 4], "buffered first");
        assert!(receive_batch(&mut queue, 10, &mut closing).await.is_empty());
        drop(sender);
        let (_, mut open) = watch::channel(false);
        assert!(receive_batch(&mut queue, 10, &mut open).await.is_empty(), "a closed queue ends");
    }
}

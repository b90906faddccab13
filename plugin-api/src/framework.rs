//! The framework messages the host sends next to application messages, as far as a transport
//! needs to know them.
//!
//! The host marks its own messages (hellos, heartbeats, goodbyes, responses) with the reserved
//! header [`KIND_HEADER`]; a transport carries them unchanged. One thing a *durable* transport
//! must know about them: a heartbeat goes out every second to every peer, including a peer that
//! never comes (a static peer that is not running), so a mailbox that keeps every copy grows
//! without bound. But `hello`, `heartbeat` and `goodbye` each carry the sender's whole current
//! record: once a newer one of the same kind from the same sender is there, an older one that
//! nobody has received yet says nothing the receiver needs. [`replacement_key`] names such a
//! message, and a durable transport replaces the older, undelivered message that has the same key
//! with the newer one, so that what waits for a node that is not running stays bounded (a few
//! messages per sender) while every application message is kept.
//!
//! ```
//! use comms_plugin_api::{framework, Destination, Envelope, MessageId, NodeId};
//!
//! let heartbeat = Envelope::new(
//!     MessageId::from_u128(1),
//!     NodeId::new("alice"),
//!     Destination::Node(NodeId::new("bob")),
//!     b"{}".to_vec(),
//! )
//! .with_header(framework::KIND_HEADER, "heartbeat");
//! assert_eq!(framework::replacement_key(&heartbeat).as_deref(), Some("heartbeat:alice"));
//! ```

use crate::{Destination, Envelope};

/// Reserved header naming a framework message's kind (`hello`, `heartbeat`, `goodbye`,
/// `response`). Application messages do not carry it.
pub const KIND_HEADER: &str = "comms-kind";

/// Reserved header of a part of a message that the chunk layer cut into parts:
/// `<the message's id, 32 hex digits> <index from 0> <count> <the message's length in bytes>`
/// (the chunk layer's docs give the format). Named here because transports read it: a message
/// given up on counts once, by its last part ([`crate::counts_as_undelivered`]).
pub const PART_HEADER: &str = "comms-chunk";

/// Whether `envelope` is a part of a cut message ([`PART_HEADER`]) and not its last part. A
/// header that does not parse is not taken for a part.
pub fn is_part_before_the_last(envelope: &Envelope) -> bool {
    let Some(value) = envelope.header(PART_HEADER) else {
        return false;
    };
    let mut fields = value.split(' ').skip(1).map(str::parse::<u64>);
    matches!((fields.next(), fields.next()), (Some(Ok(index)), Some(Ok(count))) if index.saturating_add(1) < count)
}

/// The kinds whose payload is the sender's whole current record, so that only the newest one
/// from a sender matters to a receiver that has not read the older ones yet.
pub const RECORD_KINDS: [&str; 3] = ["hello", "heartbeat", "goodbye"];

/// The key under which `envelope` replaces an older undelivered message to the same node, or
/// `None` when every copy must be delivered (every application message, every response, every
/// topic or service message).
///
/// The key is `<kind>:<sender>`, e.g. `heartbeat:alice`: a heartbeat replaces an older heartbeat
/// from the same sender, never a hello or a goodbye, so the messages a receiver finds are the
/// ones that were sent, minus older copies of the same kind, in the order they were sent. Its
/// state after reading them is the same as if it had read all of them.
pub fn replacement_key(envelope: &Envelope) -> Option<String> {
    if !matches!(envelope.to, Destination::Node(_)) {
        return None;
    }
    let kind = envelope.header(KIND_HEADER)?;
    RECORD_KINDS.contains(&kind).then(|| format!("{kind}:{}", envelope.from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MessageId, NodeId};

    fn message(to: Destination, kind: Option<&str>) -> Envelope {
        let envelope = Envelope::new(MessageId::from_u128(7), NodeId::new("alice"), to, Vec::new());
        match kind {
            Some(kind) => envelope.with_header(KIND_HEADER, kind),
            None => envelope,
        }
    }

    #[test]
    fn only_record_messages_to_a_node_have_a_key() {
        let node = || Destination::Node(NodeId::new("bob"));
        for kind in RECORD_KINDS {
            assert_eq!(replacement_key(&message(node(), Some(kind))), Some(format!("{kind}:alice")));
        }
        assert_eq!(replacement_key(&message(node(), None)), None, "an application message");
        assert_eq!(replacement_key(&message(node(), Some("response"))), None, "every response counts");
        assert_eq!(replacement_key(&message(node(), Some("Heartbeat"))), None, "exact kinds only");
        let topic = Destination::Topic("heartbeats".into());
        assert_eq!(replacement_key(&message(topic, Some("heartbeat"))), None, "not to a node");
    }
}

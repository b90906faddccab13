//! The message as it crosses the plugin boundary, and its acknowledgement.

use crate::{CommsError, Extension};
use abi_stable::{
    std_types::{RArc, ROption, RString, RVec},
    StableAbi,
};
use std::fmt;

/// The stable identity of a node (for example `"orders-1"`).
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub RString);

/// A 128-bit message identifier, unique per message; a redelivered message keeps its id, so a
/// receiver can recognise duplicates.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MessageId {
    /// The most significant 64 bits.
    pub high: u64,
    /// The least significant 64 bits.
    pub low: u64,
}

impl MessageId {
    /// The id as one integer.
    pub const fn as_u128(self) -> u128 {
        ((self.high as u128) << 64) | self.low as u128
    }

    /// An id from one integer.
    pub const fn from_u128(value: u128) -> Self {
        Self { high: (value >> 64) as u64, low: value as u64 }
    }
}

impl fmt::Display for MessageId {
    /// 32 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.as_u128())
    }
}

/// Where an envelope is going: a kind and a name.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// [`Destination::NODE`], [`Destination::TOPIC`] or [`Destination::SERVICE`]; a receiver
    /// discards a kind it does not know.
    pub kind: u8,
    /// The node id, topic or service name.
    pub name: RString,
}

impl Destination {
    /// `name` is a [`NodeId`].
    pub const NODE: u8 = 0;
    /// `name` is a topic (dot-separated segments).
    pub const TOPIC: u8 = 1;
    /// `name` is a service that one or more nodes provide.
    pub const SERVICE: u8 = 2;
}

/// One header: a name and a value, both text.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// Header name; names starting with `comms-` are reserved for the framework.
    pub name: RString,
    /// Header value.
    pub value: RString,
}

/// Message bytes: a range of a shared, reference-counted buffer.
///
/// Crosses the boundary without a copy in either direction, and clones without a copy: a
/// publication to many subscribers shares one buffer, and a transport that reads many frames
/// into one buffer can hand out each payload as a range of it. The buffer is freed by the
/// library that allocated it, whichever side drops the last reference.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct Payload {
    buffer: RArc<RVec<u8>>,
    start: u64,
    end: u64,
}

impl Payload {
    /// The whole of `bytes`, without copying them.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let end = bytes.len() as u64;
        Self { buffer: RArc::new(RVec::from(bytes)), start: 0, end }
    }

    /// `start..end` of `buffer`; `None` when the range is not inside it.
    pub fn from_shared(buffer: RArc<RVec<u8>>, start: usize, end: usize) -> Option<Self> {
        (start <= end && end <= buffer.len()).then(|| Self { buffer, start: start as u64, end: end as u64 })
    }

    /// The bytes. A range that does not fit its buffer (only a broken plugin makes one) reads
    /// as empty.
    pub fn as_slice(&self) -> &[u8] {
        usize::try_from(self.start)
            .ok()
            .zip(usize::try_from(self.end).ok())
            .and_then(|(start, end)| self.buffer.get(start..end))
            .unwrap_or(&[])
    }

    /// The buffer and the range this payload covers, for sharing it further.
    pub fn shared_parts(&self) -> (&RArc<RVec<u8>>, usize, usize) {
        (&self.buffer, self.start as usize, self.end as usize)
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self::from_vec(Vec::new())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.as_slice().len())
    }
}

/// A message with its addressing, as transports move it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id of this message.
    pub id: MessageId,
    /// The node that sent it.
    pub from: NodeId,
    /// Where it is going.
    pub to: Destination,
    /// For a response: the id of the request it answers.
    pub correlation_id: ROption<MessageId>,
    /// Application and framework headers, in order.
    pub headers: RVec<Header>,
    /// The encoded message.
    pub payload: Payload,
    /// Per-message attributes added by later minor versions of the contract (none in 1.0). A
    /// transport that carries envelopes between nodes carries these too.
    pub extensions: RVec<Extension>,
}

/// An envelope the host hands to a transport with the address to send it to: one item of a
/// batched send.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// An address the transport published (empty for a topic on a native-topics transport).
    pub address: RString,
    /// The message.
    pub envelope: Envelope,
}

/// Why one item of a batched send was not taken.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    /// The position of the item in the batch.
    pub index: u32,
    /// What went wrong.
    pub error: CommsError,
}

/// An envelope a transport hands to the host, with the tag the host uses to settle it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The message.
    pub envelope: Envelope,
    /// Opaque to the host; the transport uses it to find the message again when it is settled.
    pub delivery_tag: u64,
}

/// What the host did with an [`Inbound`] message.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SettlementOutcome(pub u8);

impl SettlementOutcome {
    /// The host is done with the message; the transport may forget it (for a broker:
    /// acknowledge it).
    pub const ACCEPTED: Self = Self(0);
    /// The host could not take or handle the message; the transport should deliver it again.
    pub const REJECTED_REQUEUE: Self = Self(1);
    /// The host refuses the message for good (for example it cannot be decoded); the transport
    /// should not deliver it again (a broker may dead-letter it).
    pub const REJECTED_DISCARD: Self = Self(2);
}

/// The host's answer for one delivered message.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Settlement {
    /// The [`Inbound::delivery_tag`] being settled.
    pub delivery_tag: u64,
    /// Accepted or rejected.
    pub outcome: SettlementOutcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_ranges_share_one_buffer() {
        let whole = Payload::from_vec(b"hello world".to_vec());
        let (buffer, _, _) = whole.shared_parts();
        let world = Payload::from_shared(buffer.clone(), 6, 11).unwrap();
        assert_eq!(world.as_slice(), b"world");
        assert_eq!(RArc::strong_count(buffer), 2, "no copy was made");
        assert!(Payload::from_shared(buffer.clone(), 6, 12).is_none());
        assert!(Payload::from_shared(buffer.clone(), 7, 6).is_none());
    }

    #[test]
    fn a_range_outside_its_buffer_reads_as_empty() {
        let mut broken = Payload::from_vec(vec![1, 2, 3]);
        broken.end = 9;
        assert_eq!(broken.as_slice(), b"");
    }
}

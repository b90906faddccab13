//! The message as it crosses the plugin boundary, and its acknowledgement.

use abi_stable::{
    std_types::{ROption, RString, RVec},
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
    /// [`Destination::NODE`], [`Destination::TOPIC`] or [`Destination::SERVICE`].
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
    /// The encoded message. Crosses the boundary without being copied.
    pub payload: RVec<u8>,
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
    /// The host took the message into its bounded queue; the transport may forget it (for a
    /// broker: acknowledge it).
    pub const ACCEPTED: Self = Self(0);
    /// The host could not take the message; the transport should deliver it again later.
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

//! Idiomatic message types, and their lossless conversion to and from the boundary's types.

use crate::PluginError;
pub use comms_core::MessageId;
use comms_core::{
    abi_stable::std_types::{ROption, RString, RVec},
    ErrorCode,
};
use std::fmt;

/// The stable identity of a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeId(String);

impl NodeId {
    /// A node id from any text.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn into_abi(self) -> comms_core::NodeId {
        comms_core::NodeId(RString::from(self.0))
    }

    pub(crate) fn from_abi(id: comms_core::NodeId) -> Self {
        Self(id.0.into_string())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

/// Where an envelope is going.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One node.
    Node(NodeId),
    /// Every subscriber of a topic.
    Topic(String),
    /// One replica of a service.
    Service(String),
}

impl Destination {
    /// The wire code of the destination kind (see [`comms_core::Destination`]).
    pub fn kind_code(&self) -> u8 {
        match self {
            Self::Node(_) => comms_core::Destination::NODE,
            Self::Topic(_) => comms_core::Destination::TOPIC,
            Self::Service(_) => comms_core::Destination::SERVICE,
        }
    }

    /// The node id, topic or service name.
    pub fn name(&self) -> &str {
        match self {
            Self::Node(id) => id.as_str(),
            Self::Topic(name) | Self::Service(name) => name,
        }
    }

    /// Builds a destination from its wire code and name; `None` for an unknown code.
    pub fn from_parts(kind: u8, name: String) -> Option<Self> {
        match kind {
            comms_core::Destination::NODE => Some(Self::Node(NodeId(name))),
            comms_core::Destination::TOPIC => Some(Self::Topic(name)),
            comms_core::Destination::SERVICE => Some(Self::Service(name)),
            _ => None,
        }
    }
}

/// Message bytes. Moves across the plugin boundary without a copy; read it with
/// [`Payload::as_slice`] (or through `Deref<Target = [u8]>`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Payload(RVec<u8>);

impl Payload {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// The bytes as a `Vec`. Copies when the buffer was allocated by another library.
    pub fn into_vec(self) -> Vec<u8> {
        self.0.into_vec()
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self(RVec::from(bytes))
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Self {
        Self(RVec::from_slice(bytes))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

/// A message with its addressing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id; kept when a message is delivered again.
    pub id: MessageId,
    /// Sender.
    pub from: NodeId,
    /// Destination.
    pub to: Destination,
    /// For a response, the id of the request it answers.
    pub correlation_id: Option<MessageId>,
    /// Headers in order; names starting with `comms-` are reserved for the framework.
    pub headers: Vec<(String, String)>,
    /// Encoded message.
    pub payload: Payload,
}

impl Envelope {
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// To the boundary type. Moves the payload without copying it.
    pub fn into_abi(self) -> comms_core::Envelope {
        comms_core::Envelope {
            id: self.id,
            from: self.from.into_abi(),
            to: comms_core::Destination { kind: self.to.kind_code(), name: RString::from(self.to.name()) },
            correlation_id: self.correlation_id.into(),
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| comms_core::Header { name: name.into(), value: value.into() })
                .collect(),
            payload: self.payload.0,
        }
    }

    /// From the boundary type. Fails only for a destination kind this version does not know.
    pub fn from_abi(envelope: comms_core::Envelope) -> Result<Self, PluginError> {
        let kind = envelope.to.kind;
        let to = Destination::from_parts(kind, envelope.to.name.into_string()).ok_or_else(|| {
            PluginError::new(ErrorCode::MALFORMED, format!("unknown destination kind {kind}"))
        })?;
        Ok(Self {
            id: envelope.id,
            from: NodeId::from_abi(envelope.from),
            to,
            correlation_id: match envelope.correlation_id {
                ROption::RSome(id) => Some(id),
                ROption::RNone => None,
            },
            headers: envelope
                .headers
                .into_iter()
                .map(|h| (h.name.into_string(), h.value.into_string()))
                .collect(),
            payload: Payload(envelope.payload),
        })
    }
}

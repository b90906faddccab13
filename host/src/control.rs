//! Framework messages that travel next to application messages: heartbeats, goodbyes, responses.
//!
//! They are ordinary envelopes marked with the reserved header [`KIND_HEADER`], so every
//! transport carries them unchanged and a non-Rust peer can produce them:
//!
//! | `comms-kind` | payload | meaning |
//! |---|---|---|
//! | `heartbeat` | [`Announcement`] (postcard) | the sender is alive; here is its current record |
//! | `goodbye`   | empty | the sender is closing: mark it down now |
//! | `response`  | the response, or UTF-8 error text when `comms-status` is `error` | answers the request whose id is the envelope's correlation id |
//!
//! Requests are envelopes addressed to a [`Destination::Service`](comms_plugin_api::Destination);
//! publications to a [`Destination::Topic`](comms_plugin_api::Destination).

use comms_plugin_api::{NodeId, NodeRecord};
use serde::{Deserialize, Serialize};

/// Reserved header naming a framework message's kind.
pub const KIND_HEADER: &str = "comms-kind";
/// Reserved header of a response: `ok` or `error`.
pub const STATUS_HEADER: &str = "comms-status";

/// `comms-kind` of a heartbeat.
pub const HEARTBEAT: &str = "heartbeat";
/// `comms-kind` of a goodbye.
pub const GOODBYE: &str = "goodbye";
/// `comms-kind` of a response.
pub const RESPONSE: &str = "response";
/// `comms-status` of a successful response.
pub const STATUS_OK: &str = "ok";
/// `comms-status` of a response carrying the handler's error.
pub const STATUS_ERROR: &str = "error";

/// What a heartbeat says about its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// `(transport, address)` pairs.
    pub addresses: Vec<(String, String)>,
    /// Services it serves.
    pub services: Vec<String>,
    /// Topic patterns it subscribes to.
    pub topics: Vec<String>,
    /// Free-form metadata.
    pub metadata: Vec<(String, String)>,
}

impl Announcement {
    /// The announcement for `record`.
    pub fn of(record: &NodeRecord) -> Self {
        Self {
            addresses: record.addresses.clone(),
            services: record.services.clone(),
            topics: record.topics.clone(),
            metadata: record.metadata.clone(),
        }
    }

    /// The record of node `id` this announcement describes.
    pub fn into_record(self, id: NodeId) -> NodeRecord {
        NodeRecord {
            id,
            addresses: self.addresses,
            services: self.services,
            topics: self.topics,
            metadata: self.metadata,
        }
    }

    /// Encodes for a heartbeat payload.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a heartbeat payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

//! Framework messages that travel next to application messages: hellos, heartbeats, goodbyes,
//! responses.
//!
//! They are ordinary envelopes marked with the reserved header [`KIND_HEADER`], so every
//! transport carries them unchanged and a non-Rust peer can produce them:
//!
//! | `comms-kind` | payload | meaning |
//! |---|---|---|
//! | `hello`     | [`RecordMessage`] (JSON) with `reply: true` | the sender's record; answer with a `heartbeat` now. Sent to every peer discovery names, at start and when one is discovered, and before the first message to a peer |
//! | `heartbeat` | [`RecordMessage`] (JSON) | the sender is alive; here is its current record |
//! | `goodbye`   | [`RecordMessage`] (JSON), or empty (release 0.1) | the sender is closing: mark it down now |
//! | `response`  | the response, or UTF-8 error text when `comms-status` is `error` | answers the request whose id is the envelope's correlation id |
//!
//! A `response` with `comms-status: unavailable` comes from a replica that could not take the
//! request (closing, not serving it, or at its concurrency limit): the caller tries another.
//! Release 0.1 wrote heartbeats as a postcard [`Announcement`]; every later release reads them.
//!
//! Requests are envelopes addressed to a [`Destination::Service`](comms_plugin_api::Destination);
//! publications to a [`Destination::Topic`](comms_plugin_api::Destination).

use comms_plugin_api::{record_json::ExtensionsJson, NodeId, NodeRecord};
use serde::{Deserialize, Serialize};

/// Reserved header naming a framework message's kind.
/// (Defined for plugins too, in [`comms_plugin_api::framework`]: durable transports replace
/// older heartbeats by it, and every transport leaves these messages out of what it reports
/// undelivered.)
pub const KIND_HEADER: &str = comms_plugin_api::framework::KIND_HEADER;
/// Reserved header of a response: `ok` or `error`.
pub const STATUS_HEADER: &str = "comms-status";

/// `comms-kind` of a hello: the sender's record, and a request for the receiver's at once.
pub const HELLO: &str = "hello";
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
        RecordMessage::from(self).into_record(id)
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

/// The metadata key of a node record's revision: a number the node raises whenever its record
/// changes, so that an older copy arriving late (a heartbeat sent just before the node began
/// serving, overtaken by the new discovery record) cannot replace a newer one.
pub const REVISION_KEY: &str = "comms-revision";

/// The revision a record carries, if any.
pub fn revision(record: &NodeRecord) -> Option<u64> {
    record.metadata.iter().find(|(key, _)| key == REVISION_KEY).and_then(|(_, value)| value.parse().ok())
}

/// Sets (or replaces) the revision of `record`.
pub fn set_revision(record: &mut NodeRecord, revision: u64) {
    record.metadata.retain(|(key, _)| key != REVISION_KEY);
    record.metadata.push((REVISION_KEY.to_string(), revision.to_string()));
}

/// The payload of a `hello`, a `heartbeat` and a `goodbye` since release 0.2: a JSON object, so
/// that a field added later is ignored by a node that does not know it, with a version `v`.
///
/// ```json
/// {"v":1,"addresses":[["tcp","10.0.0.7:7001"]],"services":["echo"],"topics":["orders.>"],
///  "metadata":[["comms-revision","17"]],"reply":false,"offline":false}
/// ```
///
/// `reply: true` (in a hello) asks the receiver to answer with its own record at once;
/// `offline: true` (in a goodbye) says the sender's inbox keeps messages for it. A reader also
/// accepts the postcard [`Announcement`] of release 0.1 (the test vector in
/// `tests/vectors/heartbeat-postcard-v0.bin` keeps it honest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecordMessage {
    /// Format version: 1.
    pub v: u32,
    /// `(transport, address)` pairs.
    #[serde(default)]
    pub addresses: Vec<(String, String)>,
    /// Services it serves.
    #[serde(default)]
    pub services: Vec<String>,
    /// Topic patterns it subscribes to.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Free-form metadata (revision, offline status, ...).
    #[serde(default)]
    pub metadata: Vec<(String, String)>,
    /// The sender asks for the receiver's record now.
    #[serde(default)]
    pub reply: bool,
    /// The sender is leaving, and its inbox keeps what is sent to it.
    #[serde(default)]
    pub offline: bool,
    /// The record's extensions (attributes of later contract versions): `[key, hex]` pairs,
    /// left out when there are none.
    #[serde(default, skip_serializing_if = "ExtensionsJson::is_empty")]
    pub extensions: ExtensionsJson,
}

/// The version of [`RecordMessage`] this release writes.
pub const RECORD_MESSAGE_VERSION: u32 = 1;

impl RecordMessage {
    /// The message describing `record`.
    pub fn of(record: &NodeRecord) -> Self {
        Self {
            v: RECORD_MESSAGE_VERSION,
            addresses: record.addresses.clone(),
            services: record.services.clone(),
            topics: record.topics.clone(),
            metadata: record.metadata.clone(),
            reply: false,
            offline: false,
            extensions: ExtensionsJson(record.extensions.clone()),
        }
    }

    /// The record of node `id` this message describes.
    pub fn into_record(self, id: NodeId) -> NodeRecord {
        let mut record = NodeRecord::new(id);
        record.addresses = self.addresses;
        record.services = self.services;
        record.topics = self.topics;
        record.metadata = self.metadata;
        record.extensions = self.extensions.0;
        record
    }

    /// The JSON payload.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a payload of any release: JSON, or release 0.1's postcard [`Announcement`].
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.first() == Some(&b'{') {
            let message: Self = serde_json::from_slice(bytes).map_err(|e| format!("record message: {e}"))?;
            if message.v == 0 {
                return Err("record message without a version".to_string());
            }
            return Ok(message);
        }
        let legacy = Announcement::decode(bytes).map_err(|e| format!("release 0.1 heartbeat: {e}"))?;
        Ok(Self::from(legacy))
    }
}

impl From<Announcement> for RecordMessage {
    /// A release 0.1 heartbeat as a record message (version 0).
    fn from(legacy: Announcement) -> Self {
        Self {
            v: 0,
            addresses: legacy.addresses,
            services: legacy.services,
            topics: legacy.topics,
            metadata: legacy.metadata,
            reply: false,
            offline: false,
            extensions: ExtensionsJson::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn record_messages_round_trip_and_ignore_fields_they_do_not_know() {
        let mut record = NodeRecord::new("alice");
        record.addresses = pairs(&[("tcp", "127.0.0.1:7001")]);
        record.services = vec!["echo".into()];
        set_revision(&mut record, 3);
        let message = RecordMessage { reply: true, ..RecordMessage::of(&record) };
        let decoded = RecordMessage::decode(&message.encode()).unwrap();
        assert_eq!(decoded, message);
        assert_eq!(decoded.into_record(NodeId::new("alice")), record);
        let from_the_future = br#"{"v":7,"services":["x"],"zones":["eu"],"weight":3}"#;
        let read = RecordMessage::decode(from_the_future).expect("unknown fields are ignored");
        assert_eq!(read.services, vec!["x".to_string()]);
        assert!(RecordMessage::decode(br#"{"services":[]}"#).is_err(), "a version is required");
    }

    /// A record's extensions travel with it; a record without them is written as before.
    #[test]
    fn record_messages_carry_the_records_extensions() {
        let mut record = NodeRecord::new("alice");
        record.extensions.set("later-contract", vec![0, 1, 0xff]);
        let encoded = RecordMessage::of(&record).encode();
        let text = String::from_utf8(encoded.clone()).unwrap();
        assert!(text.ends_with(r#""extensions":[["later-contract","0001ff"]]}"#), "{text}");
        assert_eq!(RecordMessage::decode(&encoded).unwrap().into_record(NodeId::new("alice")), record);
        let without = String::from_utf8(RecordMessage::of(&NodeRecord::new("bob")).encode()).unwrap();
        assert!(!without.contains("extensions"), "{without}");
    }

    /// Bytes of a heartbeat as release 0.1 wrote them (postcard). Every later release must read
    /// them: a cluster is upgraded one node at a time.
    #[test]
    fn reads_heartbeats_written_by_release_0_1() {
        let bytes = include_bytes!("../tests/vectors/heartbeat-postcard-v0.bin");
        let message = RecordMessage::decode(bytes).expect("a 0.1 heartbeat decodes");
        assert_eq!(message.services, vec!["echo".to_string(), "math.add".to_string()]);
        let bytes = include_bytes!("../tests/vectors/heartbeat-postcard-v0.bin");
        let announcement = Announcement::decode(bytes).expect("a 0.1 heartbeat decodes");
        assert_eq!(
            announcement,
            Announcement {
                addresses: pairs(&[("tcp", "127.0.0.1:7001"), ("redis", "comms:inbox:alice")]),
                services: vec!["echo".into(), "math.add".into()],
                topics: vec!["orders.*.created".into(), ">".into()],
                metadata: pairs(&[("comms-revision", "1764700000000001"), ("zone", "eu-1")]),
            }
        );
    }
}

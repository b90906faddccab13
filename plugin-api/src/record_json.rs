//! Node records as JSON text, in the two shapes the registries of the shipped plugins store. One
//! definition of each, so that every plugin writing a shape writes it the same way, and so that
//! other programs can read and write the records (each plugin's docs show its shape).
//!
//! - [`RecordJson`]: an object that names its node, for stores keyed by node id (Redis keys,
//!   NATS key-value entries). Lists that are missing read as empty.
//!
//!   ```json
//!   {"id":"a","addresses":[["tcp","10.0.0.7:7001"]],"services":["echo"],"topics":[],"metadata":[]}
//!   ```
//!
//! - [`RegistryRowRecord`]: the record column of a registry table whose rows hold the node id
//!   in a column of their own (SQLite, PostgreSQL). Every field is required.
//!
//!   ```json
//!   {"addresses":[{"transport":"tcp","address":"10.0.0.7:7001"}],"services":[],"topics":[],"metadata":[]}
//!   ```
//!
//! Both have an optional `extensions` key, written only when the record has extensions
//! ([`NodeRecord::extensions`], attributes of later contract versions, which a discovery stores
//! and returns): `[key, value]` pairs in order, the value's bytes in hex ([`ExtensionsJson`]).
//!
//! ```json
//! {"id":"a","addresses":[],"services":[],"topics":[],"metadata":[],"extensions":[["future","010203"]]}
//! ```
//!
//! Neither carries a version: a field added later must have a default, so that older readers
//! (which ignore fields they do not know) and newer ones read each other's records.

use crate::{
    hex::{hex_decode, hex_encode},
    Extensions, NodeId, NodeRecord,
};
use serde::{de::Error as _, ser::SerializeSeq, Deserialize, Deserializer, Serialize, Serializer};

/// A record's extensions in JSON: `[[key, hex of the value], ...]`, in order. Reading refuses a
/// value that is not hex (the record is then malformed); a key given twice keeps its last value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtensionsJson(pub Extensions);

impl ExtensionsJson {
    /// Whether there are none (the `extensions` key is then left out).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for ExtensionsJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut pairs = serializer.serialize_seq(Some(self.0.len()))?;
        for (key, value) in self.0.iter() {
            pairs.serialize_element(&(key, hex_encode(value)))?;
        }
        pairs.end()
    }
}

impl<'de> Deserialize<'de> for ExtensionsJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut extensions = Extensions::new();
        for (key, value) in Vec::<(String, String)>::deserialize(deserializer)? {
            let bytes = hex_decode(&value)
                .ok_or_else(|| D::Error::custom(format!("the value of extension `{key}` is not hex")))?;
            extensions.set(key, bytes);
        }
        Ok(Self(extensions))
    }
}

/// A node record that names its node (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordJson {
    /// Node id.
    pub id: String,
    /// `[transport, address]` pairs.
    #[serde(default)]
    pub addresses: Vec<(String, String)>,
    /// Services served.
    #[serde(default)]
    pub services: Vec<String>,
    /// Topic patterns subscribed to.
    #[serde(default)]
    pub topics: Vec<String>,
    /// `[name, value]` pairs.
    #[serde(default)]
    pub metadata: Vec<(String, String)>,
    /// `[key, hex]` pairs, left out when there are none.
    #[serde(default, skip_serializing_if = "ExtensionsJson::is_empty")]
    pub extensions: ExtensionsJson,
}

impl From<&NodeRecord> for RecordJson {
    fn from(record: &NodeRecord) -> Self {
        Self {
            id: record.id.to_string(),
            addresses: record.addresses.clone(),
            services: record.services.clone(),
            topics: record.topics.clone(),
            metadata: record.metadata.clone(),
            extensions: ExtensionsJson(record.extensions.clone()),
        }
    }
}

impl From<RecordJson> for NodeRecord {
    fn from(json: RecordJson) -> Self {
        let mut record = NodeRecord::new(NodeId::new(json.id));
        record.addresses = json.addresses;
        record.services = json.services;
        record.topics = json.topics;
        record.metadata = json.metadata;
        record.extensions = json.extensions.0;
        record
    }
}

/// The record column of a registry row; the node id is the row's (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryRowRecord {
    /// The node's addresses, one object per transport.
    pub addresses: Vec<RegistryAddress>,
    /// Services served.
    pub services: Vec<String>,
    /// Topic patterns subscribed to.
    pub topics: Vec<String>,
    /// `[name, value]` pairs.
    pub metadata: Vec<(String, String)>,
    /// `[key, hex]` pairs: optional, left out when there are none.
    #[serde(default, skip_serializing_if = "ExtensionsJson::is_empty")]
    pub extensions: ExtensionsJson,
}

/// One address of a [`RegistryRowRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAddress {
    /// The transport's name in the node's configuration.
    pub transport: String,
    /// The address that transport published.
    pub address: String,
}

impl From<&NodeRecord> for RegistryRowRecord {
    fn from(record: &NodeRecord) -> Self {
        Self {
            addresses: record
                .addresses
                .iter()
                .map(|(transport, address)| RegistryAddress {
                    transport: transport.clone(),
                    address: address.clone(),
                })
                .collect(),
            services: record.services.clone(),
            topics: record.topics.clone(),
            metadata: record.metadata.clone(),
            extensions: ExtensionsJson(record.extensions.clone()),
        }
    }
}

impl RegistryRowRecord {
    /// The record of node `id`, whose row this was.
    pub fn into_record(self, id: impl Into<String>) -> NodeRecord {
        let mut record = NodeRecord::new(NodeId::new(id.into()));
        record.addresses = self.addresses.into_iter().map(|a| (a.transport, a.address)).collect();
        record.services = self.services;
        record.topics = self.topics;
        record.metadata = self.metadata;
        record.extensions = self.extensions.0;
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        let mut record = NodeRecord::new(NodeId::new("a"));
        record.addresses = vec![("tcp".into(), "10.0.0.7:7001".into())];
        record.services = vec!["echo".into()];
        record.topics = vec!["orders.>".into()];
        record.metadata = vec![("comms-revision".into(), "17".into())];
        record
    }

    /// The stored shapes are an interface to other programs and to records already stored:
    /// these strings must not change.
    #[test]
    fn both_shapes_write_the_documented_json_and_read_it_back() {
        let keyed = serde_json::to_string(&RecordJson::from(&record())).unwrap();
        assert_eq!(
            keyed,
            r#"{"id":"a","addresses":[["tcp","10.0.0.7:7001"]],"services":["echo"],"topics":["orders.>"],"metadata":[["comms-revision","17"]]}"#
        );
        assert_eq!(NodeRecord::from(serde_json::from_str::<RecordJson>(&keyed).unwrap()), record());

        let row = serde_json::to_string(&RegistryRowRecord::from(&record())).unwrap();
        assert_eq!(
            row,
            r#"{"addresses":[{"transport":"tcp","address":"10.0.0.7:7001"}],"services":["echo"],"topics":["orders.>"],"metadata":[["comms-revision","17"]]}"#
        );
        assert_eq!(serde_json::from_str::<RegistryRowRecord>(&row).unwrap().into_record("a"), record());
    }

    /// A discovery stores and returns a record's extensions: both shapes carry them, in order,
    /// and a record without them is written exactly as before.
    #[test]
    fn both_shapes_carry_extensions_in_order_and_leave_the_key_out_without_them() {
        let mut with = record();
        with.extensions.set("zeta", vec![0, 1, 0xff]);
        with.extensions.set("alpha", Vec::new());
        let keyed = serde_json::to_string(&RecordJson::from(&with)).unwrap();
        assert!(keyed.ends_with(r#","extensions":[["zeta","0001ff"],["alpha",""]]}"#), "{keyed}");
        assert_eq!(NodeRecord::from(serde_json::from_str::<RecordJson>(&keyed).unwrap()), with);
        let row = serde_json::to_string(&RegistryRowRecord::from(&with)).unwrap();
        assert!(row.ends_with(r#","extensions":[["zeta","0001ff"],["alpha",""]]}"#), "{row}");
        assert_eq!(serde_json::from_str::<RegistryRowRecord>(&row).unwrap().into_record("a"), with);

        assert!(!serde_json::to_string(&RecordJson::from(&record())).unwrap().contains("extensions"));
        assert!(!serde_json::to_string(&RegistryRowRecord::from(&record())).unwrap().contains("extensions"));
    }

    #[test]
    fn an_extension_value_that_is_not_hex_makes_the_record_malformed() {
        let error = serde_json::from_str::<RecordJson>(r#"{"id":"b","extensions":[["k","xyz"]]}"#)
            .expect_err("a value that is not hex");
        assert!(error.to_string().contains("the value of extension `k` is not hex"), "{error}");
        let row = r#"{"addresses":[],"services":[],"topics":[],"metadata":[],"extensions":[["k","0"]]}"#;
        assert!(serde_json::from_str::<RegistryRowRecord>(row).is_err(), "odd length");
    }

    #[test]
    fn a_keyed_record_may_leave_out_its_lists_and_a_row_record_may_not() {
        let bare: RecordJson = serde_json::from_str(r#"{"id":"b"}"#).unwrap();
        assert_eq!(NodeRecord::from(bare), NodeRecord::new(NodeId::new("b")));
        assert!(serde_json::from_str::<RegistryRowRecord>(r#"{"addresses":[]}"#).is_err());
    }
}

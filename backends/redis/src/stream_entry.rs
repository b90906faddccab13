//! The broker-side format of a message in an inbox stream: one stream entry, one field per
//! envelope part, so that any Redis client can write and read comms messages.
//!
//! | field | value | required |
//! |---|---|---|
//! | `v` | format version, `1` | no (1 if absent) |
//! | `id` | message id, 1 to 32 hex digits (128 bits) | yes |
//! | `from` | sender node id | yes |
//! | `to_kind` | `node`, `service` or `topic` | no (`node`); left out for the inbox's own node |
//! | `to` | destination node id, service or topic | no (the inbox's node); left out likewise |
//! | `correlation_id` | id of the request this answers, hex | no |
//! | `headers` | JSON array of `[name, value]` string pairs, in order | no (none) |
//! | `payload` | the message bytes, as they are | yes |
//!
//! Fields other than these are ignored. An entry that does not fit (no `id`, bad hex, unknown
//! version or kind, headers that are not such JSON) is malformed: the transport moves it to the
//! dead-letter stream and never hands it to the host.

use comms_plugin_api::{Destination, Envelope, MessageId, NodeId, Payload};
use redis::Value;
use std::collections::HashMap;

/// The format version this code writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// The fields of `envelope`, in the order they are written, for the inbox of node
/// `inbox_node`: `to_kind` and `to` are left out when the message goes to that node.
pub fn encode(envelope: &Envelope, inbox_node: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut fields = Vec::with_capacity(8);
    fields.push(("v", FORMAT_VERSION.as_bytes().to_vec()));
    fields.push(("id", envelope.id.to_string().into_bytes()));
    fields.push(("from", envelope.from.as_str().as_bytes().to_vec()));
    if !matches!(&envelope.to, Destination::Node(node) if node.as_str() == inbox_node) {
        fields.push(("to_kind", kind_name(&envelope.to).as_bytes().to_vec()));
        fields.push(("to", envelope.to.name().as_bytes().to_vec()));
    }
    if let Some(correlation) = envelope.correlation_id {
        fields.push(("correlation_id", correlation.to_string().into_bytes()));
    }
    if !envelope.headers.is_empty() {
        let pairs: Vec<[&str; 2]> = envelope.headers.iter().map(|(name, value)| [name, value]).collect();
        // Serializing strings cannot fail.
        fields.push(("headers", serde_json::to_vec(&pairs).unwrap_or_default()));
    }
    fields.push(("payload", envelope.payload.as_slice().to_vec()));
    fields
}

fn kind_name(destination: &Destination) -> &'static str {
    match destination {
        Destination::Node(_) => "node",
        Destination::Service(_) => "service",
        Destination::Topic(_) => "topic",
    }
}

/// Parses a message id written as hex (what `MessageId`'s `Display` produces).
pub fn parse_id(text: &str) -> Option<MessageId> {
    if text.is_empty() || text.len() > 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(text, 16).ok().map(MessageId::from_u128)
}

fn bytes<'a>(fields: &'a HashMap<String, Value>, name: &str) -> Result<Option<&'a [u8]>, String> {
    match fields.get(name) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::BulkString(bytes)) => Ok(Some(bytes)),
        Some(Value::SimpleString(text)) => Ok(Some(text.as_bytes())),
        Some(other) => Err(format!("field `{name}` is not a string ({other:?})")),
    }
}

fn text<'a>(fields: &'a HashMap<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match bytes(fields, name)? {
        None => Ok(None),
        Some(bytes) => {
            std::str::from_utf8(bytes).map(Some).map_err(|_| format!("field `{name}` is not UTF-8"))
        }
    }
}

/// The length of the `payload` field, if there is one: checked against the size limit before
/// the entry is decoded (and its payload copied).
pub fn payload_len(fields: &HashMap<String, Value>) -> Option<usize> {
    bytes(fields, "payload").ok().flatten().map(<[u8]>::len)
}

/// The envelope in an inbox entry's fields; `inbox_node` is the destination when `to` is absent.
/// The error says which field is wrong.
pub fn decode(fields: &HashMap<String, Value>, inbox_node: &NodeId) -> Result<Envelope, String> {
    if let Some(version) = text(fields, "v")? {
        if version != FORMAT_VERSION {
            return Err(format!("format version `{version}` is not {FORMAT_VERSION}"));
        }
    }
    let id_text = text(fields, "id")?.ok_or("field `id` is missing")?;
    let id =
        parse_id(id_text).ok_or_else(|| format!("field `id` ({id_text:?}) is not 1 to 32 hex digits"))?;
    let from = NodeId::new(text(fields, "from")?.ok_or("field `from` is missing")?);
    let name = text(fields, "to")?.map(str::to_string);
    let to = match text(fields, "to_kind")?.unwrap_or("node") {
        "node" => Destination::Node(name.map(NodeId::new).unwrap_or_else(|| inbox_node.clone())),
        "service" => Destination::service(name.ok_or("field `to` is missing for a service")?),
        "topic" => Destination::topic(name.ok_or("field `to` is missing for a topic")?),
        other => return Err(format!("field `to_kind` ({other:?}) is not node, service or topic")),
    };
    let correlation_id = match text(fields, "correlation_id")? {
        None | Some("") => None,
        Some(text) => {
            Some(parse_id(text).ok_or_else(|| format!("field `correlation_id` ({text:?}) is not hex"))?)
        }
    };
    let headers = match bytes(fields, "headers")? {
        None => Vec::new(),
        Some(json) => serde_json::from_slice::<Vec<(String, String)>>(json).map_err(|error| {
            format!("field `headers` is not a JSON array of [name, value] pairs: {error}")
        })?,
    };
    let payload = bytes(fields, "payload")?.ok_or("field `payload` is missing")?;
    Ok(Envelope::new(id, from, to, Payload::from(payload))
        .with_correlation_id(correlation_id)
        .with_headers(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_map(fields: Vec<(&'static str, Vec<u8>)>) -> HashMap<String, Value> {
        fields.into_iter().map(|(name, value)| (name.to_string(), Value::BulkString(value))).collect()
    }

    fn sample() -> Envelope {
        Envelope::new(
            MessageId::from_u128(0xabc),
            NodeId::new("alice"),
            Destination::Service("echo".into()),
            Payload::from(vec![0, 255, 10]),
        )
        .with_correlation_id(Some(MessageId::from_u128(u128::MAX)))
        .with_headers(vec![
            ("a".into(), "1".into()),
            ("a".into(), "grüße".into()),
            ("".into(), "".into()),
        ])
    }

    #[test]
    fn every_field_round_trips() {
        let inbox = NodeId::new("bob");
        assert_eq!(decode(&as_map(encode(&sample(), "bob")), &inbox).unwrap(), sample());
        let bare = {
            let mut value = sample();
            value.correlation_id = None;
            value.headers = (vec![]).into();
            value
        };
        let fields = encode(&bare, "bob");
        assert!(!fields.iter().any(|(name, _)| *name == "headers" || *name == "correlation_id"));
        assert_eq!(decode(&as_map(fields), &inbox).unwrap(), bare);
        // To the inbox's own node: the destination is implied.
        let direct = {
            let mut value = sample();
            value.to = Destination::Node(NodeId::new("bob"));
            value
        };
        let fields = encode(&direct, "bob");
        assert!(!fields.iter().any(|(name, _)| *name == "to" || *name == "to_kind"));
        assert_eq!(decode(&as_map(fields), &inbox).unwrap(), direct);
        // Relayed: for another node, through this inbox.
        let relayed = {
            let mut value = sample();
            value.to = Destination::Node(NodeId::new("carol"));
            value
        };
        assert_eq!(decode(&as_map(encode(&relayed, "bob")), &inbox).unwrap(), relayed);
    }

    #[test]
    fn a_minimal_foreign_entry_is_accepted() {
        let fields =
            as_map(vec![("id", b"1f".to_vec()), ("from", b"py".to_vec()), ("payload", b"hi".to_vec())]);
        let envelope = decode(&fields, &NodeId::new("bob")).unwrap();
        assert_eq!(envelope.id, MessageId::from_u128(0x1f));
        assert_eq!(envelope.to, Destination::Node(NodeId::new("bob")));
        assert_eq!(envelope.payload.as_slice(), b"hi");
    }

    #[test]
    fn malformed_entries_name_the_field() {
        let inbox = NodeId::new("bob");
        let mut fields = as_map(encode(&sample(), "bob"));
        fields.insert("id".into(), Value::BulkString(b"xyz".to_vec()));
        assert!(decode(&fields, &inbox).unwrap_err().contains("`id`"));
        let mut fields = as_map(encode(&sample(), "bob"));
        fields.insert("headers".into(), Value::BulkString(b"{}".to_vec()));
        assert!(decode(&fields, &inbox).unwrap_err().contains("`headers`"));
        let mut fields = as_map(encode(&sample(), "bob"));
        fields.remove("payload");
        assert!(decode(&fields, &inbox).unwrap_err().contains("`payload`"));
        let mut fields = as_map(encode(&sample(), "bob"));
        fields.insert("v".into(), Value::BulkString(b"2".to_vec()));
        assert!(decode(&fields, &inbox).unwrap_err().contains("version"));
    }
}

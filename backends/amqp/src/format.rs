//! The broker-side format: how an envelope travels as an AMQP message, so that a program in
//! another language can send to a comms node and read what one sends.
//!
//! | envelope field | AMQP message |
//! |---|---|
//! | payload | the message body, unchanged (not the comms wire encoding) |
//! | id | property `message_id`: 32 lowercase hex digits (a UUID with dashes is accepted) |
//! | correlation id | property `correlation_id`, same format (responses only) |
//! | from | header `comms-from` (text) |
//! | to | headers `comms-to-kind` (`node`, `topic` or `service`) and `comms-to` (the name) |
//! | headers | header `comms-headers`: an array of `[name, value]` arrays, in order, repeats kept |
//! | header `content-type` | also copied to property `content_type` (informational) |
//! | - | property `reply_to`: the sender's inbox queue; `delivery_mode` 2 (persistent) |
//!
//! Reading is lenient with messages a foreign program wrote: without `comms-headers`, every
//! header-table entry whose name does not start with `comms-` becomes a header (in name order),
//! and `content_type` becomes a `content-type` header; without `comms-to-kind`/`comms-to`, the
//! destination is this node (inbox) or the routing key (topic queue); without `comms-from`, the
//! sender is the `app_id` property, else `anonymous`. Only `message_id` is required.

use comms_plugin_api::{Destination, Envelope, MessageId, NodeId, Payload};
use lapin::{
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};

/// Header with the sender's node id.
pub const FROM_HEADER: &str = "comms-from";
/// Header with the destination kind: `node`, `topic` or `service`.
pub const TO_KIND_HEADER: &str = "comms-to-kind";
/// Header with the destination name.
pub const TO_HEADER: &str = "comms-to";
/// Header with the envelope's headers as an array of `[name, value]` arrays.
pub const HEADERS_HEADER: &str = "comms-headers";
/// Header of a dead letter: why it was refused (see `docs/amqp.md` for the texts).
pub const DEAD_LETTER_REASON_HEADER: &str = "comms-dead-letter-reason";
/// Header of a dead letter: the queue it was refused from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "comms-dead-letter-queue";
/// The envelope header mirrored into the `content_type` property.
pub const CONTENT_TYPE_HEADER: &str = "content-type";
/// Sender used for a foreign message that names none.
pub const ANONYMOUS_SENDER: &str = "anonymous";
/// AMQP delivery mode of a message the broker writes to disk (for a durable queue).
pub const PERSISTENT: u8 = 2;

/// `node`, `topic` or `service`.
pub fn kind_name(to: &Destination) -> &'static str {
    match to {
        Destination::Node(_) => "node",
        Destination::Topic(_) => "topic",
        Destination::Service(_) => "service",
    }
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// The AMQP properties of `envelope`; `reply_to` is the sender's inbox queue.
pub fn properties(envelope: &Envelope, reply_to: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(FROM_HEADER.into(), long(envelope.from.as_str()));
    headers.insert(TO_KIND_HEADER.into(), long(kind_name(&envelope.to)));
    headers.insert(TO_HEADER.into(), long(envelope.to.name()));
    let pairs: Vec<AMQPValue> = envelope
        .headers
        .iter()
        .map(|(name, value)| AMQPValue::FieldArray(FieldArray::from(vec![long(name), long(value)])))
        .collect();
    headers.insert(HEADERS_HEADER.into(), AMQPValue::FieldArray(FieldArray::from(pairs)));
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(envelope.id.to_string()))
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(id) = envelope.correlation_id {
        properties = properties.with_correlation_id(ShortString::from(id.to_string()));
    }
    if let Ok(reply_to) = ShortString::try_new(reply_to) {
        properties = properties.with_reply_to(reply_to);
    }
    // Informational only (comms-headers is authoritative); a value too long for the property
    // is simply not mirrored.
    if let Some(content_type) = envelope.header(CONTENT_TYPE_HEADER) {
        if let Ok(content_type) = ShortString::try_new(content_type) {
            properties = properties.with_content_type(content_type);
        }
    }
    properties
}

/// Parses a message id: up to 32 hex digits, dashes ignored (so a UUID works).
pub fn parse_message_id(text: &str) -> Option<MessageId> {
    let digits: String = text.chars().filter(|c| *c != '-').collect();
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    u128::from_str_radix(&digits, 16).ok().map(MessageId::from_u128)
}

/// The text of a header value: strings (which must be UTF-8), numbers and booleans.
fn text(value: &AMQPValue) -> Result<Option<String>, String> {
    Ok(Some(match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec())
            .map_err(|_| "a header value is not valid UTF-8".to_string())?,
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::ByteArray(bytes) => String::from_utf8(bytes.as_slice().to_vec())
            .map_err(|_| "a header value is not valid UTF-8".to_string())?,
        _ => return Ok(None),
    }))
}

fn required_text(table: &FieldTable, name: &str) -> Result<Option<String>, String> {
    match table.inner().get(name) {
        None => Ok(None),
        Some(value) => text(value)?.map(Some).ok_or_else(|| format!("header `{name}` is not text")),
    }
}

fn header_pairs(value: &AMQPValue) -> Result<Vec<(String, String)>, String> {
    let malformed = || format!("header `{HEADERS_HEADER}` is not an array of [name, value] arrays");
    let AMQPValue::FieldArray(pairs) = value else { return Err(malformed()) };
    pairs
        .as_slice()
        .iter()
        .map(|pair| match pair {
            AMQPValue::FieldArray(pair) => match pair.as_slice() {
                [name, value] => match (text(name)?, text(value)?) {
                    (Some(name), Some(value)) => Ok((name, value)),
                    _ => Err(malformed()),
                },
                _ => Err(malformed()),
            },
            _ => Err(malformed()),
        })
        .collect()
}

/// Rebuilds an envelope from a delivered message. `default_to` is the destination when the
/// message names none (this node for the inbox, the routing key's topic for the topic queue).
/// The error says what is wrong with the message.
///
/// The body is taken out of `body` only when the message is valid, so that a refused one can be
/// dead-lettered as it came.
pub fn envelope_from(
    properties: &BasicProperties,
    body: &mut Vec<u8>,
    default_to: impl FnOnce() -> Destination,
) -> Result<Envelope, String> {
    let id = match properties.message_id() {
        Some(id) => parse_message_id(id.as_str())
            .ok_or_else(|| format!("message_id `{}` is not up to 32 hex digits", id.as_str()))?,
        None => return Err("the message has no message_id property".to_string()),
    };
    let correlation_id = match properties.correlation_id() {
        Some(id) => Some(
            parse_message_id(id.as_str())
                .ok_or_else(|| format!("correlation_id `{}` is not up to 32 hex digits", id.as_str()))?,
        ),
        None => None,
    };
    let empty = FieldTable::default();
    let table = properties.headers().as_ref().unwrap_or(&empty);
    let from = match required_text(table, FROM_HEADER)? {
        Some(from) => from,
        None => properties
            .app_id()
            .as_ref()
            .map_or_else(|| ANONYMOUS_SENDER.to_string(), |app| app.as_str().to_string()),
    };
    let to = match (required_text(table, TO_KIND_HEADER)?, required_text(table, TO_HEADER)?) {
        (Some(kind), Some(name)) => match kind.as_str() {
            "node" => Destination::Node(NodeId::new(name)),
            "topic" => Destination::topic(name),
            "service" => Destination::service(name),
            other => return Err(format!("header `{TO_KIND_HEADER}` has the unknown kind `{other}`")),
        },
        (None, None) => default_to(),
        _ => return Err(format!("headers `{TO_KIND_HEADER}` and `{TO_HEADER}` must come together")),
    };
    let headers = match table.inner().get(HEADERS_HEADER) {
        Some(value) => header_pairs(value)?,
        None => {
            let mut headers = Vec::new();
            if let Some(content_type) = properties.content_type() {
                headers.push((CONTENT_TYPE_HEADER.to_string(), content_type.as_str().to_string()));
            }
            for (name, value) in table.inner() {
                if name.as_str().starts_with("comms-") {
                    continue;
                }
                if let Some(value) = text(value)? {
                    headers.push((name.as_str().to_string(), value));
                }
            }
            headers
        }
    };
    Ok(Envelope::new(id, NodeId::new(from), to, Payload::from(std::mem::take(body)))
        .with_correlation_id(correlation_id)
        .with_headers(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope::new(
            MessageId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            NodeId::new("alice"),
            Destination::Service("echo".into()),
            Payload::from(b"{\"n\":1}".to_vec()),
        )
        .with_correlation_id(Some(MessageId::from_u128(7)))
        .with_headers(vec![
            ("content-type".into(), "application/json".into()),
            ("repeated".into(), "1".into()),
            ("a".into(), "grüße".into()),
            ("repeated".into(), "2".into()),
        ])
    }

    #[test]
    fn round_trip_keeps_order_repeats_and_every_field() {
        let properties = properties(&sample(), "comms.inbox.alice");
        let back = envelope_from(&properties, &mut sample().payload.to_vec(), || unreachable!()).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn properties_follow_the_documented_format() {
        let p = properties(&sample(), "comms.inbox.alice");
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "0123456789abcdef0011223344556677");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), format!("{:032x}", 7));
        assert_eq!(p.reply_to().as_ref().unwrap().as_str(), "comms.inbox.alice");
        assert_eq!(p.content_type().as_ref().unwrap().as_str(), "application/json");
        assert_eq!(*p.delivery_mode(), Some(PERSISTENT));
        let headers = p.headers().as_ref().unwrap();
        assert_eq!(required_text(headers, FROM_HEADER).unwrap().as_deref(), Some("alice"));
        assert_eq!(required_text(headers, TO_KIND_HEADER).unwrap().as_deref(), Some("service"));
        assert_eq!(required_text(headers, TO_HEADER).unwrap().as_deref(), Some("echo"));
    }

    #[test]
    fn a_foreign_message_needs_only_a_message_id() {
        let mut table = FieldTable::default();
        table.insert("priority".into(), AMQPValue::LongInt(5));
        table.insert("comms-ignored".into(), long("x"));
        let p = BasicProperties::default()
            .with_message_id("550e8400-e29b-41d4-a716-446655440000".into())
            .with_content_type("application/json".into())
            .with_headers(table);
        let envelope =
            envelope_from(&p, &mut b"{}".to_vec(), || Destination::Node(NodeId::new("bob"))).unwrap();
        assert_eq!(envelope.id.as_u128(), 0x550e8400_e29b_41d4_a716_446655440000);
        assert_eq!(envelope.from.as_str(), ANONYMOUS_SENDER);
        assert_eq!(envelope.to, Destination::Node(NodeId::new("bob")));
        assert_eq!(
            envelope.headers,
            [("content-type", "application/json"), ("priority", "5")]
                .into_iter()
                .collect::<comms_plugin_api::Headers>()
        );
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let none = BasicProperties::default();
        assert!(envelope_from(&none, &mut vec![], || unreachable!()).unwrap_err().contains("message_id"));
        let bad_id = BasicProperties::default().with_message_id("not hex".into());
        assert!(envelope_from(&bad_id, &mut vec![], || unreachable!()).unwrap_err().contains("not hex"));
        let mut table = FieldTable::default();
        table.insert(HEADERS_HEADER.into(), long("not an array"));
        let bad_headers = BasicProperties::default().with_message_id("1".into()).with_headers(table);
        let error = envelope_from(&bad_headers, &mut vec![], || Destination::Topic("t".into())).unwrap_err();
        assert!(error.contains(HEADERS_HEADER), "{error}");
        let mut table = FieldTable::default();
        table.insert(TO_KIND_HEADER.into(), long("planet"));
        table.insert(TO_HEADER.into(), long("mars"));
        let bad_kind = BasicProperties::default().with_message_id("1".into()).with_headers(table);
        assert!(envelope_from(&bad_kind, &mut vec![], || unreachable!()).unwrap_err().contains("planet"));
    }

    #[test]
    fn message_ids_parse_from_hex_and_uuids_only() {
        assert_eq!(parse_message_id("ff"), Some(MessageId::from_u128(255)));
        assert_eq!(parse_message_id(&format!("{:032x}", u128::MAX)), Some(MessageId::from_u128(u128::MAX)));
        assert_eq!(parse_message_id(""), None);
        assert_eq!(parse_message_id(&"f".repeat(33)), None);
        assert_eq!(parse_message_id("xyz"), None);
    }
}

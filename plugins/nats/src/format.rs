//! The broker-side format of a comms message on NATS: the payload is the message body, as it
//! is, and everything else travels in NATS headers, so that any NATS client can write and read
//! comms messages (`docs/nats.md` in the repository).
//!
//! | header | value | required |
//! |---|---|---|
//! | `Comms-Version` | format version, `1` | no (1 if absent) |
//! | `Comms-Id` | message id, 1 to 32 hex digits (128 bits) | yes |
//! | `Comms-From` | sender node id | yes |
//! | `Comms-To-Kind` | `node`, `service` or `topic` | no (`node`) |
//! | `Comms-To` | destination node id, service or topic | no (the inbox's node; the subject's topic) |
//! | `Comms-Correlation-Id` | id of the request this answers, hex | no |
//! | `Comms-Headers` | JSON array of `[name, value]` string pairs, in order | no (none) |
//!
//! Other headers are ignored. A message that does not fit (no `Comms-Id`, bad hex, unknown
//! version or kind, headers that are not such JSON) is malformed: the transport moves it to the
//! dead letters and never hands it to the host.

use async_nats::{header::HeaderName, HeaderMap};
use comms_plugin_api::{Destination, Envelope, ErrorCode, MessageId, NodeId, Payload, PluginError};

/// The format version this code writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// Header names.
pub mod header {
    /// Format version.
    pub const VERSION: &str = "Comms-Version";
    /// Message id.
    pub const ID: &str = "Comms-Id";
    /// Sender node id.
    pub const FROM: &str = "Comms-From";
    /// `node`, `service` or `topic`.
    pub const TO_KIND: &str = "Comms-To-Kind";
    /// Destination name.
    pub const TO: &str = "Comms-To";
    /// Id of the request a response answers.
    pub const CORRELATION_ID: &str = "Comms-Correlation-Id";
    /// The envelope's headers, JSON.
    pub const HEADERS: &str = "Comms-Headers";
    /// Why a message is in the dead letters.
    pub const DEAD_LETTER_REASON: &str = "Comms-Dead-Letter-Reason";
    /// The subject a dead letter was first published on.
    pub const DEAD_LETTER_SUBJECT: &str = "Comms-Dead-Letter-Subject";
    /// Its sequence number in the stream.
    pub const DEAD_LETTER_SEQUENCE: &str = "Comms-Dead-Letter-Sequence";
}

/// The header names the transport writes on every message, made once: a name built from a
/// `&str` is validated and copied into an allocation each time it is used, and these are used
/// for every message sent.
mod name {
    use super::{header, HeaderName};

    pub(super) const ID: HeaderName = HeaderName::from_static(header::ID);
    pub(super) const FROM: HeaderName = HeaderName::from_static(header::FROM);
    pub(super) const TO_KIND: HeaderName = HeaderName::from_static(header::TO_KIND);
    pub(super) const TO: HeaderName = HeaderName::from_static(header::TO);
    pub(super) const CORRELATION_ID: HeaderName = HeaderName::from_static(header::CORRELATION_ID);
    pub(super) const HEADERS: HeaderName = HeaderName::from_static(header::HEADERS);
}

fn kind_name(destination: &Destination) -> &'static str {
    match destination {
        Destination::Node(_) => "node",
        Destination::Service(_) => "service",
        Destination::Topic(_) => "topic",
    }
}

/// NATS header values cannot hold line breaks (the client would panic on one).
fn header_value<'a>(what: &str, value: &'a str) -> Result<&'a str, PluginError> {
    if value.contains(['\r', '\n']) {
        return Err(PluginError::new(
            ErrorCode::MALFORMED,
            format!("the message's {what} contains a line break, which a NATS header cannot carry"),
        ));
    }
    Ok(value)
}

/// The headers of `envelope`. `Comms-Version` is left out (absent means 1), and so are
/// `Comms-To-Kind` and `Comms-To` when `destination_implied` (a node message published on that
/// node's own inbox, whose reader takes the inbox's node when they are absent): fewer header
/// bytes for the server to parse and store per message.
pub fn encode(envelope: &Envelope, destination_implied: bool) -> Result<HeaderMap, PluginError> {
    let mut headers = HeaderMap::new();
    headers.insert(name::ID, envelope.id.to_string());
    headers.insert(name::FROM, header_value("sender", envelope.from.as_str())?);
    if !destination_implied {
        headers.insert(name::TO_KIND, kind_name(&envelope.to));
        headers.insert(name::TO, header_value("destination", envelope.to.name())?);
    }
    if let Some(correlation) = envelope.correlation_id {
        headers.insert(name::CORRELATION_ID, correlation.to_string());
    }
    if !envelope.headers.is_empty() {
        let pairs: Vec<[&str; 2]> = envelope.headers.iter().map(|(name, value)| [name, value]).collect();
        // JSON escapes every control character, so the value never holds a line break.
        let json = serde_json::to_string(&pairs).map_err(|error| {
            PluginError::new(ErrorCode::MALFORMED, format!("cannot encode the headers: {error}"))
        })?;
        headers.insert(name::HEADERS, json);
    }
    Ok(headers)
}

/// Parses a message id written as hex (what `MessageId`'s `Display` produces).
pub fn parse_id(text: &str) -> Option<MessageId> {
    if text.is_empty() || text.len() > 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(text, 16).ok().map(MessageId::from_u128)
}

/// The comms headers of a received message (the first value of each), found in one pass over
/// its headers: looking each name up would build (and allocate) a name per lookup.
#[derive(Default)]
struct Fields<'a> {
    version: Option<&'a str>,
    id: Option<&'a str>,
    from: Option<&'a str>,
    to_kind: Option<&'a str>,
    to: Option<&'a str>,
    correlation_id: Option<&'a str>,
    headers: Option<&'a str>,
}

impl<'a> Fields<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut fields = Fields::default();
        for (name, values) in headers.iter() {
            let Some(value) = values.first() else { continue };
            let slot = match AsRef::<str>::as_ref(name) {
                header::VERSION => &mut fields.version,
                header::ID => &mut fields.id,
                header::FROM => &mut fields.from,
                header::TO_KIND => &mut fields.to_kind,
                header::TO => &mut fields.to,
                header::CORRELATION_ID => &mut fields.correlation_id,
                header::HEADERS => &mut fields.headers,
                _ => continue,
            };
            *slot = Some(value.as_str());
        }
        fields
    }
}

/// The envelope of a message received with `headers` and `payload`; `default_to` is the
/// destination when `Comms-To` is absent (the inbox's node, or the subject's topic). The error
/// is the reason recorded with the dead letter.
pub fn decode(
    headers: Option<&HeaderMap>,
    payload: &[u8],
    default_to: Destination,
) -> Result<Envelope, String> {
    let fields = headers.map(Fields::of).unwrap_or_default();
    match fields.version {
        None | Some(FORMAT_VERSION) => {}
        Some(other) => return Err(format!("header `{}` is `{other}`; this reader knows 1", header::VERSION)),
    }
    let id = fields.id.ok_or_else(|| format!("header `{}` is missing", header::ID))?;
    let id = parse_id(id).ok_or_else(|| format!("header `{}` is not 1 to 32 hex digits", header::ID))?;
    let from = fields.from.ok_or_else(|| format!("header `{}` is missing", header::FROM))?;
    let from = NodeId::new(from);
    from.check().map_err(|error| format!("header `{}`: {error}", header::FROM))?;
    let to = match (fields.to_kind, fields.to) {
        (None, None) => default_to,
        (kind, Some(name)) => match kind.unwrap_or("node") {
            "node" => Destination::node(NodeId::new(name)),
            "service" => Destination::service(name),
            "topic" => Destination::topic(name),
            other => return Err(format!("header `{}` is `{other}`", header::TO_KIND)),
        },
        (Some(_), None) => return Err(format!("header `{}` without `{}`", header::TO_KIND, header::TO)),
    };
    let correlation = match fields.correlation_id {
        None => None,
        Some(text) => Some(
            parse_id(text)
                .ok_or_else(|| format!("header `{}` is not 1 to 32 hex digits", header::CORRELATION_ID))?,
        ),
    };
    let mut envelope =
        Envelope::new(id, from, to, Payload::copy_from_slice(payload)).with_correlation_id(correlation);
    if let Some(json) = fields.headers {
        let pairs: Vec<(String, String)> = serde_json::from_str(json).map_err(|error| {
            format!("header `{}` is not a JSON array of [name, value] pairs: {error}", header::HEADERS)
        })?;
        for (name, value) in pairs {
            envelope.headers.push(name, value);
        }
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let envelope = Envelope::new(
            MessageId::from_u128(0xabc),
            "alice",
            Destination::service("echo"),
            vec![0, 1, 255],
        )
        .with_correlation_id(Some(MessageId::from_u128(7)))
        .with_header("name", "välue\n\"quoted\"")
        .with_header("name", "twice");
        let headers = encode(&envelope, false).expect("encodes");
        let back =
            decode(Some(&headers), envelope.payload.as_slice(), Destination::node("x")).expect("decodes");
        assert_eq!(back, envelope);
    }

    #[test]
    fn a_destination_implied_by_the_inbox_is_left_out_and_read_back() {
        let envelope = Envelope::new(MessageId::from_u128(0xabc), "alice", Destination::node("bob"), vec![1]);
        let headers = encode(&envelope, true).expect("encodes");
        for left_out in [header::VERSION, header::TO_KIND, header::TO] {
            assert!(headers.get(left_out).is_none(), "{left_out} is not written");
        }
        // The reader of bob's inbox takes bob as the destination.
        let back = decode(Some(&headers), &[1], Destination::node("bob")).expect("decodes");
        assert_eq!(back, envelope);
        // Not implied (e.g. a relay's inbox): written.
        let headers = encode(&envelope, false).expect("encodes");
        assert_eq!(headers.get(header::TO).map(|value| value.as_str()), Some("bob"));
    }

    #[test]
    fn defaults_and_malformed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ID, "ff");
        headers.insert(header::FROM, "bob");
        let envelope = decode(Some(&headers), b"x", Destination::node("me")).expect("minimal message");
        assert_eq!(envelope.to, Destination::node("me"));
        assert_eq!(envelope.id, MessageId::from_u128(0xff));
        let missing = decode(None, b"x", Destination::node("me")).expect_err("no id");
        assert!(missing.contains("Comms-Id"), "{missing}");
        headers.insert(header::HEADERS, "{not json");
        assert!(decode(Some(&headers), b"x", Destination::node("me"))
            .expect_err("bad json")
            .contains("Comms-Headers"));
        headers.insert(header::ID, "xyz");
        assert!(decode(Some(&headers), b"x", Destination::node("me")).is_err());
    }

    #[test]
    fn a_line_break_in_a_destination_is_refused_not_a_panic() {
        let envelope = Envelope::new(MessageId::from_u128(1), "a", Destination::service("x\r\ny"), vec![]);
        assert_eq!(encode(&envelope, false).expect_err("refused").code, ErrorCode::MALFORMED);
    }
}

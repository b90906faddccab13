//! The documented binary encoding of an [`Envelope`] (wire version 1).
//!
//! Transports that carry raw bytes (TCP, UDP, a database column) use this encoding, so a program
//! in another language can produce and read comms messages. All integers are big-endian.
//!
//! ```text
//! u8      wire version, currently 1
//! [16]    message id (u128)
//! u8      destination kind: 0 node, 1 topic, 2 service
//! str     destination name
//! str     sender node id
//! u8      flags: bit 0 = a correlation id follows; other bits must be 0
//! [16]    correlation id (only if flag bit 0)
//! u16     header count
//!         (str name, str value) per header
//! u32     payload length
//! [..]    payload
//!
//! str = u16 byte length, then that many bytes of UTF-8
//! ```
//!
//! Nothing may follow the payload. A decoder rejects unknown versions, unknown destination kinds,
//! unknown flags, invalid UTF-8, truncation and trailing bytes with a [`WireError`].

use crate::{Destination, Envelope, MessageId, NodeId, Payload};

/// The wire version this code writes and reads.
pub const WIRE_VERSION: u8 = 1;

const FLAG_CORRELATION: u8 = 1;

/// Why bytes could not be decoded into an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first byte is not a version this code understands.
    #[error("unsupported wire version {0} (this node speaks version {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    /// The bytes end before the envelope does.
    #[error("envelope truncated while reading {0}")]
    Truncated(&'static str),
    /// A text field is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// The destination kind byte is unknown.
    #[error("unknown destination kind {0}")]
    UnknownDestination(u8),
    /// Flag bits this version does not define are set.
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// Bytes follow the payload.
    #[error("{0} unexpected bytes after the payload")]
    TrailingBytes(usize),
    /// A text field or the header count does not fit its length prefix.
    #[error("{0} is too long to encode")]
    FieldTooLong(&'static str),
}

/// Appends the encoding of `envelope` to `out`.
pub fn encode_envelope(envelope: &Envelope, out: &mut Vec<u8>) -> Result<(), WireError> {
    out.reserve(64 + envelope.payload.len());
    out.push(WIRE_VERSION);
    out.extend_from_slice(&envelope.id.as_u128().to_be_bytes());
    out.push(envelope.to.kind_code());
    put_str(out, envelope.to.name(), "destination")?;
    put_str(out, envelope.from.as_str(), "sender")?;
    match envelope.correlation_id {
        Some(id) => {
            out.push(FLAG_CORRELATION);
            out.extend_from_slice(&id.as_u128().to_be_bytes());
        }
        None => out.push(0),
    }
    let count = u16::try_from(envelope.headers.len()).map_err(|_| WireError::FieldTooLong("header count"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in &envelope.headers {
        put_str(out, name, "header name")?;
        put_str(out, value, "header value")?;
    }
    let length = u32::try_from(envelope.payload.len()).map_err(|_| WireError::FieldTooLong("payload"))?;
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(envelope.payload.as_slice());
    Ok(())
}

/// Decodes one envelope that fills `bytes` exactly.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, WireError> {
    let mut reader = Reader { bytes };
    let version = reader.u8("version")?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let id = MessageId::from_u128(reader.u128("message id")?);
    let kind = reader.u8("destination kind")?;
    let name = reader.string("destination")?;
    let to = Destination::from_parts(kind, name).ok_or(WireError::UnknownDestination(kind))?;
    let from = NodeId::new(reader.string("sender")?);
    let flags = reader.u8("flags")?;
    if flags & !FLAG_CORRELATION != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let correlation_id = if flags & FLAG_CORRELATION != 0 {
        Some(MessageId::from_u128(reader.u128("correlation id")?))
    } else {
        None
    };
    let count = reader.u16("header count")?;
    let mut headers = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        headers.push((reader.string("header name")?, reader.string("header value")?));
    }
    let length = reader.u32("payload length")? as usize;
    let payload = reader.take(length, "payload")?;
    if !reader.bytes.is_empty() {
        return Err(WireError::TrailingBytes(reader.bytes.len()));
    }
    Ok(Envelope { id, from, to, correlation_id, headers, payload: Payload::from(payload) })
}

fn put_str(out: &mut Vec<u8>, text: &str, field: &'static str) -> Result<(), WireError> {
    let length = u16::try_from(text.len()).map_err(|_| WireError::FieldTooLong(field))?;
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < n {
            return Err(WireError::Truncated(field));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u128(&mut self, field: &'static str) -> Result<u128, WireError> {
        Ok(u128::from_be_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let length = usize::from(self.u16(field)?);
        let bytes = self.take(length, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::InvalidUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            id: MessageId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            from: NodeId::new("alice"),
            to: Destination::Service("echo".into()),
            correlation_id: Some(MessageId::from_u128(7)),
            headers: vec![("content-type".into(), "application/json".into())],
            payload: Payload::from(b"{\"n\":1}".to_vec()),
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let mut bytes = Vec::new();
        encode_envelope(&sample(), &mut bytes).unwrap();
        assert_eq!(decode_envelope(&bytes).unwrap(), sample());
    }

    #[test]
    fn layout_matches_the_documentation() {
        let envelope = Envelope {
            id: MessageId::from_u128(1),
            from: NodeId::new("a"),
            to: Destination::Node(NodeId::new("b")),
            correlation_id: None,
            headers: vec![],
            payload: Payload::from(vec![0xff]),
        };
        let mut bytes = Vec::new();
        encode_envelope(&envelope, &mut bytes).unwrap();
        let mut expected = vec![1u8];
        expected.extend_from_slice(&1u128.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 1, b'b', 0, 1, b'a', 0, 0, 0, 0, 0, 0, 1, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut bytes = Vec::new();
        encode_envelope(&sample(), &mut bytes).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode_envelope(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
    }

    #[test]
    fn bad_bytes_are_rejected_with_a_reason() {
        let mut bytes = Vec::new();
        encode_envelope(&sample(), &mut bytes).unwrap();
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert_eq!(decode_envelope(&wrong_version), Err(WireError::UnsupportedVersion(9)));
        let mut wrong_kind = bytes.clone();
        wrong_kind[17] = 7;
        assert_eq!(decode_envelope(&wrong_kind), Err(WireError::UnknownDestination(7)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode_envelope(&trailing), Err(WireError::TrailingBytes(1)));
    }
}

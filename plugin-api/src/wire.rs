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
//! u8      flags: bit 0 = a correlation id follows; bit 1 = extensions follow the headers;
//!         other bits must be 0
//! [16]    correlation id (only if flag bit 0)
//! u16     header count
//!         (str name, str value) per header
//! u16     extension count (only if flag bit 1)
//!         (str key, u32 value length, value bytes) per extension
//! u32     payload length
//! [..]    payload
//!
//! str = u16 byte length, then that many bytes of UTF-8
//! ```
//!
//! Nothing may follow the payload. A decoder rejects unknown versions, unknown destination kinds,
//! unknown flags, invalid UTF-8, truncation and trailing bytes with a [`WireError`]. An envelope
//! without extensions (every envelope of contract 1.0) never sets flag bit 1, so it reads the
//! same as before extensions existed.
//!
//! [`decode_envelope_shared`] decodes from a [`SharedBuffer`] without copying the payload: the
//! envelope's payload is a range of the buffer that was read.

use crate::{Destination, Envelope, Extensions, Headers, MessageId, NodeId, Payload, SharedBuffer};
use std::ops::Range;

/// The wire version this code writes and reads.
pub const WIRE_VERSION: u8 = 1;

const FLAG_CORRELATION: u8 = 1;
const FLAG_EXTENSIONS: u8 = 2;

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
    let mut flags = 0;
    if envelope.correlation_id.is_some() {
        flags |= FLAG_CORRELATION;
    }
    if !envelope.extensions.is_empty() {
        flags |= FLAG_EXTENSIONS;
    }
    out.push(flags);
    if let Some(id) = envelope.correlation_id {
        out.extend_from_slice(&id.as_u128().to_be_bytes());
    }
    let count = u16::try_from(envelope.headers.len()).map_err(|_| WireError::FieldTooLong("header count"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in &envelope.headers {
        put_str(out, name, "header name")?;
        put_str(out, value, "header value")?;
    }
    if !envelope.extensions.is_empty() {
        let count = u16::try_from(envelope.extensions.len())
            .map_err(|_| WireError::FieldTooLong("extension count"))?;
        out.extend_from_slice(&count.to_be_bytes());
        for (key, value) in envelope.extensions.iter() {
            put_str(out, key, "extension key")?;
            let length =
                u32::try_from(value.len()).map_err(|_| WireError::FieldTooLong("extension value"))?;
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(value);
        }
    }
    let length = u32::try_from(envelope.payload.len()).map_err(|_| WireError::FieldTooLong("payload"))?;
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(envelope.payload.as_slice());
    Ok(())
}

/// The number of bytes [`encode_envelope`] appends for `envelope`, without encoding it; the
/// same errors for a field that does not fit its length prefix.
pub fn encoded_len(envelope: &Envelope) -> Result<usize, WireError> {
    let text = |text: &str, field: &'static str| {
        u16::try_from(text.len()).map(|_| 2 + text.len()).map_err(|_| WireError::FieldTooLong(field))
    };
    // Version, id, destination kind, flags.
    let mut length = 1 + 16 + 1 + 1;
    length += text(envelope.to.name(), "destination")?;
    length += text(envelope.from.as_str(), "sender")?;
    if envelope.correlation_id.is_some() {
        length += 16;
    }
    u16::try_from(envelope.headers.len()).map_err(|_| WireError::FieldTooLong("header count"))?;
    length += 2;
    for (name, value) in &envelope.headers {
        length += text(name, "header name")? + text(value, "header value")?;
    }
    if !envelope.extensions.is_empty() {
        u16::try_from(envelope.extensions.len()).map_err(|_| WireError::FieldTooLong("extension count"))?;
        length += 2;
        for (key, value) in envelope.extensions.iter() {
            u32::try_from(value.len()).map_err(|_| WireError::FieldTooLong("extension value"))?;
            length += text(key, "extension key")? + 4 + value.len();
        }
    }
    u32::try_from(envelope.payload.len()).map_err(|_| WireError::FieldTooLong("payload"))?;
    Ok(length + 4 + envelope.payload.len())
}

/// Decodes one envelope that fills `bytes` exactly; the payload is copied out of `bytes`.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, WireError> {
    decode_with(bytes, |payload| Ok(Payload::copy_from_slice(&bytes[payload])))
}

/// Decodes one envelope that fills `range` of `buffer` exactly; the payload is that part of the
/// buffer, shared, not copied.
pub fn decode_envelope_shared(buffer: &SharedBuffer, range: Range<usize>) -> Result<Envelope, WireError> {
    let bytes = buffer.as_slice().get(range.clone()).ok_or(WireError::Truncated("envelope"))?;
    decode_with(bytes, |payload| {
        buffer
            .payload(range.start + payload.start..range.start + payload.end)
            .ok_or(WireError::Truncated("payload"))
    })
}

/// Decodes everything but the payload, which `payload` makes from its range in `bytes`.
fn decode_with(
    bytes: &[u8],
    payload: impl FnOnce(Range<usize>) -> Result<Payload, WireError>,
) -> Result<Envelope, WireError> {
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
    if flags & !(FLAG_CORRELATION | FLAG_EXTENSIONS) != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let correlation_id = if flags & FLAG_CORRELATION != 0 {
        Some(MessageId::from_u128(reader.u128("correlation id")?))
    } else {
        None
    };
    let count = reader.u16("header count")?;
    // At most what the bytes left could hold (4 bytes a pair at least): a forged count does
    // not reserve memory the frame does not back.
    let mut headers = Headers::with_capacity(usize::from(count).min(reader.bytes.len() / 4));
    for _ in 0..count {
        headers.push(reader.string("header name")?, reader.string("header value")?);
    }
    let mut extensions = Extensions::new();
    if flags & FLAG_EXTENSIONS != 0 {
        for _ in 0..reader.u16("extension count")? {
            let key = reader.string("extension key")?;
            let length = reader.u32("extension value length")? as usize;
            extensions.set(key, reader.take(length, "extension value")?.to_vec());
        }
    }
    let length = reader.u32("payload length")? as usize;
    let start = bytes.len() - reader.bytes.len();
    reader.take(length, "payload")?;
    if !reader.bytes.is_empty() {
        return Err(WireError::TrailingBytes(reader.bytes.len()));
    }
    let envelope = Envelope::new(id, from, to, payload(start..start + length)?)
        .with_correlation_id(correlation_id)
        .with_headers(headers)
        .with_extensions(extensions);
    Ok(envelope)
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
        Envelope::new(
            MessageId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            "alice",
            Destination::service("echo"),
            b"{\"n\":1}".to_vec(),
        )
        .with_correlation_id(Some(MessageId::from_u128(7)))
        .with_header("content-type", "application/json")
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let mut bytes = Vec::new();
        encode_envelope(&sample(), &mut bytes).unwrap();
        assert_eq!(decode_envelope(&bytes).unwrap(), sample());
    }

    #[test]
    fn encoded_len_is_what_encoding_appends() {
        let mut extensions = Extensions::new();
        extensions.set("comms.test", vec![1, 2, 3]);
        let plain = Envelope::new(MessageId::from_u128(1), "a", Destination::node("b"), Vec::new());
        for envelope in [sample(), sample().with_extensions(extensions), plain] {
            let mut bytes = vec![7];
            encode_envelope(&envelope, &mut bytes).unwrap();
            assert_eq!(encoded_len(&envelope).unwrap(), bytes.len() - 1);
        }
        let long = "x".repeat(70_000);
        let too_long = sample().with_header("h", long.as_str());
        assert_eq!(encoded_len(&too_long), Err(WireError::FieldTooLong("header value")));
    }

    #[test]
    fn layout_matches_the_documentation() {
        let envelope = Envelope::new(MessageId::from_u128(1), "a", Destination::node("b"), vec![0xff]);
        let mut bytes = Vec::new();
        encode_envelope(&envelope, &mut bytes).unwrap();
        let mut expected = vec![1u8];
        expected.extend_from_slice(&1u128.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 1, b'b', 0, 1, b'a', 0, 0, 0, 0, 0, 0, 1, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn extensions_travel_and_a_shared_decode_does_not_copy_the_payload() {
        let mut extensions = Extensions::new();
        extensions.set("comms.test", vec![1, 2, 3]);
        let envelope = sample().with_extensions(extensions);
        let mut bytes = vec![9, 9];
        encode_envelope(&envelope, &mut bytes).unwrap();
        let buffer = SharedBuffer::from(bytes);
        let decoded = decode_envelope_shared(&buffer, 2..buffer.as_slice().len()).unwrap();
        assert_eq!(decoded, envelope);
        let start = buffer.as_slice().len() - envelope.payload.len();
        assert_eq!(
            decoded.payload.as_slice().as_ptr(),
            buffer.as_slice()[start..].as_ptr(),
            "shared, not copied"
        );
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

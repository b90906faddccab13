//! The frames stream transports exchange: a hello each way, then envelopes, then a goodbye.
//!
//! Every frame is a [length-prefixed frame](crate::framing) whose first body byte is its kind:
//!
//! | kind | name     | rest of the body                                              |
//! |------|----------|---------------------------------------------------------------|
//! | 1    | HELLO    | `b"COMMS"`, u8 protocol version (1), u16 length + UTF-8 node id |
//! | 2    | ENVELOPE | one envelope in the [wire encoding](crate::wire)               |
//! | 3    | GOODBYE  | nothing; the sender is closing gracefully                      |
//! | 4    | NOISE    | one Noise handshake message (encrypted links only)            |
//!
//! The connecting side sends HELLO and waits for the accepting side's HELLO; after that only the
//! connecting side sends ENVELOPEs (each node dials its own connection to every peer it sends
//! to). Either side may send GOODBYE before closing. Anything else closes the connection.
//!
//! ## Encrypted links
//!
//! With link security on ([`crate::security`]), the connection opens with the three messages of
//! the [Noise XX handshake](crate::security::noise), each in a NOISE frame (connecting side first).
//! Everything after it (HELLO, ENVELOPEs, GOODBYE, unchanged) travels inside
//! [encrypted records](super::encrypted). A HELLO's node id must then be bound to the key the
//! handshake authenticated. A node with security on refuses a connection that starts with a
//! HELLO; a node without refuses one that starts with a NOISE frame.

use crate::{wire, Envelope, NodeId};

/// Frame kind: hello.
pub const KIND_HELLO: u8 = 1;
/// Frame kind: envelope.
pub const KIND_ENVELOPE: u8 = 2;
/// Frame kind: goodbye.
pub const KIND_GOODBYE: u8 = 3;
/// Frame kind: Noise handshake message.
pub const KIND_NOISE: u8 = 4;
/// Largest NOISE frame body: the kind byte and a Noise message.
pub const MAX_NOISE_SIZE: u32 = 1 + crate::security::noise::MAX_MESSAGE_BYTES as u32;

const MAGIC: &[u8; 5] = b"COMMS";
/// Version of this stream protocol.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest hello body accepted (a node id is at most 64 KiB).
pub const MAX_HELLO_SIZE: u32 = 1 + 5 + 1 + 2 + u16::MAX as u32;

/// The complete frame (prefix included) that introduces `node`.
pub fn hello_frame(node: &NodeId) -> Vec<u8> {
    let id = node.as_str().as_bytes();
    let id = &id[..id.len().min(u16::MAX as usize)];
    let mut body = Vec::with_capacity(9 + id.len());
    body.push(KIND_HELLO);
    body.extend_from_slice(MAGIC);
    body.push(PROTOCOL_VERSION);
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut frame = Vec::with_capacity(4 + body.len());
    crate::framing::append_frame(&mut frame, &body);
    frame
}

/// The complete frame (prefix included) carrying one Noise handshake message.
pub fn noise_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.extend_from_slice(&(1 + message.len() as u32).to_be_bytes());
    frame.push(KIND_NOISE);
    frame.extend_from_slice(message);
    frame
}

/// The complete GOODBYE frame.
pub fn goodbye_frame() -> Vec<u8> {
    vec![0, 0, 0, 1, KIND_GOODBYE]
}

/// Parses a hello body, returning the peer's node id or why it is not a hello.
pub fn parse_hello(body: &[u8]) -> Result<NodeId, String> {
    match body {
        [KIND_HELLO, rest @ ..] if rest.starts_with(MAGIC) => {
            let rest = &rest[MAGIC.len()..];
            match rest {
                [PROTOCOL_VERSION, high, low, id @ ..]
                    if id.len() == u16::from_be_bytes([*high, *low]) as usize =>
                {
                    std::str::from_utf8(id)
                        .map(NodeId::new)
                        .map_err(|_| "hello node id is not UTF-8".to_string())
                }
                [version, ..] if *version != PROTOCOL_VERSION => Err(format!(
                    "unsupported stream protocol version {version} (expected {PROTOCOL_VERSION})"
                )),
                _ => Err("malformed hello".to_string()),
            }
        }
        _ => Err("the first frame is not a comms hello".to_string()),
    }
}

/// The size of the ENVELOPE frame (prefix included) that carries `envelope`, without encoding
/// it. A [`crate::ErrorCode::TOO_LARGE`] error when the body would exceed `max_frame_size` or a
/// field does not fit the wire encoding.
pub fn envelope_frame_len(envelope: &Envelope, max_frame_size: u32) -> Result<usize, crate::PluginError> {
    let too_large = |message: String| crate::PluginError::new(crate::ErrorCode::TOO_LARGE, message);
    let body_length = 1 + wire::encoded_len(envelope).map_err(|error| too_large(error.to_string()))?;
    if body_length > max_frame_size as usize {
        return Err(too_large(format!(
            "message of {body_length} bytes exceeds max_frame_size {max_frame_size}"
        )));
    }
    Ok(crate::framing::LENGTH_PREFIX_BYTES + body_length)
}

/// Appends the complete ENVELOPE frame of `envelope` to `out` (which may hold other frames):
/// the envelope is encoded straight into `out`. The caller checks the size first with
/// [`envelope_frame_len`].
pub fn append_envelope_frame(envelope: &Envelope, out: &mut Vec<u8>) -> Result<(), wire::WireError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, KIND_ENVELOPE]);
    if let Err(error) = wire::encode_envelope(envelope, out) {
        out.truncate(start);
        return Err(error);
    }
    let body_length = (out.len() - start - crate::framing::LENGTH_PREFIX_BYTES) as u32;
    out[start..start + crate::framing::LENGTH_PREFIX_BYTES].copy_from_slice(&body_length.to_be_bytes());
    Ok(())
}

/// Encodes `envelope` as a complete ENVELOPE frame of its own, refusing one above `max_frame_size`.
pub fn envelope_frame(envelope: &Envelope, max_frame_size: u32) -> Result<Vec<u8>, crate::PluginError> {
    let mut frame = Vec::with_capacity(envelope_frame_len(envelope, max_frame_size)?);
    append_envelope_frame(envelope, &mut frame)
        .map_err(|error| crate::PluginError::new(crate::ErrorCode::TOO_LARGE, error.to_string()))?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let frame = hello_frame(&NodeId::new("node-7"));
        assert_eq!(parse_hello(&frame[4..]), Ok(NodeId::new("node-7")));
    }

    #[test]
    fn bad_hellos_are_refused() {
        assert!(parse_hello(b"GET / HTTP/1.1").is_err());
        let mut frame = hello_frame(&NodeId::new("x"));
        frame[4 + 6] = 9;
        assert!(parse_hello(&frame[4..]).unwrap_err().contains("version 9"));
        let frame = hello_frame(&NodeId::new("xyz"));
        assert!(parse_hello(&frame[4..frame.len() - 1]).is_err());
    }

    #[test]
    fn envelope_frames_are_as_long_as_announced_and_limited() {
        let envelope =
            Envelope::new(crate::MessageId::from_u128(5), "a", crate::Destination::node("b"), vec![1; 100])
                .with_header("k", "v");
        let frame = envelope_frame(&envelope, 1 << 20).unwrap();
        assert_eq!(envelope_frame_len(&envelope, 1 << 20).unwrap(), frame.len());
        assert_eq!(u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
        assert_eq!(frame[4], KIND_ENVELOPE);
        assert_eq!(wire::decode_envelope(&frame[5..]).unwrap(), envelope);
        let mut two = frame.clone();
        append_envelope_frame(&envelope, &mut two).unwrap();
        assert_eq!(two, [frame.clone(), frame.clone()].concat(), "appended after what is there");
        let error = envelope_frame_len(&envelope, frame.len() as u32 - 5).unwrap_err();
        assert_eq!(error.code, crate::ErrorCode::TOO_LARGE);
        assert!(envelope_frame_len(&envelope, frame.len() as u32 - 4).is_ok(), "the limit counts the body");
    }
}

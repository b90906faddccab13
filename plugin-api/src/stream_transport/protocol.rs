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

/// Encodes `envelope` as a complete ENVELOPE frame, refusing one above `max_frame_size`.
pub fn envelope_frame(envelope: &Envelope, max_frame_size: u32) -> Result<Vec<u8>, crate::PluginError> {
    let mut frame = Vec::with_capacity(64 + envelope.payload.len());
    frame.extend_from_slice(&[0, 0, 0, 0, KIND_ENVELOPE]);
    wire::encode_envelope(envelope, &mut frame)
        .map_err(|error| crate::PluginError::new(crate::ErrorCode::TOO_LARGE, error.to_string()))?;
    let body_length = frame.len() - crate::framing::LENGTH_PREFIX_BYTES;
    if body_length > max_frame_size as usize {
        return Err(crate::PluginError::new(
            crate::ErrorCode::TOO_LARGE,
            format!("message of {body_length} bytes exceeds max_frame_size {max_frame_size}"),
        ));
    }
    frame[..4].copy_from_slice(&(body_length as u32).to_be_bytes());
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
}

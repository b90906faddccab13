//! The datagrams nodes exchange, and their encoding.
//!
//! ## Datagram format (version 1)
//!
//! All integers are big-endian. A datagram is at most [`MAX_DATAGRAM`] bytes.
//!
//! ```text
//! u8   magic 0xDB
//! u8   version 1
//! u8   kind: 1 PING, 2 PONG, 3 FIND, 4 FOUND, 5 STORE, 6 STORED, 7 GOODBYE
//! u64  transaction id: a request's, echoed by its response
//! [32] sender key: SHA-256 of the sender's node id
//! FIND (request; answered by FOUND):
//!   [32] target key
//!   u8   flags: bit 0 = also return the values stored under the target
//! FOUND:
//!   u8   contact count (at most MAX_CONTACTS), each: [32] key, address
//!   u8   value count, each: u32 remaining ttl in ms, u16 length, record
//! STORE (request; answered by STORED):
//!   [32] key
//!   u32  ttl in ms; 0 removes the sender's value under the key
//!   u16  length, record (at most MAX_RECORD bytes)
//! STORED:
//!   u8   1 accepted, 0 refused (rate limit, bounds or an invalid record)
//! PING, PONG, GOODBYE: nothing more (GOODBYE: the sender is leaving; drop it)
//! address (SocketAddr): u8 4, [4] IPv4, u16 port | u8 6, [16] IPv6, u16 port
//! record (a NodeRecord):
//!   str id; u16 count, (str transport, str address) each; u16 count, str service each;
//!   u16 count, str topic each; u16 count, (str name, str value) each (metadata);
//!   u16 count, (str key, bytes value) each (extensions)
//!   str / bytes = u16 length, then the bytes (str: UTF-8)
//! ```
//!
//! Decoding never panics and never allocates more than the datagram's length: hostile input is
//! a [`DecodeError`] naming what is wrong.
//!
//! ## Authenticated datagrams (version 2)
//!
//! Nodes that run with `security.links = "noise"` speak version 2: the same message with
//! version byte `2`, in which every record (a STORE's, a FOUND's values) is the record followed
//! by its own node's signature of it, and a trailer after the message:
//!
//! ```text
//! u8   magic 0xDB
//! u8   version 2
//! ...  kind, transaction id, sender key, body as in version 1; each record is:
//!        record bytes (as above), [64] signature by the node the record names (RECORD_CONTEXT)
//!        (at most MAX_RECORD bytes in all)
//! [n]  sender's node id (bound to its public key: `<label>-<64 hex digits>`; the sender key
//!      must be its SHA-256)
//! u8   n
//! u64  sender's clock, milliseconds since the Unix epoch
//! [64] Ed25519 signature of everything above (DATAGRAM_CONTEXT)
//! ```
//!
//! A signature covers a context string ([`DATAGRAM_CONTEXT`] or [`RECORD_CONTEXT`], naming the
//! protocol and version), then `0`, or `1` and the network key (`security.network_key_file`),
//! then the bytes (see [`crate::auth`]). [`open`] refuses a datagram, before parsing anything,
//! unless the sender's id is bound to a key on the allow list, the signature verifies and the
//! time is within 5 minutes of the receiver's clock; then the sender key must be that id's and
//! every record must carry its own node's signature ([`verify_record`]). 73 bytes plus the
//! sender's id per datagram, 64 per record.

use crate::auth::{self, AuthError, LinkSecurity, SIGNATURE};
use crate::key::{Key, KEY_BYTES};
use comms_plugin_api::{NodeId, NodeRecord};
use std::{fmt, hash::Hash, net::SocketAddr};

/// First byte of every datagram.
pub const MAGIC: u8 = 0xDB;
/// The format version this code speaks (plaintext).
pub const VERSION: u8 = 1;
/// The version of authenticated datagrams: a version-1 message whose records carry their
/// owner's signature, followed by the sender's authentication trailer (see
/// [Authenticated datagrams](self#authenticated-datagrams-version-2)).
pub const AUTH_VERSION: u8 = 2;
/// What the signature of a datagram's trailer covers first (then the network key marker).
pub const DATAGRAM_CONTEXT: &[u8] = b"comms-kademlia/2 datagram";
/// What the owner's signature of a record covers first (then the network key marker).
pub const RECORD_CONTEXT: &[u8] = b"comms-kademlia/2 record";
/// The largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 8192;
/// The largest encoded record.
pub const MAX_RECORD: usize = 2048;
/// The most contacts in one FOUND.
pub const MAX_CONTACTS: usize = 32;
/// Bytes before the body.
pub const HEADER: usize = 3 + 8 + KEY_BYTES;

const KIND_PING: u8 = 1;
const KIND_PONG: u8 = 2;
const KIND_FIND: u8 = 3;
const KIND_FOUND: u8 = 4;
const KIND_STORE: u8 = 5;
const KIND_STORED: u8 = 6;
const KIND_GOODBYE: u8 = 7;

/// Why a datagram or record was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// It ends before a field it announced.
    Truncated,
    /// Longer than [`MAX_DATAGRAM`] (or a record longer than [`MAX_RECORD`]).
    TooLarge(usize),
    /// The first byte is not [`MAGIC`].
    BadMagic(u8),
    /// A version this code does not speak.
    UnsupportedVersion(u8),
    /// An unknown message kind.
    UnknownKind(u8),
    /// A field with a value the format does not allow.
    Invalid(&'static str),
    /// Bytes left over after the message.
    TrailingBytes(usize),
    /// A plaintext datagram at a node that requires authenticated ones.
    Plaintext,
    /// An authenticated datagram, or a record in one, that fails authentication.
    Auth(AuthError),
}

impl DecodeError {
    /// Whether the datagram was refused for its authentication (not its format).
    pub fn is_authentication(&self) -> bool {
        matches!(self, DecodeError::Plaintext | DecodeError::Auth(_))
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated"),
            DecodeError::TooLarge(n) => write!(f, "{n} bytes is over the limit"),
            DecodeError::BadMagic(byte) => write!(f, "bad magic byte {byte:#04x}"),
            DecodeError::UnsupportedVersion(AUTH_VERSION) => write!(
                f,
                "an authenticated datagram (version {AUTH_VERSION}); this node runs plaintext kademlia \
                 (security.links = \"plain\")"
            ),
            DecodeError::UnsupportedVersion(version) => write!(f, "unsupported version {version}"),
            DecodeError::Plaintext => write!(
                f,
                "a plaintext datagram; this node requires authenticated ones (security.links = \"noise\")"
            ),
            DecodeError::Auth(error) => write!(f, "unauthenticated: {error}"),
            DecodeError::UnknownKind(kind) => write!(f, "unknown message kind {kind}"),
            DecodeError::Invalid(what) => write!(f, "invalid {what}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A reader over a byte slice that fails instead of panicking.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Reads `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn key(&mut self) -> Result<Key, DecodeError> {
        Ok(Key(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DecodeError::Invalid("UTF-8 string"))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// An address type the protocol can carry: `SocketAddr` in the plugin, `u32` in simulations.
pub trait WireAddress: Copy + Eq + Hash + Ord + fmt::Debug {
    /// Appends the address.
    fn encode(&self, out: &mut Vec<u8>);
    /// Reads one address.
    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

impl WireAddress for SocketAddr {
    fn encode(&self, out: &mut Vec<u8>) {
        comms_plugin_api::socket_address::encode_binary(out, *self);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        use comms_plugin_api::socket_address::{decode_binary, BinaryAddressError};
        let (address, rest) = decode_binary(reader.0).map_err(|error| match error {
            BinaryAddressError::Truncated => DecodeError::Truncated,
            BinaryAddressError::UnknownFamily(_) => DecodeError::Invalid("address family"),
        })?;
        reader.0 = rest;
        if address.port() == 0 || address.ip().is_unspecified() {
            return Err(DecodeError::Invalid("address (unspecified IP or port 0)"));
        }
        Ok(address)
    }
}

impl WireAddress for u32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        reader.u32()
    }
}

/// A node as the routing table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Contact<A> {
    /// Its key.
    pub key: Key,
    /// Where it receives datagrams.
    pub address: A,
}

/// A stored record as sent in FOUND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// Milliseconds it has left at the node that sent it.
    pub ttl_ms: u32,
    /// The encoded record (see [`encode_record`]).
    pub record: Vec<u8>,
}

impl Value {
    /// Bytes it takes in a FOUND.
    pub fn encoded_len(&self) -> usize {
        4 + 2 + self.record.len()
    }
}

/// What a datagram says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<A> {
    /// Are you there?
    Ping,
    /// Yes.
    Pong,
    /// The contacts closest to `target` the receiver knows, and with `values` its values.
    Find {
        /// The key looked up.
        target: Key,
        /// Also return the values stored under `target`.
        values: bool,
    },
    /// The answer to FIND.
    Found {
        /// Up to k contacts closest to the target.
        contacts: Vec<Contact<A>>,
        /// Values stored under the target (if asked for).
        values: Vec<Value>,
    },
    /// Keep `record` under `key` for `ttl_ms` (0: remove the sender's value).
    Store {
        /// Where.
        key: Key,
        /// For how long.
        ttl_ms: u32,
        /// The encoded record.
        record: Vec<u8>,
    },
    /// The answer to STORE.
    Stored {
        /// Whether the value was kept.
        accepted: bool,
    },
    /// The sender is leaving.
    Goodbye,
}

/// One datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<A> {
    /// The request's id, echoed by its response.
    pub txid: u64,
    /// The sender's key.
    pub sender: Key,
    /// What it says.
    pub body: Body<A>,
}

impl<A: WireAddress> Message<A> {
    /// The datagram. The caller keeps it within [`MAX_DATAGRAM`] (contacts and values are
    /// bounded where FOUND is built).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let kind = match &self.body {
            Body::Ping => KIND_PING,
            Body::Pong => KIND_PONG,
            Body::Find { .. } => KIND_FIND,
            Body::Found { .. } => KIND_FOUND,
            Body::Store { .. } => KIND_STORE,
            Body::Stored { .. } => KIND_STORED,
            Body::Goodbye => KIND_GOODBYE,
        };
        out.extend_from_slice(&[MAGIC, VERSION, kind]);
        out.extend_from_slice(&self.txid.to_be_bytes());
        out.extend_from_slice(&self.sender.0);
        match &self.body {
            Body::Ping | Body::Pong | Body::Goodbye => {}
            Body::Find { target, values } => {
                out.extend_from_slice(&target.0);
                out.push(u8::from(*values));
            }
            Body::Found { contacts, values } => {
                out.push(contacts.len().min(MAX_CONTACTS) as u8);
                for contact in contacts.iter().take(MAX_CONTACTS) {
                    out.extend_from_slice(&contact.key.0);
                    contact.address.encode(&mut out);
                }
                out.push(values.len().min(u8::MAX as usize) as u8);
                for value in values.iter().take(u8::MAX as usize) {
                    out.extend_from_slice(&value.ttl_ms.to_be_bytes());
                    put_bytes(&mut out, &value.record);
                }
            }
            Body::Store { key, ttl_ms, record } => {
                out.extend_from_slice(&key.0);
                out.extend_from_slice(&ttl_ms.to_be_bytes());
                put_bytes(&mut out, record);
            }
            Body::Stored { accepted } => out.push(u8::from(*accepted)),
        }
        out
    }

    /// Parses a datagram.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_version(bytes, VERSION)
    }

    fn decode_version(bytes: &[u8], expected: u8) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let magic = r.u8()?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = r.u8()?;
        if version != expected {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = r.u8()?;
        let txid = r.u64()?;
        let sender = r.key()?;
        let body = match kind {
            KIND_PING => Body::Ping,
            KIND_PONG => Body::Pong,
            KIND_GOODBYE => Body::Goodbye,
            KIND_FIND => {
                let target = r.key()?;
                let flags = r.u8()?;
                if flags > 1 {
                    return Err(DecodeError::Invalid("FIND flags"));
                }
                Body::Find { target, values: flags == 1 }
            }
            KIND_FOUND => {
                let count = r.u8()? as usize;
                if count > MAX_CONTACTS {
                    return Err(DecodeError::Invalid("contact count"));
                }
                let mut contacts = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = r.key()?;
                    contacts.push(Contact { key, address: A::decode(&mut r)? });
                }
                let count = r.u8()? as usize;
                // No capacity from the count: each value needs at least 6 bytes of the datagram.
                let mut values = Vec::new();
                for _ in 0..count {
                    let ttl_ms = r.u32()?;
                    let record = r.bytes()?;
                    if record.len() > MAX_RECORD {
                        return Err(DecodeError::TooLarge(record.len()));
                    }
                    values.push(Value { ttl_ms, record: record.to_vec() });
                }
                Body::Found { contacts, values }
            }
            KIND_STORE => {
                let key = r.key()?;
                let ttl_ms = r.u32()?;
                let record = r.bytes()?;
                if record.len() > MAX_RECORD {
                    return Err(DecodeError::TooLarge(record.len()));
                }
                Body::Store { key, ttl_ms, record: record.to_vec() }
            }
            KIND_STORED => match r.u8()? {
                0 => Body::Stored { accepted: false },
                1 => Body::Stored { accepted: true },
                _ => return Err(DecodeError::Invalid("STORED flag")),
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(Message { txid, sender, body })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every caller bounds its fields (records by MAX_RECORD, strings by `encode_record`).
    let length = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(length as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..length]);
}

/// Why a record cannot be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordTooLarge {
    /// Its encoded size.
    pub size: usize,
}

impl fmt::Display for RecordTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the record encodes to {} bytes; the limit is {MAX_RECORD}", self.size)
    }
}

impl std::error::Error for RecordTooLarge {}

/// Encodes a record, or says it is larger than [`MAX_RECORD`].
pub fn encode_record(record: &NodeRecord) -> Result<Vec<u8>, RecordTooLarge> {
    let mut out = Vec::with_capacity(128);
    let mut fits = true;
    let mut put = |out: &mut Vec<u8>, bytes: &[u8]| {
        fits &= bytes.len() <= MAX_RECORD;
        put_bytes(out, bytes);
    };
    let count =
        |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
    put(&mut out, record.id.as_str().as_bytes());
    count(&mut out, record.addresses.len());
    for (transport, address) in &record.addresses {
        put(&mut out, transport.as_bytes());
        put(&mut out, address.as_bytes());
    }
    for list in [&record.services, &record.topics] {
        count(&mut out, list.len());
        for item in list {
            put(&mut out, item.as_bytes());
        }
    }
    count(&mut out, record.metadata.len());
    for (name, value) in &record.metadata {
        put(&mut out, name.as_bytes());
        put(&mut out, value.as_bytes());
    }
    count(&mut out, record.extensions.len());
    for (key, value) in record.extensions.iter() {
        put(&mut out, key.as_bytes());
        put(&mut out, value);
    }
    if !fits || out.len() > MAX_RECORD {
        return Err(RecordTooLarge { size: out.len() });
    }
    Ok(out)
}

/// Decodes a record.
pub fn decode_record(bytes: &[u8]) -> Result<NodeRecord, DecodeError> {
    if bytes.len() > MAX_RECORD {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let mut r = Reader::new(bytes);
    let id = r.string()?;
    if id.is_empty() {
        return Err(DecodeError::Invalid("empty node id"));
    }
    let mut record = NodeRecord::new(NodeId::new(id));
    for _ in 0..r.u16()? {
        record.addresses.push((r.string()?, r.string()?));
    }
    for _ in 0..r.u16()? {
        record.services.push(r.string()?);
    }
    for _ in 0..r.u16()? {
        record.topics.push(r.string()?);
    }
    for _ in 0..r.u16()? {
        record.metadata.push((r.string()?, r.string()?));
    }
    for _ in 0..r.u16()? {
        let key = r.string()?;
        let value = r.bytes()?;
        record.extensions.set(key, value.to_vec());
    }
    r.finish()?;
    Ok(record)
}

/// Seals an encoded message as sent by node `id` at `unix_ms`: sets its version to
/// [`AUTH_VERSION`] and appends the authentication trailer.
pub fn seal(security: &LinkSecurity, id: &str, mut datagram: Vec<u8>, unix_ms: u64) -> Vec<u8> {
    if let Some(version) = datagram.get_mut(1) {
        *version = AUTH_VERSION;
    }
    auth::seal(security, DATAGRAM_CONTEXT, id, datagram, unix_ms)
}

/// Checks and parses an authenticated datagram at `unix_ms`: the trailer first (signature,
/// allowed key, time window; nothing is parsed before it passes), then the message, whose
/// sender key must be the key of the node that signed it, and whose records (a STORE's, a
/// FOUND's values) must each carry the signature of the node they describe, by an allowed key
/// ([`verify_record`]). Returns the sender's node id and the message.
pub fn open<'a, A: WireAddress>(
    security: &LinkSecurity,
    bytes: &'a [u8],
    unix_ms: u64,
) -> Result<(&'a str, Message<A>), DecodeError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    match bytes {
        [MAGIC, AUTH_VERSION, ..] => {}
        [MAGIC, VERSION, ..] => return Err(DecodeError::Plaintext),
        [MAGIC, version, ..] => return Err(DecodeError::UnsupportedVersion(*version)),
        [other, ..] => return Err(DecodeError::BadMagic(*other)),
        [] => return Err(DecodeError::Truncated),
    }
    let (sender, payload) =
        auth::open(security, DATAGRAM_CONTEXT, bytes, unix_ms).map_err(DecodeError::Auth)?;
    let message = Message::<A>::decode_version(payload, AUTH_VERSION)?;
    if message.sender != Key::for_node(sender) {
        return Err(DecodeError::Auth(AuthError::WrongSender));
    }
    match &message.body {
        Body::Store { record, .. } => verify_record(security, record)?,
        Body::Found { values, .. } => {
            for value in values {
                verify_record(security, &value.record)?;
            }
        }
        _ => {}
    }
    Ok((sender, message))
}

/// An encoded record (see [`encode_record`]) followed by its node's signature of it: how
/// records travel between authenticated nodes. At most [`MAX_RECORD`] bytes in all.
pub fn sign_record(security: &LinkSecurity, record: Vec<u8>) -> Result<Vec<u8>, RecordTooLarge> {
    let mut signed = record;
    let signature = auth::sign(security, RECORD_CONTEXT, &signed);
    signed.extend_from_slice(&signature);
    match signed.len() {
        size if size > MAX_RECORD => Err(RecordTooLarge { size }),
        _ => Ok(signed),
    }
}

/// Checks that a signed record (see [`sign_record`]) carries the signature of the node it
/// describes (its id's key, which must be allowed). Reads only the id before checking.
pub fn verify_record(security: &LinkSecurity, signed: &[u8]) -> Result<(), DecodeError> {
    let split = signed.len().checked_sub(SIGNATURE).ok_or(DecodeError::Auth(AuthError::Malformed))?;
    let (record, signature) = signed.split_at(split);
    let id = Reader::new(record).bytes()?;
    let id = std::str::from_utf8(id).map_err(|_| DecodeError::Invalid("UTF-8 string"))?;
    auth::verify(security, RECORD_CONTEXT, id, record, signature).map_err(DecodeError::Auth)?;
    Ok(())
}

/// Decodes a record as carried in a STORE or FOUND: signed (authenticated nodes; the signature,
/// checked when the datagram was opened, is skipped) or not.
pub fn decode_value(value: &[u8], signed: bool) -> Result<NodeRecord, DecodeError> {
    match signed {
        true => decode_record(&value[..value.len().checked_sub(SIGNATURE).ok_or(DecodeError::Truncated)?]),
        false => decode_record(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        let mut record = NodeRecord::new(NodeId::new("alice"));
        record.addresses = vec![("tcp".into(), "127.0.0.1:7000".into())];
        record.services = vec!["echo".into()];
        record.topics = vec!["news.>".into()];
        record.metadata = vec![("zone".into(), "eu".into())];
        record.extensions.set("x", vec![1, 2, 3]);
        record
    }

    fn messages() -> Vec<Message<SocketAddr>> {
        let sender = Key::for_node("alice");
        let address: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:9".parse().unwrap();
        let bodies = vec![
            Body::Ping,
            Body::Pong,
            Body::Goodbye,
            Body::Find { target: Key::for_service("echo"), values: true },
            Body::Found {
                contacts: vec![Contact { key: sender, address }, Contact { key: Key::ZERO, address: v6 }],
                values: vec![Value { ttl_ms: 5, record: encode_record(&record()).unwrap() }],
            },
            Body::Store { key: sender, ttl_ms: 1000, record: encode_record(&record()).unwrap() },
            Body::Stored { accepted: true },
        ];
        bodies.into_iter().enumerate().map(|(n, body)| Message { txid: n as u64, sender, body }).collect()
    }

    #[test]
    fn messages_and_records_round_trip() {
        let bytes = encode_record(&record()).unwrap();
        assert_eq!(decode_record(&bytes).unwrap(), record());
        for message in messages() {
            let bytes = message.encode();
            assert_eq!(Message::decode(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        for message in messages() {
            let bytes = message.encode();
            for cut in 0..bytes.len() {
                assert!(Message::<SocketAddr>::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert_eq!(Message::<SocketAddr>::decode(&trailing), Err(DecodeError::TrailingBytes(1)));
            // Flip every byte in turn: any result is fine as long as nothing panics.
            for index in 0..bytes.len() {
                let mut flipped = bytes.clone();
                flipped[index] ^= 0xFF;
                let _ = Message::<SocketAddr>::decode(&flipped);
            }
        }
        assert_eq!(
            Message::<u32>::decode(&[0u8; MAX_DATAGRAM + 1]),
            Err(DecodeError::TooLarge(MAX_DATAGRAM + 1))
        );
        assert_eq!(Message::<u32>::decode(&[0x00, 1, 1]), Err(DecodeError::BadMagic(0)));
        assert_eq!(Message::<u32>::decode(&[MAGIC, 9, 1]), Err(DecodeError::UnsupportedVersion(9)));
        let record = encode_record(&record()).unwrap();
        for cut in 0..record.len() {
            assert!(decode_record(&record[..cut]).is_err(), "record cut at {cut}");
        }
    }

    #[test]
    fn oversized_records_are_refused() {
        let mut big = record();
        big.metadata.push(("blob".into(), "x".repeat(MAX_RECORD)));
        assert!(encode_record(&big).is_err());
    }

    mod authenticated {
        use super::*;
        use crate::auth::{AllowList, Identity, NetworkKey, WINDOW_MS};

        const NOW: u64 = 1_700_000_000_000;

        fn identity(n: u8) -> Identity {
            Identity::from_secret_bytes(&[n; 32])
        }

        fn id(n: u8) -> String {
            identity(n).node_id(Some(&format!("n{n}"))).to_string()
        }

        fn security(n: u8, allowed: &[u8], network: Option<u8>) -> LinkSecurity {
            let keys = allowed.iter().map(|m| identity(*m).public_key()).collect();
            LinkSecurity::new(identity(n), AllowList::Keys(keys), network.map(|k| NetworkKey([k; 32])))
        }

        /// Node `n`'s record offering `echo`, signed by `signer`.
        fn provider(n: u8, signer: u8) -> Vec<u8> {
            let mut record = NodeRecord::new(NodeId::new(id(n)));
            record.services = vec!["echo".into()];
            sign_record(&security(signer, &[], None), encode_record(&record).unwrap()).unwrap()
        }

        /// A datagram from node `n` (signed with `signer`'s key, sender key of `sender`).
        fn sealed(signer: u8, n: u8, sender: u8, body: Body<u32>, unix_ms: u64) -> Vec<u8> {
            let message = Message::<u32> { txid: 5, sender: Key::for_node(&id(sender)), body };
            seal(&security(signer, &[], None), &id(n), message.encode(), unix_ms)
        }

        fn store(record: Vec<u8>) -> Body<u32> {
            Body::Store { key: Key::for_service("echo"), ttl_ms: 1000, record }
        }

        #[test]
        fn sealed_messages_with_signed_records_open_at_an_allowed_receiver() {
            let receiver = security(2, &[1, 3], None);
            for body in [
                Body::Ping,
                store(provider(1, 1)),
                Body::Found {
                    contacts: vec![Contact { key: Key::for_node(&id(3)), address: 3 }],
                    values: vec![
                        Value { ttl_ms: 9, record: provider(3, 3) },
                        Value { ttl_ms: 9, record: provider(1, 1) },
                    ],
                },
            ] {
                let bytes = sealed(1, 1, 1, body.clone(), NOW);
                assert_eq!(bytes[1], AUTH_VERSION);
                let (sender, message) = open::<u32>(&receiver, &bytes, NOW + WINDOW_MS).unwrap();
                assert_eq!((sender, message.body), (id(1).as_str(), body));
            }
            let record = decode_value(&provider(3, 3), true).unwrap();
            assert_eq!(
                (record.id.as_str(), record.services.as_slice()),
                (id(3).as_str(), &["echo".to_string()][..])
            );
        }

        #[test]
        fn forged_replayed_unknown_foreign_and_impersonating_datagrams_are_refused() {
            let receiver = security(2, &[1, 3], None);
            let auth = |error| Err::<(), _>(DecodeError::Auth(error));
            let check = |bytes: &[u8], at| open::<u32>(&receiver, bytes, at).map(|_| ());
            let ping = sealed(1, 1, 1, Body::Ping, NOW);
            for at in [3, ping.len() - 75, ping.len() - 1] {
                let mut forged = ping.clone();
                forged[at] ^= 1;
                assert!(matches!(check(&forged, NOW), Err(DecodeError::Auth(_))), "byte {at} changed");
            }
            assert_eq!(check(&ping, NOW + WINDOW_MS + 1), auth(AuthError::Stale), "replayed later");
            assert_eq!(check(&sealed(9, 9, 9, Body::Ping, NOW), NOW), auth(AuthError::NotAllowed));
            // Node 1 speaking with node 3's key in the header, or node 3's id and node 1's key.
            assert_eq!(check(&sealed(1, 1, 3, Body::Ping, NOW), NOW), auth(AuthError::WrongSender));
            assert_eq!(check(&sealed(1, 3, 3, Body::Ping, NOW), NOW), auth(AuthError::BadSignature));
            // Node 3's record (a provider of echo) signed by node 1, in a STORE or a FOUND.
            assert_eq!(
                check(&sealed(1, 1, 1, store(provider(3, 1)), NOW), NOW),
                auth(AuthError::BadSignature)
            );
            let found =
                Body::Found { contacts: vec![], values: vec![Value { ttl_ms: 9, record: provider(3, 1) }] };
            assert_eq!(check(&sealed(1, 1, 1, found, NOW), NOW), auth(AuthError::BadSignature));
            // A record of a node that is not allowed, signed by itself.
            assert_eq!(check(&sealed(1, 1, 1, store(provider(9, 9)), NOW), NOW), auth(AuthError::NotAllowed));
            // An unsigned record.
            let mut plain = NodeRecord::new(NodeId::new(id(1)));
            plain.services = vec!["echo".into()];
            assert!(check(&sealed(1, 1, 1, store(encode_record(&plain).unwrap()), NOW), NOW).is_err());
            // Another network's allowed key, and plaintext: refused both ways.
            let member = security(2, &[1], Some(7));
            let foreign = Message::<u32> { txid: 1, sender: Key::for_node(&id(1)), body: Body::Ping };
            let foreign = seal(&security(1, &[], Some(8)), &id(1), foreign.encode(), NOW);
            assert_eq!(open::<u32>(&member, &foreign, NOW).map(|_| ()), auth(AuthError::BadSignature));
            let plaintext =
                Message::<u32> { txid: 1, sender: Key::for_node(&id(1)), body: Body::Ping }.encode();
            assert_eq!(check(&plaintext, NOW), Err(DecodeError::Plaintext));
            assert_eq!(Message::<u32>::decode(&ping), Err(DecodeError::UnsupportedVersion(AUTH_VERSION)));
            for cut in 0..ping.len() {
                assert!(check(&ping[..cut], NOW).is_err(), "cut at {cut}");
            }
        }
    }
}

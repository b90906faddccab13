//! The gossip datagram: message types, their encoding and a decoder that refuses hostile input.
//!
//! ## Datagram format (version 1)
//!
//! ```text
//! [2]  magic 0xC6 0x55
//! u8   version 1
//! body       postcard-encoded `Body` (below)
//! varint     update count (at most MAX_UPDATES_PER_DATAGRAM)
//! update*    postcard-encoded `Update`s, back to back
//! ```
//!
//! [postcard](https://postcard.jamesmunns.com/wire-format) encodes integers as unsigned LEB128
//! varints, strings and byte strings as a varint length then the bytes, enums as a varint
//! variant index then the fields in order. The variants, in index order:
//!
//! ```text
//! Body:   0 Ping    { seq: u32, target: str }              answer with Ack{seq} if you are `target`
//!         1 PingReq { seq: u32, target: str, address: A }  ping `target` at `address` for me
//!         2 Ack     { seq: u32 }
//!         3 State   { respond: bool }  the updates are (part of) the sender's member table
//!                                      (a sync); respond = true asks for ours back
//!         4 Join                       the updates are the sender's Alive; answer with State
//!         5 Push                       updates to merge and gossip on (a leave)
//! Update: 0 Alive   { id: str, incarnation: u64, address: A, record: Record }
//!         1 Suspect { id: str, incarnation: u64 }
//!         2 Dead    { id: str, incarnation: u64 }
//!         3 Left    { id: str, incarnation: u64 }
//! Record: addresses: [(str, str)], services: [str], topics: [str], metadata: [(str, str)],
//!         extensions: [(str, bytes)]
//! A (SocketAddr, serde's compact form): varint 0 then IPv4 [4] then varint port, or 1 then
//!   IPv6 [16] then varint port
//! ```
//!
//! [`decode`] returns an error, never panics, for anything that is not exactly this: a wrong
//! magic or version, a truncated field, trailing bytes, more than [`MAX_UPDATES_PER_DATAGRAM`]
//! updates, an incarnation above [`MAX_INCARNATION`]. It allocates at most about the datagram's
//! size. A record is decoded ([`RecordBytes::to_record`], refusing anything but exactly one
//! record) only when its update is news to the member table. Whether an update's id and record are acceptable is the member table's decision
//! (`membership.rs`).
//!
//! ## Authenticated datagrams (version 2)
//!
//! Members whose node runs with `security.links = "noise"` speak version 2: the same datagram
//! with version byte `2`, in which every `Alive`'s record byte string is the record followed by
//! a signature, and a trailer after the last update:
//!
//! ```text
//! [2]  magic 0xC6 0x55
//! u8   version 2
//! body, count, updates    as in version 1; in an Alive, record = Record bytes, then [64] the
//!                         signature by the member the Alive is about of the Alive update
//!                         carrying the Record bytes alone (ALIVE_CONTEXT)
//! [n]  sender's node id (bound to its public key: `<label>-<64 hex digits>`)
//! u8   n
//! u64  sender's clock, milliseconds since the Unix epoch, big-endian
//! [64] Ed25519 signature of everything above (DATAGRAM_CONTEXT)
//! ```
//!
//! A signature covers a context string ([`DATAGRAM_CONTEXT`] or [`ALIVE_CONTEXT`], naming the
//! protocol and version), then `0`, or `1` and the network key (`security.network_key_file`),
//! then the bytes (see [`crate::auth`]). [`open`] refuses a datagram, before decoding anything,
//! unless the sender's id is bound to a key on the allow list, the signature verifies and the
//! time is within 5 minutes of the receiver's clock; [`verify_alive`] refuses an `Alive` not
//! signed by its own member. 73 bytes plus the sender's id per datagram, 64 per `Alive`.

use crate::auth::{self, AuthError, LinkSecurity, SIGNATURE};
use comms_plugin_api::{NodeId, NodeRecord};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::{fmt, hash::Hash};

/// First bytes of every datagram.
pub const MAGIC: [u8; 2] = [0xC6, 0x55];
/// The format version this crate writes and reads (plaintext).
pub const VERSION: u8 = 1;
/// The version of authenticated datagrams: a version-1 datagram whose `Alive` records carry
/// their owner's signature, followed by the sender's authentication trailer (see
/// [Authenticated datagrams](self#authenticated-datagrams-version-2)).
pub const AUTH_VERSION: u8 = 2;
/// What the signature of a datagram's trailer covers first (then the network key marker).
pub const DATAGRAM_CONTEXT: &[u8] = b"comms-gossip/2 datagram";
/// What the owner's signature of an `Alive` covers first (then the network key marker).
pub const ALIVE_CONTEXT: &[u8] = b"comms-gossip/2 alive";
/// Magic and version.
pub const HEADER: usize = 3;
/// The smallest `max_datagram` accepted: room for a ping and a modest record.
pub const MIN_DATAGRAM: usize = 512;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// Updates one datagram may carry.
pub const MAX_UPDATES_PER_DATAGRAM: usize = 1024;
/// The largest incarnation number accepted (2^48): far above what refutations and record
/// changes reach, and it leaves a node room to refute a forged one.
pub const MAX_INCARNATION: u64 = 1 << 48;
/// Bytes an update count can take (a varint up to [`MAX_UPDATES_PER_DATAGRAM`]).
pub(crate) const COUNT_BYTES: usize = 2;

/// What a gossip address must be: a socket address in the plugin, an integer in simulations.
pub trait Address:
    Copy + Eq + Hash + Ord + fmt::Debug + Serialize + DeserializeOwned + Send + 'static
{
}

impl<T: Copy + Eq + Hash + Ord + fmt::Debug + Serialize + DeserializeOwned + Send + 'static> Address for T {}

/// What a datagram is for; the piggybacked updates follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<A> {
    /// A probe: the node named `target` answers with [`Body::Ack`] carrying `seq`. Naming the
    /// target keeps another node that took over its address from answering for it.
    Ping {
        /// Echoed in the ack.
        seq: u32,
        /// The id of the node probed.
        target: String,
    },
    /// An indirect probe: ping `target` at `address` and forward its ack to me.
    PingReq {
        /// Echoed in the forwarded ack.
        seq: u32,
        /// The id of the node probed.
        target: String,
        /// Its gossip address.
        address: A,
    },
    /// The answer to a ping (direct or forwarded).
    Ack {
        /// The ping's `seq`.
        seq: u32,
    },
    /// (Part of) the sender's member table, in a periodic sync: merged, not gossiped on (it is
    /// not news; gossip carries news).
    State {
        /// Whether the sender asks for the receiver's member table in return.
        respond: bool,
    },
    /// A newcomer's `Alive` (the updates): merged and gossiped on; the receiver answers with its
    /// member table (`State`).
    Join,
    /// News to merge and gossip on, with no answer expected (a graceful leave).
    Push,
}

/// A node's record without its id, as carried in [`Update::Alive`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    /// `(transport, address)` pairs.
    pub addresses: Vec<(String, String)>,
    /// Services served.
    pub services: Vec<String>,
    /// Topic patterns subscribed.
    pub topics: Vec<String>,
    /// Free-form metadata.
    pub metadata: Vec<(String, String)>,
    /// Contract extensions, stored and returned unchanged.
    pub extensions: Vec<(String, Vec<u8>)>,
}

impl WireRecord {
    /// The wire form of `record` (its id travels beside it).
    pub fn from_record(record: &NodeRecord) -> Self {
        Self {
            addresses: record.addresses.clone(),
            services: record.services.clone(),
            topics: record.topics.clone(),
            metadata: record.metadata.clone(),
            extensions: record
                .extensions
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_vec()))
                .collect(),
        }
    }

    /// The record of node `id`.
    pub fn into_record(self, id: &str) -> NodeRecord {
        let mut record = NodeRecord::new(NodeId::new(id));
        record.addresses = self.addresses;
        record.services = self.services;
        record.topics = self.topics;
        record.metadata = self.metadata;
        for (key, value) in self.extensions {
            record.extensions.set(key, value);
        }
        record
    }
}

/// A record as carried in [`Update::Alive`]: a postcard-encoded [`WireRecord`] in a byte
/// string. Decoded only when the update is news, so the many stale copies gossip delivers cost
/// one copy of bytes, not a record's worth of allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordBytes(pub Vec<u8>);

impl RecordBytes {
    /// Encodes `record` (its id travels beside it).
    pub fn from_record(record: &NodeRecord) -> Self {
        Self(postcard::to_stdvec(&WireRecord::from_record(record)).unwrap_or_default())
    }

    /// The record of node `id`, or an error if the bytes are not exactly one record.
    pub fn to_record(&self, id: &str) -> Result<NodeRecord, DecodeError> {
        match postcard::take_from_bytes::<WireRecord>(&self.0) {
            Ok((record, [])) => Ok(record.into_record(id)),
            Ok((_, rest)) => Err(DecodeError::TrailingBytes(rest.len())),
            Err(_) => Err(DecodeError::Malformed("record")),
        }
    }
}

impl Serialize for RecordBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for RecordBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> serde::de::Visitor<'de> for BytesVisitor {
            type Value = RecordBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<RecordBytes, E> {
                Ok(RecordBytes(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<RecordBytes, E> {
                Ok(RecordBytes(bytes))
            }
        }
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// A change in membership, piggybacked on probes and carried by state transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update<A> {
    /// The node is alive at this incarnation, with this address and record.
    Alive {
        /// Node id.
        id: String,
        /// Raised by the node itself to refute a suspicion or to publish a new record.
        incarnation: u64,
        /// Its gossip address.
        address: A,
        /// Its record.
        record: RecordBytes,
    },
    /// Someone failed to reach the node at this incarnation.
    Suspect {
        /// Node id.
        id: String,
        /// The incarnation suspected.
        incarnation: u64,
    },
    /// The node stayed suspect for the suspicion timeout.
    Dead {
        /// Node id.
        id: String,
        /// The incarnation declared dead.
        incarnation: u64,
    },
    /// The node left gracefully.
    Left {
        /// Node id.
        id: String,
        /// The incarnation it left at.
        incarnation: u64,
    },
}

impl<A> Update<A> {
    /// The node the update is about.
    pub fn id(&self) -> &str {
        match self {
            Update::Alive { id, .. }
            | Update::Suspect { id, .. }
            | Update::Dead { id, .. }
            | Update::Left { id, .. } => id,
        }
    }

    /// Its incarnation.
    pub fn incarnation(&self) -> u64 {
        match self {
            Update::Alive { incarnation, .. }
            | Update::Suspect { incarnation, .. }
            | Update::Dead { incarnation, .. }
            | Update::Left { incarnation, .. } => *incarnation,
        }
    }
}

/// A decoded datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<A> {
    /// What it is for.
    pub body: Body<A>,
    /// Piggybacked updates.
    pub updates: Vec<Update<A>>,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header, or not our magic.
    NotGossip,
    /// Our magic, another version.
    Version(u8),
    /// A field does not parse (truncated, bad variant, bad UTF-8).
    Malformed(&'static str),
    /// More updates than [`MAX_UPDATES_PER_DATAGRAM`].
    TooManyUpdates(u64),
    /// An incarnation above [`MAX_INCARNATION`].
    Incarnation(u64),
    /// Bytes after the last update.
    TrailingBytes(usize),
    /// A plaintext datagram at a member that requires authenticated ones.
    Plaintext,
    /// An authenticated datagram (or an `Alive` in one) that fails authentication.
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
            DecodeError::NotGossip => write!(f, "not a gossip datagram (bad magic)"),
            DecodeError::Version(AUTH_VERSION) => write!(
                f,
                "an authenticated gossip datagram (version {AUTH_VERSION}); this member runs plaintext gossip \
                 (security.links = \"plain\")"
            ),
            DecodeError::Version(version) => {
                write!(f, "gossip format version {version}; this node speaks {VERSION}")
            }
            DecodeError::Plaintext => write!(
                f,
                "a plaintext gossip datagram; this member requires authenticated ones (security.links = \"noise\")"
            ),
            DecodeError::Auth(error) => write!(f, "unauthenticated: {error}"),
            DecodeError::Malformed(what) => write!(f, "malformed {what}"),
            DecodeError::TooManyUpdates(count) => {
                write!(f, "{count} updates in one datagram; at most {MAX_UPDATES_PER_DATAGRAM}")
            }
            DecodeError::Incarnation(incarnation) => {
                write!(f, "incarnation {incarnation} is above the limit {MAX_INCARNATION}")
            }
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after the last update"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Encodes one update (to piggyback or to pack into a state transfer).
pub fn encode_update<A: Address>(update: &Update<A>) -> Vec<u8> {
    // Serializing plain structs into a Vec cannot fail: no map keys, no unsupported types.
    postcard::to_stdvec(update).unwrap_or_default()
}

/// The header and encoded body of a datagram; append the count and updates with
/// [`finish_datagram`].
pub fn start_datagram<A: Address>(body: &Body<A>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    // As in `encode_update`: cannot fail.
    if let Ok(encoded) = postcard::to_stdvec(body) {
        out.extend_from_slice(&encoded);
    }
    out
}

/// Appends the update count and the updates (already encoded) to a started datagram.
pub fn finish_datagram(mut out: Vec<u8>, updates: &[&[u8]]) -> Vec<u8> {
    let mut count = updates.len().min(MAX_UPDATES_PER_DATAGRAM) as u32;
    // LEB128, as postcard writes a u32.
    loop {
        let byte = (count & 0x7f) as u8;
        count >>= 7;
        if count == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    for update in updates.iter().take(MAX_UPDATES_PER_DATAGRAM) {
        out.extend_from_slice(update);
    }
    out
}

/// A whole datagram.
pub fn encode<A: Address>(message: &Message<A>) -> Vec<u8> {
    let updates: Vec<Vec<u8>> = message.updates.iter().map(encode_update).collect();
    let slices: Vec<&[u8]> = updates.iter().map(Vec::as_slice).collect();
    finish_datagram(start_datagram(&message.body), &slices)
}

/// Decodes a datagram; see the [module documentation](self) for what is refused.
pub fn decode<A: Address>(bytes: &[u8]) -> Result<Message<A>, DecodeError> {
    decode_version(bytes, VERSION)
}

fn decode_version<A: Address>(bytes: &[u8], version: u8) -> Result<Message<A>, DecodeError> {
    if bytes.len() < HEADER || bytes[..2] != MAGIC {
        return Err(DecodeError::NotGossip);
    }
    if bytes[2] != version {
        return Err(DecodeError::Version(bytes[2]));
    }
    let (body, rest) =
        postcard::take_from_bytes::<Body<A>>(&bytes[HEADER..]).map_err(|_| DecodeError::Malformed("body"))?;
    let (count, mut rest) =
        postcard::take_from_bytes::<u64>(rest).map_err(|_| DecodeError::Malformed("update count"))?;
    if count > MAX_UPDATES_PER_DATAGRAM as u64 {
        return Err(DecodeError::TooManyUpdates(count));
    }
    // Each update takes at least 3 bytes: no preallocation beyond what the datagram can hold.
    let mut updates = Vec::with_capacity((count as usize).min(rest.len() / 3));
    for _ in 0..count {
        let (update, after) =
            postcard::take_from_bytes::<Update<A>>(rest).map_err(|_| DecodeError::Malformed("update"))?;
        if update.incarnation() > MAX_INCARNATION {
            return Err(DecodeError::Incarnation(update.incarnation()));
        }
        updates.push(update);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(Message { body, updates })
}

/// Seals a datagram (built by [`start_datagram`] and [`finish_datagram`]) as sent by member
/// `id` at `unix_ms`: sets its version to [`AUTH_VERSION`] and appends the authentication
/// trailer.
pub fn seal(security: &LinkSecurity, id: &str, mut datagram: Vec<u8>, unix_ms: u64) -> Vec<u8> {
    if let Some(version) = datagram.get_mut(2) {
        *version = AUTH_VERSION;
    }
    auth::seal(security, DATAGRAM_CONTEXT, id, datagram, unix_ms)
}

/// Checks and decodes an authenticated datagram at `unix_ms`: the trailer first (signature,
/// allowed key, time window; nothing is decoded before it passes), then the datagram as
/// [`decode`] does. Returns the sender's id and the message. `Alive` updates are checked later,
/// by [`verify_alive`], and only when they are news.
pub fn open<'a, A: Address>(
    security: &LinkSecurity,
    bytes: &'a [u8],
    unix_ms: u64,
) -> Result<(&'a str, Message<A>), DecodeError> {
    if bytes.len() < HEADER || bytes[..2] != MAGIC {
        return Err(DecodeError::NotGossip);
    }
    match bytes[2] {
        AUTH_VERSION => {}
        VERSION => return Err(DecodeError::Plaintext),
        other => return Err(DecodeError::Version(other)),
    }
    let (sender, payload) =
        auth::open(security, DATAGRAM_CONTEXT, bytes, unix_ms).map_err(DecodeError::Auth)?;
    Ok((sender, decode_version(payload, AUTH_VERSION)?))
}

/// The record of an `Alive` signed by its owner: `record` followed by the owner's signature of
/// the `Alive` update carrying `record` alone (id, incarnation, address and record).
pub fn sign_alive<A: Address>(
    security: &LinkSecurity,
    id: &str,
    incarnation: u64,
    address: A,
    record: &RecordBytes,
) -> RecordBytes {
    let unsigned =
        encode_update(&Update::Alive { id: id.to_string(), incarnation, address, record: record.clone() });
    let mut signed = record.0.clone();
    signed.extend_from_slice(&auth::sign(security, ALIVE_CONTEXT, &unsigned));
    RecordBytes(signed)
}

/// Checks the owner's signature of an `Alive` from an authenticated datagram (the member it is
/// about must have signed it, with an allowed key bound to its id); returns its record without
/// the signature. Any other update is refused.
pub fn verify_alive<A: Address>(
    security: &LinkSecurity,
    update: &Update<A>,
) -> Result<RecordBytes, DecodeError> {
    let Update::Alive { id, incarnation, address, record } = update else {
        return Err(DecodeError::Malformed("update: not an Alive"));
    };
    let split = record.0.len().checked_sub(SIGNATURE).ok_or(DecodeError::Auth(AuthError::Malformed))?;
    let (bytes, signature) = record.0.split_at(split);
    let unsigned = RecordBytes(bytes.to_vec());
    let content = encode_update(&Update::Alive {
        id: id.clone(),
        incarnation: *incarnation,
        address: *address,
        record: unsigned.clone(),
    });
    auth::verify(security, ALIVE_CONTEXT, id, &content, signature).map_err(DecodeError::Auth)?;
    Ok(unsigned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::net::SocketAddr;

    fn sample() -> Message<SocketAddr> {
        let mut record = NodeRecord::new("alice");
        record.addresses = vec![("tcp".into(), "127.0.0.1:4000".into())];
        record.services = vec!["math.add".into()];
        record.topics = vec!["orders.>".into()];
        record.metadata = vec![("zone".into(), "eu".into())];
        record.extensions.set("future", vec![1, 2, 3]);
        Message {
            body: Body::PingReq { seq: 7, target: "bob".into(), address: "10.0.0.2:7946".parse().unwrap() },
            updates: vec![
                Update::Alive {
                    id: "alice".into(),
                    incarnation: 3,
                    address: "[::1]:7946".parse().unwrap(),
                    record: RecordBytes::from_record(&record),
                },
                Update::Suspect { id: "bob".into(), incarnation: 1 },
                Update::Dead { id: "carol".into(), incarnation: 9 },
                Update::Left { id: "dave".into(), incarnation: 0 },
            ],
        }
    }

    #[test]
    fn messages_round_trip_and_records_keep_every_field() {
        let message = sample();
        let bytes = encode(&message);
        assert_eq!(&bytes[..3], &[0xC6, 0x55, 1]);
        assert_eq!(decode::<SocketAddr>(&bytes), Ok(message.clone()));
        let Update::Alive { record: bytes, .. } = &message.updates[0] else { panic!() };
        let back = bytes.to_record("alice").unwrap();
        assert_eq!(RecordBytes::from_record(&back), *bytes);
        assert_eq!(back.services, ["math.add"]);
        assert_eq!(back.extensions.get("future"), Some(&[1u8, 2, 3][..]));
        let mut trailing = bytes.clone();
        trailing.0.push(0);
        assert!(trailing.to_record("alice").is_err());
        assert!(RecordBytes(vec![5, 0xff]).to_record("alice").is_err());
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let bytes = encode(&sample());
        for cut in 0..bytes.len() {
            assert!(decode::<SocketAddr>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode::<SocketAddr>(&trailing), Err(DecodeError::TrailingBytes(1)));
        let mut version = bytes;
        version[2] = 2;
        assert_eq!(decode::<SocketAddr>(&version), Err(DecodeError::Version(2)));
    }

    #[test]
    fn hostile_counts_and_incarnations_are_refused() {
        let mut many = start_datagram::<u32>(&Body::Ack { seq: 1 });
        many.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // count u32::MAX
        assert_eq!(decode::<u32>(&many), Err(DecodeError::TooManyUpdates(u32::MAX as u64)));
        let forged = Message::<u32> {
            body: Body::Ack { seq: 1 },
            updates: vec![Update::Suspect { id: "x".into(), incarnation: u64::MAX }],
        };
        assert_eq!(decode::<u32>(&encode(&forged)), Err(DecodeError::Incarnation(u64::MAX)));
        // A string claiming 4 GiB: refused without allocating it.
        let mut long = start_datagram::<u32>(&Body::Ack { seq: 1 });
        long.extend_from_slice(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a']);
        assert!(decode::<u32>(&long).is_err());
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(7);
        let valid = encode(&sample());
        for round in 0..20_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let mut bytes = valid.clone();
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = rng.gen();
                }
                bytes
            } else {
                let mut bytes = vec![0xC6, 0x55, 1];
                bytes.extend((0..rng.gen_range(0..200)).map(|_| rng.gen::<u8>()));
                bytes
            };
            let _ = decode::<SocketAddr>(&bytes);
            let _ = decode::<u32>(&bytes);
        }
    }

    mod authenticated {
        use super::*;
        use crate::auth::{AllowList, Identity, NetworkKey, WINDOW_MS};

        const NOW: u64 = 1_700_000_000_000;

        fn identity(n: u8) -> Identity {
            Identity::from_secret_bytes(&[n; 32])
        }

        /// Node `n`'s security, allowing nodes `allowed`.
        fn security(n: u8, allowed: &[u8], network: Option<u8>) -> LinkSecurity {
            let keys = allowed.iter().map(|m| identity(*m).public_key()).collect();
            LinkSecurity::new(identity(n), AllowList::Keys(keys), network.map(|k| NetworkKey([k; 32])))
        }

        fn id(n: u8) -> String {
            identity(n).node_id(Some(&format!("n{n}"))).to_string()
        }

        fn ping() -> Vec<u8> {
            finish_datagram(start_datagram::<u32>(&Body::Ping { seq: 7, target: id(2) }), &[])
        }

        #[test]
        fn a_sealed_datagram_opens_at_an_allowed_receiver_and_names_its_sender() {
            let sealed = seal(&security(1, &[], None), &id(1), ping(), NOW);
            assert_eq!(sealed[2], AUTH_VERSION);
            let (sender, message) = open::<u32>(&security(2, &[1], None), &sealed, NOW + 1000).unwrap();
            assert_eq!(sender, id(1));
            assert_eq!(message.body, Body::Ping { seq: 7, target: id(2) });
            // Within the window either way (clocks differ).
            assert!(open::<u32>(&security(2, &[1], None), &sealed, NOW - WINDOW_MS).is_ok());
        }

        #[test]
        fn forged_replayed_unknown_and_foreign_network_datagrams_are_refused() {
            let receiver = security(2, &[1], None);
            let sealed = seal(&security(1, &[], None), &id(1), ping(), NOW);
            // Forged: any byte changed (the body, the sender id, the time, the signature).
            for at in [4, sealed.len() - 80, sealed.len() - 70, sealed.len() - 1] {
                let mut forged = sealed.clone();
                forged[at] ^= 1;
                assert!(
                    matches!(open::<u32>(&receiver, &forged, NOW), Err(DecodeError::Auth(_))),
                    "byte {at} changed"
                );
            }
            // Signed by node 3 while claiming node 1's id.
            let claimed = seal(&security(3, &[], None), &id(1), ping(), NOW);
            assert_eq!(
                open::<u32>(&security(2, &[1, 3], None), &claimed, NOW).unwrap_err(),
                DecodeError::Auth(AuthError::BadSignature)
            );
            // Replayed: the same datagram more than 5 minutes later (or from the future).
            assert_eq!(
                open::<u32>(&receiver, &sealed, NOW + WINDOW_MS + 1).unwrap_err(),
                DecodeError::Auth(AuthError::Stale)
            );
            assert_eq!(
                open::<u32>(&receiver, &sealed, NOW - WINDOW_MS - 1).unwrap_err(),
                DecodeError::Auth(AuthError::Stale)
            );
            // A key that is not on the allow list, and an id bound to no key.
            let stranger = seal(&security(9, &[], None), &id(9), ping(), NOW);
            assert_eq!(
                open::<u32>(&receiver, &stranger, NOW).unwrap_err(),
                DecodeError::Auth(AuthError::NotAllowed)
            );
            let unbound = seal(&security(1, &[], None), "plain-id", ping(), NOW);
            assert_eq!(
                open::<u32>(&receiver, &unbound, NOW).unwrap_err(),
                DecodeError::Auth(AuthError::Unbound)
            );
            // An allowed key of another network (or without the network key).
            let member = security(2, &[1], Some(5));
            let foreign = seal(&security(1, &[], Some(6)), &id(1), ping(), NOW);
            assert_eq!(
                open::<u32>(&member, &foreign, NOW).unwrap_err(),
                DecodeError::Auth(AuthError::BadSignature)
            );
            assert!(open::<u32>(&member, &sealed, NOW).is_err(), "no network key");
            let ours = seal(&security(1, &[], Some(5)), &id(1), ping(), NOW);
            assert!(open::<u32>(&member, &ours, NOW).is_ok());
            // Plaintext and authenticated members do not mix.
            assert_eq!(open::<u32>(&receiver, &ping(), NOW).unwrap_err(), DecodeError::Plaintext);
            assert_eq!(decode::<u32>(&sealed).unwrap_err(), DecodeError::Version(AUTH_VERSION));
            // Truncated anywhere: refused, never a panic.
            for cut in 0..sealed.len() {
                assert!(open::<u32>(&receiver, &sealed[..cut], NOW).is_err(), "cut at {cut}");
            }
        }

        #[test]
        fn an_alive_must_be_signed_by_the_member_it_is_about() {
            let receiver = security(3, &[1, 2], None);
            let mut record = NodeRecord::new(id(1).as_str());
            record.services = vec!["billing".into()];
            let wire = RecordBytes::from_record(&record);
            let alive = |record: RecordBytes, incarnation| Update::Alive {
                id: id(1),
                incarnation,
                address: 11u32,
                record,
            };
            // Valid: signed by node 1, about node 1.
            let signed = sign_alive(&security(1, &[], None), &id(1), 4, 11u32, &wire);
            assert_eq!(verify_alive(&receiver, &alive(signed.clone(), 4)), Ok(wire.clone()));
            // Node 1's record signed by node 2 (an allowed member relaying a forgery).
            let forged = sign_alive(&security(2, &[], None), &id(1), 4, 11u32, &wire);
            assert_eq!(
                verify_alive(&receiver, &alive(forged, 4)),
                Err(DecodeError::Auth(AuthError::BadSignature))
            );
            // Node 1's signature, with the incarnation, address or record changed.
            assert!(verify_alive(&receiver, &alive(signed.clone(), 5)).is_err());
            let moved = Update::Alive { id: id(1), incarnation: 4, address: 12u32, record: signed.clone() };
            assert!(verify_alive(&receiver, &moved).is_err());
            let mut altered = signed.clone();
            altered.0[0] ^= 1;
            assert!(verify_alive(&receiver, &alive(altered, 4)).is_err());
            // Unsigned, or by a key the receiver does not allow.
            assert!(verify_alive(&receiver, &alive(wire.clone(), 4)).is_err());
            assert_eq!(
                verify_alive(&security(3, &[2], None), &alive(signed, 4)),
                Err(DecodeError::Auth(AuthError::NotAllowed))
            );
        }
    }
}

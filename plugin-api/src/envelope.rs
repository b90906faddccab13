//! Idiomatic message types, and their conversion to and from the boundary's types.
//!
//! Every type here wraps the boundary's own buffers ([`Text`], [`Headers`], [`Payload`],
//! [`Extensions`]), so that handing an envelope to the host, or taking one from it, moves
//! buffers and copies nothing.

use crate::{text::Text, PluginError};
pub use comms_core::MessageId;
use comms_core::{
    abi_stable::std_types::{RArc, ROption, RVec},
    ErrorCode, Extension, Header,
};
use std::{fmt, ops::Range};

/// The stable identity of a node.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeId(Text);

impl NodeId {
    /// A node id from any text.
    pub fn new(id: impl Into<Text>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The id as [`Text`].
    pub fn as_text(&self) -> &Text {
        &self.0
    }

    pub(crate) fn into_abi(self) -> comms_core::NodeId {
        comms_core::NodeId(self.0.into_abi())
    }

    pub(crate) fn from_abi(id: comms_core::NodeId) -> Self {
        Self(Text::from_abi(id.0))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:?})", self.as_str())
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        Self::new(id)
    }
}

impl From<Text> for NodeId {
    fn from(id: Text) -> Self {
        Self(id)
    }
}

impl From<&NodeId> for NodeId {
    fn from(id: &NodeId) -> Self {
        id.clone()
    }
}

impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Where an envelope is going.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One node.
    Node(NodeId),
    /// Every subscriber of a topic.
    Topic(Text),
    /// One replica of a service.
    Service(Text),
}

impl Destination {
    /// A topic destination.
    pub fn topic(name: impl Into<Text>) -> Self {
        Self::Topic(name.into())
    }

    /// A service destination.
    pub fn service(name: impl Into<Text>) -> Self {
        Self::Service(name.into())
    }

    /// A node destination.
    pub fn node(id: impl Into<NodeId>) -> Self {
        Self::Node(id.into())
    }

    /// The wire code of the destination kind (see [`comms_core::Destination`]).
    pub fn kind_code(&self) -> u8 {
        match self {
            Self::Node(_) => comms_core::Destination::NODE,
            Self::Topic(_) => comms_core::Destination::TOPIC,
            Self::Service(_) => comms_core::Destination::SERVICE,
        }
    }

    /// The node id, topic or service name.
    pub fn name(&self) -> &str {
        match self {
            Self::Node(id) => id.as_str(),
            Self::Topic(name) | Self::Service(name) => name,
        }
    }

    /// Builds a destination from its wire code and name; `None` for an unknown code.
    pub fn from_parts(kind: u8, name: impl Into<Text>) -> Option<Self> {
        let name = name.into();
        match kind {
            comms_core::Destination::NODE => Some(Self::Node(NodeId(name))),
            comms_core::Destination::TOPIC => Some(Self::Topic(name)),
            comms_core::Destination::SERVICE => Some(Self::Service(name)),
            _ => None,
        }
    }

    fn into_abi(self) -> comms_core::Destination {
        let kind = self.kind_code();
        let name = match self {
            Self::Node(id) => id.0,
            Self::Topic(name) | Self::Service(name) => name,
        };
        comms_core::Destination { kind, name: name.into_abi() }
    }
}

/// Message bytes: a range of a shared, reference-counted buffer.
///
/// Cloning shares the buffer; crossing the plugin boundary moves it. Read it with
/// [`Payload::as_slice`] or through `Deref<Target = [u8]>`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Payload(comms_core::Payload);

impl Payload {
    /// Takes `bytes` without copying them.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self(comms_core::Payload::from_vec(bytes))
    }

    /// A copy of `bytes`.
    pub fn copy_from_slice(bytes: &[u8]) -> Self {
        Self::from_vec(bytes.to_vec())
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_slice().to_vec()
    }

    /// `range` of these bytes, sharing the buffer; `None` when the range is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Option<Payload> {
        let (buffer, start, end) = self.0.shared_parts();
        if range.start > range.end || range.end > end - start {
            return None;
        }
        comms_core::Payload::from_shared(buffer.clone(), start + range.start, start + range.end).map(Self)
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self::from_vec(bytes)
    }
}

impl From<&[u8]> for Payload {
    /// Copies the bytes.
    fn from(bytes: &[u8]) -> Self {
        Self::copy_from_slice(bytes)
    }
}

impl<const N: usize> From<&[u8; N]> for Payload {
    /// Copies the bytes.
    fn from(bytes: &[u8; N]) -> Self {
        Self::copy_from_slice(bytes)
    }
}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_slice() == other
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

/// A buffer that many payloads share, for a transport that reads several messages into one
/// buffer and hands each out without copying it: fill a `Vec<u8>`, turn it into a
/// `SharedBuffer`, then take each message's bytes with [`SharedBuffer::payload`].
#[derive(Clone)]
pub struct SharedBuffer(RArc<RVec<u8>>);

impl SharedBuffer {
    /// The bytes of the buffer.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// `range` of the buffer as a payload; `None` when it is out of bounds.
    pub fn payload(&self, range: Range<usize>) -> Option<Payload> {
        comms_core::Payload::from_shared(self.0.clone(), range.start, range.end).map(Payload)
    }

    /// The bytes, when nothing else holds the buffer any more (no payload, no clone): for
    /// reading into again. Without copying when the buffer was made in this library.
    pub(crate) fn reclaim(mut self) -> Option<Vec<u8>> {
        RArc::get_mut(&mut self.0).map(|bytes| std::mem::take(bytes).into_vec())
    }
}

impl From<Vec<u8>> for SharedBuffer {
    fn from(bytes: Vec<u8>) -> Self {
        Self(RArc::new(RVec::from(bytes)))
    }
}

impl fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBuffer({} bytes)", self.0.len())
    }
}

/// An envelope's headers: `(name, value)` text pairs, in order; a name may repeat.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(RVec<Header>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// No headers yet, with room for `count` pairs (a decoder that knows how many come).
    pub fn with_capacity(count: usize) -> Self {
        Self(RVec::with_capacity(count))
    }

    /// How many pairs there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of the first header called `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, value)| value)
    }

    /// Appends a pair.
    pub fn push(&mut self, name: impl Into<Text>, value: impl Into<Text>) {
        self.0.push(Header { name: name.into().into_abi(), value: value.into().into_abi() });
    }

    /// Replaces every header called `name` with one pair `(name, value)`, at the end.
    pub fn set(&mut self, name: impl Into<Text>, value: impl Into<Text>) {
        let name = name.into();
        self.remove(&name);
        self.push(name, value);
    }

    /// Removes every header called `name`; returns how many there were.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.0.len();
        self.0.retain(|header| header.name.as_str() != name);
        before - self.0.len()
    }

    /// Keeps the pairs for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|header| keep(header.name.as_str(), header.value.as_str()));
    }

    /// The pairs, in order.
    pub fn iter(&self) -> HeaderPairs<'_> {
        self.0.iter().map(header_pair as fn(&Header) -> (&str, &str))
    }

    /// The pairs as owned strings (a copy).
    pub fn to_vec(&self) -> Vec<(String, String)> {
        self.iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect()
    }
}

impl<N: Into<Text>, V: Into<Text>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Self {
        let mut headers = Headers::new();
        headers.extend(pairs);
        headers
    }
}

impl<N: Into<Text>, V: Into<Text>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, pairs: I) {
        for (name, value) in pairs {
            self.push(name, value);
        }
    }
}

/// Iterates over the `(name, value)` pairs of [`Headers`], in order.
pub type HeaderPairs<'a> = std::iter::Map<std::slice::Iter<'a, Header>, fn(&'a Header) -> (&'a str, &'a str)>;

fn header_pair(header: &Header) -> (&str, &str) {
    (header.name.as_str(), header.value.as_str())
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = HeaderPairs<'a>;
    fn into_iter(self) -> HeaderPairs<'a> {
        self.iter()
    }
}

impl From<Vec<(String, String)>> for Headers {
    fn from(pairs: Vec<(String, String)>) -> Self {
        pairs.into_iter().collect()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// An extension area: `(key, bytes)` attributes that later minor versions of the contract
/// define (see `comms_core::Extension`); in order, a key at most once.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Extensions(RVec<Extension>);

impl Extensions {
    /// No extensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().find(|e| e.key.as_str() == key).map(|e| e.value.as_slice())
    }

    /// Sets `key` to `value`, replacing an earlier value in place.
    pub fn set(&mut self, key: impl Into<Text>, value: impl Into<Vec<u8>>) {
        let key = key.into();
        let value = RVec::from(value.into());
        match self.0.iter_mut().find(|e| e.key.as_str() == key.as_str()) {
            Some(existing) => existing.value = value,
            None => self.0.push(Extension { key: key.into_abi(), value }),
        }
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|e| e.key.as_str() != key);
        before != self.0.len()
    }

    /// The attributes, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + '_ {
        self.0.iter().map(|e| (e.key.as_str(), e.value.as_slice()))
    }

    pub(crate) fn into_abi(self) -> RVec<Extension> {
        self.0
    }

    pub(crate) fn from_abi(extensions: RVec<Extension>) -> Self {
        Self(extensions)
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter().map(|(key, value)| (key, value.len()))).finish()
    }
}

/// A message with its addressing.
///
/// Build one with [`Envelope::new`] and the `with_*` methods; the fields are public to read and
/// change. (The struct is `#[non_exhaustive]` so that the contract can grow without breaking
/// plugin source.)
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// Unique id; kept when a message is delivered again.
    pub id: MessageId,
    /// Sender.
    pub from: NodeId,
    /// Destination.
    pub to: Destination,
    /// For a response, the id of the request it answers.
    pub correlation_id: Option<MessageId>,
    /// Headers in order; names starting with `comms-` are reserved for the framework.
    pub headers: Headers,
    /// Encoded message.
    pub payload: Payload,
    /// Attributes of later contract versions; a transport carries them with the envelope.
    pub extensions: Extensions,
}

impl Envelope {
    /// An envelope without correlation id, headers or extensions.
    pub fn new(id: MessageId, from: impl Into<NodeId>, to: Destination, payload: impl Into<Payload>) -> Self {
        Self {
            id,
            from: from.into(),
            to,
            correlation_id: None,
            headers: Headers::new(),
            payload: payload.into(),
            extensions: Extensions::new(),
        }
    }

    /// With the id of the request this answers.
    pub fn with_correlation_id(mut self, id: Option<MessageId>) -> Self {
        self.correlation_id = id;
        self
    }

    /// With `headers` instead of the current ones.
    pub fn with_headers(mut self, headers: impl Into<Headers>) -> Self {
        self.headers = headers.into();
        self
    }

    /// With one more header.
    pub fn with_header(mut self, name: impl Into<Text>, value: impl Into<Text>) -> Self {
        self.headers.push(name, value);
        self
    }

    /// With `extensions` instead of the current ones.
    pub fn with_extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
        self
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// To the boundary type: moves every buffer, copies nothing.
    pub(crate) fn into_abi(self) -> comms_core::Envelope {
        comms_core::Envelope {
            id: self.id,
            from: self.from.into_abi(),
            to: self.to.into_abi(),
            correlation_id: self.correlation_id.into(),
            headers: self.headers.0,
            payload: self.payload.0,
            extensions: self.extensions.0,
        }
    }

    /// From the boundary type: moves every buffer. Fails only for a destination kind this
    /// version does not know.
    pub(crate) fn from_abi(envelope: comms_core::Envelope) -> Result<Self, PluginError> {
        let kind = envelope.to.kind;
        let to = Destination::from_parts(kind, Text::from_abi(envelope.to.name)).ok_or_else(|| {
            PluginError::new(ErrorCode::MALFORMED, format!("unknown destination kind {kind}"))
        })?;
        Ok(Self {
            id: envelope.id,
            from: NodeId::from_abi(envelope.from),
            to,
            correlation_id: match envelope.correlation_id {
                ROption::RSome(id) => Some(id),
                ROption::RNone => None,
            },
            headers: Headers(envelope.headers),
            payload: Payload(envelope.payload),
            extensions: Extensions(envelope.extensions),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_the_boundary_moves_buffers() {
        let payload = Payload::from_vec(vec![7; 1000]);
        let address = payload.as_slice().as_ptr();
        let envelope = Envelope::new(MessageId::from_u128(1), "a", Destination::topic("t"), payload)
            .with_header("h", "v");
        let back = Envelope::from_abi(envelope.clone().into_abi()).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.payload.as_slice().as_ptr(), address, "the payload was not copied");
    }

    #[test]
    fn headers_keep_order_and_repeats() {
        let mut headers: Headers = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(headers.get("a"), Some("1"));
        headers.set("a", "4");
        assert_eq!(headers.to_vec(), [("b".into(), "2".into()), ("a".into(), "4".into())]);
        assert_eq!(headers.remove("b"), 1);
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn payload_slices_share_the_buffer() {
        let buffer = SharedBuffer::from(b"header|body".to_vec());
        let body = buffer.payload(7..11).unwrap();
        assert_eq!(body.as_slice(), b"body");
        assert_eq!(body.slice(1..3).unwrap().as_slice(), b"od");
        assert!(body.slice(2..5).is_none());
        assert!(buffer.payload(7..12).is_none());
    }

    #[test]
    fn extensions_replace_in_place() {
        let mut extensions = Extensions::new();
        extensions.set("x.a", b"1".to_vec());
        extensions.set("x.b", b"2".to_vec());
        extensions.set("x.a", b"3".to_vec());
        assert_eq!(extensions.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["x.a", "x.b"]);
        assert_eq!(extensions.get("x.a"), Some(&b"3"[..]));
    }
}

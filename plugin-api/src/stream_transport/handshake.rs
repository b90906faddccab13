//! Opening a connection: the Noise handshake (encrypted links) and the hello exchange, for the
//! dialling and the accepting side.

#[cfg(feature = "noise")]
use super::encrypted::EncryptedStream;
use super::{encrypted::LinkStream, protocol, ByteStream, Shared};
#[cfg(feature = "noise")]
use crate::security::noise::{verify_node_id, NoiseHandshake};
#[cfg(feature = "noise")]
pub(super) use crate::security::{NoiseIdentity, PublicKey};
use crate::{framing::read_frame, security::LinkSecurity, NodeId, PluginError};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Built without the cargo feature `noise`: no link is ever encrypted, so no value exists of
/// the Noise identity a transport would hold.
#[cfg(not(feature = "noise"))]
pub(super) enum NoiseIdentity {}

/// Built without the cargo feature `noise`: no peer is ever authenticated by a key.
#[cfg(not(feature = "noise"))]
#[derive(Debug)]
pub(super) enum PublicKey {}

#[cfg(not(feature = "noise"))]
impl std::fmt::Display for PublicKey {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

/// The Noise identity of a transport whose links `security` protects. Refuses a node id that
/// peers would refuse, and (without the cargo feature `noise`) any security at all.
#[cfg(feature = "noise")]
pub(super) fn noise_identity(
    local_node: &NodeId,
    security: &LinkSecurity,
) -> Result<Arc<NoiseIdentity>, PluginError> {
    // Peers check our hello against our key: refuse to start with an id they would refuse.
    verify_node_id(local_node, &security.identity.public_key()).map_err(|_| {
        PluginError::invalid_config(format!(
            "key `node.id`: with encrypted links the node id must be bound to the node's key \
             (`{}` or `<label>-{}`), not `{local_node}`",
            security.identity.public_key(),
            security.identity.public_key()
        ))
    })?;
    NoiseIdentity::new(security).map_err(|error| PluginError::new(crate::ErrorCode::OTHER, error.to_string()))
}

/// The Noise identity of a transport whose links `security` protects: always refused by this
/// build, which has no encrypted-link support (cargo feature `noise`).
#[cfg(not(feature = "noise"))]
pub(super) fn noise_identity(
    _local_node: &NodeId,
    _security: &LinkSecurity,
) -> Result<Arc<NoiseIdentity>, PluginError> {
    Err(crate::security::noise_unavailable())
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub(super) enum OpenError {
    /// The peer closed the connection before the handshake began (accepting side).
    ClosedEarly,
    /// A network or framing failure: worth trying again.
    Failed(String),
    /// A security check failed or the peer speaks another mode: trying again will not help.
    Refused(String),
}

/// An open connection: its stream, the peer's node id and, on an encrypted link, its key.
pub(super) struct Opened<S> {
    pub(super) stream: LinkStream<S>,
    pub(super) peer: NodeId,
    pub(super) key: Option<PublicKey>,
}

fn failed(context: &str) -> impl Fn(std::io::Error) -> OpenError + '_ {
    move |error| OpenError::Failed(format!("{context}: {error}"))
}

/// The dialling side: handshake if link security is on, then hellos both ways.
#[cfg_attr(not(feature = "noise"), allow(unused_mut))]
pub(super) async fn dial<S: ByteStream>(shared: &Shared, mut stream: S) -> Result<Opened<S>, OpenError> {
    let (mut stream, key) = match &shared.noise {
        None => (LinkStream::Plain(stream), None),
        #[cfg(feature = "noise")]
        Some(noise) => {
            let (key, encrypted) = initiate(noise, &mut stream).await?;
            (LinkStream::Encrypted(Box::new(EncryptedStream::new(stream, encrypted))), Some(key))
        }
        #[cfg(not(feature = "noise"))]
        Some(noise) => match **noise {},
    };
    stream.write_all(&protocol::hello_frame(&shared.local_node)).await.map_err(failed("writing hello"))?;
    stream.flush().await.map_err(failed("writing hello"))?;
    let body = read_frame(&mut stream, protocol::MAX_HELLO_SIZE)
        .await
        .map_err(|error| OpenError::Failed(format!("handshake: {error}")))?
        .ok_or_else(|| OpenError::Failed("connection closed during the handshake".into()))?;
    let peer = protocol::parse_hello(&body).map_err(OpenError::Refused)?;
    if let Some(key) = &key {
        #[cfg(feature = "noise")]
        verify_node_id(&peer, key).map_err(|error| OpenError::Refused(error.to_string()))?;
        #[cfg(not(feature = "noise"))]
        match *key {}
    }
    Ok(Opened { stream, peer, key })
}

#[cfg(feature = "noise")]
async fn initiate<S: ByteStream>(
    noise: &Arc<NoiseIdentity>,
    stream: &mut S,
) -> Result<(PublicKey, crate::security::noise::snow::TransportState), OpenError> {
    let refused = |error: crate::security::HandshakeError| OpenError::Refused(error.to_string());
    let mut handshake = NoiseHandshake::initiator(noise).map_err(refused)?;
    let mut message = Vec::new();
    handshake.write_message(&mut message).map_err(refused)?;
    stream.write_all(&protocol::noise_frame(&message)).await.map_err(failed("writing handshake"))?;
    let body = read_frame(stream, protocol::MAX_NOISE_SIZE)
        .await
        .map_err(|error| OpenError::Failed(format!("handshake: {error}")))?
        // A node in plain mode closes the connection on our first message.
        .ok_or_else(|| {
            OpenError::Failed(
                "connection closed during the noise handshake (does the peer have security.links = \"noise\"?)"
                    .into(),
            )
        })?;
    match body.first() {
        Some(&protocol::KIND_NOISE) => {}
        Some(&protocol::KIND_HELLO) => {
            return Err(OpenError::Refused(
                "peer answered in plaintext; this node requires noise links".into(),
            ))
        }
        _ => return Err(OpenError::Refused("peer did not answer with a noise handshake message".into())),
    }
    handshake.read_message(&body[1..]).map_err(refused)?;
    handshake.write_message(&mut message).map_err(refused)?;
    stream.write_all(&protocol::noise_frame(&message)).await.map_err(failed("writing handshake"))?;
    handshake.into_transport().map_err(refused)
}

/// The accepting side: reads the first frame, runs the handshake if link security is on (and
/// refuses a peer in the other mode), then reads the peer's hello. The caller sends its own.
pub(super) async fn accept<S: ByteStream>(shared: &Shared, mut stream: S) -> Result<Opened<S>, OpenError> {
    let first = read_frame(&mut stream, protocol::MAX_HELLO_SIZE.max(protocol::MAX_NOISE_SIZE))
        .await
        .map_err(|error| OpenError::Refused(format!("handshake: {error}")))?
        .ok_or(OpenError::ClosedEarly)?;
    match (first.first(), &shared.noise) {
        (Some(&protocol::KIND_NOISE), None) => {
            Err(OpenError::Refused("peer requires encrypted links; set security.links".into()))
        }
        (Some(&protocol::KIND_HELLO), Some(_)) => {
            Err(OpenError::Refused("plaintext peer refused: this node requires noise links".into()))
        }
        #[cfg(feature = "noise")]
        (Some(&protocol::KIND_NOISE), Some(noise)) => {
            let refused = |error: crate::security::HandshakeError| OpenError::Refused(error.to_string());
            let mut handshake = NoiseHandshake::responder(noise).map_err(refused)?;
            handshake.read_message(&first[1..]).map_err(refused)?;
            let mut message = Vec::new();
            handshake.write_message(&mut message).map_err(refused)?;
            stream.write_all(&protocol::noise_frame(&message)).await.map_err(failed("writing handshake"))?;
            let body = read_frame(&mut stream, protocol::MAX_NOISE_SIZE)
                .await
                .map_err(|error| OpenError::Refused(format!("handshake: {error}")))?
                .ok_or_else(|| OpenError::Refused("closed during the noise handshake".into()))?;
            if body.first() != Some(&protocol::KIND_NOISE) {
                return Err(OpenError::Refused("expected the third noise handshake message".into()));
            }
            handshake.read_message(&body[1..]).map_err(refused)?;
            let (key, transport) = handshake.into_transport().map_err(refused)?;
            let mut stream = EncryptedStream::new(stream, transport);
            let body = read_frame(&mut stream, protocol::MAX_HELLO_SIZE)
                .await
                .map_err(|error| OpenError::Refused(format!("key {key}: reading hello: {error}")))?
                .ok_or_else(|| OpenError::Refused(format!("key {key}: closed before its hello")))?;
            let peer = protocol::parse_hello(&body)
                .map_err(|reason| OpenError::Refused(format!("key {key}: {reason}")))?;
            verify_node_id(&peer, &key).map_err(|error| OpenError::Refused(error.to_string()))?;
            Ok(Opened { stream: LinkStream::Encrypted(Box::new(stream)), peer, key: Some(key) })
        }
        #[cfg(not(feature = "noise"))]
        (_, Some(noise)) => match **noise {},
        _ => {
            let peer = protocol::parse_hello(&first).map_err(OpenError::Refused)?;
            Ok(Opened { stream: LinkStream::Plain(stream), peer, key: None })
        }
    }
}

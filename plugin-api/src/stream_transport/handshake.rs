//! Opening a connection: the Noise handshake (encrypted links) and the hello exchange, for the
//! dialling and the accepting side.

use super::{
    encrypted::{EncryptedStream, LinkStream},
    protocol, ByteStream, Shared,
};
use crate::{
    framing::read_frame,
    security::{
        noise::{verify_node_id, NoiseHandshake, NoiseIdentity},
        PublicKey,
    },
    NodeId,
};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

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
pub(super) async fn dial<S: ByteStream>(shared: &Shared, mut stream: S) -> Result<Opened<S>, OpenError> {
    let (mut stream, key) = match &shared.noise {
        None => (LinkStream::Plain(stream), None),
        Some(noise) => {
            let (key, encrypted) = initiate(noise, &mut stream).await?;
            (LinkStream::Encrypted(Box::new(EncryptedStream::new(stream, encrypted))), Some(key))
        }
    };
    stream.write_all(&protocol::hello_frame(&shared.local_node)).await.map_err(failed("writing hello"))?;
    stream.flush().await.map_err(failed("writing hello"))?;
    let body = read_frame(&mut stream, protocol::MAX_HELLO_SIZE)
        .await
        .map_err(|error| OpenError::Failed(format!("handshake: {error}")))?
        .ok_or_else(|| OpenError::Failed("connection closed during the handshake".into()))?;
    let peer = protocol::parse_hello(&body).map_err(OpenError::Refused)?;
    if let Some(key) = &key {
        verify_node_id(&peer, key).map_err(|error| OpenError::Refused(error.to_string()))?;
    }
    Ok(Opened { stream, peer, key })
}

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
        _ => {
            let peer = protocol::parse_hello(&first).map_err(OpenError::Refused)?;
            Ok(Opened { stream: LinkStream::Plain(stream), peer, key: None })
        }
    }
}

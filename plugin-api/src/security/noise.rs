//! The Noise handshake that authenticates and encrypts a link, independent of the medium.
//!
//! Pattern `Noise_XX_25519_ChaChaPoly_BLAKE2s`, or `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s` with the
//! shared [`NetworkKey`](super::NetworkKey) as pre-shared key when the network has one:
//!
//! ```text
//! initiator -> responder   e
//! responder -> initiator   e, ee, s, es   + payload (encrypted): responder's identity binding
//! initiator -> responder   s, se [, psk]  + payload (encrypted): initiator's identity binding
//! ```
//!
//! Each transport has its own X25519 static key ([`NoiseIdentity`], fresh per transport). The
//! payload binds it to the node's long-term Ed25519 identity (as libp2p-noise does):
//!
//! ```text
//! payload = ed25519 public key (32 bytes) || ed25519 signature (64 bytes) of
//!           b"comms-noise-static-v1" || x25519 static public key (32 bytes)
//! ```
//!
//! A side accepts the other's payload only if the signature verifies over the static key the
//! handshake itself authenticated (so a payload copied from another session is useless), and the
//! identity key is on the allow-list. After the handshake the transport checks that the node id
//! the peer claims is bound to that key ([`verify_node_id`]). The handshake is fresh on both sides
//! (two ephemeral keys), so a recorded handshake replayed on a new connection fails to decrypt.
//!
//! Nothing here does I/O: [`NoiseHandshake`] turns messages into messages, and
//! [`NoiseHandshake::into_transport`] hands over the [`snow::TransportState`] that encrypts the
//! rest of the link (or [`NoiseHandshake::into_stateless_transport`] for datagrams, where records
//! carry their own nonce). No error message of this module contains secret material.
//!
//! ```
//! use comms_plugin_api::security::{noise::{NoiseHandshake, NoiseIdentity}, AllowList, Identity, LinkSecurity};
//! let alice = NoiseIdentity::new(&LinkSecurity::new(Identity::generate(), AllowList::AnyKey, None)).unwrap();
//! let bob = NoiseIdentity::new(&LinkSecurity::new(Identity::generate(), AllowList::AnyKey, None)).unwrap();
//! let (mut dialer, mut listener) = (NoiseHandshake::initiator(&alice).unwrap(), NoiseHandshake::responder(&bob).unwrap());
//! let mut message = Vec::new();
//! while !(dialer.is_finished() && listener.is_finished()) {
//!     let (from, to) = if dialer.is_my_turn() { (&mut dialer, &mut listener) } else { (&mut listener, &mut dialer) };
//!     from.write_message(&mut message).unwrap();
//!     to.read_message(&message).unwrap();
//! }
//! let (bob_key, _to_bob) = dialer.into_transport().unwrap();
//! assert_eq!(bob_key, bob.public_key());
//! ```

use super::{identity::SIGNATURE_BYTES, AllowList, LinkSecurity, PublicKey};
use crate::NodeId;
use std::{fmt, sync::Arc};

pub use snow;

/// Noise pattern without a network key.
pub const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Noise pattern with a network key (the pre-shared key, mixed in by the third message).
pub const PATTERN_PSK: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// Prologue both sides mix into the handshake: a different protocol never completes it.
pub const PROLOGUE: &[u8] = b"comms-noise-v1";
/// Domain separation of the signature binding the Noise static key to the identity key.
pub const BINDING_CONTEXT: &[u8] = b"comms-noise-static-v1";
/// Length of the identity payload: Ed25519 public key and signature.
pub const PAYLOAD_BYTES: usize = 32 + SIGNATURE_BYTES;
/// Largest Noise message (handshake or transport), as the Noise specification fixes it.
pub const MAX_MESSAGE_BYTES: usize = 65_535;
/// Authentication tag added to every encrypted message.
pub const TAG_BYTES: usize = 16;
/// Largest plaintext one transport message carries.
pub const MAX_PLAINTEXT_BYTES: usize = MAX_MESSAGE_BYTES - TAG_BYTES;

/// Why a handshake failed. Messages name the step and, where known, the peer's public key;
/// never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The message cannot be a message of this handshake (wrong length, out of turn).
    #[error("not a comms noise handshake message: {0}")]
    NotNoise(&'static str),
    /// A message failed to decrypt: tampered, replayed from another session, or the peer uses a
    /// different network key (or none where this node has one).
    #[error("handshake message failed to decrypt (tampered, replayed, or a different network key)")]
    Decrypt,
    /// The identity payload is malformed.
    #[error("malformed identity payload: {0}")]
    BadPayload(&'static str),
    /// The identity signature does not cover this session's static key.
    #[error("identity signature of key {0} does not match the noise static key")]
    BadSignature(PublicKey),
    /// The peer authenticated with a key the allow-list does not contain.
    #[error("peer key {0} is not allowed (security.allow)")]
    KeyNotAllowed(PublicKey),
    /// The peer's claimed node id is not bound to the key it authenticated with.
    #[error("peer claims node id `{claimed}` but authenticated as key {key}")]
    NodeIdMismatch {
        /// The node id the peer claimed.
        claimed: String,
        /// The key it proved it holds.
        key: PublicKey,
    },
    /// The handshake is not finished, or the local state could not be built.
    #[error("noise handshake: {0}")]
    State(String),
}

/// This transport's Noise static key, bound to the node identity by a signature. Built once per
/// transport; `Debug` shows only public parts.
pub struct NoiseIdentity {
    security: LinkSecurity,
    static_secret: [u8; 32],
    static_public: [u8; 32],
    payload: [u8; PAYLOAD_BYTES],
}

impl fmt::Debug for NoiseIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseIdentity")
            .field("identity", &self.security.identity.public_key())
            .field("allow", &self.security.allow)
            .field("network_key", &self.security.network_key.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for NoiseIdentity {
    fn drop(&mut self) {
        for byte in self.static_secret.iter_mut() {
            // Volatile so that the wipe is not optimised away.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

impl NoiseIdentity {
    /// Generates a fresh X25519 static key and signs it with `security`'s identity.
    pub fn new(security: &LinkSecurity) -> Result<Arc<Self>, HandshakeError> {
        let keypair = builder(security.network_key.is_some())
            .generate_keypair()
            .map_err(|error| HandshakeError::State(error.to_string()))?;
        let static_secret: [u8; 32] =
            keypair.private.as_slice().try_into().map_err(|_| HandshakeError::State("key length".into()))?;
        let static_public: [u8; 32] =
            keypair.public.as_slice().try_into().map_err(|_| HandshakeError::State("key length".into()))?;
        let mut payload = [0u8; PAYLOAD_BYTES];
        payload[..32].copy_from_slice(&security.identity.public_key().0);
        payload[32..].copy_from_slice(&security.identity.sign(&binding_message(&static_public)));
        Ok(Arc::new(Self { security: security.clone(), static_secret, static_public, payload }))
    }

    /// This node's identity key.
    pub fn public_key(&self) -> PublicKey {
        self.security.identity.public_key()
    }

    /// Who may connect.
    pub fn allow(&self) -> &AllowList {
        &self.security.allow
    }

    /// The X25519 static public key this transport uses in handshakes.
    pub fn static_public(&self) -> [u8; 32] {
        self.static_public
    }
}

/// The bytes an identity signs to bind a Noise static key.
pub fn binding_message(static_public: &[u8; 32]) -> [u8; 53] {
    let mut message = [0u8; 53];
    message[..BINDING_CONTEXT.len()].copy_from_slice(BINDING_CONTEXT);
    message[BINDING_CONTEXT.len()..].copy_from_slice(static_public);
    message
}

fn builder(psk: bool) -> snow::Builder<'static> {
    let pattern = if psk { PATTERN_PSK } else { PATTERN };
    // Both patterns are constants this crate knows to be valid.
    snow::Builder::new(pattern.parse().unwrap_or_else(|_| unreachable!("valid noise pattern")))
}

/// Parses an identity payload and checks it against the static key the handshake authenticated
/// and the allow-list. Returns the peer's identity key.
pub fn verify_payload(
    payload: &[u8],
    remote_static: &[u8],
    allow: &AllowList,
) -> Result<PublicKey, HandshakeError> {
    if payload.len() != PAYLOAD_BYTES {
        return Err(HandshakeError::BadPayload("expected 96 bytes (public key and signature)"));
    }
    let remote_static: &[u8; 32] =
        remote_static.try_into().map_err(|_| HandshakeError::BadPayload("remote static key length"))?;
    let mut key = [0u8; 32];
    key.copy_from_slice(&payload[..32]);
    let key = PublicKey(key);
    if !key.verify(&binding_message(remote_static), &payload[32..]) {
        return Err(HandshakeError::BadSignature(key));
    }
    if !allow.permits(&key) {
        return Err(HandshakeError::KeyNotAllowed(key));
    }
    Ok(key)
}

/// Checks that `claimed` is the node id of `key` (`<label>-<hex of key>` or the hex alone).
pub fn verify_node_id(claimed: &NodeId, key: &PublicKey) -> Result<(), HandshakeError> {
    if PublicKey::of_node(claimed).as_ref() == Some(key) {
        Ok(())
    } else {
        Err(HandshakeError::NodeIdMismatch {
            claimed: claimed.as_str().chars().take(200).collect(),
            key: *key,
        })
    }
}

/// One side of a handshake in progress.
pub struct NoiseHandshake {
    state: snow::HandshakeState,
    local: Arc<NoiseIdentity>,
    remote: Option<PublicKey>,
    /// Messages read so far.
    read: usize,
    /// Scratch buffer for decrypted payloads.
    scratch: Vec<u8>,
}

impl fmt::Debug for NoiseHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseHandshake")
            .field("initiator", &self.state.is_initiator())
            .field("finished", &self.state.is_handshake_finished())
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl NoiseHandshake {
    /// The dialling side: writes the first message.
    pub fn initiator(local: &Arc<NoiseIdentity>) -> Result<Self, HandshakeError> {
        Self::build(local, true)
    }

    /// The accepting side: reads the first message.
    pub fn responder(local: &Arc<NoiseIdentity>) -> Result<Self, HandshakeError> {
        Self::build(local, false)
    }

    fn build(local: &Arc<NoiseIdentity>, initiator: bool) -> Result<Self, HandshakeError> {
        let state_error = |error: snow::Error| HandshakeError::State(error.to_string());
        let mut builder = builder(local.security.network_key.is_some())
            .local_private_key(&local.static_secret)
            .map_err(state_error)?
            .prologue(PROLOGUE)
            .map_err(state_error)?;
        if let Some(network_key) = &local.security.network_key {
            builder = builder.psk(3, &network_key.0).map_err(state_error)?;
        }
        let state = if initiator { builder.build_initiator() } else { builder.build_responder() }
            .map_err(state_error)?;
        Ok(Self {
            state,
            local: Arc::clone(local),
            remote: None,
            read: 0,
            scratch: vec![0; MAX_MESSAGE_BYTES],
        })
    }

    /// Whether both sides have sent everything.
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// Whether the next step is [`write_message`](Self::write_message).
    pub fn is_my_turn(&self) -> bool {
        self.state.is_my_turn()
    }

    /// The peer's authenticated identity key, once its payload was verified.
    pub fn remote_key(&self) -> Option<PublicKey> {
        self.remote
    }

    /// Replaces `out` with this side's next handshake message (the identity payload is attached
    /// to the message that carries the static key).
    pub fn write_message(&mut self, out: &mut Vec<u8>) -> Result<(), HandshakeError> {
        if !self.state.is_my_turn() || self.state.is_handshake_finished() {
            return Err(HandshakeError::NotNoise("not this side's turn to write"));
        }
        // Message 1 (initiator) carries no payload; messages 2 and 3 carry the identity.
        let payload: &[u8] =
            if self.state.is_initiator() && self.remote.is_none() { &[] } else { &self.local.payload };
        out.clear();
        out.resize(MAX_MESSAGE_BYTES, 0);
        let length = self
            .state
            .write_message(payload, out)
            .map_err(|error| HandshakeError::State(error.to_string()))?;
        out.truncate(length);
        Ok(())
    }

    /// Reads the peer's next handshake message, verifying its identity payload when it carries
    /// one.
    pub fn read_message(&mut self, message: &[u8]) -> Result<(), HandshakeError> {
        if self.state.is_my_turn() || self.state.is_handshake_finished() {
            return Err(HandshakeError::NotNoise("a message out of turn"));
        }
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(HandshakeError::NotNoise("message longer than 65535 bytes"));
        }
        let first = !self.state.is_initiator() && self.read == 0;
        self.read += 1;
        let length = self.state.read_message(message, &mut self.scratch).map_err(|error| match error {
            snow::Error::Decrypt => HandshakeError::Decrypt,
            snow::Error::Input => HandshakeError::NotNoise("malformed message"),
            snow::Error::Dh => HandshakeError::NotNoise("invalid public key"),
            _ => HandshakeError::NotNoise("rejected by the noise state machine"),
        })?;
        if first {
            // The first message is the initiator's ephemeral key and nothing else.
            return match length {
                0 => Ok(()),
                _ => Err(HandshakeError::NotNoise("the first message carries a payload")),
            };
        }
        let remote_static =
            self.state.get_remote_static().ok_or(HandshakeError::BadPayload("no static key"))?;
        self.remote =
            Some(verify_payload(&self.scratch[..length], remote_static, &self.local.security.allow)?);
        Ok(())
    }

    fn finished_remote(&self) -> Result<PublicKey, HandshakeError> {
        match (self.state.is_handshake_finished(), self.remote) {
            (true, Some(remote)) => Ok(remote),
            _ => Err(HandshakeError::State("the handshake is not finished".into())),
        }
    }

    /// The peer's authenticated key and the state that encrypts the rest of the link, in order
    /// (streams).
    pub fn into_transport(self) -> Result<(PublicKey, snow::TransportState), HandshakeError> {
        let remote = self.finished_remote()?;
        let transport =
            self.state.into_transport_mode().map_err(|error| HandshakeError::State(error.to_string()))?;
        Ok((remote, transport))
    }

    /// Like [`into_transport`](Self::into_transport), for datagrams: each message is encrypted
    /// with an explicit nonce, so messages may be lost or reordered (the caller rejects replays).
    pub fn into_stateless_transport(
        self,
    ) -> Result<(PublicKey, snow::StatelessTransportState), HandshakeError> {
        let remote = self.finished_remote()?;
        let transport = self
            .state
            .into_stateless_transport_mode()
            .map_err(|error| HandshakeError::State(error.to_string()))?;
        Ok((remote, transport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::{Identity, NetworkKey};

    fn identity(allow: AllowList, network_key: Option<NetworkKey>) -> (Identity, Arc<NoiseIdentity>) {
        let secret = Identity::generate();
        let copy = Identity::from_secret_bytes(&secret.secret_bytes());
        let noise = NoiseIdentity::new(&LinkSecurity::new(copy, allow, network_key)).unwrap();
        (secret, noise)
    }

    /// Runs a handshake to the end or the first error; returns every message written, in order.
    fn run(
        initiator: &mut NoiseHandshake,
        responder: &mut NoiseHandshake,
    ) -> (Vec<Vec<u8>>, Result<(), HandshakeError>) {
        let mut messages = Vec::new();
        while !(initiator.is_finished() && responder.is_finished()) {
            let (from, to) = if initiator.is_my_turn() {
                (&mut *initiator, &mut *responder)
            } else {
                (&mut *responder, &mut *initiator)
            };
            let mut message = Vec::new();
            if let Err(error) = from.write_message(&mut message) {
                return (messages, Err(error));
            }
            messages.push(message.clone());
            if let Err(error) = to.read_message(&message) {
                return (messages, Err(error));
            }
        }
        (messages, Ok(()))
    }

    #[test]
    fn allowed_peers_learn_each_others_keys_and_talk() {
        let (alice, alice_noise) = identity(AllowList::AnyKey, None);
        let (bob, bob_noise) = identity(AllowList::Keys([alice.public_key()].into()), None);
        let mut initiator = NoiseHandshake::initiator(&alice_noise).unwrap();
        let mut responder = NoiseHandshake::responder(&bob_noise).unwrap();
        let (messages, result) = run(&mut initiator, &mut responder);
        result.unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0].len(), 32);
        let (bob_key, mut to_bob) = initiator.into_transport().unwrap();
        let (alice_key, mut from_alice) = responder.into_transport().unwrap();
        assert_eq!((bob_key, alice_key), (bob.public_key(), alice.public_key()));
        let mut sealed = vec![0; 64];
        let n = to_bob.write_message(b"hello", &mut sealed).unwrap();
        let mut opened = vec![0; 64];
        let m = from_alice.read_message(&sealed[..n], &mut opened).unwrap();
        assert_eq!(&opened[..m], b"hello");
        sealed[0] ^= 1;
        assert!(from_alice.read_message(&sealed[..n], &mut opened).is_err());
    }

    #[test]
    fn keys_off_the_allow_list_are_refused_on_both_sides() {
        let (_, stranger) = identity(AllowList::AnyKey, None);
        let (_, picky) = identity(AllowList::Keys(Default::default()), None);
        // The picky node answers a stranger's dial, and refuses it on the third message.
        let mut initiator = NoiseHandshake::initiator(&stranger).unwrap();
        let mut responder = NoiseHandshake::responder(&picky).unwrap();
        let (messages, result) = run(&mut initiator, &mut responder);
        assert!(matches!(result, Err(HandshakeError::KeyNotAllowed(key)) if key == stranger.public_key()));
        assert_eq!(messages.len(), 3);
        assert!(responder.into_transport().is_err());
        // The picky node dials the stranger and refuses it on the second message.
        let mut initiator = NoiseHandshake::initiator(&picky).unwrap();
        let mut responder = NoiseHandshake::responder(&stranger).unwrap();
        let (messages, result) = run(&mut initiator, &mut responder);
        assert!(matches!(result, Err(HandshakeError::KeyNotAllowed(_))));
        assert_eq!(messages.len(), 2);
    }

    #[test]
    fn a_replayed_handshake_fails_to_decrypt() {
        let (_, alice) = identity(AllowList::AnyKey, None);
        let (_, bob) = identity(AllowList::AnyKey, None);
        let (messages, result) = run(
            &mut NoiseHandshake::initiator(&alice).unwrap(),
            &mut NoiseHandshake::responder(&bob).unwrap(),
        );
        result.unwrap();
        let mut responder = NoiseHandshake::responder(&bob).unwrap();
        responder.read_message(&messages[0]).unwrap();
        let mut answer = Vec::new();
        responder.write_message(&mut answer).unwrap();
        assert_eq!(responder.read_message(&messages[2]), Err(HandshakeError::Decrypt));
    }

    #[test]
    fn a_payload_from_another_static_key_is_refused() {
        let (alice, _) = identity(AllowList::AnyKey, None);
        let other_static = [7u8; 32];
        let mut payload = alice.public_key().0.to_vec();
        payload.extend_from_slice(&alice.sign(&binding_message(&other_static)));
        assert!(verify_payload(&payload, &other_static, &AllowList::AnyKey).is_ok());
        assert_eq!(
            verify_payload(&payload, &[8u8; 32], &AllowList::AnyKey),
            Err(HandshakeError::BadSignature(alice.public_key()))
        );
        assert!(matches!(
            verify_payload(&payload[1..], &other_static, &AllowList::AnyKey),
            Err(HandshakeError::BadPayload(_))
        ));
    }

    #[test]
    fn network_keys_must_match() {
        let network = NetworkKey::generate();
        let (_, holder) = identity(AllowList::AnyKey, Some(network.clone()));
        let (_, other_holder) = identity(AllowList::AnyKey, Some(network));
        let (_, outsider) = identity(AllowList::AnyKey, Some(NetworkKey::generate()));
        let (_, plain) = identity(AllowList::AnyKey, None);
        let (_, result) = run(
            &mut NoiseHandshake::initiator(&holder).unwrap(),
            &mut NoiseHandshake::responder(&other_holder).unwrap(),
        );
        result.unwrap();
        let (_, result) = run(
            &mut NoiseHandshake::initiator(&outsider).unwrap(),
            &mut NoiseHandshake::responder(&holder).unwrap(),
        );
        assert_eq!(result, Err(HandshakeError::Decrypt));
        let (_, result) = run(
            &mut NoiseHandshake::initiator(&plain).unwrap(),
            &mut NoiseHandshake::responder(&holder).unwrap(),
        );
        assert_eq!(result, Err(HandshakeError::Decrypt));
    }

    #[test]
    fn node_ids_must_be_bound_to_the_key() {
        let alice = Identity::generate();
        verify_node_id(&alice.node_id(Some("alice")), &alice.public_key()).unwrap();
        let error =
            verify_node_id(&Identity::generate().node_id(Some("bob")), &alice.public_key()).unwrap_err();
        assert!(error.to_string().contains(&alice.public_key().to_hex()), "{error}");
        assert!(verify_node_id(&NodeId::new("alice"), &alice.public_key()).is_err());
    }

    #[test]
    fn errors_and_debug_output_never_show_secrets() {
        let (alice, noise) = identity(AllowList::AnyKey, Some(NetworkKey([9; 32])));
        let secret = crate::security::identity::hex_encode(&alice.secret_bytes());
        let static_secret = crate::security::identity::hex_encode(&noise.static_secret);
        let shown = format!("{noise:?} {:?}", NoiseHandshake::initiator(&noise).unwrap());
        for hidden in [secret, static_secret, crate::security::identity::hex_encode(&[9; 32])] {
            assert!(!shown.contains(&hidden), "{shown}");
        }
    }

    #[test]
    fn out_of_turn_and_garbage_messages_are_errors() {
        let (_, alice) = identity(AllowList::AnyKey, None);
        let mut responder = NoiseHandshake::responder(&alice).unwrap();
        assert!(matches!(responder.write_message(&mut Vec::new()), Err(HandshakeError::NotNoise(_))));
        assert!(matches!(responder.read_message(b"GET / HTTP/1.1"), Err(HandshakeError::NotNoise(_))));
        let mut initiator = NoiseHandshake::initiator(&alice).unwrap();
        assert!(initiator.read_message(&[0; 32]).is_err());
        initiator.write_message(&mut Vec::new()).unwrap();
        assert!(initiator.read_message(&[0; 200]).is_err());
    }
}

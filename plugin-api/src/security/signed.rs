//! Authenticated datagrams and records, for discoveries whose node runs with
//! `[security] links = "noise"` (the host then hands the discovery its [`LinkSecurity`], see
//! [`crate::Setup::link_security`]).
//!
//! - A **sealed datagram** is the plaintext datagram (its version byte set by the caller)
//!   followed by a trailer: the sender's node id, the id's length (`u8`), the sender's clock
//!   (`u64` big-endian, milliseconds since the Unix epoch) and an Ed25519 signature of
//!   everything before it. [`open`] refuses it unless the id is bound to a public key
//!   (`PublicKey::of_node`), that key is on the allow list, the time is within [`WINDOW_MS`] of
//!   ours and the signature verifies.
//! - A **signed record** is any content signed by the node that owns it ([`sign`], [`verify`]):
//!   whoever relays it cannot change it.
//!
//! Every signature covers a context string (which names the protocol, its version and the
//! purpose, so a signature made for one thing is never valid for another), then `0`, or `1` and
//! the network's shared key when it has one (so that a node of another network, even with an
//! allowed key, is refused; the key itself is never sent), then the content.
//!
//! Used by the gossip and Kademlia discoveries, each with contexts of its own.

use super::identity::SIGNATURE_BYTES;
pub use super::{AllowList, Identity, LinkSecurity, NetworkKey, PublicKey};
use crate::NodeId;
use std::{fmt, time::Instant};

/// How far a datagram's time may be from the receiver's clock, either way: 5 minutes.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;
/// Bytes of a signature.
pub const SIGNATURE: usize = SIGNATURE_BYTES;
/// Bytes of a trailer besides the sender id: its length, the time and the signature.
pub const TRAILER: usize = 1 + 8 + SIGNATURE;

/// Why an authenticated datagram or a signed record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Too short for a trailer, or the sender id is not UTF-8.
    Malformed,
    /// The sender (or owner) id is not bound to a public key.
    Unbound,
    /// The key is not on the allow list.
    NotAllowed,
    /// The datagram's time is more than [`WINDOW_MS`] from ours: replayed, or a clock is wrong.
    Stale,
    /// The signature does not verify: forged, altered, or from a node of another network.
    BadSignature,
    /// The datagram speaks for another node than the one that signed it.
    WrongSender,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthError::Malformed => "no valid authentication trailer",
            AuthError::Unbound => "the sender id is not bound to a public key",
            AuthError::NotAllowed => "the sender's key is not allowed (security.allow)",
            AuthError::Stale => "its time is more than 5 minutes from ours (a replay, or a wrong clock)",
            AuthError::BadSignature => "bad signature (forged, altered, or another network key)",
            AuthError::WrongSender => "it speaks for another node than its signer",
        })
    }
}

fn message(security: &LinkSecurity, context: &[u8], content: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(context.len() + 33 + content.len());
    message.extend_from_slice(context);
    match &security.network_key {
        Some(key) => {
            message.push(1);
            message.extend_from_slice(&key.0);
        }
        None => message.push(0),
    }
    message.extend_from_slice(content);
    message
}

/// This node's signature of `content` in `context`.
pub fn sign(security: &LinkSecurity, context: &[u8], content: &[u8]) -> [u8; SIGNATURE] {
    security.identity.sign(&message(security, context, content))
}

/// Checks that `signature` is `owner`'s signature of `content` in `context` and that `owner`'s
/// key is allowed; returns the key.
pub fn verify(
    security: &LinkSecurity,
    context: &[u8],
    owner: &str,
    content: &[u8],
    signature: &[u8],
) -> Result<PublicKey, AuthError> {
    let key = PublicKey::of_node(&NodeId::new(owner)).ok_or(AuthError::Unbound)?;
    if !security.allow.permits(&key) {
        return Err(AuthError::NotAllowed);
    }
    match key.verify(&message(security, context, content), signature) {
        true => Ok(key),
        false => Err(AuthError::BadSignature),
    }
}

/// Appends the trailer to `datagram`, sent by node `id` (at most 255 bytes) at `unix_ms`.
pub fn seal(
    security: &LinkSecurity,
    context: &[u8],
    id: &str,
    mut datagram: Vec<u8>,
    unix_ms: u64,
) -> Vec<u8> {
    let id = &id.as_bytes()[..id.len().min(u8::MAX as usize)];
    datagram.extend_from_slice(id);
    datagram.push(id.len() as u8);
    datagram.extend_from_slice(&unix_ms.to_be_bytes());
    let signature = sign(security, context, &datagram);
    datagram.extend_from_slice(&signature);
    datagram
}

/// Checks a sealed datagram at `unix_ms` (the checks are in the [module documentation](self));
/// returns the sender's id and the datagram without its trailer.
pub fn open<'a>(
    security: &LinkSecurity,
    context: &[u8],
    datagram: &'a [u8],
    unix_ms: u64,
) -> Result<(&'a str, &'a [u8]), AuthError> {
    let (signed, signature) =
        datagram.split_at(datagram.len().checked_sub(SIGNATURE).ok_or(AuthError::Malformed)?);
    let (rest, time) = signed.split_at(signed.len().checked_sub(8).ok_or(AuthError::Malformed)?);
    let (length, rest) = rest.split_last().ok_or(AuthError::Malformed)?;
    let (payload, id) = rest.split_at(rest.len().checked_sub(*length as usize).ok_or(AuthError::Malformed)?);
    let id = std::str::from_utf8(id).map_err(|_| AuthError::Malformed)?;
    let time = u64::from_be_bytes(time.try_into().map_err(|_| AuthError::Malformed)?);
    if time.abs_diff(unix_ms) > WINDOW_MS {
        return Err(AuthError::Stale);
    }
    verify(security, context, id, signed, signature)?;
    Ok((id, payload))
}

/// Wall-clock time for a sans-IO node: the caller sets it now and then
/// ([`WallClock::set`]); in between it advances with the `Instant`s the node is handed.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_ms: u64,
}

impl WallClock {
    /// `unix_ms` (milliseconds since the Unix epoch) at `at`.
    pub fn new(at: Instant, unix_ms: u64) -> Self {
        Self { at, unix_ms }
    }

    /// Resets the clock: `unix_ms` at `at`.
    pub fn set(&mut self, at: Instant, unix_ms: u64) {
        *self = Self { at, unix_ms };
    }

    /// Milliseconds since the Unix epoch at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        match now.checked_duration_since(self.at) {
            Some(after) => self.unix_ms.saturating_add(after.as_millis() as u64),
            None => self.unix_ms.saturating_sub(self.at.duration_since(now).as_millis() as u64),
        }
    }

    /// Milliseconds since the Unix epoch, now, by the system clock.
    pub fn system_unix_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64)
    }
}

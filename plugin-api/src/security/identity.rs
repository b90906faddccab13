//! Node identities: Ed25519 key pairs, their key files, and node ids bound to public keys.
//!
//! A node with an identity has a node id that ends in its public key (`alice-<64 hex digits>`,
//! or just the hex digits), so anyone can check a claimed id against the key that signed a
//! handshake or an envelope: an id cannot be claimed without the secret key.
//!
//! ## Key file
//!
//! Written by `comms keygen`, owner-only (`0600`); [`Identity::load`] refuses a file that
//! group or others can read, like ssh does:
//!
//! ```toml
//! # comms node identity (Ed25519). Keep this file secret.
//! public_key = "<64 hex digits>"
//! secret_key = "<64 hex digits>"
//! ```
//!
//! Secret material never appears in `Debug` output, errors or logs.

pub use crate::hex::{hex_decode, hex_encode};
use crate::NodeId;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use std::{fmt, path::Path, str::FromStr};

/// Length of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Length of a public key in its text form (lowercase hex).
pub const PUBLIC_KEY_HEX_LEN: usize = 64;

/// An Ed25519 public key; its text form is 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else { return false };
        match VerifyingKey::from_bytes(&self.0) {
            Ok(key) => key.verify(message, &signature).is_ok(),
            Err(_) => false,
        }
    }

    /// The key a node id is bound to: its last 64 characters when they are hex digits and are
    /// the whole id or follow a `-`. `None` for an id without a key.
    pub fn of_node(node: &NodeId) -> Option<PublicKey> {
        let id = node.as_str();
        let split = id.len().checked_sub(PUBLIC_KEY_HEX_LEN)?;
        if !id.is_char_boundary(split) {
            return None;
        }
        let (label, key) = id.split_at(split);
        if !(label.is_empty() || label.ends_with('-')) {
            return None;
        }
        key.parse().ok()
    }

    /// The node id bound to this key: `<label>-<hex>`, or the hex alone without a label.
    pub fn node_id(&self, label: Option<&str>) -> NodeId {
        match label {
            Some(label) if !label.is_empty() => NodeId::new(format!("{label}-{}", self.to_hex())),
            _ => NodeId::new(self.to_hex()),
        }
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bytes = hex_decode_32(text.trim())
            .ok_or_else(|| format!("`{text}` is not a public key (expected 64 hex digits)"))?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| format!("`{text}` is not a valid Ed25519 public key"))?;
        Ok(PublicKey(bytes))
    }
}

/// A node's key pair. `Debug` shows the public key only.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("public_key", &self.public_key()).finish_non_exhaustive()
    }
}

/// Why a key file could not be used. Names the file, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key file {path}: {reason}")]
pub struct KeyFileError {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    public_key: String,
    secret_key: String,
}

impl Identity {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        Self { signing: SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    /// The key pair whose secret key is `secret` (32 bytes). For tests and derived keys.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self { signing: SigningKey::from_bytes(secret) }
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        self.signing.sign(message).to_bytes()
    }

    /// The node id bound to this identity (see [`PublicKey::node_id`]).
    pub fn node_id(&self, label: Option<&str>) -> NodeId {
        self.public_key().node_id(label)
    }

    /// Reads a key file, refusing one that others can read or whose halves do not match.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let error = |reason: String| KeyFileError { path: path.display().to_string(), reason };
        let text = super::secret_file::read_owner_only(path, "secret key")?;
        // Parse errors may quote the file; report only the key they name.
        let file: KeyFile = crate::config::parse_config(&text).map_err(|e| {
            let key = e.message.split('`').nth(1).unwrap_or("?").to_string();
            error(format!("not a comms key file (problem at key `{key}`)"))
        })?;
        let secret = hex_decode_32(file.secret_key.trim())
            .ok_or_else(|| error("key `secret_key`: expected 64 hex digits".into()))?;
        let identity = Self::from_secret_bytes(&secret);
        let public: PublicKey =
            file.public_key.parse().map_err(|_| error("key `public_key`: expected 64 hex digits".into()))?;
        if public != identity.public_key() {
            return Err(error("`public_key` does not belong to `secret_key`".into()));
        }
        Ok(identity)
    }

    /// Writes this identity to a new file with owner-only permissions; refuses to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let text = format!(
            "# comms node identity (Ed25519). Keep this file secret.\npublic_key = \"{}\"\nsecret_key = \"{}\"\n",
            self.public_key().to_hex(),
            hex_encode(self.signing.as_bytes())
        );
        super::secret_file::write_new_owner_only(path, &text)
    }

    /// The 32 secret bytes, for deriving link keys. Never log them.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }
}

fn hex_decode_32(text: &str) -> Option<[u8; 32]> {
    hex_decode(text)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_bound_to_keys() {
        let identity = Identity::generate();
        let key = identity.public_key();
        assert_eq!(PublicKey::of_node(&identity.node_id(Some("alice"))), Some(key));
        assert_eq!(PublicKey::of_node(&identity.node_id(None)), Some(key));
        assert!(identity.node_id(Some("alice")).as_str().starts_with("alice-"));
        assert_eq!(PublicKey::of_node(&NodeId::new("alice")), None);
        let glued = NodeId::new(format!("alice{}", key.to_hex()));
        assert_eq!(PublicKey::of_node(&glued), None, "the key must follow a dash");
    }

    #[test]
    fn signatures_verify_only_with_the_signer_and_message() {
        let alice = Identity::generate();
        let mallory = Identity::generate();
        let signature = alice.sign(b"hello");
        assert!(alice.public_key().verify(b"hello", &signature));
        assert!(!alice.public_key().verify(b"hellO", &signature));
        assert!(!mallory.public_key().verify(b"hello", &signature));
        assert!(!alice.public_key().verify(b"hello", &signature[..63]));
    }

    #[test]
    fn key_files_round_trip_and_are_owner_only() {
        let dir = std::env::temp_dir().join(format!("comms-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        let _ = std::fs::remove_file(&path);
        let identity = Identity::generate();
        identity.save_new(&path).unwrap();
        assert_eq!(Identity::load(&path).unwrap().public_key(), identity.public_key());
        assert!(identity.save_new(&path).is_err(), "an existing key file is never overwritten");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let error = Identity::load(&path).unwrap_err();
            assert!(error.reason.contains("chmod 600"), "{error}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let secret = text.lines().find(|l| l.starts_with("secret_key")).unwrap().to_string();
        assert!(!format!("{identity:?}").contains(&secret[14..30]), "Debug never shows the secret");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mismatched_or_malformed_key_files_are_refused_without_quoting_them() {
        let dir = std::env::temp_dir().join(format!("comms-identity-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.key");
        let a = Identity::generate();
        let b = Identity::generate();
        let secret = hex_encode(&a.secret_bytes());
        let write = |text: String| {
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        };
        write(format!("public_key = \"{}\"\nsecret_key = \"{secret}\"\n", b.public_key()));
        let error = Identity::load(&path).unwrap_err().to_string();
        assert!(error.contains("does not belong"), "{error}");
        assert!(!error.contains(&secret), "{error}");
        write(format!("public_key = \"{}\"\nsecret_key = \"{secret}\"\nextra = 1\n", a.public_key()));
        let error = Identity::load(&path).unwrap_err().to_string();
        assert!(error.contains("extra") && !error.contains(&secret), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

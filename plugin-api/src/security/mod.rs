//! Security: node identities, authenticated and encrypted links, who may connect.
//!
//! - [`identity`]: Ed25519 key pairs (`comms keygen`), owner-only key files, node ids bound to
//!   public keys so that an id cannot be claimed without the secret key.
//! - [`link`]: what the host tells a transport plugin about link security ([`LinkSecurity`]):
//!   the mode in force (plain or Noise), this node's identity and the allow-list of peer keys
//!   (or a shared network key).
//! - [`noise`]: the Noise XX handshake that authenticates a link by those identities and keys
//!   the encryption of everything after it; medium-independent (streams and datagrams).
//!
//! ## How the host passes link security to a plugin
//!
//! The node's config has one `[security]` section; the host copies what transports need into
//! each transport's table under the reserved key [`SETUP_KEY`] (paths made absolute).
//! [`crate::Setup::config`] removes that key before deserializing the plugin's own config, and
//! [`crate::Setup::link_security`] reads it. A transport that encrypts and authenticates its links
//! declares [`crate::Capabilities::ENCRYPTED`]; the host refuses to start a node whose config asks
//! for encrypted links with a transport that does not declare it, so a plugin that ignores
//! [`SETUP_KEY`] can never silently run in the clear.

pub mod identity;
pub mod link;
pub mod noise;
mod secret_file;

pub use identity::{Identity, KeyFileError, PublicKey};
pub use link::{AllowList, LinkMode, LinkSecurity, LinkSecurityConfig, NetworkKey, SETUP_KEY};
pub use noise::{HandshakeError, NoiseHandshake, NoiseIdentity};

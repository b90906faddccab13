//! Security: node identities, authenticated and encrypted links, who may connect.
//!
//! - `identity` (feature `noise`): Ed25519 key pairs (`comms keygen`), owner-only key files, node ids bound to
//!   public keys so that an id cannot be claimed without the secret key.
//! - [`link`]: what the host tells a transport plugin about link security ([`LinkSecurity`]):
//!   the mode in force (plain or Noise), this node's identity and the allow-list of peer keys
//!   (or a shared network key).
//! - `signed` (feature `noise`): datagrams and records signed by node identities, for protocols
//!   without a link to authenticate (the gossip and Kademlia discoveries).
//! - [`noise`] (feature `noise`): the Noise XX handshake that authenticates a link by those identities and keys
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

//!
//! ## Cargo feature `noise`
//!
//! Identities, the handshake and encrypted links need the cargo feature `noise` of
//! comms-plugin-api (it builds ed25519-dalek, snow and ring). Without it this module keeps only
//! what a plugin needs to read the host's table ([`SETUP_KEY`], [`LinkSecurityConfig`]):
//! [`crate::Setup::link_security`] returns `None` for plain links and an error naming the feature
//! when the host asks for encrypted ones, so such a plugin never declares
//! [`crate::Capabilities::ENCRYPTED`] and never runs in the clear by mistake.

#[cfg(feature = "noise")]
pub mod identity;
pub mod link;
#[cfg(feature = "noise")]
pub mod noise;
#[cfg(feature = "noise")]
mod secret_file;
#[cfg(feature = "noise")]
pub mod signed;

/// Built without the cargo feature `noise`: only the size limit of Noise messages, from which
/// the stream protocol's frame limits are computed (a plain node still recognises and refuses a
/// peer's handshake).
#[cfg(not(feature = "noise"))]
pub mod noise {
    /// Largest Noise message (handshake or transport), as the Noise specification fixes it.
    pub const MAX_MESSAGE_BYTES: usize = 65_535;
}

#[cfg(feature = "noise")]
pub use identity::{Identity, KeyFileError, PublicKey};
#[cfg(feature = "noise")]
pub use link::{AllowList, NetworkKey};
pub use link::{LinkMode, LinkSecurity, LinkSecurityConfig, SETUP_KEY};
#[cfg(feature = "noise")]
pub use noise::{HandshakeError, NoiseHandshake, NoiseIdentity};

/// The error for encrypted links asked of a build without the cargo feature `noise`.
#[cfg(not(feature = "noise"))]
pub(crate) fn noise_unavailable() -> crate::PluginError {
    crate::PluginError::unsupported(
        "this plugin was built without encrypted-link support (comms-plugin-api feature `noise`)",
    )
}

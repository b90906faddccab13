//! Link security settings as a transport plugin receives them from the host.

#[cfg(feature = "noise")]
use super::identity::{hex_decode, Identity, PublicKey};
use crate::PluginError;
use serde::Deserialize;
use std::path::PathBuf;
#[cfg(feature = "noise")]
use std::{collections::BTreeSet, fmt, sync::Arc};

/// The reserved key of a transport's config table under which the host passes
/// [`LinkSecurityConfig`].
pub const SETUP_KEY: &str = "comms_security";

/// Whether links are encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// No encryption, no authentication: for trusted local use only.
    #[default]
    Plain,
    /// A Noise handshake authenticates both ends by their identity keys; everything after it
    /// is encrypted.
    Noise,
}

/// The table the host passes under [`SETUP_KEY`]; also the link part of a node's `[security]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSecurityConfig {
    /// `plain` or `noise`.
    pub links: LinkMode,
    /// This node's key file (required with `noise`).
    pub key_file: Option<PathBuf>,
    /// Public keys (hex, or node ids bound to keys) that may connect; `"*"` allows any key.
    pub allow: Vec<String>,
    /// A file holding a 32-byte key shared by the whole network; only holders can connect.
    pub network_key_file: Option<PathBuf>,
}

/// Which peers may connect.
#[cfg(feature = "noise")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowList {
    /// Any authenticated key (with a network key: any holder of it).
    AnyKey,
    /// Only these keys.
    Keys(BTreeSet<PublicKey>),
}

#[cfg(feature = "noise")]
impl AllowList {
    /// Parses config entries: public keys in hex, node ids bound to keys, or `"*"`.
    /// `key` names the config key in errors.
    pub fn parse(entries: &[String], key: &str) -> Result<Self, PluginError> {
        if entries.iter().any(|entry| entry == "*") {
            return Ok(AllowList::AnyKey);
        }
        let mut keys = BTreeSet::new();
        for entry in entries {
            let parsed = entry
                .parse::<PublicKey>()
                .ok()
                .or_else(|| PublicKey::of_node(&crate::NodeId::new(entry.as_str())))
                .ok_or_else(|| {
                    PluginError::invalid_config(format!(
                        "key `{key}`: `{entry}` is neither a public key (64 hex digits) nor a node id ending in one"
                    ))
                })?;
            keys.insert(parsed);
        }
        Ok(AllowList::Keys(keys))
    }

    /// Whether `key` may connect.
    pub fn permits(&self, key: &PublicKey) -> bool {
        match self {
            AllowList::AnyKey => true,
            AllowList::Keys(keys) => keys.contains(key),
        }
    }
}

/// A 32-byte key shared by every node of a network. `Debug` never shows it.
#[cfg(feature = "noise")]
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkKey(pub [u8; 32]);

#[cfg(feature = "noise")]
impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetworkKey(..)")
    }
}

#[cfg(feature = "noise")]
impl NetworkKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    /// Reads a network key file (`network_key = "<64 hex digits>"`, owner-only).
    pub fn load(path: &std::path::Path) -> Result<Self, super::KeyFileError> {
        let error = |reason: String| super::KeyFileError { path: path.display().to_string(), reason };
        let text = super::secret_file::read_owner_only(path, "network key")?;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            network_key: String,
        }
        let file: File = crate::config::parse_config(&text)
            .map_err(|_| error("not a comms network key file (expected `network_key = \"<hex>\"`)".into()))?;
        let bytes = hex_decode(file.network_key.trim())
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| error("key `network_key`: expected 64 hex digits".into()))?;
        Ok(Self(bytes))
    }

    /// Writes a new owner-only network key file; refuses to overwrite.
    pub fn save_new(&self, path: &std::path::Path) -> Result<(), super::KeyFileError> {
        let text = format!(
            "# comms network key: every node holding it may join. Keep this file secret.\nnetwork_key = \"{}\"\n",
            super::identity::hex_encode(&self.0)
        );
        super::secret_file::write_new_owner_only(path, &text)
    }
}

/// Link security in force for one transport, resolved from [`LinkSecurityConfig`]: present only
/// in `noise` mode. Cheap to clone.
#[cfg(feature = "noise")]
#[derive(Debug, Clone)]
pub struct LinkSecurity {
    /// This node's identity.
    pub identity: Arc<Identity>,
    /// Which peer keys may connect.
    pub allow: AllowList,
    /// The shared network key, if the network uses one.
    pub network_key: Option<NetworkKey>,
}

#[cfg(feature = "noise")]
impl LinkSecurity {
    /// Resolves `config`: `None` in plain mode; loads the key files in noise mode. Errors name the
    /// `security.*` key and the file, never a secret.
    pub fn from_config(config: &LinkSecurityConfig) -> Result<Option<Self>, PluginError> {
        if config.links == LinkMode::Plain {
            return Ok(None);
        }
        let key_file = config.key_file.as_ref().ok_or_else(|| {
            PluginError::invalid_config(
                "key `node.key_file`: encrypted links (`security.links = \"noise\"`) need this node's key file \
                 (create one with `comms keygen`)",
            )
        })?;
        let identity = Identity::load(key_file)
            .map_err(|e| PluginError::invalid_config(format!("key `node.key_file`: {e}")))?;
        let network_key =
            match &config.network_key_file {
                Some(path) => Some(NetworkKey::load(path).map_err(|e| {
                    PluginError::invalid_config(format!("key `security.network_key_file`: {e}"))
                })?),
                None => None,
            };
        let allow = match (config.allow.is_empty(), &network_key) {
            (true, Some(_)) => AllowList::AnyKey,
            (true, None) => {
                return Err(PluginError::invalid_config(
                    "key `security.allow`: with encrypted links, list the public keys that may connect, \
                     or \"*\" for any key, or set `security.network_key_file`",
                ))
            }
            (false, _) => AllowList::parse(&config.allow, "security.allow")?,
        };
        Ok(Some(Self { identity: Arc::new(identity), allow, network_key }))
    }

    /// A noise-mode setting built in code (tests, embedded use).
    pub fn new(identity: Identity, allow: AllowList, network_key: Option<NetworkKey>) -> Self {
        Self { identity: Arc::new(identity), allow, network_key }
    }
}

/// Link security in force for one transport. This build of comms-plugin-api has no
/// encrypted-link support (cargo feature `noise`), so no value of this type exists:
/// [`LinkSecurity::from_config`] returns `None` for plain links and an error for `noise`.
#[cfg(not(feature = "noise"))]
#[derive(Debug, Clone)]
pub struct LinkSecurity {
    _unavailable: Unavailable,
}

#[cfg(not(feature = "noise"))]
#[derive(Debug, Clone)]
enum Unavailable {}

#[cfg(not(feature = "noise"))]
impl LinkSecurity {
    /// `None` in plain mode; in noise mode an error saying this plugin was built without the
    /// cargo feature `noise` of comms-plugin-api.
    pub fn from_config(config: &LinkSecurityConfig) -> Result<Option<Self>, PluginError> {
        match config.links {
            LinkMode::Plain => Ok(None),
            LinkMode::Noise => Err(super::noise_unavailable()),
        }
    }
}

#[cfg(all(test, not(feature = "noise")))]
mod tests_without_noise {
    use super::*;

    #[test]
    fn plain_links_need_nothing_and_noise_links_name_the_missing_feature() {
        assert!(LinkSecurity::from_config(&LinkSecurityConfig::default()).unwrap().is_none());
        let noise = LinkSecurityConfig { links: LinkMode::Noise, ..Default::default() };
        let error = LinkSecurity::from_config(&noise).unwrap_err();
        assert_eq!(
            error.message,
            "this plugin was built without encrypted-link support (comms-plugin-api feature `noise`)"
        );
        assert_eq!(error.code, crate::ErrorCode::UNSUPPORTED);
    }
}

#[cfg(all(test, feature = "noise"))]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_take_keys_node_ids_and_star() {
        let a = Identity::generate();
        let b = Identity::generate();
        let list = AllowList::parse(&[a.public_key().to_hex(), b.node_id(Some("bob")).to_string()], "allow")
            .unwrap();
        assert!(list.permits(&a.public_key()) && list.permits(&b.public_key()));
        assert!(!list.permits(&Identity::generate().public_key()));
        assert_eq!(AllowList::parse(&["*".into()], "allow").unwrap(), AllowList::AnyKey);
        let error = AllowList::parse(&["bob".into()], "security.allow").unwrap_err();
        assert!(error.message.contains("`security.allow`") && error.message.contains("`bob`"), "{error}");
    }

    #[test]
    fn plain_mode_needs_nothing_and_noise_mode_needs_a_key_and_an_allow_list() {
        assert!(LinkSecurity::from_config(&LinkSecurityConfig::default()).unwrap().is_none());
        let noise = LinkSecurityConfig { links: LinkMode::Noise, ..Default::default() };
        let error = LinkSecurity::from_config(&noise).unwrap_err();
        assert!(error.message.contains("node.key_file"), "{error}");
    }
}

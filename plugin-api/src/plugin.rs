//! The plugin as a whole: its description and constructors.

use crate::{
    config::parse_config,
    security::{LinkSecurity, LinkSecurityConfig, SETUP_KEY},
    Discovery, Extensions, NodeId, PluginError, Transport,
};
use async_trait::async_trait;
pub use comms_core::Provides;
use comms_core::{InterfaceVersion, LINK_SECURITY_EXTENSION};
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// What a constructor is given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Setup {
    /// The node this instance serves.
    pub node_id: NodeId,
    /// The config table name the host uses for it (e.g. `"tcp"`).
    pub instance_name: String,
    /// The plugin's TOML table as text.
    pub config_toml: String,
    /// The contract version the host speaks: a plugin built for a newer minor can tell which of
    /// its additions the host will use.
    pub host_interface: InterfaceVersion,
    /// Attributes of later contract versions.
    pub extensions: Extensions,
}

impl Setup {
    /// Deserializes the plugin's table into its config struct with [`crate::config::parse_config`]:
    /// errors name the key, and a key the struct does not read is an error (naming the keys it
    /// does read) whether or not the struct has `#[serde(deny_unknown_fields)]`. The key the host
    /// reserves for link security ([`crate::security::SETUP_KEY`]) is left out.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, PluginError> {
        let (own, _) = self.split_security()?;
        parse_config(&own)
    }

    /// The link security the host asks for: `None` for plain links (the default), or the
    /// loaded identity and allow-list for Noise links. A transport that supports encrypted links
    /// must honour it and then declare [`crate::Capabilities::ENCRYPTED`]. A discovery gets it
    /// too from a 1.2 host (in the setup's extension [`LINK_SECURITY_EXTENSION`]), to
    /// authenticate what it exchanges by the node's identity.
    pub fn link_security(&self) -> Result<Option<LinkSecurity>, PluginError> {
        let (_, security) = self.split_security()?;
        let security = match security {
            Some(table) => Some(table),
            None => match self.extensions.get(LINK_SECURITY_EXTENSION) {
                None => None,
                Some(bytes) => Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                    PluginError::invalid_config(format!(
                        "extension `{LINK_SECURITY_EXTENSION}`: not UTF-8 text"
                    ))
                })?),
            },
        };
        match security {
            Some(table) => LinkSecurity::from_config(&parse_config::<LinkSecurityConfig>(&table)?),
            None => Ok(None),
        }
    }

    /// The plugin's own table and the host's security table, each as TOML text.
    fn split_security(&self) -> Result<(String, Option<String>), PluginError> {
        if !self.config_toml.contains(SETUP_KEY) {
            return Ok((self.config_toml.clone(), None));
        }
        let mut table: toml::Table = toml::from_str(&self.config_toml)
            .map_err(|error| PluginError::invalid_config(error.message().to_string()))?;
        let security = match table.remove(SETUP_KEY) {
            Some(toml::Value::Table(security)) => Some(security.to_string()),
            Some(_) => {
                return Err(PluginError::invalid_config(format!("key `{SETUP_KEY}`: reserved for the host")))
            }
            None => None,
        };
        Ok((table.to_string(), security))
    }
}

/// Name, version and description of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PluginDescription {
    /// Short name; the library file is conventionally `libcomms_<name>.so`.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// One line.
    pub description: String,
    /// Transport, discovery, layer, or several.
    pub provides: Provides,
    /// The contract version the plugin was built for.
    pub interface_version: InterfaceVersion,
}

/// A plugin library: implement this on a unit struct and pass it to [`crate::export_plugin!`].
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Short name, e.g. `"tcp"`.
    const NAME: &'static str;
    /// The plugin's version; usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// One line for `comms plugins list`.
    const DESCRIPTION: &'static str;
    /// What the constructors below provide.
    const PROVIDES: Provides;
    /// Worker threads of this library's runtime when the host's configuration leaves it to the
    /// plugin (`[node] plugin_threads = 0`, the default). Two suit a plugin whose client library
    /// does its I/O on this runtime; a plugin whose sockets the host drives
    /// ([`crate::host_driven`]) only connects, accepts and keeps timers here, and one is enough.
    const WORKER_THREADS: usize = crate::runtime::DEFAULT_WORKER_THREADS;

    /// Builds a transport. The default says the plugin has none.
    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let _ = setup;
        Err(PluginError::unsupported(format!("plugin `{}` provides no transport", Self::NAME)))
    }

    /// Builds a discovery. The default says the plugin has none.
    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        let _ = setup;
        Err(PluginError::unsupported(format!("plugin `{}` provides no discovery", Self::NAME)))
    }

    /// Builds a layer over `inner`, the transport (or lower layer) below it: see
    /// [`crate::layer`]. The layer owns `inner` and closes it in its own `close`. Needs a host
    /// speaking contract 1.2 or newer (an older one never calls it). The default says the plugin
    /// has none.
    async fn new_layer(setup: Setup, inner: Arc<dyn Transport>) -> Result<Arc<dyn Transport>, PluginError> {
        let _ = (setup, inner);
        Err(PluginError::unsupported(format!("plugin `{}` provides no layer", Self::NAME)))
    }
}

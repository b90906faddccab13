//! The plugin as a whole: its description and constructors.

use crate::{config::parse_config, Discovery, NodeId, PluginError, Transport};
use async_trait::async_trait;
pub use comms_core::Provides;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// What a constructor is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// The node this instance serves.
    pub node_id: NodeId,
    /// The config table name the host uses for it (e.g. `"tcp"`).
    pub instance_name: String,
    /// The plugin's TOML table as text.
    pub config_toml: String,
}

impl Setup {
    /// Deserializes the plugin's table into its config struct; errors name the key.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, PluginError> {
        parse_config(&self.config_toml)
    }
}

/// Name, version and description of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginDescription {
    /// Short name; the library file is conventionally `libcomms_<name>.so`.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// One line.
    pub description: String,
    /// Transport, discovery or both.
    pub provides: Provides,
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
}

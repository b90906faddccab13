//! Static discovery: the peers are listed in the config file.
//!
//! It implements the same [`Discovery`] interface as discovery plugins and reaches the node
//! through the same boundary (as a plugin linked into the host), so nothing in the node treats
//! it specially. It never sees peers join or leave: the list is the list.

use comms_plugin_api::{
    async_trait, Discovery, NodeId, NodeRecord, PeerEvent, Plugin, PluginError, Provides, Setup,
};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, sync::Arc};
use tokio::sync::watch;

/// The name that selects static discovery in `[discovery] plugin = ...`.
pub const STATIC_DISCOVERY: &str = "static";

/// The `[discovery]` table of static discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticDiscoveryConfig {
    /// The peers this node can reach.
    #[serde(default)]
    pub peers: Vec<StaticPeer>,
}

/// One peer in the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    /// Its node id.
    pub id: String,
    /// Transport name to address, e.g. `{ tcp = "127.0.0.1:7002" }`.
    pub addresses: BTreeMap<String, String>,
    /// Services it serves.
    #[serde(default)]
    pub services: Vec<String>,
    /// Topics it subscribes to.
    #[serde(default)]
    pub topics: Vec<String>,
}

impl StaticPeer {
    fn into_record(self) -> NodeRecord {
        let mut record = NodeRecord::new(NodeId::new(self.id));
        record.addresses = self.addresses.into_iter().collect();
        record.services = self.services;
        record.topics = self.topics;
        record
    }
}

/// The built-in plugin that provides [`StaticDiscovery`].
#[derive(Debug)]
pub struct StaticDiscoveryPlugin;

#[async_trait]
impl Plugin for StaticDiscoveryPlugin {
    const NAME: &'static str = STATIC_DISCOVERY;
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "peers listed in the config file (built in)";
    const PROVIDES: Provides = Provides::DISCOVERY;

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        let config: StaticDiscoveryConfig = setup.config()?;
        for (index, peer) in config.peers.iter().enumerate() {
            if let Err(problem) = NodeId::new(peer.id.as_str()).check() {
                return Err(PluginError::invalid_config(format!(
                    "key `peers[{index}].id`: {:?} {problem}",
                    peer.id
                )));
            }
        }
        let peers = config
            .peers
            .into_iter()
            .map(StaticPeer::into_record)
            .filter(|peer| peer.id != setup.node_id)
            .collect();
        let (closed, _) = watch::channel(false);
        Ok(Arc::new(StaticDiscovery { peers, closed }))
    }
}

/// A fixed list of peers.
#[derive(Debug)]
pub struct StaticDiscovery {
    peers: Vec<NodeRecord>,
    closed: watch::Sender<bool>,
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn announce(&self, _record: NodeRecord) -> Result<(), PluginError> {
        Ok(())
    }

    async fn withdraw(&self, _node: NodeId) -> Result<(), PluginError> {
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        Ok(self.peers.clone())
    }

    async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        let mut closed = self.closed.subscribe();
        let _ = closed.wait_for(|closed| *closed).await;
        Ok(None)
    }

    async fn close(&self) -> Result<(), PluginError> {
        self.closed.send_replace(true);
        Ok(())
    }
}

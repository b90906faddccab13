//! What a node is asked to be: the settings from the `[node]` table of a config file or from a
//! [`crate::NodeBuilder`], checked by one [`NodeSpec::validate`] whichever way they came.

use crate::{
    codec::Codec,
    engine::EngineSpec,
    request_response::{Balancing, RequestOptions},
};
use comms_plugin_api::{host_side::PluginLibrary, security::AllowList, NodeId};
use std::{path::PathBuf, time::Duration};

/// Where a plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// Searched for by name in the plugin directories.
    Name(String),
    /// An explicit file.
    Path(PathBuf),
}

/// A plugin as a builder names it: a name or file, or a library already loaded or linked.
#[derive(Debug, Clone)]
pub(crate) enum PluginChoice {
    Source(PluginSource),
    Library(PluginLibrary),
}

/// One transport of a node: its name, its plugin, its settings and its layers.
#[derive(Debug, Clone)]
pub(crate) struct TransportSpec {
    pub(crate) name: String,
    pub(crate) plugin: PluginChoice,
    pub(crate) config_toml: String,
    /// Layers over the transport, the outermost (the one the node calls) first.
    pub(crate) layers: Vec<LayerSpec>,
}

/// A layer over a transport (see [`comms_plugin_api::layer`]): its plugin and its own settings.
#[derive(Debug, Clone)]
pub(crate) struct LayerSpec {
    pub(crate) plugin: PluginChoice,
    pub(crate) config_toml: String,
}

/// The fault-injection layer is built into the host (like static discovery): `faults` in a
/// transport's `layers`, and its `faults` key, need no library file.
pub(crate) const FAULTS_LAYER: &str = "faults";

/// Messages buffered per subscription. Publications that come at most once (TCP, UDP, memory,
/// Redis pub/sub, this node's own) for a full subscription are dropped and counted
/// ([`crate::Subscription::dropped`]), as NATS and ZeroMQ do with a slow subscriber: a subscriber
/// that stops reading must not hold up the transport its messages come on, and with it requests,
/// responses and heartbeats. Publications from a transport with acknowledgements wait instead
/// (the broker keeps them; nothing is lost).
pub const SUBSCRIPTION_BUFFER: usize = 256;

/// Requests handled at once per service of a node. One more is answered `unavailable` at once
/// (the caller tries another replica): a saturated service must not hold up the transport it
/// came on, and with it the responses, heartbeats and other services behind it.
pub(crate) const MAX_CONCURRENT_REQUESTS: usize = 256;

/// How long a message from a transport with acknowledgements waits for room in a full local
/// queue (the inbox, a subscription) before it is handed back to its broker, which delivers it
/// again later.
pub(crate) const REQUEUE_AFTER: Duration = Duration::from_secs(1);

/// Node-wide settings from the `[node]` table or the builder.
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    pub(crate) codec: Codec,
    pub(crate) receive_queue_capacity: usize,
    pub(crate) heartbeat_interval: Option<Duration>,
    pub(crate) peer_timeout: Duration,
    pub(crate) balancing: Balancing,
    pub(crate) request_options: RequestOptions,
    pub(crate) close_timeout: Duration,
    /// Forward messages addressed to other nodes (a bridge between backends).
    pub(crate) relay: bool,
    /// Message ids remembered to give the application each message once; 0: off.
    pub(crate) dedup_window: usize,
    /// Keys of the nodes that may shut this one down (`[admin] keys`); `None`: nobody.
    pub(crate) admins: Option<AllowList>,
}

impl NodeSpec {
    /// The one check of node settings, for config files and builders alike; the message names
    /// the config key.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_some_and(|interval| self.peer_timeout <= interval) {
            return Err("key `node.peer_timeout_ms`: must be longer than heartbeat_interval_ms".into());
        }
        if self.request_options.attempts == 0 {
            return Err("key `node.request_attempts`: must be at least 1".into());
        }
        if self.receive_queue_capacity == 0 {
            return Err("key `node.receive_queue_capacity`: must be greater than 0".into());
        }
        Ok(())
    }

    /// The one check of a node's own id, for config files and builders alike (the same rule
    /// every node applies to the ids of its peers: [`NodeId::check`]); the message names the
    /// config key. An id with a newline would forge log lines, an empty one names nothing.
    pub(crate) fn validate_id(id: &NodeId) -> Result<(), String> {
        id.check().map_err(|problem| {
            format!(
                "key `node.id`: {:?} {problem} (a node id is 1 to {} bytes of text with no control \
                 character)",
                id.as_str(),
                comms_plugin_api::node_limits::MAX_NODE_ID_BYTES
            )
        })
    }

    /// What the engine of node `id` needs of it.
    pub(crate) fn engine_spec(&self, id: NodeId) -> EngineSpec {
        EngineSpec {
            id,
            heartbeat_interval: self.heartbeat_interval,
            peer_timeout: self.peer_timeout,
            inbox_capacity: self.receive_queue_capacity,
            subscription_capacity: SUBSCRIPTION_BUFFER,
            relay: self.relay,
            dedup_window: self.dedup_window,
            requeue_after: REQUEUE_AFTER,
            balancing: self.balancing,
        }
    }
}

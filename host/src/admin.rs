//! Remote administration: every node answers the built-in service [`STATUS_SERVICE`] over comms
//! itself, whatever its transports, with a [`NodeStatus`]: what it runs, what its transports
//! have done, whom it knows, how full its queues are.
//!
//! ```no_run
//! # async fn f(node: comms_host::Node) -> Result<(), comms_host::RequestError> {
//! let status = node.remote_status("billing-2", std::time::Duration::from_secs(2)).await?;
//! println!("{} up for {} ms, {} peers", status.id, status.uptime_ms, status.peers.len());
//! # Ok(()) }
//! ```
//!
//! From a shell: `comms status NODE --config my.toml`.
//!
//! Services whose names start with [`RESERVED_PREFIX`] are the framework's: a node answers them
//! but does not announce them in its record, so they never show up as an application's service
//! and a request must name the node ([`crate::Node::request_node`]).
//!
//! Shutdown: a node whose key is listed in `[admin] keys` ([`crate::NodeBuilder::admin_keys`])
//! may ask another to close gracefully ([`SHUTDOWN_SERVICE`], [`crate::Node::remote_shutdown`],
//! `comms shutdown NODE --config admin.toml`). The admin keys need `[security] signatures =
//! "require"` on the node, so that the caller's id, bound to its key, is proven by the
//! envelope's signature. The node answers, then closes as [`crate::Node::close`] does (requests in
//! flight finish, peers are told, queues are flushed); its application sees
//! [`crate::Node::closed`] complete and `receive` end with [`crate::ReceiveError::Closed`].
//!
//! Reload: an admin may also ask a node to read its config file again and apply it
//! ([`RELOAD_SERVICE`], [`crate::Node::remote_reload`], `comms reload NODE --config admin.toml`),
//! as `SIGHUP` does to `comms run`: see [`crate::reload`] for what can change on a running node.
//! The answer says what changed, or why nothing did.
//!
//! Limits: status is read-only, and any node that can send to this one can read it (with
//! `[security] allow` only the listed nodes can).

use serde::{Deserialize, Serialize};

/// The service every node answers with its [`NodeStatus`]; the request is `()`.
pub const STATUS_SERVICE: &str = "comms.status";

/// The service that closes a node when an admin asks; the request is `()`, the answer a line
/// of text (see the module docs).
pub const SHUTDOWN_SERVICE: &str = "comms.shutdown";

/// The service that makes a node read its config file again and apply it when an admin asks
/// (see [`crate::reload`]); the request is `()`, the answer a line saying what changed.
pub const RELOAD_SERVICE: &str = "comms.reload";

/// Services named with this prefix belong to the framework and are not announced.
pub const RESERVED_PREFIX: &str = "comms.";

/// Whether `service` is one of the framework's own (see [`RESERVED_PREFIX`]).
pub fn is_reserved(service: &str) -> bool {
    service.starts_with(RESERVED_PREFIX)
}

/// A node's state as it reports it ([`crate::Node::status`], [`STATUS_SERVICE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub id: String,
    /// Time since the node started, in milliseconds.
    pub uptime_ms: u64,
    /// Its transports, in preference order, with what each has done.
    pub transports: Vec<TransportStatus>,
    /// The peers it knows, sorted by id.
    pub peers: Vec<PeerSummary>,
    /// The services it announces.
    pub services: Vec<String>,
    /// The topic patterns it subscribes to.
    pub topics: Vec<String>,
    /// Received messages the application has not taken yet.
    pub inbox_depth: u64,
    /// Its calls waiting for a response.
    pub requests_waiting: u64,
    /// Requests its services are handling.
    pub requests_being_served: u64,
    /// Incoming envelopes refused by the signature checks.
    pub rejected_envelopes: u64,
    /// Repeated messages dropped by the dedup window.
    pub duplicates_dropped: u64,
}

/// One transport of a [`NodeStatus`]: the counts its plugin keeps (totals since it started,
/// the node's own control messages included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportStatus {
    /// The transport's name (its config table).
    pub name: String,
    /// The plugin that provides it.
    pub plugin: String,
    /// The plugin's version (empty from a node older than this field).
    #[serde(default)]
    pub plugin_version: String,
    /// Where peers reach the node through it.
    pub local_address: String,
    /// Messages taken to send.
    pub messages_sent: u64,
    /// Payload bytes of those.
    pub bytes_sent: u64,
    /// Messages handed to the node.
    pub messages_received: u64,
    /// Payload bytes of those.
    pub bytes_received: u64,
    /// Sends that failed.
    pub send_errors: u64,
    /// Receives that failed and the transport's own errors.
    pub errors: u64,
    /// Connections opened again after they were lost.
    pub reconnects: u64,
    /// Messages queued for sending, not yet written.
    pub send_queue_depth: u64,
    /// Messages received, waiting for the node.
    pub receive_queue_depth: u64,
    /// The plugin's own statistics (e.g. `tcp.connections.open`), by name.
    pub counters: Vec<(String, u64)>,
    /// The longest poll of a plugin future that blocked the node's thread, if one did: the
    /// operation and how long, in microseconds.
    pub longest_blocking_poll: Option<(String, u64)>,
    /// Received messages the node acknowledged (handled). Absent from older nodes' answers: 0.
    #[serde(default)]
    pub settled_accepted: u64,
    /// Received messages the node gave back to be delivered again.
    #[serde(default)]
    pub settled_requeued: u64,
    /// Received messages the node refused for good (discarded or dead-lettered).
    #[serde(default)]
    pub settled_rejected: u64,
    /// Calls into the plugin that panicked (caught at the boundary, returned as errors).
    #[serde(default)]
    pub plugin_panics: u64,
}

/// One peer of a [`NodeStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// The peer's id.
    pub id: String,
    /// `up`, `down` or `offline`.
    pub status: String,
    /// Time since it was last heard from, in milliseconds.
    pub last_seen_ms: u64,
}

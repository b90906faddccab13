//! Errors, one type per operation.

use crate::codec::CodecError;
use comms_plugin_api::{host_side::LoadError, MessageId, NodeId, PluginError};
use std::path::PathBuf;

/// Why a node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is wrong (the message names the file and the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No plugin file with that name in any plugin directory.
    #[error("{role}: plugin `{name}` not found: no {file} in {searched} (set [node] plugin_dirs or COMMS_PLUGIN_PATH, or give `path`)")]
    PluginNotFound {
        /// Which part of the node needed it (`transport \`tcp\``, `discovery`).
        role: String,
        /// The plugin name.
        name: String,
        /// The file name looked for.
        file: String,
        /// The directories searched.
        searched: String,
    },
    /// The plugin file could not be loaded (incompatible, not a plugin, ...).
    #[error("{role}: {source}")]
    Load {
        /// Which part of the node needed it.
        role: String,
        /// Why loading failed; `details()` has the long form.
        #[source]
        source: Box<LoadError>,
    },
    /// The plugin loaded but refused to start.
    #[error("{role} (plugin `{plugin}`) failed to start: {error}")]
    Start {
        /// Which part of the node.
        role: String,
        /// The plugin name.
        plugin: String,
        /// What the plugin said.
        error: PluginError,
    },
    /// The node has no transport at all.
    #[error("no transport configured: add a [transports.NAME] table (e.g. [transports.tcp])")]
    NoTransport,
    /// Node settings that cannot work together (the message names the config key).
    #[error("{0}")]
    InvalidSettings(String),
}

/// Why a reload ([`crate::Node::reload`]) did not apply the new configuration.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration could not be read or its plugins could not start; the node keeps
    /// running what it ran.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The new configuration changes what cannot change on a running node; nothing was changed.
    #[error("the new configuration{} cannot be applied to the running node, which keeps its configuration: {}", in_file(.file), .reasons.join("; "))]
    Refused {
        /// The file of the new configuration, if any.
        file: Option<PathBuf>,
        /// One reason per key or transport.
        reasons: Vec<String>,
    },
    /// A step failed after others had been applied: `applied` says what the node runs now.
    #[error("reload failed at {step}: {reason} (applied before it: {applied})")]
    Failed {
        /// The step (`transport \`tcp\``, `discovery`).
        step: String,
        /// What went wrong.
        reason: String,
        /// What had been changed before.
        applied: crate::reload::ReloadReport,
    },
    /// The node was built in code, not from a file, so there is no file to read again.
    #[error("this node was not built from a config file: nothing to read again")]
    NoConfigFile,
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
}

fn in_file(file: &Option<PathBuf>) -> String {
    file.as_ref().map(|file| format!(" in {}", file.display())).unwrap_or_default()
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Discovery knows no node with this id.
    #[error("unknown peer `{0}`: discovery has no record of it")]
    UnknownPeer(NodeId),
    /// The peer has no address on any transport this node has.
    #[error("peer `{peer}` is reachable through [{peer_transports}] but this node has [{local_transports}]")]
    NoCommonTransport {
        /// The peer.
        peer: NodeId,
        /// Transports the peer listens on.
        peer_transports: String,
        /// Transports this node has.
        local_transports: String,
    },
    /// The message could not be encoded.
    #[error("encoding the message: {0}")]
    Encode(#[from] CodecError),
    /// The transport refused or failed.
    #[error("transport `{transport}` could not send to `{peer}`: {error}")]
    Transport {
        /// The transport used.
        transport: String,
        /// The destination.
        peer: NodeId,
        /// What the transport said (see `error.retryable`).
        error: PluginError,
    },
    /// Some messages of a batch ([`crate::Node::send_raw_many`]) were not taken; the others were.
    #[error("{} of {total} messages not sent (indexes {failed:?}); the first failure: {first}", failed.len())]
    Batch {
        /// Messages in the batch.
        total: usize,
        /// The positions of those not sent, ascending.
        failed: Vec<usize>,
        /// Why the first of them was not.
        first: Box<SendError>,
    },
    /// A topic or pattern that is not valid.
    #[error("{0}")]
    InvalidTopic(String),
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
}

/// Why a request got no successful response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No attempt got an answer in time.
    #[error("request to `{service}` timed out: {attempts} attempt(s) of {timeout:?} each")]
    Timeout {
        /// The service (or node) called.
        service: String,
        /// Attempts made.
        attempts: u32,
        /// Time allowed per attempt.
        timeout: std::time::Duration,
    },
    /// The handler returned an error; it is not retried.
    #[error("`{node}` answered with an error: {message}")]
    Remote {
        /// The replica that answered.
        node: NodeId,
        /// The handler's error, as text.
        message: String,
    },
    /// No live node serves the service.
    #[error("no live replica serves `{service}`")]
    NoReplica {
        /// The service.
        service: String,
    },
    /// The last replica tried could not take the request (closing, or not serving it).
    #[error("`{node}` could not take the request: {message}")]
    Unavailable {
        /// The replica.
        node: NodeId,
        /// Why.
        message: String,
    },
    /// The last attempt could not be sent.
    #[error(transparent)]
    Send(SendError),
    /// The request could not be encoded.
    #[error("encoding the request: {0}")]
    Encode(CodecError),
    /// The response could not be decoded as the expected type.
    #[error("decoding the response: {0}")]
    Decode(CodecError),
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
}

/// Why a service could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// This node serves it already.
    #[error("`{0}` is already served by this node")]
    AlreadyServed(String),
    /// An empty name.
    #[error("invalid service name `{0}`")]
    InvalidName(String),
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
}

/// Why nothing could be received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The node is closed and every received message has been handed out.
    #[error("the node is closed")]
    Closed,
    /// A message arrived but does not decode as the requested type. It is consumed.
    #[error("message {id} from `{from}` could not be decoded: {source}")]
    Decode {
        /// The sender.
        from: NodeId,
        /// The message.
        id: MessageId,
        /// The codec's complaint.
        #[source]
        source: CodecError,
    },
    /// A transport failed while receiving; the node keeps trying it with backoff.
    #[error("transport `{transport}` failed while receiving: {error}")]
    Transport {
        /// The transport.
        transport: String,
        /// What it said.
        error: PluginError,
    },
}

/// Why waiting for a peer, a service or a subscriber ended without it.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// It did not appear within the time given.
    #[error("{what} did not appear within {} ms", .waited.as_millis())]
    TimedOut {
        /// What was waited for, in words (`peer `bob``, `a replica of `echo``, ...).
        what: String,
        /// How long.
        waited: std::time::Duration,
    },
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
}

/// Why `close` did not finish cleanly. The node is closed anyway.
#[derive(Debug, thiserror::Error)]
#[error("closing: {}", .failures.join("; "))]
pub struct CloseError {
    /// One line per part that failed to close (the undelivered messages among them).
    pub failures: Vec<String>,
    /// Messages `send` had taken that a transport gave up on (a peer stayed unreachable) and
    /// that no [`crate::Node::flush`] reported before.
    pub undelivered: u64,
}

/// Why [`crate::Node::flush`] did not end with every message written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    /// Transports gave up on messages that `send` had taken: `count` were not delivered
    /// (`by_transport`: how many each transport gave up on).
    #[error("{}", undelivered_sentence(*.count, .by_transport))]
    Undelivered {
        /// Messages given up on since the last report.
        count: u64,
        /// `(transport, count)` for each transport that gave some up.
        by_transport: Vec<(String, u64)>,
    },
    /// `queued` messages were still waiting to be written when the deadline passed; they may
    /// still go out (or be reported by the next flush or close).
    #[error("{queued} messages were still queued after {} ms{}", .waited.as_millis(),
        if *.undelivered > 0 { format!("; {}", undelivered_sentence(*.undelivered, &[])) } else { String::new() })]
    TimedOut {
        /// Messages the transports still held.
        queued: u64,
        /// How long flush waited.
        waited: std::time::Duration,
        /// Messages given up on meanwhile (reported here, not again).
        undelivered: u64,
    },
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
}

/// `3 messages were sent but not delivered: transport `tcp` gave up on 3 (peer unreachable)`.
pub(crate) fn undelivered_sentence(count: u64, by_transport: &[(String, u64)]) -> String {
    let messages = if count == 1 { "1 message was".to_string() } else { format!("{count} messages were") };
    let transports: Vec<String> =
        by_transport.iter().map(|(name, count)| format!("transport `{name}` gave up on {count}")).collect();
    if transports.is_empty() {
        format!("{messages} sent but not delivered (their transport gave up on them)")
    } else {
        format!("{messages} sent but not delivered: {} (peer unreachable)", transports.join(", "))
    }
}

/// A config file that could not be used; `Display` names the file and the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", .file.display())]
pub struct ConfigError {
    /// The config file (or `(builder)` for a node built in code).
    pub file: PathBuf,
    /// What is wrong, naming the key.
    pub message: String,
}

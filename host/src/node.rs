//! The `Node`: what applications use.

use crate::{
    codec::{Codec, CONTENT_TYPE_HEADER},
    config::{self, ConfigError, PluginSource},
    error::{BuildError, CloseError, ReceiveError, SendError},
    plugin_search::{find_plugin, plugin_file_name, search_dirs},
    static_discovery::{StaticDiscoveryConfig, StaticDiscoveryPlugin, StaticPeer, STATIC_DISCOVERY},
};
use comms_plugin_api::{
    host_side::{LoadedDiscovery, LoadedTransport, PluginLibrary},
    Capabilities, Destination, Envelope, ErrorCode, MessageId, NodeId, NodeRecord, PeerEventKind,
    PluginError, Settlement, SettlementOutcome,
};
use futures::Stream;
use serde::{de::DeserializeOwned, Serialize};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// Messages taken from a transport per call across the plugin boundary.
const RECEIVE_BATCH: u32 = 256;
/// Default capacity of the node's inbox (messages received but not yet taken by the application).
pub const DEFAULT_RECEIVE_QUEUE_CAPACITY: usize = 1024;
/// How long `close` waits for receive loops to hand over what their transports still had.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A typed message as the application receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received<T> {
    /// Who sent it.
    pub from: NodeId,
    /// Its id (the same if it is delivered twice).
    pub id: MessageId,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// The decoded message.
    pub message: T,
}

/// A transport as the node holds it.
#[derive(Debug)]
struct NodeTransport {
    name: String,
    plugin: String,
    loaded: LoadedTransport,
}

/// What a transport of this node is, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSummary {
    /// The name peers' addresses use (the config table name).
    pub name: String,
    /// The plugin that provides it.
    pub plugin: String,
    /// Where peers reach this node through it.
    pub local_address: String,
    /// What it guarantees.
    pub capabilities: Capabilities,
}

enum InboxItem {
    Message(Envelope),
    TransportFailed { transport: String, error: PluginError },
}

enum PluginChoice {
    Source(PluginSource),
    Library(PluginLibrary),
}

struct TransportSpec {
    name: String,
    plugin: PluginChoice,
    config_toml: String,
}

/// Builds a [`Node`] in code; [`Node::from_config`] builds one from a file.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use comms_host::Node;
/// let node = Node::builder("alice")
///     .transport("tcp", "tcp", r#"listen = "127.0.0.1:7001""#)
///     .static_peer("bob", [("tcp", "127.0.0.1:7002")])
///     .build()
///     .await?;
/// node.send("bob", &"hello".to_string()).await?;
/// node.close().await?;
/// # Ok(()) }
/// ```
pub struct NodeBuilder {
    id: NodeId,
    codec: Codec,
    config_file: Option<PathBuf>,
    plugin_dirs: Vec<PathBuf>,
    receive_queue_capacity: usize,
    transports: Vec<TransportSpec>,
    discovery: Option<(PluginChoice, String)>,
    static_peers: Vec<StaticPeer>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder").field("id", &self.id).finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// A builder for the node called `id`, with the binary codec and static discovery.
    pub fn new(id: impl Into<NodeId>) -> Self {
        Self {
            id: id.into(),
            codec: Codec::default(),
            config_file: None,
            plugin_dirs: Vec::new(),
            receive_queue_capacity: DEFAULT_RECEIVE_QUEUE_CAPACITY,
            transports: Vec::new(),
            discovery: None,
            static_peers: Vec::new(),
        }
    }

    /// How this node encodes what it sends (it decodes whatever a message's content type says).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The file errors refer to.
    pub(crate) fn config_file(mut self, path: &Path) -> Self {
        self.config_file = Some(path.to_path_buf());
        self
    }

    /// A directory searched for plugins before the defaults.
    pub fn plugin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.plugin_dirs.push(dir.into());
        self
    }

    /// Received messages buffered before the node stops taking more from its transports.
    pub fn receive_queue_capacity(mut self, capacity: usize) -> Self {
        self.receive_queue_capacity = capacity.max(1);
        self
    }

    /// Adds transport `name` from plugin `plugin` (searched for by name), configured by the
    /// TOML text `config_toml`.
    pub fn transport(self, name: impl Into<String>, plugin: &str, config_toml: &str) -> Self {
        self.transport_from(name.into(), PluginSource::Name(plugin.to_string()), config_toml.to_string())
    }

    /// Adds a transport from a plugin name or file.
    pub fn transport_from(mut self, name: String, source: PluginSource, config_toml: String) -> Self {
        self.transports.push(TransportSpec { name, plugin: PluginChoice::Source(source), config_toml });
        self
    }

    /// Adds a transport from a plugin library already loaded, or linked into this program with
    /// [`PluginLibrary::linked`].
    pub fn transport_library(
        mut self,
        name: impl Into<String>,
        library: PluginLibrary,
        config_toml: &str,
    ) -> Self {
        let spec = TransportSpec {
            name: name.into(),
            plugin: PluginChoice::Library(library),
            config_toml: config_toml.into(),
        };
        self.transports.push(spec);
        self
    }

    /// Adds a peer to static discovery: its id and `(transport, address)` pairs.
    pub fn static_peer<'a>(
        mut self,
        id: &str,
        addresses: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        self.static_peers.push(StaticPeer {
            id: id.to_string(),
            addresses: addresses.into_iter().map(|(t, a)| (t.to_string(), a.to_string())).collect(),
            services: Vec::new(),
            topics: Vec::new(),
        });
        self
    }

    /// Uses a discovery plugin (or `"static"`) configured by `config_toml`.
    pub fn discovery_from(mut self, source: PluginSource, config_toml: String) -> Self {
        self.discovery = Some((PluginChoice::Source(source), config_toml));
        self
    }

    fn config_error(&self, message: String) -> BuildError {
        let file = self.config_file.clone().unwrap_or_else(|| PathBuf::from("(builder)"));
        BuildError::Config(ConfigError { file, message })
    }

    fn resolve(
        &self,
        choice: PluginChoice,
        role: &str,
        dirs: &[PathBuf],
    ) -> Result<PluginLibrary, BuildError> {
        let path = match choice {
            PluginChoice::Library(library) => return Ok(library),
            PluginChoice::Source(PluginSource::Name(name))
                if name == STATIC_DISCOVERY && role == "discovery" =>
            {
                return Ok(PluginLibrary::linked::<StaticDiscoveryPlugin>())
            }
            PluginChoice::Source(PluginSource::Path(path)) => path,
            PluginChoice::Source(PluginSource::Name(name)) => {
                find_plugin(&name, dirs).ok_or_else(|| BuildError::PluginNotFound {
                    role: role.to_string(),
                    file: plugin_file_name(&name),
                    name,
                    searched: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                })?
            }
        };
        PluginLibrary::load(&path)
            .map_err(|source| BuildError::Load { role: role.to_string(), source: Box::new(source) })
    }

    /// A plugin's refusal: a config error (naming file and table) when the plugin says so.
    fn start_error(&self, table: &str, role: &str, plugin: &str, error: PluginError) -> BuildError {
        if error.code == ErrorCode::INVALID_CONFIG {
            self.config_error(format!("[{table}] {}", error.message))
        } else {
            BuildError::Start { role: role.to_string(), plugin: plugin.to_string(), error }
        }
    }

    /// Loads the plugins, starts the transports and discovery, announces the node.
    pub async fn build(mut self) -> Result<Node, BuildError> {
        if self.transports.is_empty() {
            return Err(BuildError::NoTransport);
        }
        let dirs = search_dirs(&self.plugin_dirs);
        let mut transports: Vec<Arc<NodeTransport>> = Vec::new();
        let specs = std::mem::take(&mut self.transports);
        for spec in specs {
            let role = format!("transport `{}`", spec.name);
            let started = match self.resolve(spec.plugin, &role, &dirs) {
                Ok(library) => {
                    let plugin = library.description().name.clone();
                    library
                        .new_transport(&self.id, &spec.name, &spec.config_toml)
                        .await
                        .map(|loaded| NodeTransport {
                            name: spec.name.clone(),
                            plugin: plugin.clone(),
                            loaded,
                        })
                        .map_err(|error| {
                            self.start_error(&format!("transports.{}", spec.name), &role, &plugin, error)
                        })
                }
                Err(error) => Err(error),
            };
            match started {
                Ok(transport) => transports.push(Arc::new(transport)),
                Err(error) => {
                    close_all(&transports).await;
                    return Err(error);
                }
            }
        }
        match self.start_discovery(&dirs, &transports).await {
            Ok((discovery, record, peers)) => Ok(Node::start(self, transports, discovery, record, peers)),
            Err(error) => {
                close_all(&transports).await;
                Err(error)
            }
        }
    }

    async fn start_discovery(
        &mut self,
        dirs: &[PathBuf],
        transports: &[Arc<NodeTransport>],
    ) -> Result<(LoadedDiscovery, NodeRecord, Vec<NodeRecord>), BuildError> {
        let (choice, mut config_toml) = self
            .discovery
            .take()
            .unwrap_or((PluginChoice::Source(PluginSource::Name(STATIC_DISCOVERY.into())), String::new()));
        let is_static =
            matches!(&choice, PluginChoice::Source(PluginSource::Name(n)) if n == STATIC_DISCOVERY);
        if is_static && !self.static_peers.is_empty() {
            let mut config: StaticDiscoveryConfig = comms_plugin_api::config::parse_config(&config_toml)
                .map_err(|e| self.config_error(format!("[discovery] {}", e.message)))?;
            config.peers.append(&mut self.static_peers);
            config_toml =
                toml::to_string(&config).map_err(|e| self.config_error(format!("[discovery] {e}")))?;
        }
        let library = self.resolve(choice, "discovery", dirs)?;
        let plugin = library.description().name.clone();
        let discovery = library
            .new_discovery(&self.id, "discovery", &config_toml)
            .await
            .map_err(|error| self.start_error("discovery", "discovery", &plugin, error))?;
        let record = NodeRecord {
            id: self.id.clone(),
            addresses: transports
                .iter()
                .map(|t| (t.name.clone(), t.loaded.info().local_address.clone()))
                .collect(),
            ..NodeRecord::default()
        };
        let start_error =
            |error| BuildError::Start { role: "discovery".into(), plugin: plugin.clone(), error };
        discovery.announce(record.clone()).await.map_err(start_error)?;
        let peers = discovery.peers().await.map_err(start_error)?;
        Ok((discovery, record, peers))
    }
}

async fn close_all(transports: &[Arc<NodeTransport>]) {
    for transport in transports {
        let _ = transport.loaded.close().await;
    }
}

/// A comms node: sends typed messages to other nodes and receives theirs, over whatever
/// transports its configuration names.
///
/// Cheap to clone; all clones are the same node. Works on a tokio multi-thread or current-thread
/// runtime. Call [`Node::close`] to leave gracefully (queued messages are flushed).
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

struct NodeInner {
    id: NodeId,
    codec: Codec,
    record: NodeRecord,
    transports: Vec<Arc<NodeTransport>>,
    discovery: Arc<LoadedDiscovery>,
    peers: Arc<RwLock<HashMap<NodeId, NodeRecord>>>,
    inbox: tokio::sync::Mutex<mpsc::Receiver<InboxItem>>,
    shutdown: watch::Sender<bool>,
    /// Set when `close` starts: receive loops stop retrying a failing transport.
    closing: watch::Sender<bool>,
    receive_loops: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
    id_prefix: u64,
    id_counter: AtomicU64,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // A node dropped without close: stop its background tasks.
        self.shutdown.send_replace(true);
    }
}

impl Node {
    /// Starts building a node in code.
    pub fn builder(id: impl Into<NodeId>) -> NodeBuilder {
        NodeBuilder::new(id)
    }

    /// Builds the node a config file describes (see [`crate::config`]).
    pub async fn from_config(path: impl AsRef<Path>) -> Result<Node, BuildError> {
        config::load(path.as_ref())?.build().await
    }

    fn start(
        builder: NodeBuilder,
        transports: Vec<Arc<NodeTransport>>,
        discovery: LoadedDiscovery,
        record: NodeRecord,
        peers: Vec<NodeRecord>,
    ) -> Node {
        let (shutdown, _) = watch::channel(false);
        let (closing, _) = watch::channel(false);
        let (inbox_tx, inbox_rx) = mpsc::channel(builder.receive_queue_capacity);
        let peers = Arc::new(RwLock::new(peers.into_iter().map(|p| (p.id.clone(), p)).collect()));
        let discovery = Arc::new(discovery);
        let receive_loops = transports
            .iter()
            .map(|t| {
                tokio::spawn(receive_loop(
                    Arc::clone(t),
                    inbox_tx.clone(),
                    shutdown.subscribe(),
                    closing.subscribe(),
                ))
            })
            .collect();
        tokio::spawn(watch_peers(Arc::clone(&discovery), Arc::clone(&peers), shutdown.subscribe()));
        Node {
            inner: Arc::new(NodeInner {
                id: builder.id,
                codec: builder.codec,
                record,
                transports,
                discovery,
                peers,
                inbox: tokio::sync::Mutex::new(inbox_rx),
                shutdown,
                closing,
                receive_loops: Mutex::new(receive_loops),
                closed: AtomicBool::new(false),
                id_prefix: rand::random(),
                id_counter: AtomicU64::new(0),
            }),
        }
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    /// The codec this node sends with.
    pub fn codec(&self) -> Codec {
        self.inner.codec
    }

    /// This node's transports, in preference order.
    pub fn transports(&self) -> Vec<TransportSummary> {
        self.inner
            .transports
            .iter()
            .map(|t| TransportSummary {
                name: t.name.clone(),
                plugin: t.plugin.clone(),
                local_address: t.loaded.info().local_address.clone(),
                capabilities: t.loaded.info().capabilities,
            })
            .collect()
    }

    /// This node's record as announced to discovery.
    pub fn record(&self) -> &NodeRecord {
        &self.inner.record
    }

    /// The peers discovery knows now.
    pub fn peers(&self) -> Vec<NodeRecord> {
        let peers = self.inner.peers.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<NodeRecord> = peers.values().cloned().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    fn next_message_id(&self) -> MessageId {
        MessageId { high: self.inner.id_prefix, low: self.inner.id_counter.fetch_add(1, Ordering::Relaxed) }
    }

    /// Sends `message` to node `to`. Completes when a transport has taken it; waits while that
    /// transport's queue is full.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        to: impl Into<NodeId>,
        message: &T,
    ) -> Result<MessageId, SendError> {
        let to = to.into();
        let payload = self.inner.codec.encode(message)?;
        let envelope = Envelope {
            id: self.next_message_id(),
            from: self.inner.id.clone(),
            to: Destination::Node(to),
            correlation_id: None,
            headers: vec![(CONTENT_TYPE_HEADER.to_string(), self.inner.codec.content_type().to_string())],
            payload: payload.into(),
        };
        let id = envelope.id;
        self.send_envelope(envelope).await?;
        Ok(id)
    }

    /// Sends raw payload bytes to node `to`, with the given headers (include `content-type` so
    /// the receiver knows how to decode them) and optionally the id of the message this answers.
    pub async fn send_raw(
        &self,
        to: impl Into<NodeId>,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
        correlation_id: Option<MessageId>,
    ) -> Result<MessageId, SendError> {
        let envelope = Envelope {
            id: self.next_message_id(),
            from: self.inner.id.clone(),
            to: Destination::Node(to.into()),
            correlation_id,
            headers,
            payload: payload.into(),
        };
        let id = envelope.id;
        self.send_envelope(envelope).await?;
        Ok(id)
    }

    /// Sends a ready-made envelope to the node it names.
    pub async fn send_envelope(&self, envelope: Envelope) -> Result<(), SendError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let Destination::Node(to) = &envelope.to else {
            return Err(SendError::UnknownPeer(NodeId::new(envelope.to.name())));
        };
        let to = to.clone();
        let (transport, address) = self.route(&to)?;
        transport.loaded.send(&address, envelope).await.map_err(|error| SendError::Transport {
            transport: transport.name.clone(),
            peer: to,
            error,
        })
    }

    /// The first transport (in config order) on which the peer has an address.
    fn route(&self, to: &NodeId) -> Result<(Arc<NodeTransport>, String), SendError> {
        let peers = self.inner.peers.read().unwrap_or_else(|p| p.into_inner());
        let record = if *to == self.inner.id {
            &self.inner.record
        } else {
            peers.get(to).ok_or_else(|| SendError::UnknownPeer(to.clone()))?
        };
        for transport in &self.inner.transports {
            if let Some(address) = record.address_for(&transport.name) {
                return Ok((Arc::clone(transport), address.to_string()));
            }
        }
        let names = |list: Vec<&str>| list.join(", ");
        Err(SendError::NoCommonTransport {
            peer: to.clone(),
            peer_transports: names(record.addresses.iter().map(|(t, _)| t.as_str()).collect()),
            local_transports: names(self.inner.transports.iter().map(|t| t.name.as_str()).collect()),
        })
    }

    /// Waits for the next message and decodes it as `T` (by the codec its content type names).
    pub async fn receive<T: DeserializeOwned>(&self) -> Result<Received<T>, ReceiveError> {
        let envelope = self.receive_envelope().await?;
        let codec = match envelope.header(CONTENT_TYPE_HEADER) {
            Some(content_type) => Codec::from_content_type(content_type),
            None => Ok(self.inner.codec),
        };
        let decoded = codec.and_then(|codec| codec.decode(envelope.payload.as_slice()));
        match decoded {
            Ok(message) => {
                Ok(Received { from: envelope.from, id: envelope.id, headers: envelope.headers, message })
            }
            Err(source) => Err(ReceiveError::Decode { from: envelope.from, id: envelope.id, source }),
        }
    }

    /// Waits for the next message, undecoded.
    pub async fn receive_envelope(&self) -> Result<Envelope, ReceiveError> {
        let mut inbox = self.inner.inbox.lock().await;
        match inbox.recv().await {
            Some(InboxItem::Message(envelope)) => Ok(envelope),
            Some(InboxItem::TransportFailed { transport, error }) => {
                Err(ReceiveError::Transport { transport, error })
            }
            None => Err(ReceiveError::Closed),
        }
    }

    /// The received messages as a stream; it ends when the node is closed and drained.
    pub fn messages<T: DeserializeOwned>(
        &self,
    ) -> impl Stream<Item = Result<Received<T>, ReceiveError>> + '_ {
        futures::stream::unfold(self, |node| async move {
            match node.receive::<T>().await {
                Err(ReceiveError::Closed) => None,
                other => Some((other, node)),
            }
        })
    }

    /// Leaves gracefully: withdraws from discovery, stops the transports (each flushes what is
    /// queued within its own deadline), hands over what they had received, stops discovery.
    /// Messages already received can still be taken with `receive` afterwards.
    pub async fn close(&self) -> Result<(), CloseError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.closing.send_replace(true);
        let mut failures = Vec::new();
        if let Err(error) = self.inner.discovery.withdraw(&self.inner.id).await {
            failures.push(format!("withdrawing from discovery: {error}"));
        }
        for transport in &self.inner.transports {
            if let Err(error) = transport.loaded.close().await {
                failures.push(format!("transport `{}`: {error}", transport.name));
            }
        }
        let loops = std::mem::take(&mut *self.inner.receive_loops.lock().unwrap_or_else(|p| p.into_inner()));
        let drained = tokio::time::timeout(CLOSE_DRAIN_TIMEOUT, async {
            for handle in loops {
                let _ = handle.await;
            }
        })
        .await;
        if drained.is_err() {
            failures.push("received messages could not be handed over in time (inbox full)".to_string());
        }
        self.inner.shutdown.send_replace(true);
        if let Err(error) = self.inner.discovery.close().await {
            failures.push(format!("discovery: {error}"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CloseError { failures })
        }
    }
}

async fn closed(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

/// Moves messages from one transport into the node's bounded inbox and settles them.
async fn receive_loop(
    transport: Arc<NodeTransport>,
    inbox: mpsc::Sender<InboxItem>,
    mut shutdown: watch::Receiver<bool>,
    mut closing: watch::Receiver<bool>,
) {
    let acknowledges = transport.loaded.info().capabilities.contains(Capabilities::ACKNOWLEDGEMENTS);
    let mut failures = 0u32;
    loop {
        let received = tokio::select! {
            received = transport.loaded.receive(RECEIVE_BATCH) => received,
            _ = closed(&mut shutdown) => return,
        };
        match received {
            Ok(batch) if batch.is_empty() => return,
            Ok(batch) => {
                failures = 0;
                let mut settlements = Vec::with_capacity(if acknowledges { batch.len() } else { 0 });
                let mut inbox_open = true;
                for inbound in batch {
                    let tag = inbound.delivery_tag;
                    inbox_open = inbox_open && inbox.send(InboxItem::Message(inbound.envelope)).await.is_ok();
                    if acknowledges {
                        let outcome = if inbox_open {
                            SettlementOutcome::ACCEPTED
                        } else {
                            SettlementOutcome::REJECTED_REQUEUE
                        };
                        settlements.push(Settlement { delivery_tag: tag, outcome });
                    }
                }
                if !settlements.is_empty() {
                    if let Err(error) = transport.loaded.settle(settlements).await {
                        tracing::warn!(transport = %transport.name, %error, "settling received messages failed");
                    }
                }
                if !inbox_open {
                    return;
                }
            }
            Err(error) if error.code == ErrorCode::CLOSED || *closing.borrow() => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(transport = %transport.name, %error, failures, "receive failed; retrying");
                let failed = InboxItem::TransportFailed { transport: transport.name.clone(), error };
                if inbox.send(failed).await.is_err() {
                    return;
                }
                let delay = Duration::from_millis(50u64.saturating_mul(1 << failures.min(7)));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = closed(&mut closing) => return,
                }
            }
        }
    }
}

/// Keeps the peer table current from discovery events.
async fn watch_peers(
    discovery: Arc<LoadedDiscovery>,
    peers: Arc<RwLock<HashMap<NodeId, NodeRecord>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = discovery.next_event() => event,
            _ = closed(&mut shutdown) => return,
        };
        match event {
            Ok(Some(event)) => {
                let mut peers = peers.write().unwrap_or_else(|p| p.into_inner());
                match event.kind {
                    PeerEventKind::Left => {
                        peers.remove(&event.record.id);
                    }
                    PeerEventKind::Joined | PeerEventKind::Updated => {
                        peers.insert(event.record.id.clone(), event.record);
                    }
                }
            }
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "discovery failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = closed(&mut shutdown) => return,
                }
            }
        }
    }
}

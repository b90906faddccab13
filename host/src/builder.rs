//! Building a [`Node`]: from a config file ([`crate::config`]) or in code.

use crate::security::{Security, SignatureMode, Signatures};
use crate::{
    codec::Codec,
    driver::{Driver, NodeTransport},
    error::{BuildError, ConfigError},
    fault_injection::FaultConfig,
    metrics::MetricsEndpoint,
    node::Node,
    plugin_search::{find_plugin, plugin_file_name, search_dirs},
    request_response::{Balancing, RequestOptions},
    spec::{LayerSpec, NodeSpec, PluginChoice, TransportSpec, FAULTS_LAYER},
    static_discovery::{StaticDiscoveryConfig, StaticDiscoveryPlugin, StaticPeer, STATIC_DISCOVERY},
};
use comms_plugin_api::{
    host_side::{LoadedDiscovery, PluginLibrary},
    security::{AllowList, Identity, LinkMode, LinkSecurity, LinkSecurityConfig, PublicKey},
    Capabilities, ErrorCode, NodeId, NodeRecord, PluginError,
};
mod reloading;

pub use crate::spec::PluginSource;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// Default capacity of the node's inbox (messages received but not yet taken by the application).
pub const DEFAULT_RECEIVE_QUEUE_CAPACITY: usize = 1024;
/// Default time between heartbeats.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default silence after which a peer is declared down.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);

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
    config_file: Option<PathBuf>,
    plugin_dirs: Vec<PathBuf>,
    settings: NodeSpec,
    transports: Vec<TransportSpec>,
    discovery: Option<(PluginChoice, String)>,
    static_peers: Vec<StaticPeer>,
    key_file: Option<PathBuf>,
    identity: Option<Identity>,
    security: Security,
    plugin_threads: u32,
    metrics_listen: Option<SocketAddr>,
    admin_keys: Vec<String>,
}

impl Node {
    /// Starts building a node in code.
    pub fn builder(id: impl Into<NodeId>) -> NodeBuilder {
        NodeBuilder::new(id)
    }
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
            config_file: None,
            plugin_dirs: Vec::new(),
            settings: NodeSpec {
                codec: Codec::default(),
                receive_queue_capacity: DEFAULT_RECEIVE_QUEUE_CAPACITY,
                heartbeat_interval: Some(DEFAULT_HEARTBEAT_INTERVAL),
                peer_timeout: DEFAULT_PEER_TIMEOUT,
                balancing: Balancing::default(),
                request_options: RequestOptions::default(),
                close_timeout: Duration::from_secs(5),
                relay: false,
                dedup_window: 0,
                admins: None,
            },
            transports: Vec::new(),
            discovery: None,
            static_peers: Vec::new(),
            key_file: None,
            identity: None,
            security: Security::default(),
            plugin_threads: 0,
            metrics_listen: None,
            admin_keys: Vec::new(),
        }
    }

    /// This node's identity from a key file (`comms keygen`; refused if others can read it).
    /// The node id is then bound to its public key: `<id>-<public key>`, or the key alone when
    /// the builder's id is empty. Needed for encrypted links and signatures.
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.key_file = Some(path.into());
        self
    }

    /// This node's identity, given in code (see [`NodeBuilder::key_file`] for the node id).
    /// Enough for signatures; encrypted links need [`NodeBuilder::key_file`], since the
    /// transport plugins load the key themselves.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Security settings: encrypted links, who may connect, envelope signatures.
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// How this node encodes what it sends (it decodes whatever a message's content type says).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.settings.codec = codec;
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
        self.settings.receive_queue_capacity = capacity.max(1);
        self
    }

    /// Heartbeats every `interval`; a peer silent for `peer_timeout` is declared down.
    /// `None` turns liveness off (peers never expire; announcements are still sent once).
    pub fn liveness(mut self, interval: Option<Duration>, peer_timeout: Duration) -> Self {
        self.settings.heartbeat_interval = interval.filter(|i| !i.is_zero());
        self.settings.peer_timeout = peer_timeout;
        self
    }

    /// How requests are spread over a service's replicas.
    pub fn balancing(mut self, balancing: Balancing) -> Self {
        self.settings.balancing = balancing;
        self
    }

    /// Timeout and retries used by [`Node::request`].
    pub fn request_options(mut self, options: RequestOptions) -> Self {
        self.settings.request_options = options;
        self
    }

    /// How long [`Node::close`] waits for in-flight requests to finish, and [`Node::flush`]
    /// for the transports' queues to empty.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.settings.close_timeout = timeout;
        self
    }

    pub(crate) fn settings(&self) -> &NodeSpec {
        &self.settings
    }

    /// Remembers the ids of the last `window` application messages this node delivered and drops
    /// a repeat (settling it accepted), so that the application sees each message once even from
    /// at-least-once transports. 0 (the default) turns it off. Costs about 64 bytes per id and a
    /// hash lookup per message; a repeat older than `window` newer messages is delivered again.
    pub fn dedup_window(mut self, window: usize) -> Self {
        self.settings.dedup_window = window;
        self
    }

    /// The nodes that may shut this one down remotely ([`crate::admin::SHUTDOWN_SERVICE`],
    /// `comms shutdown`): public keys in hex, or node ids bound to keys (`[admin] keys`). Needs
    /// `signatures = "require"` ([`NodeBuilder::security`]), so that a caller's id is proven by
    /// its signature. Empty (the default): nobody may.
    pub fn admin_keys(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.admin_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Serves this node's metrics at `http://<address>/metrics` (Prometheus / OpenMetrics text,
    /// see [`crate::metrics`]); port 0 picks a free port ([`Node::metrics_address`] says which).
    /// Off by default. A port that cannot be bound fails [`NodeBuilder::build`].
    pub fn metrics_listen(mut self, address: SocketAddr) -> Self {
        self.metrics_listen = Some(address);
        self
    }

    /// Worker threads of each plugin library's runtime (0, the default: the plugin's own
    /// default, 2 for plugins built with comms-plugin-api). Plugins do I/O, not computation: 1
    /// keeps a node with every backend loaded to a handful of threads. The first node of a
    /// process that loads a library decides for that library. Plugins linked into the host
    /// (static discovery) run on the application's runtime and start no threads.
    pub fn plugin_threads(mut self, threads: u32) -> Self {
        self.plugin_threads = threads;
        self
    }

    /// Makes this node a relay: messages that arrive for another node are forwarded on whichever
    /// of this node's transports reaches it. A relay with a transport on each of two backends
    /// bridges them.
    pub fn relay(mut self, relay: bool) -> Self {
        self.settings.relay = relay;
        self
    }

    /// Adds transport `name` from plugin `plugin` (searched for by name), configured by the
    /// TOML text `config_toml`.
    pub fn transport(self, name: impl Into<String>, plugin: &str, config_toml: &str) -> Self {
        self.transport_from(name.into(), PluginSource::Name(plugin.to_string()), config_toml.to_string())
    }

    /// Adds a transport from a plugin name or file.
    pub fn transport_from(mut self, name: String, source: PluginSource, config_toml: String) -> Self {
        let plugin = PluginChoice::Source(source);
        self.transports.push(TransportSpec { name, plugin, config_toml, layers: Vec::new() });
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
        let plugin = PluginChoice::Library(library);
        self.transports.push(TransportSpec {
            name: name.into(),
            plugin,
            config_toml: config_toml.into(),
            layers: Vec::new(),
        });
        self
    }

    /// Stacks a layer from plugin `plugin` (searched for by name; `"faults"` is built in) on the
    /// most recently added transport, configured by the TOML text `config_toml`. The first layer
    /// added is the outermost: the node hands messages to it, and the last one added hands them
    /// to the transport. See [`comms_plugin_api::layer`].
    pub fn layer(self, plugin: &str, config_toml: &str) -> Self {
        self.layer_from(PluginSource::Name(plugin.to_string()), config_toml.to_string())
    }

    /// [`NodeBuilder::layer`] from a plugin name or file.
    pub fn layer_from(self, source: PluginSource, config_toml: String) -> Self {
        self.push_layer(PluginChoice::Source(source), config_toml)
    }

    /// [`NodeBuilder::layer`] from a plugin library already loaded, or linked into this program.
    pub fn layer_library(self, library: PluginLibrary, config_toml: &str) -> Self {
        self.push_layer(PluginChoice::Library(library), config_toml.to_string())
    }

    fn push_layer(mut self, plugin: PluginChoice, config_toml: String) -> Self {
        if let Some(last) = self.transports.last_mut() {
            last.layers.push(LayerSpec { plugin, config_toml });
        }
        self
    }

    /// Injects faults into what the most recently added transport sends: the built-in `faults`
    /// layer (see [`crate::fault_injection`]), under the layers added so far.
    pub fn faults(self, faults: FaultConfig) -> Self {
        // Serializing a struct of numbers cannot fail; an empty table would mean no faults.
        let config_toml = toml::to_string(&faults).unwrap_or_default();
        self.layer_library(crate::fault_injection::library(), &config_toml)
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

    /// Uses a discovery from a plugin library already loaded or linked.
    pub fn discovery_library(mut self, library: PluginLibrary, config_toml: &str) -> Self {
        self.discovery = Some((PluginChoice::Library(library), config_toml.to_string()));
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
            PluginChoice::Source(PluginSource::Name(name))
                if name == FAULTS_LAYER && role.starts_with("layer") =>
            {
                return Ok(crate::fault_injection::library())
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
        PluginLibrary::load_with_threads(&path, self.plugin_threads)
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

    /// Loads the identity, derives the node id from it, checks the security settings; returns
    /// the `[comms_security]` table for transports (noise links only) and the signer.
    /// `[admin] keys` as an allow list, refused without required signatures (the caller's id
    /// would then prove nothing) and for `"*"` (every node an admin).
    fn resolve_admins(&self, signatures: SignatureMode) -> Result<Option<AllowList>, BuildError> {
        if self.admin_keys.is_empty() {
            return Ok(None);
        }
        if signatures != SignatureMode::Require {
            return Err(self.config_error(
                "key `admin.keys`: remote shutdown needs `security.signatures = \"require\"`, so that a \
                 caller's node id is proven by its signature (and this node's `node.key_file`)"
                    .into(),
            ));
        }
        if self.admin_keys.iter().any(|key| key == "*") {
            return Err(self.config_error(
                "key `admin.keys`: `*` would let every node shut this one down; list the admins' public keys"
                    .into(),
            ));
        }
        let admins =
            AllowList::parse(&self.admin_keys, "admin.keys").map_err(|e| self.config_error(e.message))?;
        Ok(Some(admins))
    }

    fn resolve_security(&mut self) -> Result<(Option<toml::Table>, Option<Signatures>), BuildError> {
        let security = self.security.clone();
        let identity = match (self.identity.take(), &self.key_file) {
            (Some(identity), _) => Some(identity),
            (None, Some(path)) => Some(
                Identity::load(path).map_err(|e| self.config_error(format!("key `node.key_file`: {e}")))?,
            ),
            (None, None) => None,
        };
        let allow =
            AllowList::parse(&security.allow, "security.allow").map_err(|e| self.config_error(e.message))?;
        self.settings.admins = self.resolve_admins(security.signatures)?;
        if let Some(identity) = &identity {
            let key = identity.public_key();
            self.id = match PublicKey::of_node(&self.id) {
                Some(bound) if bound == key => self.id.clone(),
                Some(_) => {
                    return Err(self.config_error(format!(
                        "key `node.id`: `{}` is bound to another public key than this node's key file",
                        self.id
                    )))
                }
                None => key.node_id(Some(self.id.as_str())),
            };
        }
        let link_table = if security.links == LinkMode::Noise {
            let Some(key_file) = self.key_file.clone() else {
                return Err(self.config_error(
                    "key `node.key_file`: encrypted links (`security.links = \"noise\"`) need this node's key \
                     file (create one with `comms keygen`)"
                        .into(),
                ));
            };
            let config = LinkSecurityConfig {
                links: LinkMode::Noise,
                key_file: Some(key_file),
                allow: security.allow.clone(),
                network_key_file: security.network_key_file.clone(),
            };
            // The same checks the plugins make, once, with the config file in the message.
            LinkSecurity::from_config(&config).map_err(|e| self.config_error(e.message))?;
            Some(crate::security::link_security_table(&config))
        } else {
            None
        };
        let signatures = match (security.signatures, identity) {
            (SignatureMode::Off, _) => None,
            (_, None) => {
                return Err(self.config_error(
                    "key `security.signatures`: signing needs this node's identity: set `node.key_file` \
                     (create one with `comms keygen`)"
                        .into(),
                ))
            }
            (_, Some(identity)) => {
                // Empty: any key bound to the sender's id (docs/security.md); the signature
                // still has to verify against it.
                let allow = if security.allow.is_empty() { AllowList::AnyKey } else { allow };
                Some(Signatures::new(Arc::new(identity), &security, allow))
            }
        };
        tracing::debug!(
            node = %self.id,
            links = ?security.links,
            signatures = ?security.signatures,
            "node security settings"
        );
        Ok((link_table, signatures))
    }

    /// Loads the plugins, starts the transports and discovery, announces the node.
    pub async fn build(mut self) -> Result<Node, BuildError> {
        self.settings.validate().map_err(BuildError::InvalidSettings)?;
        if self.transports.is_empty() {
            return Err(BuildError::NoTransport);
        }
        // Before the id is derived from a key file: a reload's builder is compared with this.
        let applied = self.applied_config();
        let (link_table, signatures) = self.resolve_security()?;
        // The id it ends up with (a key file may have derived it).
        if let Err(message) = NodeSpec::validate_id(&self.id) {
            return Err(match self.config_file {
                Some(_) => self.config_error(message),
                None => BuildError::InvalidSettings(message),
            });
        }
        // Bound before anything starts, so that a port in use fails the build cleanly.
        let metrics = match self.metrics_listen {
            None => None,
            Some(address) => Some(MetricsEndpoint::bind(address).await.map_err(|error| {
                let message = format!("key `metrics.listen`: cannot listen on {address}: {error}");
                match self.config_file {
                    Some(_) => self.config_error(message),
                    None => BuildError::InvalidSettings(message),
                }
            })?),
        };
        let dirs = search_dirs(&self.plugin_dirs);
        let mut transports: Vec<Arc<NodeTransport>> = Vec::new();
        for spec in std::mem::take(&mut self.transports) {
            match self.start_transport(spec, &dirs, link_table.as_ref()).await {
                Ok(transport) => transports.push(Arc::new(transport)),
                Err(error) => {
                    close_all(&transports).await;
                    return Err(error);
                }
            }
        }
        match self.start_discovery(&dirs, &transports, link_table.as_ref()).await {
            Ok(found) => {
                let id = self.id.clone();
                let driver = Driver::start(id, self.settings, transports, found, signatures, applied);
                if let Some(endpoint) = metrics {
                    let _ = driver.metrics_address.set(endpoint.address());
                    tracing::info!(
                        address = %endpoint.address(),
                        "serving metrics at /metrics and the status page at /"
                    );
                    // Both tasks hold the node weakly, and end by themselves when the node stops.
                    let view: Arc<dyn crate::metrics::NodeView> = Arc::clone(&driver) as _;
                    let node = Arc::downgrade(&view);
                    drop(view);
                    let history = Arc::new(crate::metrics::History::default());
                    let sampler = crate::metrics::sample(
                        node.clone(),
                        Arc::clone(&history),
                        driver.shutdown.subscribe(),
                    );
                    drop(sampler);
                    let documents: crate::metrics::Render =
                        Arc::new(crate::metrics::NodeDocuments::new(node, history));
                    drop(endpoint.serve(documents, driver.shutdown.subscribe()));
                }
                Ok(Node::new(driver))
            }
            Err(error) => {
                close_all(&transports).await;
                Err(error)
            }
        }
    }

    async fn start_transport(
        &self,
        spec: TransportSpec,
        dirs: &[PathBuf],
        link_table: Option<&toml::Table>,
    ) -> Result<NodeTransport, BuildError> {
        let role = format!("transport `{}`", spec.name);
        let table = format!("transports.{}", spec.name);
        let config_toml = match link_table {
            None => spec.config_toml,
            Some(link_table) => crate::security::with_link_security(&spec.config_toml, link_table)
                .map_err(|message| self.config_error(format!("[{table}] {message}")))?,
        };
        let library = self.resolve(spec.plugin, &role, dirs)?;
        let plugin = library.description().name.clone();
        let version = library.description().version.clone();
        let mut loaded = library
            .new_transport(&self.id, &spec.name, &config_toml)
            .await
            .map_err(|error| self.start_error(&table, &role, &plugin, error))?;
        // Innermost first: the last layer listed wraps the transport itself.
        for (position, layer) in spec.layers.into_iter().enumerate().rev() {
            let layer_role = format!("layer {position} of transport `{}`", spec.name);
            let layer_table = format!("{table}.layers[{position}]");
            let library = match self.resolve(layer.plugin, &layer_role, dirs) {
                Ok(library) => library,
                Err(error) => {
                    let _ = loaded.close().await;
                    return Err(error);
                }
            };
            let name = library.description().name.clone();
            let instance = format!("{}.{name}", spec.name);
            // The layer closes the transport below it when it cannot be made.
            loaded = library
                .new_layer(&self.id, &instance, &layer.config_toml, loaded)
                .await
                .map_err(|error| self.start_error(&layer_table, &layer_role, &name, error))?;
        }
        if link_table.is_some() && !loaded.info().capabilities.contains(Capabilities::ENCRYPTED) {
            let _ = loaded.close().await;
            let hint = match plugin.as_str() {
                "redis" => "use a rediss:// URL",
                "amqp" => "use an amqps:// URL",
                _ => "use a transport that supports encrypted links (tcp, udp)",
            };
            return Err(self.config_error(format!(
                "[{table}] transport `{}` does not encrypt its links: {hint}, or set security.links = \"plain\"",
                spec.name
            )));
        }
        Ok(NodeTransport::new(spec.name, (plugin, version), Arc::new(loaded)))
    }

    async fn start_discovery(
        &mut self,
        dirs: &[PathBuf],
        transports: &[Arc<NodeTransport>],
        link_table: Option<&toml::Table>,
    ) -> Result<(LoadedDiscovery, NodeRecord, Vec<NodeRecord>), BuildError> {
        let (discovery, plugin) = self.new_discovery(dirs, link_table).await?;
        let mut record = NodeRecord::new(self.id.clone());
        record.addresses =
            transports.iter().map(|t| (t.name.clone(), t.loaded.info().local_address.clone())).collect();
        // Revisions start from the clock so that a restarted node's records are newer than
        // those of its previous run that may still be in flight.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_micros() as u64);
        crate::control::set_revision(&mut record, start);
        let start_error =
            |error| BuildError::Start { role: "discovery".into(), plugin: plugin.clone(), error };
        discovery.announce(record.clone()).await.map_err(start_error)?;
        let peers = discovery.peers().await.map_err(start_error)?;
        Ok((discovery, record, peers))
    }

    /// Loads and starts the discovery (static peers added to the static one's list), handing it
    /// the link security table when links are authenticated; returns it with its plugin's name.
    pub(crate) async fn new_discovery(
        &mut self,
        dirs: &[PathBuf],
        link_table: Option<&toml::Table>,
    ) -> Result<(LoadedDiscovery, String), BuildError> {
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
            .new_discovery_with(
                &self.id,
                "discovery",
                &config_toml,
                link_table.map(|t| t.to_string()).as_deref(),
            )
            .await
            .map_err(|error| self.start_error("discovery", "discovery", &plugin, error))?;
        Ok((discovery, plugin))
    }
}

async fn close_all(transports: &[Arc<NodeTransport>]) {
    for transport in transports {
        let _ = transport.loaded.close().await;
    }
}

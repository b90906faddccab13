//! Host side of the boundary: loading plugin libraries and calling into them with idiomatic types.
//!
//! The comms host uses this module; plugin authors do not need it. It is here, next to the
//! plugin-side adapters, so that every `abi_stable` type stays inside comms-core and this crate.
//!
//! Loading checks, in order: the file exists; it is a shared library exporting an `abi_stable`
//! root module; its contract version has this host's major ([`comms_core::Compatibility`]); the
//! layout of every type reachable from the root module matches, checked in the direction the
//! versions call for (the newer side must extend the older one: abi_stable's own check accepts
//! only plugins at least as new as the host, see [`layout_check`]). Each failure is a
//! [`LoadError`] whose `Display` is one sentence naming the file; [`LoadError::details`] keeps
//! the longer form. Libraries are never unloaded (abi_stable leaks them by design).
//!
//! Once loaded, a library gets the host's services (its log, see `host_log`), and every future
//! it returns is polled under a [`poll_watch`] that names a plugin blocking the host's thread.

mod host_log;
mod host_reactor;
pub mod layout_check;
mod load_error;
pub mod poll_watch;

pub use load_error::LoadError;
pub use poll_watch::BlockingPoll;

use crate::{
    export::plugin_module, Envelope, ErrorCode, Extensions, Inbound, NodeId, NodeRecord, Outbound, PeerEvent,
    Plugin, PluginDescription, PluginError, Provides, SendFailure, TransportInfo, TransportStats,
};
use comms_core::{
    abi_stable::{
        library::lib_header_from_path,
        std_types::{RString, RVec},
        StableAbi,
    },
    Compatibility, DiscoveryBox, InterfaceVersion, PluginModuleRef, PluginSetup, Settlement,
    SettlementOutcome, TransportBox, INTERFACE_VERSION,
};

/// The contract version that added layers ([`PluginLibrary::new_layer`]).
const LAYERS_SINCE: InterfaceVersion = InterfaceVersion { major: 1, minor: 2 };
use poll_watch::PollWatch;
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

/// A loaded plugin library (or a plugin linked into this program), ready to construct
/// transports and discoveries.
#[derive(Debug, Clone)]
pub struct PluginLibrary {
    path: Option<PathBuf>,
    module: PluginModuleRef,
    description: PluginDescription,
}

impl PluginLibrary {
    /// Loads the plugin library at `path` and checks that it is compatible with this host.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with_threads(path, 0)
    }

    /// [`PluginLibrary::load`], asking the library's runtime for `worker_threads` threads (0:
    /// the plugin's default). The first load of a library decides.
    pub fn load_with_threads(path: &Path, worker_threads: u32) -> Result<Self, LoadError> {
        if path.is_dir() {
            return Err(LoadError::NotAPlugin {
                path: path.to_path_buf(),
                reason: "it is a directory".into(),
            });
        }
        if !path.is_file() {
            return Err(LoadError::NotFound { path: path.to_path_buf() });
        }
        // An absolute path, so the dynamic loader never searches its library path instead.
        let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let header = lib_header_from_path(&absolute)
            .map_err(|e| LoadError::from_library_error(path, INTERFACE_VERSION, e))?;
        let recorded = header.version_strings().version.to_string();
        let found = InterfaceVersion::parse(&recorded).ok_or_else(|| LoadError::IncompatibleVersion {
            path: path.to_path_buf(),
            expected: INTERFACE_VERSION,
            found: recorded.clone(),
        })?;
        let compatibility = INTERFACE_VERSION.compatibility(found);
        if compatibility == Compatibility::Incompatible {
            return Err(LoadError::IncompatibleVersion {
                path: path.to_path_buf(),
                expected: INTERFACE_VERSION,
                found: found.to_string(),
            });
        }
        let Some(plugin_layout) = header.layout() else {
            return Err(LoadError::NotAPlugin {
                path: path.to_path_buf(),
                reason: "its root module carries no layout to check".into(),
            });
        };
        let host_layout = <PluginModuleRef as StableAbi>::LAYOUT;
        layout_check::check(host_layout, plugin_layout, compatibility)
            .map_err(|mismatch| mismatch.into_load_error(path, INTERFACE_VERSION, found))?;
        // SAFETY: the layout was checked just above, in the direction the versions call for.
        let module = unsafe { header.init_root_module_with_unchecked_layout::<PluginModuleRef>() }
            .map_err(|e| LoadError::from_library_error(path, INTERFACE_VERSION, e))?;
        (module.attach_host())(host_log::host_services(worker_threads));
        let library = Self::from_module(Some(path.to_path_buf()), module, found);
        if compatibility == Compatibility::PluginNewer {
            let unused = layout_check::additions(host_layout, plugin_layout);
            tracing::info!(
                plugin = %library.description.name,
                "{} was built for comms plugin interface {found}; this host speaks {INTERFACE_VERSION} and will not use {}",
                path.display(),
                if unused.is_empty() { "what it added".to_string() } else { unused.join(", ") }
            );
        }
        Ok(library)
    }

    /// A plugin crate linked into this program (no shared library involved): the same
    /// boundary, the same runtime separation, without `dlopen`.
    pub fn linked<P: Plugin>() -> Self {
        Self::from_module(None, plugin_module::<P>(), INTERFACE_VERSION)
    }

    fn from_module(
        path: Option<PathBuf>,
        module: PluginModuleRef,
        interface_version: InterfaceVersion,
    ) -> Self {
        let info = (module.info())();
        let description = PluginDescription {
            name: info.name.as_str().to_owned(),
            version: info.version.as_str().to_owned(),
            description: info.description.as_str().to_owned(),
            provides: info.provides,
            interface_version,
        };
        Self { path, module, description }
    }

    /// The file it was loaded from; `None` for a linked plugin.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Name, version, description, what it provides.
    pub fn description(&self) -> &PluginDescription {
        &self.description
    }

    /// The contract version this host speaks.
    pub fn interface_version() -> InterfaceVersion {
        INTERFACE_VERSION
    }

    fn setup(node_id: &NodeId, instance_name: &str, config_toml: &str) -> PluginSetup {
        PluginSetup {
            node_id: node_id.clone().into_abi(),
            instance_name: RString::from(instance_name),
            config_toml: RString::from(config_toml),
            host_interface: INTERFACE_VERSION,
            extensions: RVec::new(),
        }
    }

    fn watch(&self) -> Arc<PollWatch> {
        PollWatch::new(&self.description.name)
    }

    /// Constructs a transport; `config_toml` is the plugin's own table as TOML text.
    pub async fn new_transport(
        &self,
        node_id: &NodeId,
        instance_name: &str,
        config_toml: &str,
    ) -> Result<LoadedTransport, PluginError> {
        if !self.description.provides.contains(Provides::TRANSPORT) {
            return Err(PluginError::unsupported(format!(
                "plugin `{}` provides no transport",
                self.description.name
            )));
        }
        let setup = Self::setup(node_id, instance_name, config_toml);
        let watch = self.watch();
        let inner = watch
            .watch("the transport constructor", (self.module.new_transport())(setup))
            .await
            .into_result()
            .map_err(PluginError::from_abi)?;
        LoadedTransport::new(inner, watch)
    }

    /// Constructs a layer of this library over `inner` (contract 1.2, see [`crate::layer`]):
    /// a transport that wraps `inner` and owns it from then on. `config_toml` is the layer's own
    /// table as TOML text. A library that provides no layer, or was built for a contract older
    /// than 1.2, is refused with an error naming it and its contract version; `inner` is closed
    /// whenever the layer is not made.
    pub async fn new_layer(
        &self,
        node_id: &NodeId,
        instance_name: &str,
        config_toml: &str,
        inner: LoadedTransport,
    ) -> Result<LoadedTransport, PluginError> {
        let name = &self.description.name;
        let constructor = match self.module.new_layer() {
            Some(constructor) if self.description.provides.contains(Provides::LAYER) => constructor,
            found => {
                let _ = inner.close().await;
                let built_for = self.description.interface_version;
                return Err(PluginError::unsupported(match found {
                    None if built_for < LAYERS_SINCE => format!(
                        "plugin `{name}` is built for comms plugin interface {built_for}; layers need {LAYERS_SINCE} or newer"
                    ),
                    _ => format!("plugin `{name}` provides no layer"),
                }));
            }
        };
        let setup = Self::setup(node_id, instance_name, config_toml);
        let watch = self.watch();
        let layer = watch
            .watch("the layer constructor", constructor(setup, inner.into_box()))
            .await
            .into_result()
            .map_err(PluginError::from_abi)?;
        LoadedTransport::new(layer, watch)
    }

    /// Constructs a discovery; `config_toml` is the plugin's own table as TOML text.
    pub async fn new_discovery(
        &self,
        node_id: &NodeId,
        instance_name: &str,
        config_toml: &str,
    ) -> Result<LoadedDiscovery, PluginError> {
        self.new_discovery_with(node_id, instance_name, config_toml, None).await
    }

    /// [`PluginLibrary::new_discovery`], handing the discovery the node's link security table
    /// (TOML text, as transports get it under [`crate::security::SETUP_KEY`]) in the setup's
    /// extension `comms.link_security` (contract 1.2), so that it can authenticate by the
    /// node's identity. A discovery that does not read it runs as before.
    pub async fn new_discovery_with(
        &self,
        node_id: &NodeId,
        instance_name: &str,
        config_toml: &str,
        link_security_toml: Option<&str>,
    ) -> Result<LoadedDiscovery, PluginError> {
        if !self.description.provides.contains(Provides::DISCOVERY) {
            return Err(PluginError::unsupported(format!(
                "plugin `{}` provides no discovery",
                self.description.name
            )));
        }
        let mut setup = Self::setup(node_id, instance_name, config_toml);
        if let Some(table) = link_security_toml {
            setup.extensions.push(comms_core::Extension {
                key: comms_core::LINK_SECURITY_EXTENSION.into(),
                value: table.as_bytes().to_vec().into(),
            });
        }
        let watch = self.watch();
        let inner = watch
            .watch("the discovery constructor", (self.module.new_discovery())(setup))
            .await
            .into_result()
            .map_err(PluginError::from_abi)?;
        Ok(LoadedDiscovery { inner, watch })
    }
}

/// A transport constructed by a plugin, called with idiomatic types.
pub struct LoadedTransport {
    inner: TransportBox,
    info: TransportInfo,
    watch: Arc<PollWatch>,
    /// Calls that ended in a panic caught at the boundary ([`ErrorCode::PANICKED`]).
    panics: AtomicU64,
}

impl std::fmt::Debug for LoadedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTransport").field("info", &self.info).finish_non_exhaustive()
    }
}

impl LoadedTransport {
    fn new(inner: TransportBox, watch: Arc<PollWatch>) -> Result<Self, PluginError> {
        let info = inner.info().into_result().map_err(PluginError::from_abi)?;
        let mut idiomatic =
            TransportInfo::new(info.capabilities, info.local_address.as_str(), info.max_message_size);
        idiomatic.extensions = Extensions::from_abi(info.extensions);
        Ok(LoadedTransport { inner, info: idiomatic, watch, panics: AtomicU64::new(0) })
    }

    /// A transport object handed over the boundary (the inner transport of a layer), called
    /// with idiomatic types; `owner` names it in the warnings about blocking polls.
    pub(crate) fn from_box(inner: TransportBox, owner: &str) -> Result<Self, PluginError> {
        Self::new(inner, PollWatch::new(owner))
    }

    /// The transport object itself, to hand it to a layer.
    fn into_box(self) -> TransportBox {
        self.inner
    }

    /// An error from the plugin, counted if it is a caught panic.
    fn failed(&self, error: comms_core::CommsError) -> PluginError {
        let error = PluginError::from_abi(error);
        if error.code == ErrorCode::PANICKED {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
        error
    }

    /// How many calls into this transport ended in a panic (caught at the boundary and
    /// returned as an [`ErrorCode::PANICKED`] error).
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// What the transport declared when it was constructed.
    pub fn info(&self) -> &TransportInfo {
        &self.info
    }

    /// See [`crate::Transport::send`].
    ///
    /// The call is made when this future is made, not when it is first polled: the future then
    /// holds the plugin's future, not the envelope (about 200 bytes), and a send's future stays
    /// small enough for the system allocator's per-thread cache. The plugin does no work before
    /// its future is polled, and a future dropped unpolled sends nothing.
    pub fn send<'a>(
        &'a self,
        address: &str,
        envelope: Envelope,
    ) -> impl std::future::Future<Output = Result<(), PluginError>> + Send + 'a {
        let call = self.inner.send(RString::from(address), envelope.into_abi());
        async move { self.watch.watch("send", call).await.into_result().map_err(|error| self.failed(error)) }
    }

    /// See [`crate::Transport::send_batch`]: the items that failed, by their index in `batch`
    /// (empty: every item was taken). A failure of the call as a whole fails every item.
    pub async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let count = batch.len();
        let batch = outbound_into_abi(batch);
        match self.watch.watch("send_batch", self.inner.send_batch(batch)).await.into_result() {
            Ok(failures) => failures
                .into_iter()
                .map(|failure| SendFailure {
                    index: failure.index as usize,
                    error: self.failed(failure.error),
                })
                .collect(),
            Err(error) => {
                let error = self.failed(error);
                (0..count).map(|index| SendFailure { index, error: error.clone() }).collect()
            }
        }
    }

    /// See [`crate::Transport::receive`]. A message this host cannot represent (a destination
    /// kind from a newer interface) is settled as discarded and logged, never handed on; a
    /// batch of nothing else is not returned (empty means closed), the next one is waited for.
    pub async fn receive(&self, max_batch: u32) -> Result<Vec<Inbound>, PluginError> {
        self.receive_each(max_batch, Some).await
    }

    /// As [`LoadedTransport::receive`], each message made by `each` into what the caller keeps
    /// (or left out, `None`) as it comes out of the plugin's batch: one vector per batch, and no
    /// vector of [`Inbound`]s on the way. `each` is called at least once unless the transport
    /// is closed (an empty batch from the plugin).
    pub async fn receive_each<T>(
        &self,
        max_batch: u32,
        mut each: impl FnMut(Inbound) -> Option<T>,
    ) -> Result<Vec<T>, PluginError> {
        loop {
            let call = self.inner.receive(max_batch);
            let batch =
                self.watch.watch("receive", call).await.into_result().map_err(|error| self.failed(error))?;
            let received = batch.len();
            let mut accepted = Vec::with_capacity(received);
            let mut discarded = RVec::new();
            for inbound in batch {
                let delivery_tag = inbound.delivery_tag;
                match Envelope::from_abi(inbound.envelope) {
                    Ok(envelope) => accepted.extend(each(Inbound { envelope, delivery_tag })),
                    Err(error) => {
                        // One per message a newer peer sends: rate-limited.
                        static UNREPRESENTABLE: crate::log_rate::LogRateLimit =
                            crate::log_rate::LogRateLimit::standard();
                        if let Some(repeats) = UNREPRESENTABLE.check() {
                            tracing::warn!(%error, "discarding a message this host cannot represent{repeats}");
                        }
                        discarded
                            .push(Settlement { delivery_tag, outcome: SettlementOutcome::REJECTED_DISCARD });
                    }
                }
            }
            let all_discarded = received > 0 && discarded.len() == received;
            if !discarded.is_empty() {
                self.watch
                    .watch("settle", self.inner.settle(discarded))
                    .await
                    .into_result()
                    .map_err(PluginError::from_abi)?;
            }
            if !all_discarded {
                return Ok(accepted);
            }
        }
    }

    /// See [`crate::Transport::settle`].
    pub async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        let call = self.inner.settle(RVec::from(settlements));
        self.watch.watch("settle", call).await.into_result().map_err(|error| self.failed(error))
    }

    /// See [`crate::Transport::subscribe`].
    pub async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        let call = self.inner.subscribe(RString::from(pattern));
        self.watch.watch("subscribe", call).await.into_result().map_err(|error| self.failed(error))
    }

    /// See [`crate::Transport::unsubscribe`].
    pub async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        let call = self.inner.unsubscribe(RString::from(pattern));
        self.watch.watch("unsubscribe", call).await.into_result().map_err(|error| self.failed(error))
    }

    /// What the transport has done: the counts the boundary keeps and the transport's own.
    pub fn stats(&self) -> TransportCounters {
        TransportCounters::from_abi(self.inner.stats())
    }

    /// The longest poll of this transport's futures that blocked the host's thread (over
    /// [`poll_watch::BLOCKING_POLL`]), if any did.
    pub fn blocking_poll(&self) -> Option<BlockingPoll> {
        self.watch.longest()
    }

    /// See [`crate::Transport::close`].
    pub async fn close(&self) -> Result<(), PluginError> {
        self.watch.watch("close", self.inner.close()).await.into_result().map_err(|error| self.failed(error))
    }
}

/// A transport's statistics as the host sees them: what the boundary counted and what the
/// transport reported ([`TransportStats`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TransportCounters {
    /// Messages taken by `send` and `send_batch`.
    pub messages_sent: u64,
    /// Payload bytes of those messages.
    pub bytes_sent: u64,
    /// Messages handed to the host.
    pub messages_received: u64,
    /// Payload bytes of those messages.
    pub bytes_received: u64,
    /// Sends (or batch items) that failed.
    pub send_errors: u64,
    /// Receives that failed, and the transport's own errors.
    pub errors: u64,
    /// What the transport reports of itself.
    pub transport: TransportStats,
}

impl TransportCounters {
    fn from_abi(stats: comms_core::TransportStats) -> Self {
        let own = TransportStats {
            send_queue_depth: stats.send_queue_depth,
            receive_queue_depth: stats.receive_queue_depth,
            reconnects: stats.reconnects,
            counters: stats.counters.iter().map(|c| (c.name.as_str().to_owned(), c.value)).collect(),
            ..TransportStats::default()
        };
        Self {
            messages_sent: stats.messages_sent,
            bytes_sent: stats.bytes_sent,
            messages_received: stats.messages_received,
            bytes_received: stats.bytes_received,
            send_errors: stats.send_errors,
            errors: stats.errors,
            transport: own,
        }
    }
}

/// A discovery constructed by a plugin, called with idiomatic types.
pub struct LoadedDiscovery {
    inner: DiscoveryBox,
    watch: Arc<PollWatch>,
}

impl std::fmt::Debug for LoadedDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedDiscovery").finish_non_exhaustive()
    }
}

impl LoadedDiscovery {
    /// See [`crate::Discovery::announce`].
    pub async fn announce(&self, record: NodeRecord) -> Result<(), PluginError> {
        let call = self.inner.announce(record.into_abi());
        self.watch.watch("announce", call).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Discovery::withdraw`].
    pub async fn withdraw(&self, node: &NodeId) -> Result<(), PluginError> {
        let call = self.inner.withdraw(node.clone().into_abi());
        self.watch.watch("withdraw", call).await.into_result().map_err(PluginError::from_abi)
    }

    /// See [`crate::Discovery::peers`].
    pub async fn peers(&self) -> Result<Vec<NodeRecord>, PluginError> {
        let peers = self
            .watch
            .watch("peers", self.inner.peers())
            .await
            .into_result()
            .map_err(PluginError::from_abi)?;
        Ok(peers.into_iter().map(NodeRecord::from_abi).collect())
    }

    /// See [`crate::Discovery::find_service`]; a discovery built for a contract before 1.2 finds
    /// nothing.
    pub async fn find_service(&self, service: &str) -> Result<Vec<NodeRecord>, PluginError> {
        let call = self.inner.find_service(RString::from(service));
        let records =
            self.watch.watch("find_service", call).await.into_result().map_err(PluginError::from_abi)?;
        Ok(records.into_iter().map(NodeRecord::from_abi).collect())
    }

    /// See [`crate::Discovery::next_event`].
    pub async fn next_event(&self) -> Result<Option<PeerEvent>, PluginError> {
        let call = self.inner.next_event();
        let event =
            self.watch.watch("next_event", call).await.into_result().map_err(PluginError::from_abi)?;
        Ok(event.into_option().map(PeerEvent::from_abi))
    }

    /// The longest poll that blocked the host's thread, if any did.
    pub fn blocking_poll(&self) -> Option<BlockingPoll> {
        self.watch.longest()
    }

    /// See [`crate::Discovery::close`].
    pub async fn close(&self) -> Result<(), PluginError> {
        self.watch.watch("close", self.inner.close()).await.into_result().map_err(PluginError::from_abi)
    }
}

/// A batch in the boundary's types, in the same buffer: the two `Outbound` types have the same
/// layout, so the conversion happens in place and the vector is handed over as it is (no second
/// vector of a batch's envelopes, no second move of each).
fn outbound_into_abi(batch: Vec<Outbound>) -> RVec<comms_core::Outbound> {
    let batch: Vec<comms_core::Outbound> = batch
        .into_iter()
        .map(|item| comms_core::Outbound {
            address: item.address.into_abi(),
            envelope: item.envelope.into_abi(),
        })
        .collect();
    RVec::from(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Destination, MessageId};
    use comms_core::{abi_stable::std_types::RResult::ROk, async_ffi::FfiFuture, CommsResult};

    #[test]
    fn a_batch_goes_to_the_boundary_in_its_own_buffer() {
        let batch: Vec<Outbound> = (0..300u128)
            .map(|n| Outbound {
                address: format!("127.0.0.1:{n}").into(),
                envelope: Envelope::new(MessageId::from_u128(n), "a", Destination::node("b"), vec![n as u8]),
            })
            .collect();
        let buffer = batch.as_ptr() as usize;
        let converted = outbound_into_abi(batch);
        assert_eq!(converted.as_ptr() as usize, buffer, "converted in place, not copied");
        assert_eq!(converted.len(), 300);
        assert_eq!(converted[299].address.as_str(), "127.0.0.1:299");
        assert_eq!(converted[299].envelope.id, MessageId::from_u128(299));
    }

    /// A transport in the boundary's own types (as a plugin of a newer contract could answer):
    /// hands out the batches it was given, then an empty one (closed); records settlements.
    struct Scripted {
        batches: std::sync::Mutex<Vec<RVec<comms_core::Inbound>>>,
        settled: Arc<std::sync::Mutex<Vec<Settlement>>>,
    }

    fn ready<T: Send + 'static>(value: T) -> FfiFuture<T> {
        use comms_core::async_ffi::FutureExt;
        async move { value }.into_ffi()
    }

    impl comms_core::Transport for Scripted {
        fn info(&self) -> CommsResult<comms_core::TransportInfo> {
            ROk(comms_core::TransportInfo {
                capabilities: crate::Capabilities::ACKNOWLEDGEMENTS,
                local_address: "scripted".into(),
                max_message_size: 1024,
                extensions: RVec::new(),
            })
        }
        fn send(&self, _: RString, _: comms_core::Envelope) -> FfiFuture<CommsResult<()>> {
            ready(ROk(()))
        }
        fn send_batch(
            &self,
            _: RVec<comms_core::Outbound>,
        ) -> FfiFuture<CommsResult<RVec<comms_core::SendFailure>>> {
            ready(ROk(RVec::new()))
        }
        fn receive(&self, _: u32) -> FfiFuture<CommsResult<RVec<comms_core::Inbound>>> {
            let mut batches = self.batches.lock().unwrap();
            let next = if batches.is_empty() { RVec::new() } else { batches.remove(0) };
            ready(ROk(next))
        }
        fn settle(&self, settlements: RVec<Settlement>) -> FfiFuture<CommsResult<()>> {
            self.settled.lock().unwrap().extend(settlements);
            ready(ROk(()))
        }
        fn subscribe(&self, _: RString) -> FfiFuture<CommsResult<()>> {
            ready(ROk(()))
        }
        fn unsubscribe(&self, _: RString) -> FfiFuture<CommsResult<()>> {
            ready(ROk(()))
        }
        fn stats(&self) -> comms_core::TransportStats {
            comms_core::TransportStats::default()
        }
        fn close(&self) -> FfiFuture<CommsResult<()>> {
            ready(ROk(()))
        }
    }

    fn inbound(kind: u8, tag: u64) -> comms_core::Inbound {
        let mut envelope =
            Envelope::new(MessageId::from_u128(tag.into()), "newer", Destination::node("me"), vec![1])
                .into_abi();
        envelope.to.kind = kind;
        comms_core::Inbound { envelope, delivery_tag: tag }
    }

    #[tokio::test]
    async fn a_batch_of_only_unrepresentable_messages_is_settled_and_never_read_as_closed() {
        const NEWER_KIND: u8 = 200;
        let settled = Arc::default();
        let scripted = Scripted {
            batches: std::sync::Mutex::new(vec![
                RVec::from(vec![inbound(NEWER_KIND, 1), inbound(NEWER_KIND, 2)]),
                RVec::from(vec![inbound(NEWER_KIND, 3), inbound(comms_core::Destination::NODE, 4)]),
            ]),
            settled: Arc::clone(&settled),
        };
        let transport = LoadedTransport::from_box(
            comms_core::Transport_TO::from_value(scripted, comms_core::abi_stable::sabi_trait::TD_Opaque),
            "a scripted transport",
        )
        .unwrap();
        let batch = transport.receive(16).await.unwrap();
        let tags: Vec<u64> = batch.iter().map(|inbound| inbound.delivery_tag).collect();
        assert_eq!(tags, vec![4], "the first batch had nothing to hand on: the next one came");
        let discarded: Vec<u64> = settled.lock().unwrap().iter().map(|s| s.delivery_tag).collect();
        assert_eq!(discarded, vec![1, 2, 3], "every unrepresentable message was settled");
        assert!(settled.lock().unwrap().iter().all(|s| s.outcome == SettlementOutcome::REJECTED_DISCARD));
        assert!(transport.receive(16).await.unwrap().is_empty(), "then closed");
    }
}

//! Plugin side of the boundary: turns a [`Plugin`] and its idiomatic [`Transport`] and
//! [`Discovery`] objects into the ABI-stable root module the host loads.
//!
//! Every entry point runs under [`crate::runtime`]'s guard: inside the plugin's runtime, with
//! panics turned into errors. Plugin authors only call [`crate::export_plugin!`]; nothing here
//! is needed otherwise, and no ABI type appears in this module's public items.

use crate::{
    host_side::LoadedTransport,
    layer::InnerTransport,
    runtime::{guard_call, guard_future},
    Discovery, Envelope, Extensions, NodeId, NodeRecord, Outbound, PeerEvent, Plugin, Setup, Text, Transport,
};
use comms_core::{
    abi_stable::{
        library::{CheckTypeLayout, LibHeader, RootModuleResult},
        prefix_type::PrefixTypeTrait,
        sabi_trait::TD_Opaque,
        std_types::{ROption, RString, RVec},
    },
    async_ffi::FfiFuture,
    CommsResult, DiscoveryBox, Discovery_TO, HostServicesBox, PluginInfo, PluginModule, PluginModuleRef,
    PluginSetup, SendFailure, Settlement, TransportBox, TransportStats, Transport_TO,
};
use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};

/// The root module for plugin `P`.
pub(crate) fn plugin_module<P: Plugin>() -> PluginModuleRef {
    PluginModule {
        info: plugin_info::<P>,
        new_transport: new_transport::<P>,
        new_discovery: new_discovery::<P>,
        attach_host: attach_host::<P>,
        new_layer: new_layer::<P>,
    }
    .leak_into_prefix()
}

/// The header of a plugin library: the one exported symbol through which the host finds the
/// root module. [`crate::export_plugin!`] defines it; it has no use of its own.
#[repr(transparent)]
pub struct LibraryHeader(LibHeader);

impl LibraryHeader {
    /// The header of a library that exports plugin `P`.
    pub const fn new<P: Plugin>() -> Self {
        // SAFETY: the constructor returns the root module of the type it is declared for, and
        // the layout check is left on, so the host verifies the module before using it.
        Self(unsafe {
            LibHeader::from_constructor::<PluginModuleRef>(root_module::<P>, CheckTypeLayout::Yes)
        })
    }
}

impl std::fmt::Debug for LibraryHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibraryHeader").finish_non_exhaustive()
    }
}

extern "C" fn root_module<P: Plugin>() -> RootModuleResult {
    comms_core::abi_stable::library::__call_root_module_loader(plugin_module::<P>)
}

extern "C" fn plugin_info<P: Plugin>() -> PluginInfo {
    PluginInfo {
        name: RString::from(P::NAME),
        version: RString::from(P::VERSION),
        description: RString::from(P::DESCRIPTION),
        provides: P::PROVIDES,
        extensions: RVec::new(),
    }
}

extern "C" fn attach_host<P: Plugin>(host: HostServicesBox) {
    // Nothing may unwind out of an `extern "C"` function.
    let _ = std::panic::catch_unwind(move || crate::logging::attach_host(P::NAME, P::WORKER_THREADS, host));
}

fn setup_from_abi(setup: PluginSetup) -> Setup {
    Setup {
        node_id: NodeId::from_abi(setup.node_id),
        instance_name: setup.instance_name.as_str().to_owned(),
        config_toml: setup.config_toml.as_str().to_owned(),
        host_interface: setup.host_interface,
        extensions: Extensions::from_abi(setup.extensions),
    }
}

extern "C" fn new_transport<P: Plugin>(setup: PluginSetup) -> FfiFuture<CommsResult<TransportBox>> {
    guard_future("the transport constructor", async move {
        let transport = P::new_transport(setup_from_abi(setup)).await?;
        Ok(Transport_TO::from_value(TransportAdapter::new(transport), TD_Opaque))
    })
}

extern "C" fn new_discovery<P: Plugin>(setup: PluginSetup) -> FfiFuture<CommsResult<DiscoveryBox>> {
    guard_future("the discovery constructor", async move {
        let discovery = P::new_discovery(setup_from_abi(setup)).await?;
        Ok(Discovery_TO::from_value(DiscoveryAdapter(discovery), TD_Opaque))
    })
}

extern "C" fn new_layer<P: Plugin>(
    setup: PluginSetup,
    inner: TransportBox,
) -> FfiFuture<CommsResult<TransportBox>> {
    guard_future("the layer constructor", async move {
        let inner = LoadedTransport::from_box(inner, &format!("the transport below layer `{}`", P::NAME))?;
        let inner: Arc<dyn Transport> = Arc::new(InnerTransport::new(inner));
        // The layer owns the inner transport only once it exists: until then, this does.
        match P::new_layer(setup_from_abi(setup), Arc::clone(&inner)).await {
            Ok(layer) => Ok(Transport_TO::from_value(TransportAdapter::new(layer), TD_Opaque)),
            Err(error) => {
                let _ = inner.close().await;
                Err(error)
            }
        }
    })
}

/// What the boundary counts for every transport, so that plugins need not.
#[derive(Default)]
struct BoundaryCounters {
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    send_errors: AtomicU64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    receive_errors: AtomicU64,
}

struct TransportAdapter {
    transport: Arc<dyn Transport>,
    counters: Arc<BoundaryCounters>,
}

impl TransportAdapter {
    fn new(transport: Arc<dyn Transport>) -> Self {
        Self { transport, counters: Arc::default() }
    }
}

impl comms_core::Transport for TransportAdapter {
    fn info(&self) -> CommsResult<comms_core::TransportInfo> {
        guard_call("info", || {
            let info = self.transport.info();
            Ok(comms_core::TransportInfo {
                capabilities: info.capabilities,
                local_address: info.local_address.into(),
                max_message_size: info.max_message_size,
                extensions: info.extensions.into_abi(),
            })
        })
    }

    fn send(&self, address: RString, envelope: comms_core::Envelope) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.transport);
        let counters = Arc::clone(&self.counters);
        guard_future("send", async move {
            let envelope = Envelope::from_abi(envelope)?;
            let bytes = envelope.payload.len() as u64;
            let sent = transport.send(address.as_str(), envelope).await;
            match &sent {
                Ok(()) => {
                    counters.messages_sent.fetch_add(1, Relaxed);
                    counters.bytes_sent.fetch_add(bytes, Relaxed);
                }
                Err(_) => {
                    counters.send_errors.fetch_add(1, Relaxed);
                }
            }
            sent
        })
    }

    fn send_batch(&self, batch: RVec<comms_core::Outbound>) -> FfiFuture<CommsResult<RVec<SendFailure>>> {
        let transport = Arc::clone(&self.transport);
        let counters = Arc::clone(&self.counters);
        guard_future("send_batch", async move {
            let mut failures = RVec::new();
            let mut items = Vec::with_capacity(batch.len());
            let mut sizes = Vec::with_capacity(batch.len());
            // Items the plugin never sees (a destination kind this version does not know) fail
            // here; the others keep their positions in the host's batch.
            let mut positions = Vec::with_capacity(batch.len());
            for (index, outbound) in batch.into_iter().enumerate() {
                match Envelope::from_abi(outbound.envelope) {
                    Ok(envelope) => {
                        sizes.push(envelope.payload.len() as u64);
                        positions.push(index);
                        items.push(Outbound { address: Text::from_abi(outbound.address), envelope });
                    }
                    Err(error) => failures.push(SendFailure { index: index as u32, error: error.into_abi() }),
                }
            }
            let mut failed = vec![false; items.len()];
            for failure in transport.send_batch(items).await {
                let Some(&position) = positions.get(failure.index) else { continue };
                failed[failure.index] = true;
                failures.push(SendFailure { index: position as u32, error: failure.error.into_abi() });
            }
            let (mut messages, mut bytes) = (0, 0);
            for (size, failed) in sizes.iter().zip(&failed) {
                if !failed {
                    messages += 1;
                    bytes += size;
                }
            }
            counters.messages_sent.fetch_add(messages, Relaxed);
            counters.bytes_sent.fetch_add(bytes, Relaxed);
            counters.send_errors.fetch_add(failures.len() as u64, Relaxed);
            Ok(failures)
        })
    }

    fn receive(&self, max_batch: u32) -> FfiFuture<CommsResult<RVec<comms_core::Inbound>>> {
        let transport = Arc::clone(&self.transport);
        let counters = Arc::clone(&self.counters);
        guard_future("receive", async move {
            let batch = match transport.receive(max_batch.max(1) as usize).await {
                Ok(batch) => batch,
                Err(error) => {
                    counters.receive_errors.fetch_add(1, Relaxed);
                    return Err(error);
                }
            };
            let mut bytes = 0;
            let batch: RVec<comms_core::Inbound> = batch
                .into_iter()
                .map(|inbound| {
                    bytes += inbound.envelope.payload.len() as u64;
                    comms_core::Inbound {
                        envelope: inbound.envelope.into_abi(),
                        delivery_tag: inbound.delivery_tag,
                    }
                })
                .collect();
            counters.messages_received.fetch_add(batch.len() as u64, Relaxed);
            counters.bytes_received.fetch_add(bytes, Relaxed);
            Ok(batch)
        })
    }

    fn settle(&self, settlements: RVec<Settlement>) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.transport);
        guard_future("settle", async move { transport.settle(settlements.to_vec()).await })
    }

    fn subscribe(&self, pattern: RString) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.transport);
        guard_future("subscribe", async move { transport.subscribe(pattern.as_str()).await })
    }

    fn unsubscribe(&self, pattern: RString) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.transport);
        guard_future("unsubscribe", async move { transport.unsubscribe(pattern.as_str()).await })
    }

    fn stats(&self) -> TransportStats {
        let own = guard_call("stats", || Ok(self.transport.stats())).into_result().unwrap_or_default();
        let counters = &self.counters;
        TransportStats {
            messages_sent: counters.messages_sent.load(Relaxed),
            bytes_sent: counters.bytes_sent.load(Relaxed),
            messages_received: counters.messages_received.load(Relaxed),
            bytes_received: counters.bytes_received.load(Relaxed),
            send_errors: counters.send_errors.load(Relaxed),
            errors: counters.receive_errors.load(Relaxed) + own.errors,
            send_queue_depth: own.send_queue_depth,
            receive_queue_depth: own.receive_queue_depth,
            reconnects: own.reconnects,
            counters: own
                .counters
                .into_iter()
                .map(|(name, value)| comms_core::StatCounter { name: name.into(), value })
                .collect(),
        }
    }

    fn close(&self) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.transport);
        guard_future("close", async move { transport.close().await })
    }
}

struct DiscoveryAdapter(Arc<dyn Discovery>);

impl comms_core::Discovery for DiscoveryAdapter {
    fn announce(&self, record: comms_core::NodeRecord) -> FfiFuture<CommsResult<()>> {
        let discovery = Arc::clone(&self.0);
        guard_future("announce", async move { discovery.announce(NodeRecord::from_abi(record)).await })
    }

    fn withdraw(&self, node: comms_core::NodeId) -> FfiFuture<CommsResult<()>> {
        let discovery = Arc::clone(&self.0);
        guard_future("withdraw", async move { discovery.withdraw(NodeId::from_abi(node)).await })
    }

    fn peers(&self) -> FfiFuture<CommsResult<RVec<comms_core::NodeRecord>>> {
        let discovery = Arc::clone(&self.0);
        guard_future("peers", async move {
            Ok(discovery.peers().await?.into_iter().map(NodeRecord::into_abi).collect())
        })
    }

    fn next_event(&self) -> FfiFuture<CommsResult<ROption<comms_core::PeerEvent>>> {
        let discovery = Arc::clone(&self.0);
        guard_future("next_event", async move {
            Ok(discovery.next_event().await?.map(PeerEvent::into_abi).into())
        })
    }

    fn close(&self) -> FfiFuture<CommsResult<()>> {
        let discovery = Arc::clone(&self.0);
        guard_future("close", async move { discovery.close().await })
    }

    fn find_service(&self, service: RString) -> FfiFuture<CommsResult<RVec<comms_core::NodeRecord>>> {
        let discovery = Arc::clone(&self.0);
        guard_future("find_service", async move {
            Ok(discovery
                .find_service(service.as_str())
                .await?
                .into_iter()
                .map(NodeRecord::into_abi)
                .collect())
        })
    }
}

/// Exports a [`Plugin`] as this library's root module, so the comms host can load it.
///
/// Use it once, in a crate with `crate-type = ["cdylib"]` (add `"rlib"` to also link the plugin
/// into programs and tests):
///
/// ```text
/// struct MyPlugin;
/// impl comms_plugin_api::Plugin for MyPlugin { /* ... */ }
/// comms_plugin_api::export_plugin!(MyPlugin);
/// ```
///
/// It defines the one symbol the host looks for (abi_stable's root-module loader symbol), with
/// a type of this crate, so a plugin crate depends on nothing but comms-plugin-api.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::export::LibraryHeader =
            $crate::export::LibraryHeader::new::<$plugin>();
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn exported_symbol_name_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            comms_core::abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}

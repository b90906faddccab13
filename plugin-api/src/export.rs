//! Plugin side of the boundary: turns a [`Plugin`] and its idiomatic [`Transport`] and
//! [`Discovery`] objects into the ABI-stable [`PluginModule`] the host loads.
//!
//! Every entry point runs under [`crate::runtime`]'s guard: inside the plugin's runtime, with
//! panics turned into errors. Plugin authors only call [`crate::export_plugin!`]; the functions
//! here are public so that the same adapters serve a plugin linked statically into a program.

use crate::{
    runtime::{guard_call, guard_future},
    Discovery, Envelope, NodeId, NodeRecord, PeerEvent, Plugin, Setup, Transport,
};
use comms_core::{
    abi_stable::{
        prefix_type::PrefixTypeTrait,
        sabi_trait::TD_Opaque,
        std_types::{ROption, RString, RVec},
    },
    async_ffi::FfiFuture,
    CommsResult, DiscoveryBox, Discovery_TO, PluginInfo, PluginModule, PluginModuleRef, PluginSetup,
    Settlement, TransportBox, Transport_TO,
};
use std::sync::Arc;

/// The root module for plugin `P`. [`crate::export_plugin!`] exports it; a program that links a
/// plugin crate statically can pass it to the host directly.
pub fn plugin_module<P: Plugin>() -> PluginModuleRef {
    PluginModule {
        info: plugin_info::<P>,
        new_transport: new_transport::<P>,
        new_discovery: new_discovery::<P>,
    }
    .leak_into_prefix()
}

/// Wraps an idiomatic transport into the boundary's trait object.
pub fn transport_box(transport: Arc<dyn Transport>) -> TransportBox {
    Transport_TO::from_value(TransportAdapter(transport), TD_Opaque)
}

/// Wraps an idiomatic discovery into the boundary's trait object.
pub fn discovery_box(discovery: Arc<dyn Discovery>) -> DiscoveryBox {
    Discovery_TO::from_value(DiscoveryAdapter(discovery), TD_Opaque)
}

extern "C" fn plugin_info<P: Plugin>() -> PluginInfo {
    PluginInfo {
        name: RString::from(P::NAME),
        version: RString::from(P::VERSION),
        description: RString::from(P::DESCRIPTION),
        provides: P::PROVIDES,
    }
}

fn setup_from_abi(setup: PluginSetup) -> Setup {
    Setup {
        node_id: NodeId::from_abi(setup.node_id),
        instance_name: setup.instance_name.into_string(),
        config_toml: setup.config_toml.into_string(),
    }
}

extern "C" fn new_transport<P: Plugin>(setup: PluginSetup) -> FfiFuture<CommsResult<TransportBox>> {
    guard_future("the transport constructor", async move {
        Ok(transport_box(P::new_transport(setup_from_abi(setup)).await?))
    })
}

extern "C" fn new_discovery<P: Plugin>(setup: PluginSetup) -> FfiFuture<CommsResult<DiscoveryBox>> {
    guard_future("the discovery constructor", async move {
        Ok(discovery_box(P::new_discovery(setup_from_abi(setup)).await?))
    })
}

struct TransportAdapter(Arc<dyn Transport>);

impl comms_core::Transport for TransportAdapter {
    fn info(&self) -> CommsResult<comms_core::TransportInfo> {
        guard_call("info", || {
            let info = self.0.info();
            Ok(comms_core::TransportInfo {
                capabilities: info.capabilities,
                local_address: info.local_address.into(),
                max_message_size: info.max_message_size,
            })
        })
    }

    fn send(&self, address: RString, envelope: comms_core::Envelope) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.0);
        guard_future(
            "send",
            async move { transport.send(address.as_str(), Envelope::from_abi(envelope)?).await },
        )
    }

    fn receive(&self, max_batch: u32) -> FfiFuture<CommsResult<RVec<comms_core::Inbound>>> {
        let transport = Arc::clone(&self.0);
        guard_future("receive", async move {
            let batch = transport.receive(max_batch.max(1) as usize).await?;
            Ok(batch
                .into_iter()
                .map(|inbound| comms_core::Inbound {
                    envelope: inbound.envelope.into_abi(),
                    delivery_tag: inbound.delivery_tag,
                })
                .collect())
        })
    }

    fn settle(&self, settlements: RVec<Settlement>) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.0);
        guard_future("settle", async move { transport.settle(settlements.to_vec()).await })
    }

    fn subscribe(&self, pattern: RString) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.0);
        guard_future("subscribe", async move { transport.subscribe(pattern.as_str()).await })
    }

    fn unsubscribe(&self, pattern: RString) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.0);
        guard_future("unsubscribe", async move { transport.unsubscribe(pattern.as_str()).await })
    }

    fn close(&self) -> FfiFuture<CommsResult<()>> {
        let transport = Arc::clone(&self.0);
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
}

/// Exports a [`Plugin`] as this library's root module, so the comms host can load it.
///
/// Use it once, in a crate with `crate-type = ["cdylib", "rlib"]`:
///
/// ```text
/// struct MyPlugin;
/// impl comms_plugin_api::Plugin for MyPlugin { /* ... */ }
/// comms_plugin_api::export_plugin!(MyPlugin);
/// ```
///
/// The expansion is what `abi_stable::export_root_module` generates, written with paths through
/// this crate so that a plugin crate needs no direct `abi_stable` dependency.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The root module of this plugin library, as the comms host loads it.
        pub fn comms_plugin_module() -> $crate::__private::PluginModuleRef {
            $crate::export::plugin_module::<$plugin>()
        }

        #[doc(hidden)]
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader:
            $crate::__private::abi_stable::library::LibHeader = {
            extern "C" fn erased_root_module() -> $crate::__private::abi_stable::library::RootModuleResult {
                $crate::__private::abi_stable::library::__call_root_module_loader(comms_plugin_module)
            }
            unsafe {
                $crate::__private::abi_stable::library::LibHeader::from_constructor::<
                    $crate::__private::PluginModuleRef,
                >(erased_root_module, $crate::__private::abi_stable::library::CheckTypeLayout::Yes)
            }
        };
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

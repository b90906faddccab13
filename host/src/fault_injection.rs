//! Fault injection: drops, delays, duplicates and reorders what a transport sends, so that an
//! application can be tested against an unreliable network with any backend.
//!
//! It is the `faults` layer (crate `comms-faults`, see `docs/layers.md`), built into the host so
//! that it needs no library file. Configured per transport, in the transport's table of the
//! node's config file, either with its own key (the layer then sits under every other layer, on
//! the transport itself):
//!
//! ```toml
//! [transports.tcp]
//! listen = "127.0.0.1:7001"
//! faults = { drop = 0.1, delay_ms = 20, jitter_ms = 10, duplicate = 0.01, reorder = 0.05, seed = 7 }
//! ```
//!
//! or as a layer anywhere in a stack: `layers = ["compress", { plugin = "faults", drop = 0.1 }]`.
//! In code, [`crate::NodeBuilder::faults`] adds it to the transport added last. Every key of
//! [`FaultConfig`] is optional and defaults to no fault; what each does, and the guarantees
//! (a seed replays, bounded memory, held and delayed messages flushed before the transport
//! closes and counted in its send queue until then), are in the docs of `comms_faults`.

pub use comms_faults::FaultConfig;
use comms_plugin_api::host_side::PluginLibrary;

/// The `faults` layer, linked into this program.
pub(crate) fn library() -> PluginLibrary {
    PluginLibrary::linked::<comms_faults::FaultsPlugin>()
}

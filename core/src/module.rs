//! The root module every plugin library exports.

use crate::{CommsResult, DiscoveryBox, Extension, HostServicesBox, InterfaceVersion, NodeId, TransportBox};
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RString, RVec},
    StableAbi,
};
use async_ffi::FfiFuture;

/// What a plugin library provides.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Provides(pub u32);

impl Provides {
    /// `new_transport` works.
    pub const TRANSPORT: Self = Self(1 << 0);
    /// `new_discovery` works.
    pub const DISCOVERY: Self = Self(1 << 1);
    /// `new_layer` works: the plugin wraps another transport (contract 1.2).
    pub const LAYER: Self = Self(1 << 2);

    /// Whether every flag in `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Provides {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Describes a plugin library.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Short name, e.g. `"tcp"`; by convention the library file is `libcomms_<name>.so`.
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// One line for `comms plugins list`.
    pub description: RString,
    /// Transport, discovery, layer, or several.
    pub provides: Provides,
    /// Attributes added by later minor versions of the contract (none in 1.0).
    pub extensions: RVec<Extension>,
}

/// What the host passes to a plugin constructor.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginSetup {
    /// The id of the node the transport or discovery serves.
    pub node_id: NodeId,
    /// The name the host uses for this instance (the config table name, e.g. `"tcp"`).
    pub instance_name: RString,
    /// The plugin's configuration: its TOML table, re-serialized as TOML text.
    pub config_toml: RString,
    /// The contract version of the host, so that a plugin built for a newer minor knows which
    /// of its additions the host will use.
    pub host_interface: InterfaceVersion,
    /// Attributes added by later minor versions of the contract: [`LINK_SECURITY_EXTENSION`]
    /// (1.2).
    pub extensions: RVec<Extension>,
}

/// [`PluginSetup::extensions`] key (added in 1.2): the node's link security for a discovery
/// plugin, so that it can authenticate what it exchanges with the node's identity. The value is
/// the same TOML table (UTF-8 text) that a transport gets under the `comms_security` key of its
/// config; present only when the node asks for authenticated links (`[security] links =
/// "noise"`). A discovery that does not know the key runs as before.
pub const LINK_SECURITY_EXTENSION: &str = "comms.link_security";

/// The root module of a plugin library: exported once per library (comms-plugin-api's
/// `export_plugin!` does it).
///
/// Fields after [`PluginModule::attach_host`] may be added by later minor versions; their
/// accessors return `None` for a plugin built for an older one.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    /// Name, version and what the plugin provides.
    pub info: extern "C" fn() -> PluginInfo,
    /// Constructs a transport from its configuration.
    pub new_transport: extern "C" fn(setup: PluginSetup) -> FfiFuture<CommsResult<TransportBox>>,
    /// Constructs a discovery from its configuration.
    pub new_discovery: extern "C" fn(setup: PluginSetup) -> FfiFuture<CommsResult<DiscoveryBox>>,
    /// Hands the library the host's services (its log, its thread budget). Called once, right
    /// after the library is loaded and before any constructor; never for a plugin linked into the
    /// program (it shares the program's log already).
    #[sabi(last_prefix_field)]
    pub attach_host: extern "C" fn(host: HostServicesBox),
    /// Constructs a layer: a transport that wraps `inner` (any transport, or another layer) and
    /// is itself a transport. The layer owns `inner` from then on: it calls it, and closes it in
    /// its own `close`. Added in 1.2; `None` for a plugin built for 1.0 or 1.1.
    pub new_layer:
        extern "C" fn(setup: PluginSetup, inner: TransportBox) -> FfiFuture<CommsResult<TransportBox>>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "comms_plugin";
    const NAME: &'static str = "comms plugin interface";
    /// The contract version (`build.rs` makes the package version the contract's).
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

impl std::fmt::Debug for PluginModuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginModuleRef").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PluginModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginModule").finish_non_exhaustive()
    }
}

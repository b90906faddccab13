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
    /// Transport, discovery or both.
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
    /// Attributes added by later minor versions of the contract (none in 1.0).
    pub extensions: RVec<Extension>,
}

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

//! What the host offers a plugin library: its log and its thread budget.

use crate::Extension;
use abi_stable::{
    sabi_trait,
    std_types::{RBox, RStr, RString, RVec},
    StableAbi,
};

/// The severity of a log record, as in `tracing`.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogLevel(pub u8);

impl LogLevel {
    /// Very verbose.
    pub const TRACE: Self = Self(0);
    /// For developers.
    pub const DEBUG: Self = Self(1);
    /// Normal operation.
    pub const INFO: Self = Self(2);
    /// Something unexpected the plugin recovered from.
    pub const WARN: Self = Self(3);
    /// Something failed.
    pub const ERROR: Self = Self(4);
    /// Nothing is logged (only as a maximum level).
    pub const OFF: Self = Self(5);
}

/// One log record of a plugin, forwarded to the host's log.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// Where it comes from, as a `tracing` target (usually the module path, `comms_tcp::writer`).
    pub target: RString,
    /// The message with its fields, formatted (`connect failed peer=10.0.0.2:7001 attempt=3`).
    pub message: RString,
    /// Attributes added by later minor versions of the contract (none in 1.0).
    pub extensions: RVec<Extension>,
}

/// Services the host offers every plugin library it loads, given to the library once, right
/// after loading, through [`crate::PluginModule::attach_host`].
///
/// Methods added after contract 1.0 go after [`HostServices::log`], each with a default body
/// that a plugin runs when its host is older and does not have the method.
#[sabi_trait]
pub trait HostServices: Send + Sync {
    /// The most verbose level the host logs at all; records below it are not worth formatting.
    fn max_log_level(&self) -> LogLevel;

    /// Whether the host would log a record of `level` from `target` (its filter, e.g.
    /// `RUST_LOG`, decides).
    fn log_enabled(&self, level: LogLevel, target: RStr<'_>) -> bool;

    /// The worker threads a plugin library's runtime should have; 0 leaves it to the plugin.
    fn worker_threads(&self) -> u32;

    /// Logs `record` through the host's log, filtered and formatted like the host's own records.
    #[sabi(last_prefix_field)]
    fn log(&self, record: LogRecord);
}

/// A boxed host-services object as the host hands it to plugins.
pub type HostServicesBox = HostServices_TO<'static, RBox<()>>;

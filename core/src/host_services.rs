//! What the host offers a plugin library: its log, its thread budget and (since 1.1) its
//! executor and reactor, so that a plugin's sockets are driven by the host's threads.

use crate::Extension;
use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};
use async_ffi::{FfiContext, FfiFuture, FfiPoll};
use std::mem::MaybeUninit;

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

    /// Runs `task` to completion on the host's executor, when the calling thread belongs to
    /// one; returns it unchanged (for the plugin to run on its own runtime) otherwise. The task
    /// must enter whatever context the plugin's code needs on every poll and catch its own
    /// panics. Added in 1.1; the default (a 1.0 host) never takes the task.
    fn spawn(&self, task: FfiFuture<()>) -> ROption<FfiFuture<()>> {
        ROption::RSome(task)
    }

    /// Takes the connected, non-blocking stream socket `fd` and drives it with the host's
    /// reactor, when the calling thread belongs to a host executor that has one: the socket is
    /// then the host's (closed when the returned object is dropped), and read and written through
    /// it. `RNone` leaves `fd` with the plugin, untouched. Added in 1.1; the default (a 1.0 host)
    /// never takes a socket.
    fn adopt_socket(&self, fd: i32) -> ROption<HostSocketBox> {
        let _ = fd;
        ROption::RNone
    }
}

/// A result of a [`HostSocket`] operation: a byte count, or the operating system's error number.
pub type SocketResult = RResult<u64, i32>;

/// A stream socket the host drives for a plugin (see [`HostServices::adopt_socket`]). Its
/// methods are those of tokio's `AsyncRead` and `AsyncWrite`: `Pending` registers the waker of
/// `cx`, which the host's reactor wakes once the socket is ready. Errors are operating-system
/// error numbers (`errno`). Added in 1.1.
#[sabi_trait]
pub trait HostSocket: Send + Sync {
    /// Reads into the start of `buffer` (which may be uninitialized: the host initializes the
    /// bytes it reports and writes no others); returns how many. 0 means the peer closed its side.
    fn poll_read(
        &self,
        cx: &mut FfiContext<'_>,
        buffer: RSliceMut<'_, MaybeUninit<u8>>,
    ) -> FfiPoll<SocketResult>;

    /// Writes a prefix of `bytes`; returns how many bytes were written.
    fn poll_write(&self, cx: &mut FfiContext<'_>, bytes: RSlice<'_, u8>) -> FfiPoll<SocketResult>;

    /// Shuts the writing side down (the peer reads end of stream once it has read the rest).
    #[sabi(last_prefix_field)]
    fn shutdown_write(&self) -> SocketResult;
}

/// A boxed socket driven by the host.
pub type HostSocketBox = HostSocket_TO<'static, RBox<()>>;

/// A boxed host-services object as the host hands it to plugins.
pub type HostServicesBox = HostServices_TO<'static, RBox<()>>;

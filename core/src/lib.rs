//! # comms-core: the ABI-stable contract
//!
//! This crate is the only thing the comms host and a dynamically loaded plugin must agree on.
//! Everything here crosses a `cdylib` boundary, so every type is `#[repr(C)]` (or transparent) and
//! derives [`abi_stable::StableAbi`]; the host checks the layout of all of it when it loads a
//! plugin and refuses a plugin built against an incompatible contract.
//!
//! What is here, and nothing more:
//!
//! - [`PluginModule`]: the root module a plugin exports (plugin info, constructors, and the
//!   hand-over of the host's services).
//! - [`Transport`], [`Discovery`] and [`HostServices`]: `#[sabi_trait]` objects whose async
//!   operations return [`async_ffi::FfiFuture`]s.
//! - [`Envelope`] and its parts ([`NodeId`], [`MessageId`], [`Destination`], [`Header`],
//!   [`Payload`]), [`Outbound`] and [`SendFailure`] (batched sends), [`Inbound`] and
//!   [`Settlement`] (delivery acknowledgement across the boundary).
//! - [`TransportStats`], [`LogRecord`]: what the host needs for metrics and logs.
//! - [`CommsError`] with an [`ErrorCode`], a message and a retryable flag.
//! - [`Capabilities`] flags a transport declares.
//! - [`Extension`]: the extension area every by-value struct carries.
//!
//! Plugin authors do not use this crate directly: `comms-plugin-api` gives them idiomatic async
//! traits and exports them as a [`PluginModule`]. Keeping every `abi_stable` type inside this
//! crate and `comms-plugin-api` means a later change of ABI crate touches only those two.
//!
//! ## Versioning
//!
//! The contract has a version of its own, [`INTERFACE_VERSION`] (`major.minor`, now 1.2),
//! independent of the crates' versions. Same major loads: a plugin built for an older minor
//! always loads into a newer host, and a plugin built for a newer minor loads into an older host,
//! which ignores what it does not know. A different major never loads.
#![doc = include_str!("../COMPATIBILITY.md")]
#![warn(missing_docs)]

mod capabilities;
mod discovery;
mod envelope;
mod error;
mod extensions;
mod host_services;
mod interface_version;
mod module;
mod transport;
mod version;

pub use capabilities::Capabilities;
pub use discovery::{
    Discovery, DiscoveryBox, Discovery_TO, NodeRecord, PeerEvent, PeerEventKind, TransportAddress,
};
pub use envelope::{
    Destination, Envelope, Header, Inbound, MessageId, NodeId, Outbound, Payload, SendFailure, Settlement,
    SettlementOutcome,
};
pub use error::{CommsError, ErrorCode};
pub use extensions::Extension;
pub use host_services::{
    HostServices, HostServicesBox, HostServices_TO, HostSocket, HostSocketBox, HostSocket_TO, LogLevel,
    LogRecord, SocketResult,
};
pub use interface_version::{INTERFACE_MAJOR, INTERFACE_MINOR};
pub use module::{PluginInfo, PluginModule, PluginModuleRef, PluginSetup, Provides, LINK_SECURITY_EXTENSION};
pub use transport::{StatCounter, Transport, TransportBox, TransportInfo, TransportStats, Transport_TO};
pub use version::{Compatibility, InterfaceVersion, INTERFACE_VERSION};

/// Re-exported so that `comms-plugin-api` uses exactly the versions this contract was built
/// with.
pub use abi_stable;
/// Re-exported for the same reason as [`abi_stable`].
pub use async_ffi;

/// Result type of every operation that crosses the plugin boundary.
pub type CommsResult<T> = abi_stable::std_types::RResult<T, CommsError>;

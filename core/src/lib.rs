//! # comms-core: the ABI-stable contract
//!
//! This crate is the only thing the comms host and a dynamically loaded plugin must agree on.
//! Everything here crosses a `cdylib` boundary, so every type is `#[repr(C)]` (or transparent) and
//! derives [`abi_stable::StableAbi`]; the host checks the layout of all of it when it loads a
//! plugin and refuses a plugin built against a different interface.
//!
//! What is here, and nothing more:
//!
//! - [`PluginModule`]: the root module a plugin exports (plugin info and constructors).
//! - [`Transport`] and [`Discovery`]: `#[sabi_trait]` objects whose async operations return
//!   [`async_ffi::FfiFuture`]s.
//! - [`Envelope`] and its parts ([`NodeId`], [`MessageId`], [`Destination`], [`Header`]),
//!   [`Inbound`] and [`Settlement`] (delivery acknowledgement across the boundary).
//! - [`CommsError`] with an [`ErrorCode`], a message and a retryable flag.
//! - [`Capabilities`] flags a transport declares.
//!
//! Plugin authors do not use this crate directly: `comms-plugin-api` gives them idiomatic async
//! traits and exports them as a [`PluginModule`]. Keeping every `abi_stable` type inside this
//! crate and `comms-plugin-api` means a later change of ABI crate touches only those two.
//!
//! ## Compatibility rules
//!
//! - The interface version is this crate's package version ([`INTERFACE_VERSION`]); while it is
//!   `0.x`, a plugin loads only if its minor version equals the host's.
//! - Prefix types ([`PluginModule`] and the trait-object vtables) may only grow at their end, so an
//!   older plugin keeps loading in a newer host of the same minor version.
//! - Codes and flags are integers with named constants rather than Rust enums, so a newer peer
//!   can send a value an older one does not know without breaking the layout.

#![warn(missing_docs)]

mod capabilities;
mod discovery;
mod envelope;
mod error;
mod module;
mod transport;

pub use capabilities::Capabilities;
pub use discovery::{
    Discovery, DiscoveryBox, Discovery_TO, NodeRecord, PeerEvent, PeerEventKind, TransportAddress,
};
pub use envelope::{
    Destination, Envelope, Header, Inbound, MessageId, NodeId, Settlement, SettlementOutcome,
};
pub use error::{CommsError, ErrorCode};
pub use module::{PluginInfo, PluginModule, PluginModuleRef, PluginSetup, Provides, INTERFACE_VERSION};
pub use transport::{Transport, TransportBox, TransportInfo, Transport_TO};

/// Re-exported so that `comms-plugin-api` and the host use exactly the versions this contract was
/// built with.
pub use abi_stable;
/// Re-exported for the same reason as [`abi_stable`].
pub use async_ffi;

/// Result type of every operation that crosses the plugin boundary.
pub type CommsResult<T> = abi_stable::std_types::RResult<T, CommsError>;

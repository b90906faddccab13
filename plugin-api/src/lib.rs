//! # comms-plugin-api: the plugin author's toolkit
//!
//! A comms plugin is a `cdylib` that depends on this crate alone. It implements the idiomatic
//! async traits [`Transport`] and/or [`Discovery`], describes itself with [`Plugin`] and exports
//! itself with [`export_plugin!`]. This crate takes care of everything the boundary demands:
//!
//! - **Runtime.** Each plugin library owns a tokio runtime ([`runtime`]); every call from the
//!   host is polled inside it, so plugin I/O works whatever executor the host uses.
//! - **Panics.** Every entry point runs under `catch_unwind`; a panic reaches the host as an
//!   error with code [`ErrorCode::PANICKED`], never as an abort.
//! - **Config.** [`Setup::config`] deserializes the plugin's TOML table into the plugin's own
//!   struct; an unknown or mistyped key is an error that names the key, whether or not the
//!   struct has `#[serde(deny_unknown_fields)]` (see [`config`] and the example below).
//! - **Shared wire logic.** [`framing`] (length-prefixed frames with a size limit), [`wire`]
//!   (the documented envelope encoding), [`backoff`] and a complete [`stream_transport`] (hello,
//!   batching writer, reconnect, bounded queues) so that backends do not each write their own.
//! - **Shared discovery logic.** [`peer_events`] (the queue between a discovery's background
//!   work and `next_event`: one event per node, the latest) and, with cargo feature `registry`,
//!   module `registry` (the whole discovery over a table of node records, given its
//!   statements).
//! - **Encrypted links** (cargo feature `noise`). [`security`]: node identities, the Noise
//!   handshake, and [`stream_transport`] links encrypted and authenticated by them when the host
//!   asks for it.
//! - **TLS to servers** (cargo feature `tls`). Module `tls`: the `ca_file` / `client_cert_file`
//!   / `client_key_file` keys of `rediss://`-style URLs, read and checked with errors naming
//!   key and path, and telling a failed certificate verification from errors that retries fix.
//!
//! ## Cargo features
//!
//! None is on by default, so that a plugin which needs neither builds no cryptography (no
//! snow, ring, ed25519-dalek, rand or rustls):
//!
//! | feature | what it adds | who needs it |
//! |---|---|---|
//! | `noise` | identities ([`security`]), the Noise handshake, encrypted [`stream_transport`] links | a transport that declares [`Capabilities::ENCRYPTED`] |
//! | `tls` | module `tls`: the certificate keys of TLS URLs and their checks | a plugin talking TLS to a server (a broker, a database) |
//! | `own-allocator` | module `allocator`: mimalloc as the library's global allocator, a heap of its own | a plugin library moving messages (every in-tree one turns it on) |
//! | `registry` | module `registry`: discovery through a table of node records (stored as JSON) | a database-backed discovery (SQLite, PostgreSQL) |
//! | `testing` | module `testing`: an in-process pair of linked transports that records what crossed it | a layer's unit tests (as a dev-dependency feature) |
//!
//! Without `noise`, [`Setup::link_security`] returns `Ok(None)` when the host wants plain links
//! and an error naming the feature when it asks for encrypted ones, and
//! [`stream_transport::StreamTransport::start`] refuses link security with that error: the
//! plugin fails to start instead of running in the clear.
//!
//! ## Config structs and serde
//!
//! serde is re-exported as [`comms_plugin_api::serde`](serde), so a plugin needs no serde
//! dependency of its own. Point the derive at the re-export with `#[serde(crate = ...)]`:
//!
//! ```
//! use comms_plugin_api::serde::Deserialize;
//!
//! #[derive(Debug, Deserialize)]
//! #[serde(crate = "comms_plugin_api::serde")]
//! struct MyConfig {
//!     listen: Option<String>,
//!     #[serde(default = "default_batch")]
//!     batch: usize,
//! }
//!
//! fn default_batch() -> usize { 64 }
//!
//! // In `Plugin::new_transport`: `let config: MyConfig = setup.config()?;`. No
//! // `deny_unknown_fields` needed: a misspelt key is an error naming it and the keys expected.
//! let error = comms_plugin_api::config::parse_config::<MyConfig>("lisen = \"0.0.0.0:7000\"").unwrap_err();
//! assert_eq!(error.message, "unknown field `lisen`, expected `listen` or `batch`");
//! ```
//!
//! ## A minimal plugin
//!
//! ```no_run
//! use comms_plugin_api::{async_trait, export_plugin, Capabilities, Envelope, Inbound, Plugin,
//!     PluginError, Provides, Setup, Transport, TransportInfo};
//! use std::sync::Arc;
//!
//! struct Loopback { queue: tokio::sync::Mutex<Vec<Envelope>> }
//!
//! #[async_trait]
//! impl Transport for Loopback {
//!     fn info(&self) -> TransportInfo {
//!         TransportInfo::new(Capabilities::NONE, "here", 1 << 20)
//!     }
//!     async fn send(&self, _address: &str, envelope: Envelope) -> Result<(), PluginError> {
//!         self.queue.lock().await.push(envelope);
//!         Ok(())
//!     }
//!     async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
//!         let mut queue = self.queue.lock().await;
//!         let n = queue.len().min(max_batch);
//!         Ok(queue.drain(..n).map(|envelope| Inbound { envelope, delivery_tag: 0 }).collect())
//!     }
//!     async fn close(&self) -> Result<(), PluginError> { Ok(()) }
//! }
//!
//! struct LoopbackPlugin;
//!
//! #[async_trait]
//! impl Plugin for LoopbackPlugin {
//!     const NAME: &'static str = "loopback";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "delivers every message to itself";
//!     const PROVIDES: Provides = Provides::TRANSPORT;
//!     async fn new_transport(_setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
//!         Ok(Arc::new(Loopback { queue: Default::default() }))
//!     }
//! }
//!
//! export_plugin!(LoopbackPlugin);
//! ```
//!
//! (A real `receive` waits for a message instead of returning an empty batch; see the TCP
//! backend or `examples/third-party-plugin`.)

#![warn(missing_docs)]

#[cfg(feature = "own-allocator")]
pub mod allocator;
pub mod backoff;
pub mod config;
pub mod datagram_carrier;
mod discovery;
mod envelope;
mod error;
pub mod export;
pub mod framework;
pub mod framing;
pub mod hex;
pub mod host_driven;
pub mod host_side;
pub mod inbound;
pub mod layer;
pub mod log_rate;
mod logging;
pub mod node_limits;
pub mod peer_events;
mod plugin;
pub mod record_json;
pub mod redact;
#[cfg(feature = "registry")]
pub mod registry;
pub mod requeue_delay;
pub mod runtime;
pub mod security;
pub mod socket_address;
mod stable_waker;
pub mod stream_transport;
#[cfg(feature = "testing")]
pub mod testing;
mod text;
#[cfg(feature = "tls")]
pub mod tls;
pub mod topics;
mod transport;
pub mod wire;

pub use async_trait::async_trait;
pub use comms_core::{InterfaceVersion, INTERFACE_VERSION};
pub use discovery::{
    snapshot_changes, Discovery, NodeRecord, PeerEvent, PeerEventKind, OFFLINE_KEY, OFFLINE_VALUE,
};
pub use envelope::{
    Destination, Envelope, Extensions, HeaderPairs, Headers, MessageId, NodeId, Payload, SharedBuffer,
};
pub use error::{ErrorCode, PluginError};
pub use logging::demote_to_debug;
pub use plugin::{Plugin, PluginDescription, Provides, Setup};
pub use serde;
pub use text::Text;
pub use transport::{
    counts_as_undelivered, queued, Capabilities, Inbound, IncidentCounters, Outbound, SendFailure,
    Settlement, SettlementOutcome, Transport, TransportInfo, TransportStats, UNDELIVERED_COUNTER,
};

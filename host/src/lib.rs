//! # comms-host: the host side of comms
//!
//! Loads transport and discovery plugins at run time (chosen by a config file), and gives
//! applications one async API, the [`Node`]:
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Greeting { text: String }
//!
//! let node = comms_host::Node::from_config("alice.toml").await?;
//! node.send("bob", &Greeting { text: "hello".into() }).await?;
//! let reply = node.receive::<Greeting>().await?;
//! println!("{} says {}", reply.from, reply.message.text);
//! node.close().await?;
//! # Ok(()) }
//! ```
//!
//! Beyond point-to-point messages the node offers publish/subscribe with topic patterns
//! ([`Node::publish`], [`Node::subscribe`], [`topics`]), request/response with timeouts, retries
//! and replicas ([`Node::serve`], [`Node::request`], [`request_response`]), and liveness:
//! heartbeats, peers declared down after a timeout, [`Node::peer_events`] ([`membership`]).
//!
//! Modules: [`config`] (the file format), [`builder`] and [`node`] (the API), [`codec`] (binary
//! or JSON), [`control`] (framework messages on the wire), [`plugin_search`] (where plugin files
//! are looked for), [`static_discovery`] (peers listed in config), [`fault_injection`] (a
//! seeded faulty network around any transport), [`conformance`] (the suite every transport must
//! pass), [`security`] (identities, `[security]`, envelope signatures), [`metrics`] (what a node
//! reports to Prometheus, `[metrics]`), [`admin`] (the status every node answers over comms),
//! [`trace_context`] (W3C `traceparent` carried by requests, spans around requests and handlers),
//! `telemetry` (with the cargo feature `otel`: those spans exported over OTLP),
//! [`reload`] (what a running node can change: transports, plugins, discovery), [`error`] (one error type per operation). The `comms` command is in `main.rs`.
//!
//! Inside, a node is three layers, each depending only on the next: the [`Node`] facade, the
//! driver (`driver/`: thin I/O loops that take messages from transports, follow discovery, keep
//! time and carry out sends) and the engine (`engine/`: every decision, with no I/O: the peer
//! table, local queues and their settlement, services, requests in flight; driven as
//! `handle(input, now) -> actions` and unit-tested with simulated time).
//!
//! The host never sees `abi_stable` types: loading and calling plugins goes through
//! [`comms_plugin_api::host_side`].

#![warn(missing_docs)]

mod acknowledgement;
pub mod admin;
pub mod builder;
pub mod codec;
pub mod config;
pub mod conformance;
pub mod control;
mod dedup;
mod driver;
mod engine;
pub mod error;
pub mod fault_injection;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod plugin_search;
mod received;
pub mod reload;
pub mod request_response;
pub mod security;
mod service;
mod spec;
pub mod static_discovery;
pub mod subscription;
#[cfg(feature = "otel")]
pub mod telemetry;
pub mod trace_context;

pub use builder::NodeBuilder;
pub use codec::Codec;
pub use comms_plugin_api::topics;
pub use comms_plugin_api::{
    host_side::PluginLibrary, Capabilities, Envelope, Headers, MessageId, NodeId, NodeRecord, Payload,
    PeerEvent, PeerEventKind,
};
pub use config::ConfigError;
pub use error::{
    BuildError, CloseError, FlushError, ReceiveError, ReloadError, RequestError, SendError, ServeError,
    WaitError,
};
pub use membership::{PeerInfo, PeerStatus};
pub use node::{Node, TransportSummary};
pub use received::Received;
pub use reload::ReloadReport;
pub use request_response::{Balancing, RequestOptions};
pub use security::{Security, SignatureMode};
pub use subscription::{HandlerSubscription, Subscription};

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
//! Modules: [`config`] (the file format), [`node`] (the API), [`codec`] (binary or JSON),
//! [`plugin_search`] (where plugin files are looked for), [`static_discovery`] (peers listed in
//! config), [`error`] (one error type per operation). The `comms` command is in `main.rs`.
//!
//! The host never sees `abi_stable` types: loading and calling plugins goes through
//! [`comms_plugin_api::host_side`].

#![warn(missing_docs)]

pub mod codec;
pub mod config;
pub mod conformance;
pub mod error;
pub mod fault_injection;
pub mod node;
pub mod plugin_search;
pub mod static_discovery;

pub use codec::Codec;
pub use comms_plugin_api::{host_side::PluginLibrary, Envelope, MessageId, NodeId, NodeRecord};
pub use config::ConfigError;
pub use error::{BuildError, CloseError, ReceiveError, SendError};
pub use node::{Node, NodeBuilder, Received, TransportSummary};

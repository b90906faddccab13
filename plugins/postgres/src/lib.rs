//! # comms-postgres: the PostgreSQL transport and discovery plugin
//!
//! Nodes that share a PostgreSQL database (and a schema in it) exchange messages through it
//! durably. Loaded by the comms host as `libcomms_postgres.so`; built on its own, outside the
//! comms workspace (`plugins/postgres/README.md`). The same table configures the transport and
//! the discovery:
//!
//! ```toml
//! [transports.postgres]
//! url = "postgres://app@db.internal/app"   # libpq-style string or URL (default: local socket, db postgres)
//! schema = "comms"               # the plugin's tables live here; created if missing (default comms)
//! lease_ms = 30000               # a received, unsettled message is delivered again after this
//! max_attempts = 10              # deliveries before a message goes to comms_dead_letter
//! requeue_delay_ms = 0           # a nacked message waits this long, doubled per delivery (0: at once)
//! requeue_delay_max_ms = 300000  # ... up to this
//! batch_size = 256               # rows per claim, messages per write
//! poll_ms = 5000                 # safety poll of an idle receiver (LISTEN/NOTIFY wakes it)
//! max_message_size = 8388608     # largest payload in bytes (default 8 MiB)
//! send_queue = 1024              # sends waiting for the writer before send waits
//! connect_timeout_ms = 5000      # one connection attempt
//! connect_attempts = 5           # attempts, with backoff, before an operation fails
//!
//! [discovery]
//! plugin = "postgres"
//! url = "postgres://app@db.internal/app"
//! heartbeat_ms = 1000            # registry row refreshed this often
//! peer_timeout_ms = 5000         # a node whose heartbeat is older is gone
//! ```
//!
//! Every key is described at [`PostgresConfig`]; an unknown key is an error naming it.
//!
//! A node's address on this transport is its node id: a message to a node is a row in
//! `<schema>.comms_mailbox` whose `recipient` is that id.
//!
//! ## Guarantees
//!
//! Capabilities: ordered, acknowledgements, durable, native topics, reliable.
//!
//! - **Delivery: at-least-once, durable.** `send` returns once the message is committed. A
//!   receiver claims rows with `FOR UPDATE SKIP LOCKED` and a lease (`owner`, `locked_until`);
//!   the row is deleted only when the host settles it `ACCEPTED`. A message received but not
//!   settled within `lease_ms` (the process died, or took longer) is delivered again, with the
//!   same message id. `REJECTED_REQUEUE` frees it at once; `REJECTED_DISCARD`, bytes that are not
//!   a wire envelope, a payload over `max_message_size`, or a message delivered `max_attempts`
//!   times move it to `comms_dead_letter` with a reason; the rows behind it keep flowing.
//! - **Ordering**: messages from one sender to one node are claimed in commit order. A
//!   redelivered message comes after newer ones; several instances consuming one node id share
//!   its mailbox without order between them.
//! - **Wake-ups**: a trigger notifies the node's channel (`LISTEN/NOTIFY`) when a row it can
//!   claim is committed, so an idle receiver sleeps until then (and polls every `poll_ms` only
//!   as a safety net, or when a lease it saw runs out).
//! - **Disconnect**: a lost connection is reopened with backoff (`connect_attempts`) and the
//!   operation that saw it runs once more; a send that was committed just before the loss may
//!   then be written twice (at-least-once). After the attempts, the operation fails with a
//!   retryable `UNREACHABLE` error; nothing acknowledged is lost (it is in the database).
//! - **Outbox**: `<schema>.comms_send(recipient, payload, headers, sender)` writes a message in
//!   the caller's own transaction: it is delivered if and only if that transaction commits.
//!
//! See `docs/postgres.md` for the tables, the SQL a foreign program uses, and limits.

#![warn(missing_docs)]

mod config;
mod discovery;
mod lease;
mod link;
mod mailbox;
mod schema;
mod transport;

pub use config::{PostgresConfig, DEFAULT_MAX_MESSAGE_SIZE, LARGEST_MAX_MESSAGE_SIZE};
pub use discovery::{PostgresDiscovery, PostgresRegistry};
pub use schema::SCHEMA_VERSION;
pub use transport::{PostgresTransport, CAPABILITIES};

use comms_plugin_api::{
    async_trait, export_plugin, Discovery, Plugin, PluginError, Provides, Setup, Transport,
};
use std::sync::Arc;

/// The plugin: provides the PostgreSQL transport and discovery.
#[derive(Debug)]
pub struct PostgresPlugin;

#[async_trait]
impl Plugin for PostgresPlugin {
    const NAME: &'static str = "postgres";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "PostgreSQL transport and discovery: a durable mailbox table, leases, LISTEN/NOTIFY, an outbox";
    const PROVIDES: Provides = Provides(Provides::TRANSPORT.0 | Provides::DISCOVERY.0);

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let config: PostgresConfig = setup.config()?;
        Ok(Arc::new(PostgresTransport::open(setup.node_id.clone(), config).await?))
    }

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        let config: PostgresConfig = setup.config()?;
        Ok(Arc::new(discovery::open(setup.node_id.clone(), config).await?))
    }
}

export_plugin!(PostgresPlugin);

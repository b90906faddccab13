//! # comms-sqlite: the SQLite transport and discovery plugin
//!
//! Processes that share one SQLite file (on one host, or on a shared local volume) exchange
//! messages through it durably, with no server at all. Loaded by the comms host as
//! `libcomms_sqlite.so`; SQLite is compiled in (rusqlite's `bundled`), so nothing needs to be
//! installed. The same table configures the transport and the discovery:
//!
//! ```toml
//! [transports.sqlite]
//! database = "/var/lib/app/comms.db"  # required: the shared file, created if missing
//! busy_timeout_ms = 5000          # wait this long for another writer's lock (default 5000)
//! lease_ms = 30000                # a received, unsettled message is redelivered after this (default 30000)
//! max_attempts = 10               # deliveries before a message goes to comms_dead_letter (default 10)
//! requeue_delay_ms = 0            # a nacked message waits this long, doubled per delivery (0: at once)
//! requeue_delay_max_ms = 300000   # ... up to this
//! batch_size = 256                # rows per claim, sends per commit (default 256)
//! poll_min_ms = 1                 # poll interval right after traffic (default 1)
//! poll_max_ms = 100               # poll interval when idle: the bound on added latency (default 100)
//! max_message_size = 8388608      # largest payload in bytes (default 8 MiB)
//! synchronous = "normal"          # or "full": fsync every commit (default normal)
//! send_queue = 1024               # sends waiting for the database thread (default 1024)
//! in_process_wakeup = true        # commits wake receivers in this process at once (default true)
//!
//! [discovery]
//! plugin = "sqlite"
//! database = "/var/lib/app/comms.db"
//! heartbeat_ms = 1000             # registry row refreshed this often (default 1000)
//! peer_timeout_ms = 5000          # a node whose heartbeat is older is gone (default 5000)
//! ```
//!
//! Every key is described at [`SqliteConfig`]; an unknown key is an error naming it.
//!
//! A node's address on this transport is its node id: the database file is the medium, and a
//! message to a node is a row in `comms_mailbox` whose `recipient` is that id. The plugin linked
//! into a program (as this crate's tests in `src/tests.rs` do) works the same as the loaded library:
//!
//! ```text
//! use comms_plugin_api::{host_side::PluginLibrary, Destination, Envelope, MessageId, NodeId};
//! use comms_sqlite::SqlitePlugin;
//! let config = format!("database = {:?}", dir.join("comms.db"));
//! let sqlite = PluginLibrary::linked::<SqlitePlugin>();
//! let alice = sqlite.new_transport(&NodeId::new("alice"), "sqlite", &config).await?;
//! let bob = sqlite.new_transport(&NodeId::new("bob"), "sqlite", &config).await?;
//! let envelope = Envelope {
//!     id: MessageId::from_u128(1),
//!     from: NodeId::new("alice"),
//!     to: Destination::Node(NodeId::new("bob")),
//!     correlation_id: None,
//!     headers: Vec::new(),
//!     payload: b"hello".as_slice().into(),
//! };
//! alice.send("bob", envelope).await?;
//! let received = bob.receive(10).await?;
//! assert_eq!(received[0].envelope.payload.as_slice(), b"hello");
//! bob.settle(vec![comms_plugin_api::Settlement {
//!     delivery_tag: received[0].delivery_tag,
//!     outcome: comms_plugin_api::SettlementOutcome::ACCEPTED,
//! }]).await?;
//! ```
//!
//! ## Guarantees
//!
//! Capabilities: [`Capabilities::ORDERED`], [`Capabilities::ACKNOWLEDGEMENTS`],
//! [`Capabilities::DURABLE`], [`Capabilities::NATIVE_TOPICS`], [`Capabilities::RELIABLE`].
//!
//! - **Delivery: at-least-once, durable.** `send` returns once the message is committed to the
//!   file. A receiver claims rows with a lease (`owner`, `locked_until`); the row is deleted only
//!   when the host settles it `ACCEPTED`, which the host does after routing it into its own queue.
//!   A message received but not settled (the process crashed, or took longer than `lease_ms`) is
//!   delivered again after the lease, with the same message id. `REJECTED_REQUEUE` makes it
//!   available again at once, or with `requeue_delay_ms` after the delay for its deliveries so
//!   far ([`comms_plugin_api::requeue_delay`]); `REJECTED_DISCARD`, a row that cannot be delivered (a column of
//!   an unexpected type, bytes that are not a wire envelope, a payload over this transport's
//!   `max_message_size`), or a message delivered `max_attempts` times without being accepted
//!   moves it to the `comms_dead_letter` table with a reason naming the cause; the rows behind it
//!   keep flowing.
//! - **Framework messages are bounded**: a `hello`, `heartbeat` or `goodbye` replaces an older
//!   unclaimed one of the same kind from the same sender in the same mailbox
//!   ([`comms_plugin_api::framework::replacement_key`]), so heartbeats to a node that never runs
//!   do not pile up. Application messages are never replaced.
//! - **Ordering**: messages from one sender to one node are claimed in commit order (row id). A
//!   redelivered message (requeued, or after a lease expired) comes after newer ones, and several
//!   instances consuming the same node id share its mailbox without any order between them.
//! - **Max message size**: `max_message_size` payload bytes (default 8 MiB, at most 512 MiB),
//!   refused by `send` and dead-lettered on receipt (another writer may have a larger limit).
//! - **Disconnect**: there is no connection to lose. A receiver that is down keeps its mailbox:
//!   messages wait in the file until a node with that id reads them. `close` releases the leases
//!   of received, unsettled messages so the next instance gets them at once.
//! - **Crash safety**: every write is one SQLite transaction in WAL mode: a process killed in the
//!   middle of a write leaves the file consistent (the transaction is rolled back). With
//!   `synchronous = "normal"` a commit survives any process crash; the last commits before an
//!   OS crash or power loss may be lost (never corrupting the file). `"full"` survives those too.
//! - **Locks**: every write transaction starts with `BEGIN IMMEDIATE` and waits up to
//!   `busy_timeout_ms` for another writer; only a lock held longer than that reaches the caller,
//!   as a retryable [`ErrorCode::TIMEOUT`] naming the file.
//!
//! ## Topics
//!
//! A row per subscriber at publish time: subscriptions are rows of `comms_subscription`
//! (node id, pattern); a publish writes one mailbox row for every node with a matching pattern,
//! in the same transaction. So a topic message has exactly the guarantees of a direct one, for
//! each subscriber that was subscribed when it was published. Subscriptions belong to the node id
//! and outlive restarts (messages published while a subscriber is down wait for it) until
//! `unsubscribe`.
//!
//! ## Polling
//!
//! A waiting `receive` polls its mailbox with an adaptive interval: `poll_min_ms` right after
//! traffic, doubling on each empty poll up to `poll_max_ms`. An idle poll costs one
//! `PRAGMA data_version` (has any other connection committed since?) and no query at all if not.
//! A send from the same process wakes the receiver at once, with no polling delay.
//!
//! ## Discovery
//!
//! [`SqliteDiscovery`]: `comms_registry` holds one row per announced node with its record (JSON)
//! and a heartbeat time stamp refreshed every `heartbeat_ms`; a node whose heartbeat is older
//! than `peer_timeout_ms` is gone (the discovery is `comms_plugin_api::registry`'s, over
//! [`SqliteRegistry`]'s statements).
//!
//! See `docs/sqlite.md` for the schema, costs and measured numbers.

#![warn(missing_docs)]

mod config;
mod discovery;
mod mailbox;
mod polling;
mod schema;
mod topic_pattern;
mod transport;
mod wake;
mod worker;

pub use config::{SqliteConfig, Synchronous, DEFAULT_MAX_MESSAGE_SIZE, LARGEST_MAX_MESSAGE_SIZE};
pub use discovery::{SqliteDiscovery, SqliteRegistry};
pub use schema::SCHEMA_VERSION;
pub use transport::{SqliteTransport, CAPABILITIES};

use comms_plugin_api::{
    async_trait, export_plugin, Discovery, Plugin, PluginError, Provides, Setup, Transport,
};
#[cfg(doc)]
use comms_plugin_api::{Capabilities, ErrorCode};
use std::sync::Arc;

/// The plugin: provides the SQLite transport and discovery.
#[derive(Debug)]
pub struct SqlitePlugin;

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, PluginError> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        PluginError::new(comms_plugin_api::ErrorCode::OTHER, format!("opening the database failed: {error}"))
    })?
}

#[async_trait]
impl Plugin for SqlitePlugin {
    const NAME: &'static str = "sqlite";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "SQLite transport and discovery: processes sharing one database file, durable, no server";
    const PROVIDES: Provides = Provides(Provides::TRANSPORT.0 | Provides::DISCOVERY.0);
    // Each transport's database work runs on a thread of its own (`comms-sqlite-db`), and
    // opening on the runtime's blocking threads; the workers only await them.
    const WORKER_THREADS: usize = 1;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let config: SqliteConfig = setup.config()?;
        let node = setup.node_id.clone();
        Ok(Arc::new(blocking(move || SqliteTransport::open(node, config)).await?))
    }

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        let config: SqliteConfig = setup.config()?;
        Ok(Arc::new(discovery::open(setup.node_id.clone(), config).await?))
    }
}

export_plugin!(SqlitePlugin);

#[cfg(test)]
mod tests;

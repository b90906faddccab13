//! # comms-nats: the NATS JetStream transport and discovery plugin
//!
//! Loaded by the comms host as `libcomms_nats.so`; built on its own, outside the comms
//! workspace (see `README.md`).
//!
//! ```toml
//! [transports.nats]
//! url = "nats://127.0.0.1:4222"    # or tls://host:4222; user:password@ in the URL works too
//! stream = "COMMS"                 # the deployment's JetStream stream, created if absent
//! prefix = "comms"                 # subjects comms.inbox.<node>, comms.dead-letter.<node>, comms.topic.<topic>
//! ack_wait_ms = 30000              # redeliver what a consumer took and never settled after this long
//! max_deliveries = 10              # deliveries without acceptance before a message is dead-lettered
//! durable_topics = false           # true: topic subscriptions kept by JetStream while a node is away
//! # creds_file = "/etc/comms/app.creds"  or  user + password  or  token
//! # ca_file = "/etc/comms/ca.pem"        # private CA of a TLS server
//! ```
//!
//! Every key is listed, with its default, in [`NatsTransportConfig`]; an unknown key is an
//! error naming it. `docs/nats.md` in the repository describes the subjects and headers for
//! programs in other languages.
//!
//! ## Point to point: a stream per deployment, a durable consumer per node
//!
//! The stream `stream` holds the subjects `<prefix>.inbox.>` and `<prefix>.dead-letter.>`,
//! with file storage and work-queue retention (a message is deleted once acknowledged). A
//! node's address is its inbox subject `<prefix>.inbox.<node>` ([`subject::token`] escapes the
//! node id), read through the durable pull consumer named after the node. `send` publishes
//! with the headers of [`format`](mod@format) and the payload as the body.
//!
//! - **Delivery: at-least-once.** A message is acknowledged only when the host settles it
//!   `ACCEPTED`, i.e. after it is in the host's queue. `REJECTED_REQUEUE` is a negative
//!   acknowledgement: delivered again at once. A message taken and never settled (the node
//!   crashed, the acknowledgement was lost) is delivered again by the server after
//!   `ack_wait_ms`. A transport that closes hands its unsettled messages back (negative
//!   acknowledgements), so the next instance of the node gets them without waiting for
//!   `ack_wait_ms` (at most `fetch_expires_ms` later: see `Shared::hand_back`). A redelivered
//!   message keeps its message id.
//! - **Dead letters** (`<prefix>.dead-letter.<node>`, in the same stream): a message that is
//!   not a comms message, one whose payload is above `max_message_size`, one the host settles
//!   `REJECTED_DISCARD`, and one delivered more than `max_deliveries` times without being
//!   accepted, with the original headers, the payload and `Comms-Dead-Letter-Reason`; the
//!   original is then terminated and never delivered again.
//! - **Sends** return once the stream stored the message (JetStream's publish
//!   acknowledgement). A publish the server does not confirm (a restart, a lost connection) is
//!   retried for up to 30 s; a retried publish may be stored twice (the receiver gets the
//!   message twice, same id). `send_batch` publishes the whole batch before it waits.
//! - **Durability**: as durable as the stream (file storage; replicas as the server's
//!   defaults). A receiver that is closed keeps its consumer; messages sent meanwhile wait for it.
//!   A message to a node that never received is kept in the stream until that node reads it.
//! - **Ordering**: per sender and receiver, in send order, except for a message delivered
//!   again.
//! - **Max message size**: the server's `max_payload` (1 MiB by default) less 64 KiB for the
//!   headers, or `max_message_size` if lower; enforced on `send` and again on receipt.
//! - **Disconnect**: the client reconnects for ever with its own backoff; pulls start again
//!   and unconfirmed publishes are retried.
//!
//! ## Topics: core NATS, at-most-once
//!
//! `publish` is a core NATS publish on `<prefix>.topic.<topic>`, with the same headers;
//! `subscribe` subscribes to `<prefix>.topic.<pattern>`: comms' `*` and `>` are NATS' own.
//! Nothing is stored: a subscriber that is disconnected, or too slow (the client drops
//! messages for a full subscription), misses what is published meanwhile.
//!
//! ## Durable topics (`durable_topics = true`): JetStream, at-least-once
//!
//! Publications go through the stream `<stream>-topics` (interest retention: kept until every
//! subscription that existed when it was published acknowledged it) and `publish` returns once
//! it stored them. Each `subscribe(pattern)` creates or binds the durable pull consumer
//! [`subject::topic_consumer`]`(node, pattern)`, read and settled like the inbox (acknowledged
//! when the host accepts, delivered again after `ack_wait_ms` or a requeue, dead-lettered after
//! `max_deliveries`). `close` and a crash keep the consumer: the node that subscribes again
//! with the same id gets what was published meanwhile. `unsubscribe` deletes it. Bounded by
//! `topic_max_age_ms`, `topic_max_bytes` and `topic_inactive_threshold_ms`
//! ([`NatsTransportConfig`]). Nodes with and without the option share the same subjects.
//!
//! ## Discovery
//!
//! See [`discovery`]: records in a JetStream key-value bucket, rewritten by heartbeats and
//! watched for changes; a record not rewritten for `ttl_ms` is a leave.
//!
//! ```toml
//! [discovery]
//! plugin = "nats"
//! url = "nats://127.0.0.1:4222"
//! bucket = "comms_nodes"
//! ttl_ms = 10000
//! ```
//!
//! ## Errors and credentials
//!
//! NATS unreachable at start: the constructor retries `connect_attempts` times with doubling
//! delays ([`comms_plugin_api::backoff`]), then fails with `UNREACHABLE` naming the URL.
//! Refused credentials and TLS failures are not retried. Passwords and tokens never appear in
//! errors or logs ([`comms_plugin_api::redact`]).

#![warn(missing_docs)]

pub mod config;
mod connect;
pub mod discovery;
mod durable_topics;
pub mod format;
pub mod subject;
mod transport;

pub use config::{NatsDiscoveryConfig, NatsTransportConfig};
pub use discovery::NatsDiscovery;
pub use transport::NatsTransport;

use comms_plugin_api::{
    async_trait, export_plugin, Discovery, Plugin, PluginError, Provides, Setup, Transport,
};
use std::sync::Arc;

/// The plugin: a transport and a discovery.
#[derive(Debug)]
pub struct NatsPlugin;

#[async_trait]
impl Plugin for NatsPlugin {
    const NAME: &'static str = "nats";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "NATS JetStream: a stream per deployment with a durable consumer per node (at-least-once), core NATS topics, node records in a key-value bucket";
    const PROVIDES: Provides = Provides(Provides::TRANSPORT.0 | Provides::DISCOVERY.0);
    // async-nats drives each connection from one task (its connection handler), and the
    // transport's own tasks only wait on it: one worker moves as much as two (`cargo bench -p
    // comms-tests --bench nats` with `COMMS_BENCH_PLUGIN_THREADS`, docs/benchmarks.md).
    const WORKER_THREADS: usize = 1;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        Ok(Arc::new(NatsTransport::connect(setup.node_id.clone(), setup.config()?).await?))
    }

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        Ok(Arc::new(NatsDiscovery::connect(setup.node_id.clone(), setup.config()?).await?))
    }
}

export_plugin!(NatsPlugin);

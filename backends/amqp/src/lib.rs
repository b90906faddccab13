//! # comms-amqp: the AMQP (RabbitMQ) transport and discovery plugin
//!
//! Loaded by the comms host as `libcomms_amqp.so`; built on [lapin](https://docs.rs/lapin),
//! running on the plugin's own tokio runtime. Configure it in the node's config file:
//!
//! ```toml
//! [transports.amqp]
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"  # amqps:// for TLS; the password is never logged
//! queue_prefix = "comms.inbox."   # inbox queue = prefix + node id; also the node's address
//! topic_exchange = "comms.topics" # topic exchange for publish/subscribe
//! prefetch = 256                  # unacknowledged messages pushed ahead per queue (basic.qos)
//! max_message_size = 16777216     # largest payload sent and received, bytes
//! # inbox_expires_ms = 86400000   # x-expires: delete an inbox unused this long (default: keep)
//! inbox_queue_type = "classic"    # or "quorum" (replicated; the broker counts deliveries)
//! max_attempts = 10               # delivered this often, never accepted -> dead letter
//! requeue_delay_ms = 0            # a nacked message is held this long, then requeued (0: at once)
//! requeue_delay_max_ms = 300000   # doubled per delivery up to this (at most 900000)
//! dead_letter_exchange = "comms.dead-letter"  # refused messages go here, with the reason
//! dead_letter_queue = "comms.dead-letter"     # and are kept in this queue
//! discovery_exchange = "comms.discovery"      # declared at start, for foreign announcements
//! connect_attempts = 5            # at start, before "unreachable"
//! reconnect_initial_delay_ms = 100
//! reconnect_max_delay_ms = 5000
//! send_timeout_ms = 30000         # a send waits this long for a reconnect and the confirm
//!
//! [discovery]
//! plugin = "amqp"
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//! exchange = "comms.discovery"    # fanout exchange
//! heartbeat_interval_ms = 1000
//! # expiry_ms = 3000              # default 3 heartbeats
//! ```
//!
//! Every key is optional ([`AmqpConfig`], [`AmqpDiscoveryConfig`]); an unknown key is an error
//! naming it.
//!
//! ## How messages travel
//!
//! - **Point to point**: each node has a durable queue `comms.inbox.<node id>` (its address).
//!   `send` publishes through the default exchange with routing key = that queue, `mandatory`
//!   (a missing queue is an [`ErrorCode::UNREACHABLE`] error, not a silent drop) and persistent
//!   delivery mode, on a channel in confirm mode: `send` completes once the broker has
//!   confirmed the message, which for a durable queue means it is on disk.
//! - **Topics**: `send("", envelope)` with a topic destination publishes to the topic exchange
//!   with routing key = the topic. Each transport instance has one exclusive, auto-delete queue
//!   bound once per subscribed pattern (`*` stays `*`, `>` becomes `*.#`), so a message
//!   matching several patterns arrives once.
//! - **Receiving**: one consumer per queue, each on its own channel, manual acknowledgements,
//!   prefetch `prefetch`; deliveries wait in a bounded buffer (2 x `prefetch`) for `receive`.
//!   The host's settlement is the acknowledgement: ACCEPTED → `basic.ack` (a contiguous run
//!   as one `multiple` ack), REJECTED_REQUEUE → `basic.nack(requeue)`, REJECTED_DISCARD →
//!   `basic.reject` (the broker dead-letters it to `dead_letter_exchange`). With
//!   `requeue_delay_ms`, a requeued message is held unacknowledged for its delay first (it takes
//!   a `prefetch` slot meanwhile; a lost connection or a close hands it back at once).
//! - **Dead letters**: a message that is not a comms message, or above `max_message_size`, is
//!   never delivered: a copy with the reason in header `comms-dead-letter-reason` goes to
//!   `dead_letter_exchange` and the queue `dead_letter_queue` keeps it ([`dead_letter`]). So
//!   is a message delivered `max_attempts` times and never accepted: a quorum inbox
//!   (`inbox_queue_type = "quorum"`) counts deliveries in the broker; for a classic one the
//!   transport counts the redeliveries it gets ([`redeliveries`], with what that misses).
//! - The broker-side format (properties and headers) is in [`format`](mod@format) and `docs/amqp.md`.
//!
//! ## Guarantees and limits
//!
//! - **Delivery, point to point: at-least-once** ([`Capabilities::RELIABLE`],
//!   [`Capabilities::ACKNOWLEDGEMENTS`], [`Capabilities::DURABLE`]). A confirmed message is in
//!   a durable queue as a persistent message; it is removed only when the host has accepted
//!   it. A message delivered but not acknowledged when a node crashes, closes or loses its
//!   connection is delivered again (same message id, `redelivered` set by the broker).
//! - **Topics: at-least-once while the subscriber is connected, nothing kept while it is
//!   not.** The topic queue lives as long as the connection; messages published while a
//!   subscriber is disconnected (or before it subscribed) are not delivered to it.
//! - **Ordering** ([`Capabilities::ORDERED`]): messages one sender sends one after the other
//!   arrive in that order (one publishing channel per instance, one consumer per queue). A
//!   message requeued by REJECTED_REQUEUE or by a lost connection comes again after later ones.
//! - **Max message size**: `max_message_size` payload bytes (default 16 MiB), on `send` and
//!   on receipt (a larger message is dead-lettered); keep it at or below the broker's
//!   `max_message_size` (RabbitMQ 4: 16 MiB, 3.x: 128 MiB).
//! - **Disconnect**: unreachable at start → `connect_attempts` tries with backoff, then an
//!   [`ErrorCode::UNREACHABLE`] error naming the URL (password redacted). Lost mid-run →
//!   reconnect with backoff for as long as the transport is open, re-declare, re-subscribe,
//!   resume consuming; `send`s wait (up to `send_timeout_ms`) and publish again on the new
//!   connection if the old one died before the confirm (a possible duplicate, same message id).
//!   Settlements for deliveries of the lost connection are ignored: the broker redelivers them.
//! - **Discovery**: announcements (JSON) on a fanout exchange; see [`discovery`].
//!
//! ## TLS
//!
//! An `amqps://` URL connects with TLS (rustls) and verifies the broker's certificate against
//! the system's roots, the bundled Mozilla roots and the CA(s) in `ca_file` (a private CA);
//! `client_cert_file` and `client_key_file` present a client certificate. The transport then
//! declares `Capabilities::ENCRYPTED`. A certificate that does not verify fails at once, without
//! the retries. TLS protects the link to the broker; anyone with broker credentials can still
//! publish messages: `docs/security-brokers.md` in the repository says what else to turn on.
//!
//! ## Errors
//!
//! | case | code |
//! |---|---|
//! | broker unreachable after `connect_attempts` | [`ErrorCode::UNREACHABLE`], retryable |
//! | broker's certificate not verified (`amqps://`), or ours refused | [`ErrorCode::UNREACHABLE`], not retryable, at the first attempt |
//! | `ca_file` / `client_cert_file` / `client_key_file` unreadable | [`ErrorCode::INVALID_CONFIG`] naming the key and path |
//! | no inbox queue at the address (node never started) | [`ErrorCode::UNREACHABLE`], retryable; logged once per address |
//! | payload above `max_message_size` | [`ErrorCode::TOO_LARGE`] |
//! | no connection within `send_timeout_ms` | [`ErrorCode::UNREACHABLE`] / [`ErrorCode::TIMEOUT`], retryable |
//! | `max_attempts = 0` | [`ErrorCode::INVALID_CONFIG`] naming the key |
//! | inbox exists with other `x-expires` / queue type / dead-letter arguments, or a dead-letter exchange / queue declared otherwise | [`ErrorCode::INVALID_CONFIG`] |
//! | operations after `close` | [`ErrorCode::CLOSED`] |

#![warn(missing_docs)]

pub mod acks;
mod config;
pub mod connection;
pub mod dead_letter;
pub mod discovery;
pub mod format;
pub mod redeliveries;
mod tls;
pub mod topics;
mod transport;
mod unroutable;

pub use comms_plugin_api::tls::TlsFiles;
pub use config::{
    AmqpConfig, AmqpDiscoveryConfig, QueueType, DEFAULT_DEAD_LETTER, DEFAULT_DISCOVERY_EXCHANGE,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_URL, LARGEST_REQUEUE_DELAY_MS,
};
pub use discovery::AmqpDiscovery;
pub use transport::AmqpTransport;

use comms_plugin_api::{
    async_trait, export_plugin, Discovery, Plugin, PluginError, Provides, Setup, Transport,
};
#[cfg(doc)]
use comms_plugin_api::{Capabilities, ErrorCode};
use std::sync::Arc;

/// The plugin: provides a transport and a discovery.
#[derive(Debug)]
pub struct AmqpPlugin;

#[async_trait]
impl Plugin for AmqpPlugin {
    const NAME: &'static str = "amqp";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "AMQP (RabbitMQ) transport and discovery: a durable queue per node, topic exchange, confirms, acks";
    const PROVIDES: Provides = Provides(Provides::TRANSPORT.0 | Provides::DISCOVERY.0);

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        Ok(Arc::new(AmqpTransport::connect(setup.node_id.clone(), setup.config()?).await?))
    }

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        Ok(Arc::new(AmqpDiscovery::connect(setup.node_id.clone(), setup.config()?).await?))
    }
}

export_plugin!(AmqpPlugin);

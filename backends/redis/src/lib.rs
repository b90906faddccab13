//! # comms-redis: the Redis transport and discovery plugin
//!
//! Loaded by the comms host as `libcomms_redis.so`; provides a transport and a discovery.
//!
//! ```toml
//! [transports.redis]
//! url = "redis://127.0.0.1:6379"   # or rediss://user:password@host:6380/0 (TLS)
//! prefix = "comms"                 # keys: comms:inbox:<node id>, channels: comms:topic:<topic>
//! confirm_sends = true             # send returns once Redis stored the message
//! claim_idle_ms = 5000             # redeliver what a crashed consumer took after this long
//! max_attempts = 10                # deliveries of one entry before it goes to the dead letters
//! requeue_delay_ms = 0             # a nacked message comes again after this, doubled per delivery (0: at once)
//! requeue_delay_max_ms = 300000    # ... up to this
//!
//! [discovery]
//! plugin = "redis"
//! url = "redis://127.0.0.1:6379"
//! ttl_ms = 10000                   # a crashed node leaves at most this long after its last heartbeat
//! ```
//!
//! Every key is listed, with its default, in [`RedisTransportConfig`] and
//! [`RedisDiscoveryConfig`]; an unknown key is an error naming it. `docs/redis.md` in the
//! repository describes the broker-side format for programs in other languages.
//!
//! ## Point to point: an inbox stream per node
//!
//! A node's address is its inbox, the stream `<prefix>:inbox:<node id>`, read through the
//! consumer group `group` (default `comms`) by a consumer named after the node plus a random
//! suffix. `send` is an `XADD ... NOMKSTREAM MAXLEN ~ max_inbox_len` of the fields described in
//! [`stream_entry`]; queued sends are written in pipelines. The reader takes up to `read_batch`
//! entries per `XREADGROUP ... BLOCK`, at most `max_unsettled` unsettled at a time.
//!
//! - **Delivery: at-least-once.** An entry is acknowledged (`XACK`, then `XDEL`) only when the
//!   host settles it `ACCEPTED`, i.e. after it is in the host's queue. `REJECTED_REQUEUE`
//!   delivers it again (`XCLAIM`) at once, or with `requeue_delay_ms` after its delay (doubled
//!   at each delivery, by Redis' count of the pending entry:
//!   [`comms_plugin_api::requeue_delay`]); entries a consumer took and never settled (it
//!   crashed, or the acknowledgement was lost) are claimed by a consumer of the same inbox
//!   after `claim_idle_ms` (`XAUTOCLAIM`, every idle entry in one pass); a consumer that
//!   closes hands its unsettled entries back so that the next one takes them at once. A
//!   redelivered message keeps its message id. Consumers idle past `consumer_idle_ms` with
//!   nothing pending (crashed instances) are removed from the group.
//! - **Dead letters**: an entry that is not a comms message, one whose payload is above
//!   `max_message_size`, and one the host settles `REJECTED_DISCARD` go to
//!   `<inbox>:dead-letter` with the reason ([`dead_letter`]); none is delivered again.
//! - **Sends**: with `confirm_sends = true` (default) `send` returns once Redis answered the
//!   `XADD`; with `false` once queued (faster; a process crash loses what was queued). Either
//!   way a write that fails because the connection dropped is retried until Redis takes it or
//!   the transport closes; a retried pipeline may store a message twice (same id).
//! - **Durability**: as durable as the Redis server: with `appendonly yes` and
//!   `appendfsync always` an acknowledged `XADD` survives a Redis restart; with the default
//!   snapshotting, a crash of Redis loses the last seconds. A receiver that is closed keeps
//!   its inbox; messages sent meanwhile wait for it.
//! - **Ordering**: per sender and receiver, in send order, except for a message delivered again.
//! - **Max message size**: `max_message_size` (default 16 MiB) of payload, enforced on `send`
//!   and again on receipt (a larger entry written by another program goes to the dead-letter
//!   stream).
//! - **Limits**: an inbox is capped near `max_inbox_len` entries (default 1,000,000; 0 for no
//!   cap): past it Redis drops the oldest entries, delivered or not. A send to an inbox that
//!   does not exist (no node ever read it) fails with `UNREACHABLE`.
//! - **Disconnect**: commands are retried on a reconnecting connection; a receiver resumes
//!   where the consumer group says it was.
//! - **Cost** (benchmark `redis`, 2-core machine, Redis on loopback): one sequential sender
//!   reaches about 7,500 msg/s with `confirm_sends = true` (a Redis round trip per message,
//!   0.9-0.96x a raw redis-rs program) and about 88,000-98,000 msg/s with `false` (pipelined,
//!   0.78-0.89x raw); a ping-pong round trip takes about 0.3 ms at p50.
//!
//! ## Topics: Redis pub/sub, at-most-once
//!
//! `publish` is a `PUBLISH` on `<prefix>:topic:<topic>` of the envelope in the
//! [`comms_plugin_api::wire`] encoding; `subscribe` is a `PSUBSCRIBE` on a glob derived from the
//! pattern ([`topic_pattern`]), checked again with the exact comms semantics. Redis pub/sub keeps
//! nothing: a subscriber that is disconnected (or too slow, past Redis' output buffer limit)
//! misses what is published meanwhile. Topic messages need no settlement.
//!
//! ## Discovery
//!
//! See [`discovery`]: records with a TTL refreshed by heartbeats, notifications on
//! `<prefix>:nodes`, a scan every `scan_interval_ms` that notices expiries.
//!
//! ## TLS
//!
//! A `rediss://` URL connects with TLS (rustls) and checks the server's certificate against
//! the system's roots, or against the CA(s) in `ca_file` (a private CA); `client_cert_file` and
//! `client_key_file` present a client certificate. The transport then declares
//! `Capabilities::ENCRYPTED`. A certificate that does not verify (unknown CA, host name not in
//! the certificate, expired) fails at once, without the retries, with an error that says TLS
//! verification failed. TLS protects the link to Redis; anyone with Redis credentials can still
//! write messages: `docs/security-brokers.md` in the repository says what else to turn on.
//!
//! ## Errors
//!
//! Redis unreachable at start: the constructor retries `connect_attempts` times with doubling
//! delays, then fails with `UNREACHABLE` naming the URL. Passwords never appear in errors or
//! logs (URLs go through [`comms_plugin_api::redact::redact_url`], Redis error texts are
//! scrubbed of the password).

#![warn(missing_docs)]

pub mod config;
mod connect;
mod connection;
pub mod dead_letter;
pub mod discovery;
mod requeued;
pub mod stream_entry;
mod tls;
pub mod topic_pattern;
mod topics;
mod transport;

pub use comms_plugin_api::tls::TlsFiles;
pub use config::{RedisDiscoveryConfig, RedisTransportConfig};
pub use discovery::RedisDiscovery;
pub use transport::{inbox_key, RedisTransport};

use comms_plugin_api::{
    async_trait, export_plugin, Discovery, Plugin, PluginError, Provides, Setup, Transport,
};
use std::sync::Arc;

/// The plugin: a transport and a discovery.
#[derive(Debug)]
pub struct RedisPlugin;

#[async_trait]
impl Plugin for RedisPlugin {
    const NAME: &'static str = "redis";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Redis: inbox streams with consumer groups (at-least-once), pub/sub topics, node records with TTL";
    const PROVIDES: Provides = Provides(Provides::TRANSPORT.0 | Provides::DISCOVERY.0);

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        Ok(Arc::new(RedisTransport::connect(setup.node_id.clone(), setup.config()?).await?))
    }

    async fn new_discovery(setup: Setup) -> Result<Arc<dyn Discovery>, PluginError> {
        Ok(Arc::new(RedisDiscovery::connect(setup.node_id.clone(), setup.config()?).await?))
    }
}

export_plugin!(RedisPlugin);

#[cfg(test)]
mod tests;

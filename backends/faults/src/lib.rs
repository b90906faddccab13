//! # comms-faults: the fault-injection layer
//!
//! A layer (plugin contract 1.2) that drops, delays, duplicates and reorders what any transport
//! sends, so that an application can be tested against an unreliable network with any backend.
//! Built into the comms host (which links this crate), and shipped as `libcomms_faults.so` by
//! `backends/faults/plugin` for other hosts (this crate exports no plugin symbol of its own, so
//! that a program can link it beside another plugin crate). Stacked on a transport in the
//! node's config, with its own keys in its table:
//!
//! ```toml
//! [transports.tcp]
//! listen = "127.0.0.1:7001"
//! layers = [{ plugin = "faults", drop = 0.1, delay_ms = 20, jitter_ms = 10, duplicate = 0.01, reorder = 0.05, seed = 7 }]
//! ```
//!
//! The host's own shorthands for it, the `faults = { drop = 0.1, seed = 7 }` key of a transport
//! table and `NodeBuilder::faults(FaultConfig { .. })`, configure this same layer (linked into
//! the host).
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `drop` | 0 | probability (0 to 1) that a message is silently dropped |
//! | `delay_ms` | 0 | fixed delay added to every message, in milliseconds |
//! | `jitter_ms` | 0 | upper bound of a uniform extra delay `0..=jitter_ms`, in milliseconds |
//! | `duplicate` | 0 | probability (0 to 1) that a message is sent twice |
//! | `reorder` | 0 | probability (0 to 1) that a message is held and sent after the next one |
//! | `seed` | 0 | seed of the decisions: the same seed replays the same decisions |
//!
//! Every key is optional and defaults to no fault ([`FaultConfig`]); an unknown key, or a
//! probability outside 0 to 1, is an error naming the key. Below the node level, the layer is
//! made through the host-side API (as this crate's tests do, in `src/tests.rs`):
//!
//! ```text
//! let memory = PluginLibrary::linked::<MemoryPlugin>();
//! let inner = memory.new_transport(&node_id, "memory", "").await?;
//! let faults = PluginLibrary::linked::<FaultsPlugin>();
//! let layer = faults.new_layer(&node_id, "memory.faults", "drop = 0.1\nseed = 7", inner).await?;
//! layer.send(address, envelope).await?;   // dropped one time in ten
//! ```
//!
//! ## What happens to each message
//!
//! Only what is sent: received messages pass through untouched (put the layer on the sending
//! side). `send` makes one decision per message, then:
//!
//! 1. **drop** (probability `drop`): nothing is sent and `send` returns `Ok(())`: the loss is
//!    silent, as on a real network.
//! 2. **duplicate** (probability `duplicate`): the message is sent twice, with the same id.
//! 3. **reorder** (probability `reorder`): the message is held and sent right after the next
//!    message to the same address, or after [`REORDER_HOLD`] if none comes first. At most one
//!    message is held per address; a message that would be held while another one is, is sent
//!    at once (followed by the held one). A held message is not also delayed.
//! 4. **delay** (`delay_ms` plus a uniform `0..=jitter_ms`): the message is sent that much later
//!    from a spawned task, and `send` returns once it is scheduled. Jitter lets delayed messages
//!    overtake each other, as on a real network.
//!
//! `send_batch` applies the same to each item in turn: the layer works message by message, so
//! it never declares `Capabilities::BATCHED_SEND`, even when the transport below does (the host
//! then sends one by one).
//!
//! ## What the host sees
//!
//! - **Capabilities**: those of the transport below, without `BATCHED_SEND`; without `ORDERED`
//!   when messages may be held or delayed (`reorder`, `delay_ms` or `jitter_ms` above 0: delayed
//!   messages are sent from concurrent tasks); without `RELIABLE` when `drop` is above 0. The
//!   local address and the size limit are the transport's.
//! - **Statistics**: the transport's, with the messages held or delayed here (not yet handed to
//!   the transport) added to `send_queue_depth`, so that the host's flush waits for them, and
//!   the counters [`DROPPED_COUNTER`], [`DUPLICATED_COUNTER`], [`REORDERED_COUNTER`] and
//!   [`DELAYED_COUNTER`] (totals since the layer was made).
//! - **Close**: the layer stops taking messages (`send` then fails as closed), sends every held
//!   message, waits until every delayed one has been sent (or has failed), then closes the
//!   transport below. The wait is bounded by the longest delay (`delay_ms + jitter_ms`) plus 5
//!   seconds: a send stuck behind a full queue then fails as the transport closes.
//!
//! ## Guarantees and limits
//!
//! - **Replay**: decisions come from an RNG seeded with `seed`, drawing the same number of
//!   values for every message whatever the config. The same seed and the same sequence of sends
//!   give the same decisions (with the same version of `rand`), so a failure seen in a test can
//!   be replayed. The order in which messages reach the transport also depends on timing when
//!   messages are delayed, or when a held message waits [`REORDER_HOLD`] for its next one.
//! - **Errors**: a message sent at once returns the transport's error (the second copy of a
//!   duplicate only counts in `errors` and logs its error). A message sent later (held or
//!   delayed) already returned `Ok(())`: its failure counts in the statistics' `errors`, and in
//!   the `undelivered` counter when it is an application message to a node (as for any transport
//!   that loses a message after taking it), and is logged at debug level. Dropped messages are
//!   not undelivered: they are the point.
//! - **Memory is bounded**: at most [`MAX_DELAYED_IN_FLIGHT`] delayed messages per layer (beyond
//!   that `send` waits, like a full link), and at most one held message per address, each for at
//!   most [`REORDER_HOLD`].
//! - Held messages are keyed by address only: a layer per transport, as the config makes them.
//! - Two faults layers on one transport report their `faults.*` counters under the same names.

#![warn(missing_docs)]

mod config;
mod decision;
mod layer;

pub use config::FaultConfig;

use comms_plugin_api::{async_trait, Plugin, PluginError, Provides, Setup, Transport};
use std::{sync::Arc, time::Duration};

/// How long a reordered message waits for the next message to the same address.
pub const REORDER_HOLD: Duration = Duration::from_millis(50);

/// Delayed messages one layer keeps at most; `send` waits while this many are pending.
pub const MAX_DELAYED_IN_FLIGHT: usize = 1024;

/// Counter (in the transport statistics) of messages dropped.
pub const DROPPED_COUNTER: &str = "faults.dropped";
/// Counter of messages sent twice.
pub const DUPLICATED_COUNTER: &str = "faults.duplicated";
/// Counter of messages held and sent after a later one (or after [`REORDER_HOLD`]).
pub const REORDERED_COUNTER: &str = "faults.reordered";
/// Counter of messages sent later than asked (`delay_ms` plus jitter greater than zero).
pub const DELAYED_COUNTER: &str = "faults.delayed";

/// The plugin: provides the fault-injection layer (see the crate documentation).
#[derive(Debug)]
pub struct FaultsPlugin;

#[async_trait]
impl Plugin for FaultsPlugin {
    const NAME: &'static str = "faults";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "fault-injection layer: drops, delays, duplicates and reorders what a transport sends";
    const PROVIDES: Provides = Provides::LAYER;
    /// The layer does no I/O of its own: its timers and delayed sends need one thread.
    const WORKER_THREADS: usize = 1;

    async fn new_layer(setup: Setup, inner: Arc<dyn Transport>) -> Result<Arc<dyn Transport>, PluginError> {
        let config: FaultConfig = setup.config()?;
        config.validate().map_err(PluginError::invalid_config)?;
        Ok(Arc::new(layer::FaultLayer::new(config, inner)))
    }
}

#[cfg(test)]
mod tests;

//! The plugin's config table (`[transports.sqlite]`, or `[discovery]` with `plugin = "sqlite"`).

use comms_plugin_api::{
    requeue_delay::{self, RequeueDelay},
    PluginError,
};
use serde::Deserialize;
use std::{path::PathBuf, time::Duration};

/// How hard SQLite pushes each commit to the disk (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// `NORMAL` in WAL mode: a commit survives a crash of any process, but the last commits
    /// before a power failure or OS crash may be lost (the database stays consistent).
    #[default]
    Normal,
    /// `FULL`: every commit is fsync'ed before `send` returns; survives power failure too, at
    /// the cost of one fsync per commit (commits are grouped, see the crate docs).
    Full,
}

/// The config table of the SQLite transport and discovery. Only `path` is required; unknown keys
/// are errors that name the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// The shared database file; created (with its schema) if missing. Every node that shares it
    /// can reach every other. (Not `path`: the host reserves that key of a plugin table for the
    /// plugin library's own file.)
    pub database: PathBuf,
    /// How long an operation waits for another process's write lock before failing with a
    /// retryable [`comms_plugin_api::ErrorCode::TIMEOUT`].
    pub busy_timeout_ms: u64,
    /// How long a received message stays leased to this instance before another consumer of the
    /// same node id (or this one, after a restart) gets it again.
    pub lease_ms: u64,
    /// Deliveries of one message before it is moved to the dead-letter table instead.
    pub max_attempts: u32,
    /// How long a message the application gave back (`nack`) waits before it can be claimed
    /// again, after its first delivery; doubled at each later delivery, up to
    /// `requeue_delay_max_ms` ([`comms_plugin_api::requeue_delay`]). 0: at once.
    pub requeue_delay_ms: u64,
    /// Upper bound of that delay (at most one day).
    pub requeue_delay_max_ms: u64,
    /// Largest number of messages claimed in one query, and of sends committed in one
    /// transaction.
    pub batch_size: usize,
    /// Shortest interval between two polls of an idle mailbox (the interval right after traffic).
    pub poll_min_ms: u64,
    /// Longest interval between two polls: the bound on latency added to a message from another
    /// process when the mailbox has been idle.
    pub poll_max_ms: u64,
    /// Largest payload in bytes `send` accepts, and `receive` delivers: a larger one found in
    /// the mailbox (written by a node with a larger limit, or by another program) goes to the
    /// dead-letter table.
    pub max_message_size: u64,
    /// `normal` (default) or `full`; see [`Synchronous`].
    pub synchronous: Synchronous,
    /// Sends waiting for the database writer before `send` waits (backpressure).
    pub send_queue: usize,
    /// Whether a commit wakes the receivers of the same file in this process at once (default
    /// `true`). `false` leaves them to polling, as receivers in other processes are (for
    /// measuring that latency); a node's sends to itself still wake it.
    pub in_process_wakeup: bool,
    /// Discovery: how often this node's registry row is refreshed.
    pub heartbeat_ms: u64,
    /// Discovery: a node whose heartbeat is older than this is gone.
    pub peer_timeout_ms: u64,
}

/// Default of [`SqliteConfig::max_message_size`]: 8 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 8 << 20;

/// Sizes above this are refused in the config: SQLite's own limit on a value is 1,000,000,000
/// bytes, and the encoded envelope needs room for its header.
pub const LARGEST_MAX_MESSAGE_SIZE: u64 = 512 << 20;

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            database: PathBuf::new(),
            busy_timeout_ms: 5_000,
            lease_ms: 30_000,
            max_attempts: 10,
            requeue_delay_ms: 0,
            requeue_delay_max_ms: requeue_delay::DEFAULT_MAX_MS,
            batch_size: 256,
            poll_min_ms: 1,
            poll_max_ms: 100,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            synchronous: Synchronous::Normal,
            send_queue: 1024,
            in_process_wakeup: true,
            heartbeat_ms: 1_000,
            peer_timeout_ms: 5_000,
        }
    }
}

impl SqliteConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), PluginError> {
        let bad = |key: &str, why: &str| Err(PluginError::invalid_config(format!("key `{key}`: {why}")));
        if self.database.as_os_str().is_empty() {
            return bad("database", "required: the database file shared by the nodes");
        }
        for (key, value) in [
            ("busy_timeout_ms", self.busy_timeout_ms),
            ("lease_ms", self.lease_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("batch_size", self.batch_size as u64),
            ("poll_min_ms", self.poll_min_ms),
            ("max_message_size", self.max_message_size),
            ("send_queue", self.send_queue as u64),
            ("heartbeat_ms", self.heartbeat_ms),
        ] {
            if value == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.poll_max_ms < self.poll_min_ms {
            return bad("poll_max_ms", "must be at least poll_min_ms");
        }
        if self.max_message_size > LARGEST_MAX_MESSAGE_SIZE {
            return bad("max_message_size", &format!("must be at most {LARGEST_MAX_MESSAGE_SIZE} bytes"));
        }
        if self.peer_timeout_ms <= self.heartbeat_ms {
            return bad("peer_timeout_ms", "must be greater than heartbeat_ms");
        }
        if let Err((key, why)) = RequeueDelay::check(self.requeue_delay_ms, self.requeue_delay_max_ms) {
            return bad(key, &why);
        }
        Ok(())
    }

    /// When a requeued message can be claimed again.
    pub(crate) fn requeue_delay(&self) -> RequeueDelay {
        RequeueDelay::from_millis(self.requeue_delay_ms, self.requeue_delay_max_ms)
    }

    pub(crate) fn busy_timeout(&self) -> Duration {
        Duration::from_millis(self.busy_timeout_ms)
    }

    pub(crate) fn path_text(&self) -> String {
        self.database.display().to_string()
    }
}

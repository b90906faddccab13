//! The transport: the async face of one mailbox (see the crate docs for guarantees).

use crate::{
    config::SqliteConfig,
    mailbox::{Claimed, Outgoing, SqliteMailbox, SubscriptionChange},
    polling::AdaptiveInterval,
    schema::{self, now_ms},
    topic_pattern,
    wake::WakeRegistration,
    worker::{self, Command},
};
use comms_plugin_api::{
    async_trait, framework, queued, wire, Capabilities, Destination, Envelope, ErrorCode, Inbound, NodeId,
    PluginError, Settlement, Transport, TransportInfo, TransportStats,
};
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

/// What the SQLite transport guarantees; see the crate docs.
pub const CAPABILITIES: Capabilities = Capabilities(
    Capabilities::ORDERED.0
        | Capabilities::ACKNOWLEDGEMENTS.0
        | Capabilities::DURABLE.0
        | Capabilities::NATIVE_TOPICS.0
        | Capabilities::RELIABLE.0,
);

/// A transport whose medium is a SQLite file: its address is its node id, its inbound queue the
/// rows of `comms_mailbox` addressed to that node id.
#[derive(Debug)]
pub struct SqliteTransport {
    node: NodeId,
    config: SqliteConfig,
    commands: mpsc::Sender<Command>,
    wake: WakeRegistration,
    /// Flips to `true` once, on `close`.
    closed: watch::Sender<bool>,
    polling: Mutex<PollState>,
}

#[derive(Debug)]
struct PollState {
    interval: AdaptiveInterval,
    data_version: Option<i64>,
    next_lease_expiry: Option<i64>,
}

/// A lease owner unique to this instance: node id, process id, a time stamp and a counter.
fn lease_owner(node: &NodeId) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!("{node}@{}.{nanos:x}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl SqliteTransport {
    /// Validates `config`, opens (creating or migrating) the database and starts the instance's
    /// database thread. Blocks while opening: call it from `spawn_blocking` in async code (the
    /// plugin does).
    pub fn open(node: NodeId, config: SqliteConfig) -> Result<Self, PluginError> {
        config.validate()?;
        let connection = schema::open(&config)?;
        // The wake-up key must be the same for every spelling of the path.
        let canonical = std::fs::canonicalize(&config.database)
            .map_or_else(|_| config.path_text(), |path| path.display().to_string());
        let mailbox =
            SqliteMailbox::new(connection, config.clone(), node.as_str().to_string(), lease_owner(&node))
                .map_err(|error| {
                    schema::db_error("creating the table of live subscriptions", &config, error)
                })?;
        let (commands, receiver) = mpsc::channel(config.send_queue);
        worker::spawn(mailbox, canonical.clone(), receiver)?;
        let polling = PollState {
            interval: AdaptiveInterval::new(
                Duration::from_millis(config.poll_min_ms),
                Duration::from_millis(config.poll_max_ms),
            ),
            data_version: None,
            next_lease_expiry: None,
        };
        Ok(Self {
            wake: WakeRegistration::register(&canonical, node.as_str()),
            node,
            config,
            commands,
            closed: watch::channel(false).0,
            polling: Mutex::new(polling),
        })
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!(
            "sqlite transport of node `{}` on `{}`",
            self.node,
            self.config.path_text()
        ))
    }

    /// Hands `command` to the database thread and waits for its answer.
    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, PluginError>>) -> Command,
    ) -> Result<T, PluginError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())?
    }
}

/// Completes once the transport is closing.
async fn closing(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await;
}

#[async_trait]
impl Transport for SqliteTransport {
    fn info(&self) -> TransportInfo {
        TransportInfo::new(CAPABILITIES, self.node.as_str().to_string(), self.config.max_message_size)
    }

    /// Commits `envelope` to the mailbox of node `address` (or, for a topic and an empty
    /// address, of every subscribed node) and returns once it is committed.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let size = envelope.payload.len() as u64;
        if size > self.config.max_message_size {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!("payload of {size} bytes exceeds max_message_size {}", self.config.max_message_size),
            ));
        }
        let mut encoded = Vec::new();
        wire::encode_envelope(&envelope, &mut encoded).map_err(|error| {
            PluginError::new(ErrorCode::MALFORMED, format!("cannot encode the envelope: {error}"))
        })?;
        let outgoing = match (&envelope.to, address) {
            (Destination::Topic(topic), "") => {
                topic_pattern::validate_topic(topic)?;
                Outgoing::Topic { topic: topic.to_string(), encoded }
            }
            (_, "") => {
                return Err(PluginError::new(
                    ErrorCode::INVALID_ADDRESS,
                    "an empty address is only for publishing to a topic; a node's address is its node id",
                ))
            }
            (_, recipient) => Outgoing::Direct {
                recipient: recipient.to_string(),
                encoded,
                replace_key: framework::replacement_key(&envelope),
            },
        };
        self.request(|reply| Command::Send { outgoing, reply }).await
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let max = max_batch.max(1);
        let mut closed = self.closed.subscribe();
        if *closed.borrow() {
            return Ok(Vec::new());
        }
        let mut state = tokio::select! {
            state = self.polling.lock() => state,
            _ = closing(&mut closed) => return Ok(Vec::new()),
        };
        // The first look of every call is a real query; later ones are skipped while nobody
        // else has committed anything (PRAGMA data_version) and no lease has expired.
        let mut force = true;
        loop {
            let lease_due = state.next_lease_expiry.is_some_and(|expiry| expiry <= now_ms());
            let unless_version = if force || lease_due { None } else { state.data_version };
            let claimed: Claimed =
                match self.request(|reply| Command::Claim { max, unless_version, reply }).await {
                    Ok(claimed) => claimed,
                    Err(_) if self.is_closed() => return Ok(Vec::new()),
                    Err(error) => return Err(error),
                };
            state.data_version = Some(claimed.data_version);
            if claimed.looked {
                state.next_lease_expiry = claimed.next_lease_expiry;
            }
            if !claimed.messages.is_empty() {
                state.interval.traffic();
                return Ok(claimed.messages);
            }
            // Rows moved to the dead-letter table may have hidden others behind them.
            force = claimed.dead_lettered > 0;
            if force {
                continue;
            }
            let mut delay = state.interval.idle();
            if let Some(expiry) = state.next_lease_expiry {
                let until_expiry = u64::try_from(expiry.saturating_sub(now_ms())).unwrap_or(0) + 1;
                delay = delay.min(Duration::from_millis(until_expiry));
            }
            tokio::select! {
                _ = self.wake.notified() => {
                    // Committed by this process: possibly on this very connection, which
                    // data_version does not count.
                    force = true;
                    state.interval.traffic();
                }
                _ = tokio::time::sleep(delay) => {}
                _ = closing(&mut closed) => return Ok(Vec::new()),
            }
        }
    }

    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        if settlements.is_empty() {
            return Ok(());
        }
        if self.is_closed() {
            return Err(self.closed_error());
        }
        self.request(|reply| Command::Settle { settlements, reply }).await
    }

    /// Stores the subscription under this node id: it lasts across restarts until unsubscribed.
    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        topic_pattern::validate_pattern(pattern)?;
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let change = SubscriptionChange { pattern: pattern.to_string(), subscribe: true };
        self.request(|reply| Command::Subscription { change, reply }).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let change = SubscriptionChange { pattern: pattern.to_string(), subscribe: false };
        self.request(|reply| Command::Subscription { change, reply }).await
    }

    /// Commands (sends, settlements, polls) waiting for the database thread.
    fn stats(&self) -> TransportStats {
        let mut stats = TransportStats::default();
        stats.send_queue_depth = queued(&self.commands);
        stats
    }

    /// Wakes a waiting `receive` (it returns an empty batch), releases the leases of messages
    /// received but not settled (they are delivered again at once, to the next instance of this
    /// node) and stops the database thread. Idempotent.
    async fn close(&self) -> Result<(), PluginError> {
        if self.closed.send_replace(true) {
            return Ok(());
        }
        match self.request(|reply| Command::Close { reply }).await {
            Err(error) if error.code == ErrorCode::CLOSED => Ok(()),
            result => result,
        }
    }
}

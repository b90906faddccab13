//! The transport: the async face of one node's mailbox (see the crate docs for guarantees).

use crate::{
    config::PostgresConfig,
    lease,
    link::{Link, Purpose},
    mailbox::{Claimed, Mailbox, Outgoing},
    schema,
};
use comms_plugin_api::{
    async_trait, framework, host_driven, queued, runtime, topics, wire, Capabilities, Destination, Envelope,
    ErrorCode, Inbound, IncidentCounters, NodeId, Outbound, PluginError, SendFailure, Settlement,
    SettlementOutcome, Transport, TransportInfo, TransportStats,
};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

/// What the PostgreSQL transport guarantees; see the crate docs.
pub const CAPABILITIES: Capabilities = Capabilities(
    Capabilities::ORDERED.0
        | Capabilities::ACKNOWLEDGEMENTS.0
        | Capabilities::DURABLE.0
        | Capabilities::NATIVE_TOPICS.0
        | Capabilities::RELIABLE.0
        // A batch is one INSERT.
        | Capabilities::BATCHED_SEND.0,
);

/// A send waiting for the writer, with where its answer goes.
#[derive(Debug)]
struct PendingSend {
    outgoing: Vec<Outgoing>,
    reply: oneshot::Sender<Result<(), PluginError>>,
}

/// A transport whose medium is a PostgreSQL schema: its address is its node id, its inbound queue
/// the rows of `comms_mailbox` addressed to that node id.
#[derive(Debug)]
pub struct PostgresTransport {
    node: NodeId,
    config: PostgresConfig,
    mailbox: Arc<Mailbox>,
    sends: mpsc::Sender<PendingSend>,
    counters: Arc<IncidentCounters>,
    /// Flips to `true` once, on `close`.
    closed: watch::Sender<bool>,
    /// One `receive` at a time looks at the mailbox (a second one would only claim the same
    /// kind of rows on the same connection).
    receiving: Mutex<()>,
    /// Ends when the writer has written everything queued before `close`.
    writer_done: Mutex<Option<runtime::Task>>,
}

/// A lease owner unique to this instance: node id, process id, a time stamp and a counter.
fn lease_owner(node: &NodeId) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!("{node}@{}.{nanos:x}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl PostgresTransport {
    /// Validates `config`, connects (with backoff), creates or migrates the schema, listens for
    /// this node's notifications and starts the writer.
    pub async fn open(node: NodeId, config: PostgresConfig) -> Result<Self, PluginError> {
        let counters = Arc::new(IncidentCounters::default());
        // Two connections (see `Purpose`): the receiving one (claims and settlements, which
        // need no flush) listens and is opened now; the sending one, whose commits are flushed
        // before `send` returns, on the first send.
        let link = Link::open(&config, Purpose::Receiving, Arc::clone(&counters)).await?;
        let writer = Link::lazy(&config, Purpose::Sending, Arc::clone(&counters))?;
        {
            let mut dedicated = link.dedicated().await?;
            schema::migrate(&link, &mut dedicated, &config.schema).await?;
        }
        let channel = link
            .run("naming the notification channel", |client| {
                let node = node.as_str();
                let schema = config.schema.as_str();
                async move {
                    client
                        .query_one(&format!("SELECT \"{schema}\".comms_mailbox_channel($1)"), &[&node])
                        .await
                }
            })
            .await?
            .get::<_, String>(0);
        link.listen(channel).await?;
        let mailbox =
            Arc::new(Mailbox::new(link, writer, &config, node.as_str().to_string(), lease_owner(&node)));
        let (sends, queue) = mpsc::channel(config.send_queue);
        let closed = watch::channel(false).0;
        // On the host's executor, as the writing connection's task (see `Link`): a batch's
        // commit then wakes no thread of the plugin's runtime on its way.
        let writer =
            runtime::spawn(write_loop(Arc::clone(&mailbox), queue, config.batch_size, closed.subscribe()));
        Ok(Self {
            node,
            config,
            mailbox,
            sends,
            counters,
            closed,
            receiving: Mutex::new(()),
            writer_done: Mutex::new(Some(writer)),
        })
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn closed_error(&self) -> PluginError {
        PluginError::closed(&format!(
            "postgres transport of node `{}` (schema `{}`)",
            self.node, self.config.schema
        ))
    }

    /// Checks and encodes one envelope for `address`.
    fn outgoing(&self, address: &str, envelope: &Envelope) -> Result<Outgoing, PluginError> {
        let size = envelope.payload.len() as u64;
        if size > self.config.max_message_size {
            return Err(PluginError::new(
                ErrorCode::TOO_LARGE,
                format!("payload of {size} bytes exceeds max_message_size {}", self.config.max_message_size),
            ));
        }
        let mut encoded = Vec::new();
        wire::encode_envelope(envelope, &mut encoded).map_err(|error| {
            PluginError::new(ErrorCode::MALFORMED, format!("cannot encode the envelope: {error}"))
        })?;
        match (&envelope.to, address) {
            (Destination::Topic(topic), "") => {
                topics::validate_topic(topic.as_str())
                    .map_err(|error| PluginError::new(ErrorCode::INVALID_ADDRESS, error.to_string()))?;
                Ok(Outgoing::Topic { topic: topic.as_str().to_string(), encoded })
            }
            (_, "") => Err(PluginError::new(
                ErrorCode::INVALID_ADDRESS,
                "an empty address is only for publishing to a topic; a node's address is its node id",
            )),
            (_, recipient) if recipient.contains('\0') => {
                Err(PluginError::new(ErrorCode::INVALID_ADDRESS, "a node id cannot contain a NUL character"))
            }
            (_, recipient) => Ok(Outgoing::Direct {
                recipient: recipient.to_string(),
                encoded,
                replace_key: framework::replacement_key(envelope),
            }),
        }
    }

    /// Hands `outgoing` to the writer and waits until it is committed.
    async fn write(&self, outgoing: Vec<Outgoing>) -> Result<(), PluginError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let (reply, answer) = oneshot::channel();
        self.sends.send(PendingSend { outgoing, reply }).await.map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())?
    }
}

/// The writer: takes whatever sends are waiting (up to `batch_size` messages) and writes them
/// with one statement, so that concurrent senders share one commit (group commit). If that
/// fails, each send is written on its own, so that one bad send cannot fail the others. After
/// `close` it writes what was queued before, then ends.
///
/// The notification of a batch's receivers runs while the next batch is written (one
/// notification in flight at most): the connection pipelines the two statements, so a batch
/// costs one round trip instead of two.
async fn write_loop(
    mailbox: Arc<Mailbox>,
    mut queue: mpsc::Receiver<PendingSend>,
    batch_size: usize,
    mut closed: watch::Receiver<bool>,
) {
    let mut notifying: Option<runtime::Task> = None;
    loop {
        let first = tokio::select! {
            biased;
            first = queue.recv() => first,
            _ = closed.wait_for(|closed| *closed) => queue.try_recv().ok(),
        };
        let Some(first) = first else {
            if let Some(mut last) = notifying.take() {
                last.wait().await;
            }
            return;
        };
        let mut batch = vec![first];
        let mut messages = batch[0].outgoing.len();
        while messages < batch_size {
            match queue.try_recv() {
                Ok(next) => {
                    messages += next.outgoing.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let all: Vec<&Outgoing> = batch.iter().flat_map(|pending| &pending.outgoing).collect();
        // The senders learn of the commit before the receivers are notified: a send's latency
        // does not include the notification's round trip.
        let mut woken = Vec::new();
        match mailbox.write(&all).await {
            Ok(recipients) => {
                woken = recipients;
                for pending in batch {
                    let _ = pending.reply.send(Ok(()));
                }
            }
            Err(error) if batch.len() == 1 => {
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
            Err(_) => {
                for pending in batch {
                    let one: Vec<&Outgoing> = pending.outgoing.iter().collect();
                    let written = mailbox.write(&one).await;
                    let _ = pending.reply.send(written.map(|recipients| woken.extend(recipients)));
                }
            }
        }
        if let Some(mut previous) = notifying.take() {
            previous.wait().await;
        }
        if !woken.is_empty() {
            let mailbox = Arc::clone(&mailbox);
            notifying = Some(runtime::spawn(async move { mailbox.notify(woken).await }));
        }
    }
}

/// Completes once the transport is closing.
async fn closing(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await;
}

#[async_trait]
impl Transport for PostgresTransport {
    fn info(&self) -> TransportInfo {
        TransportInfo::new(CAPABILITIES, self.node.as_str().to_string(), self.config.max_message_size)
    }

    /// Commits `envelope` to the mailbox of node `address` (or, for a topic and an empty address,
    /// of every subscribed node) and returns once it is committed.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let outgoing = self.outgoing(address, &envelope)?;
        self.write(vec![outgoing]).await
    }

    /// Commits every valid item in one statement (in batch order); the invalid ones fail alone.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        let mut outgoing = Vec::new();
        let mut indices = Vec::new();
        for (index, item) in batch.iter().enumerate() {
            match self.outgoing(item.address.as_str(), &item.envelope) {
                Ok(message) => {
                    outgoing.push(message);
                    indices.push(index);
                }
                Err(error) => failures.push(SendFailure { index, error }),
            }
        }
        if !outgoing.is_empty() {
            if let Err(error) = self.write(outgoing).await {
                failures.extend(indices.into_iter().map(|index| SendFailure { index, error: error.clone() }));
                failures.sort_by_key(|failure| failure.index);
            }
        }
        failures
    }

    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError> {
        let max = max_batch.clamp(1, self.config.batch_size);
        let mut closed = self.closed.subscribe();
        if *closed.borrow() {
            return Ok(Vec::new());
        }
        let _receiving = tokio::select! {
            guard = self.receiving.lock() => guard,
            _ = closing(&mut closed) => return Ok(Vec::new()),
        };
        let poll = Duration::from_millis(self.config.poll_ms);
        loop {
            let claimed: Claimed = tokio::select! {
                claimed = self.mailbox.claim(max) => match claimed {
                    Ok(claimed) => claimed,
                    Err(_) if self.is_closed() => return Ok(Vec::new()),
                    Err(error) => return Err(error),
                },
                // A claim cancelled here may have leased rows: their lease runs out, or close
                // releases them.
                _ = closing(&mut closed) => return Ok(Vec::new()),
            };
            if !claimed.messages.is_empty() {
                return Ok(claimed.messages);
            }
            if claimed.dead_lettered > 0 {
                // Rows moved out may have hidden others behind them.
                continue;
            }
            tokio::select! {
                // A notification for this node (or a reconnect) since the claim started.
                _ = self.mailbox.wake().notified() => {}
                _ = tokio::time::sleep(lease::idle_delay(claimed.next_expiry_ms, poll)) => {}
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
        let (mut accepted, mut requeued, mut discarded) = (Vec::new(), Vec::new(), Vec::new());
        for settlement in &settlements {
            let id = i64::try_from(settlement.delivery_tag).unwrap_or(-1);
            match settlement.outcome {
                SettlementOutcome::ACCEPTED => accepted.push(id),
                SettlementOutcome::REJECTED_DISCARD => discarded.push(id),
                // REJECTED_REQUEUE, and any outcome a newer host may invent: deliver it again.
                _ => requeued.push(id),
            }
        }
        if !accepted.is_empty() {
            self.mailbox.accept(&accepted).await?;
        }
        if !requeued.is_empty() {
            self.mailbox.requeue(&requeued).await?;
        }
        if !discarded.is_empty() {
            let reasons = vec![comms_plugin_api::inbound::DISCARDED_BY_RECEIVER.to_string(); discarded.len()];
            self.mailbox.dead_letter(&discarded, &reasons).await?;
        }
        Ok(())
    }

    /// Stores the subscription under this node id: it lasts across restarts until unsubscribed.
    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        topics::validate_pattern(pattern)
            .map_err(|error| PluginError::new(ErrorCode::INVALID_ADDRESS, error.to_string()))?;
        if self.is_closed() {
            return Err(self.closed_error());
        }
        self.mailbox.subscription(pattern, true).await
    }

    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        self.mailbox.subscription(pattern, false).await
    }

    /// Sends waiting for the writer; reconnects; background errors (lost connections).
    /// `io.host_driven_sockets`: connections of this plugin library to PostgreSQL that the
    /// host's reactor drives now (see `Link`).
    fn stats(&self) -> TransportStats {
        let mut stats = self.counters.stats();
        stats.send_queue_depth = queued(&self.sends);
        stats.counters.push(("io.host_driven_sockets".to_string(), host_driven::host_driven_sockets()));
        stats
    }

    /// Wakes a waiting `receive` (it returns an empty batch), writes the sends queued before,
    /// releases the leases of messages received but not settled (they are delivered again at
    /// once, to the next instance of this node) and closes the connection. Idempotent.
    async fn close(&self) -> Result<(), PluginError> {
        if self.closed.send_replace(true) {
            return Ok(());
        }
        if let Some(mut writer) = self.writer_done.lock().await.take() {
            writer.wait().await;
        }
        let released = self.mailbox.release().await;
        self.mailbox.close();
        released.map(drop)
    }
}

//! The transport trait a plugin author implements, and what it exchanges with the host.

use crate::{Destination, Envelope, Extensions, PluginError, Text};
use async_trait::async_trait;
pub use comms_core::{Capabilities, Settlement, SettlementOutcome};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a transport tells the host about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportInfo {
    /// Guarantees beyond best-effort point-to-point delivery. Declare only what is true: the
    /// conformance suite tests every flag.
    pub capabilities: Capabilities,
    /// The address peers use to reach this node through this transport.
    pub local_address: String,
    /// The largest payload the transport accepts, in bytes.
    pub max_message_size: u64,
    /// Attributes of later contract versions.
    pub extensions: Extensions,
}

impl TransportInfo {
    /// Info with no extensions.
    pub fn new(capabilities: Capabilities, local_address: impl Into<String>, max_message_size: u64) -> Self {
        Self {
            capabilities,
            local_address: local_address.into(),
            max_message_size,
            extensions: Extensions::new(),
        }
    }
}

/// A message handed to the host, with the tag the host settles it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The message.
    pub envelope: Envelope,
    /// The transport's own handle for this delivery (a stream entry, a broker delivery tag, ...);
    /// 0 for transports without acknowledgements.
    pub delivery_tag: u64,
}

/// One item of a batched send: an envelope and the address to send it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// An address the transport published (empty for a topic on a native-topics transport).
    pub address: Text,
    /// The message.
    pub envelope: Envelope,
}

/// One item of a batched send that was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    /// Its position in the batch.
    pub index: usize,
    /// Why.
    pub error: PluginError,
}

/// A transport's own contribution to its statistics.
///
/// The message and byte counts, and the errors of `send` and `receive`, are counted where the
/// host calls the transport (by comms-plugin-api), so a transport reports only what happens
/// inside it: queue depths, reconnects, its own errors and counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TransportStats {
    /// Messages queued for sending and not yet written or handed to the medium.
    pub send_queue_depth: u64,
    /// Messages received and waiting for the host's `receive`.
    pub receive_queue_depth: u64,
    /// Connections (to peers or a broker) opened again after they were lost.
    pub reconnects: u64,
    /// Failures inside the transport that no call returned (a connection dropped for bad input,
    /// a write that failed in the background, ...).
    pub errors: u64,
    /// Named counters of the transport's own (`name`, value): lowercase, dot-separated, prefixed
    /// with the plugin's name; and, unprefixed, [`UNDELIVERED_COUNTER`].
    pub counters: Vec<(String, u64)>,
}

/// The counter (in [`TransportStats::counters`]) of messages sent to a node that the transport
/// took (its `send` or `send_batch` said `Ok`) and then gave up on: dropped unwritten because the
/// peer stayed unreachable, or because they could not be encoded. A total since the transport
/// was built. Which messages count: [`counts_as_undelivered`].
///
/// The host reads it after waiting for the send queues to empty: `Node::flush` and
/// `Node::close` report the messages counted here since the last report as an error, so a
/// send that was given up on is never silent. A transport that queues messages and can lose
/// them after `send` returned counts them here, with [`IncidentCounters::undelivered`] (whose
/// [`IncidentCounters::stats`] reports it). A transport whose `send` returns only once the
/// medium took the message (a broker that confirmed it) has nothing to count.
pub const UNDELIVERED_COUNTER: &str = "undelivered";

/// Whether losing `envelope` after `send` took it counts in [`UNDELIVERED_COUNTER`]: an
/// application message to a node does. These do not, because the node learns of their loss
/// otherwise or needs no delivery:
///
/// - framework messages (they carry [`framework::KIND_HEADER`](crate::framework::KIND_HEADER)): heartbeats go again every
///   interval, a goodbye to a peer that is gone needs none, a lost response makes its
///   requester retry;
/// - requests (to a service): the requester's timeout and retries on another replica cover
///   them, and its `request` call reports what they could not;
/// - publications (to a topic): each reaches the subscribers alive at the time, at most once,
///   as with NATS (a subscriber that dies takes the loss).
///
/// Counting them would make every close after a peer died an error. And a message the chunk
/// layer cut into parts counts once, by its last part
/// ([`framework::is_part_before_the_last`](crate::framework::is_part_before_the_last)): a
/// transport gives up on a peer's queue from its oldest message on, so the last part goes
/// with any part before it. (A transport that lost an early part and delivered the last one
/// would leave the message uncounted; the receiver drops the incomplete message when its
/// reassembly times out.)
pub fn counts_as_undelivered(envelope: &Envelope) -> bool {
    matches!(envelope.to, Destination::Node(_))
        && envelope.header(crate::framework::KIND_HEADER).is_none()
        && !crate::framework::is_part_before_the_last(envelope)
}

/// Moves envelopes between nodes. Implement this, then export it with [`crate::export_plugin!`].
///
/// Every method is called from the plugin's own runtime (see [`crate::runtime`]), so tokio I/O,
/// timers and `tokio::spawn` work inside them. Methods may be called concurrently. No method may
/// block its thread (no `std::thread::sleep`, no blocking I/O or locks held for long): use
/// `tokio::time` and `tokio::task::spawn_blocking`. The host measures every poll and names a
/// transport that blocks.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Capabilities, local address, limits. Called once, right after construction.
    fn info(&self) -> TransportInfo;

    /// Sends `envelope` to the node at `address`. Returns once the message is queued or written;
    /// waits while the outgoing queue is full.
    async fn send(&self, address: &str, envelope: Envelope) -> Result<(), PluginError>;

    /// Sends every item of `batch` (in order per address) and returns the ones that failed;
    /// an empty vector means all were taken. The default sends them one by one with
    /// [`Transport::send`]; a transport that can write many messages at once should do better.
    async fn send_batch(&self, batch: Vec<Outbound>) -> Vec<SendFailure> {
        let mut failures = Vec::new();
        for (index, outbound) in batch.into_iter().enumerate() {
            if let Err(error) = self.send(&outbound.address, outbound.envelope).await {
                failures.push(SendFailure { index, error });
            }
        }
        failures
    }

    /// Waits for at least one message and returns up to `max_batch`; an empty vector means the
    /// transport is closed and nothing more will arrive.
    async fn receive(&self, max_batch: usize) -> Result<Vec<Inbound>, PluginError>;

    /// What the host did with received messages. Transports without acknowledgements ignore it.
    async fn settle(&self, settlements: Vec<Settlement>) -> Result<(), PluginError> {
        let _ = settlements;
        Ok(())
    }

    /// Starts delivering messages published to topics matching `pattern`. Only transports that
    /// declare [`Capabilities::NATIVE_TOPICS`] implement it; the default says unsupported.
    async fn subscribe(&self, pattern: &str) -> Result<(), PluginError> {
        Err(PluginError::unsupported(format!("this transport has no native topics (subscribe {pattern})")))
    }

    /// Undoes [`Transport::subscribe`].
    async fn unsubscribe(&self, pattern: &str) -> Result<(), PluginError> {
        Err(PluginError::unsupported(format!("this transport has no native topics (unsubscribe {pattern})")))
    }

    /// Queue depths, reconnects and the transport's own counters. Must be cheap and must not
    /// block: the host calls it for metrics. The default reports nothing beyond what the
    /// boundary counts.
    fn stats(&self) -> TransportStats {
        TransportStats::default()
    }

    /// Stops accepting, flushes what is queued (bounded by the transport's own deadline) and
    /// releases resources.
    async fn close(&self) -> Result<(), PluginError>;
}

/// What a transport counts for its own [`Transport::stats`]: reconnects, the failures no
/// call returned, and messages given up on after `send` took them. Cheap (relaxed atomics);
/// share it between a transport's tasks.
#[derive(Debug, Default)]
pub struct IncidentCounters {
    reconnects: AtomicU64,
    errors: AtomicU64,
    undelivered: AtomicU64,
}

impl IncidentCounters {
    /// A connection (to a peer or a broker) was opened again after it was lost.
    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Something failed in the background (a write that will be retried, a connection dropped
    /// for bad input, a message moved to a dead-letter queue, ...).
    pub fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// `count` messages that `send` took were dropped unwritten, counting only those for which
    /// [`counts_as_undelivered`] holds (see [`UNDELIVERED_COUNTER`]).
    pub fn undelivered(&self, count: u64) {
        self.undelivered.fetch_add(count, Ordering::Relaxed);
    }

    /// Statistics with the reconnects, errors and [`UNDELIVERED_COUNTER`] counted so far; the
    /// caller adds queue depths and extends `counters` with its own.
    pub fn stats(&self) -> TransportStats {
        TransportStats {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            counters: vec![(UNDELIVERED_COUNTER.to_string(), self.undelivered.load(Ordering::Relaxed))],
            ..TransportStats::default()
        }
    }
}

/// How many items wait in the bounded channel `sender` feeds, for the queue depths of
/// [`Transport::stats`].
pub fn queued<T>(sender: &tokio::sync::mpsc::Sender<T>) -> u64 {
    (sender.max_capacity() - sender.capacity()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageId;

    #[test]
    fn only_application_messages_to_a_node_count_as_undelivered() {
        let to = |destination: Destination| Envelope::new(MessageId::from_u128(1), "a", destination, vec![1]);
        assert!(counts_as_undelivered(&to(Destination::node("b"))));
        assert!(!counts_as_undelivered(
            &to(Destination::node("b")).with_header(crate::framework::KIND_HEADER, "heartbeat")
        ));
        assert!(!counts_as_undelivered(&to(Destination::service("echo"))), "requests: the requester retries");
        assert!(!counts_as_undelivered(&to(Destination::topic("news"))), "publications: at most once");
        let counters = IncidentCounters::default();
        counters.undelivered(3);
        assert_eq!(counters.stats().counters, vec![(UNDELIVERED_COUNTER.to_string(), 3)]);
    }

    #[test]
    fn a_cut_message_counts_once_by_its_last_part() {
        let part = |header: &str| {
            Envelope::new(MessageId::from_u128(1), "a", Destination::node("b"), vec![1])
                .with_header(crate::framework::PART_HEADER, header)
        };
        let id = "0000000000000000000000000000002a";
        let counted: Vec<bool> =
            (0..3).map(|index| counts_as_undelivered(&part(&format!("{id} {index} 3 3000")))).collect();
        assert_eq!(counted, [false, false, true]);
        assert!(counts_as_undelivered(&part(&format!("{id} 0 1 10"))), "a message of one part");
        assert!(
            counts_as_undelivered(&part("not a part header")),
            "unreadable: counted, never lost from view"
        );
        assert!(counts_as_undelivered(&part(&format!("{id} x 3 3000"))));
    }
}

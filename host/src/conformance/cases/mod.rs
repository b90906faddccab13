//! The cases, one file per area: [`lifecycle`] (create, close, open/close at once),
//! [`envelope`] (what a message carries), [`concurrency`] (many senders, many receivers, order),
//! [`batching`] (`send_batch`), [`limits`] (oversized messages, dead addresses), [`stats`],
//! [`acknowledgements`], [`durability`], [`reliability`], [`topics`], [`encryption`] and
//! [`blocking`] (polls that hold the host's thread). Each case is an
//! `async fn(&Harness) -> CaseResult`.

mod acknowledgements;
mod batching;
mod blocking;
mod concurrency;
mod durability;
mod encryption;
mod envelope;
mod lifecycle;
mod limits;
mod reliability;
mod stats;
mod topics;

use super::harness::{CaseResult, Harness};
use comms_plugin_api::Capabilities;
use futures::future::BoxFuture;

/// How the runner calls a case.
pub(crate) type CaseFn = for<'h> fn(&'h Harness) -> BoxFuture<'h, CaseResult>;

/// One case of the suite.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) summary: &'static str,
    /// Capabilities the transport must declare for the case to apply.
    pub(crate) needs: Capabilities,
    pub(crate) run: CaseFn,
}

/// A [`Case`] from an `async fn(&Harness) -> CaseResult`.
macro_rules! case {
    ($name:literal, $needs:expr, $function:path, $summary:literal) => {
        Case {
            name: $name,
            summary: $summary,
            needs: $needs,
            run: {
                fn run(harness: &Harness) -> BoxFuture<'_, CaseResult> {
                    Box::pin($function(harness))
                }
                run
            },
        }
    };
}

/// Runs first, always: the others need a working instance and its declared capabilities.
pub(crate) const CREATE_TRANSPORT: Case = case!(
    "create_transport",
    Capabilities::NONE,
    lifecycle::create_transport,
    "two instances open side by side with distinct addresses, declare sane info and close"
);

/// Runs last: whether any poll of the plugin's futures held the host's thread, in this case's
/// own short workload or in any case before it. The runner also stops the suite at the first
/// such poll and reports this case as failed without running it.
pub(crate) const NO_BLOCKING_POLLS: Case = case!(
    "no_blocking_polls",
    Capabilities::NONE,
    blocking::no_blocking_polls,
    "no poll of the plugin's futures (constructor, send, send_batch, receive, settle, subscribe, close) \
     holds the host's thread for the blocking-poll limit (500 ms by default), in any case of the suite"
);

/// Every case, in running order.
pub(crate) const CASES: [Case; 19] = [
    CREATE_TRANSPORT,
    case!(
        "envelope_round_trip",
        Capabilities::NONE,
        envelope::round_trip,
        "id, sender, destination, correlation id, headers (unicode too) and payload (empty, binary, \
         1 MiB) arrive intact"
    ),
    case!(
        "concurrent_senders",
        Capabilities::NONE,
        concurrency::concurrent_senders,
        "20 senders x 500 messages to one receiver: none lost, counted per sender"
    ),
    case!(
        "order_per_sender",
        Capabilities::ORDERED,
        concurrency::order_per_sender,
        "5 concurrent senders x 400 messages: each sender's messages arrive in send order"
    ),
    case!(
        "concurrent_receivers",
        Capabilities::NONE,
        concurrency::concurrent_receivers,
        "50 receivers each get exactly their own 100 messages (5,000 in all): none lost or misdelivered"
    ),
    case!(
        "batched_send",
        Capabilities::NONE,
        batching::batched_send,
        "send_batch to two receivers: every item arrives intact (in batch order per address when \
         ordered), and an oversized item fails alone, reported by its index"
    ),
    case!(
        "batches_and_sends_at_once",
        Capabilities::BATCHED_SEND,
        concurrency::batches_and_sends_at_once,
        "4 tasks sharing one sender each send batches of 1024, 1, 255, 7 and 512 items, a single send \
         after each: every message arrives once (in each task's order when ordered)"
    ),
    case!(
        "oversized_message",
        Capabilities::NONE,
        limits::oversized_message,
        "a payload above max_message_size is refused with TOO_LARGE, one just below is delivered, and \
         the transport keeps working"
    ),
    case!(
        "unreachable_address",
        Capabilities::NONE,
        limits::unreachable_address,
        "a send to an address nobody listens on fails or queues without hanging, and does not hold up \
         messages to a live address"
    ),
    case!(
        "transport_stats",
        Capabilities::NONE,
        stats::transport_stats,
        "stats() counts what was sent (messages_sent, bytes_sent at least the payloads), received \
         (messages_received, bytes_received exactly) and refused (send_errors), without blocking"
    ),
    case!(
        "close",
        Capabilities::NONE,
        lifecycle::close,
        "after close mid-stream, receive drains to an empty batch, send fails with CLOSED, and a \
         waiting receive returns"
    ),
    case!(
        "concurrent_open_close",
        Capabilities::NONE,
        lifecycle::concurrent_open_close,
        "10 instances opened at once exchange messages and close at once, twice"
    ),
    case!(
        "redelivery_after_reject",
        Capabilities::ACKNOWLEDGEMENTS,
        acknowledgements::redelivery_after_reject,
        "a message settled REJECTED_REQUEUE comes again with the same id; ACCEPTED and \
         REJECTED_DISCARD ones do not"
    ),
    case!(
        "durable_resume",
        Capabilities::DURABLE,
        durability::durable_resume,
        "a receiver closed mid-stream and reopened with the same node id and config loses nothing"
    ),
    case!(
        "reliable_delivery",
        Capabilities::RELIABLE,
        reliability::reliable_delivery,
        "every message send accepted arrives: while the receiver does not receive for 1 s, across a \
         restart of the receiver when it comes back at the same address, and across a 1 s cut of the \
         link (through a loopback relay, for ip:port addresses)"
    ),
    case!(
        "topic_isolation",
        Capabilities::NATIVE_TOPICS,
        topics::topic_isolation,
        "published messages reach exactly the subscribers whose pattern matches (`*`, `>`, exact), \
         intact; unsubscribed and unsubscribing nodes get nothing"
    ),
    case!(
        "topic_fan_out",
        Capabilities::NATIVE_TOPICS,
        topics::topic_fan_out,
        "10 subscribers of one topic each get all 200 messages of 2 publishers"
    ),
    case!(
        "encrypted_links",
        Capabilities::ENCRYPTED,
        encryption::encrypted_links,
        "with the suite's link security (comms check --key-file): a node whose key is not allowed can \
         neither deliver nor receive, and (for ip:port addresses, through a relay) no payload crosses \
         the wire in the clear"
    ),
    NO_BLOCKING_POLLS,
];

//! Reliable transports deliver every message `send` accepted, unless the receiver is gone for
//! good: not only on a quiet loopback (every transport must manage that, see
//! `concurrent_senders`), but when the receiver falls behind, restarts, or the link drops.
//!
//! Three phases, each with instances of its own:
//!
//! 1. **Slow receiver.** 2,000 messages of 1 KiB go to a receiver that does not call `receive`
//!    for 1 s. A transport may make `send` wait (backpressure) or refuse; one that accepts and
//!    then drops what does not fit in its buffers (a socket buffer, a full queue) fails.
//! 2. **Receiver restart.** Only when a node reopened with the same node id and config comes
//!    back at the same address (brokers, databases, unix socket paths derived from the node id):
//!    while messages flow, the receiver is closed and, 300 ms later, reopened. Every message a
//!    send accepted must be handed out, by the closed instance's `receive` (draining) or by the
//!    new one. Sends refused meanwhile are not counted. A receiver that comes back at another
//!    address (a fresh port) is, for the contract, gone for good: the phase is skipped, noted.
//! 3. **Link outage.** Only when the receiver's address is `ip:port`: a loopback relay that
//!    forwards TCP and UDP to the receiver stands in for it, and the sender sends to the relay.
//!    2,000 messages of 1 KiB go out as fast as sends return, to a receiver that does not call
//!    `receive` yet, so that the path is full; after 1,000 sends (or once sends stall for 200 ms)
//!    the relay drops its connections and every datagram for 1 s (new connections are accepted
//!    and closed at once), then relays again, and the receiver starts receiving. Everything send
//!    accepted must arrive: a reliable transport reconnects and resends what the link lost. A
//!    transport that does not work through such a relay at all (one message sent through it does
//!    not arrive) has the phase skipped, noted.
//!
//! Not covered: a receiver that restarts at a new address, a sender that restarts (its queue is
//! its own), outages longer than a transport's own give-up time, a network that reorders or
//! corrupts (fault injection does that, see `comms_host::fault_injection`).

use crate::conformance::{
    harness::{
        describe_missing, envelope, failed, read_tag, seconds, tag_payload, within, CaseResult, Endpoint,
        Harness, Inbox, Settling,
    },
    relay::Relay,
};
use comms_plugin_api::{Capabilities, Destination, Inbound, NodeId, Settlement, SettlementOutcome};
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Mutex,
    },
    time::Duration,
};
use tokio::time::Instant;

/// Phase 1: messages sent to the paused receiver, their payload size, and the pause.
const BURST: u32 = 2000;
const BURST_PAYLOAD: usize = 1024;
const PAUSE: Duration = Duration::from_secs(1);

/// Phase 2: messages sent across the restart, the send at which the receiver closes, and how
/// long it stays closed.
const RESTART_MESSAGES: u32 = 300;
const CLOSE_AT: u32 = 100;
const RESTART_GAP: Duration = Duration::from_millis(300);

/// Phase 3: messages sent across the outage and their size, the send at which the link is cut
/// (or earlier, once sends stall for [`STALL`]), and for how long.
const OUTAGE_MESSAGES: u32 = 2000;
const OUTAGE_PAYLOAD: usize = 1024;
const CUT_AT: u32 = 1000;
const STALL: Duration = Duration::from_millis(200);
const OUTAGE: Duration = Duration::from_secs(1);

/// Pause between sends in phase 2, so that traffic flows before, during and after the restart.
const SEND_INTERVAL: Duration = Duration::from_millis(2);

/// How often a wait for messages looks whether the sending is done and everything arrived.
const CHECK_INTERVAL: Duration = Duration::from_millis(50);

pub(super) async fn reliable_delivery(h: &Harness) -> CaseResult {
    slow_receiver(h).await?;
    receiver_restart(h).await?;
    link_outage(h).await
}

/// What the sending side of a phase did.
#[derive(Debug, Default)]
struct Ledger {
    accepted: Mutex<BTreeSet<u32>>,
    attempted: AtomicU32,
    refused: AtomicU32,
    first_refusal: Mutex<Option<String>>,
    done: AtomicBool,
}

impl Ledger {
    fn accepted(&self) -> BTreeSet<u32> {
        self.accepted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether sending is over and everything accepted is in `received`.
    fn complete(&self, received: &BTreeSet<u32>) -> bool {
        self.done.load(Ordering::Acquire)
            && self.accepted.lock().unwrap_or_else(|p| p.into_inner()).is_subset(received)
    }

    fn missing(&self, received: &BTreeSet<u32>) -> Vec<u32> {
        self.accepted().difference(received).copied().collect()
    }

    /// `(12 of 300 sends were refused, the first with: ...)`, or nothing.
    fn refusals(&self) -> String {
        let refused = self.refused.load(Ordering::Acquire);
        match &*self.first_refusal.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(first) if refused > 0 => {
                format!(" ({refused} sends were refused and are not counted; the first: {first})")
            }
            _ => String::new(),
        }
    }

    /// Waits until `attempted` sends were made (or the sending ended).
    async fn reached(&self, attempted: u32) {
        while self.attempted.load(Ordering::Acquire) < attempted && !self.done.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Like [`Ledger::reached`], but also returns once no send has completed for `stall` (the
    /// sender is held up by backpressure).
    async fn reached_or_stalled(&self, attempted: u32, stall: Duration) {
        let (mut last, mut since) = (self.attempted.load(Ordering::Acquire), Instant::now());
        loop {
            let now = self.attempted.load(Ordering::Acquire);
            if now >= attempted || self.done.load(Ordering::Acquire) {
                return;
            }
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= stall {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Messages one phase sends.
struct Traffic<'a> {
    sender: &'a Endpoint,
    /// Where to: the receiver's address or the relay's.
    address: &'a str,
    to: &'a NodeId,
    numbers: Range<u32>,
    /// Bytes per payload (at least the 4 of the number).
    payload_len: usize,
    /// Pause between sends.
    interval: Option<Duration>,
}

/// Sends the messages of `traffic` one after the other (each payload starting with its number)
/// and records what was accepted. A send that hangs fails the case.
async fn send_numbered(h: &Harness, traffic: Traffic<'_>, ledger: &Ledger) -> CaseResult {
    let limit = h.operation_limit();
    let Traffic { sender, address, to, numbers, payload_len, interval } = traffic;
    let result = async {
        for i in numbers {
            let mut payload = tag_payload(&[i]);
            payload.resize(payload_len.max(4), 0xa5);
            let message = envelope(sender, Destination::Node(to.clone()), payload);
            match within(&format!("send {i} to {address}"), limit, sender.send(address, message)).await? {
                Ok(()) => {
                    ledger.accepted.lock().unwrap_or_else(|p| p.into_inner()).insert(i);
                }
                Err(error) => {
                    ledger.refused.fetch_add(1, Ordering::AcqRel);
                    ledger
                        .first_refusal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert_with(|| error.to_string());
                }
            }
            ledger.attempted.fetch_add(1, Ordering::AcqRel);
            if let Some(interval) = interval {
                tokio::time::sleep(interval).await;
            }
        }
        Ok(())
    }
    .await;
    ledger.done.store(true, Ordering::Release);
    result
}

/// Adds the numbers `inbox` hands out to `received` until the ledger is complete, the stream
/// ends or `deadline` passes. A message that is not one of `expected_range` fails the case.
async fn receive_numbered(
    inbox: &mut Inbox,
    ledger: &Ledger,
    received: &mut BTreeSet<u32>,
    expected_range: Range<u32>,
    deadline: Instant,
) -> CaseResult {
    loop {
        if ledger.complete(received) {
            return Ok(());
        }
        let wake = deadline.min(Instant::now() + CHECK_INTERVAL);
        match inbox.next_before(wake).await? {
            Some(inbound) => match inbound.envelope.payload.as_slice().get(..4).and_then(read_tag::<1>) {
                Some([i]) if expected_range.contains(&i) => {
                    received.insert(i);
                }
                _ => return Err(failed(format!("{} got a message nobody sent it", inbox.role()))),
            },
            None if inbox.ended() || Instant::now() >= deadline => return Ok(()),
            None => {}
        }
    }
}

/// Phase 1: see the module docs.
async fn slow_receiver(h: &Harness) -> CaseResult {
    let receiver = h.open("the paused receiver").await?;
    let sender = h.open("the sender").await?;
    let ledger = Ledger::default();
    let mut received = BTreeSet::new();
    let traffic = Traffic {
        sender: &sender,
        address: receiver.address(),
        to: &receiver.node,
        numbers: 0..BURST,
        payload_len: BURST_PAYLOAD,
        interval: None,
    };
    let sending = send_numbered(h, traffic, &ledger);
    let receiving = async {
        tokio::time::sleep(PAUSE).await;
        let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
        receive_numbered(&mut inbox, &ledger, &mut received, 0..BURST, h.deadline()).await
    };
    let (sent, got) = tokio::join!(sending, receiving);
    sent?;
    got?;
    let accepted = ledger.accepted();
    if accepted.is_empty() {
        return Err(failed(format!(
            "every one of {BURST} sends to a receiver that did not receive for {} was refused{}",
            seconds(PAUSE),
            ledger.refusals()
        )));
    }
    let missing = ledger.missing(&received);
    if !missing.is_empty() {
        return Err(failed(format!(
            "{BURST} messages of {BURST_PAYLOAD} bytes were sent to a receiver that did not call receive for the first \
             {}: {}{}; a reliable transport makes send wait or refuse, never drops what it accepted",
            seconds(PAUSE),
            describe_missing(accepted.len(), &missing),
            ledger.refusals()
        )));
    }
    close_both(h, &sender, &receiver).await
}

async fn close_both(h: &Harness, a: &Endpoint, b: &Endpoint) -> CaseResult {
    for endpoint in [a, b] {
        within(&format!("closing {}", endpoint.role), h.operation_limit(), endpoint.close())
            .await?
            .map_err(|error| failed(format!("closing {} failed: {error}", endpoint.role)))?;
    }
    Ok(())
}

/// Phase 2: see the module docs.
async fn receiver_restart(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let node = h.new_node_id("restarted");

    // Does a reopened node come back where it was? Found out before any traffic.
    let probe = h.open_node("the receiver", node.clone()).await?;
    let address = probe.address().to_string();
    within("closing the receiver", limit, probe.close())
        .await?
        .map_err(|error| failed(format!("closing the receiver failed: {error}")))?;
    let first = h.open_node("the reopened receiver", node.clone()).await?;
    if first.address() != address {
        h.note(format!(
            "a node reopened with the same node id and config comes back at another address ({address}, then {}): \
             the receiver restart was not checked",
            first.address()
        ));
        return within("closing the receiver", limit, first.close())
            .await?
            .map_err(|error| failed(format!("closing the receiver failed: {error}")));
    }

    let sender = h.open("the sender").await?;
    let ledger = Ledger::default();
    let (closed_at, reopened_at) = (AtomicU32::new(0), AtomicU32::new(0));
    let mut received = BTreeSet::new();
    let mut first_inbox = h.inbox(&first, Settling::AcceptAll);
    let traffic = Traffic {
        sender: &sender,
        address: &address,
        to: &node,
        numbers: 0..RESTART_MESSAGES,
        payload_len: 64,
        interval: Some(SEND_INTERVAL),
    };
    let sending = send_numbered(h, traffic, &ledger);
    let restart = async {
        ledger.reached(CLOSE_AT).await;
        closed_at.store(ledger.attempted.load(Ordering::Acquire), Ordering::Release);
        within("closing the receiver mid-stream", limit, first.close())
            .await?
            .map_err(|error| failed(format!("closing the receiver mid-stream failed: {error}")))?;
        tokio::time::sleep(RESTART_GAP).await;
        let second = h.open_node("the restarted receiver", node.clone()).await?;
        reopened_at.store(ledger.attempted.load(Ordering::Acquire), Ordering::Release);
        let inbox = h.inbox(&second, Settling::AcceptAll);
        Ok((second, inbox))
    };
    // The first instance hands out what it has until its stream ends after the close.
    let draining = async {
        let mut drained = BTreeSet::new();
        let never = Ledger::default();
        receive_numbered(&mut first_inbox, &never, &mut drained, 0..RESTART_MESSAGES, h.deadline()).await?;
        Ok(drained)
    };
    let (sent, restarted, drained) = tokio::join!(sending, restart, draining);
    sent?;
    let (second, mut second_inbox) = restarted?;
    received.extend(drained?);
    if second.address() != address {
        h.note(format!(
            "the restarted receiver came back at another address ({address}, then {}): the receiver restart was \
             not checked",
            second.address()
        ));
        return close_both(h, &sender, &second).await;
    }
    receive_numbered(&mut second_inbox, &ledger, &mut received, 0..RESTART_MESSAGES, h.deadline()).await?;
    let missing = ledger.missing(&received);
    if !missing.is_empty() {
        let (closed_at, reopened_at) =
            (closed_at.load(Ordering::Acquire), reopened_at.load(Ordering::Acquire));
        return Err(failed(format!(
            "{RESTART_MESSAGES} messages were sent, one every {}, to a receiver that was closed after message \
             {closed_at} and reopened at the same address {address} after message {reopened_at}: {}{}; a reliable \
             transport hands out what the closed instance had taken in and resends what it had not",
            seconds(SEND_INTERVAL),
            describe_missing(ledger.accepted().len(), &missing),
            ledger.refusals()
        )));
    }
    close_both(h, &sender, &second).await
}

/// Phase 3: see the module docs.
async fn link_outage(h: &Harness) -> CaseResult {
    let limit = h.operation_limit();
    let receiver = h.open("the receiver behind a relay").await?;
    let Ok(target) = receiver.address().parse::<SocketAddr>() else {
        h.note(format!(
            "the receiver's address {} is not ip:port: the link outage was not checked",
            receiver.address()
        ));
        return Ok(());
    };
    let relay = match Relay::start(target).await {
        Ok(relay) => relay,
        Err(error) => {
            h.note(format!("no loopback relay could be started ({error}): the link outage was not checked"));
            return Ok(());
        }
    };
    let via = relay.address();
    let sender = h.open("the sender").await?;

    // Does the transport work through a relay at all? (Received with `receive` itself: the
    // receiver must not take anything in while the link is cut below.)
    let probe = envelope(&sender, Destination::Node(receiver.node.clone()), tag_payload(&[u32::MAX]));
    let probe_id = probe.id;
    let through = within("a send through the relay", limit, sender.send(&via, probe)).await?;
    let arrived = match through {
        Ok(()) => tokio::time::timeout(limit, receiver.transport().receive(1)).await.ok(),
        Err(_) => None,
    };
    match arrived {
        Some(Ok(batch)) if batch.first().is_some_and(|inbound| inbound.envelope.id == probe_id) => {
            settle_accepted(h, &receiver, &batch).await?;
        }
        Some(Ok(batch)) if !batch.is_empty() => {
            return Err(failed("the receiver behind the relay got a message nobody sent it"))
        }
        Some(Err(error)) => return Err(failed(format!("receive failed: {error}"))),
        _ => {
            h.note(format!(
                "a message sent to {via}, a loopback relay to the receiver at {target}, did not arrive{}: the transport \
                 does not work through a plain TCP/UDP relay, so the link outage was not checked",
                through.err().map(|error| format!(" (the send failed: {error})")).unwrap_or_default()
            ));
            return Ok(());
        }
    }

    // The receiver does not receive until the link is back, so that the path is full of
    // messages when it is cut: what a transport had written to the link and not yet had
    // confirmed is what the cut takes.
    let ledger = Ledger::default();
    let cut_after = AtomicU32::new(0);
    let restored_after = AtomicU32::new(0);
    let mut received = BTreeSet::new();
    let traffic = Traffic {
        sender: &sender,
        address: &via,
        to: &receiver.node,
        numbers: 0..OUTAGE_MESSAGES,
        payload_len: OUTAGE_PAYLOAD,
        interval: None,
    };
    let sending = send_numbered(h, traffic, &ledger);
    let outage_then_receive = async {
        ledger.reached_or_stalled(CUT_AT, STALL).await;
        relay.cut();
        cut_after.store(ledger.attempted.load(Ordering::Acquire), Ordering::Release);
        tokio::time::sleep(OUTAGE).await;
        relay.restore();
        restored_after.store(ledger.attempted.load(Ordering::Acquire), Ordering::Release);
        let mut inbox = h.inbox(&receiver, Settling::AcceptAll);
        receive_numbered(&mut inbox, &ledger, &mut received, 0..OUTAGE_MESSAGES, h.deadline()).await
    };
    let (sent, got) = tokio::join!(sending, outage_then_receive);
    sent?;
    got?;
    let missing = ledger.missing(&received);
    if !missing.is_empty() {
        return Err(failed(format!(
            "{OUTAGE_MESSAGES} messages of {OUTAGE_PAYLOAD} bytes were sent through a loopback relay to a receiver that \
             did not receive until the relay had cut the link for {} (after send {}, until send {}): {}{}; a reliable \
             transport reconnects and resends what the link lost",
            seconds(OUTAGE),
            cut_after.load(Ordering::Acquire),
            restored_after.load(Ordering::Acquire),
            describe_missing(ledger.accepted().len(), &missing),
            ledger.refusals()
        )));
    }
    drop(relay);
    close_both(h, &sender, &receiver).await
}

/// Settles a batch taken with `receive` itself as accepted, when the transport acknowledges.
async fn settle_accepted(h: &Harness, receiver: &Endpoint, batch: &[Inbound]) -> CaseResult {
    if !h.capabilities().contains(Capabilities::ACKNOWLEDGEMENTS) {
        return Ok(());
    }
    let accepted = batch
        .iter()
        .map(|inbound| Settlement {
            delivery_tag: inbound.delivery_tag,
            outcome: SettlementOutcome::ACCEPTED,
        })
        .collect();
    within("settle", h.operation_limit(), receiver.transport().settle(accepted))
        .await?
        .map_err(|error| failed(format!("settle failed: {error}")))
}

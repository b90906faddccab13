//! The node's background work: taking messages from transports and routing each to where it
//! belongs, heartbeats, and following discovery.
//!
//! Routing of an incoming envelope:
//! - framework messages ([`crate::control`]): hellos, heartbeats and goodbyes update the peer
//!   table (a hello is answered with this node's record at once, so neither side waits for a
//!   heartbeat to learn the other's services and topics), responses complete the request
//!   waiting for them (a late one is dropped);
//! - to a node: the node's inbox (`Node::receive`);
//! - to a topic: every matching subscription of this node;
//! - to a service: the service's handler, whose answer goes back to the sender.
//!
//! Every message from a peer also counts as a sign of life.

use crate::{
    acknowledgement::Acknowledgement,
    control::{self, RecordMessage, KIND_HEADER},
    node::{InboxItem, NodeInner, NodeTransport},
};
use comms_plugin_api::{Capabilities, Destination, Envelope, ErrorCode, NodeRecord, PeerEventKind};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;

/// Messages taken from a transport per call across the plugin boundary.
const RECEIVE_BATCH: u32 = 256;

async fn flag_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Moves messages from one transport to where they belong and settles them.
pub(crate) async fn receive_loop(inner: Arc<NodeInner>, transport: Arc<NodeTransport>) {
    let acknowledges = transport.loaded.info().capabilities.contains(Capabilities::ACKNOWLEDGEMENTS);
    let mut shutdown = inner.shutdown.subscribe();
    let mut closing = inner.closing.subscribe();
    let mut failures = 0u32;
    loop {
        let received = tokio::select! {
            received = transport.loaded.receive(RECEIVE_BATCH) => received,
            _ = flag_set(&mut shutdown) => return,
            // A transport with acknowledgements keeps what this node has not taken yet and
            // hands it to the next consumer, so a closing node stops taking at once (and settles
            // everything it took before its transport closes). Without acknowledgements the
            // node drains instead: what the transport buffered is received after it closes.
            _ = flag_set(&mut closing), if acknowledges => return,
        };
        match received {
            Ok(batch) if batch.is_empty() => return,
            Ok(batch) => {
                failures = 0;
                let mut inbox_open = true;
                for inbound in batch {
                    // Settled when the message's destination is done with it: the application,
                    // a service handler, every subscription it went to, or right here.
                    let mut acknowledgement = if acknowledges {
                        let remembered =
                            inner.dedup.as_ref().map(|window| (Arc::clone(window), inbound.envelope.id));
                        Acknowledgement::pending(&transport.settle_lane, inbound.delivery_tag, remembered)
                    } else {
                        Acknowledgement::none()
                    };
                    if !admitted(&inner, &transport, &inbound.envelope) {
                        // Refused for good: never delivered again.
                        acknowledgement.reject();
                        continue;
                    }
                    // Once the inbox is gone (the node was dropped), whatever is left is
                    // requeued by its dropped acknowledgement.
                    inbox_open =
                        inbox_open && route_incoming(&inner, inbound.envelope, acknowledgement).await;
                }
                if !inbox_open {
                    return;
                }
            }
            Err(error) if error.code == ErrorCode::CLOSED || *closing.borrow() => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(transport = %transport.name, %error, failures, "receive failed; retrying");
                let failed = InboxItem::TransportFailed { transport: transport.name.clone(), error };
                if inner.inbox_tx.send(failed).await.is_err() {
                    return;
                }
                let delay = Duration::from_millis(50u64.saturating_mul(1 << failures.min(7)));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = flag_set(&mut closing) => return,
                }
            }
        }
    }
}

/// Whether an incoming envelope passes the node's signature checks (always, unless
/// `signatures = "require"`). A refused one is logged and counted.
fn admitted(inner: &NodeInner, transport: &NodeTransport, envelope: &Envelope) -> bool {
    let Some(signatures) = &inner.signatures else { return true };
    match signatures.check(envelope) {
        Ok(()) => true,
        Err(reason) => {
            inner.rejected.add();
            tracing::warn!(
                transport = %transport.name,
                from = %envelope.from,
                id = %envelope.id,
                reason,
                "incoming envelope refused"
            );
            false
        }
    }
}

/// Routes one incoming envelope; `false` once the node's inbox is gone (node dropped).
async fn route_incoming(
    inner: &Arc<NodeInner>,
    envelope: Envelope,
    mut acknowledgement: Acknowledgement,
) -> bool {
    inner.membership.heard_from(&envelope.from);
    let kind = envelope.header(KIND_HEADER);
    let describes_sender = matches!(kind, Some(control::HELLO | control::HEARTBEAT | control::GOODBYE));
    if let Destination::Node(to) = &envelope.to {
        // A heartbeat or goodbye meant for a node behind this relay still tells this node
        // about its direct neighbour, the sender; it is handled here and not forwarded.
        if *to != inner.id && !describes_sender {
            relay(inner, envelope).await;
            acknowledgement.accept();
            return true;
        }
    }
    let framework = kind.is_some();
    if framework || is_repeat(inner, &envelope) {
        // Framework messages are handled here and now; a repeat goes no further.
        acknowledgement.accept();
        if !framework {
            return true;
        }
    }
    match envelope.header(KIND_HEADER) {
        Some(control::HELLO | control::HEARTBEAT) => {
            match RecordMessage::decode(envelope.payload.as_slice()) {
                Ok(message) => {
                    let reply = message.reply;
                    let record = message.into_record(envelope.from);
                    inner.membership.heartbeat(record.clone());
                    if reply {
                        // Answered beside the receive loop: a slow link to this peer must not
                        // hold up what the loop takes next.
                        let inner = Arc::clone(inner);
                        tokio::spawn(async move {
                            if let Err(error) = inner.send_record(&record, control::HEARTBEAT, false).await {
                                tracing::debug!(peer = %record.id, %error, "answering a hello failed");
                            }
                        });
                    }
                }
                Err(error) => {
                    tracing::debug!(from = %envelope.from, %error, "unreadable record message ignored")
                }
            }
            true
        }
        Some(control::GOODBYE) => {
            // Release 0.1 sent an empty goodbye: not offline.
            let offline =
                RecordMessage::decode(envelope.payload.as_slice()).is_ok_and(|message| message.offline);
            inner.membership.goodbye(&envelope.from, offline);
            true
        }
        Some(control::RESPONSE) => {
            let (from, id) = (envelope.from.clone(), envelope.correlation_id);
            if !inner.pending.complete(envelope) {
                tracing::debug!(%from, ?id, "response with no waiting request (late or duplicate) dropped");
            }
            true
        }
        Some(other) => {
            tracing::debug!(kind = other, from = %envelope.from, "unknown framework message ignored");
            true
        }
        None => match &envelope.to {
            Destination::Node(_) => {
                inner.inbox_tx.send(InboxItem::Message(envelope, acknowledgement)).await.is_ok()
            }
            Destination::Topic(topic) => {
                let topic = topic.clone();
                inner.subscriptions.deliver(&topic, &envelope, acknowledgement).await;
                true
            }
            Destination::Service(service) => {
                let service = service.clone();
                crate::service::handle_request(inner, &service, envelope, acknowledgement);
                true
            }
        },
    }
}

/// Whether the node's dedup window (if on) has seen this application message already; a repeat
/// is counted and logged.
fn is_repeat(inner: &NodeInner, envelope: &Envelope) -> bool {
    let Some(window) = &inner.dedup else { return false };
    let repeat = window.lock().unwrap_or_else(|p| p.into_inner()).is_repeat(envelope.id);
    if repeat {
        inner.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(from = %envelope.from, id = %envelope.id, "a message seen before was dropped (dedup_window)");
    }
    repeat
}

/// A message for another node. A relay node (`relay = true`) forwards it on whichever of its
/// transports reaches that node, so that nodes on different backends can talk through it.
/// (Heartbeats and goodbyes never get here: they describe routes valid one hop away only.)
/// Any other node drops it with a warning: it was misaddressed.
async fn relay(inner: &Arc<NodeInner>, envelope: Envelope) {
    let Destination::Node(to) = envelope.to.clone() else { return };
    if !inner.settings.relay {
        tracing::warn!(from = %envelope.from, %to, "message for another node dropped (this node does not relay)");
        return;
    }
    if let Err(error) = inner.send_to_node(&to, envelope).await {
        tracing::warn!(%to, %error, "relaying a message failed");
    }
}

/// Sends this node's record as a message of `kind` to each of `peers`, all at once, each send
/// bounded by `limit` (a slow or unreachable peer holds up nobody else).
async fn send_records(inner: &NodeInner, peers: Vec<NodeRecord>, kind: &str, reply: bool, limit: Duration) {
    let sends = peers.into_iter().map(|peer| async move {
        match tokio::time::timeout(limit, inner.send_record(&peer, kind, reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(peer = %peer.id, %error, kind, "record message not sent"),
            Err(_) => tracing::debug!(peer = %peer.id, kind, "record message send timed out"),
        }
    });
    futures::future::join_all(sends).await;
}

/// Sends this node's record to every live peer (best effort, concurrently, bounded in time). A
/// peer that is down is left alone until it is heard from again: it announces itself when it
/// comes back.
pub(crate) async fn send_heartbeats(inner: &NodeInner) {
    let limit = inner.settings.heartbeat_interval.unwrap_or(Duration::from_secs(1));
    send_records(inner, inner.membership.live(|_| true), control::HEARTBEAT, false, limit).await;
}

/// Says hello to every peer discovery reported: they answer with their records at once.
async fn send_hellos(inner: &NodeInner, peers: Vec<NodeRecord>) {
    let limit = inner.settings.heartbeat_interval.unwrap_or(Duration::from_secs(1));
    send_records(inner, peers, control::HELLO, true, limit).await;
}

/// Tells every live peer this node is leaving.
pub(crate) async fn send_goodbyes(inner: &NodeInner) {
    let limit = inner.settings.close_timeout.min(Duration::from_secs(1));
    send_records(inner, inner.membership.live(|_| true), control::GOODBYE, false, limit).await;
}

/// Heartbeats and expiry, every `heartbeat_interval`. It starts with a hello to every peer known
/// from discovery, so the node learns their records within a round trip (no cold start).
pub(crate) async fn heartbeats(inner: Arc<NodeInner>) {
    let mut closing = inner.closing.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    send_hellos(&inner, inner.membership.live(|_| true)).await;
    let Some(interval) = inner.settings.heartbeat_interval else { return };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = flag_set(&mut closing) => return,
            _ = flag_set(&mut shutdown) => return,
        }
        inner.membership.expire(tokio::time::Instant::now().into_std());
        send_heartbeats(&inner).await;
    }
}

/// Feeds discovery's events into the peer table.
pub(crate) async fn watch_discovery(inner: Arc<NodeInner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let event = tokio::select! {
            event = inner.discovery.next_event() => event,
            _ = flag_set(&mut shutdown) => return,
        };
        match event {
            Ok(Some(event)) => match event.kind {
                PeerEventKind::Left => inner.membership.withdrawn(&event.record.id),
                PeerEventKind::Joined | PeerEventKind::Updated => {
                    let record = event.record;
                    if inner.membership.discovered(record.clone()) {
                        // A peer met for the first time: ask for its full record now.
                        let inner = Arc::clone(&inner);
                        tokio::spawn(async move { send_hellos(&inner, vec![record]).await });
                    }
                }
            },
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "discovery failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = flag_set(&mut shutdown) => return,
                }
            }
        }
    }
}

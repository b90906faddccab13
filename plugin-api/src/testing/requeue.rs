//! What a transport does with a message its receiver gives back (settles `REJECTED_REQUEUE`):
//! how long until it comes again ([`crate::requeue_delay`]), and how often before it goes to the
//! dead letters; measured the same way for every plugin that offers them.

use crate::{
    host_side::LoadedTransport, Destination, Envelope, MessageId, NodeId, Payload, Settlement,
    SettlementOutcome,
};
use std::time::{Duration, Instant};

/// Sends one message from `transport` to its own node (`node`, at `address`), takes it
/// `deliveries` times, requeuing it every time but the last (accepted), and returns the time
/// between each delivery and the next (`deliveries - 1` of them). Each wait for the next
/// delivery is limited to `limit`.
///
/// With a requeue delay of `d`, the gaps are at least `d`, `2d`, `4d`, ...; without one, a few
/// milliseconds each.
pub async fn gaps_between_deliveries(
    transport: &LoadedTransport,
    (node, address): (&str, &str),
    deliveries: usize,
    limit: Duration,
) -> Result<Vec<Duration>, String> {
    let envelope = Envelope::new(
        MessageId::from_u128(0x7e9e),
        NodeId::new(node),
        Destination::node(NodeId::new(node)),
        Payload::from(b"requeued".to_vec()),
    );
    transport.send(address, envelope).await.map_err(|error| format!("sending: {error}"))?;
    let mut delivered_at = Vec::new();
    while delivered_at.len() < deliveries {
        let batch = tokio::time::timeout(limit, transport.receive(1))
            .await
            .map_err(|_| format!("delivery {} did not come within {limit:?}", delivered_at.len() + 1))?
            .map_err(|error| format!("receiving: {error}"))?;
        let Some(inbound) = batch.into_iter().next() else { continue };
        delivered_at.push(Instant::now());
        let outcome = match delivered_at.len() == deliveries {
            true => SettlementOutcome::ACCEPTED,
            false => SettlementOutcome::REJECTED_REQUEUE,
        };
        let settlement = Settlement { delivery_tag: inbound.delivery_tag, outcome };
        transport.settle(vec![settlement]).await.map_err(|error| format!("settling: {error}"))?;
    }
    Ok(delivered_at.windows(2).map(|pair| pair[1] - pair[0]).collect())
}

/// Sends two messages from `transport` to its own node (`node`, at `address`): the first is
/// requeued every time it comes, the second accepted. Receives until nothing comes for `quiet`
/// (or the first came 3 × `max_attempts` times: a transport that never gives up on it would
/// keep this busy for ever) and returns how often each came. A transport that dead-letters a
/// message after `max_attempts` deliveries returns `(max_attempts, 1)`.
pub async fn deliveries_of_a_message_always_requeued(
    transport: &LoadedTransport,
    (node, address): (&str, &str),
    max_attempts: usize,
    quiet: Duration,
) -> Result<(usize, usize), String> {
    for n in [1u32, 2] {
        let envelope = Envelope::new(
            MessageId::from_u128(u128::from(n)),
            NodeId::new(node),
            Destination::node(NodeId::new(node)),
            Payload::from(n.to_be_bytes().to_vec()),
        );
        transport.send(address, envelope).await.map_err(|error| format!("sending {n}: {error}"))?;
    }
    let (mut requeued, mut accepted) = (0, 0);
    while let Ok(batch) = tokio::time::timeout(quiet, transport.receive(16)).await {
        for inbound in batch.map_err(|error| format!("receiving: {error}"))? {
            let outcome = if inbound.envelope.payload.as_slice() == 1u32.to_be_bytes() {
                requeued += 1;
                SettlementOutcome::REJECTED_REQUEUE
            } else {
                accepted += 1;
                SettlementOutcome::ACCEPTED
            };
            let settlement = Settlement { delivery_tag: inbound.delivery_tag, outcome };
            transport.settle(vec![settlement]).await.map_err(|error| format!("settling: {error}"))?;
        }
        if requeued > 3 * max_attempts {
            break;
        }
    }
    Ok((requeued, accepted))
}

//! The requeue delay of a transport whose broker holds a message back
//! ([`crate::requeue_delay`]), measured the same way for every plugin that offers it.

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

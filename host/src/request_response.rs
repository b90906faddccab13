//! Request / response: pending requests, retry policy, replica choice.
//!
//! Each attempt of a request is a new envelope with a new id, sent to one replica; the response
//! carries that id as its correlation id. A response that arrives after its attempt timed out
//! finds no waiting caller and is dropped: it can never be taken for the answer to a later
//! request or a later attempt.

use comms_plugin_api::{Envelope, MessageId, NodeId, NodeRecord};
use serde::Deserialize;
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::oneshot;

/// How a request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOptions {
    /// Time allowed for one attempt.
    pub timeout: Duration,
    /// Attempts in total (at least 1). A later attempt goes to another replica when there is one.
    pub attempts: u32,
    /// Pause before the second attempt; doubles for each further one.
    pub backoff: Duration,
}

impl Default for RequestOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(5), attempts: 3, backoff: Duration::from_millis(50) }
    }
}

/// How requests to a service are spread over its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancing {
    /// Each request to the next replica in turn.
    RoundRobin,
    /// The replica with the fewest requests in flight from this node (ties: in turn).
    #[default]
    LeastOutstanding,
}

/// Callers waiting for responses, and requests in flight per replica.
#[derive(Debug, Default)]
pub(crate) struct PendingRequests {
    waiting: Mutex<HashMap<MessageId, oneshot::Sender<Envelope>>>,
    outstanding: Arc<Mutex<HashMap<NodeId, usize>>>,
    turn: AtomicUsize,
}

/// Counts one request in flight to a replica until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    outstanding: Arc<Mutex<HashMap<NodeId, usize>>>,
    node: NodeId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut outstanding = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = outstanding.get_mut(&self.node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                outstanding.remove(&self.node);
            }
        }
    }
}

impl PendingRequests {
    /// Waits for the response to attempt `id`.
    pub(crate) fn expect(&self, id: MessageId) -> oneshot::Receiver<Envelope> {
        let (sender, receiver) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id, sender);
        receiver
    }

    /// Stops waiting for attempt `id` (timed out or failed to send).
    pub(crate) fn forget(&self, id: MessageId) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Hands a response to its caller; `false` if nobody waits for it (late or unknown).
    pub(crate) fn complete(&self, response: Envelope) -> bool {
        let Some(id) = response.correlation_id else { return false };
        let waiter = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        match waiter {
            Some(waiter) => waiter.send(response).is_ok(),
            None => false,
        }
    }

    /// Fails every waiting caller (the node is closing): their receivers see the sender dropped.
    pub(crate) fn abandon_all(&self) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Marks one request in flight to `node`.
    pub(crate) fn start(&self, node: &NodeId) -> InFlight {
        *self.outstanding.lock().unwrap_or_else(|p| p.into_inner()).entry(node.clone()).or_default() += 1;
        InFlight { outstanding: Arc::clone(&self.outstanding), node: node.clone() }
    }

    /// Picks a replica among `candidates`, preferring ones not in `tried`.
    pub(crate) fn choose(
        &self,
        candidates: &[NodeRecord],
        tried: &HashSet<NodeId>,
        balancing: Balancing,
    ) -> Option<NodeRecord> {
        let fresh: Vec<&NodeRecord> = candidates.iter().filter(|c| !tried.contains(&c.id)).collect();
        let pool: Vec<&NodeRecord> = if fresh.is_empty() { candidates.iter().collect() } else { fresh };
        if pool.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let chosen = match balancing {
            Balancing::RoundRobin => pool[turn % pool.len()],
            Balancing::LeastOutstanding => {
                let outstanding = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
                let load = |record: &NodeRecord| outstanding.get(&record.id).copied().unwrap_or(0);
                let least = pool.iter().map(|r| load(r)).min().unwrap_or(0);
                let tied: Vec<&&NodeRecord> = pool.iter().filter(|r| load(r) == least).collect();
                tied[turn % tied.len()]
            }
        };
        Some(chosen.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(ids: &[&str]) -> Vec<NodeRecord> {
        ids.iter()
            .map(|id| {
                let mut value = NodeRecord::default();
                value.id = NodeId::new(*id);
                value
            })
            .collect()
    }

    #[test]
    fn round_robin_visits_every_replica() {
        let pending = PendingRequests::default();
        let candidates = replicas(&["a", "b", "c"]);
        let chosen: HashSet<String> = (0..3)
            .map(|_| {
                pending.choose(&candidates, &HashSet::new(), Balancing::RoundRobin).unwrap().id.to_string()
            })
            .collect();
        assert_eq!(chosen.len(), 3);
    }

    #[test]
    fn least_outstanding_avoids_the_busy_replica_and_retries_avoid_tried_ones() {
        let pending = PendingRequests::default();
        let candidates = replicas(&["a", "b"]);
        let _busy = pending.start(&NodeId::new("a"));
        for _ in 0..4 {
            let chosen = pending.choose(&candidates, &HashSet::new(), Balancing::LeastOutstanding).unwrap();
            assert_eq!(chosen.id.as_str(), "b");
        }
        let tried: HashSet<NodeId> = [NodeId::new("b")].into();
        assert_eq!(
            pending.choose(&candidates, &tried, Balancing::LeastOutstanding).unwrap().id.as_str(),
            "a"
        );
        assert!(pending.choose(&[], &tried, Balancing::RoundRobin).is_none());
    }

    #[test]
    fn late_responses_find_nobody() {
        let pending = PendingRequests::default();
        let id = MessageId::from_u128(9);
        let receiver = pending.expect(id);
        pending.forget(id);
        let response = Envelope::new(
            MessageId::from_u128(10),
            NodeId::new("s"),
            comms_plugin_api::Destination::Node(NodeId::new("c")),
            Vec::new(),
        )
        .with_correlation_id(Some(id));
        assert!(!pending.complete(response));
        drop(receiver);
    }
}

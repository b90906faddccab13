//! Requests this node is waiting on, and the choice of replica for the next one.
//!
//! Each attempt of a request is a new envelope with a new id, sent to one replica; the response
//! carries that id as its correlation id. A response that arrives after its attempt ended
//! (timed out, failed to send) finds no entry and is dropped: it can never be taken for the
//! answer to a later request or a later attempt.

pub(crate) use crate::request_response::Balancing;
use comms_plugin_api::{MessageId, NodeId};
use std::collections::{HashMap, HashSet};

/// Attempts waiting for a response, and attempts in flight per replica.
#[derive(Debug, Default)]
pub(crate) struct PendingRequests {
    waiting: HashMap<MessageId, NodeId>,
    outstanding: HashMap<NodeId, usize>,
    turn: usize,
}

impl PendingRequests {
    /// Attempt `id` went to `replica`.
    pub(crate) fn started(&mut self, id: MessageId, replica: NodeId) {
        *self.outstanding.entry(replica.clone()).or_default() += 1;
        self.waiting.insert(id, replica);
    }

    /// Attempt `id` is over (answered, timed out, failed); `false` if it was not waiting.
    pub(crate) fn finished(&mut self, id: MessageId) -> bool {
        let Some(replica) = self.waiting.remove(&id) else { return false };
        if let Some(count) = self.outstanding.get_mut(&replica) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.outstanding.remove(&replica);
            }
        }
        true
    }

    /// How many attempts are waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Picks a replica among `candidates` (sorted, deduplicated), preferring ones not in `tried`.
    pub(crate) fn choose<'a>(
        &mut self,
        candidates: &[&'a NodeId],
        tried: &HashSet<NodeId>,
        balancing: Balancing,
    ) -> Option<&'a NodeId> {
        let fresh: Vec<&'a NodeId> = candidates.iter().copied().filter(|c| !tried.contains(*c)).collect();
        let pool = if fresh.is_empty() { candidates.to_vec() } else { fresh };
        if pool.is_empty() {
            return None;
        }
        let turn = self.turn;
        self.turn = self.turn.wrapping_add(1);
        Some(match balancing {
            Balancing::RoundRobin => pool[turn % pool.len()],
            Balancing::LeastOutstanding => {
                let load = |id: &NodeId| self.outstanding.get(id).copied().unwrap_or(0);
                let least = pool.iter().map(|id| load(id)).min().unwrap_or(0);
                let tied: Vec<&'a NodeId> = pool.into_iter().filter(|id| load(id) == least).collect();
                tied[turn % tied.len()]
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId::new(*n)).collect()
    }

    #[test]
    fn least_outstanding_prefers_idle_replicas_and_untried_ones() {
        let replicas = ids(&["a", "b", "c"]);
        let candidates: Vec<&NodeId> = replicas.iter().collect();
        let mut pending = PendingRequests::default();
        pending.started(MessageId::from_u128(1), NodeId::new("a"));
        pending.started(MessageId::from_u128(2), NodeId::new("b"));
        for _ in 0..5 {
            let chosen = pending.choose(&candidates, &HashSet::new(), Balancing::LeastOutstanding).unwrap();
            assert_eq!(chosen.as_str(), "c");
        }
        let tried: HashSet<NodeId> = ids(&["c"]).into_iter().collect();
        let chosen = pending.choose(&candidates, &tried, Balancing::LeastOutstanding).unwrap();
        assert_ne!(chosen.as_str(), "c", "a retry goes elsewhere");
        let everyone: HashSet<NodeId> = replicas.iter().cloned().collect();
        assert!(pending.choose(&candidates, &everyone, Balancing::RoundRobin).is_some(), "all tried: any");
        assert!(pending.choose(&[], &HashSet::new(), Balancing::RoundRobin).is_none());
    }

    #[test]
    fn an_attempt_ends_once_and_frees_its_replica() {
        let mut pending = PendingRequests::default();
        let id = MessageId::from_u128(9);
        pending.started(id, NodeId::new("a"));
        assert!(pending.finished(id));
        assert!(!pending.finished(id), "a late or duplicate response finds nothing");
        assert_eq!(pending.len(), 0);
        assert!(pending.outstanding.is_empty());
    }
}

//! Infection-style dissemination: the queue of membership updates piggybacked on every probe
//! datagram.
//!
//! Every update a node learns (or makes) is queued here and sent along with the next pings,
//! pings-requests and acks, as many as fit in the datagram, the least transmitted first (a new
//! update overtakes old ones), each until it has been sent `retransmit_limit` times
//! (λ·log10(n+1), see [`retransmit_limit`]). Every receiver that learns something new from it
//! queues it in turn, so an update reaches all n members in O(log n) protocol periods with high
//! probability, at no extra datagram.
//!
//! Bounded: one update per member id (a newer one replaces the older, which is then stale), and
//! at most `capacity` in all; when full, the update sent most often is dropped (it has had the
//! most chances to spread) and counted in [`Dissemination::dropped`].

use std::{
    cmp::Reverse,
    collections::{BTreeSet, HashMap},
};

/// Updates too large for the room left that `take` skips before it calls the datagram full.
const MAX_SKIPPED: usize = 8;

/// How often an update is sent before it leaves the queue: `multiplier · ceil(log10(n + 1))`
/// for a group of `n` members, at least 1.
pub fn retransmit_limit(multiplier: u32, members: usize) -> u32 {
    let log = ((members as f64 + 1.0).log10()).ceil().max(1.0) as u32;
    multiplier.max(1).saturating_mul(log)
}

#[derive(Debug, Clone)]
struct Queued {
    bytes: Vec<u8>,
    transmits: u32,
    sequence: u64,
}

/// The piggyback queue. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Dissemination {
    queued: HashMap<String, Queued>,
    /// Sending order: fewest transmissions first, then newest first.
    order: BTreeSet<(u32, Reverse<u64>, String)>,
    next_sequence: u64,
    capacity: usize,
    dropped: u64,
}

impl Dissemination {
    /// An empty queue holding at most `capacity` updates (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            queued: HashMap::new(),
            order: BTreeSet::new(),
            next_sequence: 0,
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    /// Queues the encoded update about member `id`, replacing an older one about it.
    pub fn push(&mut self, id: &str, bytes: Vec<u8>) {
        if let Some(old) = self.queued.remove(id) {
            self.order.remove(&(old.transmits, Reverse(old.sequence), id.to_string()));
        } else if self.queued.len() >= self.capacity {
            if let Some(most_sent) = self.order.pop_last() {
                self.queued.remove(&most_sent.2);
                self.dropped += 1;
            }
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.order.insert((0, Reverse(sequence), id.to_string()));
        self.queued.insert(id.to_string(), Queued { bytes, transmits: 0, sequence });
    }

    /// Picks updates for one datagram with `room` bytes left, least sent first, and counts a
    /// transmission for each; an update sent `limit` times leaves the queue.
    pub fn take(&mut self, mut room: usize, limit: u32, max_count: usize) -> Vec<Vec<u8>> {
        let mut chosen = Vec::new();
        let mut keys = Vec::new();
        // A few too large for what is left may be skipped, then the datagram is full enough:
        // scanning the whole queue for each datagram would cost O(queue) per message.
        let mut skipped = 0;
        for key in &self.order {
            if keys.len() >= max_count || skipped >= MAX_SKIPPED {
                break;
            }
            let Some(queued) = self.queued.get(&key.2) else { continue };
            if queued.bytes.len() <= room {
                room -= queued.bytes.len();
                keys.push(key.clone());
            } else {
                skipped += 1;
            }
        }
        for key in keys {
            self.order.remove(&key);
            let (transmits, sequence, id) = key;
            let Some(queued) = self.queued.get_mut(&id) else { continue };
            chosen.push(queued.bytes.clone());
            queued.transmits = transmits + 1;
            if queued.transmits >= limit {
                self.queued.remove(&id);
            } else {
                self.order.insert((transmits + 1, sequence, id));
            }
        }
        chosen
    }

    /// Updates waiting to be sent.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Updates dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_grows_with_the_log_of_the_group() {
        assert_eq!(retransmit_limit(4, 0), 4);
        assert_eq!(retransmit_limit(4, 9), 4);
        assert_eq!(retransmit_limit(4, 10), 8);
        assert_eq!(retransmit_limit(4, 1000), 16);
        assert_eq!(retransmit_limit(0, 1000), 4);
    }

    #[test]
    fn least_sent_first_each_until_the_limit_and_newer_replaces_older() {
        let mut queue = Dissemination::new(10);
        queue.push("a", vec![1; 10]);
        queue.push("b", vec![2; 10]);
        assert_eq!(queue.take(15, 2, 8), vec![vec![2; 10]], "newest first, only what fits");
        assert_eq!(queue.take(100, 2, 8), vec![vec![1; 10], vec![2; 10]], "least sent first");
        assert_eq!(queue.take(100, 2, 8), vec![vec![1; 10]], "b reached the limit");
        assert!(queue.is_empty());
        queue.push("a", vec![1]);
        queue.push("a", vec![3]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.take(100, 1, 8), vec![vec![3]]);
    }

    #[test]
    fn a_full_queue_drops_the_most_sent_update() {
        let mut queue = Dissemination::new(2);
        queue.push("a", vec![1]);
        queue.take(100, 10, 1); // a sent once
        queue.push("b", vec![2]);
        queue.push("c", vec![3]);
        assert_eq!((queue.len(), queue.dropped()), (2, 1));
        let mut left = queue.take(100, 10, 8);
        left.sort();
        assert_eq!(left, vec![vec![2], vec![3]]);
    }
}

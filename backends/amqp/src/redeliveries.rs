//! How often a message came again to this process, for a classic queue (the default inbox, and
//! every topic queue), which does not count.
//!
//! A quorum queue counts a message's deliveries that were not accepted (header
//! `x-delivery-count`): `max_attempts` and the doubling of `requeue_delay_ms` read that count. A
//! classic queue only marks a delivery as `redelivered`: it was delivered before and not
//! accepted (requeued with `basic.nack`, or left unacknowledged by a consumer whose channel
//! closed). So for a classic queue the plugin counts those itself: [`Redeliveries`] keeps, per
//! message id, how many redeliveries of the message this process has seen.
//!
//! What that count is, and is not (stated in docs/amqp.md):
//! - A message requeued again and again by this process is counted exactly, as on a quorum
//!   inbox.
//! - With several instances of one node sharing the inbox, each counts the redeliveries it
//!   gets: a message goes to the dead letters after at most `max_attempts` deliveries per
//!   instance, not in total.
//! - The counts live in memory: a restart starts them again. A message that crashes its
//!   consumer every time is therefore never caught here (each new process sees it once); a
//!   quorum inbox, whose broker counts, catches it.
//! - Bounded: the least recently counted ids are forgotten beyond [`Redeliveries::capacity`],
//!   so a flood of distinct requeued messages can only delay the dead-lettering of some, never
//!   grow the memory. That is also the only way an id leaves: the count of a message accepted or
//!   dead-lettered is of no use any more, but if its dead-lettering failed (the broker then
//!   delivers it again) the count still says it is past `max_attempts`.
//!
//! Sans-IO: the caller says which message came again, this says how often it came before.

use std::collections::{BTreeMap, HashMap};

/// Message ids counted at most, by default: with about 80 bytes per id, some 1.3 MB.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// Redeliveries seen per message id, the least recently counted forgotten first.
#[derive(Debug)]
pub struct Redeliveries {
    capacity: usize,
    /// Per message id: its redeliveries seen, and when it was last counted (a key of `order`).
    counts: HashMap<u128, (u64, u64)>,
    /// Message ids by when they were last counted, oldest first.
    order: BTreeMap<u64, u128>,
    /// The next value of the counting clock.
    clock: u64,
}

impl Default for Redeliveries {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Redeliveries {
    /// Counts for at most `capacity` message ids (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), counts: HashMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    /// The most message ids counted at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Message ids counted now.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no message id is counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// A delivery of message `id` came marked `redelivered` by the broker: how many earlier
    /// deliveries of it were not accepted, as far as this process knows (at least 1: the one
    /// before this, which may have gone to another process). A first delivery (not marked) has
    /// none and is not counted.
    pub fn redelivered(&mut self, id: u128) -> u64 {
        let count = match self.counts.get(&id) {
            Some(&(count, last)) => {
                self.order.remove(&last);
                count + 1
            }
            None => 1,
        };
        let now = self.clock;
        self.clock += 1;
        self.counts.insert(id, (count, now));
        self.order.insert(now, id);
        while self.counts.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.counts.remove(&oldest);
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_redelivery_adds_one_per_message() {
        let mut seen = Redeliveries::default();
        assert!(seen.is_empty());
        assert_eq!(seen.redelivered(7), 1);
        assert_eq!(seen.redelivered(7), 2);
        assert_eq!(seen.redelivered(8), 1, "counted per message");
        assert_eq!(seen.redelivered(7), 3);
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn beyond_its_capacity_the_least_recently_counted_id_is_forgotten() {
        let mut seen = Redeliveries::with_capacity(2);
        seen.redelivered(1);
        seen.redelivered(2);
        // 1 is counted again: 2 is now the least recent.
        assert_eq!(seen.redelivered(1), 2);
        seen.redelivered(3);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen.redelivered(1), 3, "kept");
        assert_eq!(seen.redelivered(2), 1, "forgotten, counted from the start again");
        assert_eq!(seen.len(), 2, "never more than its capacity");
        assert_eq!(seen.capacity(), 2);
    }
}

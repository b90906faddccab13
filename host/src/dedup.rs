//! The optional window of recent message ids that gives the application each message once.
//!
//! At-least-once transports deliver a message again after a crash, a reconnect or a lease that
//! ran out; with `dedup_window = N` the node remembers the ids of the last N application messages
//! it delivered and settles a repeat as accepted without delivering it; a message handed back to
//! its broker (nack, or dropped unacknowledged) is forgotten, so its redelivery is delivered. Cost: about 64 bytes per
//! remembered id (N = 100,000: ~6 MB), one hash lookup per message. A duplicate that arrives after
//! N newer messages is delivered again: the window bounds memory, not time.

use comms_plugin_api::MessageId;
use std::collections::{HashSet, VecDeque};

/// The last `capacity` message ids seen.
#[derive(Debug)]
pub(crate) struct DedupWindow {
    seen: HashSet<MessageId>,
    order: VecDeque<MessageId>,
    capacity: usize,
}

impl DedupWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { seen: HashSet::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Forgets `id`: a message handed back to its broker (nack, or dropped unacknowledged)
    /// must be delivered when it comes again.
    pub(crate) fn forget(&mut self, id: MessageId) {
        if self.seen.remove(&id) {
            self.order.retain(|kept| *kept != id);
        }
    }

    /// Whether `id` was seen within the window; records it if not.
    pub(crate) fn is_repeat(&mut self, id: MessageId) -> bool {
        if self.seen.contains(&id) {
            return true;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(id);
        self.order.push_back(id);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_are_caught_and_memory_stays_bounded() {
        let mut window = DedupWindow::new(3);
        let id = |n| MessageId::from_u128(n);
        assert!(!window.is_repeat(id(1)));
        assert!(window.is_repeat(id(1)));
        for n in 2..=4 {
            assert!(!window.is_repeat(id(n)));
        }
        assert!(!window.is_repeat(id(1)), "pushed out of a window of 3");
        assert!(window.is_repeat(id(4)));
        assert_eq!(window.seen.len(), 3);
    }

    #[test]
    fn a_forgotten_id_is_delivered_again() {
        let mut window = DedupWindow::new(10);
        let id = MessageId::from_u128(7);
        assert!(!window.is_repeat(id));
        window.forget(id);
        assert!(!window.is_repeat(id), "a requeued message comes again and is delivered");
        assert!(window.is_repeat(id));
        assert_eq!(window.order.len(), 1);
    }
}

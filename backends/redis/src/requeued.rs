//! Inbox entries the host requeued (settled `REJECTED_REQUEUE`), waiting to be claimed and
//! delivered again: at once, or once their requeue delay is over.
//!
//! Sans-IO: the reader asks which entries are due at a given instant and which are still held.
//! A held entry stays pending in Redis under this consumer, so it is not lost if the process
//! dies: another consumer of the inbox claims it after `claim_idle_ms`. While this consumer
//! lives it must keep the entry from looking idle (the reader claims held entries to itself
//! again with `XCLAIM ... JUSTID`, which resets their idle time without counting a delivery),
//! or a claim pass (its own or another instance's) would deliver it before its delay is over.

use tokio::time::Instant;

/// Requeued entries by stream id, in the order they were requeued.
#[derive(Debug, Default)]
pub(crate) struct Requeued {
    entries: Vec<(String, Instant)>,
}

impl Requeued {
    /// Holds entry `id` until `due`.
    pub(crate) fn hold(&mut self, id: String, due: Instant) {
        self.entries.push((id, due));
    }

    /// Takes up to `room` entries due at `now`, oldest requeue first.
    pub(crate) fn take_due(&mut self, now: Instant, room: usize) -> Vec<String> {
        let mut taken = Vec::new();
        self.entries.retain(|(id, due)| {
            let take = taken.len() < room && *due <= now;
            if take {
                taken.push(id.clone());
            }
            !take
        });
        taken
    }

    /// When the next entry comes due; `None` when nothing is held.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.entries.iter().map(|(_, due)| *due).min()
    }

    /// The entries not due at `now`: those whose idle time the reader keeps short.
    pub(crate) fn held(&self, now: Instant) -> Vec<String> {
        self.entries.iter().filter(|(_, due)| *due > now).map(|(id, _)| id.clone()).collect()
    }

    /// Whether entry `id` is waiting here (a claim pass must not deliver it).
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.entries.iter().any(|(held, _)| held == id)
    }

    /// Every entry, due or not (at close: handed back to the next consumer at once).
    pub(crate) fn drain(&mut self) -> Vec<String> {
        self.entries.drain(..).map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_come_due_in_requeue_order_and_no_sooner() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut requeued = Requeued::default();
        requeued.hold("1-0".into(), ms(0));
        requeued.hold("2-0".into(), ms(300));
        requeued.hold("3-0".into(), ms(100));
        requeued.hold("4-0".into(), ms(0));
        assert_eq!(requeued.next_due(), Some(ms(0)));
        assert_eq!(requeued.take_due(ms(0), 1), ["1-0"], "at most `room`");
        assert_eq!(requeued.take_due(ms(0), 10), ["4-0"]);
        assert_eq!(requeued.held(ms(0)), ["2-0", "3-0"]);
        assert_eq!(requeued.next_due(), Some(ms(100)));
        assert!(requeued.take_due(ms(99), 10).is_empty(), "not before its delay");
        assert_eq!(requeued.take_due(ms(300), 10), ["2-0", "3-0"]);
        assert_eq!(requeued.next_due(), None);
    }

    #[test]
    fn held_entries_are_known_until_taken_and_all_drain_at_close() {
        let now = Instant::now();
        let mut requeued = Requeued::default();
        requeued.hold("1-0".into(), now + Duration::from_secs(60));
        requeued.hold("2-0".into(), now);
        assert!(requeued.contains("1-0") && requeued.contains("2-0") && !requeued.contains("3-0"));
        assert_eq!(requeued.drain(), ["1-0", "2-0"]);
        assert!(!requeued.contains("1-0"));
    }
}

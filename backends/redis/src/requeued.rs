//! Inbox entries the host requeued (settled `REJECTED_REQUEUE`), waiting to be claimed and
//! delivered again: at once, or once their requeue delay is over.
//!
//! Sans-IO: the reader asks which entries are due at a given instant and which are still held.
//! A held entry stays pending in Redis under this consumer, so it is not lost if the process
//! dies: another consumer of the inbox claims it after `claim_idle_ms`. While this consumer
//! lives it must keep the entry from looking idle (the reader claims held entries to itself
//! again with `XCLAIM ... JUSTID`, which resets their idle time without counting a delivery),
//! or a claim pass (its own or another instance's) would deliver it before its delay is over.
//!
//! An entry held for a delay keeps the prefetch permit (`max_unsettled`) it was delivered with
//! until it is taken again, as an AMQP message held unacknowledged keeps its `prefetch` slot:
//! so at most `max_unsettled` entries wait here, however many the application gives back.

use tokio::time::Instant;

/// One requeued entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its stream id.
    pub(crate) id: String,
    /// When it may be delivered again.
    pub(crate) due: Instant,
    /// Whether it keeps a prefetch permit until it is taken (held for a delay).
    pub(crate) keeps_permit: bool,
}

/// Requeued entries, in the order they were requeued.
#[derive(Debug, Default)]
pub(crate) struct Requeued {
    entries: Vec<Entry>,
}

/// What [`Requeued::take_due`] took.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Taken {
    /// The entries.
    pub(crate) entries: Vec<Entry>,
    /// How many of them kept a permit, which is free again once they are claimed.
    pub(crate) permits: usize,
}

impl Requeued {
    /// Holds `entry` until it is due.
    pub(crate) fn hold(&mut self, entry: Entry) {
        self.entries.push(entry);
    }

    /// Takes the entries due at `now`, oldest requeue first: those that keep a permit all (they
    /// bring their permit with them), the others up to `room`.
    pub(crate) fn take_due(&mut self, now: Instant, room: usize) -> Taken {
        let mut taken = Taken::default();
        let mut without_permit = 0;
        self.entries.retain(|entry| {
            let take = entry.due <= now && (entry.keeps_permit || without_permit < room);
            if take {
                if entry.keeps_permit {
                    taken.permits += 1;
                } else {
                    without_permit += 1;
                }
                taken.entries.push(entry.clone());
            }
            !take
        });
        taken
    }

    /// When the next entry comes due; `None` when nothing is held.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.entries.iter().map(|entry| entry.due).min()
    }

    /// The ids of the entries not due at `now`: those whose idle time the reader keeps short.
    pub(crate) fn held(&self, now: Instant) -> Vec<String> {
        self.entries.iter().filter(|entry| entry.due > now).map(|entry| entry.id.clone()).collect()
    }

    /// How many entries wait for a requeue delay (each keeps its permit).
    pub(crate) fn held_for_delay(&self) -> usize {
        self.entries.iter().filter(|entry| entry.keeps_permit).count()
    }

    /// Whether entry `id` is waiting here (a claim pass must not deliver it).
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.entries.iter().any(|entry| entry.id == id)
    }

    /// Every entry's id, due or not (at close: handed back to the next consumer at once).
    pub(crate) fn drain(&mut self) -> Vec<String> {
        self.entries.drain(..).map(|entry| entry.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(id: &str, due: Instant, keeps_permit: bool) -> Entry {
        Entry { id: id.to_string(), due, keeps_permit }
    }

    fn ids(taken: &Taken) -> Vec<&str> {
        taken.entries.iter().map(|entry| entry.id.as_str()).collect()
    }

    #[test]
    fn entries_come_due_in_requeue_order_and_no_sooner() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut requeued = Requeued::default();
        requeued.hold(entry("1-0", ms(0), false));
        requeued.hold(entry("2-0", ms(300), true));
        requeued.hold(entry("3-0", ms(100), true));
        requeued.hold(entry("4-0", ms(0), false));
        assert_eq!(requeued.next_due(), Some(ms(0)));
        assert_eq!(ids(&requeued.take_due(ms(0), 1)), ["1-0"], "at most `room`");
        assert_eq!(ids(&requeued.take_due(ms(0), 10)), ["4-0"]);
        assert_eq!(requeued.held(ms(0)), ["2-0", "3-0"]);
        assert_eq!(requeued.next_due(), Some(ms(100)));
        assert!(requeued.take_due(ms(99), 10).entries.is_empty(), "not before its delay");
        assert_eq!(requeued.next_due(), Some(ms(100)));
    }

    #[test]
    fn entries_held_for_a_delay_bring_their_permit_and_need_no_room() {
        let now = Instant::now();
        let mut requeued = Requeued::default();
        requeued.hold(entry("1-0", now, true));
        requeued.hold(entry("2-0", now, false));
        requeued.hold(entry("3-0", now, true));
        assert_eq!(requeued.held_for_delay(), 2);
        // No room at all (every permit is taken, two of them by these entries): the two that
        // keep a permit still come, and free it.
        let taken = requeued.take_due(now, 0);
        assert_eq!((ids(&taken), taken.permits), (vec!["1-0", "3-0"], 2));
        assert_eq!(requeued.held_for_delay(), 0);
        assert_eq!(requeued.take_due(now, 1), Taken { entries: vec![entry("2-0", now, false)], permits: 0 });
    }

    #[test]
    fn held_entries_are_known_until_taken_and_all_drain_at_close() {
        let now = Instant::now();
        let mut requeued = Requeued::default();
        requeued.hold(entry("1-0", now + Duration::from_secs(60), true));
        requeued.hold(entry("2-0", now, false));
        assert!(requeued.contains("1-0") && requeued.contains("2-0") && !requeued.contains("3-0"));
        assert_eq!(requeued.drain(), ["1-0", "2-0"]);
        assert!(!requeued.contains("1-0"));
    }
}

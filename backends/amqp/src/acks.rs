//! Settlements turned into AMQP acknowledgements: delivery tags that survive reconnects, and
//! batched acks.
//!
//! AMQP delivery tags count from 1 per channel, so after a reconnect old tags mean other
//! messages. The tag the host sees therefore carries the connection's generation and which
//! consuming channel the message came from ([`encode`]); a settlement for an older generation
//! is ignored (the broker has already put that message back in its queue when the old
//! connection died, and delivers it again).
//!
//! [`AckTracker`] keeps the tags delivered and not yet settled on one channel. Consecutive
//! accepted tags below the lowest still unsettled one are acknowledged with one
//! `basic.ack(multiple)`; rejections go out first so that a multiple ack never covers them.
//!
//! With a requeue delay, a message the host requeued stays unacknowledged until its delay is
//! over ([`AckAction::RequeueAfter`], then [`AckTracker::release`]). Until then it counts as
//! unsettled: a multiple ack sent meanwhile stops below it, since one that covered it would
//! delete a message that is to come again.

use comms_plugin_api::{requeue_delay::RequeueDelay, SettlementOutcome};
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

const TAG_BITS: u32 = 39;
const CHANNEL_BIT: u64 = 1 << TAG_BITS;
const GENERATION_SHIFT: u32 = TAG_BITS + 1;
/// Generations wrap at 2^24 (a reconnect every second for half a year).
pub const GENERATION_MASK: u32 = (1 << 24) - 1;

/// Which consuming channel a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The node's durable inbox queue.
    Inbox,
    /// The node's topic queue.
    Topics,
}

/// The host-visible tag of AMQP tag `tag` on `source`'s channel of connection `generation`.
pub fn encode(generation: u32, source: Source, tag: u64) -> u64 {
    let channel = if source == Source::Topics { CHANNEL_BIT } else { 0 };
    (u64::from(generation & GENERATION_MASK) << GENERATION_SHIFT) | channel | (tag & (CHANNEL_BIT - 1))
}

/// The inverse of [`encode`].
pub fn decode(tag: u64) -> (u32, Source, u64) {
    let source = if tag & CHANNEL_BIT != 0 { Source::Topics } else { Source::Inbox };
    ((tag >> GENERATION_SHIFT) as u32, source, tag & (CHANNEL_BIT - 1))
}

/// One AMQP settlement to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckAction {
    /// `basic.ack`; with `multiple`, every unsettled tag up to `tag`.
    Ack {
        /// The AMQP delivery tag.
        tag: u64,
        /// Whether all lower unsettled tags are acknowledged too.
        multiple: bool,
    },
    /// `basic.nack(requeue = true)`: deliver again.
    Requeue(u64),
    /// `basic.nack(requeue = true)` once `delay` is over, if the tag is still held then (see
    /// [`AckTracker::release`]).
    RequeueAfter {
        /// The AMQP delivery tag.
        tag: u64,
        /// How long the message is held first.
        delay: Duration,
    },
    /// `basic.reject(requeue = false)`: drop or dead-letter.
    Discard(u64),
}

/// The unsettled deliveries of one channel.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Each unsettled tag with the message's delivery number (1 for its first delivery).
    outstanding: BTreeMap<u64, u64>,
    /// Of those, the ones the host requeued that wait for their delay to end.
    held: BTreeSet<u64>,
}

impl AckTracker {
    /// Records a delivery handed towards the host: the message's `delivery`-th (1 for a first
    /// delivery, or when the queue does not count them). Tags arrive in increasing order.
    pub fn delivered(&mut self, tag: u64, delivery: u64) {
        self.outstanding.insert(tag, delivery);
    }

    /// Forgets everything (the channel is gone; the broker requeued what was unsettled, held
    /// messages included).
    pub fn reset(&mut self) {
        self.outstanding.clear();
        self.held.clear();
    }

    /// Ends the hold of a requeued message whose delay is over: `true` if `tag` was held (the
    /// caller now sends its `basic.nack(requeue)`), `false` if the channel was reset meanwhile.
    pub fn release(&mut self, tag: u64) -> bool {
        let held = self.held.remove(&tag);
        if held {
            self.outstanding.remove(&tag);
        }
        held
    }

    /// Deliveries not settled yet (held ones included).
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Requeued deliveries held for their delay.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// What to send for `settlements` (AMQP tags). Tags not outstanding (unknown, settled
    /// already, or held) are ignored: settling twice would make the broker close the channel. An
    /// outcome this version does not know is treated as a requeue, which loses nothing. A
    /// requeue with a `requeue_delay` is held (see the module documentation).
    pub fn plan(
        &mut self,
        settlements: impl IntoIterator<Item = (u64, SettlementOutcome)>,
        requeue_delay: RequeueDelay,
    ) -> Vec<AckAction> {
        let mut actions = Vec::new();
        let mut accepted = Vec::new();
        for (tag, outcome) in settlements {
            let Some(&delivery) = self.outstanding.get(&tag) else { continue };
            if self.held.contains(&tag) {
                continue;
            }
            match outcome {
                SettlementOutcome::ACCEPTED => accepted.push(tag),
                SettlementOutcome::REJECTED_DISCARD => actions.push(AckAction::Discard(tag)),
                _ if !requeue_delay.is_immediate() => {
                    self.held.insert(tag);
                    actions.push(AckAction::RequeueAfter { tag, delay: requeue_delay.after(delivery) });
                    continue;
                }
                _ => actions.push(AckAction::Requeue(tag)),
            }
            self.outstanding.remove(&tag);
        }
        accepted.sort_unstable();
        let floor = self.outstanding.keys().next().copied().unwrap_or(u64::MAX);
        let below = accepted.partition_point(|tag| *tag < floor);
        match below {
            0 => {}
            1 => actions.push(AckAction::Ack { tag: accepted[0], multiple: false }),
            n => actions.push(AckAction::Ack { tag: accepted[n - 1], multiple: true }),
        }
        actions.extend(accepted[below..].iter().map(|&tag| AckAction::Ack { tag, multiple: false }));
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::SettlementOutcome as S;

    /// Requeued messages come again at once.
    const AT_ONCE: RequeueDelay = RequeueDelay { first: Duration::ZERO, max: Duration::ZERO };

    #[test]
    fn tags_round_trip_and_differ_per_generation_and_channel() {
        for (generation, source, tag) in [
            (0, Source::Inbox, 1),
            (7, Source::Topics, 12345),
            (GENERATION_MASK, Source::Inbox, (1 << 39) - 1),
        ] {
            assert_eq!(decode(encode(generation, source, tag)), (generation, source, tag));
        }
        assert_ne!(encode(1, Source::Inbox, 5), encode(2, Source::Inbox, 5));
        assert_ne!(encode(1, Source::Inbox, 5), encode(1, Source::Topics, 5));
    }

    fn tracker(tags: impl IntoIterator<Item = u64>) -> AckTracker {
        let mut tracker = AckTracker::default();
        tags.into_iter().for_each(|tag| tracker.delivered(tag, 1));
        tracker
    }

    #[test]
    fn contiguous_accepts_become_one_multiple_ack() {
        let mut t = tracker(1..=5);
        assert_eq!(
            t.plan((1..=5).map(|tag| (tag, S::ACCEPTED)), AT_ONCE),
            vec![AckAction::Ack { tag: 5, multiple: true }]
        );
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_multiple_ack_never_covers_an_unsettled_tag() {
        let mut t = tracker(1..=6);
        // 3 is still with the host: 1 and 2 go together, 4 and 6 one by one.
        let plan = t.plan([(2, S::ACCEPTED), (1, S::ACCEPTED), (4, S::ACCEPTED), (6, S::ACCEPTED)], AT_ONCE);
        assert_eq!(
            plan,
            vec![
                AckAction::Ack { tag: 2, multiple: true },
                AckAction::Ack { tag: 4, multiple: false },
                AckAction::Ack { tag: 6, multiple: false }
            ]
        );
        assert_eq!(
            t.plan([(3, S::ACCEPTED), (5, S::ACCEPTED)], AT_ONCE),
            vec![AckAction::Ack { tag: 5, multiple: true }]
        );
    }

    #[test]
    fn rejections_go_out_before_the_acks_that_could_cover_them() {
        let mut t = tracker(1..=4);
        let plan = t.plan(
            [(1, S::ACCEPTED), (2, S::REJECTED_REQUEUE), (3, S::REJECTED_DISCARD), (4, S::ACCEPTED)],
            AT_ONCE,
        );
        assert_eq!(
            plan,
            vec![AckAction::Requeue(2), AckAction::Discard(3), AckAction::Ack { tag: 4, multiple: true }]
        );
    }

    #[test]
    fn unknown_and_repeated_settlements_are_ignored() {
        let mut t = tracker([1, 2]);
        assert_eq!(t.plan([(9, S::ACCEPTED)], AT_ONCE), vec![]);
        assert_eq!(t.plan([(1, S::ACCEPTED)], AT_ONCE), vec![AckAction::Ack { tag: 1, multiple: false }]);
        assert_eq!(t.plan([(1, S::ACCEPTED)], AT_ONCE), vec![]);
        assert_eq!(t.plan([(2, SettlementOutcome(9))], AT_ONCE), vec![AckAction::Requeue(2)]);
    }

    #[test]
    fn a_requeue_with_a_delay_is_held_and_no_multiple_ack_covers_it_meanwhile() {
        let delay = RequeueDelay { first: Duration::from_millis(100), max: Duration::from_secs(1) };
        let mut t = AckTracker::default();
        t.delivered(1, 1);
        t.delivered(2, 3);
        t.delivered(3, 1);
        let plan = t.plan([(1, S::REJECTED_REQUEUE), (2, S::REJECTED_REQUEUE)], delay);
        assert_eq!(
            plan,
            vec![
                AckAction::RequeueAfter { tag: 1, delay: Duration::from_millis(100) },
                // Its third delivery: doubled twice.
                AckAction::RequeueAfter { tag: 2, delay: Duration::from_millis(400) },
            ]
        );
        assert_eq!(t.outstanding(), 3, "held messages are still unacknowledged");
        assert_eq!(t.held(), 2);
        // Accepting 3 while 1 and 2 are held: a multiple ack would delete them too.
        assert_eq!(t.plan([(3, S::ACCEPTED)], delay), vec![AckAction::Ack { tag: 3, multiple: false }]);
        // A held message is settled already: a second settlement is ignored.
        assert_eq!(t.plan([(1, S::ACCEPTED)], delay), vec![]);
        assert!(t.release(1));
        assert!(!t.release(1), "released once");
        assert_eq!(t.held(), 1);
        t.reset();
        assert!(!t.release(2), "the channel is gone: the broker has requeued it already");
        assert_eq!(t.outstanding(), 0);
    }
}

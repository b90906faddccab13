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

use comms_plugin_api::SettlementOutcome;
use std::collections::BTreeSet;

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
    /// `basic.reject(requeue = false)`: drop or dead-letter.
    Discard(u64),
}

/// The unsettled deliveries of one channel.
#[derive(Debug, Default)]
pub struct AckTracker {
    outstanding: BTreeSet<u64>,
}

impl AckTracker {
    /// Records a delivery handed towards the host. Tags arrive in increasing order.
    pub fn delivered(&mut self, tag: u64) {
        self.outstanding.insert(tag);
    }

    /// Forgets everything (the channel is gone; the broker requeued what was unsettled).
    pub fn reset(&mut self) {
        self.outstanding.clear();
    }

    /// Deliveries not settled yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// What to send for `settlements` (AMQP tags). Tags not outstanding (unknown, or settled
    /// already) are ignored: settling twice would make the broker close the channel. An outcome
    /// this version does not know is treated as a requeue, which loses nothing.
    pub fn plan(
        &mut self,
        settlements: impl IntoIterator<Item = (u64, SettlementOutcome)>,
    ) -> Vec<AckAction> {
        let mut actions = Vec::new();
        let mut accepted = Vec::new();
        for (tag, outcome) in settlements {
            if !self.outstanding.remove(&tag) {
                continue;
            }
            match outcome {
                SettlementOutcome::ACCEPTED => accepted.push(tag),
                SettlementOutcome::REJECTED_DISCARD => actions.push(AckAction::Discard(tag)),
                _ => actions.push(AckAction::Requeue(tag)),
            }
        }
        accepted.sort_unstable();
        let floor = self.outstanding.first().copied().unwrap_or(u64::MAX);
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
        tags.into_iter().for_each(|tag| tracker.delivered(tag));
        tracker
    }

    #[test]
    fn contiguous_accepts_become_one_multiple_ack() {
        let mut t = tracker(1..=5);
        assert_eq!(
            t.plan((1..=5).map(|tag| (tag, S::ACCEPTED))),
            vec![AckAction::Ack { tag: 5, multiple: true }]
        );
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_multiple_ack_never_covers_an_unsettled_tag() {
        let mut t = tracker(1..=6);
        // 3 is still with the host: 1 and 2 go together, 4 and 6 one by one.
        let plan = t.plan([(2, S::ACCEPTED), (1, S::ACCEPTED), (4, S::ACCEPTED), (6, S::ACCEPTED)]);
        assert_eq!(
            plan,
            vec![
                AckAction::Ack { tag: 2, multiple: true },
                AckAction::Ack { tag: 4, multiple: false },
                AckAction::Ack { tag: 6, multiple: false }
            ]
        );
        assert_eq!(
            t.plan([(3, S::ACCEPTED), (5, S::ACCEPTED)]),
            vec![AckAction::Ack { tag: 5, multiple: true }]
        );
    }

    #[test]
    fn rejections_go_out_before_the_acks_that_could_cover_them() {
        let mut t = tracker(1..=4);
        let plan =
            t.plan([(1, S::ACCEPTED), (2, S::REJECTED_REQUEUE), (3, S::REJECTED_DISCARD), (4, S::ACCEPTED)]);
        assert_eq!(
            plan,
            vec![AckAction::Requeue(2), AckAction::Discard(3), AckAction::Ack { tag: 4, multiple: true }]
        );
    }

    #[test]
    fn unknown_and_repeated_settlements_are_ignored() {
        let mut t = tracker([1, 2]);
        assert_eq!(t.plan([(9, S::ACCEPTED)]), vec![]);
        assert_eq!(t.plan([(1, S::ACCEPTED)]), vec![AckAction::Ack { tag: 1, multiple: false }]);
        assert_eq!(t.plan([(1, S::ACCEPTED)]), vec![]);
        assert_eq!(t.plan([(2, SettlementOutcome(9))]), vec![AckAction::Requeue(2)]);
    }
}

//! When a message the application gave back comes again: the delay before a message settled
//! [`SettlementOutcome::REJECTED_REQUEUE`](crate::SettlementOutcome) (`Received::nack` in the
//! host) is delivered again, for transports whose broker can hold a message back (a mailbox
//! row's lease, a JetStream negative acknowledgement with a delay).
//!
//! A handler that fails for a passing reason (a database restarting, a service not up yet)
//! would, with the message back at once, use up the message's deliveries within milliseconds
//! and send it to the dead letters. With a delay that doubles at each delivery, the deliveries
//! are spread out: from 1 s with a cap of 5 minutes, a message's first ten deliveries span
//! about 8.5 minutes (1 + 2 + 4 + ... + 256 s between them).
//!
//! One definition, so that every transport that offers it counts the same way: the delay after
//! a message's `n`-th delivery is `first × 2^(n−1)`, at most `max`; none when `first` is zero.

use std::time::Duration;

/// The delay before a requeued message comes again (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequeueDelay {
    /// After the first delivery; zero: requeued messages come again at once.
    pub first: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

/// Default of a transport's `requeue_delay_max_ms` key: 5 minutes.
pub const DEFAULT_MAX_MS: u64 = 300_000;

/// Largest accepted `requeue_delay_max_ms`: one day. A longer hold back is a schedule, not a
/// retry.
pub const LARGEST_MAX_MS: u64 = 86_400_000;

impl RequeueDelay {
    /// From a transport's `requeue_delay_ms` and `requeue_delay_max_ms` keys.
    pub fn from_millis(first_ms: u64, max_ms: u64) -> Self {
        Self { first: Duration::from_millis(first_ms), max: Duration::from_millis(max_ms) }
    }

    /// Whether requeued messages come again at once.
    pub fn is_immediate(&self) -> bool {
        self.first.is_zero()
    }

    /// The delay before a message requeued after its `deliveries`-th delivery (1-based; 0 counts
    /// as 1) comes again.
    pub fn after(&self, deliveries: u64) -> Duration {
        let doublings = u32::try_from(deliveries.saturating_sub(1)).unwrap_or(u32::MAX).min(31);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }

    /// Why the two keys do not fit together, if they do not: `(key, reason)`.
    pub fn check(first_ms: u64, max_ms: u64) -> Result<(), (&'static str, String)> {
        if max_ms > LARGEST_MAX_MS {
            return Err(("requeue_delay_max_ms", format!("must be at most {LARGEST_MAX_MS} (one day)")));
        }
        if first_ms > max_ms {
            return Err((
                "requeue_delay_ms",
                format!("must be at most requeue_delay_max_ms ({max_ms}); it is {first_ms}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_per_delivery_up_to_the_cap_and_zero_means_at_once() {
        let delay = RequeueDelay::from_millis(100, 1_000);
        let delays: Vec<u128> = (1..=6).map(|n| delay.after(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(delay.after(0), Duration::from_millis(100), "0 deliveries count as the first");
        assert_eq!(delay.after(u64::MAX), Duration::from_millis(1_000), "no overflow");
        let immediate = RequeueDelay::from_millis(0, DEFAULT_MAX_MS);
        assert!(immediate.is_immediate() && !delay.is_immediate());
        assert_eq!(immediate.after(5), Duration::ZERO);
    }

    #[test]
    fn keys_that_do_not_fit_together_are_named() {
        assert_eq!(RequeueDelay::check(0, DEFAULT_MAX_MS), Ok(()));
        assert_eq!(RequeueDelay::check(1_000, 1_000), Ok(()));
        assert_eq!(RequeueDelay::check(2_000, 1_000).unwrap_err().0, "requeue_delay_ms");
        assert_eq!(RequeueDelay::check(0, LARGEST_MAX_MS + 1).unwrap_err().0, "requeue_delay_max_ms");
    }
}

//! How long an idle receiver waits before it looks at the database again.
//!
//! A pure state machine (no clock, no database) so that the policy is tested on its own:
//! right after traffic the interval is `poll_min_ms`; each empty poll doubles it, up to
//! `poll_max_ms`, which is therefore the bound on the latency polling adds to a message written
//! by another process. A message written in this process wakes the receiver at once instead.

use std::time::Duration;

/// The adaptive poll interval of one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdaptiveInterval {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl AdaptiveInterval {
    /// Starts fast, at `min`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), current: min }
    }

    /// Messages were found: poll fast again.
    pub(crate) fn traffic(&mut self) {
        self.current = self.min;
    }

    /// Nothing was found: the delay before the next poll, after which the next delay doubles.
    pub(crate) fn idle(&mut self) -> Duration {
        let delay = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_while_idle_up_to_the_bound_and_resets_on_traffic() {
        let ms = Duration::from_millis;
        let mut interval = AdaptiveInterval::new(ms(1), ms(10));
        let delays: Vec<_> = (0..6).map(|_| interval.idle()).collect();
        assert_eq!(delays, [ms(1), ms(2), ms(4), ms(8), ms(10), ms(10)]);
        interval.traffic();
        assert_eq!(interval.idle(), ms(1));
    }
}

//! What happens to each message: decided from the config and a seeded RNG, without any I/O (the
//! layer, in `layer.rs`, does the sending).

use crate::FaultConfig;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Duration;

/// What happens to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultDecision {
    /// Not sent at all.
    Drop,
    /// Sent (see the crate documentation for the order of effects).
    Deliver {
        /// Sent twice.
        duplicate: bool,
        /// Sent this much later (zero when `hold` is set).
        delay: Duration,
        /// Held until the next message to the same address has been sent.
        hold: bool,
    },
}

/// Makes the decisions of one layer: the config and the RNG seeded with its `seed`.
#[derive(Debug)]
pub(crate) struct Decider {
    config: FaultConfig,
    rng: StdRng,
}

impl Decider {
    pub(crate) fn new(config: FaultConfig) -> Self {
        Self { rng: StdRng::seed_from_u64(config.seed), config }
    }

    /// The next decision: a pure function of the config and the RNG state. It always draws the
    /// same values, in the same order, so the sequence of decisions depends on the seed and the
    /// number of messages only (not on the rest of the config).
    pub(crate) fn next_decision(&mut self) -> FaultDecision {
        let config = &self.config;
        let rng = &mut self.rng;
        let drop_draw: f64 = rng.gen();
        let duplicate_draw: f64 = rng.gen();
        let reorder_draw: f64 = rng.gen();
        let jitter_draw: u64 = rng.gen();
        // `gen::<f64>()` is in [0, 1): probability 0 never fires, 1 always does.
        if drop_draw < config.drop {
            return FaultDecision::Drop;
        }
        let hold = reorder_draw < config.reorder;
        let delay = if hold {
            Duration::ZERO
        } else {
            // Uniform in 0..=jitter_ms; the modulo bias is below 2^-40 for any sensible jitter.
            let jitter = config.jitter_ms.checked_add(1).map_or(jitter_draw, |span| jitter_draw % span);
            Duration::from_millis(config.delay_ms.saturating_add(jitter))
        };
        FaultDecision::Deliver { duplicate: duplicate_draw < config.duplicate, delay, hold }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms_plugin_api::config::parse_config;

    /// The decision of a config without faults.
    const DELIVER_ONCE: FaultDecision =
        FaultDecision::Deliver { duplicate: false, delay: Duration::ZERO, hold: false };

    fn config(text: &str) -> FaultConfig {
        parse_config(text).unwrap()
    }

    fn decisions(config: &FaultConfig, n: usize) -> Vec<FaultDecision> {
        let mut decider = Decider::new(config.clone());
        (0..n).map(|_| decider.next_decision()).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_decisions() {
        let faults = config("drop = 0.2\nduplicate = 0.2\nreorder = 0.2\njitter_ms = 30\nseed = 42");
        let first = decisions(&faults, 1_000);
        assert_eq!(first, decisions(&faults, 1_000));
        let other_seed = FaultConfig { seed: 43, ..faults.clone() };
        assert_ne!(first, decisions(&other_seed, 1_000));
        // Every kind of decision occurs, so the comparisons above compare something.
        assert!(first.contains(&FaultDecision::Drop));
        assert!(first.iter().any(|d| matches!(d, FaultDecision::Deliver { hold: true, .. })));
        assert!(first.iter().any(|d| matches!(d, FaultDecision::Deliver { duplicate: true, .. })));
    }

    #[test]
    fn the_sequence_of_draws_does_not_depend_on_the_config() {
        // The same seed with more faults only adds faults: a message dropped at drop = 0.1 is
        // dropped at drop = 0.2 too, because the draws are the same.
        let light = decisions(&config("drop = 0.1\nseed = 3"), 1_000);
        let heavy = decisions(&config("drop = 0.2\nreorder = 0.3\nseed = 3"), 1_000);
        let dropped = |d: &[FaultDecision]| d.iter().filter(|d| **d == FaultDecision::Drop).count();
        assert!(dropped(&heavy) > dropped(&light));
        for (light, heavy) in light.iter().zip(&heavy) {
            if *light == FaultDecision::Drop {
                assert_eq!(*heavy, FaultDecision::Drop);
            }
        }
    }

    #[test]
    fn a_drop_rate_of_a_tenth_drops_a_tenth() {
        let dropped = decisions(&config("drop = 0.1\nseed = 1"), 100_000)
            .into_iter()
            .filter(|d| *d == FaultDecision::Drop)
            .count();
        assert!((9_000..=11_000).contains(&dropped), "{dropped} of 100000 dropped");
    }

    #[test]
    fn no_faults_means_every_message_once_and_at_once() {
        assert!(decisions(&FaultConfig::default(), 10_000).iter().all(|d| *d == DELIVER_ONCE));
        assert!(decisions(&config("seed = 99"), 1_000).iter().all(|d| *d == DELIVER_ONCE));
    }

    #[test]
    fn certain_faults_always_fire_and_holding_replaces_delay() {
        let all_dropped = decisions(&config("drop = 1.0\nduplicate = 1.0"), 1_000);
        assert!(all_dropped.iter().all(|d| *d == FaultDecision::Drop));
        let held = decisions(&config("duplicate = 1.0\nreorder = 1.0\ndelay_ms = 10"), 1_000);
        let expected = FaultDecision::Deliver { duplicate: true, delay: Duration::ZERO, hold: true };
        assert!(held.iter().all(|d| *d == expected));
    }

    #[test]
    fn delay_is_uniform_between_delay_and_delay_plus_jitter() {
        let delays: Vec<u128> = decisions(&config("delay_ms = 20\njitter_ms = 10\nseed = 5"), 10_000)
            .into_iter()
            .map(|d| match d {
                FaultDecision::Deliver { delay, duplicate: false, hold: false } => delay.as_millis(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(delays.iter().min(), Some(&20));
        assert_eq!(delays.iter().max(), Some(&30));
        let tens = delays.iter().filter(|d| **d == 30).count();
        assert!((700..=1_100).contains(&tens), "each of 11 values about 1/11 of the time: {tens}");
        // The largest jitter does not overflow.
        let mut forever =
            Decider::new(FaultConfig { delay_ms: u64::MAX, jitter_ms: u64::MAX, ..FaultConfig::default() });
        assert!(
            matches!(forever.next_decision(), FaultDecision::Deliver { delay, .. } if delay.as_millis() == u128::from(u64::MAX))
        );
    }
}

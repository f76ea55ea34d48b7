//! Exponential backoff between restarts of a whole shard.
//!
//! A shard that exceeded its intensity is restarted after a delay that grows with each
//! consecutive attempt, so a crash loop costs a bounded amount of work per unit of time instead
//! of spinning. The runtime keeps the attempt number; this module only computes the delay.

use std::time::Duration;

/// Exponential backoff: initial * factor^attempt, capped at max. attempt starts at 0.
///
/// A `factor` below 1 shrinks the delay; a `factor` that is not a finite number, or a product
/// that overflows, yields `max`. The delay is never above `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay before the first attempt (attempt 0).
    pub initial: Duration,
    /// The cap: no delay is ever longer.
    pub max: Duration,
    /// How much each attempt multiplies the delay by.
    pub factor: f64,
}

impl Backoff {
    /// The delay before restart attempt `attempt` (0 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let seconds = self.initial.as_secs_f64() * self.factor.powf(f64::from(attempt));
        // NaN, ∞ and anything past the cap all become the cap; a negative product (a negative
        // factor with an odd attempt) is meaningless and becomes zero.
        if seconds.is_nan() {
            return self.max;
        }
        match Duration::try_from_secs_f64(seconds.max(0.0)) {
            Ok(delay) => delay.min(self.max),
            Err(_) => self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(initial_ms: u64, max_ms: u64, factor: f64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            factor,
        }
    }

    #[test]
    fn attempt_zero_waits_the_initial_delay() {
        assert_eq!(
            backoff(100, 10_000, 2.0).delay(0),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn each_attempt_multiplies_the_delay_by_the_factor() {
        let b = backoff(100, 10_000, 2.0);
        let delays: Vec<u64> = (0..6).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200]);
        let b = backoff(100, 10_000, 1.5);
        assert_eq!(b.delay(2), Duration::from_millis(225));
    }

    #[test]
    fn the_delay_is_capped_at_max() {
        let b = backoff(100, 1_000, 2.0);
        assert_eq!(b.delay(3), Duration::from_millis(800));
        assert_eq!(b.delay(4), Duration::from_millis(1_000));
        assert_eq!(b.delay(5), Duration::from_millis(1_000));
    }

    #[test]
    fn huge_attempts_stay_at_the_cap_without_overflowing() {
        let b = backoff(100, 30_000, 2.0);
        assert_eq!(b.delay(1_000), Duration::from_millis(30_000));
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(30_000));
    }

    #[test]
    fn an_initial_delay_above_max_is_capped() {
        assert_eq!(
            backoff(5_000, 1_000, 2.0).delay(0),
            Duration::from_millis(1_000)
        );
    }

    #[test]
    fn factor_one_keeps_the_delay_constant() {
        let b = backoff(250, 10_000, 1.0);
        assert_eq!(b.delay(0), b.delay(50));
    }

    #[test]
    fn a_factor_that_is_not_a_number_yields_the_cap() {
        assert_eq!(
            backoff(100, 1_000, f64::NAN).delay(1),
            Duration::from_millis(1_000)
        );
        assert_eq!(
            backoff(100, 1_000, f64::INFINITY).delay(1),
            Duration::from_millis(1_000)
        );
        assert_eq!(backoff(100, 1_000, -2.0).delay(1), Duration::ZERO);
    }
}

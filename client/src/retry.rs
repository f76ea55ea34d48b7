//! [`RetryPolicy`]: how [`Client`](crate::Client) retries a request the server answered with
//! `UNAVAILABLE` (shutting down, a shard restarting, a broken connection).
//!
//! Every retry carries the request id of the first attempt, so a request that did commit
//! before the connection broke is answered from the server's stored reply rather than run
//! twice. Only `UNAVAILABLE` is retried: any other answer is the request's outcome.
//!
//! The schedule is exponential backoff with jitter: before retry *n* the client waits a
//! random time between half and all of `initial_backoff · 2^(n-1)`, capped at `max_backoff`.
//! Attempts are bounded by `max_attempts` and never outlast the client's timeout: a retry
//! that could not start before the deadline is not made, and each attempt's `grpc-timeout`
//! is what remains of it.

use std::time::Duration;

use tonic::Code;

/// How many attempts (the first included) [`RetryPolicy::default`] makes.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The nominal wait before the first retry in [`RetryPolicy::default`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// The longest nominal wait between attempts in [`RetryPolicy::default`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// When and how often to retry a request answered with `UNAVAILABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 (or 0) means no retry.
    pub max_attempts: u32,
    /// The nominal wait before the first retry; it doubles for each later one.
    pub initial_backoff: Duration,
    /// The cap on the nominal wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// [`DEFAULT_MAX_ATTEMPTS`] attempts, waiting 50 ms, 100 ms, 200 ms, … (capped at 1 s),
    /// each with jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The default backoff with `max_attempts` attempts in all.
    pub fn with_max_attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        }
    }

    /// Whether a failure with `code` is retried: only `UNAVAILABLE` is.
    pub fn retries(code: Code) -> bool {
        code == Code::Unavailable
    }

    /// The nominal wait (before jitter) before retry number `retry` (1 for the first
    /// retry): `initial_backoff · 2^(retry-1)`, capped at `max_backoff`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.initial_backoff
            .checked_mul(1 << doublings)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// The nominal waits of every retry this policy allows, in order.
    pub fn schedule(&self) -> Vec<Duration> {
        (1..self.max_attempts.max(1))
            .map(|retry| self.backoff(retry))
            .collect()
    }

    /// Decides what to do after attempt number `attempts` (1-based) failed with `code`:
    /// `Some(wait)` to retry after `wait`, `None` to give up. `remaining` is the time left
    /// before the call's deadline (`None`: no deadline); `jitter` in `[0, 1]` picks the wait
    /// between half and all of the nominal backoff. A pure function, so the schedule is
    /// testable without clocks.
    pub fn next_wait(
        &self,
        attempts: u32,
        code: Code,
        remaining: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if !Self::retries(code) || attempts >= self.max_attempts {
            return None;
        }
        let nominal = self.backoff(attempts);
        let wait = nominal.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        match remaining {
            // A retry must start, and have some time to run, before the deadline.
            Some(remaining) if wait >= remaining => None,
            _ => Some(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_default_schedule_doubles_from_50_ms_and_is_capped_at_1_s() {
        assert_eq!(
            RetryPolicy::default().schedule(),
            vec![MS(50), MS(100), MS(200), MS(400)]
        );
        let long = RetryPolicy::with_max_attempts(9);
        assert_eq!(
            long.schedule(),
            vec![
                MS(50),
                MS(100),
                MS(200),
                MS(400),
                MS(800),
                MS(1000),
                MS(1000),
                MS(1000)
            ]
        );
        assert_eq!(long.backoff(u32::MAX), MS(1000));
        assert!(RetryPolicy::none().schedule().is_empty());
        assert!(RetryPolicy::with_max_attempts(0).schedule().is_empty());
    }

    #[test]
    fn jitter_waits_between_half_and_all_of_the_backoff() {
        let policy = RetryPolicy::default();
        let wait = |jitter| policy.next_wait(3, Code::Unavailable, None, jitter);
        assert_eq!(wait(0.0), Some(MS(100)));
        assert_eq!(wait(1.0), Some(MS(200)));
        assert_eq!(wait(0.5), Some(MS(150)));
        assert_eq!(wait(7.0), Some(MS(200)), "jitter is clamped");
    }

    #[test]
    fn only_unavailable_is_retried() {
        let policy = RetryPolicy::default();
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::Aborted,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Internal,
            Code::DataLoss,
        ] {
            assert_eq!(policy.next_wait(1, code, None, 0.0), None, "{code:?}");
        }
        assert!(policy.next_wait(1, Code::Unavailable, None, 0.0).is_some());
    }

    #[test]
    fn attempts_are_bounded() {
        let policy = RetryPolicy::default();
        assert!(policy.next_wait(4, Code::Unavailable, None, 0.0).is_some());
        assert_eq!(policy.next_wait(5, Code::Unavailable, None, 0.0), None);
        assert_eq!(
            RetryPolicy::none().next_wait(1, Code::Unavailable, None, 0.0),
            None
        );
    }

    #[test]
    fn no_retry_starts_at_or_past_the_deadline() {
        let policy = RetryPolicy::default();
        // Retry 1 waits 25..=50 ms.
        assert_eq!(
            policy.next_wait(1, Code::Unavailable, Some(MS(30)), 1.0),
            None
        );
        assert_eq!(
            policy.next_wait(1, Code::Unavailable, Some(MS(30)), 0.0),
            Some(MS(25))
        );
        assert_eq!(
            policy.next_wait(1, Code::Unavailable, Some(Duration::ZERO), 0.0),
            None
        );
    }
}

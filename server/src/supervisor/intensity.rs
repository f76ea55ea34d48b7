//! Restart intensity: how many restarts a supervisor tolerates before it gives up.
//!
//! OTP's rule (`supervisor:add_restart/1`): every restart is recorded with its time; the
//! restarts older than the period are forgotten; if more than `max_restarts` remain, the
//! supervisor stops all its children and exits, and its parent decides. [`RestartWindow`] is
//! that record, with the time passed in so it can be tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most `max_restarts` restarts within any `max_seconds` window (OTP's MaxR/MaxT).
///
/// `max_restarts = 0` means no restart at all is tolerated: the first one escalates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Intensity {
    /// The restarts tolerated inside the window (OTP's `intensity`, MaxR).
    pub max_restarts: u32,
    /// The length of the window in seconds (OTP's `period`, MaxT).
    pub max_seconds: u64,
}

impl Intensity {
    /// The length of the window as a [`Duration`].
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.max_seconds)
    }
}

impl Default for Intensity {
    /// OTP's defaults: one restart in five seconds.
    fn default() -> Self {
        Intensity {
            max_restarts: 1,
            max_seconds: 5,
        }
    }
}

/// The restarts recorded within the sliding window.
///
/// **Bound**: it keeps at most `max_restarts + 1` instants. Older ones cannot change any future
/// decision (the decision only asks whether more than `max_restarts` are inside the window, and
/// the newest ones are the last to leave it), so [`RestartWindow::count`] saturates there.
#[derive(Debug, Clone)]
pub struct RestartWindow {
    intensity: Intensity,
    /// Restart times, oldest first; never decreasing (see [`RestartWindow::record`]).
    restarts: VecDeque<Instant>,
}

impl RestartWindow {
    /// An empty window enforcing `intensity`.
    pub fn new(intensity: Intensity) -> Self {
        RestartWindow {
            intensity,
            restarts: VecDeque::new(),
        }
    }

    /// The intensity this window enforces.
    pub fn intensity(&self) -> Intensity {
        self.intensity
    }

    /// Records a restart at `now`. Returns `false` when this restart exceeds the intensity
    /// (more than max_restarts within max_seconds, as OTP counts), i.e. the caller must escalate.
    ///
    /// The restart is recorded even when it exceeds the intensity, as OTP does. A `now` earlier
    /// than the latest recorded restart is taken as that restart's time, so the record stays
    /// ordered whatever the caller's clocks do.
    pub fn record(&mut self, now: Instant) -> bool {
        let now = match self.restarts.back() {
            Some(&latest) if latest > now => latest,
            _ => now,
        };
        self.forget_older_than_window(now);
        self.restarts.push_back(now);
        // OTP: "If more than MaxR restarts occur within MaxT seconds, the supervisor terminates";
        // the restart being recorded counts, so MaxR restarts pass and restart MaxR + 1 fails.
        // With MaxR = 0 the very first restart fails.
        let within_intensity = self.restarts.len() <= self.max_restarts();
        // Keep the bound: only the newest `max_restarts + 1` can matter to later decisions.
        while self.restarts.len() > self.max_kept() {
            self.restarts.pop_front();
        }
        debug_assert!(self
            .restarts
            .iter()
            .zip(self.restarts.iter().skip(1))
            .all(|(a, b)| a <= b));
        within_intensity
    }

    /// Restarts currently inside the window.
    pub fn count(&self, now: Instant) -> usize {
        self.restarts
            .iter()
            .filter(|&&at| self.is_inside_window(at, now))
            .count()
    }

    /// Forgets every recorded restart (the supervisor itself was restarted, or an operator
    /// cleared it).
    pub fn clear(&mut self) {
        self.restarts.clear();
    }

    /// OTP keeps a restart while `now - at <= period` (`R >= Now - Period`): a restart exactly
    /// `max_seconds` old still counts.
    fn is_inside_window(&self, at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(at) <= self.intensity.window()
    }

    fn forget_older_than_window(&mut self, now: Instant) {
        while let Some(&oldest) = self.restarts.front() {
            if self.is_inside_window(oldest, now) {
                break;
            }
            self.restarts.pop_front();
        }
    }

    fn max_restarts(&self) -> usize {
        usize::try_from(self.intensity.max_restarts).unwrap_or(usize::MAX)
    }

    /// The most restarts worth keeping: `max_restarts + 1`.
    fn max_kept(&self) -> usize {
        self.max_restarts().saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intensity(max_restarts: u32, max_seconds: u64) -> Intensity {
        Intensity {
            max_restarts,
            max_seconds,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn exactly_max_restarts_within_max_seconds_are_allowed() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(3, 10));
        assert!(window.record(t0));
        assert!(window.record(t0 + secs(1)));
        assert!(window.record(t0 + secs(2)));
        assert_eq!(window.count(t0 + secs(2)), 3);
    }

    #[test]
    fn the_restart_after_max_restarts_within_max_seconds_escalates() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(3, 10));
        for i in 0..3 {
            assert!(window.record(t0 + secs(i)));
        }
        assert!(!window.record(t0 + secs(3)));
    }

    #[test]
    fn restarts_at_the_same_instant_each_count() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(2, 10));
        assert!(window.record(t0));
        assert!(window.record(t0));
        assert!(!window.record(t0));
    }

    #[test]
    fn restarts_older_than_max_seconds_fall_out_of_the_window() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(2, 10));
        assert!(window.record(t0));
        assert!(window.record(t0 + secs(1)));
        // At t0 + 11 s the restart at t0 is 11 s old: outside the 10 s window.
        assert_eq!(window.count(t0 + secs(11)), 1);
        assert!(window.record(t0 + secs(11)));
        // At t0 + 12 s the restart at t0 + 1 s is 11 s old too.
        assert!(window.record(t0 + secs(12)));
        assert!(!window.record(t0 + secs(13)));
    }

    #[test]
    fn a_restart_exactly_max_seconds_old_is_still_inside_the_window() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(1, 10));
        assert!(window.record(t0));
        assert_eq!(window.count(t0 + secs(10)), 1);
        assert!(!window.record(t0 + secs(10)));
        let mut window = RestartWindow::new(intensity(1, 10));
        assert!(window.record(t0));
        assert!(window.record(t0 + secs(10) + Duration::from_nanos(1)));
    }

    #[test]
    fn restarts_spaced_wider_than_the_window_never_escalate() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(1, 5));
        for i in 0..100 {
            assert!(window.record(t0 + secs(6 * i)), "restart {i}");
        }
    }

    #[test]
    fn max_restarts_zero_escalates_the_first_restart() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(0, 5));
        assert!(!window.record(t0));
        // ...and every later one, even far apart.
        assert!(!window.record(t0 + secs(3600)));
    }

    #[test]
    fn clear_forgets_every_restart() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(1, 60));
        assert!(window.record(t0));
        assert!(!window.record(t0 + secs(1)));
        window.clear();
        assert_eq!(window.count(t0 + secs(1)), 0);
        assert!(window.record(t0 + secs(2)));
    }

    #[test]
    fn the_window_keeps_at_most_max_restarts_plus_one_instants() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(3, 3600));
        for i in 0..1000 {
            let _ = window.record(t0 + Duration::from_millis(i));
        }
        assert_eq!(window.restarts.len(), 4);
        assert_eq!(window.count(t0 + secs(1)), 4);
        // Dropping the older ones changed no decision: still over the limit.
        assert!(!window.record(t0 + secs(2)));
    }

    #[test]
    fn an_instant_earlier_than_the_latest_restart_counts_as_the_latest() {
        let t0 = Instant::now();
        let mut window = RestartWindow::new(intensity(5, 10));
        assert!(window.record(t0 + secs(20)));
        assert!(window.record(t0));
        assert_eq!(window.count(t0 + secs(20)), 2);
        assert_eq!(window.count(t0 + secs(31)), 0);
    }

    #[test]
    fn default_intensity_is_otps_one_restart_in_five_seconds() {
        assert_eq!(Intensity::default(), intensity(1, 5));
        let parsed: Intensity =
            serde_json::from_str(r#"{"max_restarts": 3, "max_seconds": 7}"#).unwrap();
        assert_eq!(parsed, intensity(3, 7));
    }
}

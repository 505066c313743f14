//! When a vendor call counts as a straggler: slower than this worker's calls usually are.
//!
//! A round of vendor calls hands off a chunk still running after its straggler limit (see
//! `Dispatcher::run_chunks`): `SLOWER_THAN_USUAL` times the median duration of the worker's
//! recent chunks, at least `dispatch.handoff_min`, at most `dispatch.handoff_after`. So a slow
//! account's calls are handed off about `handoff_min` into their round while the calls to
//! healthy accounts finish in it; a worker whose every call is slow waits `handoff_after`.
//! A worker with no finished chunk yet (just started) has no usual to compare with and takes
//! the floor, `handoff_min`: its first round is not held up to `handoff_after` by one hanging
//! vendor, at the price of handing off calls slower than the floor once.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// How many times the median a chunk may run before it is a straggler.
const SLOWER_THAN_USUAL: u32 = 8;

/// How many recent chunk durations the median is taken over.
const KEPT: usize = 256;

/// The durations of a worker's recent chunks of vendor calls.
#[derive(Default)]
pub struct CallTimes {
    recent: Mutex<VecDeque<Duration>>,
}

impl CallTimes {
    /// Counts a chunk that ran for `took` (finished in its round or handed off).
    pub fn record(&self, took: Duration) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// The median of the recent durations; `None` before the first.
    fn median(&self) -> Option<Duration> {
        let mut recent: Vec<Duration> = {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.iter().copied().collect()
        };
        if recent.is_empty() {
            return None;
        }
        let middle = recent.len() / 2;
        Some(*recent.select_nth_unstable(middle).1)
    }

    /// How long a chunk may run before it is handed off: `SLOWER_THAN_USUAL` times the median,
    /// within `[min, max]`; `min` (or `max`, if lower) before any chunk has finished.
    pub fn straggler_limit(&self, min: Duration, max: Duration) -> Duration {
        let floor = min.min(max);
        match self.median() {
            Some(median) => median.saturating_mul(SLOWER_THAN_USUAL).clamp(floor, max),
            None => floor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(5);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn without_history_the_limit_is_the_floor() {
        assert_eq!(CallTimes::default().straggler_limit(MIN, MAX), MIN);
        assert_eq!(CallTimes::default().straggler_limit(MAX * 2, MAX), MAX);
    }

    #[test]
    fn the_limit_is_eight_medians_within_its_bounds() {
        let times = CallTimes::default();
        for took in [20, 30, 40] {
            times.record(ms(took));
        }
        // 8 × 30 ms is under the floor.
        assert_eq!(times.straggler_limit(MIN, MAX), MIN);
        assert_eq!(times.straggler_limit(ms(100), MAX), ms(240));
        for _ in 0..4 {
            times.record(ms(400));
        }
        // Median 400 ms: 3.2 s.
        assert_eq!(times.straggler_limit(MIN, MAX), ms(3_200));
        for _ in 0..10 {
            times.record(Duration::from_secs(30));
        }
        assert_eq!(times.straggler_limit(MIN, MAX), MAX);
        // A floor above the ceiling gives way to it.
        assert_eq!(times.straggler_limit(MAX * 2, MAX), MAX);
    }

    #[test]
    fn only_the_recent_durations_count() {
        let times = CallTimes::default();
        for _ in 0..KEPT {
            times.record(Duration::from_secs(30));
        }
        for _ in 0..KEPT / 2 + 1 {
            times.record(ms(10));
        }
        assert_eq!(times.median(), Some(ms(10)));
        assert_eq!(times.straggler_limit(MIN, MAX), MIN);
    }
}

//! Circuit breakers: one per vendor account in each dispatch worker, driven by the account's
//! live failure rate and latency.
//!
//! - **Closed**: calls go through and are counted over a sliding window (`window`, in ten
//!   buckets). Once the window holds `min_calls` calls and the failed share reaches
//!   `failure_rate`, or the slow share `slow_rate`, the breaker opens; it also opens after
//!   `consecutive_failures` failed calls in a row (a vendor that stops answering after a busy
//!   spell would otherwise stay in until the spell's successes left the window).
//! - **Open**: no call is made for `open_for`; a message that would use the account goes to the
//!   next account of its route, or waits (`circuit_open`) when every one is open.
//! - **Half-open**: `probes` calls go through. All of them succeeding closes the breaker with an
//!   empty window; one failing (or slow) reopens it for another `open_for`.
//!
//! Breakers are per process: each worker learns an account's health from its own calls, so a
//! failing vendor is taken out by every worker within its first `min_calls` calls.

use herald_core::config::BreakerConfig;
use herald_core::telemetry::{AccountLabel, Metrics};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Buckets of the sliding window.
const BUCKETS: u64 = 10;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of the `herald_breaker_state` gauge.
    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// Whether a call to an account may be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The breaker is open (or its probes are out): ask again after this.
    Refused {
        retry_in: Duration,
    },
}

/// Calls counted in one bucket of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-length slot since the breakers' origin these counts belong to.
    slot: u64,
    calls: u32,
    failed: u32,
    slow: u32,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        since: Instant,
        admitted: u32,
        succeeded: u32,
    },
}

#[derive(Debug)]
struct Breaker {
    phase: Phase,
    buckets: [Bucket; BUCKETS as usize],
    /// Failed calls since the last healthy one.
    failed_in_a_row: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            phase: Phase::Closed,
            buckets: [Bucket::default(); BUCKETS as usize],
            failed_in_a_row: 0,
        }
    }
}

/// The breakers of one dispatch worker.
pub struct Breakers {
    config: BreakerConfig,
    /// Buckets are numbered by bucket-length slots since this instant.
    origin: Instant,
    accounts: Mutex<HashMap<i64, Breaker>>,
    metrics: Arc<Metrics>,
}

impl Breakers {
    /// Breakers configured by `config`, reporting their state in `metrics`.
    pub fn new(config: BreakerConfig, metrics: Arc<Metrics>) -> Self {
        Breakers {
            config,
            origin: Instant::now(),
            accounts: Mutex::default(),
            metrics,
        }
    }

    /// Whether `account` may be called now; a half-open breaker counts the probe it lets through.
    pub fn admit(&self, account: i64) -> Admission {
        self.admit_at(account, Instant::now())
    }

    /// Counts one call to `account`: `healthy` when the vendor answered (a refusal of the
    /// receiver or the content included), and how long it took.
    pub fn record(&self, account: i64, healthy: bool, latency: Duration) {
        self.record_at(account, healthy, latency, Instant::now());
    }

    /// The breaker's state for `account`.
    pub fn state(&self, account: i64) -> BreakerState {
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts
            .get(&account)
            .map_or(BreakerState::Closed, |b| state_of(b.phase))
    }

    fn admit_at(&self, account: i64, now: Instant) -> Admission {
        if !self.config.enabled {
            return Admission::Call;
        }
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let b = accounts.entry(account).or_default();
        let probe_wait = self.config.open_for.min(Duration::from_secs(1));
        let admission = match &mut b.phase {
            Phase::Closed => Admission::Call,
            Phase::Open { until } if now < *until => Admission::Refused {
                retry_in: *until - now,
            },
            Phase::HalfOpen { admitted, .. } if *admitted < self.config.probes.max(1) => {
                *admitted += 1;
                Admission::Call
            }
            // Probes out and not back within `open_for` (a call that never reported): a fresh
            // set of probes.
            Phase::HalfOpen { since, .. } if now.duration_since(*since) < self.config.open_for => {
                Admission::Refused {
                    retry_in: probe_wait,
                }
            }
            Phase::Open { .. } | Phase::HalfOpen { .. } => {
                b.phase = Phase::HalfOpen {
                    since: now,
                    admitted: 1,
                    succeeded: 0,
                };
                Admission::Call
            }
        };
        self.report(account, b.phase);
        admission
    }

    fn record_at(&self, account: i64, healthy: bool, latency: Duration, now: Instant) {
        if !self.config.enabled {
            return;
        }
        let c = &self.config;
        let slow = latency >= c.slow_call;
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let b = accounts.entry(account).or_default();
        let reopen = Phase::Open {
            until: now + c.open_for,
        };
        b.failed_in_a_row = if healthy { 0 } else { b.failed_in_a_row + 1 };
        match &mut b.phase {
            Phase::Closed => {
                let slot = self.slot(now);
                let bucket = &mut b.buckets[(slot % BUCKETS) as usize];
                if bucket.slot != slot {
                    *bucket = Bucket {
                        slot,
                        ..Bucket::default()
                    };
                }
                bucket.calls += 1;
                bucket.failed += u32::from(!healthy);
                bucket.slow += u32::from(slow);
                let live = b
                    .buckets
                    .iter()
                    .filter(|k| k.slot + BUCKETS > slot && k.slot <= slot);
                let (calls, failed, slow) = live.fold((0u32, 0u32, 0u32), |(n, f, s), k| {
                    (n + k.calls, f + k.failed, s + k.slow)
                });
                let share = |x: u32| f64::from(x) / f64::from(calls);
                let in_a_row =
                    c.consecutive_failures > 0 && b.failed_in_a_row >= c.consecutive_failures;
                if in_a_row
                    || (calls >= c.min_calls.max(1)
                        && (share(failed) >= c.failure_rate || share(slow) >= c.slow_rate))
                {
                    tracing::warn!(
                        account,
                        calls,
                        failed,
                        slow,
                        in_a_row = b.failed_in_a_row,
                        "circuit breaker opened for a vendor account"
                    );
                    b.phase = reopen;
                    b.buckets = [Bucket::default(); BUCKETS as usize];
                    b.failed_in_a_row = 0;
                }
            }
            Phase::HalfOpen { succeeded, .. } => {
                if !healthy || slow {
                    tracing::warn!(account, "probe failed: circuit breaker open again");
                    b.phase = reopen;
                } else {
                    *succeeded += 1;
                    if *succeeded >= c.probes.max(1) {
                        tracing::info!(account, "probes succeeded: circuit breaker closed");
                        b.phase = Phase::Closed;
                        b.buckets = [Bucket::default(); BUCKETS as usize];
                    }
                }
            }
            // A call let through before the breaker opened.
            Phase::Open { .. } => {}
        }
        self.report(account, b.phase);
    }

    /// The bucket-length slot `now` falls in.
    fn slot(&self, now: Instant) -> u64 {
        let bucket = (self.config.window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.duration_since(self.origin).as_nanos() / bucket.as_nanos()) as u64 + BUCKETS
    }

    fn report(&self, account: i64, phase: Phase) {
        self.metrics
            .breaker_state
            .get_or_create(&AccountLabel {
                account_id: account,
            })
            .set(state_of(phase).gauge());
    }
}

fn state_of(phase: Phase) -> BreakerState {
    match phase {
        Phase::Closed => BreakerState::Closed,
        Phase::Open { .. } => BreakerState::Open,
        Phase::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn breakers() -> (Breakers, Instant) {
        let config = BreakerConfig {
            enabled: true,
            window: Duration::from_secs(10),
            min_calls: 10,
            failure_rate: 0.5,
            consecutive_failures: 0,
            slow_call: Duration::from_secs(2),
            slow_rate: 0.8,
            open_for: Duration::from_secs(5),
            probes: 2,
        };
        let b = Breakers::new(config, Metrics::new());
        let t0 = b.origin;
        (b, t0)
    }

    #[test]
    fn opens_at_the_failure_rate_only_after_min_calls() {
        let (b, t0) = breakers();
        // 9 failures: below min_calls, still closed.
        for k in 0..9u32 {
            b.record_at(1, false, MS, t0 + k * 10 * MS);
        }
        assert_eq!(b.state(1), BreakerState::Closed);
        assert_eq!(b.admit_at(1, t0 + 100 * MS), Admission::Call);
        b.record_at(1, false, MS, t0 + 100 * MS);
        assert_eq!(b.state(1), BreakerState::Open);
        match b.admit_at(1, t0 + 1100 * MS) {
            Admission::Refused { retry_in } => assert_eq!(retry_in, 4 * 1000 * MS),
            a => panic!("{a:?}"),
        }
        // Other accounts are not affected.
        assert_eq!(b.admit_at(2, t0 + 1100 * MS), Admission::Call);
    }

    #[test]
    fn opens_after_failures_in_a_row_even_when_the_window_is_mostly_successes() {
        let (mut b, t0) = breakers();
        b.config.consecutive_failures = 3;
        for k in 0..100u32 {
            b.record_at(1, true, MS, t0 + k * MS);
        }
        // Two failures, a success, two more: never three in a row.
        for (k, healthy) in [false, false, true, false, false].into_iter().enumerate() {
            b.record_at(1, healthy, MS, t0 + (200 + k as u32) * MS);
        }
        assert_eq!(b.state(1), BreakerState::Closed);
        b.record_at(1, false, MS, t0 + 300 * MS);
        assert_eq!(b.state(1), BreakerState::Open);
    }

    #[test]
    fn stays_closed_below_the_failure_rate() {
        let (b, t0) = breakers();
        for k in 0..100u32 {
            // The last 2 of every 5 fail: 40% of the window at most, never 50%.
            b.record_at(1, k % 5 < 3, MS, t0 + k * 10 * MS);
        }
        assert_eq!(b.state(1), BreakerState::Closed);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let (b, t0) = breakers();
        for k in 0..9u32 {
            b.record_at(1, false, MS, t0 + k * MS);
        }
        // 11 s later the nine failures are out of the 10 s window: one more does not open it.
        b.record_at(1, false, MS, t0 + 11_000 * MS);
        assert_eq!(b.state(1), BreakerState::Closed);
    }

    #[test]
    fn slow_calls_open_it_too() {
        let (b, t0) = breakers();
        for k in 0..10u32 {
            b.record_at(1, true, 3000 * MS, t0 + k * MS);
        }
        assert_eq!(b.state(1), BreakerState::Open);
    }

    #[test]
    fn half_open_probes_close_it_or_reopen_it() {
        let (b, t0) = breakers();
        for k in 0..10u32 {
            b.record_at(1, false, MS, t0 + k * MS);
        }
        let later = t0 + 5100 * MS;
        // Two probes, then refusals until they report.
        assert_eq!(b.admit_at(1, later), Admission::Call);
        assert_eq!(b.state(1), BreakerState::HalfOpen);
        assert_eq!(b.admit_at(1, later), Admission::Call);
        assert!(matches!(b.admit_at(1, later), Admission::Refused { .. }));
        b.record_at(1, true, MS, later);
        b.record_at(1, false, MS, later);
        assert_eq!(b.state(1), BreakerState::Open, "one failed probe reopens");

        let again = later + 5100 * MS;
        assert_eq!(b.admit_at(1, again), Admission::Call);
        assert_eq!(b.admit_at(1, again), Admission::Call);
        b.record_at(1, true, MS, again);
        b.record_at(1, true, MS, again);
        assert_eq!(b.state(1), BreakerState::Closed);
        // With an empty window: nine failures do not reopen it.
        for k in 0..9u32 {
            b.record_at(1, false, MS, again + k * MS);
        }
        assert_eq!(b.state(1), BreakerState::Closed);
    }

    #[test]
    fn probes_that_never_report_are_replaced() {
        let (b, t0) = breakers();
        for k in 0..10u32 {
            b.record_at(1, false, MS, t0 + k * MS);
        }
        let later = t0 + 5100 * MS;
        assert_eq!(b.admit_at(1, later), Admission::Call);
        assert_eq!(b.admit_at(1, later), Admission::Call);
        assert!(matches!(
            b.admit_at(1, later + 1000 * MS),
            Admission::Refused { .. }
        ));
        assert_eq!(b.admit_at(1, later + 5100 * MS), Admission::Call);
    }

    #[test]
    fn disabled_breakers_always_call() {
        let (mut b, t0) = breakers();
        b.config.enabled = false;
        for k in 0..50u32 {
            b.record_at(1, false, MS, t0 + k * MS);
        }
        assert_eq!(b.admit_at(1, t0), Admission::Call);
        assert_eq!(b.state(1), BreakerState::Closed);
    }
}

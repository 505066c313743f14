//! Rate limits per vendor account, held by every dispatch worker together.
//!
//! A worker reserves slots on the account's timeline in the store (`Store::reserve_rate`) a
//! chunk at a time (50 ms of the limit), hands them to its calls in order and makes each call
//! wait for its slot. A message whose lane may not join the queue yet polls until it may. A
//! message that would wait longer than `dispatch.rate_wait` — counting the messages queued
//! before it in this worker — is not held: it goes to the schedule until its estimated turn
//! (`rate_limited`), so that one batch of marketing never holds up the next batch's auth codes.

use herald_core::MsgType;
use herald_core::policy::rate_limits::{horizon, lane_rank};
use herald_core::store::{Reservation, Store, StoreError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Slots reserved per store round trip: this much of the limit's time.
const CHUNK: Duration = Duration::from_millis(50);
/// Time left unused that is still given: the largest burst after an idle spell.
const BURST: Duration = Duration::from_millis(250);
/// Longest pause before asking the store again while the lane may not join the queue.
const POLL: Duration = Duration::from_millis(20);

/// What a caller got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The slots are taken; the call may go now. How long it waited for them.
    Now { waited: Duration },
    /// Waiting would take longer than allowed: come back at about this time.
    Later { at: chrono::DateTime<chrono::Utc> },
}

/// A run of reserved slots: one every `interval_us`, the next at `next_us`.
#[derive(Debug, Clone, Copy)]
struct Run {
    next_us: i64,
    interval_us: i64,
    left: u32,
    /// When the store granted it (unix µs).
    granted_us: i64,
}

/// Reserved slots of one account in this worker.
#[derive(Default)]
struct Slots {
    runs: VecDeque<Run>,
}

impl Slots {
    fn left(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.left)).sum()
    }

    /// Forgets the slots of runs granted more than `burst_us` before `now_us` whose time is more
    /// than `burst_us` past: kept unused that long, they would add to the next burst. A run
    /// granted since keeps its slots, however old their time: the store hands out slots from
    /// `burst_us` before the reservation, and judged by a clock read after the round trip
    /// they would be stale at once when the limit is high (a run of a thousand slots at a
    /// million a second spans a millisecond), and every caller would reserve again and again.
    fn drop_stale(&mut self, now_us: i64, burst_us: i64) {
        let oldest_us = now_us - burst_us;
        for run in &mut self.runs {
            if run.granted_us < oldest_us && run.next_us < oldest_us && run.left > 0 {
                let stale =
                    ((oldest_us - run.next_us) / run.interval_us + 1).min(i64::from(run.left));
                run.next_us += stale * run.interval_us;
                run.left -= stale as u32;
            }
        }
        self.runs.retain(|r| r.left > 0);
    }

    /// Takes `n` slots (there must be as many); returns the time of the last.
    fn take(&mut self, mut n: u32) -> i64 {
        let mut last = 0;
        while n > 0 {
            let run = self.runs.front_mut().expect("enough slots");
            let k = n.min(run.left);
            last = run.next_us + i64::from(k - 1) * run.interval_us;
            run.next_us += i64::from(k) * run.interval_us;
            run.left -= k;
            n -= k;
            if run.left == 0 {
                self.runs.pop_front();
            }
        }
        last
    }
}

/// One account's state in this worker.
#[derive(Default)]
struct Account {
    slots: tokio::sync::Mutex<Slots>,
    /// Messages waiting for a slot in this worker, per lane (by rank).
    queued: [AtomicU64; 3],
    /// When the messages this worker sent to the schedule will have had their turns (unix µs):
    /// the next one comes back after them, so that they return spread at the limit's pace.
    backlog_until_us: Mutex<i64>,
}

impl Account {
    /// When `n` messages that may not wait come back: after the queue and the backlog.
    fn later(&self, n: u32, interval_us: i64, wait: Duration) -> Acquired {
        let now_us = chrono::Utc::now().timestamp_micros();
        let mut backlog = self
            .backlog_until_us
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let at_us = (*backlog).max(now_us + wait.as_micros() as i64) + i64::from(n) * interval_us;
        *backlog = at_us;
        Acquired::Later {
            at: chrono::DateTime::from_timestamp_micros(at_us).unwrap_or_default(),
        }
    }
}

/// The rate limiters of one dispatch worker.
pub struct RateLimiter {
    store: Store,
    accounts: Mutex<HashMap<i64, Arc<Account>>>,
}

impl RateLimiter {
    /// Limiters whose timelines live in `store`.
    pub fn new(store: Store) -> Self {
        RateLimiter {
            store,
            accounts: Mutex::default(),
        }
    }

    /// Takes `n` slots of `account`, limited to `per_second`, for messages of `lane`, waiting
    /// for them up to about `max_wait`.
    pub async fn acquire(
        &self,
        account: i64,
        per_second: u32,
        n: u32,
        lane: MsgType,
        max_wait: Duration,
    ) -> Result<Acquired, StoreError> {
        let started = Instant::now();
        let interval_us = (1_000_000 / i64::from(per_second.max(1))).max(1);
        let state = Arc::clone(
            self.accounts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(account)
                .or_default(),
        );
        // Its turn, counting the messages of its lane and more urgent ones queued here.
        let rank = lane_rank(lane);
        let ahead: u64 = state.queued[..rank]
            .iter()
            .map(|q| q.load(Ordering::SeqCst))
            .sum::<u64>()
            + state.queued[rank].fetch_add(u64::from(n), Ordering::SeqCst);
        let queued = Dequeue(&state.queued[rank], u64::from(n));
        let turn = Duration::from_micros((ahead + u64::from(n)) * interval_us as u64);
        if turn > max_wait {
            return Ok(state.later(n, interval_us, turn));
        }
        let per_chunk = (CHUNK.as_micros() as i64 / interval_us) as u32;
        let mut yielded = false;
        loop {
            // No more than the messages waiting here for slots can use: slots nobody takes in
            // time are lost to every worker.
            let waiting: u64 = state.queued.iter().map(|q| q.load(Ordering::SeqCst)).sum();
            let chunk = per_chunk.min(waiting as u32).max(n);
            let mut slots = state.slots.lock().await;
            let now_us = chrono::Utc::now().timestamp_micros();
            slots.drop_stale(now_us, BURST.as_micros() as i64);
            if slots.left() >= u64::from(n) {
                let at_us = slots.take(n);
                drop(slots);
                drop(queued);
                if at_us > now_us {
                    tokio::time::sleep(Duration::from_micros((at_us - now_us) as u64)).await;
                }
                return Ok(Acquired::Now {
                    waited: started.elapsed(),
                });
            }
            if !yielded {
                // Before a store round trip, let the calls started beside this one queue up,
                // so that one reservation serves them all (the first caller of a round would
                // otherwise reserve for itself alone, and the rest would wait for a second).
                yielded = true;
                drop(slots);
                tokio::task::yield_now().await;
                continue;
            }
            let missing = n - slots.left() as u32;
            let reserved = self
                .store
                .reserve_rate(
                    account,
                    chunk.max(missing),
                    interval_us,
                    now_us,
                    horizon(lane).as_micros() as i64,
                    BURST.as_micros() as i64,
                )
                .await?;
            match reserved {
                Reservation::Granted { first_us } => {
                    slots.runs.push_back(Run {
                        next_us: first_us,
                        interval_us,
                        left: chunk.max(missing),
                        granted_us: chrono::Utc::now().timestamp_micros(),
                    });
                }
                Reservation::Busy { next_us } => {
                    drop(slots);
                    // The lane may join once the queue is no longer than its horizon.
                    let until_us = next_us - horizon(lane).as_micros() as i64 - now_us;
                    let until = Duration::from_micros(until_us.max(0) as u64);
                    if started.elapsed() + until > max_wait {
                        return Ok(state.later(n, interval_us, until + turn));
                    }
                    tokio::time::sleep(until.clamp(Duration::from_millis(1), POLL)).await;
                }
            }
        }
    }
}

/// Takes a caller's messages off the queue count when it is done.
struct Dequeue<'a>(&'a AtomicU64, u64);

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(next_us: i64, interval_us: i64, left: u32, granted_us: i64) -> Run {
        Run {
            next_us,
            interval_us,
            left,
            granted_us,
        }
    }

    #[test]
    fn slots_are_taken_in_order_across_runs() {
        let mut s = Slots::default();
        s.runs.push_back(run(1_000, 10, 3, 0));
        s.runs.push_back(run(5_000, 10, 2, 0));
        assert_eq!(s.left(), 5);
        assert_eq!(s.take(2), 1_010);
        assert_eq!(s.take(2), 5_000);
        assert_eq!(s.left(), 1);
        assert_eq!(s.take(1), 5_010);
        assert_eq!(s.left(), 0);
    }

    #[test]
    fn stale_slots_of_an_old_run_are_dropped() {
        let mut s = Slots::default();
        s.runs.push_back(run(1_000, 10, 10, 0));
        s.drop_stale(1_145, 100);
        // 1000..1040 are gone; 1050 is the next.
        assert_eq!(s.left(), 5);
        assert_eq!(s.take(1), 1_050);
        s.drop_stale(10_000, 100);
        assert_eq!(s.left(), 0);
    }

    #[test]
    fn a_run_just_granted_keeps_slots_older_than_the_burst() {
        // A million a second: a thousand slots from the start of the burst allowance, granted
        // after a 5 ms round trip; all are older than the allowance by then.
        let burst_us = 250_000;
        let (asked_us, granted_us) = (10_000_000, 10_005_000);
        let mut s = Slots::default();
        s.runs
            .push_back(run(asked_us - burst_us, 1, 1_000, granted_us));
        s.drop_stale(granted_us + 1_000, burst_us);
        assert_eq!(s.left(), 1_000);
        assert_eq!(s.take(1_000), asked_us - burst_us + 999);
        // Kept past the allowance, a run's stale slots go.
        s.runs
            .push_back(run(asked_us - burst_us, 1, 1_000, granted_us));
        s.drop_stale(granted_us + burst_us + 1, burst_us);
        assert_eq!(s.left(), 0);
    }
}

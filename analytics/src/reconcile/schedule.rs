//! Scheduled reconciliations (`[[analytics.reconcile_schedules]]`), run by the analytics role.
//!
//! Each schedule has a cron expression (5 fields, or 6 with seconds first) read at
//! `reconcile.utc_offset`, a vendor, a bill source (a file or a glob where finance drops the
//! vendor's exports) and a period rule. When it fires, the newest file the glob matches (by
//! modification time, then name) is imported and reconciled for the period the rule names at
//! the firing time, exactly as `herald reconcile` would: the report tables and
//! `summary.md`/`summary.html` are written into the warehouse, replacing the period's earlier
//! report. So a run that fires again on the same file changes nothing, and a corrected export
//! dropped later replaces the report at the next firing.
//!
//! A failed run (no file, a bad row, ...) is logged with its code and waits for the next
//! firing.
//!
//! # Catching up
//!
//! After each firing, run or failed, a schedule records its time in the warehouse, in
//! `_reconcile/schedules/<id>.json` (`{"cron", "vendor", "last_fired"}`), where `<id>` is a
//! hash of the cron expression, vendor, bills, period rule and bill format: changing any of
//! them makes a new schedule (its old file is left behind, unused). When the role starts, a
//! schedule whose latest firing at or before now is after its recorded one missed firings
//! while the role was stopped: it fires once, at once, as of that latest missed time (whose
//! period the rule names, not now's). The earlier missed firings are not run, since each
//! firing replaces its period's report with one from the newest bill. A schedule with no
//! record (new, or its file unreadable: a warning) records the start time and does not fire
//! for the past. A record that cannot be written is a warning; the firing stands, and the
//! next start catches up from the record before it.

use super::report::blocking;
use super::{
    BillFormat, Period, ReconcileError, Reconciliation, check_vendor, parse_offset, reconcile,
};
use crate::error::AnalyticsError;
use crate::warehouse::Warehouse;
use chrono::{DateTime, FixedOffset, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use herald_core::config::{PeriodRule, ReconcileConfig, ReconcileSchedule};
use herald_core::prices::PriceTable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::SystemTime;
use tokio::sync::watch;

/// Where each schedule records its last firing (module docs).
const STATE_DIR: &str = "_reconcile/schedules";

/// The reconciliation schedules of one warehouse.
pub struct Schedules {
    wh: Warehouse,
    config: ReconcileConfig,
    prices: PriceTable,
    offset: FixedOffset,
    entries: Vec<Entry>,
}

/// One checked schedule.
struct Entry {
    schedule: ReconcileSchedule,
    cron: Cron,
    format: BillFormat,
    /// The key of its state file (module docs).
    state_key: String,
}

/// A schedule's state file.
#[derive(Debug, Serialize, Deserialize)]
struct ScheduleState {
    cron: String,
    vendor: String,
    last_fired: DateTime<Utc>,
}

impl Schedules {
    /// Checks `schedules` (cron expressions, vendors, formats, bill globs) against the
    /// `[reconcile]` config; the error has a code (`bad_cron`, `bad_vendor`, `bad_format`,
    /// `bad_bills`, `bad_utc_offset`) and names the schedule.
    pub fn new(
        wh: Warehouse,
        config: &ReconcileConfig,
        prices: &PriceTable,
        schedules: &[ReconcileSchedule],
    ) -> Result<Schedules, ReconcileError> {
        let offset = parse_offset(&config.utc_offset)?;
        let entries = schedules
            .iter()
            .enumerate()
            .map(|(i, s)| Entry::new(s, offset).map_err(|e| in_schedule(i, s, e)))
            .collect::<Result<_, _>>()?;
        Ok(Schedules {
            wh,
            config: config.clone(),
            prices: prices.clone(),
            offset,
            entries,
        })
    }

    /// Runs schedule `i` (in config order) as if it fired at `at`.
    pub async fn fire(
        &self,
        i: usize,
        at: DateTime<Utc>,
    ) -> Result<Reconciliation, ReconcileError> {
        let entry = &self.entries[i];
        let s = &entry.schedule;
        let bill = newest_bill(&s.bills)?;
        let month = Period::containing(at, self.offset);
        let period = match s.period {
            PeriodRule::PreviousMonth => month.previous(),
            PeriodRule::CurrentMonth => month,
        };
        tracing::info!(vendor = %s.vendor, %period, bill = %bill.display(),
            "scheduled reconciliation");
        reconcile(
            &self.wh,
            &self.config,
            &self.prices,
            &s.vendor,
            &bill,
            entry.format,
            period,
        )
        .await
    }

    /// Catches up the firings missed while the role was stopped, as of `now` (module docs):
    /// each schedule whose latest firing at or before `now` is after its recorded last firing
    /// fires once as of that time, and one with no record records `now`. Returns the firings
    /// run (schedule index, firing time), failed ones included.
    pub async fn catch_up(&self, now: DateTime<Utc>) -> Vec<(usize, DateTime<Utc>)> {
        let mut fired = Vec::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let vendor = &entry.schedule.vendor;
            let last = match self.last_fired(i).await {
                Ok(last) => last,
                Err(e) => {
                    tracing::warn!(%vendor, code = e.code(), error = %e,
                        "unreadable schedule state; taken as a new schedule");
                    None
                }
            };
            let Some(last) = last else {
                self.record(i, now).await;
                continue;
            };
            let Some(missed) = entry.latest_between(last, now, self.offset) else {
                continue;
            };
            tracing::info!(%vendor, cron = %entry.schedule.cron, %missed, %last,
                "catching up a scheduled reconciliation missed while the role was stopped");
            self.fire_and_record(i, missed).await;
            fired.push((i, missed));
        }
        fired
    }

    /// Catches up missed firings ([`Schedules::catch_up`]), then runs each schedule at its
    /// times until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let started = Utc::now();
        self.catch_up(started).await;
        let mut next: Vec<Option<DateTime<Utc>>> = self
            .entries
            .iter()
            .map(|e| e.next_after(started, self.offset))
            .collect();
        while let Some(soonest) = next.iter().flatten().min().copied() {
            let wait = (soonest - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            for (i, next_at) in next.iter_mut().enumerate() {
                let Some(at) = next_at.filter(|t| *t <= Utc::now()) else {
                    continue;
                };
                self.fire_and_record(i, at).await;
                *next_at = self.entries[i].next_after(Utc::now(), self.offset);
            }
        }
        let _ = shutdown.wait_for(|s| *s).await;
    }

    /// Fires schedule `i` as of `at`, logs the outcome, and records `at` as its last firing.
    async fn fire_and_record(&self, i: usize, at: DateTime<Utc>) {
        let vendor = &self.entries[i].schedule.vendor;
        match self.fire(i, at).await {
            Ok(_) => tracing::info!(%vendor, "scheduled reconciliation written"),
            Err(e) => tracing::warn!(%vendor, code = e.code(), error = %e,
                "scheduled reconciliation failed; waiting for its next time"),
        }
        self.record(i, at).await;
    }

    /// The last firing schedule `i` recorded, if it has a state file.
    async fn last_fired(&self, i: usize) -> Result<Option<DateTime<Utc>>, ReconcileError> {
        let key = self.entries[i].state_key.clone();
        blocking(&self.wh, move |wh| {
            if !wh.exists(&key)? {
                return Ok(None);
            }
            let state: ScheduleState = serde_json::from_slice(&wh.get(&key)?).map_err(|e| {
                AnalyticsError::Corrupt(format!("schedule state {}: {e}", wh.locate(&key)))
            })?;
            Ok(Some(state.last_fired))
        })
        .await
    }

    /// Records `at` as schedule `i`'s last firing, replacing its state file; a failure is
    /// logged.
    async fn record(&self, i: usize, at: DateTime<Utc>) {
        let entry = &self.entries[i];
        let state = ScheduleState {
            cron: entry.schedule.cron.clone(),
            vendor: entry.schedule.vendor.clone(),
            last_fired: at,
        };
        let key = entry.state_key.clone();
        let written = blocking(&self.wh, move |wh| {
            let json = serde_json::to_vec_pretty(&state)
                .map_err(|e| AnalyticsError::Corrupt(e.to_string()))?;
            Ok(replace(wh, &key, &json)?)
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(vendor = %entry.schedule.vendor, code = e.code(), error = %e,
                "could not record the schedule's last firing; a restart may fire it again");
        }
    }
}

impl Entry {
    fn new(s: &ReconcileSchedule, offset: FixedOffset) -> Result<Entry, ReconcileError> {
        check_vendor(&s.vendor)?;
        let format = match &s.format {
            Some(f) => f.parse()?,
            None => BillFormat::for_vendor(&s.vendor),
        };
        glob::Pattern::new(&s.bills).map_err(|e| ReconcileError::Invalid {
            code: "bad_bills",
            message: format!("bills `{}` is not a file or glob: {e}", s.bills),
        })?;
        let bad_cron = |why: String| ReconcileError::Invalid {
            code: "bad_cron",
            message: format!("cron `{}` {why}", s.cron),
        };
        let fields = s.cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(bad_cron(format!(
                "has {fields} fields, not 5 (minute hour day month weekday) or 6 (seconds first)"
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&s.cron)
            .map_err(|e| bad_cron(format!("is not a cron expression: {e}")))?;
        let entry = Entry {
            schedule: s.clone(),
            cron,
            format,
            state_key: state_key(s, format),
        };
        if entry.next_after(Utc::now(), offset).is_none() {
            return Err(bad_cron("never fires".into()));
        }
        Ok(entry)
    }

    /// The first firing strictly after `after`.
    fn next_after(&self, after: DateTime<Utc>, offset: FixedOffset) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&offset), false)
            .ok()
            .map(|t| t.to_utc())
    }

    /// The latest firing `t` with `after < t <= until`, if any. Found by one backward search
    /// from `until`, so it takes as long after a year's stop of a cron firing every second as
    /// after a day's.
    fn latest_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        offset: FixedOffset,
    ) -> Option<DateTime<Utc>> {
        let latest = self
            .cron
            .find_previous_occurrence(&until.with_timezone(&offset), true)
            .ok()?
            .to_utc();
        (latest > after).then_some(latest)
    }
}

/// The key of the state file of schedule `s` (with bill format `format`): named by a hash of
/// what makes it the same schedule (module docs).
fn state_key(s: &ReconcileSchedule, format: BillFormat) -> String {
    let period = match s.period {
        PeriodRule::PreviousMonth => "previous_month",
        PeriodRule::CurrentMonth => "current_month",
    };
    // A JSON array: no two different identities encode alike.
    let identity =
        serde_json::json!([s.cron, s.vendor, s.bills, period, format.to_string()]).to_string();
    let digest = Sha256::digest(identity.as_bytes());
    format!("{STATE_DIR}/{}.json", hex::encode(&digest[..16]))
}

/// Replaces `key` with `bytes` atomically: written to a fresh staged key (an object store
/// refuses to overwrite with [`Warehouse::put_new`]), then moved over `key`.
fn replace(wh: &Warehouse, key: &str, bytes: &[u8]) -> Result<(), AnalyticsError> {
    let staged = format!("{key}.{}.tmp", uuid::Uuid::now_v7());
    match wh
        .put_new(&staged, bytes)
        .and_then(|()| wh.rename(&staged, key))
    {
        Ok(true) => wh.sync_dir(STATE_DIR),
        Ok(false) => Err(AnalyticsError::Corrupt(format!(
            "staged file {} vanished",
            wh.locate(&staged)
        ))),
        Err(e) => {
            // Best effort: a leftover staged file is garbage, never state.
            let _ = wh.delete(&staged);
            Err(e)
        }
    }
}

/// Names schedule `i` in an error about it.
fn in_schedule(i: usize, s: &ReconcileSchedule, e: ReconcileError) -> ReconcileError {
    match e {
        ReconcileError::Invalid { code, message } => ReconcileError::Invalid {
            code,
            message: format!(
                "analytics.reconcile_schedules[{i}] (vendor {}): {message}",
                s.vendor
            ),
        },
        e => e,
    }
}

/// The newest file (by modification time, then name) that `pattern` matches.
fn newest_bill(pattern: &str) -> Result<PathBuf, ReconcileError> {
    let none = || ReconcileError::Invalid {
        code: "no_bill",
        message: format!("no file matches `{pattern}`"),
    };
    let paths = glob::glob(pattern).map_err(|_| none())?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for path in paths.flatten() {
        let Ok(meta) = path.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let candidate = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), path);
        if newest.as_ref().is_none_or(|n| candidate > *n) {
            newest = Some(candidate);
        }
    }
    newest.map(|(_, p)| p).ok_or_else(none)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestWarehouse, blocking as on_blocking_thread};

    fn schedule(cron: &str, vendor: &str, bills: &str, format: Option<&str>) -> ReconcileSchedule {
        ReconcileSchedule {
            cron: cron.into(),
            vendor: vendor.into(),
            bills: bills.into(),
            period: PeriodRule::PreviousMonth,
            format: format.map(str::to_string),
        }
    }

    #[test]
    fn bad_schedules_are_refused_with_a_code_and_their_place() {
        let wh = Warehouse::local("unused");
        let (config, prices) = (ReconcileConfig::default(), PriceTable::default());
        for (s, code) in [
            (
                schedule("0 6 1 * *", "Tencent", "*.csv", None),
                "bad_vendor",
            ),
            (schedule("0 6 1 *", "tencent", "*.csv", None), "bad_cron"),
            (schedule("0 6 31 2 *", "tencent", "*.csv", None), "bad_cron"),
            (schedule("0 6 1 * *", "tencent", "[", None), "bad_bills"),
            (
                schedule("0 6 1 * *", "tencent", "*.csv", Some("xml")),
                "bad_format",
            ),
        ] {
            let ok = schedule("0 6 1 * *", "aliyun", "*.csv", None);
            let Err(e) = Schedules::new(wh.clone(), &config, &prices, &[ok, s]) else {
                panic!("{code} accepted");
            };
            assert_eq!(e.code(), code, "{e}");
            assert!(e.to_string().contains("reconcile_schedules[1]"), "{e}");
        }
        let fine = schedule("*/5 * * * * *", "tencent", "/srv/bills/*.csv", None);
        assert_eq!(
            Schedules::new(wh, &config, &prices, &[fine])
                .unwrap()
                .entries
                .len(),
            1
        );
    }

    #[test]
    fn the_latest_missed_firing_is_the_one_stepping_forward_ends_on() {
        let offset = parse_offset("+08:00").unwrap();
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        for cron in ["0 6 1 * *", "30 9 * * 1-5", "0 0 29 2 *", "*/20 * * * * *"] {
            let entry = Entry::new(&schedule(cron, "tencent", "*.csv", None), offset).unwrap();
            for (after, until) in [
                ("2026-10-15T00:00:00Z", "2026-12-15T00:00:00Z"),
                ("2026-11-30T22:00:00Z", "2026-11-30T22:00:00Z"),
                ("2026-11-30T21:59:59Z", "2026-11-30T22:00:00Z"),
                ("2026-11-30T22:00:00Z", "2026-12-31T21:59:59Z"),
                ("2026-12-03T01:29:59Z", "2026-12-03T01:31:10Z"),
                ("2024-01-01T00:00:00Z", "2029-01-01T00:00:00Z"),
            ] {
                let (after, until) = (t(after), t(until));
                let mut stepped = None;
                let mut next = entry.next_after(after, offset);
                for _ in 0..2_000 {
                    match next {
                        Some(n) if n <= until => stepped = Some(n),
                        _ => break,
                    }
                    next = entry.next_after(stepped.unwrap(), offset);
                }
                if next.is_some_and(|n| n <= until) {
                    continue; // Too many firings to step through.
                }
                assert_eq!(
                    entry.latest_between(after, until, offset),
                    stepped,
                    "{cron} in ({after}, {until}]"
                );
            }
        }
    }

    #[test]
    fn state_keys_change_with_what_makes_the_schedule() {
        let offset = parse_offset("+08:00").unwrap();
        let key = |s: ReconcileSchedule| Entry::new(&s, offset).unwrap().state_key;
        let base = key(schedule("0 6 1 * *", "tencent", "/b/*.csv", None));
        let id = base
            .strip_prefix("_reconcile/schedules/")
            .and_then(|k| k.strip_suffix(".json"))
            .unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{base}"
        );
        // The vendor's own format, named or not, is the same schedule.
        assert_eq!(
            key(schedule(
                "0 6 1 * *",
                "tencent",
                "/b/*.csv",
                Some("tencent")
            )),
            base
        );
        let mut current = schedule("0 6 1 * *", "tencent", "/b/*.csv", None);
        current.period = PeriodRule::CurrentMonth;
        for other in [
            schedule("0 7 1 * *", "tencent", "/b/*.csv", None),
            schedule("0 6 1 * *", "aliyun", "/b/*.csv", Some("tencent")),
            schedule("0 6 1 * *", "tencent", "/c/*.csv", None),
            schedule("0 6 1 * *", "tencent", "/b/*.csv", Some("generic")),
            current,
        ] {
            assert_ne!(key(other.clone()), base, "{other:?}");
        }
    }

    #[tokio::test]
    async fn s3_schedule_state_is_replaced_after_each_firing_even_a_failed_one() {
        let test = TestWarehouse::s3().await;
        let dir = tempfile::tempdir().unwrap();
        let bills = format!("{}/*.csv", dir.path().display());
        let schedules = Schedules::new(
            test.wh.clone(),
            &ReconcileConfig::default(),
            &PriceTable::default(),
            &[schedule("0 6 1 * *", "tencent", &bills, None)],
        )
        .unwrap();
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        assert_eq!(schedules.catch_up(t("2026-10-20T00:00:00Z")).await, vec![]);
        // 06:00 on 1 December at UTC+08:00; it fails (no bill) and is recorded all the same.
        let missed = t("2026-11-30T22:00:00Z");
        assert_eq!(
            schedules.catch_up(t("2026-12-15T00:00:00Z")).await,
            vec![(0, missed)]
        );
        let key = schedules.entries[0].state_key.clone();
        let (state, files) = on_blocking_thread(&test.wh, move |wh| {
            (wh.get(&key).unwrap(), wh.list(STATE_DIR).unwrap())
        })
        .await;
        let state: ScheduleState = serde_json::from_slice(&state).unwrap();
        assert_eq!(state.last_fired, missed);
        assert_eq!(files.len(), 1, "{files:?}");
    }

    #[test]
    fn the_newest_matching_file_is_the_bill() {
        let dir = tempfile::tempdir().unwrap();
        let pattern = format!("{}/*.csv", dir.path().display());
        assert_eq!(newest_bill(&pattern).unwrap_err().code(), "no_bill");
        let (old, new) = (dir.path().join("b.csv"), dir.path().join("a.csv"));
        std::fs::write(&old, "x").unwrap();
        let earlier = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(earlier)
            .unwrap();
        std::fs::write(&new, "y").unwrap();
        std::fs::write(dir.path().join("c.txt"), "z").unwrap();
        assert_eq!(newest_bill(&pattern).unwrap(), new);
    }
}

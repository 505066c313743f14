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
//! firing. Firings missed while the role was stopped are not caught up.

use super::{
    BillFormat, Period, ReconcileError, Reconciliation, check_vendor, parse_offset, reconcile,
};
use crate::warehouse::Warehouse;
use chrono::{DateTime, FixedOffset, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use herald_core::config::{PeriodRule, ReconcileConfig, ReconcileSchedule};
use herald_core::prices::PriceTable;
use std::path::PathBuf;
use std::time::SystemTime;
use tokio::sync::watch;

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

    /// Runs each schedule at its times until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut next: Vec<Option<DateTime<Utc>>> = self
            .entries
            .iter()
            .map(|e| e.next_after(Utc::now(), self.offset))
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
                let vendor = &self.entries[i].schedule.vendor;
                match self.fire(i, at).await {
                    Ok(_) => tracing::info!(%vendor, "scheduled reconciliation written"),
                    Err(e) => tracing::warn!(%vendor, code = e.code(), error = %e,
                        "scheduled reconciliation failed; waiting for its next time"),
                }
                *next_at = self.entries[i].next_after(Utc::now(), self.offset);
            }
        }
        let _ = shutdown.wait_for(|s| *s).await;
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

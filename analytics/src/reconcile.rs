//! Vendor billing reconciliation: `herald reconcile --vendor V --bill FILE --period YYYY-MM`.
//!
//! 1. **Import** ([`import_bill`]): the vendor's bill or delivery-detail export (CSV; formats in
//!    [`BillFormat`]) becomes the `vendor_bills` table, Parquet under
//!    `vendor_bills/vendor=V/period=YYYY-MM/`. Every row is checked first (a bad row fails the
//!    import with its line number); the files are written under `_reconcile_staging/` and moved
//!    into place only when the whole file was read, then the period's previous files are
//!    deleted, so a re-import replaces the period and a failed one leaves it as it was.
//! 2. **Match** (`sql/reconcile_sends.sql`, `reconcile_keys.sql`, `reconcile_by_id.sql`,
//!    `reconcile_pairs.sql`): herald's messages handed to the vendor in the period (their
//!    `sent` or `send_failed` event, and the receipts that followed) are paired one to one with
//!    bill rows by vendor message id and receiver (Aliyun's `BizId` is shared by the numbers of
//!    one request, so the receiver is part of the key); a bill row or message left over, where
//!    one of the two has no vendor message id (a bill without the id column, or a send herald
//!    saw fail), is paired by receiver with the nearest one in time within
//!    `reconcile.match_window`, when each is the other's nearest.
//! 3. **Report** (`sql/reconcile_rows.sql`, `reconcile_daily.sql`): each pair or leftover falls
//!    in exactly one category ([`CATEGORIES`]), counted per day of the bill's time zone with
//!    the billing units and the money: herald's expected cost (for messages sent and not
//!    reported failed: the cost on the `sent` event, which dispatch priced when it sent, else
//!    billing units × the rule of the price table, `[[prices]]`, that fits now) beside the
//!    billed amount (the bill's amount column, else its units × the table's price). Written to
//!    `reconciliation/vendor=V/period=P/{daily.parquet,daily.csv,summary.md,summary.html}`
//!    (`reconcile/summary.rs`; the HTML adds the first discrepancies) and, one row per
//!    bill row or message, `reconciliation_rows/vendor=V/period=P/rows.parquet`.
//!
//! [`Schedules`] runs reconciliations from cron expressions (`[[analytics.reconcile_schedules]]`)
//! in the analytics role.
//!
//! Each step's result is kept in memory for the steps after it, so that nothing is computed
//! twice; the categorised rows are written to a staged Parquet file, read back for the daily
//! figures, and moved into place with the other outputs at the end.

mod bills;
mod report;
mod schedule;
mod summary;

pub use bills::{BillFormat, VENDOR_BILLS, import_bill, vendor_bills_schema};
pub use report::{CATEGORIES, Reconciliation, reconcile, run_report};
pub use schedule::Schedules;

use crate::error::AnalyticsError;
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};
use std::fmt;
use std::str::FromStr;

/// Where imports and reports are written before they are moved into place (not a table: the
/// leading `_` keeps it out of `herald sql`).
const STAGING: &str = "_reconcile_staging";

/// A calendar month of the bill's time zone, written `2026-11`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    /// The first instant of the period in time zone `offset`.
    pub fn start(&self, offset: FixedOffset) -> DateTime<Utc> {
        month_start(self.year, self.month, offset)
    }

    /// The month of time zone `offset` that holds `t`.
    pub fn containing(t: DateTime<Utc>, offset: FixedOffset) -> Period {
        let local = t.with_timezone(&offset);
        Period {
            year: local.year(),
            month: local.month(),
        }
    }

    /// The month before this one.
    pub fn previous(&self) -> Period {
        match self.month {
            1 => Period {
                year: self.year - 1,
                month: 12,
            },
            m => Period {
                year: self.year,
                month: m - 1,
            },
        }
    }

    /// The first instant after the period in time zone `offset`.
    pub fn end(&self, offset: FixedOffset) -> DateTime<Utc> {
        match self.month {
            12 => month_start(self.year + 1, 1, offset),
            m => month_start(self.year, m + 1, offset),
        }
    }
}

fn month_start(year: i32, month: u32, offset: FixedOffset) -> DateTime<Utc> {
    let day = NaiveDate::from_ymd_opt(year, month, 1).expect("a valid period's first day");
    let local = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    // A fixed offset maps every local time to exactly one instant.
    offset
        .from_local_datetime(&local)
        .single()
        .expect("fixed offsets are unambiguous")
        .with_timezone(&Utc)
}

impl FromStr for Period {
    type Err = ReconcileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ReconcileError::Invalid {
            code: "bad_period",
            message: format!("period `{s}` is not a month like 2026-11"),
        };
        let (year, month) = s.split_once('-').ok_or_else(bad)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(bad());
        }
        let year: i32 = year.parse().map_err(|_| bad())?;
        let month: u32 = month.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Period { year, month })
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Why a reconciliation failed; [`code`](ReconcileError::code) is a stable identifier.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A row (or the header, line 1) of the bill file cannot be used.
    #[error("{file} line {line}: {code}: {message}")]
    Bill {
        file: String,
        line: u64,
        code: &'static str,
        message: String,
    },
    /// An argument or the `[reconcile]` config is wrong.
    #[error("{code}: {message}")]
    Invalid { code: &'static str, message: String },
    /// Reading or writing the warehouse, or running a query, failed.
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
}

impl ReconcileError {
    /// A short stable identifier of the kind of failure (`bad_units`, `missing_column`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            ReconcileError::Bill { code, .. } | ReconcileError::Invalid { code, .. } => code,
            ReconcileError::Analytics(_) => "warehouse",
        }
    }
}

impl From<datafusion::error::DataFusionError> for ReconcileError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        ReconcileError::Analytics(e.into())
    }
}

/// Parses a UTC offset such as `+08:00`.
fn parse_offset(s: &str) -> Result<FixedOffset, ReconcileError> {
    let bad = || ReconcileError::Invalid {
        code: "bad_utc_offset",
        message: format!("reconcile.utc_offset `{s}` is not an offset like +08:00"),
    };
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

/// Checks that a vendor name is safe in a path and a SQL literal.
fn check_vendor(vendor: &str) -> Result<(), ReconcileError> {
    let ok = !vendor.is_empty()
        && vendor
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReconcileError::Invalid {
            code: "bad_vendor",
            message: format!(
                "vendor `{vendor}` must be lowercase letters, digits, `_` or `-` (as on events)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_months_of_the_bills_time_zone() {
        let p: Period = "2026-11".parse().unwrap();
        assert_eq!(p.to_string(), "2026-11");
        let cst = parse_offset("+08:00").unwrap();
        assert_eq!(p.start(cst).to_rfc3339(), "2026-10-31T16:00:00+00:00");
        assert_eq!(p.end(cst).to_rfc3339(), "2026-11-30T16:00:00+00:00");
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        assert_eq!(Period::containing(at("2026-10-31T16:00:00Z"), cst), p);
        assert_eq!(
            Period::containing(at("2026-10-31T15:59:59Z"), cst),
            p.previous()
        );
        let jan: Period = "2027-01".parse().unwrap();
        assert_eq!(jan.previous().to_string(), "2026-12");
        let dec: Period = "2026-12".parse().unwrap();
        let utc = parse_offset("-00:00").unwrap();
        assert_eq!(dec.end(utc).to_rfc3339(), "2027-01-01T00:00:00+00:00");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", ""] {
            assert_eq!(bad.parse::<Period>().unwrap_err().code(), "bad_period");
        }
    }

    #[test]
    fn offsets_and_vendor_names_are_checked() {
        assert_eq!(parse_offset("-05:30").unwrap().local_minus_utc(), -19800);
        for bad in ["08:00", "+8", "+24:00", "+08:60", "UTC"] {
            assert_eq!(parse_offset(bad).unwrap_err().code(), "bad_utc_offset");
        }
        assert!(check_vendor("tencent").is_ok());
        for bad in ["", "Tencent", "a'b", "a/b"] {
            assert_eq!(check_vendor(bad).unwrap_err().code(), "bad_vendor");
        }
    }
}

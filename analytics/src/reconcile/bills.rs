//! The `vendor_bills` table and the bill formats read into it.
//!
//! A bill is a CSV file (UTF-8, with or without a byte-order mark; a GBK file is refused with
//! a hint to save it as UTF-8) with a header line and one row per message and receiver. Header
//! names are matched case-insensitively after trimming; the first column that fits is used.
//!
//! | field | `tencent` | `aliyun` | `generic` (`[reconcile.generic_columns]`) |
//! |---|---|---|---|
//! | vendor message id (optional) | `SerialNo`, `流水号`, `短信流水号`, `序列号` | `BizId`, `回执ID`, `发送回执ID`, `流水号` | `message_id` |
//! | receiver (required) | `PhoneNumber`, `手机号码`, `手机号`, `接收号码` | `PhoneNum`, `PhoneNumber`, `接收号码`, `手机号码`, `手机号` | `receiver` |
//! | time (required) | `发送时间`, `SendTime`, `提交时间` | `SendDate`, `发送时间` | `time` |
//! | billing units (required) | `计费条数`, `Fee`, `计费数` | `计费条数`, `Fee`, `SmsSize`, `短信条数` | `units` |
//! | status (optional) | `发送状态`, `ReportStatus`, `回执状态`, `状态` | `SendStatus`, `发送状态`, `状态` | `status` |
//! | amount (optional) | `费用`, `金额`, `Amount` | `费用`, `金额`, `Amount` | `amount` |
//!
//! Neither vendor documents the header of its console's CSV export. The names above are read
//! from the fields of Tencent's `PullSmsSendStatus` (`SerialNo`, `PhoneNumber`,
//! `ReportStatus`) and Aliyun's `QuerySendDetails` (`PhoneNum`, `SendDate`, `SendStatus`; the
//! `BizId` of `SendSms`) and from the Chinese labels of their consoles' send-record pages; they
//! are assumptions, and an export with other names is read with the `generic` format.
//!
//! Values: phone numbers become E.164 (`+86` for bare 11-digit mainland mobiles, `+` for
//! `00` or for other bare numbers with a country code); times are `YYYY-MM-DD HH:MM:SS`
//! (also with `/` or `T`, a fraction, or an RFC 3339 offset) in `reconcile.utc_offset`, or
//! Unix seconds or milliseconds; units are whole numbers (empty: 0); amounts are decimals of
//! the vendor's currency with at most 6 places (`0.045`, `¥1,234.50`). Statuses `SUCCESS`,
//! `DELIVRD`, `成功`, ... are `success`, `FAIL`, `失败`, `UNDELIV`, ... are `failed`
//! (Aliyun's numeric `3` and `2` too), anything else `unknown`; the text is kept in
//! `status_detail`.

use super::{Period, ReconcileError, STAGING};
use crate::error::{AnalyticsError, IoContext};
use crate::warehouse::Warehouse;
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use datafusion::arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use herald_core::config::GenericBillColumns;
use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

/// Name of the table (and of its directory under the warehouse root).
pub const VENDOR_BILLS: &str = "vendor_bills";

/// Rows per Parquet file of an import.
const ROWS_PER_FILE: usize = 500_000;

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("line", DataType::Int64, false),
        Field::new("vendor_message_id", DataType::Utf8, true),
        Field::new("receiver", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("billing_units", DataType::Int64, false),
        Field::new("amount_micros", DataType::Int64, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("status_detail", DataType::Utf8, true),
    ]))
});

/// The columns of `vendor_bills` Parquet files (`vendor` and `period` are in the directory
/// names): the bill's line number, the vendor's message id, the receiver in E.164, the send
/// time, the billing units, the amount in millionths of the currency (when the bill has one),
/// the status (`success`, `failed` or `unknown`) and the bill's own status text.
pub fn vendor_bills_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// The layout of a bill file (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillFormat {
    /// Tencent Cloud SMS send records.
    Tencent,
    /// Alibaba Cloud SMS send records.
    Aliyun,
    /// Any CSV, with the header names of `[reconcile.generic_columns]`.
    Generic,
}

impl BillFormat {
    /// The format a vendor's bills come in unless told otherwise.
    pub fn for_vendor(vendor: &str) -> BillFormat {
        match vendor {
            "tencent" => BillFormat::Tencent,
            "aliyun" => BillFormat::Aliyun,
            _ => BillFormat::Generic,
        }
    }

    fn aliases(self, field: Col, generic: &GenericBillColumns) -> Vec<&str> {
        let fixed: &[&'static str] = match (self, field) {
            (BillFormat::Generic, _) => {
                return vec![match field {
                    Col::Id => &generic.message_id,
                    Col::Receiver => &generic.receiver,
                    Col::Time => &generic.time,
                    Col::Units => &generic.units,
                    Col::Status => &generic.status,
                    Col::Amount => &generic.amount,
                }];
            }
            (BillFormat::Tencent, Col::Id) => &["SerialNo", "流水号", "短信流水号", "序列号"],
            (BillFormat::Tencent, Col::Receiver) => {
                &["PhoneNumber", "手机号码", "手机号", "接收号码"]
            }
            (BillFormat::Tencent, Col::Time) => &["发送时间", "SendTime", "提交时间"],
            (BillFormat::Tencent, Col::Units) => &["计费条数", "Fee", "计费数"],
            (BillFormat::Tencent, Col::Status) => &["发送状态", "ReportStatus", "回执状态", "状态"],
            (BillFormat::Aliyun, Col::Id) => &["BizId", "回执ID", "发送回执ID", "流水号"],
            (BillFormat::Aliyun, Col::Receiver) => {
                &["PhoneNum", "PhoneNumber", "接收号码", "手机号码", "手机号"]
            }
            (BillFormat::Aliyun, Col::Time) => &["SendDate", "发送时间"],
            (BillFormat::Aliyun, Col::Units) => &["计费条数", "Fee", "SmsSize", "短信条数"],
            (BillFormat::Aliyun, Col::Status) => &["SendStatus", "发送状态", "状态"],
            (_, Col::Amount) => &["费用", "金额", "Amount"],
        };
        fixed.to_vec()
    }
}

impl FromStr for BillFormat {
    type Err = ReconcileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tencent" => Ok(BillFormat::Tencent),
            "aliyun" => Ok(BillFormat::Aliyun),
            "generic" => Ok(BillFormat::Generic),
            _ => Err(ReconcileError::Invalid {
                code: "bad_format",
                message: format!("bill format `{s}` is not tencent, aliyun or generic"),
            }),
        }
    }
}

impl fmt::Display for BillFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BillFormat::Tencent => "tencent",
            BillFormat::Aliyun => "aliyun",
            BillFormat::Generic => "generic",
        })
    }
}

/// The fields herald reads from a bill.
#[derive(Debug, Clone, Copy)]
enum Col {
    Id,
    Receiver,
    Time,
    Units,
    Status,
    Amount,
}

impl Col {
    fn describe(self) -> &'static str {
        match self {
            Col::Id => "vendor message id",
            Col::Receiver => "receiver",
            Col::Time => "time",
            Col::Units => "billing units",
            Col::Status => "status",
            Col::Amount => "amount",
        }
    }
}

/// Positions of the fields in a bill's rows.
#[derive(Debug)]
struct Columns {
    id: Option<usize>,
    receiver: usize,
    time: usize,
    units: usize,
    status: Option<usize>,
    amount: Option<usize>,
}

/// A row failed: its code and message (the caller adds the file and line).
type RowError = (&'static str, String);

impl Columns {
    fn of(
        header: &csv::StringRecord,
        format: BillFormat,
        generic: &GenericBillColumns,
    ) -> Result<Columns, RowError> {
        let names: Vec<String> = header.iter().map(|h| h.trim().to_lowercase()).collect();
        let find = |col: Col| {
            format
                .aliases(col, generic)
                .iter()
                .find_map(|a| names.iter().position(|n| *n == a.to_lowercase()))
        };
        let need = |col: Col| {
            find(col).ok_or_else(|| {
                let aliases = format.aliases(col, generic).join("`, `");
                (
                    "missing_column",
                    format!(
                        "no {} column in the header (the {format} format reads `{aliases}`)",
                        col.describe()
                    ),
                )
            })
        };
        Ok(Columns {
            id: find(Col::Id),
            receiver: need(Col::Receiver)?,
            time: need(Col::Time)?,
            units: need(Col::Units)?,
            status: find(Col::Status),
            amount: find(Col::Amount),
        })
    }
}

/// One bill row, checked.
#[derive(Debug, PartialEq)]
struct BillRow {
    vendor_message_id: Option<String>,
    receiver: String,
    ts: DateTime<Utc>,
    units: i64,
    amount_micros: Option<i64>,
    status: &'static str,
    status_detail: Option<String>,
}

/// Reads rows of one bill file.
struct RowReader {
    format: BillFormat,
    columns: Columns,
    offset: FixedOffset,
    period: Period,
}

impl RowReader {
    fn row(&self, rec: &csv::StringRecord) -> Result<BillRow, RowError> {
        let field = |i: usize, col: Col| {
            rec.get(i).map(str::trim).ok_or_else(|| {
                (
                    "short_row",
                    format!(
                        "the row has {} fields, so no {} (column {})",
                        rec.len(),
                        col.describe(),
                        i + 1
                    ),
                )
            })
        };
        let optional = |i: Option<usize>, col: Col| {
            i.map(|i| field(i, col))
                .transpose()
                .map(|v| v.filter(|v| !v.is_empty()))
        };
        let raw = field(self.columns.receiver, Col::Receiver)?;
        let receiver = phone(raw).ok_or_else(|| {
            (
                "bad_receiver",
                format!("receiver `{raw}` is not a phone number"),
            )
        })?;
        let raw = field(self.columns.time, Col::Time)?;
        let ts = time(raw, self.offset).ok_or_else(|| {
            (
                "bad_time",
                format!("time `{raw}` is not a date and time like 2026-11-03 10:00:00"),
            )
        })?;
        let (start, end) = (self.period.start(self.offset), self.period.end(self.offset));
        if ts < start || ts >= end {
            return Err((
                "outside_period",
                format!(
                    "time `{raw}` is outside period {} (UTC{})",
                    self.period, self.offset
                ),
            ));
        }
        let raw = field(self.columns.units, Col::Units)?;
        let units = match raw {
            "" => 0,
            _ => raw.parse::<i64>().ok().filter(|u| *u >= 0).ok_or_else(|| {
                (
                    "bad_units",
                    format!("billing units `{raw}` are not a whole number"),
                )
            })?,
        };
        let amount_micros = match optional(self.columns.amount, Col::Amount)? {
            None => None,
            Some(raw) => Some(money_micros(raw).ok_or_else(|| {
                (
                    "bad_amount",
                    format!("amount `{raw}` is not a decimal with at most 6 places"),
                )
            })?),
        };
        let status_detail = optional(self.columns.status, Col::Status)?;
        Ok(BillRow {
            vendor_message_id: optional(self.columns.id, Col::Id)?.map(str::to_string),
            receiver,
            ts,
            units,
            amount_micros,
            status: status_detail.map_or("unknown", |s| status(s, self.format)),
            status_detail: status_detail.map(str::to_string),
        })
    }
}

/// E.164 from the ways bills write phone numbers (module docs).
fn phone(raw: &str) -> Option<String> {
    let compact: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let (international, digits) = match compact.strip_prefix('+') {
        Some(d) => (true, d),
        None => match compact.strip_prefix("00") {
            Some(d) => (true, d),
            None => (false, compact.as_str()),
        },
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !international && digits.len() == 11 && digits.starts_with('1') {
        return Some(format!("+86{digits}"));
    }
    ((8..=15).contains(&digits.len()) && !digits.starts_with('0')).then(|| format!("+{digits}"))
}

/// A bill's time (module docs); local times are in `offset`.
fn time(raw: &str, offset: FixedOffset) -> Option<DateTime<Utc>> {
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = raw.parse().ok()?;
        return match raw.len() {
            10 => DateTime::from_timestamp(n, 0),
            13 => DateTime::from_timestamp_millis(n),
            _ => None,
        };
    }
    // The layout of nearly every bill, read without chrono's format parser (slow for millions
    // of rows); the slow path below gives the same instant for these.
    if let Some(t) = plain_local(raw) {
        return offset
            .from_local_datetime(&t)
            .single()
            .map(|t| t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y/%m/%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(raw, f).ok())
    .and_then(|t| offset.from_local_datetime(&t).single())
    .map(|t| t.with_timezone(&Utc))
}

/// `YYYY-MM-DD HH:MM:SS`, `YYYY/MM/DD HH:MM:SS` or `YYYY-MM-DDTHH:MM:SS` exactly (no fraction).
fn plain_local(raw: &str) -> Option<NaiveDateTime> {
    let b = raw.as_bytes();
    let layout = b.len() == 19
        && matches!(
            (b[4], b[7], b[10]),
            (b'-', b'-', b' ' | b'T') | (b'/', b'/', b' ')
        )
        && b[13] == b':'
        && b[16] == b':';
    if !layout {
        return None;
    }
    let number = |from: usize, to: usize| {
        b[from..to].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let year = i32::try_from(number(0, 4)?).ok()?;
    NaiveDate::from_ymd_opt(year, number(5, 7)?, number(8, 10)?)?.and_hms_opt(
        number(11, 13)?,
        number(14, 16)?,
        number(17, 19)?,
    )
}

/// Millionths of a decimal amount such as `0.045`, `-1.5`, `¥1,234.50`.
fn money_micros(raw: &str) -> Option<i64> {
    let s: String = raw
        .trim_start_matches(['¥', '￥', '$'])
        .chars()
        .filter(|c| *c != ',')
        .collect();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.as_str()),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 {
        return None;
    }
    let frac: i64 = format!("{frac:0<6}").parse().ok()?;
    let micros = whole
        .parse::<i64>()
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(frac)?;
    Some(if negative { -micros } else { micros })
}

/// `success`, `failed` or `unknown` (module docs).
fn status(raw: &str, format: BillFormat) -> &'static str {
    let s = raw.to_lowercase();
    match (format, s.as_str()) {
        (BillFormat::Aliyun, "3") => "success",
        (BillFormat::Aliyun, "2") => "failed",
        (
            _,
            "success" | "succeeded" | "delivrd" | "delivered" | "ok" | "成功" | "发送成功"
            | "接收成功" | "已送达",
        ) => "success",
        (
            _,
            "fail" | "failed" | "failure" | "error" | "undeliv" | "rejectd" | "expired" | "失败"
            | "发送失败" | "接收失败",
        ) => "failed",
        _ => "unknown",
    }
}

/// Builds the record batches of `vendor_bills`.
struct Builders {
    line: Int64Builder,
    id: StringBuilder,
    receiver: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    units: Int64Builder,
    amount: Int64Builder,
    status: StringBuilder,
    status_detail: StringBuilder,
    rows: usize,
}

impl Builders {
    fn new() -> Self {
        Builders {
            line: Int64Builder::new(),
            id: StringBuilder::new(),
            receiver: StringBuilder::new(),
            ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            units: Int64Builder::new(),
            amount: Int64Builder::new(),
            status: StringBuilder::new(),
            status_detail: StringBuilder::new(),
            rows: 0,
        }
    }

    fn push(&mut self, line: u64, row: BillRow) {
        self.line
            .append_value(i64::try_from(line).unwrap_or(i64::MAX));
        self.id.append_option(row.vendor_message_id);
        self.receiver.append_value(row.receiver);
        self.ts.append_value(row.ts.timestamp_micros());
        self.units.append_value(row.units);
        self.amount.append_option(row.amount_micros);
        self.status.append_value(row.status);
        self.status_detail.append_option(row.status_detail);
        self.rows += 1;
    }

    /// The rows pushed since the last call, as a batch of [`vendor_bills_schema`].
    fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.line.finish()),
            Arc::new(self.id.finish()),
            Arc::new(self.receiver.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.units.finish()),
            Arc::new(self.amount.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.status_detail.finish()),
        ];
        self.rows = 0;
        RecordBatch::try_new(vendor_bills_schema(), columns).expect("columns match the schema")
    }
}

/// The directory of one vendor's bills for one period.
pub(crate) fn bills_dir(vendor: &str, period: Period) -> String {
    format!("{VENDOR_BILLS}/vendor={vendor}/period={period}")
}

/// Imports bill `file` (in `format`) as `vendor`'s bills for `period`, replacing any earlier
/// import of that vendor and period; returns the number of rows. Nothing is changed unless
/// every row is good (module docs of [`crate::reconcile`]). Blocking: on an object-store
/// warehouse, call it from a blocking thread.
pub fn import_bill(
    wh: &Warehouse,
    file: &Path,
    format: BillFormat,
    generic: &GenericBillColumns,
    vendor: &str,
    period: Period,
    offset: FixedOffset,
) -> Result<u64, ReconcileError> {
    super::check_vendor(vendor)?;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let mut staged = Vec::new();
    let outcome =
        stage(wh, file, format, generic, period, offset, &tag, &mut staged).and_then(|rows| {
            commit(wh, &staged, &bills_dir(vendor, period), &tag)?;
            Ok(rows)
        });
    if outcome.is_err() {
        for key in &staged {
            // Best effort: a leftover staged file is garbage, never data.
            let _ = wh.delete(key);
        }
    }
    outcome
}

/// Reads the bill and writes its rows as staged Parquet files, listed in `staged`.
#[allow(clippy::too_many_arguments)]
fn stage(
    wh: &Warehouse,
    file: &Path,
    format: BillFormat,
    generic: &GenericBillColumns,
    period: Period,
    offset: FixedOffset,
    tag: &str,
    staged: &mut Vec<String>,
) -> Result<u64, ReconcileError> {
    let name = file.display().to_string();
    let at = |line: u64, (code, message): RowError| ReconcileError::Bill {
        file: name.clone(),
        line,
        code,
        message,
    };
    let input = File::open(file).at(file)?;
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(BufReader::with_capacity(1 << 20, input));
    let mut rec = csv::StringRecord::new();
    let read = |csv: &mut csv::Reader<BufReader<File>>, rec: &mut csv::StringRecord| {
        csv.read_record(rec).map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            match e.kind() {
                csv::ErrorKind::Utf8 { .. } => at(
                    line,
                    (
                        "not_utf8",
                        "the file is not UTF-8 (save the export as UTF-8 CSV; GBK is not read)"
                            .into(),
                    ),
                ),
                csv::ErrorKind::Io(_) => ReconcileError::Analytics(AnalyticsError::Io {
                    path: file.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                }),
                _ => at(line, ("bad_csv", e.to_string())),
            }
        })
    };
    if !read(&mut csv, &mut rec)? {
        return Err(at(1, ("empty_bill", "the file is empty".into())));
    }
    let reader = RowReader {
        format,
        columns: Columns::of(&rec, format, generic).map_err(|e| at(1, e))?,
        offset,
        period,
    };
    let mut builders = Builders::new();
    let mut rows = 0u64;
    while read(&mut csv, &mut rec)? {
        // Spreadsheets pad exports with rows of empty cells.
        if rec.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let line = rec.position().map_or(0, |p| p.line());
        let mut row = reader.row(&rec).map_err(|e| at(line, e))?;
        // The warehouse's form of the receiver, so that the match meets events' receivers.
        if let Cow::Owned(receiver) = wh.receivers().apply(&row.receiver) {
            row.receiver = receiver;
        }
        builders.push(line, row);
        rows += 1;
        if builders.rows == ROWS_PER_FILE {
            write_staged(wh, &builders.finish(), tag, staged)?;
        }
    }
    if rows == 0 {
        return Err(at(
            1,
            ("empty_bill", "the file has a header but no rows".into()),
        ));
    }
    if builders.rows > 0 {
        write_staged(wh, &builders.finish(), tag, staged)?;
    }
    Ok(rows)
}

fn write_staged(
    wh: &Warehouse,
    batch: &RecordBatch,
    tag: &str,
    staged: &mut Vec<String>,
) -> Result<(), AnalyticsError> {
    let key = format!("{STAGING}/{tag}-part-{:05}.parquet", staged.len());
    // Listed first, so that a partly written file is cleaned up too.
    staged.push(key.clone());
    wh.write_parquet(&key, batch)
}

/// Moves the staged files into `dir`, then deletes the files that were there before.
fn commit(wh: &Warehouse, staged: &[String], dir: &str, tag: &str) -> Result<(), AnalyticsError> {
    let old = wh.list(dir)?;
    for (i, key) in staged.iter().enumerate() {
        let target = format!("{dir}/part-{tag}-{i:05}.parquet");
        if !wh.rename(key, &target)? {
            return Err(AnalyticsError::Corrupt(format!(
                "staged file {} vanished",
                wh.locate(key)
            )));
        }
    }
    for name in old {
        wh.delete(&format!("{dir}/{name}"))?;
    }
    wh.sync_dir(dir)
}

#[cfg(test)]
mod tests;

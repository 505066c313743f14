//! Matching a vendor's imported bill with herald's events, and the report's files.

use super::bills::{BillFormat, bills_dir, import_bill, vendor_bills_schema};
use super::{Period, ReconcileError, STAGING, check_vendor, parse_offset};
use crate::error::AnalyticsError;
use crate::schema::{TABLE, schema};
use crate::warehouse::Warehouse;
use chrono::{Days, FixedOffset};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::prelude::ParquetReadOptions;
use herald_core::config::ReconcileConfig;
use herald_core::prices::{PriceRule, PriceTable};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The categories a bill row or message falls in, one each: `matched` (billed as herald
/// expects), `billed_not_sent` (a bill row herald has no message for), `sent_not_billed` (sent
/// by herald, not on the bill), `billed_though_failed` (billed, but herald saw the send or the
/// receipt fail, or the bill says failed), `unit_mismatch` (billed for other billing units than
/// herald counted) and `failed_not_billed` (failed and not billed: as expected).
pub const CATEGORIES: [&str; 6] = [
    "matched",
    "billed_not_sent",
    "sent_not_billed",
    "billed_though_failed",
    "unit_mismatch",
    "failed_not_billed",
];

/// The table of daily figures (`daily.parquet`, with `daily.csv` and `summary.md` beside it).
const REPORT_TABLE: &str = "reconciliation";
/// The table of categorised rows (`rows.parquet`).
const ROWS_TABLE: &str = "reconciliation_rows";

/// The steps whose results the next steps read: each result is computed once, kept in memory
/// and registered under its name.
const STEPS: [(&str, &str); 4] = [
    ("sends", include_str!("../../../sql/reconcile_sends.sql")),
    ("keys", include_str!("../../../sql/reconcile_keys.sql")),
    ("by_id", include_str!("../../../sql/reconcile_by_id.sql")),
    ("pairs", include_str!("../../../sql/reconcile_pairs.sql")),
];
/// The categorised rows, written to a staged Parquet file (`rows.parquet` once moved).
const ROWS_SQL: &str = include_str!("../../../sql/reconcile_rows.sql");
const DAILY_SQL: &str = include_str!("../../../sql/reconcile_daily.sql");

/// Receipts arrive up to three days after the send (how long dispatch polls for them).
const RECEIPT_DAYS: u64 = 3;

/// What a reconciliation produced.
#[derive(Debug)]
pub struct Reconciliation {
    /// One row per day with the columns of `daily.parquet` (`sql/reconcile_daily.sql`).
    pub daily: RecordBatch,
    /// The Markdown summary (`summary.md`): the daily figures and their totals.
    pub summary: String,
}

/// `herald reconcile`: imports `bill` as `vendor`'s bill for `period` ([`import_bill`]),
/// then runs the report ([`run_report`]). Nothing is imported if the config is wrong.
pub async fn reconcile(
    wh: &Warehouse,
    config: &ReconcileConfig,
    prices: &PriceTable,
    vendor: &str,
    bill: &Path,
    format: BillFormat,
    period: Period,
) -> Result<Reconciliation, ReconcileError> {
    check_vendor(vendor)?;
    let offset = parse_offset(&config.utc_offset)?;
    let (bill, generic, v) = (
        bill.to_path_buf(),
        config.generic_columns.clone(),
        vendor.to_string(),
    );
    blocking(wh, move |wh| {
        import_bill(wh, &bill, format, &generic, &v, period, offset)
    })
    .await?;
    run_report(wh, config, prices, vendor, period).await
}

/// Reconciles the imported `vendor_bills` of `vendor` and `period` with `delivery_events` and
/// writes `reconciliation/vendor=V/period=P/{daily.parquet,daily.csv,summary.md}` and
/// `reconciliation_rows/vendor=V/period=P/rows.parquet`, replacing an earlier report.
pub async fn run_report(
    wh: &Warehouse,
    config: &ReconcileConfig,
    prices: &PriceTable,
    vendor: &str,
    period: Period,
) -> Result<Reconciliation, ReconcileError> {
    check_vendor(vendor)?;
    // Compaction in this process waits: no event file listed below disappears meanwhile.
    let _reading = wh.reading().await;
    let offset = parse_offset(&config.utc_offset)?;
    let prices = Prices::of(prices, vendor);
    let window_us = i64::try_from(config.match_window.as_micros()).unwrap_or(i64::MAX);
    let (start, end) = (period.start(offset), period.end(offset));
    let day = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d").to_string();
    let params = [
        ("vendor", vendor.to_string()),
        ("dt_from", day(start)),
        ("dt_to", day(end + Days::new(RECEIPT_DAYS))),
        ("start_us", start.timestamp_micros().to_string()),
        ("end_us", end.timestamp_micros().to_string()),
        ("window_us", window_us.to_string()),
        (
            "offset_us",
            (i64::from(offset.local_minus_utc()) * 1_000_000).to_string(),
        ),
        // Checked to be three capital letters; a vendor without prices has no priced events.
        ("currency", prices.currency().unwrap_or("").to_string()),
        (
            "expected_price",
            prices.case_sql("sent_receiver", "account_id", "msg_type"),
        ),
        (
            "billed_price",
            prices.case_sql(
                "coalesce(sent_receiver, bill_receiver)",
                "account_id",
                "msg_type",
            ),
        ),
    ];

    let ctx = context(wh, &bills_dir(vendor, period)).await?;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let staged = move |name: &str| format!("{STAGING}/{tag}-{name}");
    let rows_key = staged("reconcile_rows.parquet");
    let outcome = async {
        for (table, sql) in STEPS {
            let started = Instant::now();
            let frame = ctx.sql(&fill(sql, &params)).await?.cache().await?;
            ctx.register_table(table, frame.into_view())?;
            tracing::debug!(step = table, ms = elapsed_ms(started), "reconcile step");
        }
        let started = Instant::now();
        ctx.sql(&fill(ROWS_SQL, &params))
            .await?
            .write_parquet(
                &wh.locate(&rows_key),
                DataFrameWriteOptions::new().with_single_file_output(true),
                None,
            )
            .await?;
        for (table, _) in STEPS {
            ctx.deregister_table(table)?; // frees their memory
        }
        ctx.register_parquet(
            "reconcile_rows",
            wh.locate(&rows_key),
            ParquetReadOptions::default(),
        )
        .await?;
        tracing::debug!(step = "rows", ms = elapsed_ms(started), "reconcile step");
        let frame = ctx.sql(DAILY_SQL).await?;
        let daily_schema = Arc::new(frame.schema().as_arrow().clone());
        let daily =
            concat_batches(&daily_schema, &frame.collect().await?).map_err(AnalyticsError::from)?;
        Ok::<_, ReconcileError>(plain_types(&daily).map_err(AnalyticsError::from)?)
    }
    .await;
    let daily = match outcome {
        Ok(daily) => daily,
        Err(e) => {
            // Best effort: a leftover staged file is garbage, never data.
            let _ = blocking(wh, move |wh| Ok(wh.delete(&rows_key)?)).await;
            return Err(e);
        }
    };
    let table = Table::of(&daily)?;
    let summary = table.markdown(vendor, period, offset, &prices, config);
    let csv = table.csv();
    let (report_dir, rows_dir) = (
        format!("{REPORT_TABLE}/vendor={vendor}/period={period}"),
        format!("{ROWS_TABLE}/vendor={vendor}/period={period}"),
    );
    let (batch, md) = (daily.clone(), summary.clone());
    blocking(wh, move |wh| {
        wh.write_parquet(&staged("daily.parquet"), &batch)?;
        wh.put_new(&staged("daily.csv"), csv.as_bytes())?;
        wh.put_new(&staged("summary.md"), md.as_bytes())?;
        let moves = [
            (
                staged("reconcile_rows.parquet"),
                format!("{rows_dir}/rows.parquet"),
            ),
            (
                staged("daily.parquet"),
                format!("{report_dir}/daily.parquet"),
            ),
            (staged("daily.csv"), format!("{report_dir}/daily.csv")),
            (staged("summary.md"), format!("{report_dir}/summary.md")),
        ];
        for (from, to) in &moves {
            if !wh.rename(from, to)? {
                return Err(AnalyticsError::Corrupt(format!(
                    "staged file {} vanished",
                    wh.locate(from)
                ))
                .into());
            }
        }
        wh.sync_dir(&rows_dir)?;
        Ok(wh.sync_dir(&report_dir)?)
    })
    .await?;
    Ok(Reconciliation { daily, summary })
}

/// A DataFusion context with `delivery_events` (as `herald sql` registers it) and `bills`, the
/// Parquet files under `bills_dir`.
async fn context(wh: &Warehouse, bills_dir: &str) -> Result<SessionContext, ReconcileError> {
    let mut config = SessionConfig::new();
    // Plain strings, not views: the joins and groupings here copy strings into hash tables and
    // output batches, and with views (into whole decoded pages) the steps took about 1.6 times
    // as long at 5 million sends.
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    // Grouping by message id (or key) hardly ever merges rows: skip the partial aggregation
    // (which would build a hash table of every row to no effect) as soon as that shows.
    config
        .options_mut()
        .execution
        .skip_partial_aggregation_probe_ratio_threshold = 0.1;
    let ctx = SessionContext::new_with_config(config);
    wh.register_store(&ctx)?;
    let parquet =
        || ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let partitions = vec![
        ("dt".to_string(), DataType::Utf8),
        ("hour".to_string(), DataType::Utf8),
    ];
    if wh.root_dirs().await?.iter().any(|d| d == TABLE) {
        let options = parquet().with_table_partition_cols(partitions);
        ctx.register_listing_table(TABLE, wh.table_url(TABLE), options, Some(schema()), None)
            .await?;
    } else {
        let mut fields = schema().fields().to_vec();
        fields.extend(
            partitions
                .into_iter()
                .map(|(name, t)| Arc::new(Field::new(name, t, false))),
        );
        let empty = MemTable::try_new(Arc::new(Schema::new(fields)), vec![vec![]])?;
        ctx.register_table(TABLE, Arc::new(empty))?;
    }
    ctx.register_listing_table(
        "bills",
        wh.table_url(bills_dir),
        parquet(),
        Some(vendor_bills_schema()),
        None,
    )
    .await?;
    Ok(ctx)
}

/// The daily figures with the day as `Utf8` and the rest `Int64`, whatever string and integer
/// types the query engine chose.
fn plain_types(daily: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (i, (field, column)) in daily
        .schema()
        .fields()
        .iter()
        .zip(daily.columns())
        .enumerate()
    {
        let want = if i == 0 {
            DataType::Utf8
        } else {
            DataType::Int64
        };
        columns.push(cast(column, &want)?);
        fields.push(Field::new(field.name(), want, field.is_nullable()));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// Replaces each `${name}` of `sql` with its value.
fn fill(sql: &str, params: &[(&str, String)]) -> String {
    let mut out = sql.to_string();
    for (name, value) in params {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    debug_assert!(!out.contains("${"), "a placeholder is left in {out}");
    out
}

/// One vendor's price rules, most specific first (the order of [`PriceTable::rule`]).
struct Prices<'a> {
    rules: Vec<&'a PriceRule>,
}

impl<'a> Prices<'a> {
    /// The rules of `vendor` (the table was checked when the config was read: one currency per
    /// vendor, prefixes `+digits`, currencies three capital letters).
    fn of(table: &'a PriceTable, vendor: &'a str) -> Prices<'a> {
        Prices {
            rules: table.of_vendor(vendor).collect(),
        }
    }

    fn currency(&self) -> Option<&str> {
        self.rules.first().map(|r| r.currency.as_str())
    }

    /// A SQL expression for the unit price of the row whose receiver, account id and message
    /// type are the given expressions; NULL where no rule fits.
    fn case_sql(&self, receiver: &str, account: &str, msg_type: &str) -> String {
        if self.rules.is_empty() {
            return "CAST(NULL AS BIGINT)".into();
        }
        let mut sql = "CASE".to_string();
        for r in &self.rules {
            let mut conds = Vec::new();
            if let Some(a) = r.account_id {
                conds.push(format!("{account} = {a}"));
            }
            if let Some(p) = &r.country_prefix {
                // Checked to be `+digits` by `PriceTable::new`.
                conds.push(format!("starts_with({receiver}, '{p}')"));
            }
            if let Some(t) = r.msg_type {
                conds.push(format!("{msg_type} = '{}'", t.as_str()));
            }
            let cond = if conds.is_empty() {
                "true".to_string()
            } else {
                conds.join(" AND ")
            };
            let _ = write!(sql, " WHEN {cond} THEN {}", r.unit_price_micros);
        }
        sql.push_str(" END");
        sql
    }
}

/// The daily figures as text cells: the day, then integers.
struct Table {
    names: Vec<String>,
    rows: Vec<(String, Vec<i64>)>,
    totals: Vec<i64>,
}

/// How the Markdown summary labels the daily columns (the others are left out of it).
const MARKDOWN_COLUMNS: [(&str, &str); 14] = [
    ("herald_sends", "herald sends"),
    ("bill_rows", "bill rows"),
    ("matched", "matched"),
    ("paired_by_receiver_time", "paired by receiver + time"),
    ("billed_not_sent", "billed, not sent"),
    ("sent_not_billed", "sent, not billed"),
    ("billed_though_failed", "billed though failed"),
    ("unit_mismatch", "unit mismatch"),
    ("failed_not_billed", "failed, not billed"),
    ("herald_units", "herald units"),
    ("billed_units", "billed units"),
    ("expected_micros", "expected"),
    ("billed_micros", "billed"),
    ("difference_micros", "difference"),
];

impl Table {
    fn of(daily: &RecordBatch) -> Result<Table, ReconcileError> {
        let bad = || AnalyticsError::Corrupt("unexpected daily report columns".into());
        let day = daily.column(0).as_string_opt::<i32>().ok_or_else(bad)?;
        let mut ints = Vec::new();
        for col in &daily.columns()[1..] {
            ints.push(col.as_primitive_opt::<Int64Type>().ok_or_else(bad)?);
        }
        let rows: Vec<(String, Vec<i64>)> = (0..daily.num_rows())
            .map(|i| {
                let values = ints.iter().map(|c| c.value(i)).collect();
                (day.value(i).to_string(), values)
            })
            .collect();
        let totals = (0..ints.len())
            .map(|c| rows.iter().map(|(_, v)| v[c]).sum())
            .collect();
        let names = daily
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        Ok(Table {
            names,
            rows,
            totals,
        })
    }

    /// `daily.csv`: the daily rows, then a `total` row.
    fn csv(&self) -> String {
        let mut out = self.names.join(",");
        out.push('\n');
        let total = ("total".to_string(), self.totals.clone());
        for (day, values) in self.rows.iter().chain([&total]) {
            out.push_str(day);
            for v in values {
                let _ = write!(out, ",{v}");
            }
            out.push('\n');
        }
        out
    }

    fn markdown(
        &self,
        vendor: &str,
        period: Period,
        offset: FixedOffset,
        prices: &Prices,
        config: &ReconcileConfig,
    ) -> String {
        let column = |name: &str| self.names[1..].iter().position(|n| n == name);
        let shown: Vec<(usize, &str, bool)> = MARKDOWN_COLUMNS
            .iter()
            .filter_map(|(name, label)| {
                column(name).map(|i| (i, *label, name.ends_with("_micros")))
            })
            .collect();
        let currency = prices.currency().unwrap_or("the bill's currency");
        let mut md = format!("# Vendor bill reconciliation: {vendor}, {period}\n\n");
        let _ = writeln!(
            md,
            "Days are calendar days at UTC{offset}. Money is in {currency}: expected is herald's \
             billing units times `reconcile.prices` for messages sent and not reported failed; \
             billed is the bill's amount, else its units times the same prices; difference is \
             billed minus expected. Pairs are made by vendor message id and receiver, else by \
             receiver within {} s.\n",
            config.match_window.as_secs()
        );
        md.push_str("| day |");
        for (_, label, _) in &shown {
            let _ = write!(md, " {label} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(shown.len()));
        md.push('\n');
        let mut line = |day: &str, values: &[i64]| {
            let _ = write!(md, "| {day} |");
            for (i, _, money_column) in &shown {
                let v = values[*i];
                let cell = if *money_column {
                    money(v)
                } else {
                    v.to_string()
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        };
        for (day, values) in &self.rows {
            line(day, values);
        }
        line("**total**", &self.totals);
        md.push_str(
            "\n**matched**: billed as herald expects; **billed, not sent**: a bill row herald has \
             no message for; **sent, not billed**: sent by herald and not reported failed, but \
             not on the bill; **billed though failed**: billed although herald saw the send or \
             its receipt fail, or the bill says failed; **unit mismatch**: billed for other \
             billing units than herald counted; **failed, not billed**: as expected. *Paired by \
             receiver + time* counts the pairs made without a common vendor message id, in \
             whatever category.\n",
        );
        if let Some(i) = column("unpriced").filter(|i| self.totals[*i] > 0) {
            let _ = write!(
                md,
                "\n{} rows had no price in `reconcile.prices`; their money is left out.\n",
                self.totals[i]
            );
        }
        let _ = write!(
            md,
            "\nEvery bill row and message with its category: \
             `{ROWS_TABLE}/vendor={vendor}/period={period}/rows.parquet`.\n"
        );
        md
    }
}

/// Millionths as a decimal with at least two places: 185000 is `0.185`, -90000 `-0.09`.
fn money(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let frac = format!("{:06}", abs % 1_000_000);
    let frac = frac.trim_end_matches('0');
    format!("{sign}{}.{frac:0<2}", abs / 1_000_000)
}

/// Runs `f` on a blocking thread, where warehouse operations belong (module docs of
/// [`crate::warehouse`]).
fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn blocking<T: Send + 'static>(
    wh: &Warehouse,
    f: impl FnOnce(&Warehouse) -> Result<T, ReconcileError> + Send + 'static,
) -> Result<T, ReconcileError> {
    let wh = wh.clone();
    tokio::task::spawn_blocking(move || f(&wh))
        .await
        .map_err(AnalyticsError::Task)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::events_to_batch;
    use crate::testing::{TestWarehouse, blocking as on_blocking_thread};
    use chrono::{TimeZone, Utc};
    use herald_core::wire::event_id;
    use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};

    /// A tencent `sent` event of one unit at 2026-11-03T02:00Z (10:00 at UTC+08:00).
    fn sent(n: u128, receiver: &str, id: &str) -> DeliveryEvent {
        let message_id = MessageId(uuid::Uuid::from_u128(n));
        DeliveryEvent {
            event_id: event_id(&message_id, State::Sent, 1),
            ts: Utc.with_ymd_and_hms(2026, 11, 3, 2, 0, 0).unwrap(),
            message_id,
            request_id: "r".into(),
            biz_id: None,
            app: "shop".into(),
            template_id: 1,
            channel: Channel::Sms,
            msg_type: MsgType::Notice,
            receiver: receiver.into(),
            state: State::Sent,
            vendor: Some("tencent".into()),
            account_id: Some(7),
            vendor_message_id: Some(id.into()),
            attempt: 1,
            error_code: None,
            error_detail: None,
            latency_ms: None,
            billing_units: Some(1),
            cost_micros: None,
            currency: None,
            redelivered: false,
        }
    }

    #[tokio::test]
    async fn s3_a_reconciliation_reads_and_writes_an_object_store_warehouse() {
        let wh = TestWarehouse::s3().await;
        let events = vec![
            sent(1, "+8613800000001", "s-1"),
            sent(2, "+8613800000002", "s-2"),
        ];
        on_blocking_thread(&wh.wh, move |wh| {
            wh.write_parquet(
                "delivery_events/dt=2026-11-03/hour=02/a.parquet",
                &events_to_batch(&events),
            )
            .unwrap()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let bill = dir.path().join("bill.csv");
        std::fs::write(
            &bill,
            "PhoneNumber,发送时间,计费条数,SerialNo\n\
             +8613800000001,2026-11-03 10:00:01,1,s-1\n\
             +8613800000003,2026-11-03 10:00:01,1,s-3\n",
        )
        .unwrap();
        let prices = PriceTable::new(vec![PriceRule {
            vendor: "tencent".into(),
            account_id: None,
            country_prefix: None,
            msg_type: None,
            unit_price_micros: 40_000,
            currency: "CNY".into(),
        }])
        .unwrap();
        let period: Period = "2026-11".parse().unwrap();
        let report = reconcile(
            &wh.wh,
            &ReconcileConfig::default(),
            &prices,
            "tencent",
            &bill,
            BillFormat::Tencent,
            period,
        )
        .await
        .unwrap();
        assert!(
            report
                .summary
                .contains("| **total** | 2 | 2 | 1 | 0 | 1 | 1 | 0 | 0 | 0 |"),
            "{}",
            report.summary
        );
        let rows = crate::sql::query_warehouse(
            &wh.wh,
            "SELECT category, receiver FROM reconciliation_rows ORDER BY receiver",
        )
        .await
        .unwrap();
        assert_eq!(
            crate::sql::format(&rows, crate::sql::OutputFormat::Csv).unwrap(),
            "category,receiver\nmatched,+8613800000001\nsent_not_billed,+8613800000002\n\
             billed_not_sent,+8613800000003\n"
        );
        let md = on_blocking_thread(&wh.wh, |wh| {
            wh.get("reconciliation/vendor=tencent/period=2026-11/summary.md")
                .unwrap()
        })
        .await;
        assert_eq!(String::from_utf8(md).unwrap(), report.summary);
    }

    fn rule(account: Option<i64>, prefix: Option<&str>, msg_type: Option<MsgType>) -> PriceRule {
        PriceRule {
            vendor: "tencent".into(),
            account_id: account,
            country_prefix: prefix.map(str::to_string),
            msg_type,
            unit_price_micros: 1,
            currency: "CNY".into(),
        }
    }

    #[test]
    fn the_sql_tries_prices_in_the_tables_order() {
        let table = PriceTable::new(vec![
            rule(None, None, None),
            rule(None, Some("+86"), Some(MsgType::Marketing)),
            rule(None, Some("+852"), None),
            rule(Some(7), None, None),
            PriceRule {
                vendor: "aliyun".into(),
                ..rule(Some(8), None, None)
            },
        ])
        .unwrap();
        let sql = Prices::of(&table, "tencent").case_sql("r", "a", "t");
        assert_eq!(
            sql,
            "CASE WHEN a = 7 THEN 1 WHEN starts_with(r, '+852') THEN 1 \
             WHEN starts_with(r, '+86') AND t = 'marketing' THEN 1 WHEN true THEN 1 END"
        );
        assert_eq!(
            Prices::of(&table, "yunpian").case_sql("r", "a", "t"),
            "CAST(NULL AS BIGINT)"
        );
    }

    #[test]
    fn money_has_at_least_two_places() {
        assert_eq!(money(185_000), "0.185");
        assert_eq!(money(-90_000), "-0.09");
        assert_eq!(money(0), "0.00");
        assert_eq!(money(12_345_678), "12.345678");
    }
}

//! Matching a vendor's imported bill with herald's events, and the report's files.

use super::bills::{BillFormat, bills_dir, import_bill, vendor_bills_schema};
use super::summary::{DISCREPANCIES_LISTED, Heading, Table};
use super::{Period, ReconcileError, STAGING, check_vendor, parse_offset};
use crate::error::AnalyticsError;
use crate::schema::{TABLE, schema};
use crate::warehouse::Warehouse;
use chrono::Days;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
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

/// The table of daily figures (`daily.parquet`, with `daily.csv`, `summary.md` and
/// `summary.html` beside it).
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
/// The bill rows and messages the HTML summary lists.
const DISCREPANCIES_SQL: &str = include_str!("../../../sql/reconcile_discrepancies.sql");

/// Receipts arrive up to three days after the send (how long dispatch polls for them).
const RECEIPT_DAYS: u64 = 3;

/// What a reconciliation produced.
#[derive(Debug)]
pub struct Reconciliation {
    /// One row per day with the columns of `daily.parquet` (`sql/reconcile_daily.sql`).
    pub daily: RecordBatch,
    /// The Markdown summary (`summary.md`): the daily figures and their totals.
    pub summary: String,
    /// The HTML summary (`summary.html`): the same, and the first discrepancies.
    pub html: String,
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
/// writes `reconciliation/vendor=V/period=P/{daily.parquet,daily.csv,summary.md,summary.html}` and
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
        let daily = collect(&ctx, DAILY_SQL).await?;
        let limit = [("limit", DISCREPANCIES_LISTED.to_string())];
        let discrepancies = collect(&ctx, &fill(DISCREPANCIES_SQL, &limit)).await?;
        Ok::<_, ReconcileError>((
            plain_types(&daily).map_err(AnalyticsError::from)?,
            discrepancies,
        ))
    }
    .await;
    let (daily, discrepancies) = match outcome {
        Ok(outputs) => outputs,
        Err(e) => {
            // Best effort: a leftover staged file is garbage, never data.
            let _ = blocking(wh, move |wh| Ok(wh.delete(&rows_key)?)).await;
            return Err(e);
        }
    };
    let (report_dir, rows_dir) = (
        format!("{REPORT_TABLE}/vendor={vendor}/period={period}"),
        format!("{ROWS_TABLE}/vendor={vendor}/period={period}"),
    );
    let heading = Heading {
        vendor,
        period,
        offset,
        currency: prices.currency(),
        match_window_secs: config.match_window.as_secs(),
        rows_file: format!("{rows_dir}/rows.parquet"),
    };
    let table = Table::of(&daily)?;
    let summary = table.markdown(&heading);
    let html = table.html(&heading, &discrepancies);
    let csv = table.csv();
    let (batch, md, page) = (daily.clone(), summary.clone(), html.clone());
    blocking(wh, move |wh| {
        wh.write_parquet(&staged("daily.parquet"), &batch)?;
        wh.put_new(&staged("daily.csv"), csv.as_bytes())?;
        wh.put_new(&staged("summary.md"), md.as_bytes())?;
        wh.put_new(&staged("summary.html"), page.as_bytes())?;
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
            (staged("summary.html"), format!("{report_dir}/summary.html")),
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
    Ok(Reconciliation {
        daily,
        summary,
        html,
    })
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

/// The result of `sql` in `ctx` as one batch.
async fn collect(ctx: &SessionContext, sql: &str) -> Result<RecordBatch, ReconcileError> {
    let frame = ctx.sql(sql).await?;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    Ok(concat_batches(&schema, &frame.collect().await?).map_err(AnalyticsError::from)?)
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Runs `f` on a blocking thread, where warehouse operations belong (module docs of
/// [`crate::warehouse`]).
pub(super) async fn blocking<T: Send + 'static>(
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
}

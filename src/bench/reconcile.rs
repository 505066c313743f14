//! The reconciliation figure: a month (November 2026, bills at UTC+08:00) of `--reconcile-sends`
//! tencent SMS sends on disk, one Parquet file per hour partition, and a bill of as many lines
//! with the discrepancies of the ignored timing test `reconcile_at_scale` (every 1000th send
//! not billed, the next billed for a unit more, one row in a thousand billed for nothing herald
//! sent). `herald reconcile`'s two steps are timed apart — importing the CSV bill, then
//! matching and reporting — and DuckDB runs the equivalent join
//! (`sql/bench_reconcile_duckdb.sql`) over the same event files and the bill as herald imported
//! it, as the baseline of the matching. Both reports' totals must agree.

use super::Row;
use super::warehouse::{
    Scratch, cpu_seconds, duckdb, duckdb_view, require_duckdb, spread, write_hours,
};
use anyhow::{Context, bail};
use chrono::{DateTime, Days, FixedOffset, Utc};
use herald_analytics::Warehouse;
use herald_analytics::reconcile::{BillFormat, Period, VENDOR_BILLS, import_bill, run_report};
use herald_core::config::ReconcileConfig;
use herald_core::prices::{PriceRule, PriceTable};
use herald_core::wire::event_id;
use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

const VENDOR: &str = "tencent";
const PERIOD: &str = "2026-11";
/// The hours of the 30 days of November.
const HOURS: u64 = 30 * 24;
/// DuckDB's equivalent of the matching and the daily report.
const DUCKDB_SQL: &str = include_str!("../../sql/bench_reconcile_duckdb.sql");
/// The daily columns both reports have, whose totals must agree.
const CHECKED: [&str; 8] = [
    "herald_sends",
    "bill_rows",
    "matched",
    "billed_not_sent",
    "sent_not_billed",
    "unit_mismatch",
    "herald_units",
    "billed_units",
];

/// DuckDB's time and herald's, as rows of the harness's table.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    require_duckdb()?;
    let n = args.reconcile_sends as u64;
    let scratch = Scratch::new("reconcile")?;
    let root = scratch.dir.join("warehouse");
    let bill = scratch.dir.join("bill.csv");
    let period: Period = PERIOD.parse()?;
    let offset = FixedOffset::east_opt(8 * 3600).context("UTC+08:00")?;
    let start = period.start(offset);
    let at = move |i: u64| spread(start, i, n, HOURS);

    let started = Instant::now();
    let (wh, file) = (Warehouse::local(&root), bill.clone());
    tokio::task::spawn_blocking(move || {
        write_hours(&wh, n, HOURS, |i| send(i, at(i)))?;
        write_bill(&file, n, at)
    })
    .await??;
    println!(
        "reconcile: wrote {n} sends and their bill in {:.1?}",
        started.elapsed()
    );

    let config = ReconcileConfig::default();
    let prices = PriceTable::new(vec![PriceRule {
        vendor: VENDOR.into(),
        account_id: None,
        country_prefix: None,
        msg_type: None,
        unit_price_micros: 45_000,
        currency: "CNY".into(),
    }])?;
    let wh = Warehouse::local(&root);
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let (w, generic) = (wh.clone(), config.generic_columns.clone());
    tokio::task::spawn_blocking(move || {
        import_bill(
            &w,
            &bill,
            BillFormat::Tencent,
            &generic,
            VENDOR,
            period,
            offset,
        )
    })
    .await??;
    let (import, import_cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let report = run_report(&wh, &config, &prices, VENDOR, period).await?;
    let (matching, matching_cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let herald = herald_analytics::sql::format(
        std::slice::from_ref(&report.daily),
        herald_analytics::sql::OutputFormat::Csv,
    )?;

    let day = |t: DateTime<Utc>| t.format("%Y-%m-%d").to_string();
    let end = period.end(offset);
    let sql = [
        ("vendor", VENDOR.to_string()),
        ("dt_from", day(start)),
        ("dt_to", day(end + Days::new(3))),
        ("start_us", start.timestamp_micros().to_string()),
        ("end_us", end.timestamp_micros().to_string()),
        ("offset_us", (8i64 * 3600 * 1_000_000).to_string()),
    ]
    .iter()
    .fold(DUCKDB_SQL.to_string(), |sql, (name, value)| {
        sql.replace(&format!("${{{name}}}"), value)
    });
    let setup = [
        duckdb_view("delivery_events", &root, "delivery_events/*/*/*.parquet"),
        duckdb_view(
            "bills",
            &root,
            &format!("{VENDOR_BILLS}/vendor={VENDOR}/period={PERIOD}/*.parquet"),
        ),
    ];
    let duck = duckdb(&scratch.dir, &setup, &sql, 1)?;
    for column in CHECKED {
        let ours = column_total(&herald, column)?;
        let theirs = duck.sums.get(column).copied().unwrap_or(-1);
        if ours != theirs {
            bail!("the reports disagree on {column}: herald {ours}, DuckDB {theirs}");
        }
    }
    let matched = duck.sums.get("matched").copied().unwrap_or(0);
    Ok(vec![
        Row::new(
            format!(
                "DuckDB: {n} sends grouped and joined with the imported bill, daily categories \
                 (baseline; CPU {:.1} s)",
                duck.cpu
            ),
            duck.best,
            "s",
            1.0,
            None,
        ),
        Row::new(
            format!(
                "herald reconcile, match and report ({matched} matched; CPU {matching_cpu:.1} s; \
                 ratio: DuckDB's time / herald's)"
            ),
            matching,
            "s",
            duck.best / matching,
            None,
        ),
        Row::new(
            format!("herald reconcile, importing the {n}-line CSV bill (CPU {import_cpu:.1} s)"),
            import,
            "s",
            0.0,
            None,
        ),
        Row::new(
            "herald reconcile, import + match + report (#6: < 60 s at 10 million)",
            import + matching,
            "s",
            0.0,
            None,
        ),
    ])
}

/// Send `i`: a tencent `sent` event with vendor message id `2019:i`, 1 or 2 billing units.
fn send(i: u64, ts: DateTime<Utc>) -> DeliveryEvent {
    let message_id = MessageId(uuid::Uuid::from_u128(u128::from(i) + 1));
    DeliveryEvent {
        event_id: event_id(&message_id, State::Sent, 1),
        ts,
        message_id,
        request_id: format!("req-{i}"),
        biz_id: None,
        app: "shop".into(),
        template_id: 1,
        channel: Channel::Sms,
        msg_type: MsgType::Notice,
        receiver: format!("+86138{i:08}"),
        state: State::Sent,
        vendor: Some(VENDOR.into()),
        account_id: Some(7),
        vendor_message_id: Some(format!("2019:{i}")),
        attempt: 1,
        error_code: None,
        error_detail: None,
        latency_ms: None,
        billing_units: Some(units(i)),
        cost_micros: None,
        currency: None,
        redelivered: false,
    }
}

fn units(i: u64) -> u32 {
    1 + u32::from(i.is_multiple_of(3))
}

/// The tencent bill of sends `0..n` (sent at `at(i)`): every 1000th (`i % 1000 == 1`) left
/// out, the next billed for a unit more, and after every 1000th from 0 a row for a number
/// herald never sent to.
fn write_bill(path: &Path, n: u64, at: impl Fn(u64) -> DateTime<Utc>) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "手机号码,发送时间,计费条数,发送状态,SerialNo")?;
    for i in 0..n {
        let local = (at(i) + chrono::Duration::hours(8)).format("%Y-%m-%d %H:%M:%S");
        match i % 1000 {
            1 => {}
            2 => writeln!(w, "+86138{i:08},{local},{},SUCCESS,2019:{i}", units(i) + 1)?,
            _ => writeln!(w, "+86138{i:08},{local},{},SUCCESS,2019:{i}", units(i))?,
        }
        if i.is_multiple_of(1000) {
            writeln!(w, "+86139{i:08},{local},1,SUCCESS,x:{i}")?;
        }
    }
    w.flush()?;
    Ok(())
}

/// The total of `column` over the rows of a CSV report with a header.
fn column_total(csv: &str, column: &str) -> anyhow::Result<i64> {
    let mut lines = csv.lines();
    let header = lines.next().context("an empty report")?;
    let i = header
        .split(',')
        .position(|c| c == column)
        .with_context(|| format!("the report has no {column}"))?;
    lines
        .map(|l| {
            l.split(',')
                .nth(i)
                .and_then(|v| v.parse::<i64>().ok())
                .with_context(|| format!("bad {column} in `{l}`"))
        })
        .sum()
}

//! Vendor billing reconciliation end to end: a warehouse of two vendors' sends over two days,
//! a bill of each with seeded discrepancies, every one found exactly once.

use chrono::{DateTime, Utc};
use datafusion::parquet::arrow::ArrowWriter;
use herald_analytics::events_to_batch;
use herald_analytics::privacy::ReceiverPrivacy;
use herald_analytics::reconcile::Schedules;
use herald_analytics::reconcile::{BillFormat, Period, reconcile};
use herald_analytics::sql::{OutputFormat, format, query};
use herald_analytics::{Warehouse, reconcile::Reconciliation};
use herald_core::config::{PeriodRule, ReconcileConfig, ReconcileSchedule};
use herald_core::prices::{PriceRule, PriceTable};
use herald_core::wire::event_id;
use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};
use std::collections::BTreeMap;
use std::path::Path;

/// One event of message `n`; `local` is a time at UTC+08:00 like `2026-11-03 10:00:00`.
struct Ev {
    n: u128,
    state: State,
    local: &'static str,
    vendor: Option<&'static str>,
    account: i64,
    receiver: &'static str,
    vendor_id: Option<&'static str>,
    units: Option<u32>,
    msg_type: MsgType,
}

fn at(local: &str) -> DateTime<Utc> {
    DateTime::parse_from_str(&format!("{local} +08:00"), "%Y-%m-%d %H:%M:%S %z")
        .unwrap()
        .with_timezone(&Utc)
}

/// A `sent` event of tencent account 7 (a notice), and its receipt when `receipt` is given.
fn tencent_sent(
    n: u128,
    local: &'static str,
    receiver: &'static str,
    id: &'static str,
    units: u32,
    receipt: Option<(State, &'static str)>,
) -> Vec<Ev> {
    let sent = Ev {
        n,
        state: State::Sent,
        local,
        vendor: Some("tencent"),
        account: 7,
        receiver,
        vendor_id: Some(id),
        units: Some(units),
        msg_type: MsgType::Notice,
    };
    let mut out = vec![Ev {
        state: State::Sending,
        vendor: None,
        vendor_id: None,
        units: None,
        ..sent
    }];
    if let Some((state, local)) = receipt {
        out.push(Ev {
            state,
            local,
            units: None,
            ..sent
        });
    }
    out.push(sent);
    out
}

/// A `send_failed` event: it names the account, not the vendor.
fn failed(n: u128, local: &'static str, account: i64, receiver: &'static str) -> Ev {
    Ev {
        n,
        state: State::SendFailed,
        local,
        vendor: None,
        account,
        receiver,
        vendor_id: None,
        units: None,
        msg_type: MsgType::Notice,
    }
}

fn events() -> Vec<Ev> {
    let delivered = |t| Some((State::Delivered, t));
    let mut evs = Vec::new();
    // Tencent, 2026-11-03 (UTC+08:00).
    evs.extend(tencent_sent(
        1,
        "2026-11-03 10:00:00",
        "+8613800000001",
        "2019:1001",
        1,
        delivered("2026-11-03 10:00:05"),
    ));
    evs.extend(tencent_sent(
        2,
        "2026-11-03 11:00:00",
        "+8613800000002",
        "2019:1002",
        2,
        delivered("2026-11-03 11:00:05"),
    ));
    evs.extend(tencent_sent(
        3,
        "2026-11-03 12:00:00",
        "+8613800000003",
        "2019:1003",
        1,
        Some((State::DeliveryFailed, "2026-11-03 12:00:10")),
    ));
    let mut marketing = tencent_sent(
        8,
        "2026-11-03 13:00:00",
        "+8613800000008",
        "2019:1008",
        1,
        delivered("2026-11-03 13:00:05"),
    );
    marketing
        .iter_mut()
        .for_each(|e| e.msg_type = MsgType::Marketing);
    evs.extend(marketing);
    // Tencent, 2026-11-04: 00:30 there is still 2026-11-03 in UTC.
    evs.extend(tencent_sent(
        4,
        "2026-11-04 00:30:00",
        "+8613800000004",
        "2019:1004",
        1,
        None,
    ));
    evs.push(failed(5, "2026-11-04 14:00:00", 7, "+8613800000005"));
    evs.extend(tencent_sent(
        6,
        "2026-11-04 15:00:00",
        "+8613800000006",
        "2019:1006",
        1,
        delivered("2026-11-04 15:00:09"),
    ));
    evs.push(failed(7, "2026-11-04 16:00:00", 7, "+8613800000007"));
    // Tencent, outside 2026-11 at UTC+08:00 (though inside it in UTC for the second).
    evs.extend(tencent_sent(
        9,
        "2026-10-31 23:00:00",
        "+8613800000009",
        "2019:0999",
        1,
        None,
    ));
    evs.extend(tencent_sent(
        10,
        "2026-12-01 01:00:00",
        "+8613800000010",
        "2019:1201",
        1,
        None,
    ));
    // Aliyun (account 8): one BizId for two numbers of one request.
    for (n, local, receiver, id, units) in [
        (21, "2026-11-03 10:00:00", "+8613900000001", "900^1", 1),
        (22, "2026-11-03 10:00:00", "+8613900000002", "900^1", 1),
        (23, "2026-11-04 10:00:00", "+8613900000003", "900^2", 2),
    ] {
        let mut sent = tencent_sent(n, local, receiver, id, units, None);
        for e in &mut sent {
            e.account = 8;
            e.vendor = e.vendor.map(|_| "aliyun");
        }
        evs.extend(sent);
    }
    // An aliyun failure to tencent's m5 receiver, 10 s after it: not tencent's.
    evs.push(failed(24, "2026-11-04 14:00:10", 8, "+8613800000005"));
    evs
}

fn to_event(e: &Ev) -> DeliveryEvent {
    DeliveryEvent {
        ts: at(e.local),
        ..to_event_at(e)
    }
}

/// The event of `e` at the Unix epoch.
fn to_event_at(e: &Ev) -> DeliveryEvent {
    let message_id = MessageId(uuid::Uuid::from_u128(e.n));
    DeliveryEvent {
        event_id: event_id(&message_id, e.state, 1),
        ts: DateTime::UNIX_EPOCH,
        message_id,
        request_id: format!("req-{}", e.n),
        biz_id: None,
        app: "shop".into(),
        template_id: 1,
        channel: Channel::Sms,
        msg_type: e.msg_type,
        receiver: e.receiver.into(),
        state: e.state,
        vendor: e.vendor.map(str::to_string),
        account_id: Some(e.account),
        vendor_message_id: e.vendor_id.map(str::to_string),
        attempt: 1,
        error_code: None,
        error_detail: None,
        latency_ms: None,
        billing_units: e.units,
        cost_micros: None,
        currency: None,
        redelivered: false,
    }
}

/// Writes the events as the sink lays them out: one file per UTC hour.
fn write_warehouse(root: &Path) {
    write_warehouse_with(root, |_| {});
}

/// Writes the events, each changed by `edit` first.
fn write_warehouse_with(root: &Path, edit: impl Fn(&mut DeliveryEvent)) {
    let mut parts: BTreeMap<String, Vec<DeliveryEvent>> = BTreeMap::new();
    for mut e in events().iter().map(to_event) {
        edit(&mut e);
        let dir =
            e.ts.format("delivery_events/dt=%Y-%m-%d/hour=%H")
                .to_string();
        parts.entry(dir).or_default().push(e);
    }
    for (dir, events) in parts {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let batch = events_to_batch(&events);
        let file = std::fs::File::create(dir.join("part-0.parquet")).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
}

const TENCENT_BILL: &str = "\u{feff}手机号码,发送时间,计费条数,发送状态,SerialNo\n\
+8613800000001,2026-11-03 10:00:01,1,SUCCESS,2019:1001\n\
13800000002,2026-11-03 11:00:01,3,SUCCESS,2019:1002\n\
+8613800000003,2026-11-03 12:00:01,1,SUCCESS,2019:1003\n\
+8613800000008,2026-11-03 13:00:01,1,SUCCESS,2019:1008\n\
+8613800000009,2026-11-04 13:00:00,1,SUCCESS,2019:9999\n\
+8613800000005,2026-11-04 14:00:30,1,SUCCESS,2019:1005\n\
+8613800000006,2026-11-04 15:01:00,1,SUCCESS,\n";

const ALIYUN_BILL: &str = "PhoneNum,SendDate,SendStatus,BizId,Fee\n\
13900000001,2026-11-03 10:00:02,3,900^1,1\n\
13900000002,2026-11-03 10:00:02,3,900^1,1\n\
13900000003,2026-11-04 10:00:03,3,900^2,2\n\
13900000003,2026-11-04 10:00:03,3,900^2,2\n";

fn prices() -> PriceTable {
    let price = |vendor: &str, account, msg_type, micros| PriceRule {
        vendor: vendor.into(),
        account_id: account,
        country_prefix: None,
        msg_type,
        unit_price_micros: micros,
        currency: "CNY".into(),
    };
    PriceTable::new(vec![
        price("tencent", None, None, 45_000),
        price("tencent", Some(7), Some(MsgType::Marketing), 50_000),
        price("aliyun", None, None, 40_000),
    ])
    .unwrap()
}

async fn run(root: &Path, vendor: &str, bill: &str, format: BillFormat) -> Reconciliation {
    run_in(
        &Warehouse::local(root.join("wh")),
        root,
        vendor,
        bill,
        format,
    )
    .await
}

async fn run_in(
    wh: &Warehouse,
    root: &Path,
    vendor: &str,
    bill: &str,
    format: BillFormat,
) -> Reconciliation {
    let file = root.join(format!("{vendor}.csv"));
    std::fs::write(&file, bill).unwrap();
    let period: Period = "2026-11".parse().unwrap();
    reconcile(
        wh,
        &ReconcileConfig::default(),
        &prices(),
        vendor,
        &file,
        format,
        period,
    )
    .await
    .unwrap()
}

async fn sql(root: &Path, sql: &str) -> String {
    let rows = query(&root.join("wh"), sql).await.unwrap();
    format(&rows, OutputFormat::Csv).unwrap()
}

/// Compares `actual` with `tests/golden/reconcile/<name>`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/reconcile")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual, expected,
        "{name} differs; rerun with UPDATE_GOLDEN=1 to accept"
    );
}

#[tokio::test]
async fn reconcile_finds_each_seeded_discrepancy_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    write_warehouse(&dir.path().join("wh"));
    let report = run(dir.path(), "tencent", TENCENT_BILL, BillFormat::Tencent).await;

    // Every bill row and message, each in exactly one category.
    let rows = sql(
        dir.path(),
        "SELECT category, matched_by, receiver, bill_line, herald_outcome, herald_units, \
         billed_units, expected_micros, billed_micros FROM reconciliation_rows \
         WHERE vendor = 'tencent' AND period = '2026-11' ORDER BY receiver, bill_line",
    )
    .await;
    assert_eq!(
        rows,
        "category,matched_by,receiver,bill_line,herald_outcome,herald_units,billed_units,expected_micros,billed_micros\n\
         matched,vendor_message_id,+8613800000001,2,delivered,1,1,45000,45000\n\
         unit_mismatch,vendor_message_id,+8613800000002,3,delivered,2,3,90000,135000\n\
         billed_though_failed,vendor_message_id,+8613800000003,4,delivery_failed,1,1,,45000\n\
         sent_not_billed,,+8613800000004,,sent,1,,45000,\n\
         billed_though_failed,receiver_time,+8613800000005,7,send_failed,,1,,45000\n\
         matched,receiver_time,+8613800000006,8,delivered,1,1,45000,45000\n\
         failed_not_billed,,+8613800000007,,send_failed,,,,\n\
         matched,vendor_message_id,+8613800000008,5,delivered,1,1,50000,50000\n\
         billed_not_sent,,+8613800000009,6,,,1,,45000\n"
    );

    let daily = format(std::slice::from_ref(&report.daily), OutputFormat::Csv).unwrap();
    assert_eq!(
        daily,
        "day,herald_sends,bill_rows,matched,paired_by_receiver_time,billed_not_sent,sent_not_billed,\
         billed_though_failed,unit_mismatch,failed_not_billed,herald_units,billed_units,\
         expected_micros,billed_micros,difference_micros,unpriced\n\
         2026-11-03,4,4,2,0,0,0,1,1,0,5,6,185000,275000,90000,0\n\
         2026-11-04,4,3,1,2,1,1,1,0,1,2,3,90000,135000,45000,0\n"
    );
    let wh = dir.path().join("wh");
    let report_dir = wh.join("reconciliation/vendor=tencent/period=2026-11");
    let csv = std::fs::read_to_string(report_dir.join("daily.csv")).unwrap();
    assert!(csv.starts_with(&daily), "{csv}");
    assert!(
        csv.ends_with("\ntotal,8,7,3,2,1,1,2,1,1,7,9,275000,410000,135000,0\n"),
        "{csv}"
    );
    let md = std::fs::read_to_string(report_dir.join("summary.md")).unwrap();
    assert_eq!(md, report.summary);
    golden("tencent_summary.md", &md);
    golden("tencent_daily.csv", &csv);
    let html = std::fs::read_to_string(report_dir.join("summary.html")).unwrap();
    assert_eq!(html, report.html);
    golden("tencent_summary.html", &html);

    // A second import of the same period replaces the first, and the report with it.
    let again = run(dir.path(), "tencent", TENCENT_BILL, BillFormat::Tencent).await;
    assert_eq!(again.summary, report.summary);
    assert_eq!(
        sql(
            dir.path(),
            "SELECT vendor, period, count(*) AS n FROM vendor_bills GROUP BY vendor, period"
        )
        .await,
        "vendor,period,n\ntencent,2026-11,7\n"
    );
    assert_eq!(
        sql(
            dir.path(),
            "SELECT count(*) AS n FROM reconciliation_rows WHERE vendor = 'tencent'"
        )
        .await,
        "n\n9\n"
    );
    assert!(
        std::fs::read_dir(wh.join("_reconcile_staging"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[tokio::test]
async fn reconcile_matches_as_well_with_masked_or_hashed_receivers() {
    let clear = tempfile::tempdir().unwrap();
    write_warehouse(&clear.path().join("wh"));
    let expected = run(clear.path(), "tencent", TENCENT_BILL, BillFormat::Tencent).await;
    for privacy in [
        ReceiverPrivacy::Masked,
        ReceiverPrivacy::hashed(b"a key of sixteen+ bytes"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Events as the sink writes them into such a warehouse.
        write_warehouse_with(&dir.path().join("wh"), |e| {
            e.receiver = privacy.apply(&e.receiver).into_owned();
        });
        let wh = Warehouse::local(dir.path().join("wh")).with_receivers(privacy.clone());
        let report = run_in(
            &wh,
            dir.path(),
            "tencent",
            TENCENT_BILL,
            BillFormat::Tencent,
        )
        .await;
        assert_eq!(report.daily, expected.daily, "{privacy:?}");
        // No phone number of the bill is left in clear anywhere in the warehouse.
        for table in ["vendor_bills", "reconciliation_rows", "delivery_events"] {
            assert_eq!(
                sql(
                    dir.path(),
                    &format!(
                        "SELECT count(*) AS n FROM {table} WHERE receiver LIKE '%3800000%' \
                         OR receiver LIKE '%3900000%'"
                    ),
                )
                .await,
                "n\n0\n",
                "{privacy:?} {table}"
            );
        }
    }
}

#[tokio::test]
async fn reconcile_pairs_aliyun_biz_ids_by_receiver_and_catches_a_row_billed_twice() {
    let dir = tempfile::tempdir().unwrap();
    write_warehouse(&dir.path().join("wh"));
    run(dir.path(), "tencent", TENCENT_BILL, BillFormat::Tencent).await;
    let report = run(dir.path(), "aliyun", ALIYUN_BILL, BillFormat::Aliyun).await;
    assert_eq!(
        format(&[report.daily], OutputFormat::Csv).unwrap(),
        "day,herald_sends,bill_rows,matched,paired_by_receiver_time,billed_not_sent,sent_not_billed,\
         billed_though_failed,unit_mismatch,failed_not_billed,herald_units,billed_units,\
         expected_micros,billed_micros,difference_micros,unpriced\n\
         2026-11-03,2,2,2,0,0,0,0,0,0,2,2,80000,80000,0,0\n\
         2026-11-04,2,2,1,0,1,0,0,0,1,2,4,80000,160000,80000,0\n"
    );
    assert_eq!(
        sql(
            dir.path(),
            "SELECT category, receiver, bill_line FROM reconciliation_rows \
             WHERE vendor = 'aliyun' AND category <> 'matched' ORDER BY receiver"
        )
        .await,
        "category,receiver,bill_line\nfailed_not_billed,+8613800000005,\nbilled_not_sent,+8613900000003,5\n"
    );
    // The tencent report is untouched by the aliyun one.
    assert_eq!(
        sql(
            dir.path(),
            "SELECT vendor, count(*) AS n FROM reconciliation_rows GROUP BY vendor ORDER BY vendor"
        )
        .await,
        "vendor,n\naliyun,5\ntencent,9\n"
    );
}

#[tokio::test]
async fn reconcile_expects_the_cost_dispatch_put_on_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    // m1 was sent when a unit cost 0.04 (the table says 0.045 now); m2's cost is in another
    // currency than the vendor's prices, so the table prices it.
    write_warehouse_with(&dir.path().join("wh"), |e| {
        if e.state == State::Sent {
            (e.cost_micros, e.currency) = match e.receiver.as_str() {
                "+8613800000001" => (Some(40_000), Some("CNY".into())),
                "+8613800000002" => (Some(1), Some("USD".into())),
                _ => (None, None),
            };
        }
    });
    run(dir.path(), "tencent", TENCENT_BILL, BillFormat::Tencent).await;
    assert_eq!(
        sql(
            dir.path(),
            "SELECT receiver, category, expected_micros, billed_micros FROM reconciliation_rows \
             WHERE receiver IN ('+8613800000001', '+8613800000002') ORDER BY receiver"
        )
        .await,
        "receiver,category,expected_micros,billed_micros\n\
         +8613800000001,matched,40000,45000\n\
         +8613800000002,unit_mismatch,90000,135000\n"
    );
}

#[tokio::test]
async fn the_html_summary_escapes_what_the_bill_says() {
    let dir = tempfile::tempdir().unwrap();
    write_warehouse(&dir.path().join("wh"));
    let hostile = format!(
        "{TENCENT_BILL}+8613800000077,2026-11-05 09:00:00,1,SUCCESS,\"<script>alert('x')</script>&\"\"\"\n"
    );
    let report = run(dir.path(), "tencent", &hostile, BillFormat::Tencent).await;
    assert!(!report.html.contains("<script>"), "{}", report.html);
    assert!(
        report
            .html
            .contains("<td>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;</td>"),
        "{}",
        report.html
    );
    assert!(
        report
            .html
            .contains("<td>billed_not_sent</td><td>+8613800000077</td>")
    );
}

/// The tencent bill dropped where a schedule looks for it, and the schedule.
fn tencent_schedule(root: &Path, cron: &str, period: PeriodRule) -> ReconcileSchedule {
    let drop = root.join("bills");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("tencent-2026-11.csv"), TENCENT_BILL).unwrap();
    ReconcileSchedule {
        cron: cron.into(),
        vendor: "tencent".into(),
        bills: format!("{}/*.csv", drop.display()),
        period,
        format: None,
    }
}

#[tokio::test]
async fn a_scheduled_run_reconciles_the_newest_bill_for_the_previous_month() {
    let dir = tempfile::tempdir().unwrap();
    write_warehouse(&dir.path().join("wh"));
    let schedule = tencent_schedule(dir.path(), "0 6 1 * *", PeriodRule::PreviousMonth);
    let wh = Warehouse::local(dir.path().join("wh"));
    let schedules =
        Schedules::new(wh, &ReconcileConfig::default(), &prices(), &[schedule]).unwrap();
    // 06:00 on 1 December at UTC+08:00: the previous month is 2026-11.
    let report = schedules.fire(0, at("2026-12-01 06:00:00")).await.unwrap();
    golden("tencent_summary.md", &report.summary);
    golden("tencent_summary.html", &report.html);
    let written = dir
        .path()
        .join("wh/reconciliation/vendor=tencent/period=2026-11/summary.html");
    assert_eq!(std::fs::read_to_string(written).unwrap(), report.html);
}

#[tokio::test]
async fn a_schedule_fires_on_its_cron_and_writes_the_report_into_the_warehouse() {
    let dir = tempfile::tempdir().unwrap();
    let mut schedule = tencent_schedule(dir.path(), "* * * * * *", PeriodRule::CurrentMonth);
    // A bill of this month (at UTC+08:00), so that the run's period holds it.
    let now = Utc::now() + chrono::Duration::hours(8);
    let bill = format!(
        "手机号码,发送时间,计费条数,发送状态,SerialNo\n+8613800000001,{},1,SUCCESS,2019:1\n",
        now.format("%Y-%m-%d %H:%M:%S")
    );
    schedule.bills = dir.path().join("this-month.csv").display().to_string();
    std::fs::write(&schedule.bills, bill).unwrap();
    let wh = Warehouse::local(dir.path().join("wh"));
    let schedules =
        Schedules::new(wh, &ReconcileConfig::default(), &prices(), &[schedule]).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(schedules.run(rx));
    let report = dir.path().join(format!(
        "wh/reconciliation/vendor=tencent/period={}/summary.html",
        now.format("%Y-%m")
    ));
    wait_for_report(&report, "the schedule never ran").await;
    tx.send(true).unwrap();
    task.await.unwrap();
}

/// The one schedule state file in the warehouse under `root` (no staged file left beside it).
fn schedule_state_file(root: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(root.join("wh/_reconcile/schedules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

/// The last firing the one schedule of the warehouse under `root` recorded.
fn last_fired(root: &Path) -> DateTime<Utc> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(schedule_state_file(root)).unwrap()).unwrap();
    assert_eq!(state["vendor"], "tencent", "{state}");
    state["last_fired"].as_str().unwrap().parse().unwrap()
}

/// The periods tencent has a report for in the warehouse under `root`.
fn report_periods(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join("wh/reconciliation/vendor=tencent")) {
        Ok(dirs) => dirs
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `schedule` over the warehouse under `root`.
fn tencent_schedules(root: &Path, schedule: &ReconcileSchedule) -> Schedules {
    let wh = Warehouse::local(root.join("wh"));
    Schedules::new(
        wh,
        &ReconcileConfig::default(),
        &prices(),
        std::slice::from_ref(schedule),
    )
    .unwrap()
}

#[tokio::test]
async fn a_schedule_catches_up_only_its_latest_missed_firing() {
    let dir = tempfile::tempdir().unwrap();
    write_warehouse(&dir.path().join("wh"));
    let schedule = tencent_schedule(dir.path(), "0 6 1 * *", PeriodRule::PreviousMonth);
    let schedules = tencent_schedules(dir.path(), &schedule);
    // First started on 20 October: nothing to catch up.
    let first_start = at("2026-10-20 00:00:00");
    assert_eq!(schedules.catch_up(first_start).await, vec![]);
    assert_eq!(last_fired(dir.path()), first_start);
    // Stopped until 05:00 on 1 January: of the firings on 1 November and 1 December, only the
    // latest runs, for its own previous month (2026-11), not the month before now (2026-12).
    let missed = at("2026-12-01 06:00:00");
    assert_eq!(
        schedules.catch_up(at("2027-01-01 05:00:00")).await,
        vec![(0, missed)]
    );
    assert_eq!(report_periods(dir.path()), ["period=2026-11"]);
    let md = dir
        .path()
        .join("wh/reconciliation/vendor=tencent/period=2026-11/summary.md");
    golden("tencent_summary.md", &std::fs::read_to_string(md).unwrap());
    assert_eq!(last_fired(dir.path()), missed);
    // Started again before the next firing: nothing fires.
    assert_eq!(schedules.catch_up(at("2027-01-01 05:59:59")).await, vec![]);
    assert_eq!(last_fired(dir.path()), missed);
    // A failed firing is recorded too: on 1 January it reconciles 2026-12, which the bill's
    // rows are outside of.
    let failing = at("2027-01-01 06:00:00");
    assert_eq!(schedules.catch_up(failing).await, vec![(0, failing)]);
    assert_eq!(report_periods(dir.path()), ["period=2026-11"]);
    assert_eq!(last_fired(dir.path()), failing);
}

#[tokio::test]
async fn a_new_or_unreadable_schedule_state_fires_nothing_and_records_the_start() {
    let dir = tempfile::tempdir().unwrap();
    write_warehouse(&dir.path().join("wh"));
    let schedule = tencent_schedule(dir.path(), "0 6 1 * *", PeriodRule::PreviousMonth);
    let schedules = tencent_schedules(dir.path(), &schedule);
    let start = at("2026-12-15 00:00:00");
    assert_eq!(schedules.catch_up(start).await, vec![]);
    assert_eq!(last_fired(dir.path()), start);
    // An unreadable state file: a warning, and the schedule starts afresh.
    std::fs::write(schedule_state_file(dir.path()), "{not json").unwrap();
    let restart = at("2027-02-15 00:00:00");
    assert_eq!(schedules.catch_up(restart).await, vec![]);
    assert_eq!(last_fired(dir.path()), restart);
    assert!(report_periods(dir.path()).is_empty());
}

#[tokio::test]
async fn a_schedule_firing_missed_while_the_role_was_stopped_runs_at_its_start() {
    let dir = tempfile::tempdir().unwrap();
    // The latest firing of `0 6 1 * *` (at UTC+08:00) by now, and the month it reconciles.
    let now = Utc::now();
    let offset = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
    let this_month = Period::containing(now, offset);
    let mut missed = this_month.start(offset) + chrono::Duration::hours(6);
    if missed > now {
        missed = this_month.previous().start(offset) + chrono::Duration::hours(6);
    }
    let period = Period::containing(missed, offset).previous();
    let mut schedule = tencent_schedule(dir.path(), "0 6 1 * *", PeriodRule::PreviousMonth);
    let sent = period.start(offset) + chrono::Duration::hours(8 + 24);
    let bill = format!(
        "手机号码,发送时间,计费条数,发送状态,SerialNo\n+8613800000001,{},1,SUCCESS,2019:1\n",
        sent.format("%Y-%m-%d %H:%M:%S")
    );
    schedule.bills = dir.path().join("last-month.csv").display().to_string();
    std::fs::write(&schedule.bills, bill).unwrap();
    // Last started (and stopped) 40 days before the missed firing.
    let stopped = missed - chrono::Duration::days(40);
    assert_eq!(
        tencent_schedules(dir.path(), &schedule)
            .catch_up(stopped)
            .await,
        vec![]
    );

    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(tencent_schedules(dir.path(), &schedule).run(rx));
    let report = dir.path().join(format!(
        "wh/reconciliation/vendor=tencent/period={period}/summary.html"
    ));
    wait_for_report(&report, "the missed firing was not caught up").await;
    tx.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(report_periods(dir.path()), [format!("period={period}")]);
    assert_eq!(last_fired(dir.path()), missed);
}

/// A month of `HERALD_RECONCILE_SENDS` sends (default 1,000,000) against a bill of as many
/// lines, timed (issue 6 asks for 10 million in under 60 s). Not run by default:
/// `HERALD_RECONCILE_SENDS=10000000 cargo nextest run --release -E 'test(reconcile_at_scale)'
/// --run-ignored only --no-capture`.
#[tokio::test]
#[ignore = "a timing run, minutes long at 10 million sends"]
async fn reconcile_at_scale() {
    use std::io::Write;
    let n: u64 = std::env::var("HERALD_RECONCILE_SENDS")
        .map_or(1_000_000, |v| v.parse().expect("a number of sends"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("wh");
    let start = at("2026-11-01 00:00:00");
    let step_us = 30 * 86_400_000_000 / i64::try_from(n).unwrap();
    let ts = |i: u64| start + chrono::Duration::microseconds(step_us * i as i64);
    let units = |i: u64| 1 + u32::from(i.is_multiple_of(3));
    const CHUNK: u64 = 500_000;
    let t = std::time::Instant::now();
    for first in (0..n).step_by(CHUNK as usize) {
        let events: Vec<DeliveryEvent> = (first..n.min(first + CHUNK))
            .map(|i| {
                let e = Ev {
                    n: u128::from(i) + 1,
                    state: State::Sent,
                    local: "",
                    vendor: Some("tencent"),
                    account: 7,
                    receiver: "",
                    vendor_id: None,
                    units: Some(units(i)),
                    msg_type: MsgType::Notice,
                };
                DeliveryEvent {
                    ts: ts(i),
                    receiver: format!("+86138{i:08}"),
                    vendor_message_id: Some(format!("2019:{i}")),
                    ..to_event_at(&e)
                }
            })
            .collect();
        let dir = root.join(
            events[0]
                .ts
                .format("delivery_events/dt=%Y-%m-%d/hour=%H")
                .to_string(),
        );
        std::fs::create_dir_all(&dir).unwrap();
        let batch = events_to_batch(&events);
        let file = std::fs::File::create(dir.join(format!("part-{first}.parquet"))).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    // Every 1000th send not billed, the next one billed for a unit more, and one row in a
    // thousand billed for nothing herald sent.
    let bill = dir.path().join("bill.csv");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&bill).unwrap());
    writeln!(w, "手机号码,发送时间,计费条数,发送状态,SerialNo").unwrap();
    let local = |i: u64| {
        (ts(i) + chrono::Duration::hours(8))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    for i in 0..n {
        match i % 1000 {
            1 => continue,
            2 => writeln!(
                w,
                "+86138{i:08},{},{},SUCCESS,2019:{i}",
                local(i),
                units(i) + 1
            ),
            _ => writeln!(w, "+86138{i:08},{},{},SUCCESS,2019:{i}", local(i), units(i)),
        }
        .unwrap();
        if i.is_multiple_of(1000) {
            writeln!(w, "+86139{i:08},{},1,SUCCESS,x:{i}", local(i)).unwrap();
        }
    }
    w.flush().unwrap();
    println!("generated {n} sends and the bill in {:.1?}", t.elapsed());

    let wh = Warehouse::local(&root);
    let period: Period = "2026-11".parse().unwrap();
    let t = std::time::Instant::now();
    let report = reconcile(
        &wh,
        &ReconcileConfig::default(),
        &prices(),
        "tencent",
        &bill,
        BillFormat::Tencent,
        period,
    )
    .await
    .unwrap();
    let whole = t.elapsed();
    let t = std::time::Instant::now();
    herald_analytics::reconcile::run_report(
        &wh,
        &ReconcileConfig::default(),
        &prices(),
        "tencent",
        period,
    )
    .await
    .unwrap();
    let report_only = t.elapsed();
    println!(
        "reconcile of {n} sends: {whole:.1?} (import {:.1?}, match and report {report_only:.1?})",
        whole.saturating_sub(report_only)
    );
    let csv = format(std::slice::from_ref(&report.daily), OutputFormat::Csv).unwrap();
    let thousandths = n.div_ceil(1000);
    let sum = |col: &str| -> u64 {
        let i = csv
            .lines()
            .next()
            .unwrap()
            .split(',')
            .position(|c| c == col)
            .unwrap();
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').nth(i).unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(sum("herald_sends"), n);
    assert_eq!(sum("billed_not_sent"), thousandths);
    assert_eq!(sum("sent_not_billed"), (n + 998) / 1000);
    assert_eq!(sum("unit_mismatch"), (n + 997) / 1000);
}

/// Waits up to 20 s for a scheduled run to write the HTML summary at `report` (failing with
/// `never` otherwise), and checks it shows the seeded discrepancy.
async fn wait_for_report(report: &std::path::Path, never: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !report.exists() {
        assert!(std::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let html = std::fs::read_to_string(report).unwrap();
    assert!(
        html.contains("<td>billed_not_sent</td><td>+8613800000001</td>"),
        "{html}"
    );
}

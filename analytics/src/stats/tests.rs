use super::*;
use crate::compact::{CompactConfig, Compactor};
use crate::schema::events_to_batch;
use crate::sink::{Sink, SinkConfig};
use crate::sql::{OutputFormat, format, query_warehouse};
use crate::testing::{MemBus, TestWarehouse, blocking as on_blocking, sample_events, t0};
use crate::{CONSUMER_GROUP, NoIndex};
use herald_core::DeliveryEvent;
use herald_core::bus::Bus;
use herald_core::wire::DELIVERY_TOPIC;
use std::path::Path;
use std::sync::atomic::Ordering;

/// The stats columns the golden files and comparisons show, in a stable order.
const ORDER: &str = "ORDER BY window_start, app, template_id, channel, vendor NULLS FIRST, \
    state, currency NULLS FIRST";

/// `n` sample events (from `start`) moved to `at + i × step_s` seconds (plus a few ms, so
/// latencies and times vary), all of app `shop` and template 10 so that groups hold several
/// events.
fn events_at(n: usize, start: usize, at: DateTime<Utc>, step_s: i64) -> Vec<DeliveryEvent> {
    let mut events = sample_events(n, start);
    for (i, e) in events.iter_mut().enumerate() {
        e.ts = at + TimeDelta::seconds(step_s * i as i64) + TimeDelta::milliseconds(i as i64 * 7);
        e.app = "shop".into();
        e.template_id = 10;
    }
    events
}

/// Writes `events` into `delivery_events` as files of on-time events, one per event.
fn write_events(wh: &Warehouse, events: &[DeliveryEvent]) {
    for (n, e) in events.iter().enumerate() {
        let key = format!(
            "{}/part-{n:020}-0000.parquet",
            Warehouse::partition_of(e.ts)
        );
        wh.write_parquet(&key, &events_to_batch(std::slice::from_ref(e)))
            .unwrap();
    }
}

async fn csv(wh: &Warehouse, sql: &str) -> String {
    format(&query_warehouse(wh, sql).await.unwrap(), OutputFormat::Csv).unwrap()
}

/// The stats table of `width` (without its partition columns), ordered.
async fn table(wh: &Warehouse, width: Width) -> String {
    let cols = stats_schema(width)
        .await
        .unwrap()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect::<Vec<_>>()
        .join(", ");
    csv(wh, &format!("SELECT {cols} FROM {} {ORDER}", width.table())).await
}

/// Compares `actual` with the checked-in `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        actual, expected,
        "{name} differs; rerun with UPDATE_GOLDEN=1 to accept"
    );
}

/// The events of the golden files: 90 over an hour and a half, from 07:00.
fn golden_events() -> Vec<DeliveryEvent> {
    events_at(90, 0, t0(), 61)
}

async fn aggregator(wh: &Warehouse, sink: Arc<SinkStats>) -> Aggregator {
    Aggregator::open(wh.clone(), sink, Duration::from_secs(3600))
        .await
        .unwrap()
}

/// A local warehouse holding the [`golden_events`], and an aggregator of it that has not run
/// a pass yet.
async fn golden_warehouse() -> (TestWarehouse, Aggregator) {
    let wh = TestWarehouse::local();
    let events = golden_events();
    on_blocking(&wh.wh, move |wh| write_events(wh, &events)).await;
    let agg = aggregator(&wh.wh, Arc::default()).await;
    (wh, agg)
}

#[tokio::test]
async fn stats_match_the_golden_files_and_the_query_over_all_events() {
    let (wh, mut agg) = golden_warehouse().await;
    let wh = &wh.wh;
    assert_eq!(agg.pass().await.unwrap(), 2, "hours 07 and 08");

    for (width, name) in [
        (Width::Minute, "stats_minute.csv"),
        (Width::Hour, "stats_hour.csv"),
    ] {
        let stats = table(wh, width).await;
        golden(name, &stats);
        // With nothing late, the stats are the shipped query over the whole table.
        let direct = csv(wh, &width.sql()).await;
        assert_eq!(stats, direct, "{name}");
    }
    let hour = format(
        &query_warehouse(
            wh,
            &format!("SELECT * FROM {HOUR_TABLE} WHERE state IN ('sent', 'delivered') {ORDER}"),
        )
        .await
        .unwrap(),
        OutputFormat::Table,
    )
    .unwrap();
    golden("stats_hour_sent.txt", &hour);

    // Nothing changed: a second pass recomputes nothing.
    assert_eq!(agg.pass().await.unwrap(), 0);
}

#[tokio::test]
async fn an_empty_warehouse_has_empty_stats_tables() {
    let wh = TestWarehouse::local();
    for width in [Width::Minute, Width::Hour] {
        let sql = format!(
            "SELECT count(*) AS n FROM {} WHERE dt = '2026-11-26'",
            width.table()
        );
        assert_eq!(csv(&wh.wh, &sql).await, "n\n0\n");
    }
    let mut agg = aggregator(&wh.wh, Arc::default()).await;
    assert_eq!(agg.pass().await.unwrap(), 0);
}

#[test]
fn lateness_is_judged_per_window_end() {
    let w = Some(t0() + TimeDelta::minutes(90)); // 08:30
    let at = |m: i64, s: i64| t0() + TimeDelta::minutes(m) + TimeDelta::seconds(s);
    assert_eq!(Lateness::of(at(0, 0), None), Lateness::OnTime);
    assert_eq!(Lateness::of(at(59, 59), w), Lateness::LateHour); // 07:59:59, hour ended 08:00
    assert_eq!(Lateness::of(at(60, 0), w), Lateness::LateMinute); // 08:00, minute ended 08:01
    assert_eq!(Lateness::of(at(89, 59), w), Lateness::LateMinute); // 08:29:59
    assert_eq!(Lateness::of(at(90, 0), w), Lateness::OnTime); // 08:30
    for l in [Lateness::OnTime, Lateness::LateMinute, Lateness::LateHour] {
        let name = format!("part-00000000000000000001-0000{}.parquet", l.suffix());
        assert_eq!(
            Lateness::of_file(&format!("{TABLE}/dt=x/hour=07/{name}")),
            Some(l)
        );
    }
    for other in [
        "part-1-0000.parquet.tmp",
        "part-1-x.parquet",
        "x-1-0000.parquet",
        "a.parquet",
    ] {
        assert_eq!(Lateness::of_file(other), None, "{other}");
    }
}

fn sink_config() -> SinkConfig {
    SinkConfig {
        poll_timeout: Duration::from_millis(2),
        ..SinkConfig::default()
    }
}

async fn sink(bus: &MemBus, wh: &Warehouse) -> Sink {
    let b: Arc<dyn Bus> = Arc::new(bus.clone());
    Sink::recover(b, wh.clone(), Arc::new(NoIndex), sink_config())
        .await
        .unwrap()
}

/// Publishes `events` and writes them to the warehouse (one flush).
async fn flush(bus: &MemBus, sink: &mut Sink, events: &[DeliveryEvent]) {
    bus.publish_events(events).await;
    sink.process_available().await.unwrap();
}

/// `SELECT sum(events)` of `table` in the window starting at `window` (UTC, `HH:MM`).
async fn events_in(wh: &Warehouse, table: &str, window: &str) -> String {
    let sql = format!(
        "SELECT coalesce(sum(events), 0) AS n FROM {table} \
         WHERE window_start = TIMESTAMP '2026-11-26T{window}:00Z'"
    );
    csv(wh, &sql)
        .await
        .trim_start_matches("n\n")
        .trim()
        .to_string()
}

/// One event at 07:00 + `minutes`, numbered `n` (its message id).
fn one_at(n: usize, minutes: i64) -> DeliveryEvent {
    events_at(1, n, t0() + TimeDelta::minutes(minutes), 0).remove(0)
}

#[tokio::test]
async fn late_events_update_open_windows_and_are_counted_when_too_late() {
    let (wh, bus) = (TestWarehouse::local(), MemBus::default());
    let wh = &wh.wh;
    let mut sink = sink(&bus, wh).await;
    let mut agg = aggregator(wh, sink.stats()).await;
    // 07:00 to 10:30, one every ten minutes: the watermark is 09:30.
    flush(&bus, &mut sink, &events_at(22, 0, t0(), 600)).await;
    agg.pass().await.unwrap();
    assert_eq!(events_in(wh, MINUTE_TABLE, "09:45").await, "0");
    assert_eq!(events_in(wh, HOUR_TABLE, "09:00").await, "6");
    assert_eq!(events_in(wh, MINUTE_TABLE, "09:10").await, "1");
    assert_eq!(events_in(wh, HOUR_TABLE, "08:00").await, "6");

    // 45 min behind the newest event: within the lateness, every window counts it.
    // 80 min behind: its minute window has closed, its hour has not.
    // 135 min behind: its hour closed at 09:00 + 0:30 < 09:30.
    let late = [one_at(100, 165), one_at(101, 130), one_at(102, 75)];
    flush(&bus, &mut sink, &late).await;
    assert_eq!(agg.pass().await.unwrap(), 1, "only hour 09 changed");
    assert_eq!(events_in(wh, MINUTE_TABLE, "09:45").await, "1");
    assert_eq!(events_in(wh, HOUR_TABLE, "09:00").await, "8");
    assert_eq!(
        events_in(wh, MINUTE_TABLE, "09:10").await,
        "1",
        "closed minute"
    );
    assert_eq!(events_in(wh, HOUR_TABLE, "08:00").await, "6", "closed hour");
    assert_eq!(events_in(wh, MINUTE_TABLE, "08:15").await, "0");

    // Every event is in delivery_events; the late ones are counted by the table they miss.
    let all = csv(wh, "SELECT count(*) AS n FROM delivery_events").await;
    assert_eq!(all, "n\n25\n");
    let stats = sink.stats();
    assert_eq!(stats.late_for_minute.load(Ordering::Relaxed), 2);
    assert_eq!(stats.late_for_hour.load(Ordering::Relaxed), 1);
    let files = |dir: &str| {
        let mut names = wh
            .list(&format!("delivery_events/dt=2026-11-26/{dir}"))
            .unwrap();
        names.sort();
        names
    };
    assert!(
        files("hour=08")
            .iter()
            .any(|f| f.ends_with("-late_hour.parquet"))
    );
    assert!(
        files("hour=09")
            .iter()
            .any(|f| f.ends_with("-late_minute.parquet"))
    );

    // The verdict is kept across a restart of the sink: the watermark comes from the manifest.
    drop(sink);
    let mut sink = self::sink(&bus, wh).await;
    flush(&bus, &mut sink, &[one_at(103, 70)]).await;
    assert_eq!(sink.stats().late_for_hour.load(Ordering::Relaxed), 1);
    assert_eq!(bus.lag(DELIVERY_TOPIC, CONSUMER_GROUP).await.unwrap(), 0);
}

#[tokio::test]
async fn an_event_dated_far_ahead_does_not_close_every_window() {
    let (wh, bus) = (TestWarehouse::local(), MemBus::default());
    let wh = &wh.wh;
    let mut sink = sink(&bus, wh).await;
    let now = Utc::now();
    // Up to a quarter of an hour ago; then a receipt dated a year ahead (a vendor's bad clock).
    flush(
        &bus,
        &mut sink,
        &events_at(10, 0, now - TimeDelta::minutes(60), 300),
    )
    .await;
    flush(
        &bus,
        &mut sink,
        &events_at(1, 10, now + TimeDelta::days(365), 0),
    )
    .await;
    // Half an hour behind the newest sane event, within the hour's lateness: still on time.
    flush(
        &bus,
        &mut sink,
        &events_at(1, 11, now - TimeDelta::minutes(30), 0),
    )
    .await;
    let stats = sink.stats();
    assert_eq!(stats.late_for_minute.load(Ordering::Relaxed), 0);
    assert_eq!(stats.late_for_hour.load(Ordering::Relaxed), 0);
    // The far event is kept with its own time.
    let ahead = csv(
        wh,
        &format!(
            "SELECT count(*) AS n FROM delivery_events WHERE ts > TIMESTAMP '{}'",
            (now + TimeDelta::days(300)).format("%Y-%m-%dT%H:%M:%S")
        ),
    )
    .await;
    assert_eq!(ahead, "n\n1\n");
}

/// The stats of both tables recomputed from scratch: the shipped query over a copy of
/// `delivery_events` without the files each table leaves out.
async fn expected_from_events(wh: &Warehouse) -> [String; 2] {
    let mut out = [String::new(), String::new()];
    for (i, (width, left_out)) in [
        (
            Width::Minute,
            &["-late_minute.parquet", "-late_hour.parquet"][..],
        ),
        (Width::Hour, &["-late_hour.parquet"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let copy = TestWarehouse::local();
        let to = copy.wh.clone();
        on_blocking(wh, move |from| {
            for dt in from.dirs(TABLE).unwrap() {
                for hour in from.dirs(&format!("{TABLE}/{dt}")).unwrap() {
                    let dir = format!("{TABLE}/{dt}/{hour}");
                    for f in from.list(&dir).unwrap() {
                        if !left_out.iter().any(|s| f.ends_with(s)) {
                            let key = format!("{dir}/{f}");
                            to.put_new(&key, &from.get(&key).unwrap()).unwrap();
                        }
                    }
                }
            }
        })
        .await;
        out[i] = csv(&copy.wh, &width.sql()).await;
    }
    out
}

#[tokio::test]
async fn stats_recomputed_after_a_crash_equal_the_events() {
    let (wh, bus) = (TestWarehouse::local(), MemBus::default());
    let wh = &wh.wh;
    let mut sink = sink(&bus, wh).await;
    let mut agg = aggregator(wh, sink.stats()).await;
    flush(&bus, &mut sink, &events_at(10, 0, t0(), 60)).await; // 07:00-07:09
    agg.pass().await.unwrap();

    // More of hour 07, then an event that closes it (watermark 08:30): a pass that runs now
    // must still count the first flush, though hour 07 is closed by then.
    flush(
        &bus,
        &mut sink,
        &events_at(20, 10, t0() + TimeDelta::minutes(20), 60),
    )
    .await;
    flush(&bus, &mut sink, &[one_at(30, 150)]).await;
    // The aggregator crashes after writing the minute file of hour 07, before its hour file.
    agg.crash_after_writes = Some(1);
    let err = agg.pass().await.unwrap_err();
    assert!(err.to_string().contains("injected crash"), "{err}");
    drop(agg);
    // A staged stats file left by the crash is removed on start.
    on_blocking(wh, |wh| {
        wh.put_new(&format!("{STAGING}/x.parquet"), b"junk")
            .unwrap()
    })
    .await;
    // Late for hour 07 (not counted), while the aggregator is down; the sink restarts too.
    drop(sink);
    let mut sink = self::sink(&bus, wh).await;
    flush(&bus, &mut sink, &[one_at(31, 5)]).await;

    let mut agg = aggregator(wh, sink.stats()).await;
    assert!(
        on_blocking(wh, |wh| wh.list(STAGING).unwrap())
            .await
            .is_empty()
    );
    assert_eq!(agg.pass().await.unwrap(), 2, "hours 07 and 09 recomputed");
    assert_eq!(events_in(wh, HOUR_TABLE, "07:00").await, "30");
    assert_eq!(events_in(wh, MINUTE_TABLE, "07:25").await, "1");
    let [minute, hour] = expected_from_events(wh).await;
    assert_eq!(table(wh, Width::Minute).await, minute);
    assert_eq!(table(wh, Width::Hour).await, hour);
    assert_eq!(sink.stats().late_for_hour.load(Ordering::Relaxed), 1);

    // A restart with everything computed changes nothing, and recomputes only open hours.
    let before = [table(wh, Width::Minute).await, table(wh, Width::Hour).await];
    let mut agg = aggregator(wh, sink.stats()).await;
    assert_eq!(agg.pass().await.unwrap(), 1, "hour 09 is still open");
    assert_eq!(
        before,
        [table(wh, Width::Minute).await, table(wh, Width::Hour).await]
    );
}

#[tokio::test]
async fn pyarrow_reads_the_same_figures() {
    let (wh, bus) = (TestWarehouse::local(), MemBus::default());
    let wh = &wh.wh;
    let root = wh.to_string();
    let mut sink = sink(&bus, wh).await;
    let mut agg = aggregator(wh, sink.stats()).await;
    flush(&bus, &mut sink, &events_at(150, 0, t0(), 41)).await; // 07:00 to 08:42
    // Late for both tables, for the minute table only, and on time.
    flush(
        &bus,
        &mut sink,
        &[one_at(200, -10), one_at(201, 5), one_at(202, 100)],
    )
    .await;
    agg.pass().await.unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/check_stats.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&root)
        .output()
        .expect("python3 with pyarrow is needed");
    assert!(
        out.status.success(),
        "pyarrow check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read["mismatches"], serde_json::json!([]), "{read}");
    let rows = |table: &str| {
        let table = table.to_string();
        async move {
            let n = csv(wh, &format!("SELECT count(*) AS n FROM {table}")).await;
            n.trim_start_matches("n\n").trim().parse::<u64>().unwrap()
        }
    };
    assert_eq!(read["minute_rows"], rows(MINUTE_TABLE).await);
    assert_eq!(read["hour_rows"], rows(HOUR_TABLE).await);
    assert_eq!(
        read["events_counted"],
        serde_json::json!({"minute": 151, "hour": 152})
    );
}

#[tokio::test]
async fn s3_stats_are_computed_in_an_object_store() {
    let wh = TestWarehouse::s3().await;
    let wh = &wh.wh;
    let events = golden_events();
    on_blocking(wh, move |wh| write_events(wh, &events)).await;
    let mut agg = aggregator(wh, Arc::default()).await;
    assert_eq!(agg.pass().await.unwrap(), 2);
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for (width, name) in [
        (Width::Minute, "stats_minute.csv"),
        (Width::Hour, "stats_hour.csv"),
    ] {
        let expected = std::fs::read_to_string(golden_path.join(name)).unwrap();
        assert_eq!(table(wh, width).await, expected, "{name}");
    }
    assert_eq!(agg.pass().await.unwrap(), 0);
}

/// Passes between flushes add only the new files to an hour's state; a compaction that merges
/// files a state counted makes the next pass read that hour again. After every pass both
/// tables equal the shipped query over the files (events of several apps, templates,
/// channels, vendors and states; some late for their minute).
#[tokio::test]
async fn incremental_passes_and_compaction_give_the_querys_tables() {
    let (wh, bus) = (TestWarehouse::local(), MemBus::default());
    let wh = &wh.wh;
    let mut sink = sink(&bus, wh).await;
    let mut agg = aggregator(wh, sink.stats()).await;
    let round = |k: usize| {
        let mut events = sample_events(40, k * 40);
        for (i, e) in events.iter_mut().enumerate() {
            // Spread over 07:00–08:59, each round all over both hours.
            let s = ((k * 40 + i) * 4517) % 7200;
            e.ts = t0() + TimeDelta::seconds(s as i64) + TimeDelta::microseconds(i as i64);
        }
        events
    };
    let check = async |what: &str| {
        let [minute, hour] = expected_from_events(wh).await;
        assert_eq!(table(wh, Width::Minute).await, minute, "{what}");
        assert_eq!(table(wh, Width::Hour).await, hour, "{what}");
    };
    for k in 0..6 {
        flush(&bus, &mut sink, &round(k)).await;
        assert_eq!(agg.pass().await.unwrap(), 2, "round {k}: hours 07 and 08");
        check(&format!("round {k}")).await;
    }
    let late = sink.stats().late_for_minute.load(Ordering::Relaxed);
    assert!(late > 0, "no event was late for its minute");
    let config = CompactConfig {
        after: Duration::ZERO,
        min_files: 2,
        target_bytes: u64::MAX,
    };
    let merged = Compactor::new(wh.clone(), config).pass().await.unwrap();
    assert!(merged.files_merged > 0, "{merged:?}");
    assert_eq!(agg.pass().await.unwrap(), 1, "hour 07, compacted");
    check("after compaction").await;
    flush(&bus, &mut sink, &round(6)).await;
    agg.pass().await.unwrap();
    check("a round after compaction").await;
}

#[tokio::test]
async fn a_query_in_the_process_holds_off_the_replacement_of_a_stats_file() {
    let (wh, mut agg) = golden_warehouse().await;
    let wh = &wh.wh;
    let file = Width::Hour.file(t0());

    let query = wh.reading().await;
    let pass = tokio::spawn(async move { agg.pass().await });
    // The pass computes the hours, then waits for the query before moving a file into place.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pass.is_finished(), "the pass did not wait for the query");
    let written = on_blocking(wh, move |wh| wh.exists(&file).unwrap()).await;
    assert!(!written, "a stats file was replaced under a running query");

    drop(query);
    assert_eq!(pass.await.unwrap().unwrap(), 2);
    assert!(!table(wh, Width::Hour).await.is_empty());
}

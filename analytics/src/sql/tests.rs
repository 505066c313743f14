use super::*;
use crate::testing::{TestWarehouse, blocking, sample_events, write_events};
use herald_core::DeliveryEvent;

/// Every column of the sample events the golden files show.
const GOLDEN_EVENTS: &str = "SELECT dt, hour, ts, message_id, app, channel, msg_type, state, \
    vendor, attempt, error_code, error_detail, latency_ms, billing_units, cost_micros, currency \
    FROM delivery_events ORDER BY ts, event_id";

/// Writes `events` into their `delivery_events` partitions, one file per event.
fn write_table(root: &Path, events: &[DeliveryEvent]) {
    write_events(&Warehouse::local(root), events);
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

#[tokio::test]
async fn query_results_match_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), &sample_events(6, 35));
    let rows = query(dir.path(), GOLDEN_EVENTS).await.unwrap();
    golden("events.txt", &format(&rows, OutputFormat::Table).unwrap());
    golden("events.csv", &format(&rows, OutputFormat::Csv).unwrap());
    golden("events.jsonl", &format(&rows, OutputFormat::Json).unwrap());

    let totals = query(
        dir.path(),
        "SELECT app, state, count(*) AS events, sum(cost_micros) AS cost_micros \
         FROM delivery_events GROUP BY app, state ORDER BY app, state",
    )
    .await
    .unwrap();
    golden("totals.txt", &format(&totals, OutputFormat::Table).unwrap());
}

#[tokio::test]
async fn statements_that_write_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), &sample_events(2, 0));
    let out = dir.path().join("out.csv");
    for sql in [
        "DROP TABLE delivery_events".to_string(),
        "CREATE TABLE t AS SELECT 1 AS x".to_string(),
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp'".to_string(),
        "CREATE VIEW v AS SELECT 1".to_string(),
        "INSERT INTO delivery_events SELECT * FROM delivery_events".to_string(),
        format!("COPY (SELECT 1) TO '{}' STORED AS CSV", out.display()),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let err = query(dir.path(), &sql).await.unwrap_err();
        assert!(err.to_string().contains("not supported"), "{sql}: {err}");
    }
    assert!(!out.exists());
    let rows = query(dir.path(), "SELECT count(*) FROM delivery_events")
        .await
        .unwrap();
    assert!(format(&rows, OutputFormat::Csv).unwrap().ends_with("\n2\n"));
}

#[tokio::test]
async fn an_empty_or_missing_warehouse_has_an_empty_delivery_events_table() {
    let dir = tempfile::tempdir().unwrap();
    for root in [dir.path().to_path_buf(), dir.path().join("missing")] {
        let sql = "SELECT count(*) AS n, max(dt) AS dt FROM delivery_events WHERE state = 'sent'";
        let rows = query(&root, sql).await.unwrap();
        assert_eq!(format(&rows, OutputFormat::Csv).unwrap(), "n,dt\n0,\n");
    }
    assert!(!dir.path().join("missing").exists());
}

#[tokio::test]
async fn a_filter_on_dt_skips_other_days_files() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), &sample_events(3, 0));
    // An unreadable file in another day's partition: only pruning lets the query succeed.
    let bad = dir
        .path()
        .join("delivery_events/dt=2026-11-27/hour=00/part-x.parquet");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, b"not parquet").unwrap();

    let sql = "SELECT count(*) AS n FROM delivery_events WHERE dt = '2026-11-26' AND hour = '07'";
    let rows = query(dir.path(), sql).await.unwrap();
    assert_eq!(format(&rows, OutputFormat::Csv).unwrap(), "n\n3\n");
    assert!(
        query(dir.path(), "SELECT count(*) FROM delivery_events")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_aggregate_grouped_by_dt_and_hour_runs_in_one_phase_over_many_hour_partitions() {
    // More hour partitions than target partitions (what `hive_aware` asks for): two events in
    // each, on alternating apps.
    let partitions = std::thread::available_parallelism().map_or(1, |n| n.get());
    let hours = 4 * partitions + 1;
    let mut events = sample_events(2 * hours, 0);
    for (i, event) in events.iter_mut().enumerate() {
        event.ts = crate::testing::t0() + chrono::Duration::hours((i / 2) as i64);
    }
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), &events);

    let sql = "SELECT dt, hour, app, count(*) AS events, \
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50 \
               FROM delivery_events GROUP BY dt, hour, app";
    let plan = format(
        &query(dir.path(), &format!("EXPLAIN {sql}")).await.unwrap(),
        OutputFormat::Csv,
    )
    .unwrap();
    assert!(plan.contains("mode=SinglePartitioned"), "{plan}");
    assert!(!plan.contains("RepartitionExec"), "{plan}");

    let rows = query(
        dir.path(),
        &format!("SELECT count(*) AS groups, sum(events) AS events FROM ({sql})"),
    )
    .await
    .unwrap();
    assert_eq!(
        format(&rows, OutputFormat::Csv).unwrap(),
        format!("groups,events\n{},{}\n", 2 * hours, 2 * hours)
    );
}

#[tokio::test]
async fn other_tables_are_registered_with_their_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let batch = query(
        dir.path(),
        "SELECT 'shop' AS app, CAST(3 AS BIGINT) AS sent",
    )
    .await
    .unwrap();
    Warehouse::local(dir.path())
        .write_parquet("daily_sent/dt=2026-11-26/part-0.parquet", &batch[0])
        .unwrap();
    std::fs::create_dir_all(dir.path().join("empty_table")).unwrap();
    std::fs::create_dir_all(dir.path().join("_manifests")).unwrap();

    let rows = query(
        dir.path(),
        "SELECT dt, app, sent FROM daily_sent WHERE dt = '2026-11-26'",
    )
    .await
    .unwrap();
    assert_eq!(
        format(&rows, OutputFormat::Json).unwrap(),
        "{\"dt\":\"2026-11-26\",\"app\":\"shop\",\"sent\":3}\n"
    );
}

#[test]
fn output_formats_parse_from_their_names() {
    assert_eq!("csv".parse::<OutputFormat>(), Ok(OutputFormat::Csv));
    assert_eq!("table".parse::<OutputFormat>(), Ok(OutputFormat::Table));
    assert_eq!("json".parse::<OutputFormat>(), Ok(OutputFormat::Json));
    assert!("xml".parse::<OutputFormat>().is_err());
}

#[tokio::test]
async fn s3_tables_are_read_from_the_object_store() {
    let wh = TestWarehouse::s3().await;
    let wh = &wh.wh;
    let count = "SELECT count(*) AS n FROM delivery_events";
    let rows = query_warehouse(wh, count).await.unwrap();
    assert_eq!(format(&rows, OutputFormat::Csv).unwrap(), "n\n0\n");

    let daily = query(
        Path::new("/nonexistent"),
        "SELECT 'shop' AS app, CAST(3 AS BIGINT) AS sent",
    )
    .await
    .unwrap();
    blocking(wh, move |wh| {
        write_events(wh, &sample_events(6, 35));
        wh.write_parquet("daily_sent/dt=2026-11-26/part-0.parquet", &daily[0])
            .unwrap();
        wh.put_new("_manifests/00000000000000000001.json", b"{}")
            .unwrap();
        // An unreadable file in another day's partition: only pruning lets a dt query succeed.
        wh.put_new(
            "delivery_events/dt=2026-11-30/hour=00/part-x.parquet",
            b"not parquet",
        )
        .unwrap();
    })
    .await;

    // The same rows as the local golden files.
    let rows = query_warehouse(
        wh,
        &GOLDEN_EVENTS.replace("ORDER", "WHERE dt < '2026-11-30' ORDER"),
    )
    .await
    .unwrap();
    golden("events.csv", &format(&rows, OutputFormat::Csv).unwrap());
    let rows = query_warehouse(wh, "SELECT dt, app, sent FROM daily_sent")
        .await
        .unwrap();
    assert_eq!(
        format(&rows, OutputFormat::Json).unwrap(),
        "{\"dt\":\"2026-11-26\",\"app\":\"shop\",\"sent\":3}\n"
    );
    assert!(query_warehouse(wh, count).await.is_err());
    let err = query_warehouse(wh, "SELECT * FROM _manifests")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn every_shipped_report_matches_its_golden_file() {
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), &sample_events(40, 0));
    let reports = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/reports");
    let mut names: Vec<_> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for path in names {
        let sql = std::fs::read_to_string(&path).unwrap();
        let rows = query(dir.path(), &sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_stem().unwrap().to_string_lossy();
        golden(
            &format!("reports/{name}.txt"),
            &format(&rows, OutputFormat::Table).unwrap(),
        );
    }
}

/// Runs [`again_after_read_faults`] over answers given in turn; returns its result and how
/// many times it ran the statement.
async fn run_through(
    answers: Vec<Result<u32, AnalyticsError>>,
) -> (Result<u32, AnalyticsError>, usize) {
    let mut answers = answers.into_iter();
    let mut runs = 0;
    let result = again_after_read_faults(|| {
        runs += 1;
        let answer = answers.next().expect("ran more often than answers");
        async move { answer }
    })
    .await;
    (result, runs)
}

#[tokio::test]
async fn a_failed_read_runs_the_statement_again_and_a_bad_query_does_not() {
    let read_fault = || AnalyticsError::Corrupt("footer not found".into());
    let (result, runs) = run_through(vec![Err(read_fault()), Err(read_fault()), Ok(7)]).await;
    assert_eq!((result.unwrap(), runs), (7, 3));

    let (result, runs) = run_through(vec![
        Err(read_fault()),
        Err(read_fault()),
        Err(read_fault()),
    ])
    .await;
    assert!(matches!(result, Err(AnalyticsError::Corrupt(_))));
    assert_eq!(runs, ATTEMPTS as usize);

    let (result, runs) = run_through(vec![Err(AnalyticsError::TooManyRows(5))]).await;
    assert!(matches!(result, Err(AnalyticsError::TooManyRows(5))));
    assert_eq!(runs, 1, "a fault of the query itself is not run again");
}

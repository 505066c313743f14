use super::*;
use crate::schema::batch_to_events;
use crate::sql::{query, query_warehouse};
use crate::testing::{MemBus, MemIndex, TestWarehouse, blocking, sample_events};
use crate::warehouse::MANIFESTS;
use std::path::Path;

fn config() -> SinkConfig {
    SinkConfig {
        max_rows: 120,
        poll_max: 50,
        poll_timeout: Duration::from_millis(2),
        ..SinkConfig::default()
    }
}

async fn start(bus: &MemBus, root: &Path, index: &Arc<MemIndex>) -> Sink {
    start_in(bus, &Warehouse::local(root), index).await
}

async fn start_in(bus: &MemBus, wh: &Warehouse, index: &Arc<MemIndex>) -> Sink {
    let bus: Arc<dyn Bus> = Arc::new(bus.clone());
    Sink::recover(bus, wh.clone(), index.clone(), config())
        .await
        .unwrap()
}

/// Every row of `delivery_events`, ordered by event id.
async fn table(root: &Path) -> Vec<DeliveryEvent> {
    table_of(&Warehouse::local(root)).await
}

async fn table_of(wh: &Warehouse) -> Vec<DeliveryEvent> {
    let batches = query_warehouse(wh, "SELECT * FROM delivery_events ORDER BY event_id")
        .await
        .unwrap();
    batches
        .iter()
        .flat_map(|b| batch_to_events(b).unwrap())
        .collect()
}

fn by_id(mut events: Vec<DeliveryEvent>) -> Vec<DeliveryEvent> {
    for e in &mut events {
        e.redelivered = false;
    }
    events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    events
}

fn indexed(index: &MemIndex) -> Vec<DeliveryEvent> {
    by_id(index.events.lock().unwrap().values().cloned().collect())
}

async fn lag(bus: &MemBus) -> u64 {
    bus.lag(DELIVERY_TOPIC, CONSUMER_GROUP).await.unwrap()
}

#[tokio::test]
async fn events_land_in_hourly_partitions_and_count_by_state() {
    let (dir, bus, index) = (
        tempfile::tempdir().unwrap(),
        MemBus::default(),
        Arc::default(),
    );
    let events = sample_events(500, 0);
    bus.publish_events(&events).await;
    let mut sink = start(&bus, dir.path(), &index).await;
    sink.process_available().await.unwrap();

    let batches = query(
        dir.path(),
        "SELECT state, count(*) AS n FROM delivery_events GROUP BY state ORDER BY state",
    )
    .await
    .unwrap();
    let mut expected = BTreeMap::new();
    for e in &events {
        *expected.entry(e.state.as_str().to_string()).or_insert(0i64) += 1;
    }
    let mut counted = BTreeMap::new();
    for b in &batches {
        let states = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let states = states
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>();
        let counts = b
            .column(1)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>();
        for (s, n) in states.unwrap().iter().zip(counts.unwrap().iter()) {
            counted.insert(s.unwrap().to_string(), n.unwrap());
        }
    }
    assert_eq!(counted, expected);

    // Every file sits in the partition of each of its rows, and every hour has its directory.
    let wh = Warehouse::local(dir.path());
    let mut partitions = BTreeSet::new();
    for dt in list_dirs(dir.path(), "delivery_events") {
        for hour in list_dirs(dir.path(), &format!("delivery_events/{dt}")) {
            let partition = format!("delivery_events/{dt}/{hour}");
            for file in wh.list(&partition).unwrap() {
                assert!(
                    file.starts_with("part-") && file.ends_with(".parquet"),
                    "{file}"
                );
                for e in wh.read_events(&format!("{partition}/{file}")).unwrap() {
                    assert_eq!(Warehouse::partition_of(e.ts), partition);
                }
            }
            partitions.insert(partition);
        }
    }
    let expected: BTreeSet<_> = events
        .iter()
        .map(|e| Warehouse::partition_of(e.ts))
        .collect();
    assert_eq!(partitions, expected);
    assert!(partitions.len() > 10, "{partitions:?}");

    assert_eq!(table(dir.path()).await, by_id(events.clone()));
    assert_eq!(indexed(&index), by_id(events));
    assert_eq!(lag(&bus).await, 0);
    assert!(wh.list(STAGING).unwrap().is_empty());
    assert!(wh.list(MANIFESTS).unwrap().len() <= 3);
    let stats = sink.stats();
    assert_eq!(stats.events_written.load(Ordering::Relaxed), 500);
    assert!(stats.files_written.load(Ordering::Relaxed) >= 14);
}

use std::collections::BTreeSet;

/// Subdirectory names of `dir` in a local warehouse.
fn list_dirs(root: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Writes a first batch cleanly, then crashes at `step` while flushing a second, checks or
/// tampers with the warehouse (on a blocking thread), publishes more, restarts and checks the
/// table and index hold every event exactly once.
async fn crash_and_recover(
    wh: TestWarehouse,
    step: Step,
    tamper: impl FnOnce(&Warehouse) + Send + 'static,
) {
    let (wh, bus, index) = (&wh.wh, MemBus::default(), Arc::default());
    let first = sample_events(100, 0);
    bus.publish_events(&first).await;
    let mut sink = start_in(&bus, wh, &index).await;
    sink.process_available().await.unwrap();

    let second = sample_events(110, 100); // one flush, several hours
    bus.publish_events(&second).await;
    sink.faults.crash_at = Some(step);
    let err = sink.process_available().await.unwrap_err();
    assert!(err.to_string().contains("injected crash"), "{err}");
    drop(sink);
    blocking(wh, tamper).await;

    let third = sample_events(30, 210);
    bus.publish_events(&third).await;
    let mut sink = start_in(&bus, wh, &index).await;
    sink.process_available().await.unwrap();

    let all = by_id([first, second, third].concat());
    assert_eq!(table_of(wh).await, all, "{step:?}");
    assert_eq!(indexed(&index), all, "{step:?}");
    assert_eq!(lag(&bus).await, 0);
    assert!(blocking(wh, |wh| wh.list(STAGING).unwrap().is_empty()).await);
}

/// A crash after staging leaves staged files and no manifest.
fn staged_without_manifest(wh: &Warehouse) {
    assert!(!wh.list(STAGING).unwrap().is_empty());
    assert_eq!(Manifest::newest(wh).unwrap().unwrap().seq, 1);
}

/// A crash after the manifest leaves every staged file in place.
fn nothing_renamed(wh: &Warehouse) {
    let manifest = Manifest::newest(wh).unwrap().unwrap();
    for f in &manifest.files {
        assert!(wh.exists(&f.staged).unwrap() && !wh.exists(&f.path).unwrap());
    }
}

/// Simulates a crash halfway through the renames: moves the first of several files.
fn first_file_renamed(wh: &Warehouse) {
    let manifest = Manifest::newest(wh).unwrap().unwrap();
    assert!(manifest.files.len() > 1);
    let f = &manifest.files[0];
    assert!(wh.rename(&f.staged, &f.path).unwrap());
}

/// A crash after the renames leaves nothing staged.
fn all_renamed(wh: &Warehouse) {
    assert!(wh.list(STAGING).unwrap().is_empty());
}

#[tokio::test]
async fn a_crash_after_staging_loses_and_duplicates_nothing() {
    crash_and_recover(
        TestWarehouse::local(),
        Step::AfterStaging,
        staged_without_manifest,
    )
    .await;
}

#[tokio::test]
async fn a_crash_after_the_manifest_loses_and_duplicates_nothing() {
    crash_and_recover(TestWarehouse::local(), Step::AfterManifest, nothing_renamed).await;
}

#[tokio::test]
async fn a_crash_halfway_through_the_renames_loses_and_duplicates_nothing() {
    crash_and_recover(
        TestWarehouse::local(),
        Step::AfterManifest,
        first_file_renamed,
    )
    .await;
}

#[tokio::test]
async fn a_crash_before_the_bus_commit_loses_and_duplicates_nothing() {
    crash_and_recover(TestWarehouse::local(), Step::BeforeBusCommit, all_renamed).await;
}

#[tokio::test]
async fn a_crash_before_indexing_loses_and_duplicates_nothing() {
    crash_and_recover(TestWarehouse::local(), Step::BeforeIndex, |_| {}).await;
}

#[tokio::test]
async fn a_sink_that_keeps_running_after_a_failed_flush_retries_it_exactly_once() {
    for step in [
        Step::AfterStaging,
        Step::AfterManifest,
        Step::BeforeBusCommit,
        Step::BeforeIndex,
    ] {
        let (dir, bus, index) = (
            tempfile::tempdir().unwrap(),
            MemBus::default(),
            Arc::default(),
        );
        let events = sample_events(300, 0);
        bus.publish_events(&events[..200]).await;
        let mut sink = start(&bus, dir.path(), &index).await;
        sink.faults.crash_at = Some(step);
        assert!(sink.process_available().await.is_err());
        sink.faults.crash_at = None;
        bus.publish_events(&events[200..]).await;
        sink.process_available().await.unwrap();

        assert_eq!(table(dir.path()).await, by_id(events.clone()), "{step:?}");
        assert_eq!(indexed(&index), by_id(events), "{step:?}");
        assert_eq!(lag(&bus).await, 0);
        assert_eq!(sink.stats().events_written.load(Ordering::Relaxed), 300);
    }
}

#[tokio::test]
async fn a_redelivered_copy_of_an_event_being_flushed_is_dropped() {
    let (dir, bus, index) = (
        tempfile::tempdir().unwrap(),
        MemBus::default(),
        Arc::default(),
    );
    let e = sample_events(3, 0);
    bus.publish_events(&e).await;
    let mut sink = start(&bus, dir.path(), &index).await;
    sink.poll_once().await.unwrap();
    sink.start_flush();
    assert!(sink.inflight.is_some());
    let copy = DeliveryEvent {
        redelivered: true,
        ..e[1].clone()
    };
    bus.publish_events(&[copy]).await;
    sink.inbox = sink.consumer.poll(10, Duration::ZERO).await.unwrap();
    sink.admit().await.unwrap();
    sink.process_available().await.unwrap();

    assert_eq!(table(dir.path()).await, by_id(e));
    assert_eq!(sink.stats().duplicates_dropped.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn only_one_sink_writes_to_a_warehouse_at_a_time() {
    let (dir, bus, index) = (
        tempfile::tempdir().unwrap(),
        MemBus::default(),
        Arc::default(),
    );
    let first = start(&bus, dir.path(), &index).await;
    let bus_dyn: Arc<dyn Bus> = Arc::new(bus.clone());
    let second = Sink::recover(
        bus_dyn,
        Warehouse::local(dir.path()),
        index.clone(),
        config(),
    )
    .await;
    assert!(
        second
            .err()
            .unwrap()
            .to_string()
            .contains("in use by another sink")
    );
    drop(first);
    start(&bus, dir.path(), &index).await;
}

#[tokio::test]
async fn redelivered_duplicates_are_dropped_and_new_events_kept() {
    let (dir, bus, index) = (
        tempfile::tempdir().unwrap(),
        MemBus::default(),
        Arc::default(),
    );
    let e = sample_events(5, 0);
    bus.publish_events(&e[..3]).await;
    let mut sink = start(&bus, dir.path(), &index).await;
    sink.process_available().await.unwrap();

    let again = |e: &DeliveryEvent| DeliveryEvent {
        redelivered: true,
        ..e.clone()
    };
    bus.publish_events(&[
        again(&e[0]), // already written and indexed: dropped
        e[3].clone(), // new: kept
        again(&e[3]), // in the buffer: dropped
        again(&e[4]), // redelivered but never seen: kept
    ])
    .await;
    sink.process_available().await.unwrap();

    assert_eq!(table(dir.path()).await, by_id(e.clone()));
    assert_eq!(indexed(&index), by_id(e));
    assert_eq!(sink.stats().duplicates_dropped.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn malformed_records_are_skipped_counted_and_committed() {
    let (dir, bus, index) = (
        tempfile::tempdir().unwrap(),
        MemBus::default(),
        Arc::default(),
    );
    let events = sample_events(3, 0);
    bus.publish_events(&events).await;
    let garbage = herald_core::bus::Record::new("k", b"{not json".to_vec());
    bus.publish(DELIVERY_TOPIC, vec![garbage]).await.unwrap();
    let mut sink = start(&bus, dir.path(), &index).await;
    sink.process_available().await.unwrap();

    assert_eq!(table(dir.path()).await, by_id(events));
    assert_eq!(sink.stats().malformed_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(lag(&bus).await, 0);
}

/// Waits up to 5 s for `done`.
async fn eventually(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out");
}

#[tokio::test]
async fn run_flushes_by_size_and_age_and_on_shutdown() {
    let (dir, bus, index) = (
        tempfile::tempdir().unwrap(),
        MemBus::default(),
        Arc::new(MemIndex::default()),
    );
    let start_run = |max_rows, max_age| {
        let bus: Arc<dyn Bus> = Arc::new(bus.clone());
        let (wh, index): (_, Arc<dyn EventIndex>) = (Warehouse::local(dir.path()), index.clone());
        async move {
            let config = SinkConfig {
                max_rows,
                max_age,
                ..config()
            };
            let sink = Sink::recover(bus, wh, index, config).await.unwrap();
            let stats = sink.stats();
            let (stop, shutdown) = watch::channel(false);
            (stats, stop, tokio::spawn(sink.run(shutdown)))
        }
    };
    let events = sample_events(40, 0);
    let written = |stats: &SinkStats| stats.events_written.load(Ordering::Relaxed);

    // By age.
    let (stats, stop, running) = start_run(1000, Duration::from_millis(20)).await;
    bus.publish_events(&events[..10]).await;
    eventually(|| written(&stats) == 10 && stats.last_flush_ms.load(Ordering::Relaxed) > 0).await;
    drop(stop); // a dropped sender also means shut down
    running.await.unwrap().unwrap();

    // By size, then the rest on shutdown.
    let (stats, stop, running) = start_run(20, Duration::from_secs(3600)).await;
    bus.publish_events(&events[10..30]).await;
    eventually(|| written(&stats) == 20).await;
    bus.publish_events(&events[30..]).await;
    eventually(|| bus.handed_out() == 40).await;
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(written(&stats), 30);
    assert_eq!(table(dir.path()).await, by_id(events));
}

#[tokio::test]
async fn s3_events_are_written_once_and_queryable() {
    let (wh, bus, index) = (TestWarehouse::s3().await, MemBus::default(), Arc::default());
    let wh = &wh.wh;
    let events = sample_events(500, 0);
    bus.publish_events(&events).await;
    let mut sink = start_in(&bus, wh, &index).await;
    sink.process_available().await.unwrap();
    assert!(sink.stats().files_written.load(Ordering::Relaxed) >= 14);

    assert_eq!(table_of(wh).await, by_id(events.clone()));
    assert_eq!(indexed(&index), by_id(events.clone()));
    assert_eq!(lag(&bus).await, 0);
    let sql = "SELECT count(*) AS n FROM delivery_events WHERE dt = '2026-11-26' AND hour = '07'";
    let rows = query_warehouse(wh, sql).await.unwrap();
    let in_hour = events
        .iter()
        .filter(|e| e.ts.format("%H").to_string() == "07");
    let csv = crate::sql::format(&rows, crate::sql::OutputFormat::Csv).unwrap();
    assert_eq!(csv, format!("n\n{}\n", in_hour.count()));

    // Every event is in a file of its own partition, and nothing is left staged.
    let partitions: BTreeSet<_> = events
        .iter()
        .map(|e| Warehouse::partition_of(e.ts))
        .collect();
    let (read, staged, manifests) = blocking(wh, move |wh| {
        let mut read = Vec::new();
        for partition in &partitions {
            for file in wh.list(partition).unwrap() {
                for e in wh.read_events(&format!("{partition}/{file}")).unwrap() {
                    assert_eq!(&Warehouse::partition_of(e.ts), partition);
                    read.push(e);
                }
            }
        }
        let manifests = wh.list(MANIFESTS).unwrap().len();
        (read, wh.list(STAGING).unwrap(), manifests)
    })
    .await;
    assert_eq!(by_id(read), by_id(events));
    assert!(staged.is_empty(), "{staged:?}");
    assert!((1..=3).contains(&manifests), "{manifests}");
}

#[tokio::test]
async fn s3_a_crash_after_staging_loses_and_duplicates_nothing() {
    let wh = TestWarehouse::s3().await;
    crash_and_recover(wh, Step::AfterStaging, staged_without_manifest).await;
}

#[tokio::test]
async fn s3_a_crash_after_the_manifest_loses_and_duplicates_nothing() {
    let wh = TestWarehouse::s3().await;
    crash_and_recover(wh, Step::AfterManifest, nothing_renamed).await;
}

#[tokio::test]
async fn s3_a_crash_halfway_through_the_renames_loses_and_duplicates_nothing() {
    let wh = TestWarehouse::s3().await;
    crash_and_recover(wh, Step::AfterManifest, first_file_renamed).await;
}

#[tokio::test]
async fn s3_a_crash_between_copy_and_delete_loses_and_duplicates_nothing() {
    let wh = TestWarehouse::s3().await;
    crash_and_recover(wh, Step::AfterManifest, |wh| {
        // The first file was copied into place but its staged copy not yet deleted.
        let manifest = Manifest::newest(wh).unwrap().unwrap();
        let f = &manifest.files[0];
        wh.put_new(&f.path, &wh.get(&f.staged).unwrap()).unwrap();
    })
    .await;
}

#[tokio::test]
async fn s3_a_crash_before_the_bus_commit_loses_and_duplicates_nothing() {
    let wh = TestWarehouse::s3().await;
    crash_and_recover(wh, Step::BeforeBusCommit, all_renamed).await;
}

#[tokio::test]
async fn s3_a_crash_before_indexing_loses_and_duplicates_nothing() {
    let wh = TestWarehouse::s3().await;
    crash_and_recover(wh, Step::BeforeIndex, |_| {}).await;
}

#[tokio::test]
async fn s3_a_second_sink_is_refused_at_its_first_commit() {
    let (wh, bus, index) = (TestWarehouse::s3().await, MemBus::default(), Arc::default());
    let wh = &wh.wh;
    let events = sample_events(50, 0);
    bus.publish_events(&events).await;
    // No lock on an object store: both start, and both read every event.
    let mut first = start_in(&bus, wh, &index).await;
    let mut second = start_in(&bus, wh, &index).await;
    first.process_available().await.unwrap();
    let err = second.process_available().await.unwrap_err();
    assert!(err.to_string().contains("another sink"), "{err}");
    assert!(!err.is_retryable());
    drop((first, second));

    let mut sink = start_in(&bus, wh, &index).await;
    sink.process_available().await.unwrap();
    assert_eq!(table_of(wh).await, by_id(events));
    assert_eq!(lag(&bus).await, 0);
}

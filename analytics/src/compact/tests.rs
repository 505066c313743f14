use super::*;
use crate::schema::batch_to_events;
use crate::sink::{Sink, SinkConfig};
use crate::sql::query_warehouse;
use crate::testing::{MemBus, MemIndex, TestWarehouse, blocking, sample_events};
use herald_core::DeliveryEvent;
use herald_core::bus::Bus;
use std::sync::Arc;

/// Writes `events` through a sink flushing every few events (several files per hour), then
/// 30 events that are late for their hour (written into hours already full).
async fn fill(wh: &Warehouse) -> Vec<DeliveryEvent> {
    let (bus, index) = (MemBus::default(), Arc::new(MemIndex::default()));
    let config = SinkConfig {
        max_rows: 8,
        poll_max: 8,
        poll_timeout: Duration::from_millis(1),
        ..SinkConfig::default()
    };
    let dyn_bus: Arc<dyn Bus> = Arc::new(bus.clone());
    let mut sink = Sink::recover(dyn_bus, wh.clone(), index, config)
        .await
        .unwrap();
    let mut events = sample_events(300, 0);
    bus.publish_events(&events).await;
    sink.process_available().await.unwrap();
    let mut late = sample_events(30, 1000);
    for (i, e) in late.iter_mut().enumerate() {
        e.ts = events[i * 7].ts;
    }
    bus.publish_events(&late).await;
    sink.process_available().await.unwrap();
    events.extend(late);
    events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    events
}

/// Every row of `delivery_events` as herald's SQL reads it, ordered by event id.
async fn table(wh: &Warehouse) -> Vec<DeliveryEvent> {
    let batches = query_warehouse(wh, "SELECT * FROM delivery_events ORDER BY event_id")
        .await
        .unwrap();
    batches
        .iter()
        .flat_map(|b| batch_to_events(b).unwrap())
        .collect()
}

/// Per partition and lateness, the count of files present (hidden ones too) and their rows.
type Files = BTreeMap<(String, Lateness), (usize, usize)>;

fn files(wh: &Warehouse) -> Files {
    let mut out = BTreeMap::new();
    for (_, dir) in partitions(wh).unwrap() {
        for file in wh.list(&dir).unwrap() {
            let late = Lateness::of_file(&file).unwrap();
            let rows = wh.read_events(&format!("{dir}/{file}")).unwrap().len();
            let entry = out.entry((dir.clone(), late)).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += rows;
        }
    }
    out
}

fn config() -> CompactConfig {
    CompactConfig {
        after: Duration::ZERO,
        min_files: 2,
        target_bytes: 128 << 20,
    }
}

/// Compacts a filled warehouse and checks that the table, its rows per partition and
/// lateness, and a reader herald did not write all see the same events in fewer files.
async fn compaction_keeps_the_table(wh: &Warehouse) {
    let events = fill(wh).await;
    assert_eq!(table(wh).await, events);
    let before = blocking(wh, files).await;
    assert!(before.keys().any(|(_, l)| *l == Lateness::LateHour));

    let done = Compactor::new(wh.clone(), config()).pass().await.unwrap();
    assert!(done.files_merged > done.files_written, "{done}");
    assert_eq!(done.leftovers, 0);
    assert_eq!(table(wh).await, events);
    let after = blocking(wh, files).await;
    let rows =
        |m: &Files| -> Vec<_> { m.iter().map(|(k, (_, rows))| (k.clone(), *rows)).collect() };
    assert_eq!(rows(&after), rows(&before));
    let count = |m: &Files| m.values().map(|(n, _)| n).sum::<usize>();
    assert_eq!(
        count(&after),
        count(&before) - done.files_merged + done.files_written
    );
    // Each closed hour's on-time files became one; the newest hour was left alone.
    let newest = after.keys().map(|(d, _)| d).max().unwrap().clone();
    for ((dir, late), (n, _)) in &after {
        if *dir != newest && *late == Lateness::OnTime {
            assert_eq!(*n, 1, "{dir}");
        }
    }
    let of_newest = |m: &Files| -> Vec<_> {
        m.iter()
            .filter(|((d, _), _)| *d == newest)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(of_newest(&after), of_newest(&before));

    let again = Compactor::new(wh.clone(), config()).pass().await.unwrap();
    assert_eq!(again, Compacted::default());
}

#[tokio::test]
async fn compaction_keeps_the_table_equal_in_fewer_files() {
    let wh = TestWarehouse::local();
    compaction_keeps_the_table(&wh.wh).await;

    // pyarrow, which does not know the naming rule, sees the same rows once the inputs are gone.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/support/read_parquet.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(wh.wh.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read["rows"], 330);
    let sent = table(&wh.wh)
        .await
        .iter()
        .filter(|e| e.state == herald_core::State::Sent)
        .count();
    assert_eq!(read["states"]["sent"], sent);
}

#[tokio::test]
async fn s3_compaction_keeps_the_table_equal_in_fewer_files() {
    let wh = TestWarehouse::s3().await;
    compaction_keeps_the_table(&wh.wh).await;
}

/// Crashes a pass at `step`, checks that herald's readers still see every event once, then
/// lets a new pass clean up and finish.
async fn crash_and_recover(wh: &Warehouse, step: Step) {
    let events = fill(wh).await;
    let mut crashing = Compactor::new(wh.clone(), config());
    crashing.faults.crash_at = Some(step);
    let err = crashing.pass().await.unwrap_err();
    assert!(err.to_string().contains("injected crash"), "{err}");
    assert_eq!(table(wh).await, events, "{step:?}");
    let staged = blocking(wh, |wh| wh.list(STAGING).unwrap().len()).await;
    assert_eq!(staged, usize::from(step == Step::Staged), "{step:?}");

    let done = Compactor::new(wh.clone(), config()).pass().await.unwrap();
    assert!(done.leftovers >= 1, "{step:?}: {done}");
    assert!(done.files_merged > 0, "{step:?}: {done}");
    assert_eq!(table(wh).await, events, "{step:?}");
    blocking(wh, |wh| {
        assert!(wh.list(STAGING).unwrap().is_empty());
        for (_, dir) in partitions(wh).unwrap() {
            let names = wh.list(&dir).unwrap();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            assert!(!hidden(&names).contains(&true), "{dir}: {names:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_crash_after_staging_the_merged_file_loses_and_duplicates_nothing() {
    crash_and_recover(&TestWarehouse::local().wh, Step::Staged).await;
}

#[tokio::test]
async fn a_crash_after_placing_the_merged_file_loses_and_duplicates_nothing() {
    crash_and_recover(&TestWarehouse::local().wh, Step::Placed).await;
}

#[tokio::test]
async fn a_crash_while_deleting_the_inputs_loses_and_duplicates_nothing() {
    crash_and_recover(&TestWarehouse::local().wh, Step::FirstInputDeleted).await;
}

#[tokio::test]
async fn s3_a_crash_after_placing_the_merged_file_loses_and_duplicates_nothing() {
    crash_and_recover(&TestWarehouse::s3().await.wh, Step::Placed).await;
}

#[test]
fn runs_are_consecutive_small_files_of_one_lateness_up_to_the_target() {
    let part = |seq: u64, lateness: Lateness, bytes: u64| Part {
        name: PartName {
            from: seq,
            to: seq,
            lateness,
        },
        file: format!("f{seq}"),
        bytes,
    };
    let config = CompactConfig {
        after: Duration::ZERO,
        min_files: 2,
        target_bytes: 100,
    };
    let parts = vec![
        part(1, Lateness::OnTime, 40),
        part(2, Lateness::OnTime, 40),
        part(3, Lateness::LateHour, 10),
        part(4, Lateness::OnTime, 40), // would pass the target: starts a new run
        part(5, Lateness::OnTime, 100), // not small: left alone, ends the run of one
        part(6, Lateness::OnTime, 10),
        part(7, Lateness::OnTime, 10),
        part(8, Lateness::LateHour, 10),
    ];
    let seqs: Vec<Vec<u64>> = runs(parts, &config)
        .iter()
        .map(|r| r.iter().map(|p| p.name.from).collect())
        .collect();
    assert_eq!(seqs, [vec![1, 2], vec![6, 7], vec![3, 8]]);
}

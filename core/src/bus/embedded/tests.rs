use super::*;
use crate::bus::{Delivered, conformance, next_positions, partition_for};
use std::io::Write;
use std::time::Duration;

async fn open(dir: &Path, config: EmbeddedBusConfig) -> EmbeddedBus {
    EmbeddedBus::open(dir, config).await.expect("open")
}

fn one_partition() -> EmbeddedBusConfig {
    EmbeddedBusConfig {
        partitions: 1,
        ..EmbeddedBusConfig::default()
    }
}

/// Polls until `n` records have arrived (or panics after a while).
async fn consume(consumer: &mut dyn Consumer, n: usize) -> Vec<Delivered> {
    let mut got = Vec::new();
    for _ in 0..100 {
        if got.len() >= n {
            break;
        }
        got.extend(
            consumer
                .poll(n - got.len(), Duration::from_millis(100))
                .await
                .expect("poll"),
        );
    }
    assert_eq!(got.len(), n);
    got
}

fn segment_files(partition_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(partition_dir)
        .expect("read partition dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_owned();
    conformance::run_all(move || {
        let root = root.clone();
        async move { Arc::new(open(&root, EmbeddedBusConfig::default()).await) as Arc<dyn Bus> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_partition_counts_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let records: Vec<Record> = (0..100)
        .map(|i| Record::new(format!("k{}", i % 7), format!("{i}")))
        .collect();
    {
        let bus = open(dir.path(), EmbeddedBusConfig::default()).await;
        for chunk in records.chunks(10) {
            bus.publish("t", chunk.to_vec()).await.expect("publish");
        }
    }
    // A different default does not change an existing topic.
    let config = EmbeddedBusConfig {
        partitions: 2,
        ..EmbeddedBusConfig::default()
    };
    let bus = open(dir.path(), config).await;
    let mut consumer = bus.subscribe("t", "g").await.expect("subscribe");
    let got = consume(consumer.as_mut(), 100).await;
    let mut payloads: Vec<Vec<u8>> = got.iter().map(|d| d.record.payload.clone()).collect();
    payloads.sort();
    let mut sent: Vec<Vec<u8>> = records.iter().map(|r| r.payload.clone()).collect();
    sent.sort();
    assert_eq!(payloads, sent);
    assert!(
        got.iter()
            .all(|d| d.partition == partition_for(&d.record.key, 4))
    );

    // Offsets continue where they stopped.
    bus.publish("t", vec![Record::new("k0", "after")])
        .await
        .expect("publish");
    let after = consume(consumer.as_mut(), 1).await;
    let before_in_partition = got
        .iter()
        .filter(|d| d.partition == after[0].partition)
        .count() as u64;
    assert_eq!(after[0].offset, before_in_partition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let bus = open(dir.path(), one_partition()).await;
        for i in 0..10 {
            bus.publish("t", vec![Record::new("k", format!("{i}"))])
                .await
                .expect("publish");
        }
    }
    let segment = format::segment_path(&dir.path().join("t").join("0"), 0);
    let valid_len = fs::metadata(&segment).expect("segment").len();
    // Half a frame, as a crash in the middle of a write leaves it.
    fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .and_then(|mut f| f.write_all(&[60, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]))
        .expect("append garbage");

    {
        let bus = open(dir.path(), one_partition()).await;
        assert_eq!(fs::metadata(&segment).expect("segment").len(), valid_len);
        let mut consumer = bus.subscribe("t", "g").await.expect("subscribe");
        let got = consume(consumer.as_mut(), 10).await;
        let payloads: Vec<String> = got
            .iter()
            .map(|d| String::from_utf8_lossy(&d.record.payload).into_owned())
            .collect();
        assert_eq!(payloads, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        bus.publish("t", vec![Record::new("k", "new")])
            .await
            .expect("publish");
        let new = consume(consumer.as_mut(), 1).await;
        assert_eq!(new[0].offset, 10);
    }
    let bus = open(dir.path(), one_partition()).await;
    assert_eq!(bus.lag("t", "g").await.expect("lag"), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_and_committed_ones_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = EmbeddedBusConfig {
        partitions: 1,
        segment_bytes: 1024,
        fsync: false,
    };
    let bus = open(dir.path(), config).await;
    for i in 0..100 {
        let payload = format!("{i:0>80}");
        bus.publish("t", vec![Record::new("k", payload)])
            .await
            .expect("publish");
    }
    let partition_dir = dir.path().join("t").join("0");
    let before = segment_files(&partition_dir);
    assert!(before.len() >= 8, "only {} segments", before.len());

    // Reading crosses every segment boundary.
    let mut slow = bus.subscribe("t", "slow").await.expect("subscribe");
    let got = consume(slow.as_mut(), 100).await;
    let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());

    // Committing offset 50 deletes exactly the segments wholly below it.
    slow.commit(&next_positions(&got[..50]))
        .await
        .expect("commit");
    let after = segment_files(&partition_dir);
    let bases: Vec<u64> = before
        .iter()
        .filter_map(|p| format::parse_segment_name(p.file_name()?.to_str()?))
        .collect();
    let first_kept = bases.iter().rev().find(|&&b| b <= 50).copied().unwrap_or(0);
    assert_eq!(
        after.len(),
        bases.iter().filter(|&&b| b >= first_kept).count()
    );
    assert!(after.len() < before.len());

    // A group that never committed does not hold data back: it starts at the oldest record left.
    assert_eq!(bus.lag("t", "late").await.expect("lag"), 100 - first_kept);
    let mut late = bus.subscribe("t", "late").await.expect("subscribe");
    let first = late.poll(1, Duration::from_secs(1)).await.expect("poll");
    assert_eq!(first[0].offset, first_kept);

    // The committing group resumes at its offset, in the oldest segment kept.
    drop(slow);
    let mut slow = bus.subscribe("t", "slow").await.expect("subscribe");
    let rest = consume(slow.as_mut(), 50).await;
    assert_eq!(rest[0].offset, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_per_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = open(dir.path(), EmbeddedBusConfig::default()).await;
    let first = bus.subscribe("t", "g").await.expect("subscribe");
    let second = bus.subscribe("t", "g").await;
    assert!(matches!(second, Err(BusError::GroupBusy { .. })));
    bus.subscribe("t", "other")
        .await
        .expect("another group is free");
    bus.subscribe("u", "g")
        .await
        .expect("another topic is free");
    drop(first);
    bus.subscribe("t", "g").await.expect("freed by drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_has_one_bus_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = open(dir.path(), EmbeddedBusConfig::default()).await;
    assert!(
        EmbeddedBus::open(dir.path(), EmbeddedBusConfig::default())
            .await
            .is_err()
    );
    drop(bus);
    open(dir.path(), EmbeddedBusConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = open(dir.path(), EmbeddedBusConfig::default()).await;
    for name in ["", ".", "..", "_groups", "a/b", "a b", &"x".repeat(250)] {
        let result = bus.publish(name, vec![Record::new("k", "v")]).await;
        assert!(matches!(result, Err(BusError::UnknownTopic(_))), "{name:?}");
    }
    assert!(bus.subscribe("t", "").await.is_err());
    bus.publish("herald.requests-dlq_2", vec![])
        .await
        .expect("valid name");
}

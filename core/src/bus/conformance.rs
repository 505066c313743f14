//! One behavioural test suite for every [`Bus`] implementation.
//!
//! Every check takes an [`OpenBus`]: something that, each time it is called, returns a new bus
//! handle over the same storage — the same directory for the embedded bus, a new client of the
//! same broker for Kafka. A check "restarts" by dropping every handle and consumer it holds and
//! opening again, so a new handle is only opened once the previous one is gone (the embedded bus
//! locks its directory). Every check uses fresh topic names, and group names scoped to its topic
//! (a Kafka consumer group spans topics, so a shared name would make runs that overlap, or other
//! tests on the same broker, members of one group), so one storage can serve all checks and
//! repeated or concurrent runs. Checks panic on failure; waits are generous so that a real broker's group
//! joins fit in them.
//!
//! ```ignore
//! let dir = tempfile::tempdir()?;
//! conformance::run_all(|| async {
//!     Arc::new(EmbeddedBus::open(dir.path(), Default::default()).await.unwrap()) as Arc<dyn Bus>
//! })
//! .await;
//! ```

use super::{Bus, Consumer, Delivered, Record, next_positions};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a check waits for records it expects.
const WAIT: Duration = Duration::from_secs(30);
/// How long a check listens to confirm that nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

/// Opens a bus handle over the storage the suite runs against (see the module docs).
/// Implemented by every `Fn() -> impl Future<Output = Arc<dyn Bus>>`.
pub trait OpenBus {
    fn open(&self) -> impl Future<Output = Arc<dyn Bus>>;
}

impl<F, Fut> OpenBus for F
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Bus>>,
{
    fn open(&self) -> impl Future<Output = Arc<dyn Bus>> {
        self()
    }
}

/// Runs every check in turn.
pub async fn run_all(open: impl OpenBus) {
    order_per_key(&open).await;
    stable_partitions(&open).await;
    commit_then_resume(&open).await;
    uncommitted_are_redelivered(&open).await;
    lag_counts_uncommitted(&open).await;
    poll_waits_for_data(&open).await;
    headers_round_trip(&open).await;
    groups_are_independent(&open).await;
    concurrent_publishers_lose_nothing(&open).await;
}

/// Records come back in publish order per key, and in offset order per partition, whether
/// published one per call or in batches.
pub async fn order_per_key(open: &impl OpenBus) {
    let bus = open.open().await;
    let topic = unique_topic("order");
    let records: Vec<Record> = (0..20)
        .flat_map(|seq| (0..5).map(move |key| record(&format!("k{key}"), &format!("{seq}"))))
        .collect();
    let (singles, batch) = records.split_at(40);
    for r in singles {
        publish(&bus, &topic, vec![r.clone()]).await;
    }
    publish(&bus, &topic, batch.to_vec()).await;

    let mut consumer = subscribe(&bus, &topic, "g").await;
    let got = consume(consumer.as_mut(), records.len()).await;
    let mut per_key: HashMap<Vec<u8>, Vec<u32>> = HashMap::new();
    for d in &got {
        let seq = text(&d.record.payload).parse().expect("numeric payload");
        per_key.entry(d.record.key.clone()).or_default().push(seq);
    }
    assert_eq!(per_key.len(), 5);
    for (key, seqs) in per_key {
        assert_eq!(
            seqs,
            (0..20).collect::<Vec<_>>(),
            "order of key {}",
            text(&key)
        );
    }
    assert_offsets_increase(&got);
    expect_quiet(consumer.as_mut()).await;
}

/// All records of a key land on one partition, and on the same one after a restart.
pub async fn stable_partitions(open: &impl OpenBus) {
    let topic = unique_topic("partitions");
    let keys: Vec<String> = (0..16).map(|k| format!("receiver-{k}")).collect();
    let mut home: HashMap<Vec<u8>, u32> = HashMap::new();
    for round in 0..2 {
        let bus = open.open().await;
        let records: Vec<Record> = (0..3)
            .flat_map(|i| keys.iter().map(move |k| record(k, &format!("{round}.{i}"))))
            .collect();
        publish(&bus, &topic, records.clone()).await;
        let mut consumer = subscribe(&bus, &topic, "g").await;
        let got = consume(consumer.as_mut(), records.len()).await;
        for d in &got {
            let partition = *home.entry(d.record.key.clone()).or_insert(d.partition);
            assert_eq!(partition, d.partition, "key {} moved", text(&d.record.key));
        }
        consumer
            .commit(&next_positions(&got))
            .await
            .expect("commit");
    }
    assert_eq!(home.len(), keys.len());
}

/// After a commit and a restart, reading resumes exactly after the committed records.
pub async fn commit_then_resume(open: &impl OpenBus) {
    let topic = unique_topic("resume");
    let bus = open.open().await;
    let records: Vec<Record> = (0..10)
        .map(|i| record(&format!("k{}", i % 3), &i.to_string()))
        .collect();
    publish(&bus, &topic, records).await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let first = consume(consumer.as_mut(), 10).await;
    // Delivery order is offset order per partition, so the first six form a prefix of each.
    consumer
        .commit(&next_positions(&first[..6]))
        .await
        .expect("commit");
    drop(consumer);
    drop(bus);

    let bus = open.open().await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let rest = consume(consumer.as_mut(), 4).await;
    assert_eq!(positions(&rest), positions(&first[6..]));
    expect_quiet(consumer.as_mut()).await;
}

/// Records read but not committed are delivered again to the group's next member, also after a
/// restart (at-least-once); once committed they are not.
pub async fn uncommitted_are_redelivered(open: &impl OpenBus) {
    let topic = unique_topic("redeliver");
    let bus = open.open().await;
    let records: Vec<Record> = (0..5)
        .map(|i| record(&format!("k{i}"), &i.to_string()))
        .collect();
    publish(&bus, &topic, records).await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let first = consume(consumer.as_mut(), 5).await;
    drop(consumer);

    let mut consumer = subscribe(&bus, &topic, "g").await;
    let again = consume(consumer.as_mut(), 5).await;
    assert_eq!(sorted(again), sorted(first.clone()));
    drop(consumer);
    drop(bus);

    let bus = open.open().await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let after_restart = consume(consumer.as_mut(), 5).await;
    assert_eq!(sorted(after_restart.clone()), sorted(first));
    consumer
        .commit(&next_positions(&after_restart))
        .await
        .expect("commit");
    drop(consumer);
    let mut consumer = subscribe(&bus, &topic, "g").await;
    expect_quiet(consumer.as_mut()).await;
}

/// Lag is the number of records the group has not committed, whether read or not.
pub async fn lag_counts_uncommitted(open: &impl OpenBus) {
    let topic = unique_topic("lag");
    let bus = open.open().await;
    let records: Vec<Record> = (0..10)
        .map(|i| record(&format!("k{i}"), &i.to_string()))
        .collect();
    publish(&bus, &topic, records).await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    assert_eq!(lag(&bus, &topic, "g").await, 10);
    let got = consume(consumer.as_mut(), 10).await;
    assert_eq!(
        lag(&bus, &topic, "g").await,
        10,
        "reading is not committing"
    );
    consumer
        .commit(&next_positions(&got[..4]))
        .await
        .expect("commit");
    assert_eq!(lag(&bus, &topic, "g").await, 6);
    consumer
        .commit(&next_positions(&got))
        .await
        .expect("commit");
    assert_eq!(lag(&bus, &topic, "g").await, 0);
    publish(
        &bus,
        &topic,
        vec![record("k", "late"), record("j", "later")],
    )
    .await;
    assert_eq!(lag(&bus, &topic, "g").await, 2);
}

/// A poll with nothing to read returns empty after its timeout; a poll that is waiting returns
/// as soon as a record is published.
pub async fn poll_waits_for_data(open: &impl OpenBus) {
    let topic = unique_topic("wait");
    let bus = open.open().await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let started = Instant::now();
    let got = consumer
        .poll(10, Duration::from_millis(300))
        .await
        .expect("poll");
    assert!(got.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "returned early"
    );

    let publisher = {
        let bus = bus.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            publish(&bus, &topic, vec![record("k", "wake up")]).await;
        })
    };
    let started = Instant::now();
    let timeout = Duration::from_secs(20);
    let mut got = consumer.poll(10, timeout).await.expect("poll");
    // A broker may deliver an empty batch on a wake-up; keep polling within the same window.
    while got.is_empty() && started.elapsed() < timeout {
        got = consumer
            .poll(10, timeout - started.elapsed())
            .await
            .expect("poll");
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].record.payload, b"wake up");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "poll did not wake on new data"
    );
    publisher.await.expect("publisher task");
}

/// Keys, payloads and headers come back byte for byte, including empty and non-ASCII ones.
pub async fn headers_round_trip(open: &impl OpenBus) {
    let topic = unique_topic("headers");
    let bus = open.open().await;
    let mut with_headers = record("k1", "{\"v\":1}");
    with_headers.headers = vec![
        ("reason".into(), "malformed json".into()),
        ("unicode".into(), "消息 ✓".into()),
        ("empty".into(), String::new()),
        ("reason".into(), "repeated names keep their order".into()),
    ];
    let binary = Record::new(vec![0u8, 255, 7], (0..=255u8).collect::<Vec<_>>());
    let empty = Record::new(Vec::new(), Vec::new());
    let sent = vec![with_headers, binary, empty];
    publish(&bus, &topic, sent.clone()).await;
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let got = consume(consumer.as_mut(), sent.len()).await;
    for record in &sent {
        assert!(
            got.iter().any(|d| &d.record == record),
            "record not returned intact: {record:?}"
        );
    }
}

/// Each group reads every record and commits independently of the others.
pub async fn groups_are_independent(open: &impl OpenBus) {
    let topic = unique_topic("groups");
    let bus = open.open().await;
    let records: Vec<Record> = (0..6)
        .map(|i| record(&format!("k{i}"), &i.to_string()))
        .collect();
    publish(&bus, &topic, records).await;
    let mut a = subscribe(&bus, &topic, "a").await;
    let mut b = subscribe(&bus, &topic, "b").await;
    let got_a = consume(a.as_mut(), 6).await;
    let got_b = consume(b.as_mut(), 6).await;
    assert_eq!(sorted(got_a.clone()), sorted(got_b));
    a.commit(&next_positions(&got_a)).await.expect("commit");
    assert_eq!(lag(&bus, &topic, "a").await, 0);
    assert_eq!(lag(&bus, &topic, "b").await, 6);
}

/// 50 tasks publishing 200 records each, one per call: every record is read back exactly once,
/// in order per publisher.
pub async fn concurrent_publishers_lose_nothing(open: &impl OpenBus) {
    const TASKS: usize = 50;
    const EACH: usize = 200;
    let topic = unique_topic("concurrent");
    let bus = open.open().await;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let bus = bus.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    publish(
                        &bus,
                        &topic,
                        vec![record(&format!("t{t}"), &format!("{t}:{i}"))],
                    )
                    .await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher task");
    }
    let mut consumer = subscribe(&bus, &topic, "g").await;
    let got = consume(consumer.as_mut(), TASKS * EACH).await;
    let unique: HashSet<&[u8]> = got.iter().map(|d| d.record.payload.as_slice()).collect();
    assert_eq!(unique.len(), TASKS * EACH, "duplicates delivered");
    let mut next_seq = vec![0usize; TASKS];
    for d in &got {
        let payload = text(&d.record.payload);
        let (t, i) = payload.split_once(':').expect("task:seq payload");
        let (t, i): (usize, usize) = (t.parse().expect("task"), i.parse().expect("seq"));
        assert_eq!(i, next_seq[t], "publisher {t} out of order");
        next_seq[t] += 1;
    }
    expect_quiet(consumer.as_mut()).await;
}

/// A topic name no other check or run uses.
fn unique_topic(check: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("conformance.{check}.{}.{nanos}.{n}", std::process::id())
}

fn record(key: &str, payload: &str) -> Record {
    Record::new(key, payload)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn publish(bus: &Arc<dyn Bus>, topic: &str, records: Vec<Record>) {
    bus.publish(topic, records).await.expect("publish");
}

async fn subscribe(bus: &Arc<dyn Bus>, topic: &str, group: &str) -> Box<dyn Consumer> {
    bus.subscribe(topic, &scoped(group, topic))
        .await
        .expect("subscribe")
}

async fn lag(bus: &Arc<dyn Bus>, topic: &str, group: &str) -> u64 {
    bus.lag(topic, &scoped(group, topic)).await.expect("lag")
}

/// The group a check calls `group` on `topic`: unique to the topic (see the module docs).
fn scoped(group: &str, topic: &str) -> String {
    format!("{group}.{topic}")
}

/// Polls until exactly `n` records have arrived, failing if more arrive or they take too long.
async fn consume(consumer: &mut dyn Consumer, n: usize) -> Vec<Delivered> {
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            started.elapsed() < WAIT,
            "got {} of {n} records in {WAIT:?}",
            got.len()
        );
        let batch = consumer
            .poll(1000, Duration::from_millis(500))
            .await
            .expect("poll");
        got.extend(batch);
    }
    assert_eq!(got.len(), n, "more records than published");
    got
}

async fn expect_quiet(consumer: &mut dyn Consumer) {
    let extra = consumer.poll(100, QUIET).await.expect("poll");
    assert!(extra.is_empty(), "unexpected records: {extra:?}");
}

fn assert_offsets_increase(records: &[Delivered]) {
    let mut last: HashMap<u32, u64> = HashMap::new();
    for d in records {
        if let Some(previous) = last.insert(d.partition, d.offset) {
            assert!(
                d.offset > previous,
                "partition {} went from {previous} to {}",
                d.partition,
                d.offset
            );
        }
    }
}

fn positions(records: &[Delivered]) -> Vec<(u32, u64)> {
    let mut out: Vec<_> = records.iter().map(|d| (d.partition, d.offset)).collect();
    out.sort_unstable();
    out
}

fn sorted(mut records: Vec<Delivered>) -> Vec<Delivered> {
    records.sort_by_key(|d| (d.partition, d.offset));
    records
}

//! Tests against a real Kafka-protocol broker, named by `HERALD_TEST_KAFKA` (`host:port`).
//! Start one with `scripts/broker.sh start`.

use super::*;
use crate::bus::{Delivered, conformance, next_positions};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The broker under test. Fails (never skips) when none is configured.
fn broker() -> String {
    match std::env::var("HERALD_TEST_KAFKA") {
        Ok(brokers) if !brokers.trim().is_empty() => brokers,
        _ => panic!(
            "HERALD_TEST_KAFKA is not set: the Kafka bus tests need a broker. Run \
             `scripts/broker.sh start` and set HERALD_TEST_KAFKA=127.0.0.1:19092 \
             (the project's test script does both)"
        ),
    }
}

/// Settings for the broker under test. Logs go to the test's output (shown when it fails);
/// `HERALD_TEST_KAFKA_DEBUG` sets librdkafka's `debug` contexts (for example `cgrp,fetch`).
fn config() -> KafkaConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,librdkafka=debug")
        .with_test_writer()
        .try_init();
    let mut config = KafkaConfig {
        brokers: broker(),
        client_id: "herald-tests".into(),
        ..KafkaConfig::default()
    };
    if let Ok(contexts) = std::env::var("HERALD_TEST_KAFKA_DEBUG") {
        config.properties.insert("debug".into(), contexts);
    }
    config
}

fn bus() -> KafkaBus {
    KafkaBus::new(&config()).expect("kafka bus")
}

/// A topic name no other test or run uses.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("test.{prefix}.{}.{nanos}", std::process::id())
}

/// Polls until `n` records have arrived.
async fn consume(consumer: &mut dyn Consumer, n: usize) -> Vec<Delivered> {
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "got {} of {n} records",
            got.len()
        );
        got.extend(
            consumer
                .poll(5000, Duration::from_millis(500))
                .await
                .expect("poll"),
        );
    }
    assert_eq!(got.len(), n);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let config = config();
    conformance::run_all(move || {
        let config = config.clone();
        async move { Arc::new(KafkaBus::new(&config).expect("kafka bus")) as Arc<dyn Bus> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_creates_once() {
    let bus = bus();
    let specs = vec![
        TopicSpec {
            name: unique("ensure.a"),
            partitions: 4,
            replication: 1,
        },
        TopicSpec {
            name: unique("ensure.b"),
            partitions: 1,
            replication: 1,
        },
    ];
    let first = bus.ensure_topics(&specs).await.expect("first ensure");
    let statuses: Vec<_> = first.iter().map(|o| (o.topic.clone(), o.status)).collect();
    assert_eq!(
        statuses,
        vec![
            (
                specs[0].name.clone(),
                TopicStatus::Created { partitions: 4 }
            ),
            (
                specs[1].name.clone(),
                TopicStatus::Created { partitions: 1 }
            ),
        ]
    );
    assert!(first[0].to_string().contains("created with 4 partitions"));

    // Asking again, even for another partition count, changes nothing.
    let again: Vec<TopicSpec> = specs
        .iter()
        .map(|s| TopicSpec {
            partitions: 8,
            ..s.clone()
        })
        .collect();
    let second = bus.ensure_topics(&again).await.expect("second ensure");
    let statuses: Vec<_> = second.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![
            TopicStatus::AlreadyExisted { partitions: 4 },
            TopicStatus::AlreadyExisted { partitions: 1 },
        ]
    );
    assert!(second[1].to_string().contains("already exists"));
    assert!(bus.ensure_topics(&[]).await.expect("nothing").is_empty());
}

#[test]
fn herald_topics_follow_the_config() {
    let config = KafkaConfig {
        requests_partitions: 6,
        replication: 3,
        ..KafkaConfig::default()
    };
    let specs = herald_topics(&config);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["herald.requests", "herald.delivery", "herald.requests.dlq"]
    );
    assert_eq!(specs[0].partitions, 6);
    assert_eq!(specs[1].partitions, 12);
    assert_eq!(specs[2].partitions, 3);
    assert!(specs.iter().all(|s| s.replication == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_an_error_when_creation_is_off() {
    let bus = KafkaBus::new(&KafkaConfig {
        create_topics: false,
        ..config()
    })
    .expect("kafka bus");
    let topic = unique("absent");
    let error = bus
        .publish(&topic, vec![Record::new("k", "v")])
        .await
        .expect_err("publish to a missing topic");
    assert!(
        matches!(error, BusError::UnknownTopic(ref t) if *t == topic),
        "{error}"
    );
    assert!(matches!(
        bus.subscribe(&topic, "g").await.err(),
        Some(BusError::UnknownTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_twenty_thousand_records_and_counts_their_lag() {
    const RECORDS: usize = 20_000;
    let bus = bus();
    let topic = unique("bulk");
    let group = format!("g.{topic}");
    let payload = vec![b'x'; 200];
    let records: Vec<Record> = (0..RECORDS)
        .map(|i| Record::new(format!("receiver-{}", i % 1000), payload.clone()))
        .collect();
    let started = Instant::now();
    bus.publish(&topic, records).await.expect("publish");
    tracing::info!(elapsed = ?started.elapsed(), "published {RECORDS} records");
    assert_eq!(bus.lag(&topic, &group).await.expect("lag"), RECORDS as u64);

    let mut consumer = bus.subscribe(&topic, &group).await.expect("subscribe");
    let got = consume(consumer.as_mut(), RECORDS).await;
    assert!(got.iter().all(|d| d.record.payload == payload));
    let half = &got[..RECORDS / 2];
    consumer
        .commit(&next_positions(half))
        .await
        .expect("commit");
    // Records come in offset order per partition, so the first half is a prefix of each.
    assert_eq!(
        bus.lag(&topic, &group).await.expect("lag"),
        (RECORDS - RECORDS / 2) as u64
    );
    consumer
        .commit(&next_positions(&got))
        .await
        .expect("commit");
    assert_eq!(bus.lag(&topic, &group).await.expect("lag"), 0);
    let other = format!("other.{topic}");
    assert_eq!(bus.lag(&topic, &other).await.expect("lag"), RECORDS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_of_an_unknown_topic_is_an_error() {
    let bus = bus();
    assert!(matches!(
        bus.lag(&unique("never"), "g").await,
        Err(BusError::UnknownTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_during_a_rebalance_does_not_fail() {
    let bus = Arc::new(bus());
    let topic = unique("rebalance");
    let group = format!("g.{topic}");
    let records: Vec<Record> = (0..30)
        .map(|i| Record::new(format!("k{i}"), i.to_string()))
        .collect();
    bus.publish(&topic, records).await.expect("publish");
    let mut first = bus.subscribe(&topic, &group).await.expect("subscribe");
    let got = consume(first.as_mut(), 30).await;

    // A second member joins while the first is busy: the first commits before it has rejoined.
    let mut second = bus.subscribe(&topic, &group).await.expect("subscribe");
    let joining = tokio::spawn(async move {
        let seen = second
            .poll(100, Duration::from_secs(3))
            .await
            .expect("poll");
        (second, seen)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    first
        .commit(&next_positions(&got))
        .await
        .expect("a commit during a rebalance");
    drop(first);
    let (mut second, mut seen) = joining.await.expect("second member");

    // The group goes on: the second member owns every partition now. If the broker refused the
    // commit, it reads the 30 records again; either way it gets what is published next.
    bus.publish(&topic, vec![Record::new("k", "next")])
        .await
        .expect("publish");
    let started = Instant::now();
    while !seen.iter().any(|d| d.record.payload == b"next") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the remaining member got {} records and not the new one",
            seen.len()
        );
        seen.extend(
            second
                .poll(100, Duration::from_millis(500))
                .await
                .expect("poll"),
        );
    }
    assert!(
        seen.len() == 1 || seen.len() == 31,
        "{} records",
        seen.len()
    );
    second.commit(&next_positions(&seen)).await.expect("commit");
    assert_eq!(bus.lag(&topic, &group).await.expect("lag"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_makes_publish_wait() {
    let mut config = config();
    config
        .properties
        .insert("queue.buffering.max.messages".into(), "50".into());
    let bus = KafkaBus::new(&config).expect("kafka bus");
    let topic = unique("backpressure");
    let records: Vec<Record> = (0..2_000)
        .map(|i| Record::new(format!("k{}", i % 10), format!("{i}")))
        .collect();
    bus.publish(&topic, records).await.expect("publish");
    let lag = bus.lag(&topic, &format!("g.{topic}")).await.expect("lag");
    assert_eq!(lag, 2_000);
}

//! Distributed-deployment figures, against a tansu broker and PostgreSQL started or found by the
//! harness:
//! - ingest into Kafka (`POST /v1/send/batch`, the ingest role alone) beside a raw rdkafka
//!   producer writing records of the same size, keys and settings to the same broker;
//! - end to end to the inbox with one and with two dispatch processes (plus one ingest and one
//!   analytics process) beside the embedded deployment on the same machine.
//!
//! Each measurement gets a fresh broker and a fresh database, so no record of one measurement is
//! left for the next. The broker stores in a SQLite file (tansu's `sqlite://` engine): its memory
//! engine loses records when a consumer resumes from the middle of a produced batch, which a
//! rebalance between dispatch processes does.

use super::{Herald, Row, free_addr, load, wait_listening};
use anyhow::{Context, bail};
use chrono::Utc;
use herald_core::bus::kafka::KafkaConfig;
use herald_core::{Channel, MessageId, MessageRecord, MsgType};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Receivers per `POST /v1/send/batch` in these figures.
const BATCH: usize = 1000;

/// A tansu broker storing in a temporary SQLite file, on a free port; killed when dropped.
pub(super) struct Broker {
    child: Child,
    address: String,
    /// tansu's working directory, which holds its database; removed when dropped.
    dir: PathBuf,
}

impl Broker {
    pub(super) fn start() -> anyhow::Result<Broker> {
        let tansu = std::env::var_os("HERALD_TANSU")
            .map(PathBuf::from)
            .or_else(|| std::env::home_dir().map(|h| h.join(".cache/herald/tansu/bin/tansu")))
            .filter(|p| p.exists())
            .context("no tansu broker: run scripts/broker.sh start once (it installs tansu) or set HERALD_TANSU")?;
        let addr = free_addr()?;
        let url = format!("tcp://{addr}");
        // tansu resolves a sqlite:// path against its working directory.
        let dir = std::env::temp_dir().join(format!("herald-bench-tansu-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(tansu)
            .current_dir(&dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let broker = Broker {
            child,
            address: addr.to_string(),
            dir,
        };
        wait_listening(addr)?;
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates an empty database on the PostgreSQL server `server`; returns its URL.
pub(super) async fn fresh_database(server: &str) -> anyhow::Result<String> {
    let admin = sqlx::PgPool::connect(server)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {server}"))?;
    let name = format!("herald_bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    let mut url = url::Url::parse(server)?;
    url.set_path(&name);
    Ok(url.to_string())
}

/// The environment of every process of a deployment on `broker` and `store`.
pub(super) fn distributed_env(broker: &Broker, store: &str) -> Vec<(String, String)> {
    vec![
        ("HERALD_BUS_KIND".into(), "kafka".into()),
        ("HERALD_KAFKA__BROKERS".into(), broker.address.clone()),
        ("HERALD_KAFKA__REQUESTS_PARTITIONS".into(), "6".into()),
        ("HERALD_KAFKA__DELIVERY_PARTITIONS".into(), "6".into()),
        ("HERALD_STORE_URL".into(), store.into()),
        (
            "HERALD_SECURITY__SECRET_KEYS".into(),
            herald_core::secrets::SecretBox::generate_entry("bench"),
        ),
    ]
}

/// One message record as ingest writes it for the bench template: the size the raw producer
/// writes.
fn sample_record() -> Vec<u8> {
    let record = MessageRecord {
        v: 1,
        message_id: MessageId::new(),
        request_id: uuid::Uuid::now_v7().to_string(),
        biz_id: None,
        app: "bench".into(),
        template_id: 1,
        channel: Channel::Inbox,
        msg_type: MsgType::Notice,
        account_id: None,
        receiver: "user-100000".into(),
        content: serde_json::json!({"title": "Hello Ann", "content": "Your code is 123456"}),
        accepted_at: Utc::now(),
        send_at: None,
        timezone: None,
    };
    serde_json::to_vec(&record).expect("a record serialises")
}

/// Writes `n` records of `payload` keyed `user-i` with the producer settings herald uses
/// (idempotent, `acks=all`, linger 5 ms, lz4); returns records/s once all are acknowledged.
async fn raw_producer(brokers: &str, n: usize, payload: &[u8]) -> anyhow::Result<f64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()?;
    // Same partitions as herald's topic in these figures; created by the first produce.
    let admin_config = KafkaConfig {
        brokers: brokers.to_string(),
        ..KafkaConfig::default()
    };
    let bus = herald_core::bus::kafka::KafkaBus::new(&admin_config)?;
    bus.ensure_topics(&[herald_core::bus::kafka::TopicSpec {
        name: "bench.raw".into(),
        partitions: 6,
        replication: 1,
    }])
    .await?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("user-{i}");
        loop {
            match producer.send_result(FutureRecord::to("bench.raw").key(&key).payload(payload)) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => bail!("produce failed: {e}"),
            }
        }
    }
    for delivery in pending {
        if let Err((e, _)) = delivery.await? {
            bail!("a record was not acknowledged: {e}");
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(10))?;
    Ok(rate)
}

/// The figures of this module.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let payload = sample_record();

    let broker = Broker::start()?;
    let raw = raw_producer(&broker.address, args.kafka_records, &payload).await?;
    drop(broker);
    rows.push(Row::new(
        format!(
            "raw rdkafka producer, {} records of {} bytes, idempotent, acks=all (baseline for ingest)",
            args.kafka_records,
            payload.len()
        ),
        raw,
        "records/s",
        1.0,
        None,
    ));

    let broker = Broker::start()?;
    let store = fresh_database(&args.postgres).await?;
    let env = distributed_env(&broker, &store);
    let herald = Herald::start_with("ingest", &pairs(&env)).await?;
    let r = load(
        herald.server.addr,
        "/v1/send/batch",
        herald.batch_body(BATCH, 0),
        &herald.key,
        4,
        args.seconds,
    )
    .await?;
    drop(herald);
    drop(broker);
    let ingest = r.rps * BATCH as f64;
    rows.push(Row::new(
        "POST /v1/send/batch into Kafka, ingest role alone (records/s)",
        ingest,
        "records/s",
        ingest / raw,
        Some(r.p99_ms),
    ));

    let embedded = Herald::start("all").await?;
    let (embedded_rate, _) = embedded.end_to_end(args.e2e_messages).await?;
    drop(embedded);
    rows.push(Row::new(
        "end to end to the inbox, embedded (baseline for the distributed figures)",
        embedded_rate,
        "msg/s",
        1.0,
        None,
    ));
    let mut one_worker = None;
    for workers in [1, 2] {
        let broker = Broker::start()?;
        let store = fresh_database(&args.postgres).await?;
        let env = distributed_env(&broker, &store);
        let mut herald = Herald::start_with("ingest", &pairs(&env)).await?;
        herald.spawn_role("analytics", &pairs(&env))?;
        for _ in 0..workers {
            herald.spawn_role("dispatch", &pairs(&env))?;
        }
        let (rate, _) = herald.end_to_end(args.e2e_messages).await?;
        drop(herald);
        drop(broker);
        rows.push(Row::new(
            format!(
                "end to end to the inbox, Kafka + PostgreSQL, {workers} dispatch process(es) (ratio to embedded)"
            ),
            rate,
            "msg/s",
            rate / embedded_rate,
            None,
        ));
        match one_worker {
            None => one_worker = Some(rate),
            Some(one) => rows.push(Row::new(
                "two dispatch processes against one (scaling ratio)",
                rate / one,
                "x",
                rate / one,
                None,
            )),
        }
    }
    Ok(rows)
}

pub(super) fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

//! Test helpers: an in-memory [`Bus`], a recording [`EventIndex`], deterministic events, and
//! warehouses in a temporary directory or in a fresh bucket of a local S3 server.

use crate::index::EventIndex;
use crate::warehouse::Warehouse;
use async_trait::async_trait;
use chrono::{DateTime, Duration as Span, TimeZone, Utc};
use herald_core::bus::{Bus, BusError, Consumer, Delivered, Position, Record, partition_for};
use herald_core::wire::{DELIVERY_TOPIC, event_id};
use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};
use object_store::aws::AmazonS3Builder;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PARTITIONS: u32 = 3;

#[derive(Default)]
struct MemState {
    /// Per topic, per partition, the records in offset order.
    logs: HashMap<String, Vec<Vec<Delivered>>>,
    committed: HashMap<(String, String), BTreeMap<u32, u64>>,
    /// How many records consumers have been given, in total.
    handed_out: usize,
}

/// A bus that keeps everything in memory; it survives a "crash" of the sink (a dropped
/// consumer), like a durable log.
#[derive(Clone, Default)]
pub(crate) struct MemBus {
    state: Arc<Mutex<MemState>>,
}

impl MemBus {
    /// Publishes events as dispatch would: JSON keyed by receiver.
    pub(crate) async fn publish_events(&self, events: &[DeliveryEvent]) {
        let records = events.iter().map(DeliveryEvent::to_record).collect();
        self.publish(DELIVERY_TOPIC, records).await.unwrap();
    }

    /// How many records consumers have been given, in total.
    pub(crate) fn handed_out(&self) -> usize {
        self.state.lock().unwrap().handed_out
    }
}

#[async_trait]
impl Bus for MemBus {
    async fn publish(&self, topic: &str, records: Vec<Record>) -> Result<(), BusError> {
        let mut st = self.state.lock().unwrap();
        let log = st
            .logs
            .entry(topic.to_string())
            .or_insert_with(|| vec![Vec::new(); PARTITIONS as usize]);
        for record in records {
            let partition = partition_for(&record.key, PARTITIONS);
            let part = &mut log[partition as usize];
            part.push(Delivered {
                topic: topic.to_string(),
                partition,
                offset: part.len() as u64,
                record,
            });
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError> {
        let key = (topic.to_string(), group.to_string());
        let positions = self.state.lock().unwrap().committed.get(&key).cloned();
        Ok(Box::new(MemConsumer {
            state: self.state.clone(),
            key,
            positions: positions.unwrap_or_default(),
        }))
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64, BusError> {
        let st = self.state.lock().unwrap();
        let committed = st.committed.get(&(topic.to_string(), group.to_string()));
        let lag = st
            .logs
            .get(topic)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(p, log)| {
                let done = committed
                    .and_then(|c| c.get(&(p as u32)))
                    .copied()
                    .unwrap_or(0);
                log.len() as u64 - done
            });
        Ok(lag.sum())
    }
}

struct MemConsumer {
    state: Arc<Mutex<MemState>>,
    key: (String, String),
    positions: BTreeMap<u32, u64>,
}

impl MemConsumer {
    fn take(&mut self, max: usize) -> Vec<Delivered> {
        let mut st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (p, log) in st.logs.get(&self.key.0).into_iter().flatten().enumerate() {
            let pos = self.positions.entry(p as u32).or_default();
            let end = log.len().min(*pos as usize + max - out.len());
            out.extend_from_slice(&log[*pos as usize..end]);
            *pos = end as u64;
        }
        st.handed_out += out.len();
        out
    }
}

#[async_trait]
impl Consumer for MemConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError> {
        let out = self.take(max);
        if !out.is_empty() {
            return Ok(out);
        }
        tokio::time::sleep(timeout).await;
        Ok(self.take(max))
    }

    async fn commit(&mut self, positions: &[Position]) -> Result<(), BusError> {
        let mut st = self.state.lock().unwrap();
        let committed = st.committed.entry(self.key.clone()).or_default();
        for p in positions {
            committed.insert(p.partition, p.next_offset);
        }
        Ok(())
    }
}

/// An index that remembers every event handed to it, by id.
#[derive(Default)]
pub(crate) struct MemIndex {
    pub(crate) events: Mutex<BTreeMap<String, DeliveryEvent>>,
}

#[async_trait]
impl EventIndex for MemIndex {
    async fn index(&self, events: &[DeliveryEvent]) -> anyhow::Result<()> {
        let mut all = self.events.lock().unwrap();
        for e in events {
            all.insert(e.event_id.clone(), e.clone());
        }
        Ok(())
    }

    async fn known(&self, ids: &[(MessageId, String)]) -> anyhow::Result<HashSet<String>> {
        let all = self.events.lock().unwrap();
        Ok(ids
            .iter()
            .filter(|(_, id)| all.contains_key(id))
            .map(|(_, id)| id.clone())
            .collect())
    }
}

/// The time of the first sample event: 2026-11-26T07:00:00Z.
pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap()
}

/// `n` deterministic events starting at [`t0`] + `start` events, 97.000123 s apart (so they
/// cross hour and, for large `start`, day boundaries), with every optional field exercised.
pub(crate) fn sample_events(n: usize, start: usize) -> Vec<DeliveryEvent> {
    const STATES: [State; 5] = [
        State::Accepted,
        State::Sending,
        State::Sent,
        State::Delivered,
        State::SendFailed,
    ];
    (start..start + n)
        .map(|i| {
            let message_id = MessageId(uuid::Uuid::from_u128(
                0x0190_0000_0000_7000_8000_0000_0000_0000 + i as u128,
            ));
            let state = STATES[i % STATES.len()];
            let attempt = (i % 3) as u32;
            let sent = matches!(state, State::Sent | State::Delivered | State::SendFailed);
            DeliveryEvent {
                event_id: event_id(&message_id, state, attempt),
                ts: t0() + Span::microseconds(97_000_123 * i as i64),
                message_id,
                request_id: format!("req-{}", i / 4),
                biz_id: (i % 2 == 0).then(|| format!("order-{i}")),
                app: ["shop", "bank"][i % 2].to_string(),
                template_id: 10 + (i % 3) as i64,
                channel: Channel::ALL[i % 3],
                msg_type: [MsgType::Notice, MsgType::Marketing, MsgType::AuthCode][i % 3],
                receiver: format!("user-{}", i % 7),
                state,
                vendor: sent.then(|| "smtp".to_string()),
                account_id: sent.then_some(7),
                vendor_message_id: sent.then(|| format!("v-{i}")),
                attempt,
                error_code: (state == State::SendFailed).then(|| "550".to_string()),
                error_detail: (state == State::SendFailed).then(|| "mailbox, \"full\"".to_string()),
                latency_ms: sent.then_some(i as u64 * 3),
                billing_units: sent.then_some(1),
                cost_micros: sent.then_some(1200),
                currency: sent.then(|| "CNY".to_string()),
                redelivered: false,
            }
        })
        .collect()
}

/// The variable naming the S3-compatible server (an `http://host:port` URL) of the `s3_` tests.
const S3_SERVER: &str = "HERALD_TEST_S3";

/// A warehouse for one test; a local one is deleted when this is dropped.
pub(crate) struct TestWarehouse {
    pub(crate) wh: Warehouse,
    _dir: Option<tempfile::TempDir>,
}

impl TestWarehouse {
    /// A warehouse in a new temporary directory.
    pub(crate) fn local() -> Self {
        let dir = tempfile::tempdir().unwrap();
        TestWarehouse {
            wh: Warehouse::local(dir.path()),
            _dir: Some(dir),
        }
    }

    /// A warehouse under a prefix of a new bucket on the server at `$HERALD_TEST_S3`, with
    /// credentials and region from the `AWS_*` variables. Panics if the server is not configured.
    pub(crate) async fn s3() -> Self {
        let endpoint = std::env::var(S3_SERVER).ok();
        let key = std::env::var("AWS_ACCESS_KEY_ID").ok();
        let (Some(endpoint), Some(_)) = (endpoint, key) else {
            panic!(
                "the s3_ tests need a local S3-compatible server: run `moto_server -H 127.0.0.1 \
                 -p 5000` (pip install 'moto[server]') and set {S3_SERVER}=http://127.0.0.1:5000 \
                 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1"
            );
        };
        let endpoint = endpoint.trim_end_matches('/');
        let bucket = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
        let created = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{S3_SERVER}={endpoint} does not answer: {e}"));
        assert!(
            created.status().is_success(),
            "creating bucket {bucket} on {endpoint}: {}",
            created.status()
        );
        let builder = AmazonS3Builder::from_env()
            .with_endpoint(endpoint)
            .with_allow_http(true);
        let wh = Warehouse::s3(builder, &format!("s3://{bucket}/herald/warehouse")).unwrap();
        TestWarehouse { wh, _dir: None }
    }
}

/// Runs `f` on a blocking thread, where the sink runs warehouse operations (required for a
/// warehouse on an object store).
pub(crate) async fn blocking<T: Send + 'static>(
    wh: &Warehouse,
    f: impl FnOnce(&Warehouse) -> T + Send + 'static,
) -> T {
    let wh = wh.clone();
    tokio::task::spawn_blocking(move || f(&wh)).await.unwrap()
}

/// Writes `events` into their `delivery_events` partitions, one file per event, with receivers
/// in the warehouse's form.
pub(crate) fn write_events(wh: &Warehouse, events: &[DeliveryEvent]) {
    for (n, e) in events.iter().enumerate() {
        let key = format!("{}/part-{n}.parquet", Warehouse::partition_of(e.ts));
        let batch = crate::schema::events_to_batch_with(std::slice::from_ref(e), wh.receivers());
        wh.write_parquet(&key, &batch).unwrap();
    }
}

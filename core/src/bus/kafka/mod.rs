//! The Kafka bus, for the distributed deployment: [`KafkaBus`] implements [`Bus`] over any
//! Kafka-protocol cluster with librdkafka (through `rdkafka`).
//!
//! # Publishing
//!
//! One idempotent producer (`enable.idempotence=true`, `acks=all`) per bus: records are never
//! duplicated or reordered by the producer's own retries (see [`KafkaConfig::idempotence`]), and
//! `publish` returns only once the broker has acknowledged every record to all in-sync replicas. Records are batched for
//! `linger.ms=5` and compressed with lz4. A full local queue makes `publish` wait, never fail.
//! Keys are partitioned with `murmur2_random`, the Java client's partitioner, so records
//! produced by Java clients and by herald for one key share a partition. Unlike the embedded
//! bus, a batch is not atomic: when `publish` fails, some of its records may have been appended.
//!
//! # Consuming
//!
//! A [`Consumer`] is one member of a Kafka consumer group, subscribed to one topic. Offsets are
//! committed only by `commit` (`enable.auto.commit=false`), synchronously; a new group starts
//! at the beginning of the topic. A commit refused because the member lost its partitions in a
//! rebalance is logged and ignored: the new owner reads them again from the last commit.
//! Connection errors while polling are logged and polling goes on; librdkafka reconnects.
//!
//! # Topics
//!
//! A topic missing on its first publish or subscribe is created (see
//! [`KafkaConfig::create_topics`]) with the partition count configured for herald's topics or
//! [`KafkaConfig::default_partitions`] for others; [`KafkaBus::ensure_topics`] creates topics
//! explicitly (`herald kafka init`).

mod config;
mod consumer;
mod context;
mod topics;

#[cfg(test)]
mod tests;

pub use config::KafkaConfig;
pub use topics::{TopicOutcome, TopicSpec, TopicStatus, herald_topics};

use super::{Bus, BusError, Consumer, Record, lock, run_blocking};
use async_trait::async_trait;
use consumer::{KafkaConsumer, Member};
use context::TracingContext;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::AdminClient;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long `publish` pauses when the producer's local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);
/// How long each request behind `lag` may take.
const LAG_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Bus`] over a Kafka cluster. Creating it does not contact the brokers; the first call
/// that needs them does (librdkafka connects and reconnects by itself).
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer<TracingContext>,
    admin: Arc<AdminClient<TracingContext>>,
    /// Topics known to exist (checked or created by this bus).
    known_topics: Mutex<HashSet<String>>,
    /// Serialises topic creation.
    creating: tokio::sync::Mutex<()>,
    /// One idle client per consumer group, for `lag`'s offset requests.
    lag_clients: Mutex<HashMap<String, Arc<BaseConsumer<TracingContext>>>>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the producer and admin clients for the cluster `config` names. Fails only on
    /// invalid settings.
    pub fn new(config: &KafkaConfig) -> Result<KafkaBus, BusError> {
        let mut producer = client_config(config);
        producer
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "60000")
            .set("allow.auto.create.topics", "false");
        apply_properties(&mut producer, config);
        producer.set("acks", "all");
        if config.idempotence {
            producer.set("enable.idempotence", "true");
        } else {
            producer
                .set("enable.idempotence", "false")
                .set("max.in.flight.requests.per.connection", "1");
        }
        let producer = producer
            .create_with_context(TracingContext)
            .map_err(|e| invalid_settings("producer", e))?;

        let mut admin = client_config(config);
        admin.set("allow.auto.create.topics", "false");
        apply_properties(&mut admin, config);
        let admin = admin
            .create_with_context(TracingContext)
            .map_err(|e| invalid_settings("admin client", e))?;

        Ok(KafkaBus {
            config: config.clone(),
            producer,
            admin: Arc::new(admin),
            known_topics: Mutex::new(HashSet::new()),
            creating: tokio::sync::Mutex::new(()),
            lag_clients: Mutex::new(HashMap::new()),
        })
    }

    /// Settings of a consumer in `group` that commits only explicitly.
    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut consumer = client_config(&self.config);
        consumer.set("allow.auto.create.topics", "false");
        apply_properties(&mut consumer, &self.config);
        consumer
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        consumer
    }

    /// The idle client `lag` uses for `group`, created on first use.
    fn lag_client(&self, group: &str) -> Result<Arc<BaseConsumer<TracingContext>>, BusError> {
        let mut clients = lock(&self.lag_clients);
        if let Some(client) = clients.get(group) {
            return Ok(Arc::clone(client));
        }
        let client: BaseConsumer<TracingContext> = self
            .consumer_config(group)
            .create_with_context(TracingContext)
            .map_err(|e| invalid_settings("consumer", e))?;
        let client = Arc::new(client);
        clients.insert(group.to_owned(), Arc::clone(&client));
        Ok(client)
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, topic: &str, records: Vec<Record>) -> Result<(), BusError> {
        self.ensure_topic(topic).await?;
        let mut deliveries = Vec::with_capacity(records.len());
        for record in &records {
            let mut message = FutureRecord::to(topic)
                .key(record.key.as_slice())
                .payload(record.payload.as_slice());
            if !record.headers.is_empty() {
                let headers = record.headers.iter().fold(
                    OwnedHeaders::new_with_capacity(record.headers.len()),
                    |headers, (key, value)| {
                        headers.insert(Header {
                            key,
                            value: Some(value.as_str()),
                        })
                    },
                );
                message = message.headers(headers);
            }
            loop {
                match self.producer.send_result(message) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        message = back;
                        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                    }
                    Err((error, _)) => return Err(broker_error("producing a record", error)),
                }
            }
        }
        let mut failure = None;
        for delivery in deliveries {
            let error = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((error, _))) => broker_error("delivering a record", error),
                Err(_canceled) => BusError::Closed,
            };
            failure.get_or_insert(error);
        }
        failure.map_or(Ok(()), Err)
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError> {
        if group.is_empty() {
            return Err(BusError::InvalidArgument(
                "empty consumer group name".into(),
            ));
        }
        self.ensure_topic(topic).await?;
        let member: Member = self
            .consumer_config(group)
            .create_with_context(TracingContext)
            .map_err(|e| invalid_settings("consumer", e))?;
        member
            .subscribe(&[topic])
            .map_err(|e| broker_error("subscribing", e))?;
        Ok(Box::new(KafkaConsumer::new(
            topic.to_owned(),
            group.to_owned(),
            member,
        )))
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64, BusError> {
        let client = self.lag_client(group)?;
        let topic = topic.to_owned();
        run_blocking(move || group_lag(&client, &topic)).await
    }
}

/// High watermarks minus `client`'s group's committed offsets, summed over the partitions of
/// `topic`; a partition without a commit counts from its low watermark. Blocking.
fn group_lag(client: &BaseConsumer<TracingContext>, topic: &str) -> Result<u64, BusError> {
    // Serve the idle client's queued events (connection errors), which are logged.
    while let Some(event) = client.poll(Duration::ZERO) {
        if let Err(error) = event {
            tracing::debug!(%error, "kafka lag client");
        }
    }
    let partitions = topics::partition_count(client.client(), topic)?
        .ok_or_else(|| BusError::UnknownTopic(topic.to_owned()))?;
    let partitions = i32::try_from(partitions)
        .map_err(|_| BusError::Broker(format!("topic `{topic}` has too many partitions")))?;
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = client
        .committed_offsets(wanted, LAG_TIMEOUT)
        .map_err(|e| broker_error("fetching committed offsets", e))?;
    let mut lag = 0u64;
    for partition in 0..partitions {
        let (low, high) = client
            .fetch_watermarks(topic, partition, LAG_TIMEOUT)
            .map_err(|e| broker_error("fetching watermarks", e))?;
        let start = match committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(offset)) => offset.max(low),
            _ => low,
        };
        lag += u64::try_from(high - start).unwrap_or(0);
    }
    Ok(lag)
}

/// Settings every client shares.
fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", &config.client_id);
    client
}

/// Applies the user's extra librdkafka settings.
fn apply_properties(client: &mut ClientConfig, config: &KafkaConfig) {
    for (key, value) in &config.properties {
        client.set(key, value);
    }
}

fn invalid_settings(client: &str, error: KafkaError) -> BusError {
    BusError::InvalidArgument(format!("cannot create the Kafka {client}: {error}"))
}

/// A broker-side failure while `doing` something.
fn broker_error(doing: &str, error: KafkaError) -> BusError {
    BusError::Broker(format!("{doing}: {error}"))
}

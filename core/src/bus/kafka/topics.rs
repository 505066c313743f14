//! Topic administration: herald's topics, creating missing ones, reading partition counts.

use super::{KafkaBus, KafkaConfig, TracingContext, broker_error};
use crate::bus::BusError;
use crate::wire::{DELIVERY_TOPIC, REQUESTS_DLQ_TOPIC, REQUESTS_TOPIC};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::Client;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the broker may take to create topics.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a created topic to show up in the cluster's metadata.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    /// 0 counts as 1.
    pub partitions: u32,
    /// 0 counts as 1.
    pub replication: u16,
}

/// What [`KafkaBus::ensure_topics`] found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicOutcome {
    pub topic: String,
    pub status: TopicStatus,
}

/// Whether a topic was created or already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    /// Created with this many partitions.
    Created { partitions: u32 },
    /// Left as it was; it has this many partitions (possibly not the requested count).
    AlreadyExisted { partitions: u32 },
}

/// `herald.requests: created with 12 partitions`, for `herald kafka init`.
impl fmt::Display for TopicOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            TopicStatus::Created { partitions } => {
                write!(f, "{}: created with {partitions} partitions", self.topic)
            }
            TopicStatus::AlreadyExisted { partitions } => {
                write!(f, "{}: already exists, {partitions} partitions", self.topic)
            }
        }
    }
}

/// herald's three topics with the partition counts and replication `config` asks for:
/// `herald.requests`, `herald.delivery` and `herald.requests.dlq`.
pub fn herald_topics(config: &KafkaConfig) -> Vec<TopicSpec> {
    [
        (REQUESTS_TOPIC, config.requests_partitions),
        (DELIVERY_TOPIC, config.delivery_partitions),
        (REQUESTS_DLQ_TOPIC, config.dlq_partitions),
    ]
    .into_iter()
    .map(|(name, partitions)| TopicSpec {
        name: name.to_owned(),
        partitions,
        replication: config.replication,
    })
    .collect()
}

/// The spec of `topic` when herald creates it on first use.
fn spec_for(config: &KafkaConfig, topic: &str) -> TopicSpec {
    herald_topics(config)
        .into_iter()
        .find(|spec| spec.name == topic)
        .unwrap_or_else(|| TopicSpec {
            name: topic.to_owned(),
            partitions: config.default_partitions,
            replication: config.replication,
        })
}

impl KafkaBus {
    /// Creates every topic in `topics` that does not exist yet; existing topics are left as they
    /// are (their partition count is reported, not changed). Returns one outcome per topic, in
    /// the order given, once the created topics are visible in the cluster's metadata.
    pub async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<Vec<TopicOutcome>, BusError> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let new_topics = topics
            .iter()
            .map(|spec| {
                let partitions = i32::try_from(spec.partitions.max(1)).map_err(|_| {
                    BusError::InvalidArgument(format!("too many partitions for `{}`", spec.name))
                })?;
                let replication = TopicReplication::Fixed(i32::from(spec.replication.max(1)));
                Ok(NewTopic::new(&spec.name, partitions, replication))
            })
            .collect::<Result<Vec<_>, BusError>>()?;
        let options = AdminOptions::new().operation_timeout(Some(CREATE_TIMEOUT));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|e| broker_error("creating topics", e))?;
        let mut created: HashMap<String, bool> = HashMap::new();
        for result in results {
            match result {
                Ok(name) => {
                    created.insert(name, true);
                }
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    created.insert(name, false);
                }
                Err((name, code)) => {
                    return Err(BusError::Broker(format!(
                        "cannot create topic `{name}`: {code}"
                    )));
                }
            }
        }
        let mut outcomes = Vec::with_capacity(topics.len());
        for spec in topics {
            let status = if created.get(&spec.name).copied().unwrap_or(false) {
                self.wait_visible(&spec.name).await?;
                TopicStatus::Created {
                    partitions: spec.partitions.max(1),
                }
            } else {
                let partitions = self
                    .topic_partitions(&spec.name)
                    .await?
                    .ok_or_else(|| BusError::UnknownTopic(spec.name.clone()))?;
                TopicStatus::AlreadyExisted { partitions }
            };
            outcomes.push(TopicOutcome {
                topic: spec.name.clone(),
                status,
            });
        }
        Ok(outcomes)
    }

    /// Makes sure `topic` exists before its first use by this bus: creates it when missing
    /// (if the configuration allows), else fails with `UnknownTopic`.
    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<(), BusError> {
        if crate::bus::lock(&self.known_topics).contains(topic) {
            return Ok(());
        }
        let _creating = self.creating.lock().await;
        if crate::bus::lock(&self.known_topics).contains(topic) {
            return Ok(());
        }
        if self.topic_partitions(topic).await?.is_none() {
            if !self.config.create_topics {
                return Err(BusError::UnknownTopic(topic.to_owned()));
            }
            for outcome in self.ensure_topics(&[spec_for(&self.config, topic)]).await? {
                tracing::info!("kafka topic {outcome}");
            }
        }
        crate::bus::lock(&self.known_topics).insert(topic.to_owned());
        Ok(())
    }

    /// The partition count of `topic`, or `None` if the cluster does not know it.
    pub(super) async fn topic_partitions(&self, topic: &str) -> Result<Option<u32>, BusError> {
        let admin = Arc::clone(&self.admin);
        let topic = topic.to_owned();
        crate::bus::run_blocking(move || partition_count(admin.inner(), &topic)).await
    }

    /// Waits until a just-created topic shows up with its partitions in the metadata, so that
    /// a consumer subscribing next sees it. Gives up quietly after a while: producers and
    /// consumers find the topic by themselves once it propagates.
    async fn wait_visible(&self, topic: &str) -> Result<(), BusError> {
        let started = Instant::now();
        while started.elapsed() < VISIBLE_TIMEOUT {
            match self.topic_partitions(topic).await {
                Ok(Some(partitions)) if partitions > 0 => return Ok(()),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, topic, "waiting for a new topic"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(topic, "created topic not visible in metadata yet");
        Ok(())
    }
}

/// The partition count of `topic` from a metadata request (blocking), or `None` if the cluster
/// does not know the topic.
pub(super) fn partition_count(
    client: &Client<TracingContext>,
    topic: &str,
) -> Result<Option<u32>, BusError> {
    let metadata = client
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|e| broker_error("fetching metadata", e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => {}
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        | Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC) => return Ok(None),
        Some(error) => {
            return Err(BusError::Broker(format!(
                "metadata of topic `{topic}`: {}",
                RDKafkaErrorCode::from(error)
            )));
        }
    }
    u32::try_from(found.partitions().len())
        .map(Some)
        .map_err(|_| BusError::Broker(format!("topic `{topic}` has too many partitions")))
}

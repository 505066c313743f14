//! A member of a Kafka consumer group on one topic.

use super::{TracingContext, broker_error};
use crate::bus::{BusError, Consumer, Delivered, Position, Record};
use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::time::Instant;

/// The librdkafka consumer type used by the bus.
pub(super) type Member = StreamConsumer<TracingContext>;

/// A group member subscribed to one topic. Offsets are committed only by [`Consumer::commit`].
/// Dropping it leaves the group, so that the partitions move to the other members at once.
pub(super) struct KafkaConsumer {
    topic: String,
    group: String,
    /// `None` only while being dropped.
    member: Option<Arc<Member>>,
}

impl KafkaConsumer {
    pub(super) fn new(topic: String, group: String, member: Member) -> Self {
        KafkaConsumer {
            topic,
            group,
            member: Some(Arc::new(member)),
        }
    }

    fn member(&self) -> Result<&Arc<Member>, BusError> {
        self.member.as_ref().ok_or(BusError::Closed)
    }

    /// Deals with an error the consumer reported instead of a record. librdkafka reconnects
    /// and refetches by itself, so everything but a fatal error is logged and passed over.
    fn on_error(&self, error: KafkaError) -> Result<(), BusError> {
        match error {
            KafkaError::MessageConsumptionFatal(_) => {
                Err(broker_error("consumer failed fatally", error))
            }
            KafkaError::PartitionEOF(_) => Ok(()),
            error => {
                tracing::warn!(topic = %self.topic, group = %self.group, %error, "kafka consumer error, retrying");
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let member = Arc::clone(self.member()?);
        let deadline = Instant::now() + timeout;
        // Wait for the first record; serving the consumer also serves rebalances.
        loop {
            match tokio::time::timeout_at(deadline, member.recv()).await {
                Err(_elapsed) => return Ok(out),
                Ok(Ok(message)) => {
                    out.push(delivered(&message));
                    break;
                }
                Ok(Err(error)) => self.on_error(error)?,
            }
        }
        // Then take what is already fetched, without waiting.
        while out.len() < max {
            match member.recv().now_or_never() {
                None => break,
                Some(Ok(message)) => out.push(delivered(&message)),
                Some(Err(error)) => {
                    self.on_error(error)?;
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, positions: &[Position]) -> Result<(), BusError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::with_capacity(positions.len());
        for position in positions {
            let partition = i32::try_from(position.partition).map_err(|_| {
                BusError::InvalidArgument(format!("partition {} out of range", position.partition))
            })?;
            let offset = i64::try_from(position.next_offset).map_err(|_| {
                BusError::InvalidArgument(format!("offset {} out of range", position.next_offset))
            })?;
            offsets
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(|e| broker_error("building the commit", e))?;
        }
        let member = Arc::clone(self.member()?);
        match crate::bus::run_blocking(move || Ok(member.commit(&offsets, CommitMode::Sync)))
            .await?
        {
            Ok(()) => Ok(()),
            Err(error) if lost_membership(&error) => {
                // The partitions moved to another member, which reads them again from the last
                // committed offsets; the send ledger absorbs the repeats.
                tracing::warn!(topic = %self.topic, group = %self.group, %error, "commit rejected after a rebalance; the records will be redelivered");
                Ok(())
            }
            Err(error) => Err(broker_error("committing offsets", error)),
        }
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        let Some(member) = self.member.take() else {
            return;
        };
        // Closing waits for the group to acknowledge the leave; keep that off the async workers.
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(move || drop(member));
            }
            _ => drop(member),
        }
    }
}

/// Whether a commit failed because this member no longer belongs to the group's current
/// generation (a rebalance happened or is happening).
fn lost_membership(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::AssignmentLost
        )
    )
}

/// Copies a fetched message out of librdkafka's buffers.
fn delivered(message: &BorrowedMessage<'_>) -> Delivered {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Delivered {
        topic: message.topic().to_owned(),
        // librdkafka only hands out messages with real (non-negative) partitions and offsets.
        partition: u32::try_from(message.partition()).unwrap_or_default(),
        offset: u64::try_from(message.offset()).unwrap_or_default(),
        record: Record {
            key: message.key().unwrap_or_default().to_vec(),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_refused_after_a_rebalance_are_recognised() {
        for code in [
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::AssignmentLost,
        ] {
            assert!(
                lost_membership(&KafkaError::ConsumerCommit(code)),
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::GroupAuthorizationFailed,
        ] {
            assert!(
                !lost_membership(&KafkaError::ConsumerCommit(code)),
                "{code:?}"
            );
        }
    }
}

//! The bus: topics of keyed records, split into partitions, read by consumer groups that commit
//! offsets. Two implementations share this trait and one conformance suite
//! ([`conformance`]): the embedded write-ahead log ([`embedded::EmbeddedBus`]) and, in the
//! distributed deployment, Kafka.
//!
//! Delivery is at-least-once: a consumer that restarts before committing sees the records again.

pub mod embedded;
pub mod kafka;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use async_trait::async_trait;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Chooses the partition: records with the same key stay in order on one partition.
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    /// Small string headers (for example a DLQ record's `reason`).
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A record without headers.
    pub fn new(key: impl Into<Vec<u8>>, payload: impl Into<Vec<u8>>) -> Self {
        Record {
            key: key.into(),
            payload: payload.into(),
            headers: Vec::new(),
        }
    }
}

/// A record read back from a topic, with where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub record: Record,
}

/// Where a consumer has got to in one partition: the next offset it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: u32,
    pub next_offset: u64,
}

/// Errors of any bus implementation.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("consumer group `{group}` already has a member on topic `{topic}`")]
    GroupBusy { group: String, topic: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the bus is closed")]
    Closed,
    #[error("bus I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt log: {0}")]
    Corrupt(String),
    #[error("broker error: {0}")]
    Broker(String),
}

impl BusError {
    /// Whether trying the same call again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Io(_) | BusError::Broker(_))
    }
}

/// A durable, partitioned log of topics.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends every record; returns once all of them are durable (acknowledged). Records for the
    /// same topic keep their order within a partition. Either all are appended or an error is
    /// returned (the embedded log appends one batch with one write).
    async fn publish(&self, topic: &str, records: Vec<Record>) -> Result<(), BusError>;

    /// Joins consumer group `group` on `topic`, starting from the group's committed offsets (or
    /// the beginning of the topic for a new group).
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError>;

    /// Records in `topic` not yet committed by `group`, summed over partitions.
    async fn lag(&self, topic: &str, group: &str) -> Result<u64, BusError>;
}

/// A member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `timeout` for records and returns at most `max` of them, in offset order within
    /// each partition. An empty vector means nothing arrived in time.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError>;

    /// Makes the given positions durable for the group: after a restart, reading resumes there.
    async fn commit(&mut self, positions: &[Position]) -> Result<(), BusError>;
}

/// Runs blocking work (file I/O, a blocking librdkafka call) off the async worker threads.
pub(crate) async fn run_blocking<T, F>(work: F) -> Result<T, BusError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, BusError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(BusError::Closed),
    }
}

/// Locks a mutex, ignoring poisoning: every critical section of the bus leaves its data
/// consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The positions to commit after processing `records`: one past the highest offset per partition.
pub fn next_positions(records: &[Delivered]) -> Vec<Position> {
    let mut out: Vec<Position> = Vec::new();
    for d in records {
        match out.iter_mut().find(|p| p.partition == d.partition) {
            Some(p) => p.next_offset = p.next_offset.max(d.offset + 1),
            None => out.push(Position {
                partition: d.partition,
                next_offset: d.offset + 1,
            }),
        }
    }
    out
}

/// The partition of `key` among `partitions`: a stable hash (FNV-1a), so that a key's records
/// always land on one partition.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

//! Records a business system's own Kafka producer writes to `herald.requests`: a send request
//! with its app and credential (the JSON schema is `docs/schemas/kafka-request.v1.json`), not a
//! message record that herald's ingest wrote. Dispatch hands each such record to a
//! [`RequestExpander`], which checks it as ingest checks an HTTP request and turns it into
//! message records; a record it refuses goes to `herald.requests.dlq` with the reason.

use async_trait::async_trait;
use herald_core::MessageRecord;
use herald_core::bus::{Delivered, Record};

/// Why a producer's record was refused: the `reason` header of its DLQ copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A stable code (`malformed_record`, `unauthorized`, `record_too_large`, `bad_request`, ...).
    pub code: &'static str,
    /// What was wrong, for people.
    pub message: String,
}

/// Why a producer's record could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandError {
    /// The record is bad: it goes to the DLQ.
    Refused(Refusal),
    /// A dependency (the store) failed: the batch is tried again.
    Unavailable(String),
}

/// Checks and expands producers' records.
#[async_trait]
pub trait RequestExpander: Send + Sync {
    /// The message records of `delivered`, or why not. Message ids must be derived from the
    /// record's place on the bus so that a redelivered record yields the same ids (the send
    /// ledger then absorbs it).
    async fn expand(&self, delivered: &Delivered) -> Result<Vec<MessageRecord>, ExpandError>;
}

/// The DLQ copy of a refused record: the original key, payload and headers, plus `reason` (the
/// code), `reason_detail` and `source` (`topic/partition/offset`).
pub fn dead_letter(delivered: &Delivered, refusal: &Refusal) -> Record {
    let mut r = delivered.record.clone();
    r.headers.push(("reason".into(), refusal.code.into()));
    r.headers
        .push(("reason_detail".into(), refusal.message.clone()));
    r.headers.push((
        "source".into(),
        format!(
            "{}/{}/{}",
            delivered.topic, delivered.partition, delivered.offset
        ),
    ));
    r
}

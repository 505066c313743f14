//! The event index: a per-message record of delivery events kept by the store, which feeds the
//! trace API and lets the sink recognise re-emitted events.

use async_trait::async_trait;
use herald_core::{DeliveryEvent, MessageId};
use std::collections::HashSet;

/// Receives every event the sink has made durable in the warehouse, and answers which event ids
/// it already holds. Implemented by the store; both calls must be idempotent.
#[async_trait]
pub trait EventIndex: Send + Sync {
    /// Records `events` (called after each flush, and again for the newest flush on recovery).
    async fn index(&self, events: &[DeliveryEvent]) -> anyhow::Result<()>;

    /// The event ids among `ids` (message id, event id) that were indexed before.
    async fn known(&self, ids: &[(MessageId, String)]) -> anyhow::Result<HashSet<String>>;
}

/// An index that records nothing and knows nothing (tests, or a deployment without tracing).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIndex;

#[async_trait]
impl EventIndex for NoIndex {
    async fn index(&self, _events: &[DeliveryEvent]) -> anyhow::Result<()> {
        Ok(())
    }

    async fn known(&self, _ids: &[(MessageId, String)]) -> anyhow::Result<HashSet<String>> {
        Ok(HashSet::new())
    }
}

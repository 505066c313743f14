//! The send ledger, keyed by message id: what absorbs redelivery from the bus.
//!
//! Dispatch marks a batch `sending` before calling vendors and records the outcome after. A
//! redelivered message whose row says `sent` or `send_failed` is not sent again; one whose row
//! still says `sending` crashed during the vendor call — the one window where a duplicate is
//! possible, which dispatch counts. Inbox messages are written in the same transaction as their
//! `sent` row, so the inbox channel is exactly-once.

use super::{Store, StoreError, now_ms};
use crate::domain::MessageId;
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::HashMap;

/// A message's row in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerState {
    Sending,
    Sent,
    SendFailed,
}

impl LedgerState {
    fn as_str(self) -> &'static str {
        match self {
            LedgerState::Sending => "sending",
            LedgerState::Sent => "sent",
            LedgerState::SendFailed => "send_failed",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "sending" => Ok(LedgerState::Sending),
            "sent" => Ok(LedgerState::Sent),
            "send_failed" => Ok(LedgerState::SendFailed),
            other => Err(StoreError::Corrupt(format!("ledger state `{other}`"))),
        }
    }

    /// Whether the message is done: it must not be sent again.
    pub fn is_final(self) -> bool {
        !matches!(self, LedgerState::Sending)
    }
}

/// An inbox message to store with its ledger row.
#[derive(Debug, Clone, PartialEq)]
pub struct SentInbox {
    pub message_id: MessageId,
    pub app: String,
    pub receiver: String,
    pub template_id: i64,
    pub content: serde_json::Value,
}

/// Rows per multi-row statement: SQLite takes at most 32,766 bound parameters.
const CHUNK: usize = 1000;

impl Store {
    /// The ledger rows of `ids` that exist: state and attempt.
    pub async fn ledger_states(
        &self,
        ids: &[MessageId],
    ) -> Result<HashMap<MessageId, (LedgerState, u32)>, StoreError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT message_id, state, attempt FROM send_ledger WHERE message_id IN (",
            );
            let mut sep = q.separated(", ");
            for id in chunk {
                sep.push_bind(id.to_string());
            }
            q.push(")");
            for row in q.build().fetch_all(&self.pool).await? {
                let id: MessageId = row
                    .get::<&str, _>(0)
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("ledger id: {e}")))?;
                let state = LedgerState::parse(row.get(1))?;
                out.insert(id, (state, row.get::<i64, _>(2) as u32));
            }
        }
        Ok(out)
    }

    /// Records `rows` (message, state, attempt) in one transaction, together with the inbox
    /// messages in `inbox` (each stored once even if written again).
    pub async fn record_ledger(
        &self,
        rows: &[(MessageId, LedgerState, u32)],
        inbox: &[SentInbox],
    ) -> Result<(), StoreError> {
        if rows.is_empty() && inbox.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(CHUNK) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT OR REPLACE INTO send_ledger (message_id, state, attempt, updated_at) ",
            );
            q.push_values(chunk, |mut b, (id, state, attempt)| {
                b.push_bind(id.to_string())
                    .push_bind(state.as_str())
                    .push_bind(i64::from(*attempt))
                    .push_bind(now);
            });
            q.build().execute(&mut *tx).await?;
        }
        for chunk in inbox.chunks(CHUNK) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT OR IGNORE INTO inbox (message_id, app, receiver, template_id, content, created_at) ",
            );
            q.push_values(chunk, |mut b, m| {
                b.push_bind(m.message_id.to_string())
                    .push_bind(&m.app)
                    .push_bind(&m.receiver)
                    .push_bind(m.template_id)
                    .push_bind(m.content.to_string())
                    .push_bind(now);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

//! The send ledger, keyed by message id: what absorbs redelivery from the bus.
//!
//! Dispatch marks a batch `sending` before calling vendors and records the outcome after. A
//! redelivered message whose row says `sent` or `send_failed` is not sent again; one whose row
//! still says `sending` crashed during the vendor call — the one window where a duplicate is
//! possible, which dispatch counts. Inbox messages are written in the same transaction as their
//! `sent` row, so the inbox channel is exactly-once.

use super::{Backend, Store, StoreError, bindable, now_ms, placeholders, value_rows};
use crate::domain::MessageId;
use crate::wire::MessageRecord;
use sqlx::Row;
use std::collections::HashMap;

/// A message's row in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LedgerState {
    /// Waiting in the schedule (a future `send_at` or a quiet-hours deferral).
    Scheduled,
    /// Waiting in the schedule for a retry (a vendor's long `Retry-After`, or a redrive); it
    /// passed the policies already.
    Retrying,
    /// Passed the policies; a vendor call may be under way.
    Sending,
    Sent,
    SendFailed,
    /// Stopped by a policy (the template's kill switch, quiet hours that drop).
    Discarded,
    Blocked,
    DedupContent,
    DedupFrequency,
    Filtered,
    /// A scheduled message cancelled through the API.
    Cancelled,
    /// Too old to be sent (`dispatch.max_age` of its message type).
    Expired,
}

impl LedgerState {
    const ALL: [LedgerState; 12] = [
        LedgerState::Scheduled,
        LedgerState::Retrying,
        LedgerState::Sending,
        LedgerState::Sent,
        LedgerState::SendFailed,
        LedgerState::Discarded,
        LedgerState::Blocked,
        LedgerState::DedupContent,
        LedgerState::DedupFrequency,
        LedgerState::Filtered,
        LedgerState::Cancelled,
        LedgerState::Expired,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LedgerState::Scheduled => "scheduled",
            LedgerState::Retrying => "retrying",
            LedgerState::Sending => "sending",
            LedgerState::Sent => "sent",
            LedgerState::SendFailed => "send_failed",
            LedgerState::Discarded => "discarded",
            LedgerState::Blocked => "blocked",
            LedgerState::DedupContent => "dedup_content",
            LedgerState::DedupFrequency => "dedup_frequency",
            LedgerState::Filtered => "filtered",
            LedgerState::Cancelled => "cancelled",
            LedgerState::Expired => "expired",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
        LedgerState::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("ledger state `{s}`")))
    }

    /// Whether the message is done: it must not be sent again.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            LedgerState::Sending | LedgerState::Scheduled | LedgerState::Retrying
        )
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

impl Store {
    /// The ledger rows of `ids` that exist: state, attempt, and when the message was sent or
    /// failed for good (`done_at`, unix µs, where recorded).
    pub async fn ledger_states(
        &self,
        ids: &[MessageId],
    ) -> Result<HashMap<MessageId, (LedgerState, u32, Option<i64>)>, StoreError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(self.rows_per_statement(1)) {
            let sql = self.bindable(format!(
                "SELECT message_id, state, attempt, done_at FROM send_ledger \
                 WHERE message_id IN ({})",
                placeholders(1, chunk.len())
            ));
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.pool).await? {
                let id: MessageId = row
                    .get::<&str, _>(0)
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("ledger id: {e}")))?;
                let state = LedgerState::parse(row.get(1))?;
                let done_at: Option<i64> = row.get(3);
                out.insert(id, (state, row.get::<i64, _>(2) as u32, done_at));
            }
        }
        Ok(out)
    }

    /// Records `rows` (message, state, attempt) in one transaction, with the time of each
    /// message's final event in `done_at` (unix µs, where known), the inbox messages in `inbox`
    /// (each stored once even if written again) and the records of messages that failed for good
    /// in `failed` (kept for `POST /v1/messages/redrive`).
    pub async fn record_ledger(
        &self,
        rows: &[(MessageId, LedgerState, u32)],
        done_at: &HashMap<MessageId, i64>,
        inbox: &[SentInbox],
        failed: &[&MessageRecord],
    ) -> Result<(), StoreError> {
        if rows.is_empty() && inbox.is_empty() && failed.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        // One row per message, the last given: PostgreSQL refuses an upsert that touches a row
        // twice in one statement.
        let mut last: HashMap<&MessageId, (LedgerState, u32)> = HashMap::with_capacity(rows.len());
        let mut order = Vec::with_capacity(rows.len());
        for (id, state, attempt) in rows {
            if last.insert(id, (*state, *attempt)).is_none() {
                order.push(id);
            }
        }
        let mut tx = self.writer.begin().await?;
        let rows: Vec<(MessageId, LedgerState, u32)> = order
            .iter()
            .map(|id| (**id, last[id].0, last[id].1))
            .collect();
        upsert_ledger(
            self.backend,
            &mut tx,
            &rows,
            done_at,
            now,
            self.rows_per_statement(5),
        )
        .await?;
        for chunk in inbox.chunks(self.rows_per_statement(6)) {
            let sql = self.bindable(format!(
                "INSERT INTO inbox (message_id, app, receiver, template_id, content, created_at) \
                 VALUES {} ON CONFLICT DO NOTHING",
                value_rows(chunk.len(), 6)
            ));
            let mut q = sqlx::query(&sql);
            for m in chunk {
                q = q
                    .bind(m.message_id.to_string())
                    .bind(&m.app)
                    .bind(&m.receiver)
                    .bind(m.template_id)
                    .bind(m.content.to_string())
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in failed.chunks(self.rows_per_statement(5)) {
            let sql = self.bindable(format!(
                "INSERT INTO failed_messages (message_id, app, template_id, failed_at, record) \
                 VALUES {} ON CONFLICT (message_id) DO UPDATE SET failed_at = excluded.failed_at",
                value_rows(chunk.len(), 5)
            ));
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.message_id.to_string())
                    .bind(&r.app)
                    .bind(r.template_id)
                    .bind(now)
                    .bind(
                        serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Writes ledger rows (distinct messages) in `tx`, `rows_per_statement` at a time; a row's
/// `done_at` is kept when the new row brings none.
pub(super) async fn upsert_ledger(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    rows: &[(MessageId, LedgerState, u32)],
    done_at: &HashMap<MessageId, i64>,
    now: i64,
    rows_per_statement: usize,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(rows_per_statement) {
        let sql = bindable(
            backend,
            format!(
                "INSERT INTO send_ledger (message_id, state, attempt, updated_at, done_at) VALUES {} \
             ON CONFLICT (message_id) DO UPDATE SET state = excluded.state, \
             attempt = excluded.attempt, updated_at = excluded.updated_at, \
             done_at = COALESCE(excluded.done_at, send_ledger.done_at)",
                value_rows(chunk.len(), 5)
            ),
        );
        let mut q = sqlx::query(&sql);
        for (id, state, attempt) in chunk {
            q = q
                .bind(id.to_string())
                .bind(state.as_str())
                .bind(i64::from(*attempt))
                .bind(now)
                .bind(done_at.get(id).copied());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

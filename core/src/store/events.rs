//! The per-message index of delivery events behind `GET /v1/messages/{id}`, and each message's
//! current state behind the tracing endpoints (`message_states`, read in `traces`). The analytics
//! sink writes both after each warehouse commit, so they never hold an event the warehouse lacks.

use super::{Store, StoreError, value_rows};
use crate::domain::MessageId;
use crate::wire::DeliveryEvent;
use sqlx::Row;
use std::collections::{BTreeMap, HashSet};

/// The statement that writes `rows` messages' rows of `message_states`: a message gets the new
/// state when its event is later in the trace than the state's event, and its acceptance time
/// is its earliest event's.
fn upsert_states_sql(rows: usize) -> String {
    let newer = "(excluded.state_at, excluded.state_attempt, excluded.state_rank) > \
         (message_states.state_at, message_states.state_attempt, message_states.state_rank)";
    let pick = |column: &str| {
        format!(
            "{column} = CASE WHEN {newer} THEN excluded.{column} ELSE message_states.{column} END"
        )
    };
    format!(
        "INSERT INTO message_states (message_id, app, receiver, template_id, channel, biz_id, \
         accepted_at, state, state_at, state_attempt, state_rank) VALUES {} \
         ON CONFLICT (message_id) DO UPDATE SET \
         accepted_at = CASE WHEN excluded.accepted_at < message_states.accepted_at \
         THEN excluded.accepted_at ELSE message_states.accepted_at END, {}, {}, {}, {}",
        value_rows(rows, 11),
        pick("state"),
        pick("state_at"),
        pick("state_attempt"),
        pick("state_rank"),
    )
}

/// Events indexed per transaction. A sink flush holds up to 20,000 events; written in one
/// transaction they held SQLite's single writer for the longest stretch of any, while dispatch
/// waited to claim messages. Each part stands alone: indexing is idempotent and a message's state
/// only moves forward, so a crash between parts leaves a prefix that the sink's recovery
/// completes.
const EVENTS_PER_TRANSACTION: usize = 2_000;

impl Store {
    /// Adds events to the index; events already there are left as they are.
    pub async fn index_events(&self, events: &[DeliveryEvent]) -> Result<(), StoreError> {
        for part in events.chunks(EVENTS_PER_TRANSACTION) {
            self.index_events_at_once(part).await?;
        }
        Ok(())
    }

    /// Adds events to the index in one transaction.
    async fn index_events_at_once(&self, events: &[DeliveryEvent]) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        for chunk in events.chunks(self.rows_per_statement(5)) {
            let sql = self.bindable(format!(
                "INSERT INTO message_events (message_id, event_id, ts, state, event) VALUES {} \
                 ON CONFLICT DO NOTHING",
                value_rows(chunk.len(), 5)
            ));
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(e.message_id.to_string())
                    .bind(&e.event_id)
                    .bind(e.ts.timestamp_micros())
                    .bind(e.state.as_str())
                    .bind(serde_json::to_string(e).unwrap_or_default());
            }
            q.execute(&mut *tx).await?;
        }
        // One row per message (a statement may not update a row twice): its earliest and its
        // latest event of the batch; by message id, so concurrent writers lock in one order.
        let mut messages: BTreeMap<MessageId, (i64, &DeliveryEvent)> = BTreeMap::new();
        for e in events {
            let ts = e.ts.timestamp_micros();
            let entry = messages.entry(e.message_id).or_insert((ts, e));
            entry.0 = entry.0.min(ts);
            if e.trace_order() > entry.1.trace_order() {
                entry.1 = e;
            }
        }
        let messages: Vec<_> = messages.into_iter().collect();
        for chunk in messages.chunks(self.rows_per_statement(11)) {
            let sql = self.bindable(upsert_states_sql(chunk.len()));
            let mut q = sqlx::query(&sql);
            for (id, (accepted_at, e)) in chunk {
                let (state_at, attempt, rank) = e.trace_order();
                q = q
                    .bind(id.to_string())
                    .bind(&e.app)
                    .bind(&e.receiver)
                    .bind(e.template_id)
                    .bind(e.channel.as_str())
                    .bind(e.biz_id.as_deref())
                    .bind(*accepted_at)
                    .bind(e.state.as_str())
                    .bind(state_at)
                    .bind(i64::from(attempt))
                    .bind(rank);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Which of the given (message, event id) pairs are already indexed.
    pub async fn known_events(
        &self,
        ids: &[(MessageId, String)],
    ) -> Result<HashSet<String>, StoreError> {
        let mut out = HashSet::new();
        for chunk in ids.chunks(self.rows_per_statement(2)) {
            let sql = self.bindable(format!(
                "SELECT event_id FROM message_events WHERE (message_id, event_id) IN (VALUES {})",
                value_rows(chunk.len(), 2)
            ));
            let mut q = sqlx::query(&sql);
            for (m, e) in chunk {
                q = q.bind(m.to_string()).bind(e);
            }
            for row in q.fetch_all(&self.pool).await? {
                out.insert(row.get::<String, _>(0));
            }
        }
        Ok(out)
    }

    /// Every indexed event of a message, oldest first, if the message belongs to `app`.
    pub async fn message_events(
        &self,
        app: &str,
        id: &MessageId,
    ) -> Result<Vec<DeliveryEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT event FROM message_events WHERE message_id = $1 ORDER BY ts, event_id",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut events: Vec<DeliveryEvent> = rows
            .iter()
            .map(|r| {
                serde_json::from_str(r.get::<&str, _>(0))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        // Events of one batch can share a timestamp; the attempt, then pipeline order, breaks
        // the tie.
        events.sort_by_key(DeliveryEvent::trace_order);
        Ok(events.into_iter().filter(|e| e.app == app).collect())
    }
}

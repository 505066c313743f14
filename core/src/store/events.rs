//! The per-message index of delivery events behind `GET /v1/messages/{id}`. The analytics sink
//! writes it after each warehouse commit, so it never holds an event the warehouse lacks.

use super::{Store, StoreError, value_rows};
use crate::domain::MessageId;
use crate::wire::{DeliveryEvent, State};
use sqlx::Row;
use std::collections::HashSet;

impl Store {
    /// Adds events to the index; events already there are left as they are.
    pub async fn index_events(&self, events: &[DeliveryEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in events.chunks(self.rows_per_statement(5)) {
            let sql = format!(
                "INSERT INTO message_events (message_id, event_id, ts, state, event) VALUES {} \
                 ON CONFLICT DO NOTHING",
                value_rows(chunk.len(), 5)
            );
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
            let sql = format!(
                "SELECT event_id FROM message_events WHERE (message_id, event_id) IN (VALUES {})",
                value_rows(chunk.len(), 2)
            );
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
        let rank = |s: State| {
            State::ALL
                .iter()
                .position(|x| *x == s)
                .unwrap_or(usize::MAX)
        };
        events.sort_by_key(|e| (e.ts, e.attempt, rank(e.state)));
        Ok(events.into_iter().filter(|e| e.app == app).collect())
    }
}

//! Retention of the per-message index the tracing endpoints read (`message_events`,
//! `message_states`) and of the vendor ids receipts are matched by (`vendor_messages`): a
//! message whose latest state is older than the retention is forgotten here; the warehouse keeps
//! its events, and the trace endpoint reads them from there.

use super::{Store, StoreError, placeholders};
use sqlx::Row;

impl Store {
    /// Forgets up to `limit` messages whose latest state is before `before_us` (unix µs): their
    /// indexed events, state row and vendor ids, in one transaction. Returns how many.
    pub async fn prune_index(&self, before_us: i64, limit: i64) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let ids: Vec<String> = sqlx::query(
            "SELECT message_id FROM message_states WHERE state_at < $1 ORDER BY state_at LIMIT $2",
        )
        .bind(before_us)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        for chunk in ids.chunks(self.rows_per_statement(1)) {
            let list = placeholders(1, chunk.len());
            for table in ["message_events", "vendor_messages", "message_states"] {
                let sql =
                    self.bindable(format!("DELETE FROM {table} WHERE message_id IN ({list})"));
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id);
                }
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}

//! The in-app inbox: messages per receiver, newest first.

use super::{Store, StoreError, now_ms};
use serde::Serialize;
use sqlx::Row;

/// One message in a receiver's inbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboxEntry {
    pub message_id: String,
    pub template_id: i64,
    pub content: serde_json::Value,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds; `None` while unread.
    pub read_at: Option<i64>,
}

impl Store {
    /// A page of `receiver`'s inbox in `app`, newest first; `before` is the cursor
    /// (`created_at`, `message_id`) of the last entry of the previous page.
    pub async fn inbox(
        &self,
        app: &str,
        receiver: &str,
        before: Option<(i64, String)>,
        limit: i64,
        unread_only: bool,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let (ts, id) = before.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(
            "SELECT message_id, template_id, content, created_at, read_at FROM inbox
             WHERE app = $1 AND receiver = $2 AND (created_at < $3 OR (created_at = $4 AND message_id < $5) OR $6 = '')
               AND ($7 = 0 OR read_at IS NULL)
             ORDER BY created_at DESC, message_id DESC LIMIT $8",
        )
        .bind(app)
        .bind(receiver)
        .bind(ts)
        .bind(ts)
        .bind(&id)
        .bind(&id)
        .bind(i64::from(unread_only))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InboxEntry {
                    message_id: r.get(0),
                    template_id: r.get(1),
                    content: serde_json::from_str(r.get::<&str, _>(2))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    created_at: r.get(3),
                    read_at: r.get(4),
                })
            })
            .collect()
    }

    /// Marks messages of `receiver` read; returns how many changed. An empty list marks all.
    pub async fn mark_read(
        &self,
        app: &str,
        receiver: &str,
        ids: &[String],
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut changed = 0;
        if ids.is_empty() {
            changed = sqlx::query(
                "UPDATE inbox SET read_at = $1 WHERE app = $2 AND receiver = $3 AND read_at IS NULL",
            )
            .bind(now)
            .bind(app)
            .bind(receiver)
            .execute(&self.writer)
            .await?
            .rows_affected();
        }
        for id in ids {
            changed += sqlx::query(
                "UPDATE inbox SET read_at = $1 WHERE app = $2 AND receiver = $3 AND message_id = $4 AND read_at IS NULL",
            )
            .bind(now)
            .bind(app)
            .bind(receiver)
            .bind(id)
            .execute(&self.writer)
            .await?
            .rows_affected();
        }
        Ok(changed)
    }
}

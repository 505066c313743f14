//! `Idempotency-Key`: the first answer to a key is stored and returned for every repeat.
//!
//! A request claims its key before publishing (a row with no response yet); a concurrent repeat
//! sees the claim and is told to retry. A claim left by a crashed request expires after
//! [`CLAIM_TIMEOUT_MS`], so the key can be used again.

use super::{Store, StoreError, now_ms};
use sqlx::Row;

/// How long an unfinished claim blocks its key.
pub const CLAIM_TIMEOUT_MS: i64 = 60_000;

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is new: go ahead, then [`Store::finish_idempotency`].
    Claimed,
    /// The key was answered before: return this status and body.
    Done { status: u16, response: String },
    /// The key was used with a different request body.
    Mismatch,
    /// Another request with this key is in progress.
    InProgress,
}

impl Store {
    /// Claims `key` for a request whose body hashes to `request_hash`.
    pub async fn claim_idempotency(
        &self,
        app: i64,
        key: &str,
        request_hash: &str,
    ) -> Result<Claim, StoreError> {
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO idempotency (app_id, key, request_hash, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (app_id, key) DO UPDATE SET request_hash = excluded.request_hash, created_at = excluded.created_at
             WHERE idempotency.status IS NULL AND idempotency.created_at < $5",
        )
        .bind(app)
        .bind(key)
        .bind(request_hash)
        .bind(now)
        .bind(now - CLAIM_TIMEOUT_MS)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Claim::Claimed);
        }
        let row = sqlx::query(
            "SELECT request_hash, status, response FROM idempotency WHERE app_id = $1 AND key = $2",
        )
        .bind(app)
        .bind(key)
        .fetch_one(&self.pool)
        .await?;
        let hash: String = row.get(0);
        let status: Option<i64> = row.get(1);
        Ok(match status {
            _ if hash != request_hash => Claim::Mismatch,
            None => Claim::InProgress,
            Some(s) => Claim::Done {
                status: s as u16,
                response: row.get::<Option<String>, _>(2).unwrap_or_default(),
            },
        })
    }

    /// Stores the answer to a claimed key.
    pub async fn finish_idempotency(
        &self,
        app: i64,
        key: &str,
        status: u16,
        response: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency SET status = $1, response = $2 WHERE app_id = $3 AND key = $4",
        )
        .bind(i64::from(status))
        .bind(response)
        .bind(app)
        .bind(key)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Frees a claimed key whose request failed before anything was published.
    pub async fn release_idempotency(&self, app: i64, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency WHERE app_id = $1 AND key = $2 AND status IS NULL")
            .bind(app)
            .bind(key)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

//! The audit log: who changed which template, account, key, policy or list of an app, and when.
//! Entries never hold a secret (account configs are recorded by their field names only).
//!
//! Each store method that makes such a change takes its entry, built by the caller from the
//! change's result (which may hold a new id), and writes it with [`insert_audit`] in the
//! change's transaction: both are stored or neither is. A failure to write the entry fails the
//! change.

use super::{Store, StoreError, now_ms};
use serde::Serialize;
use sqlx::Row;

/// One change, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    /// When (unix ms).
    pub at: i64,
    /// The key id that made the change, or `cli` for the command line.
    pub actor: String,
    /// What was done, e.g. `template.update`, `key.revoke`.
    pub action: String,
    /// What it was done to, e.g. `template:42`, `key:3f9a…`, `policy`.
    pub target: String,
    /// Details of the change (never a secret).
    pub detail: serde_json::Value,
}

/// The entry a change makes in its app's audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    pub actor: String,
    pub action: &'static str,
    pub target: String,
    pub detail: serde_json::Value,
}

impl Audit {
    /// An entry saying that `actor` (a key id, or `cli`) did `action` to `target`.
    pub fn new(
        actor: &str,
        action: &'static str,
        target: impl Into<String>,
        detail: serde_json::Value,
    ) -> Audit {
        Audit {
            actor: actor.to_string(),
            action,
            target: target.into(),
            detail,
        }
    }
}

/// Writes `entry` in `app`'s audit log on `conn` (the change's transaction).
pub(crate) async fn insert_audit(
    conn: &mut sqlx::AnyConnection,
    app: i64,
    entry: &Audit,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (app_id, at, actor, action, target, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(app)
    .bind(now_ms())
    .bind(&entry.actor)
    .bind(entry.action)
    .bind(&entry.target)
    .bind(entry.detail.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

impl Store {
    /// The app's changes, newest first: `limit` of them before entry id `before` (or the newest).
    pub async fn audit_log(
        &self,
        app: i64,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, detail FROM audit_log
             WHERE app_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(app)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.get(0),
                    at: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    target: r.get(4),
                    detail: serde_json::from_str(r.get::<&str, _>(5))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                })
            })
            .collect()
    }
}

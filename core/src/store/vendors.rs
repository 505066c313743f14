//! Vendor state shared by every dispatch worker: access tokens, and the vendor id of each sent
//! message, which receipts are joined to.

use super::{Store, StoreError, now_ms, value_rows};
use crate::wire::{DeliveryEvent, Receipt, State, event_id};
use sqlx::Row;

/// A sent message awaiting its receipt, as a receipt poller needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReceipt {
    pub vendor_message_id: String,
    pub receiver: String,
    /// Unix milliseconds.
    pub sent_at: i64,
}

/// Rows per multi-row statement (SQLite binds at most 32,766 parameters, PostgreSQL 65,535).
const CHUNK: usize = 1000;

impl Store {
    /// The stored token under `key` and its expiry (unix ms), if any.
    pub async fn vendor_token(&self, key: &str) -> Result<Option<(String, i64)>, StoreError> {
        let row = sqlx::query("SELECT token, expires_at FROM vendor_tokens WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Stores `token` under `key` until `expires_at` (unix ms).
    pub async fn put_vendor_token(
        &self,
        key: &str,
        token: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO vendor_tokens (key, token, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(token)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets the token under `key` if it is still `token` (a vendor said it expired).
    pub async fn drop_vendor_token(&self, key: &str, token: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM vendor_tokens WHERE key = $1 AND token = $2")
            .bind(key)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Remembers the vendor ids of `sent` events (those with a vendor and a vendor id), so that
    /// receipts find their message. Writing one again changes nothing.
    pub async fn record_vendor_messages(&self, sent: &[DeliveryEvent]) -> Result<(), StoreError> {
        let rows: Vec<&DeliveryEvent> = sent
            .iter()
            .filter(|e| e.vendor.is_some() && e.vendor_message_id.is_some())
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO vendor_messages \
                 (vendor, vendor_message_id, receiver, message_id, account_id, sent_at, event) \
                 VALUES {} ON CONFLICT DO NOTHING",
                value_rows(chunk.len(), 7)
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(e.vendor.as_deref())
                    .bind(e.vendor_message_id.as_deref())
                    .bind(&e.receiver)
                    .bind(e.message_id.to_string())
                    .bind(e.account_id)
                    .bind(e.ts.timestamp_millis())
                    .bind(serde_json::to_string(e).unwrap_or_default());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The `sent` events a receipt for (`vendor`, `vendor_message_id`) refers to: the one for
    /// `receiver` when given, else every receiver under that id.
    pub async fn sent_by_vendor_id(
        &self,
        vendor: &str,
        vendor_message_id: &str,
        receiver: Option<&str>,
    ) -> Result<Vec<DeliveryEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT event FROM vendor_messages WHERE vendor = $1 AND vendor_message_id = $2 \
             AND (CAST($3 AS TEXT) IS NULL OR receiver = $4)",
        )
        .bind(vendor)
        .bind(vendor_message_id)
        .bind(receiver)
        .bind(receiver)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(r.get::<&str, _>(0))
                    .map_err(|e| StoreError::Corrupt(format!("vendor message event: {e}")))
            })
            .collect()
    }

    /// Up to `limit` messages sent through `account_id` since `since_ms` that have no receipt
    /// yet, oldest first.
    pub async fn pending_receipts(
        &self,
        account_id: i64,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<PendingReceipt>, StoreError> {
        let rows = sqlx::query(
            "SELECT vendor_message_id, receiver, sent_at FROM vendor_messages \
             WHERE account_id = $1 AND receipt_at IS NULL AND sent_at >= $2 \
             ORDER BY sent_at LIMIT $3",
        )
        .bind(account_id)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| PendingReceipt {
                vendor_message_id: r.get(0),
                receiver: r.get(1),
                sent_at: r.get(2),
            })
            .collect())
    }

    /// The `delivered` / `delivery_failed` events of `receipts`, each joined to its `sent` event
    /// by vendor, vendor id and receiver (when the receipt names one), and the receipts that
    /// matched no sent message. Event ids are deterministic, so a receipt seen twice yields the
    /// same event, which the warehouse keeps once.
    pub async fn receipt_events(
        &self,
        receipts: &[Receipt],
    ) -> Result<(Vec<DeliveryEvent>, Vec<Receipt>), StoreError> {
        let mut events = Vec::with_capacity(receipts.len());
        let mut unmatched = Vec::new();
        for r in receipts {
            let sent = self
                .sent_by_vendor_id(&r.vendor, &r.vendor_message_id, r.receiver.as_deref())
                .await?;
            if sent.is_empty() {
                unmatched.push(r.clone());
            }
            for mut e in sent {
                e.state = if r.delivered {
                    State::Delivered
                } else {
                    State::DeliveryFailed
                };
                e.event_id = event_id(&e.message_id, e.state, e.attempt);
                // From the send to the receiver's handset, as the vendor reports it.
                e.latency_ms = u64::try_from((r.at - e.ts).num_milliseconds()).ok();
                e.ts = r.at;
                e.error_code = r.error_code.clone();
                e.error_detail = r.error_detail.clone();
                e.cost_micros = None;
                e.billing_units = None;
                e.redelivered = false;
                events.push(e);
            }
        }
        Ok((events, unmatched))
    }

    /// Marks the receipts of `events` (from [`receipt_events`](Self::receipt_events)) as arrived,
    /// once their events are published, so pollers stop asking for them.
    pub async fn mark_receipts(&self, events: &[DeliveryEvent]) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for e in events {
            sqlx::query(
                "UPDATE vendor_messages SET receipt_at = $1 \
                 WHERE vendor = $2 AND vendor_message_id = $3 AND receiver = $4",
            )
            .bind(now)
            .bind(e.vendor.as_deref())
            .bind(e.vendor_message_id.as_deref())
            .bind(&e.receiver)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

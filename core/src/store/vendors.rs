//! Vendor state shared by every dispatch worker: access tokens, and the vendor id of each sent
//! message, which receipts and recalls are joined to.

use super::{Store, StoreError, now_ms, value_rows};
use crate::domain::MessageId;
use crate::wire::{DeliveryEvent, Receipt, State, event_id};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::any::AnyRow;

/// A sent message awaiting its receipt, as a receipt poller needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReceipt {
    pub vendor_message_id: String,
    pub receiver: String,
    /// Unix milliseconds.
    pub sent_at: i64,
}

/// The use vendor tokens are sealed for.
const TOKEN: &str = "token";

impl Store {
    /// The stored token under `key` and its expiry (unix ms), if any.
    pub async fn vendor_token(&self, key: &str) -> Result<Option<(String, i64)>, StoreError> {
        let row = sqlx::query("SELECT token, expires_at FROM vendor_tokens WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((self.unseal(TOKEN, r.get::<&str, _>(0))?, r.get(1))))
            .transpose()
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
        .bind(self.seal(TOKEN, token))
        .bind(expires_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Forgets the token under `key` if it is still `token` (a vendor said it expired).
    pub async fn drop_vendor_token(&self, key: &str, token: &str) -> Result<(), StoreError> {
        // Sealed tokens differ from their plain text (and from each other): compare opened.
        let row = sqlx::query("SELECT token FROM vendor_tokens WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        let Some(stored) = row.map(|r| r.get::<String, _>(0)) else {
            return Ok(());
        };
        if self.unseal(TOKEN, &stored)? == token {
            sqlx::query("DELETE FROM vendor_tokens WHERE key = $1 AND token = $2")
                .bind(key)
                .bind(&stored)
                .execute(&self.writer)
                .await?;
        }
        Ok(())
    }

    /// Remembers the vendor ids of `sent` events (those with a vendor and a vendor id), with
    /// their app and template, so that receipts and recalls find their message. Writing one
    /// again changes nothing.
    pub async fn record_vendor_messages(&self, sent: &[DeliveryEvent]) -> Result<(), StoreError> {
        let rows: Vec<&DeliveryEvent> = sent
            .iter()
            .filter(|e| e.vendor.is_some() && e.vendor_message_id.is_some())
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await?;
        for chunk in rows.chunks(self.rows_per_statement(9)) {
            let sql = self.bindable(format!(
                "INSERT INTO vendor_messages \
                 (vendor, vendor_message_id, receiver, message_id, account_id, sent_at, event, \
                 app, template_id) VALUES {} ON CONFLICT DO NOTHING",
                value_rows(chunk.len(), 9)
            ));
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(e.vendor.as_deref())
                    .bind(e.vendor_message_id.as_deref())
                    .bind(&e.receiver)
                    .bind(e.message_id.to_string())
                    .bind(e.account_id)
                    .bind(e.ts.timestamp_millis())
                    .bind(serde_json::to_string(e).unwrap_or_default())
                    .bind(&e.app)
                    .bind(e.template_id);
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
        rows.iter().map(stored_event).collect()
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
        let mut tx = self.writer.begin().await?;
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

    /// The `sent` events stored for `message_id` (usually one; two when a crash during the
    /// vendor call sent it twice), oldest first, each with when it was recalled (unix ms;
    /// `None` while not), whichever app sent it: callers check the event's `app`, which rows
    /// written before the recall migration only have there.
    pub async fn sent_events_of_message(
        &self,
        message_id: &MessageId,
    ) -> Result<Vec<(DeliveryEvent, Option<i64>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT event, recalled_at FROM vendor_messages WHERE message_id = $1 \
             ORDER BY sent_at, vendor_message_id",
        )
        .bind(message_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((stored_event(r)?, r.get(1))))
            .collect()
    }

    /// Up to `limit` `sent` events of `app`'s template `template_id` sent in
    /// [`since_ms`, `until_ms`) (unix ms) and not recalled yet, oldest first. Rows written
    /// before the recall migration have no app or template and are not found.
    pub async fn sent_events_of_template(
        &self,
        app: &str,
        template_id: i64,
        since_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT event FROM vendor_messages WHERE app = $1 AND template_id = $2 \
             AND sent_at >= $3 AND sent_at < $4 AND recalled_at IS NULL \
             ORDER BY sent_at, message_id LIMIT $5",
        )
        .bind(app)
        .bind(template_id)
        .bind(since_ms)
        .bind(until_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored_event).collect()
    }

    /// How many messages of `app`'s template `template_id` sent in [`since_ms`, `until_ms`)
    /// are recalled already.
    pub async fn recalled_of_template(
        &self,
        app: &str,
        template_id: i64,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(DISTINCT message_id) FROM vendor_messages WHERE app = $1 \
             AND template_id = $2 AND sent_at >= $3 AND sent_at < $4 AND recalled_at IS NOT NULL",
        )
        .bind(app)
        .bind(template_id)
        .bind(since_ms)
        .bind(until_ms)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Marks every message sent through `account_id` under (`vendor`, `vendor_message_id`)
    /// recalled at `at`, where it is not yet — the vendor recalls the whole vendor message, so
    /// every receiver that shared it — and returns the `recalled` events of the messages it
    /// marked: none when another recall marked them first. Each event is its `sent` event with
    /// state, time and a deterministic id changed, so publishing it twice is harmless.
    pub async fn mark_recalled(
        &self,
        vendor: &str,
        vendor_message_id: &str,
        account_id: i64,
        at: DateTime<Utc>,
    ) -> Result<Vec<DeliveryEvent>, StoreError> {
        let rows = sqlx::query(
            "UPDATE vendor_messages SET recalled_at = $1 WHERE vendor = $2 \
             AND vendor_message_id = $3 AND account_id = $4 AND recalled_at IS NULL \
             RETURNING event",
        )
        .bind(at.timestamp_millis())
        .bind(vendor)
        .bind(vendor_message_id)
        .bind(account_id)
        .fetch_all(&self.writer)
        .await?;
        rows.iter()
            .map(|r| {
                let mut e = stored_event(r)?;
                e.state = State::Recalled;
                e.event_id = event_id(&e.message_id, e.state, e.attempt);
                e.ts = at;
                e.latency_ms = None;
                e.error_code = None;
                e.error_detail = None;
                e.billing_units = None;
                e.cost_micros = None;
                e.currency = None;
                e.redelivered = false;
                Ok(e)
            })
            .collect()
    }
}

/// The `sent` event in a row's first column.
fn stored_event(r: &AnyRow) -> Result<DeliveryEvent, StoreError> {
    serde_json::from_str(r.get::<&str, _>(0))
        .map_err(|e| StoreError::Corrupt(format!("vendor message event: {e}")))
}

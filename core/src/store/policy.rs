//! The state behind pipeline policies: policy documents, receiver lists, the schedule of
//! messages waiting for their time, and the claim that moves a message past the policies.
//!
//! # Claims
//!
//! Before a message is sent, deferred or stopped, dispatch *claims* it: one transaction writes its
//! ledger row (only if it has none, or if it still has the waiting state — `scheduled`,
//! `retrying` — it was read with), and for the messages it claimed
//! to send, counts them against content dedup and frequency caps. Counting happens in the same
//! transaction as the claim, and only for the winner of the claim, so a message redelivered after
//! a crash or seen by two workers during a rebalance is counted once, and two workers racing on
//! one receiver never let `max + 1` through: each counter is one row, raised with
//! `... DO UPDATE SET count = count + 1 WHERE count < max`, which the database serialises.
//!
//! (`send_ledger.state` also holds `scheduled` and the policy states since this module; the
//! comment in `0001_init.sql` predates them.)

use super::audit::{Audit, insert_audit};
use super::ledger::upsert_ledger;
use super::{Backend, LedgerState, Store, StoreError, bindable, now_ms, placeholders, value_rows};
use crate::domain::{Channel, MessageId};
use crate::policy::AppPolicy;
use crate::wire::MessageRecord;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::{HashMap, HashSet};

/// [`Store::waiting`]'s query: an app's schedule entries per kind, read through the index
/// `schedule_by_app` (migration `0013`).
pub(super) const WAITING_QUERY: &str =
    "SELECT kind, COUNT(*), MIN(due_at) FROM schedule WHERE app = $1 GROUP BY kind";

/// A list of receivers kept per app and channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListName {
    /// Never sent to (`blocked`).
    Block,
    /// When a channel has an allowlist, only its receivers are sent to; others are `blocked`.
    Allow,
    /// Opted out of marketing messages (`blocked` for marketing only).
    Unsubscribed,
}

impl ListName {
    /// The wire name: `block`, `allow`, `unsubscribed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ListName::Block => "block",
            ListName::Allow => "allow",
            ListName::Unsubscribed => "unsubscribed",
        }
    }

    /// The list named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [ListName::Block, ListName::Allow, ListName::Unsubscribed]
            .into_iter()
            .find(|l| l.as_str() == s)
    }
}

/// Why a message waits in the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// A future `send_at`.
    Scheduled,
    /// Quiet hours.
    Deferred,
    /// A retry after a vendor's long `Retry-After`, or a redrive.
    Retry,
    /// Held by a vendor account's rate limit until its estimated turn.
    RateLimited,
    /// Its vendor call outlived its batch and finishes in the worker's background; the entry
    /// releases it again only if that worker dies first (see [`Store::guard_in_flight`]).
    InFlight,
}

impl ScheduleKind {
    /// Every kind.
    pub const ALL: [ScheduleKind; 5] = [
        ScheduleKind::Scheduled,
        ScheduleKind::Deferred,
        ScheduleKind::Retry,
        ScheduleKind::RateLimited,
        ScheduleKind::InFlight,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Scheduled => "scheduled",
            ScheduleKind::Deferred => "deferred",
            ScheduleKind::Retry => "retry",
            ScheduleKind::RateLimited => "rate_limited",
            ScheduleKind::InFlight => "in_flight",
        }
    }
}

/// A message in the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledMessage {
    pub message_id: MessageId,
    pub app: String,
    pub due_at: DateTime<Utc>,
    pub kind: ScheduleKind,
    /// The message record (JSON) to publish when due.
    pub record: String,
    /// Until when (unix ms) a scheduler holds the entry; 0 when none does.
    pub lease: i64,
}

impl ScheduledMessage {
    /// A new entry for `record`, due at `due_at`, that no scheduler holds yet.
    pub fn of(record: &MessageRecord, kind: ScheduleKind, due_at: DateTime<Utc>) -> Self {
        ScheduledMessage {
            message_id: record.message_id,
            app: record.app.clone(),
            due_at,
            kind,
            record: serde_json::to_string(record).unwrap_or_default(),
            lease: 0,
        }
    }
}

/// A stateful limit a message must pass to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// No other message with this content key (a hash) may pass until `expires_at` (unix ms).
    Content { key: i64, expires_at: i64 },
    /// At most `max` messages per `scope` in the window starting at `window_start` (unix ms).
    Frequency {
        /// A hash naming the cap and the receiver.
        scope: i64,
        window_start: i64,
        max: u32,
        expires_at: i64,
    },
}

impl Limit {
    fn sort_key(&self) -> (i64, i64) {
        match self {
            Limit::Content { key, .. } => (*key, 0),
            Limit::Frequency {
                scope,
                window_start,
                ..
            } => (*scope, *window_start),
        }
    }
}

/// What dispatch wants to do with one message: the ledger state to claim it with.
#[derive(Debug, Clone)]
pub struct MessageClaim {
    pub message_id: MessageId,
    /// The waiting state the ledger row has (`Scheduled` or `Retrying`); `None` when the message
    /// has no row yet.
    pub from: Option<LedgerState>,
    /// `Sending`, `Scheduled` (with `schedule`), or a final policy state.
    pub state: LedgerState,
    pub attempt: u32,
    /// The schedule entry, when `state` is `Scheduled`.
    pub schedule: Option<ScheduledMessage>,
    /// Limits to pass when `state` is `Sending`, in order.
    pub limits: Vec<Limit>,
}

/// Which failed messages `POST /v1/messages/redrive` sends again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// These messages.
    Messages(Vec<MessageId>),
    /// A template's messages that failed in `[since, until)` (unix ms).
    Template {
        template_id: i64,
        since: i64,
        until: i64,
    },
}

/// The result of one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Claimed, with the state written: the claimed state, or `DedupContent` /
    /// `DedupFrequency` when a limit stopped it.
    Claimed(LedgerState),
    /// Another worker (or an earlier delivery) got there first; leave the message alone.
    Lost,
}

impl Store {
    /// The policy document of app `app_id` and its version (0 when the app has none).
    pub async fn app_policy(&self, app_id: i64) -> Result<(AppPolicy, i64), StoreError> {
        let row = sqlx::query("SELECT policy, version FROM app_policies WHERE app_id = $1")
            .bind(app_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok((parse_policy(r.get(0))?, r.get(1))),
            None => Ok((AppPolicy::default(), 0)),
        }
    }

    /// The policy document of the app named `app`, and which of its channels have an allowlist.
    pub async fn app_policy_by_name(
        &self,
        app: &str,
    ) -> Result<(AppPolicy, HashSet<Channel>), StoreError> {
        let row = sqlx::query(
            "SELECT p.policy FROM app_policies p JOIN apps a ON a.id = p.app_id WHERE a.name = $1",
        )
        .bind(app)
        .fetch_optional(&self.pool)
        .await?;
        let policy = match row {
            Some(r) => parse_policy(r.get(0))?,
            None => AppPolicy::default(),
        };
        let rows = sqlx::query(
            "SELECT DISTINCT l.channel FROM receiver_lists l JOIN apps a ON a.id = l.app_id \
             WHERE a.name = $1 AND l.list = 'allow'",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let mut allowlisted = HashSet::new();
        for r in rows {
            allowlisted.insert(r.get::<&str, _>(0).parse().map_err(StoreError::Corrupt)?);
        }
        Ok((policy, allowlisted))
    }

    /// Replaces app `app_id`'s policy document, with the audit entry `audit` makes of its new
    /// version; returns that version.
    pub async fn put_app_policy(
        &self,
        app_id: i64,
        policy: &AppPolicy,
        audit: impl FnOnce(i64) -> Audit,
    ) -> Result<i64, StoreError> {
        let json = serde_json::to_string(policy).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut tx = self.writer.begin().await?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO app_policies (app_id, policy, version, updated_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (app_id) DO UPDATE SET policy = excluded.policy, \
             version = app_policies.version + 1, updated_at = excluded.updated_at \
             RETURNING version",
        )
        .bind(app_id)
        .bind(json)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        insert_audit(&mut tx, app_id, &audit(version)).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Adds `receivers` to a list, with the audit entry `audit` makes of how many were not on it
    /// yet; returns that number.
    pub async fn add_to_list(
        &self,
        app_id: i64,
        channel: Channel,
        list: ListName,
        receivers: &[String],
        audit: impl FnOnce(u64) -> Audit,
    ) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let added = self
            .insert_into_list(&mut tx, app_id, channel, list, receivers)
            .await?;
        insert_audit(&mut tx, app_id, &audit(added)).await?;
        tx.commit().await?;
        Ok(added)
    }

    /// Adds a receiver to the `unsubscribed` list of `channel` at its own request (a signed
    /// link): a change by the receiver, not by the app, so it makes no audit entry.
    pub async fn unsubscribe(
        &self,
        app_id: i64,
        channel: Channel,
        receiver: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer.acquire().await?;
        let receivers = [receiver.to_string()];
        self.insert_into_list(
            &mut conn,
            app_id,
            channel,
            ListName::Unsubscribed,
            &receivers,
        )
        .await?;
        Ok(())
    }

    /// Adds `receivers` to a list on `conn`; returns how many were not on it yet.
    async fn insert_into_list(
        &self,
        conn: &mut sqlx::AnyConnection,
        app_id: i64,
        channel: Channel,
        list: ListName,
        receivers: &[String],
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut added = 0;
        for chunk in receivers.chunks(self.rows_per_statement(5)) {
            let sql = self.bindable(format!(
                "INSERT INTO receiver_lists (app_id, channel, list, receiver, created_at) \
                 VALUES {} ON CONFLICT DO NOTHING",
                value_rows(chunk.len(), 5)
            ));
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(app_id)
                    .bind(channel.as_str())
                    .bind(list.as_str())
                    .bind(r)
                    .bind(now);
            }
            added += q.execute(&mut *conn).await?.rows_affected();
        }
        Ok(added)
    }

    /// Removes `receivers` from a list, with the audit entry `audit` makes of how many were on
    /// it; returns that number.
    pub async fn remove_from_list(
        &self,
        app_id: i64,
        channel: Channel,
        list: ListName,
        receivers: &[String],
        audit: impl FnOnce(u64) -> Audit,
    ) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let mut removed = 0;
        for chunk in receivers.chunks(self.rows_per_statement(1)) {
            let sql = self.bindable(format!(
                "DELETE FROM receiver_lists WHERE app_id = $1 AND channel = $2 AND list = $3 \
                 AND receiver IN ({})",
                placeholders(4, chunk.len())
            ));
            let mut q = sqlx::query(&sql)
                .bind(app_id)
                .bind(channel.as_str())
                .bind(list.as_str());
            for r in chunk {
                q = q.bind(r);
            }
            removed += q.execute(&mut *tx).await?.rows_affected();
        }
        insert_audit(&mut tx, app_id, &audit(removed)).await?;
        tx.commit().await?;
        Ok(removed)
    }

    /// One page of a list, in receiver order, after `after`.
    pub async fn list_page(
        &self,
        app_id: i64,
        channel: Channel,
        list: ListName,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT receiver FROM receiver_lists WHERE app_id = $1 AND channel = $2 AND list = $3 \
             AND receiver > $4 ORDER BY receiver LIMIT $5",
        )
        .bind(app_id)
        .bind(channel.as_str())
        .bind(list.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The lists each of `receivers` is on for the app named `app`: (channel, list, receiver).
    pub async fn list_memberships(
        &self,
        app: &str,
        receivers: &[&str],
    ) -> Result<HashSet<(Channel, ListName, String)>, StoreError> {
        let mut out = HashSet::new();
        for chunk in receivers.chunks(self.rows_per_statement(1)) {
            let sql = self.bindable(format!(
                "SELECT l.channel, l.list, l.receiver FROM receiver_lists l \
                 JOIN apps a ON a.id = l.app_id WHERE a.name = $1 AND l.receiver IN ({})",
                placeholders(2, chunk.len())
            ));
            let mut q = sqlx::query(&sql).bind(app);
            for r in chunk {
                q = q.bind(*r);
            }
            for row in q.fetch_all(&self.pool).await? {
                out.insert(list_entry(&row)?);
            }
        }
        Ok(out)
    }

    /// Claims messages past the policies in one transaction (see the module docs); one outcome
    /// per claim, in order.
    pub async fn claim_messages(
        &self,
        claims: &[MessageClaim],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let mut outcome = vec![ClaimOutcome::Lost; claims.len()];
        if claims.is_empty() {
            return Ok(outcome);
        }
        let now = now_ms();
        let mut tx = self.writer.begin().await?;

        // Claim the ledger rows: insert where there is none, move on from `scheduled`.
        let mut won: HashSet<MessageId> = HashSet::new();
        let fresh: Vec<&MessageClaim> = claims.iter().filter(|c| c.from.is_none()).collect();
        for chunk in fresh.chunks(self.rows_per_statement(4)) {
            let sql = self.bindable(format!(
                "INSERT INTO send_ledger (message_id, state, attempt, updated_at) VALUES {} \
                 ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
                value_rows(chunk.len(), 4)
            ));
            let mut q = sqlx::query(&sql);
            for c in chunk {
                q = q
                    .bind(c.message_id.to_string())
                    .bind(c.state.as_str())
                    .bind(i64::from(c.attempt))
                    .bind(now);
            }
            for row in q.fetch_all(&mut *tx).await? {
                won.insert(parse_id(row.get(0))?);
            }
        }
        let mut moving: HashMap<(LedgerState, LedgerState), Vec<&MessageClaim>> = HashMap::new();
        for c in claims.iter() {
            let Some(from) = c.from else { continue };
            if c.state == from {
                // Still waiting (a redelivered record, or deferred again): nothing to move.
                won.insert(c.message_id);
            } else {
                moving.entry((from, c.state)).or_default().push(c);
            }
        }
        for ((from, state), group) in moving {
            for chunk in group.chunks(self.rows_per_statement(1)) {
                let sql = self.bindable(format!(
                    "UPDATE send_ledger SET state = $1, updated_at = $2 \
                     WHERE state = $3 AND message_id IN ({}) RETURNING message_id",
                    placeholders(4, chunk.len())
                ));
                let mut q = sqlx::query(&sql)
                    .bind(state.as_str())
                    .bind(now)
                    .bind(from.as_str());
                for c in chunk {
                    q = q.bind(c.message_id.to_string());
                }
                for row in q.fetch_all(&mut *tx).await? {
                    won.insert(parse_id(row.get(0))?);
                }
            }
        }

        // A message twice in one batch (released by the scheduler as its first record is
        // redelivered) is claimed once, by its first claim.
        let winners: Vec<bool> = claims.iter().map(|c| won.remove(&c.message_id)).collect();

        // Schedule what waits.
        let waiting: Vec<&ScheduledMessage> = claims
            .iter()
            .zip(&winners)
            .filter(|(_, won)| **won)
            .filter_map(|(c, _)| c.schedule.as_ref())
            .collect();
        for chunk in waiting.chunks(self.rows_per_statement(5)) {
            insert_schedule(self.backend, &mut tx, chunk).await?;
        }

        let (passed, stopped) = count_limits(
            self.backend,
            &mut tx,
            claims,
            &winners,
            now,
            self.rows_per_statement(5),
        )
        .await?;
        for (i, state) in stopped.iter().enumerate() {
            let Some(state) = state else { continue };
            // Give back what the stopped message took from its other limits.
            for limit in &passed[i] {
                match limit {
                    Limit::Content { key, .. } => {
                        sqlx::query("DELETE FROM content_dedup WHERE key = $1 AND owner = $2")
                            .bind(*key)
                            .bind(dedup_owner(&claims[i].message_id))
                            .execute(&mut *tx)
                            .await?;
                    }
                    Limit::Frequency {
                        scope,
                        window_start,
                        ..
                    } => {
                        sqlx::query(
                            "UPDATE frequency_counts SET count = count - 1 \
                             WHERE scope = $1 AND window_start = $2",
                        )
                        .bind(scope)
                        .bind(window_start)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            sqlx::query("UPDATE send_ledger SET state = $1 WHERE message_id = $2")
                .bind(state.as_str())
                .bind(claims[i].message_id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        for (i, c) in claims.iter().enumerate() {
            if winners[i] {
                outcome[i] = ClaimOutcome::Claimed(stopped[i].unwrap_or(c.state));
            }
        }
        Ok(outcome)
    }

    /// Claims up to `limit` schedule entries due by `due_by` that no live lease holds, leasing
    /// them until `lease_until` (unix ms); the caller publishes them, then calls
    /// [`Store::release_scheduled`].
    pub async fn claim_due(
        &self,
        due_by: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ScheduledMessage>, StoreError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE schedule SET claimed_until = $1 WHERE claimed_until < $2 AND message_id IN \
             (SELECT message_id FROM schedule WHERE due_at <= $3 AND claimed_until < $2 \
              ORDER BY due_at LIMIT $4) \
             RETURNING message_id, app, due_at, kind, record, claimed_until",
        )
        .bind(lease_until.timestamp_millis())
        .bind(now)
        .bind(due_by.timestamp_millis())
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(scheduled_of).collect()
    }

    /// Removes published schedule entries that still hold the lease they were released under
    /// (an entry scheduled again meanwhile stays).
    pub async fn release_scheduled(&self, released: &[ScheduledMessage]) -> Result<(), StoreError> {
        let mut by_lease: HashMap<i64, Vec<&MessageId>> = HashMap::new();
        for e in released {
            by_lease.entry(e.lease).or_default().push(&e.message_id);
        }
        for (lease, ids) in by_lease {
            for chunk in ids.chunks(self.rows_per_statement(1)) {
                let sql = self.bindable(format!(
                    "DELETE FROM schedule WHERE claimed_until = $1 AND message_id IN ({})",
                    placeholders(2, chunk.len())
                ));
                let mut q = sqlx::query(&sql).bind(lease);
                for id in chunk {
                    q = q.bind(id.to_string());
                }
                q.execute(&self.writer).await?;
            }
        }
        Ok(())
    }

    /// Cancels a message of the app named `app` that waits in the schedule: its ledger row
    /// becomes `cancelled` and its entry goes, in one transaction. Returns the entry;
    /// `NotFound` when the app has no such waiting message (never scheduled, already released,
    /// or another app's).
    pub async fn cancel_scheduled(
        &self,
        app: &str,
        id: MessageId,
    ) -> Result<ScheduledMessage, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "DELETE FROM schedule WHERE message_id = $1 AND app = $2 \
             RETURNING message_id, app, due_at, kind, record, claimed_until",
        )
        .bind(id.to_string())
        .bind(app)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let moved = sqlx::query(
            "UPDATE send_ledger SET state = 'cancelled', updated_at = $1 \
             WHERE message_id = $2 AND state = 'scheduled'",
        )
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            // Released and already past the policies: too late to cancel.
            return Err(StoreError::Conflict(
                "the message is no longer waiting".into(),
            ));
        }
        let entry = scheduled_of(&row)?;
        tx.commit().await?;
        Ok(entry)
    }

    /// The app named `app`'s messages in the schedule: per kind, how many and the earliest due
    /// time (unix ms).
    pub async fn waiting(&self, app: &str) -> Result<Vec<(ScheduleKind, i64, i64)>, StoreError> {
        let rows = sqlx::query(WAITING_QUERY)
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let kind = ScheduleKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == r.get::<&str, _>(0))
                    .ok_or_else(|| StoreError::Corrupt("schedule kind".into()))?;
                Ok((kind, r.get(1), r.get(2)))
            })
            .collect()
    }

    /// Puts messages whose vendor asked for a long wait in the schedule: each ledger row
    /// becomes `retrying` with its next attempt, and its entry is written, in one transaction.
    pub async fn defer_retries(
        &self,
        retries: &[(ScheduledMessage, u32)],
    ) -> Result<(), StoreError> {
        if retries.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let rows: Vec<(MessageId, LedgerState, u32)> = retries
            .iter()
            .map(|(entry, attempt)| (entry.message_id, LedgerState::Retrying, *attempt))
            .collect();
        upsert_ledger(
            self.backend,
            &mut tx,
            &rows,
            &HashMap::new(),
            now,
            self.rows_per_statement(5),
        )
        .await?;
        let entries: Vec<&ScheduledMessage> = retries.iter().map(|(e, _)| e).collect();
        for chunk in entries.chunks(self.rows_per_statement(5)) {
            insert_schedule(self.backend, &mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Guards messages whose vendor call outlived their batch: the worker commits the batch and
    /// finishes the call in the background. Each message gets an `in_flight` entry (its ledger
    /// row stays `sending`) due at `entries`' `due_at`; the worker moves it on while the call
    /// lasts ([`Store::renew_in_flight`]) and removes it once the outcome is recorded
    /// ([`Store::end_in_flight`]). If the worker dies first, the scheduler releases the message
    /// and it is sent again, like any message whose worker crashed during its vendor call.
    pub async fn guard_in_flight(&self, entries: &[ScheduledMessage]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await?;
        let entries: Vec<&ScheduledMessage> = entries.iter().collect();
        for chunk in entries.chunks(self.rows_per_statement(5)) {
            insert_schedule(self.backend, &mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Moves the `in_flight` entries of `ids` to `due_at`: their calls are still running.
    pub async fn renew_in_flight(
        &self,
        ids: &[MessageId],
        due_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        for chunk in ids.chunks(self.rows_per_statement(1)) {
            let sql = self.bindable(format!(
                "UPDATE schedule SET due_at = $1 WHERE kind = 'in_flight' AND message_id IN ({})",
                placeholders(2, chunk.len())
            ));
            let mut q = sqlx::query(&sql).bind(due_at.timestamp_millis());
            for id in chunk {
                q = q.bind(id.to_string());
            }
            q.execute(&self.writer).await?;
        }
        Ok(())
    }

    /// Those of `ids` whose `in_flight` guard is live: not due yet, so the worker that handed
    /// off their call is finishing it (or, if it died, the scheduler will release them).
    pub async fn guarded_in_flight(
        &self,
        ids: &[MessageId],
    ) -> Result<HashSet<MessageId>, StoreError> {
        let mut guarded = HashSet::new();
        let now = now_ms();
        for chunk in ids.chunks(self.rows_per_statement(1)) {
            let sql = self.bindable(format!(
                "SELECT message_id FROM schedule WHERE kind = 'in_flight' AND due_at > $1 \
                 AND message_id IN ({})",
                placeholders(2, chunk.len())
            ));
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(now);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for id in q.fetch_all(&self.pool).await? {
                guarded.insert(parse_id(&id)?);
            }
        }
        Ok(guarded)
    }

    /// Removes the `in_flight` entries of `ids` once their outcomes are recorded; an entry that
    /// became a retry meanwhile stays.
    pub async fn end_in_flight(&self, ids: &[MessageId]) -> Result<(), StoreError> {
        for chunk in ids.chunks(self.rows_per_statement(1)) {
            let sql = self.bindable(format!(
                "DELETE FROM schedule WHERE kind = 'in_flight' AND message_id IN ({})",
                placeholders(1, chunk.len())
            ));
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            q.execute(&self.writer).await?;
        }
        Ok(())
    }

    /// Sends failed messages of the app named `app` again: those of `ids`, or of template
    /// `template` that failed between `since` and `until` (unix ms), at most `limit`. Each
    /// one's ledger row moves from `send_failed` to `retrying` (so a message is redriven once,
    /// however many calls race) and it goes in the schedule, due now. Returns the ids redriven.
    pub async fn redrive(
        &self,
        app: &str,
        selection: &Redrive,
        limit: i64,
    ) -> Result<Vec<MessageId>, StoreError> {
        let rows = match selection {
            Redrive::Messages(ids) => {
                let sql = self.bindable(format!(
                    "SELECT message_id, record FROM failed_messages WHERE app = $1 \
                     AND message_id IN ({}) LIMIT ${}",
                    placeholders(2, ids.len()),
                    ids.len() + 2
                ));
                let mut q = sqlx::query(&sql).bind(app);
                for id in ids {
                    q = q.bind(id.to_string());
                }
                q.bind(limit).fetch_all(&self.pool).await?
            }
            Redrive::Template {
                template_id,
                since,
                until,
            } => {
                sqlx::query(
                    "SELECT message_id, record FROM failed_messages WHERE app = $1 \
                     AND template_id = $2 AND failed_at >= $3 AND failed_at < $4 \
                     ORDER BY failed_at LIMIT $5",
                )
                .bind(app)
                .bind(template_id)
                .bind(since)
                .bind(until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let now = chrono::Utc::now();
        let mut redriven = Vec::new();
        let mut tx = self.writer.begin().await?;
        for row in rows {
            let id = parse_id(row.get(0))?;
            let moved = sqlx::query(
                "UPDATE send_ledger SET state = 'retrying', attempt = attempt + 1, \
                 updated_at = $1 WHERE message_id = $2 AND state = 'send_failed'",
            )
            .bind(now.timestamp_millis())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM failed_messages WHERE message_id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            if moved == 1 {
                let entry = ScheduledMessage {
                    message_id: id,
                    app: app.to_string(),
                    due_at: now,
                    kind: ScheduleKind::Retry,
                    record: row.get(1),
                    lease: 0,
                };
                insert_schedule(self.backend, &mut tx, &[&entry]).await?;
                redriven.push(id);
            }
        }
        tx.commit().await?;
        Ok(redriven)
    }

    /// Deletes dedup and frequency rows whose window is over; returns how many.
    pub async fn prune_limits(&self) -> Result<u64, StoreError> {
        let now = now_ms();
        let a = sqlx::query("DELETE FROM content_dedup WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.writer)
            .await?
            .rows_affected();
        let b = sqlx::query("DELETE FROM frequency_counts WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(a + b)
    }
}

/// Writes schedule entries (distinct messages). An entry that exists gets the new time and
/// loses its lease, so that a scheduler releasing it right now does not delete it afterwards.
async fn insert_schedule(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entries: &[&ScheduledMessage],
) -> Result<(), StoreError> {
    let sql = bindable(
        backend,
        format!(
            "INSERT INTO schedule (message_id, app, due_at, kind, record) VALUES {} \
         ON CONFLICT (message_id) DO UPDATE SET due_at = excluded.due_at, \
         kind = excluded.kind, record = excluded.record, claimed_until = 0",
            value_rows(entries.len(), 5)
        ),
    );
    let mut q = sqlx::query(&sql);
    for s in entries {
        q = q
            .bind(s.message_id.to_string())
            .bind(&s.app)
            .bind(s.due_at.timestamp_millis())
            .bind(s.kind.as_str())
            .bind(&s.record);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// A receiver-list row selected as `channel, list, receiver`.
fn list_entry(row: &AnyRow) -> Result<(Channel, ListName, String), StoreError> {
    let channel = row.get::<&str, _>(0).parse().map_err(StoreError::Corrupt)?;
    let list = ListName::parse(row.get(1))
        .ok_or_else(|| StoreError::Corrupt("receiver list name".into()))?;
    Ok((channel, list, row.get(2)))
}

/// A schedule row selected as `message_id, app, due_at, kind, record, claimed_until`.
fn scheduled_of(r: &AnyRow) -> Result<ScheduledMessage, StoreError> {
    Ok(ScheduledMessage {
        message_id: parse_id(r.get(0))?,
        app: r.get(1),
        due_at: DateTime::from_timestamp_millis(r.get(2)).unwrap_or_default(),
        kind: ScheduleKind::ALL
            .into_iter()
            .find(|k| k.as_str() == r.get::<&str, _>(3))
            .ok_or_else(|| StoreError::Corrupt("schedule kind".into()))?,
        record: r.get(4),
        lease: r.get(5),
    })
}

/// Counts the claimed sends against their limits, in as few statements as the batch allows: the
/// k-th op on one key (in message order) goes in round k, and each round is one multi-row upsert
/// per table — its keys are distinct, as PostgreSQL's upsert requires, and sorted, so concurrent
/// transactions lock rows in one order. Content keys go before caps within a round, and a
/// message stopped by one limit is not counted against the next. Returns per claim the limits it
/// passed and the state it was stopped with.
async fn count_limits<'c>(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    claims: &'c [MessageClaim],
    winners: &[bool],
    now: i64,
    rows: usize,
) -> Result<(Vec<Vec<&'c Limit>>, Vec<Option<LedgerState>>), StoreError> {
    let mut rounds: Vec<Vec<(usize, &Limit)>> = Vec::new();
    let mut seen: HashMap<(i64, i64), usize> = HashMap::new();
    for (i, c) in claims.iter().enumerate() {
        if c.state != LedgerState::Sending || !winners[i] {
            continue;
        }
        for limit in &c.limits {
            let k = seen.entry(limit.sort_key()).or_default();
            if rounds.len() <= *k {
                rounds.push(Vec::new());
            }
            rounds[*k].push((i, limit));
            *k += 1;
        }
    }
    let mut passed: Vec<Vec<&Limit>> = vec![Vec::new(); claims.len()];
    let mut stopped: Vec<Option<LedgerState>> = vec![None; claims.len()];
    for mut round in rounds {
        round.sort_by_key(|(_, limit)| limit.sort_key());
        for content in [true, false] {
            let ops: Vec<(usize, &Limit)> = round
                .iter()
                .filter(|(i, l)| {
                    stopped[*i].is_none() && matches!(l, Limit::Content { .. }) == content
                })
                .copied()
                .collect();
            for chunk in ops.chunks(rows) {
                let ok = if content {
                    upsert_content(backend, tx, claims, chunk, now).await?
                } else {
                    upsert_frequency(backend, tx, chunk).await?
                };
                for &(i, limit) in chunk {
                    if ok.contains(&limit.sort_key()) {
                        passed[i].push(limit);
                    } else {
                        stopped[i] = Some(if content {
                            LedgerState::DedupContent
                        } else {
                            LedgerState::DedupFrequency
                        });
                    }
                }
            }
        }
    }
    Ok((passed, stopped))
}

/// Takes the content keys of `ops` (distinct) that are free or expired; returns those taken.
async fn upsert_content(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    claims: &[MessageClaim],
    ops: &[(usize, &Limit)],
    now: i64,
) -> Result<HashSet<(i64, i64)>, StoreError> {
    let sql = bindable(
        backend,
        format!(
            "INSERT INTO content_dedup (key, owner, expires_at) VALUES {} \
         ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, \
         expires_at = excluded.expires_at WHERE content_dedup.expires_at <= ${} RETURNING key",
            value_rows(ops.len(), 3),
            ops.len() * 3 + 1
        ),
    );
    let mut q = sqlx::query(&sql);
    for &(i, limit) in ops {
        if let Limit::Content { key, expires_at } = limit {
            q = q
                .bind(*key)
                .bind(dedup_owner(&claims[i].message_id))
                .bind(*expires_at);
        }
    }
    let rows = q.bind(now).fetch_all(&mut **tx).await?;
    Ok(rows.iter().map(|r| (r.get::<i64, _>(0), 0)).collect())
}

/// Counts one message against each cap of `ops` (distinct scopes) that is under its maximum;
/// returns the (scope, window) of those counted.
async fn upsert_frequency(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ops: &[(usize, &Limit)],
) -> Result<HashSet<(i64, i64)>, StoreError> {
    let sql = bindable(
        backend,
        format!(
            "INSERT INTO frequency_counts (scope, window_start, count, cap, expires_at) VALUES {} \
         ON CONFLICT (scope, window_start) DO UPDATE SET count = frequency_counts.count + 1, \
         cap = excluded.cap WHERE frequency_counts.count < excluded.cap \
         RETURNING scope, window_start",
            value_rows(ops.len(), 5)
        ),
    );
    let mut q = sqlx::query(&sql);
    for &(_, limit) in ops {
        if let Limit::Frequency {
            scope,
            window_start,
            max,
            expires_at,
        } = limit
        {
            q = q
                .bind(*scope)
                .bind(*window_start)
                .bind(1i64)
                .bind(i64::from(*max))
                .bind(*expires_at);
        }
    }
    let rows = q.fetch_all(&mut **tx).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
        .collect())
}

/// The owner a content-dedup key records: the low 64 bits of the message id (random bits of a
/// time-ordered id; it only tells the message that took a key from any other taking it).
fn dedup_owner(id: &MessageId) -> i64 {
    id.0.as_u64_pair().1 as i64
}

fn parse_policy(json: &str) -> Result<AppPolicy, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("policy document: {e}")))
}

fn parse_id(s: &str) -> Result<MessageId, StoreError> {
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("message id: {e}")))
}

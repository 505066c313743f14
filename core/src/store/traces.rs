//! Reading `message_states` (written with the event index, see `events`): an app's messages to
//! one receiver, and the states of a template's messages in a time range.

use super::{Store, StoreError};
use crate::domain::{Channel, MessageId};
use crate::wire::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

/// A message with its current state, as the tracing endpoints list it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageSummary {
    pub message_id: MessageId,
    pub template_id: i64,
    pub channel: Channel,
    pub receiver: String,
    pub biz_id: Option<String>,
    /// The state of its latest event.
    pub state: State,
    /// When it was accepted (its earliest event).
    pub accepted_at: DateTime<Utc>,
    /// When it reached `state`.
    pub updated_at: DateTime<Utc>,
}

/// A template's messages accepted in a time range, counted by state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateStates {
    /// How many messages.
    pub messages: i64,
    /// How many are in each state now (each message once); states with none are left out.
    pub current: Vec<(State, i64)>,
    /// How many reached each state at some time (a sent message counts under `accepted`,
    /// `sending` and `sent`); states none reached are left out.
    pub reached: Vec<(State, i64)>,
}

/// The state of its wire name.
fn state(name: &str) -> Result<State, StoreError> {
    State::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown state `{name}`")))
}

/// A time of unix microseconds.
fn time(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| StoreError::Corrupt(format!("time {us}")))
}

fn summary(r: &AnyRow) -> Result<MessageSummary, StoreError> {
    Ok(MessageSummary {
        message_id: r
            .get::<&str, _>(0)
            .parse()
            .map_err(|e: uuid::Error| StoreError::Corrupt(e.to_string()))?,
        template_id: r.get(1),
        channel: r.get::<&str, _>(2).parse().map_err(StoreError::Corrupt)?,
        receiver: r.get(3),
        biz_id: r.get(4),
        state: state(r.get(5))?,
        accepted_at: time(r.get(6))?,
        updated_at: time(r.get(7))?,
    })
}

/// `(state, count)` rows as pairs in pipeline order.
fn counts(rows: &[AnyRow]) -> Result<Vec<(State, i64)>, StoreError> {
    let mut out = rows
        .iter()
        .map(|r| Ok((state(r.get(0))?, r.get::<i64, _>(1))))
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_by_key(|(s, _)| State::ALL.iter().position(|x| x == s));
    Ok(out)
}

impl Store {
    /// `app`'s messages to `receiver` accepted in `[from, to)`, newest first, at most `limit`;
    /// `before` is the (`accepted_at`, `message_id`) of the last message of the previous page.
    pub async fn receiver_messages(
        &self,
        app: &str,
        receiver: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        before: Option<(DateTime<Utc>, MessageId)>,
        limit: i64,
    ) -> Result<Vec<MessageSummary>, StoreError> {
        let (before_at, before_id) = match before {
            Some((at, id)) => (at.timestamp_micros(), id.to_string()),
            // No message is accepted at the end of time, so the id never counts.
            None => (i64::MAX, String::new()),
        };
        let rows = sqlx::query(
            "SELECT message_id, template_id, channel, receiver, biz_id, state, accepted_at, \
             state_at FROM message_states \
             WHERE app = $1 AND receiver = $2 AND accepted_at >= $3 AND accepted_at < $4 \
               AND (accepted_at, message_id) < ($5, $6) \
             ORDER BY accepted_at DESC, message_id DESC LIMIT $7",
        )
        .bind(app)
        .bind(receiver)
        .bind(from.timestamp_micros())
        .bind(to.timestamp_micros())
        .bind(before_at)
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(summary).collect()
    }

    /// The states of `app`'s messages of template `template_id` accepted in `[from, to)`.
    pub async fn template_states(
        &self,
        app: &str,
        template_id: i64,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<TemplateStates, StoreError> {
        let current = sqlx::query(
            "SELECT state, count(*) FROM message_states \
             WHERE app = $1 AND template_id = $2 AND accepted_at >= $3 AND accepted_at < $4 \
             GROUP BY state",
        )
        .bind(app)
        .bind(template_id)
        .bind(from.timestamp_micros())
        .bind(to.timestamp_micros())
        .fetch_all(&self.pool)
        .await?;
        let reached = sqlx::query(
            "SELECT e.state, count(DISTINCT e.message_id) FROM message_states m \
             JOIN message_events e ON e.message_id = m.message_id \
             WHERE m.app = $1 AND m.template_id = $2 AND m.accepted_at >= $3 \
               AND m.accepted_at < $4 \
             GROUP BY e.state",
        )
        .bind(app)
        .bind(template_id)
        .bind(from.timestamp_micros())
        .bind(to.timestamp_micros())
        .fetch_all(&self.pool)
        .await?;
        let current = counts(&current)?;
        Ok(TemplateStates {
            messages: current.iter().map(|(_, n)| n).sum(),
            current,
            reached: counts(&reached)?,
        })
    }
}

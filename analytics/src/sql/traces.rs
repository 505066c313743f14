//! The tracing endpoints' answers read from the warehouse, for messages the store's index no
//! longer holds (`analytics.index_retention`): one message's events, an app's messages to one
//! receiver, and the states of a template's messages.
//!
//! Each reads `delivery_events` as the app's view of it (other apps' rows do not exist for the
//! statement), with the caller's values bound as parameters, never spliced into the SQL. A
//! message belongs to the time of its `accepted` event, as in the index; its later events are
//! looked for up to [`TRACE_DAYS`] after that.

use super::{Rows, collect};
use crate::error::AnalyticsError;
use crate::schema::{TABLE, batch_to_events};
use crate::warehouse::Warehouse;
use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use datafusion::arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::scalar::ScalarValue;
use herald_core::store::{MessageSummary, TemplateStates};
use herald_core::{DeliveryEvent, MessageId, State};
use std::collections::HashMap;

/// Days after a message's acceptance that its events are looked for in: longer than any
/// message type's age limit plus a late receipt.
pub const TRACE_DAYS: u64 = 14;

/// The events of message `id` of `app` in the warehouse, in no particular order: the trace of
/// a message the store's index no longer holds. A time-ordered (version 7) id limits the read
/// to the partitions from its day to [`TRACE_DAYS`] later; other ids read every partition.
pub async fn message_events(
    warehouse: &Warehouse,
    app: &str,
    id: &MessageId,
) -> Result<Vec<DeliveryEvent>, AnalyticsError> {
    let mut sql = format!("SELECT * FROM {TABLE} WHERE message_id = $1");
    let mut params = vec![text(&id.to_string())];
    if let Some(day) = id.made_at().map(|t| t.date_naive()) {
        sql.push_str(" AND dt >= $2 AND dt <= $3");
        params.extend([text(&dt(day)), text(&dt(day + Days::new(TRACE_DAYS)))]);
    }
    let mut events = Vec::new();
    for batch in &run(warehouse, app, &sql, params).await? {
        events.extend(batch_to_events(batch)?);
    }
    Ok(events)
}

/// `app`'s messages to `receiver` accepted in `[from, to)`, newest first, at most `limit`,
/// after `before` (the `accepted_at` and id of the previous page's last message): what
/// `Store::receiver_messages` answers, from the warehouse. `receiver` is given as herald
/// records it; it is matched in the warehouse's form (`analytics.receivers`), so with masked
/// receivers the answer holds every receiver sharing that mask, and each message's `receiver`
/// is the warehouse's form.
pub async fn receiver_messages(
    warehouse: &Warehouse,
    app: &str,
    receiver: &str,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    before: Option<(DateTime<Utc>, MessageId)>,
    limit: usize,
) -> Result<Vec<MessageSummary>, AnalyticsError> {
    let Some(range) = Range::new(from, to) else {
        return Ok(Vec::new());
    };
    // No message is accepted at `to`, so without a cursor its id never counts.
    let (before_at, before_id) = match before {
        Some((at, id)) => (at, id.to_string()),
        None => (range.to, String::new()),
    };
    let sql = format!(
        "WITH page AS ( \
           SELECT message_id, min(ts) AS accepted_at FROM {TABLE} \
           WHERE receiver = $1 AND state = 'accepted' AND dt >= $2 AND dt <= $3 \
             AND ts >= $4 AND ts < $5 \
           GROUP BY message_id \
           HAVING min(ts) < $6 OR (min(ts) = $6 AND message_id < $7) \
           ORDER BY accepted_at DESC, message_id DESC LIMIT {limit}) \
         SELECT e.* FROM {TABLE} e JOIN page p ON e.message_id = p.message_id \
         WHERE e.receiver = $1 AND e.dt >= $2 AND e.dt <= $8"
    );
    let params = vec![
        text(&warehouse.receivers().apply(receiver)),
        text(&dt(range.first_day)),
        text(&dt(range.last_day)),
        time(range.from),
        time(range.to),
        time(before_at),
        text(&before_id),
        text(&dt(range.last_day + Days::new(TRACE_DAYS))),
    ];
    let mut messages: HashMap<MessageId, Latest> = HashMap::new();
    for batch in &run(warehouse, app, &sql, params).await? {
        for e in batch_to_events(batch)? {
            messages.entry(e.message_id).or_default().add(e);
        }
    }
    let mut out: Vec<MessageSummary> = messages.into_values().filter_map(Latest::summary).collect();
    out.sort_by_key(|m| std::cmp::Reverse((m.accepted_at, m.message_id)));
    Ok(out)
}

/// The states of `app`'s messages of template `template_id` accepted in `[from, to)`: what
/// `Store::template_states` answers, from the warehouse.
pub async fn template_states(
    warehouse: &Warehouse,
    app: &str,
    template_id: i64,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> Result<TemplateStates, AnalyticsError> {
    let Some(range) = Range::new(from, to) else {
        return Ok(TemplateStates::default());
    };
    // The pipeline order breaks ties of time and attempt, as in the trace.
    let rank = State::ALL
        .iter()
        .enumerate()
        .map(|(i, s)| format!("WHEN '{}' THEN {i} ", s.as_str()))
        .collect::<String>();
    let sql = format!(
        "WITH accepted AS ( \
           SELECT DISTINCT message_id FROM {TABLE} \
           WHERE template_id = $1 AND state = 'accepted' AND dt >= $2 AND dt <= $3 \
             AND ts >= $4 AND ts < $5), \
         events AS ( \
           SELECT e.message_id, e.state, e.ts, e.attempt, \
                  CASE e.state {rank}ELSE {} END AS rank \
           FROM {TABLE} e JOIN accepted a ON e.message_id = a.message_id \
           WHERE e.template_id = $1 AND e.dt >= $2 AND e.dt <= $6) \
         SELECT 'reached' AS kind, state, count(DISTINCT message_id) AS n \
         FROM events GROUP BY state \
         UNION ALL \
         SELECT 'current' AS kind, state, count(*) AS n FROM ( \
           SELECT first_value(state ORDER BY ts DESC, attempt DESC, rank DESC) AS state \
           FROM events GROUP BY message_id) \
         GROUP BY state",
        State::ALL.len()
    );
    let params = vec![
        ScalarValue::Int64(Some(template_id)),
        text(&dt(range.first_day)),
        text(&dt(range.last_day)),
        time(range.from),
        time(range.to),
        text(&dt(range.last_day + Days::new(TRACE_DAYS))),
    ];
    let mut stats = TemplateStates::default();
    for batch in &run(warehouse, app, &sql, params).await? {
        let kind = strings(batch, 0)?;
        let state = strings(batch, 1)?;
        let n = cast(batch.column(2), &DataType::Int64)?;
        let n = n
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64 gives an Int64Array");
        for i in 0..batch.num_rows() {
            let pair = (parse_state(state.value(i))?, n.value(i));
            match kind.value(i) {
                "current" => stats.current.push(pair),
                _ => stats.reached.push(pair),
            }
        }
    }
    for counts in [&mut stats.current, &mut stats.reached] {
        counts.sort_by_key(|(s, _)| State::ALL.iter().position(|x| x == s));
    }
    stats.messages = stats.current.iter().map(|(_, n)| n).sum();
    Ok(stats)
}

/// A range of acceptance times, limited to the times the warehouse can hold, with the days
/// (`dt` partitions) it spans.
struct Range {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    first_day: NaiveDate,
    last_day: NaiveDate,
}

impl Range {
    /// `None` when the range holds no time.
    fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<Range> {
        let end = Utc
            .with_ymd_and_hms(9999, 1, 1, 0, 0, 0)
            .single()
            .expect("a valid time");
        let (from, to) = (from.max(DateTime::UNIX_EPOCH), to.min(end));
        (from < to).then(|| Range {
            from,
            to,
            first_day: from.date_naive(),
            last_day: (to - chrono::TimeDelta::microseconds(1)).date_naive(),
        })
    }
}

/// A message's latest event in trace order and its acceptance time, built from its events.
#[derive(Default)]
struct Latest {
    accepted_at: Option<DateTime<Utc>>,
    latest: Option<DeliveryEvent>,
}

impl Latest {
    fn add(&mut self, e: DeliveryEvent) {
        if e.state == State::Accepted {
            self.accepted_at = Some(self.accepted_at.map_or(e.ts, |t| t.min(e.ts)));
        }
        if self
            .latest
            .as_ref()
            .is_none_or(|l| e.trace_order() > l.trace_order())
        {
            self.latest = Some(e);
        }
    }

    fn summary(self) -> Option<MessageSummary> {
        let (accepted_at, e) = (self.accepted_at?, self.latest?);
        Some(MessageSummary {
            message_id: e.message_id,
            template_id: e.template_id,
            channel: e.channel,
            receiver: e.receiver,
            biz_id: e.biz_id,
            state: e.state,
            accepted_at,
            updated_at: e.ts,
        })
    }
}

/// Runs `sql` over `app`'s rows with `params` bound to `$1`, `$2`, ...
async fn run(
    warehouse: &Warehouse,
    app: &str,
    sql: &str,
    params: Vec<ScalarValue>,
) -> Result<Vec<RecordBatch>, AnalyticsError> {
    collect(warehouse, sql, &Rows::App(app.to_string()), params).await
}

fn text(value: &str) -> ScalarValue {
    ScalarValue::Utf8(Some(value.to_string()))
}

fn time(t: DateTime<Utc>) -> ScalarValue {
    ScalarValue::TimestampMicrosecond(Some(t.timestamp_micros()), Some("UTC".into()))
}

/// A day as its `dt` partition value.
fn dt(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// Column `i` of `batch` as strings (a plain or a view string column).
fn strings(batch: &RecordBatch, i: usize) -> Result<StringArray, AnalyticsError> {
    let column = cast(batch.column(i), &DataType::Utf8)?;
    Ok(column
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8 gives a StringArray")
        .clone())
}

fn parse_state(name: &str) -> Result<State, AnalyticsError> {
    State::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| AnalyticsError::Corrupt(format!("unknown state `{name}`")))
}

#[cfg(test)]
mod tests;

//! Tracing for business teams: `GET /v1/receivers/{receiver}/messages` (an app's messages to one
//! receiver, newest first, each with its current state) and `GET /v1/templates/{id}/stats` (the
//! states of a template's messages of one day).
//!
//! Both read the store's `message_states`, which the warehouse sink fills with the event index
//! behind `GET /v1/messages/{id}`, so a state change shows within the sink's flush interval. A
//! message belongs to the time (and the day) it was accepted at. The index forgets messages
//! after `analytics.index_retention`; what was accepted before that horizon is read from the
//! warehouse instead (with `from` for the receiver list, whose default starts at the horizon).

use crate::auth::AuthApp;
use crate::sql::from_warehouse;
use crate::{ApiError, ApiState};
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use herald_core::State as MessageState;
use herald_core::policy::quiet_hours::parse_timezone;
use herald_core::store::StoreError;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Messages per page unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 200;

/// Query of `GET /v1/receivers/{receiver}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverQuery {
    /// Messages accepted at or after this RFC 3339 time (default: any).
    from: Option<String>,
    /// Messages accepted before this RFC 3339 time (default: any).
    to: Option<String>,
    /// Messages per page: 20 unless given, 1 to 200.
    limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Query of `GET /v1/templates/{id}/stats`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// The day, `YYYY-MM-DD` (default: today in `timezone`).
    date: Option<String>,
    /// The IANA time zone whose calendar day `date` is (default: UTC).
    timezone: Option<String>,
}

/// A malformed query string: `400 bad_query`.
fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        code: "bad_query",
        message: e.body_text(),
        details: vec![],
    }
}

/// An optional RFC 3339 time of the query.
fn time(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::invalid(
                        "bad_time",
                        format!("`{name}` is not an RFC 3339 time like 2026-11-27T08:00:00Z"),
                    )
                })
        })
        .transpose()
}

/// A page cursor: the acceptance time (unix microseconds) and id of the previous page's last
/// message.
fn cursor(raw: Option<&str>) -> Result<Option<(DateTime<Utc>, herald_core::MessageId)>, ApiError> {
    let bad = || ApiError::invalid("bad_cursor", "use the next_cursor of the previous page");
    let Some(raw) = raw.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let (us, id) = raw.split_once('_').ok_or_else(bad)?;
    let at = us
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok(Some((at, id.parse().map_err(|_| bad())?)))
}

/// `GET /v1/receivers/{receiver}/messages?from=&to=&limit=&cursor=`: the app's messages to
/// `receiver` (as herald records it: phone numbers in E.164) accepted in `[from, to)`, newest
/// first, each with its current state; `next_cursor` is set when there may be more.
pub async fn receiver_messages(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(receiver): Path<String>,
    query: Result<Query<ReceiverQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "bad_limit",
            format!("limit is 1 to {MAX_LIMIT}"),
        ));
    }
    let horizon = state.inner.sql.index_horizon();
    let from = time("from", q.from.as_deref())?
        .or(horizon)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let to = time("to", q.to.as_deref())?.unwrap_or(DateTime::<Utc>::MAX_UTC);
    if from > to {
        return Err(ApiError::invalid("bad_range", "`from` is after `to`"));
    }
    let before = cursor(q.cursor.as_deref())?;
    // Every message accepted since the horizon is in the index, and they are the newer ones;
    // the page goes on in the warehouse with those accepted before it.
    let recent_from = horizon.map_or(from, |h| from.max(h));
    let mut messages = if recent_from < to {
        state
            .inner
            .store
            .receiver_messages(&app.name, &receiver, recent_from, to, before, limit)
            .await?
    } else {
        Vec::new()
    };
    let wanted = limit as usize - messages.len();
    if let Some(h) = horizon.filter(|h| from < *h && wanted > 0) {
        let older = state.inner.sql.receiver_messages(
            &app.name,
            &receiver,
            (from, to.min(h)),
            before,
            wanted,
        );
        messages.extend(from_warehouse(&state, older).await?);
    }
    let next = (messages.len() as i64 == limit)
        .then(|| messages.last())
        .flatten()
        .map(|m| format!("{}_{}", m.accepted_at.timestamp_micros(), m.message_id));
    Ok(Json(json!({
        "receiver": receiver,
        "messages": messages,
        "next_cursor": next,
    })))
}

/// `GET /v1/templates/{id}/stats?date=YYYY-MM-DD&timezone=`: the app's messages of template
/// `id` accepted on that calendar day (UTC unless `timezone` names another zone), counted by
/// current state (`states`, each message once) and by every state they reached (`reached`:
/// Austin's per-template chart). `404` for another app's template.
pub async fn template_stats(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    id: Result<Path<i64>, PathRejection>,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let no_template = ApiError::NotFound("no template of this app has that id");
    let Ok(Path(id)) = id else {
        return Err(no_template);
    };
    let Query(q) = query.map_err(bad_query)?;
    let zone = match q.timezone.as_deref().filter(|z| !z.is_empty()) {
        None => Tz::UTC,
        Some(name) => {
            parse_timezone(name).map_err(|message| ApiError::invalid("bad_timezone", message))?
        }
    };
    let day = match q.date.as_deref().filter(|d| !d.is_empty()) {
        None => Utc::now().with_timezone(&zone).date_naive(),
        Some(d) => NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .map_err(|_| ApiError::invalid("bad_date", "`date` is a day like 2026-11-27"))?,
    };
    let store = &state.inner.store;
    match store.template(app.id, id).await {
        Ok(_) => {}
        Err(StoreError::NotFound) => return Err(no_template),
        Err(e) => return Err(e.into()),
    }
    let (from, to) = (
        day_start(zone, day),
        day_start(zone, day + chrono::Days::new(1)),
    );
    let stats = match state.inner.sql.index_horizon() {
        Some(h) if from < h => {
            from_warehouse(
                &state,
                state.inner.sql.template_states(&app.name, id, (from, to)),
            )
            .await?
        }
        _ => store.template_states(&app.name, id, from, to).await?,
    };
    let by_state = |counts: &[(MessageState, i64)]| {
        let mut map: Map<String, Value> = MessageState::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), json!(0)))
            .collect();
        for (s, n) in counts {
            map.insert(s.as_str().to_string(), json!(n));
        }
        Value::Object(map)
    };
    Ok(Json(json!({
        "template_id": id,
        "date": day.format("%Y-%m-%d").to_string(),
        "time_zone": zone.name(),
        "messages": stats.messages,
        "states": by_state(&stats.current),
        "reached": by_state(&stats.reached),
    })))
}

/// When `day` starts in `zone`: its midnight, or the first hour after it when the zone's
/// clocks skip midnight that day (a daylight-saving change).
fn day_start(zone: Tz, day: NaiveDate) -> DateTime<Utc> {
    let midnight = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    [midnight, midnight + chrono::TimeDelta::hours(1)]
        .into_iter()
        .find_map(|t| zone.from_local_datetime(&t).earliest())
        .map_or_else(|| midnight.and_utc(), |t| t.with_timezone(&Utc))
}

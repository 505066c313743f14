//! Pipeline policies through the API: the app's policy document (`/v1/policy`), its receiver
//! lists (`/v1/lists/{list}/{channel}`: block, allow, unsubscribed), cancelling a scheduled
//! message (`DELETE /v1/messages/{id}`) and sending failed ones again
//! (`POST /v1/messages/redrive`). Dispatch reads policies through a short cache, so a
//! change applies within seconds, without a restart.

use crate::auth::{AuthApp, Caller};
use crate::body::JsonBody;
use crate::{ApiError, ApiState, Detail};
use axum::Json;
use axum::extract::{Path, Query, State};
use herald_core::domain::parse_receiver;
use herald_core::policy::AppPolicy;
use herald_core::store::{Audit, ListName, Redrive, ScheduleKind, StoreError};
use herald_core::wire::{DELIVERY_TOPIC, DISPATCH_GROUP, REQUESTS_TOPIC};
use herald_core::{Channel, DeliveryEvent, MessageId, MessageRecord, State as MessageState};
use serde::Deserialize;
use serde_json::{Value, json};

/// Most receivers in one list change.
const MAX_LIST_CHANGE: usize = 10_000;

/// `GET /v1/policy`: the app's policy document and its version (0: never set).
pub async fn get_policy(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
) -> Result<Json<Value>, ApiError> {
    let (policy, version) = state.inner.store.app_policy(app.id).await?;
    Ok(Json(json!({"version": version, "policy": policy})))
}

/// `PUT /v1/policy`: replaces the app's policy document after checking all of it.
pub async fn put_policy(
    State(state): State<ApiState>,
    caller: Caller,
    body: JsonBody<AppPolicy>,
) -> Result<Json<Value>, ApiError> {
    let app = &caller.app;
    let policy = body.value;
    policy
        .compile()
        .map_err(|m| ApiError::invalid("bad_policy", m))?;
    // Every account a route or a rate limit names must be the app's (and of the route's channel).
    let mut named: Vec<(String, i64, Option<Channel>)> = Vec::new();
    for (i, route) in policy.routes.iter().enumerate() {
        for (j, a) in route.accounts.iter().enumerate() {
            let field = format!("routes[{i}].accounts[{j}]");
            named.push((field, a.account_id, Some(route.channel)));
        }
    }
    for (i, l) in policy.rate_limits.iter().enumerate() {
        named.push((format!("rate_limits[{i}]"), l.account_id, None));
    }
    for (field, id, channel) in named {
        match state.inner.store.account(app.id, id).await {
            Ok(account) => {
                if let Some(c) = channel
                    && account.channel != c
                {
                    return Err(ApiError::invalid(
                        "bad_policy",
                        format!(
                            "{field}: account {id} is a {} account, not {c}",
                            account.channel
                        ),
                    ));
                }
            }
            Err(StoreError::NotFound) => {
                return Err(ApiError::invalid(
                    "bad_policy",
                    format!("{field}: the app has no account {id}"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let version = state
        .inner
        .store
        .put_app_policy(app.id, &policy, |version| {
            Audit::new(
                caller.actor(),
                "policy.put",
                "policy",
                json!({"version": version}),
            )
        })
        .await?;
    Ok(Json(json!({"version": version, "policy": policy})))
}

/// Body of `POST` and `DELETE /v1/lists/{list}/{channel}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListChange {
    receivers: Vec<String>,
}

/// Query of `GET /v1/lists/{list}/{channel}`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    after: String,
    limit: Option<i64>,
}

/// The list and channel a path names.
fn list_of(list: &str, channel: &str) -> Result<(ListName, Channel), ApiError> {
    let list = ListName::parse(list).ok_or_else(|| {
        ApiError::invalid(
            "unknown_list",
            format!("no list `{list}` (expected block, allow or unsubscribed)"),
        )
    })?;
    let channel = channel
        .parse()
        .map_err(|m| ApiError::invalid("unknown_channel", m))?;
    Ok((list, channel))
}

/// The receivers of a change, normalised for the channel; every bad one is named.
fn receivers_of(channel: Channel, change: &ListChange) -> Result<Vec<String>, ApiError> {
    if change.receivers.is_empty() || change.receivers.len() > MAX_LIST_CHANGE {
        return Err(ApiError::invalid(
            "bad_receivers",
            format!("1 to {MAX_LIST_CHANGE} receivers per change"),
        ));
    }
    let mut out = Vec::with_capacity(change.receivers.len());
    let mut details = Vec::new();
    for (i, raw) in change.receivers.iter().enumerate() {
        match parse_receiver(channel, raw) {
            Ok(r) => out.push(r),
            Err(message) => details.push(Detail {
                path: format!("receivers[{i}]"),
                code: "bad_receiver",
                message,
            }),
        }
    }
    if details.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::from_details(details))
    }
}

/// `GET /v1/lists/{list}/{channel}`: receivers in order, `limit` per page after `after`.
pub async fn get_list(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path((list, channel)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let (list, channel) = list_of(&list, &channel)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let receivers = state
        .inner
        .store
        .list_page(app.id, channel, list, &q.after, limit)
        .await?;
    let next = (receivers.len() as i64 == limit)
        .then(|| receivers.last().cloned())
        .flatten();
    Ok(Json(json!({"receivers": receivers, "next_after": next})))
}

/// `POST /v1/lists/{list}/{channel}`: adds receivers.
pub async fn add_to_list(
    State(state): State<ApiState>,
    caller: Caller,
    Path((list, channel)): Path<(String, String)>,
    body: JsonBody<ListChange>,
) -> Result<Json<Value>, ApiError> {
    let (list, channel) = list_of(&list, &channel)?;
    let receivers = receivers_of(channel, &body.value)?;
    let target = format!("list:{}/{channel}", list.as_str());
    let added = state
        .inner
        .store
        .add_to_list(caller.app.id, channel, list, &receivers, |added| {
            // Counts only: receivers are personal data.
            let detail = json!({"receivers": receivers.len(), "added": added});
            Audit::new(caller.actor(), "list.add", target, detail)
        })
        .await?;
    Ok(Json(json!({"added": added})))
}

/// `DELETE /v1/lists/{list}/{channel}`: removes receivers.
pub async fn remove_from_list(
    State(state): State<ApiState>,
    caller: Caller,
    Path((list, channel)): Path<(String, String)>,
    body: JsonBody<ListChange>,
) -> Result<Json<Value>, ApiError> {
    let (list, channel) = list_of(&list, &channel)?;
    let receivers = receivers_of(channel, &body.value)?;
    let target = format!("list:{}/{channel}", list.as_str());
    let removed = state
        .inner
        .store
        .remove_from_list(caller.app.id, channel, list, &receivers, |removed| {
            let detail = json!({"receivers": receivers.len(), "removed": removed});
            Audit::new(caller.actor(), "list.remove", target, detail)
        })
        .await?;
    Ok(Json(json!({"removed": removed})))
}

/// `DELETE /v1/messages/{id}`: cancels a message that waits for its `send_at` or for the end of
/// quiet hours. `404 not_found` when there is no such waiting message of this app; `409
/// too_late` when it was released and is being sent.
pub async fn cancel(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ApiError::message_id(&id)?;
    let entry = match state.inner.store.cancel_scheduled(&app.name, id).await {
        Ok(entry) => entry,
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(
                "no message of this app waits with that id",
            ));
        }
        Err(StoreError::Conflict(message)) => {
            return Err(ApiError::Conflict {
                code: "too_late",
                message,
            });
        }
        Err(e) => return Err(e.into()),
    };
    // The cancellation is committed; its event is published after. Should that fail, the
    // message still stays unsent, and the trace lacks the `discarded` event.
    match serde_json::from_str::<MessageRecord>(&entry.record) {
        Ok(record) => {
            let mut event = DeliveryEvent::for_record(&record, MessageState::Discarded, 1);
            event.error_code = Some("cancelled".into());
            event.error_detail = Some("cancelled through the API".into());
            if let Err(e) = state
                .inner
                .bus
                .publish(DELIVERY_TOPIC, vec![event.to_record()])
                .await
            {
                tracing::error!(message_id = %id, error = %e, "cancelled, but its event was not published");
            }
        }
        Err(e) => {
            tracing::error!(message_id = %id, error = %e, "a schedule entry is not a message record")
        }
    }
    Ok(Json(json!({"message_id": id, "state": "cancelled"})))
}

/// Body of `POST /v1/messages/redrive`: message ids, or a template and a time range.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveBody {
    message_ids: Option<Vec<String>>,
    template_id: Option<i64>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
}

/// Most messages one redrive sends again.
const MAX_REDRIVE: usize = 10_000;

/// `POST /v1/messages/redrive`: sends failed (`send_failed`) messages again, by id or by
/// template and failure time (default: the last 24 hours). Each goes back through the vendor
/// once, however many redrives race: its ledger row moves from `send_failed` to `retrying` in
/// the same transaction that schedules it. Answers the ids redriven.
pub async fn redrive(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    body: JsonBody<RedriveBody>,
) -> Result<Json<Value>, ApiError> {
    let b = body.value;
    let selection = match (b.message_ids, b.template_id) {
        (Some(ids), None) if b.since.is_none() && b.until.is_none() => {
            if ids.is_empty() || ids.len() > 1000 {
                return Err(ApiError::invalid(
                    "bad_redrive",
                    "1 to 1000 message_ids per redrive",
                ));
            }
            let ids = ids
                .iter()
                .map(|id| ApiError::message_id(id))
                .collect::<Result<Vec<MessageId>, _>>()?;
            Redrive::Messages(ids)
        }
        (None, Some(template_id)) => {
            let until = b.until.unwrap_or_else(chrono::Utc::now);
            let since = b.since.unwrap_or(until - chrono::Duration::hours(24));
            if since >= until {
                return Err(ApiError::invalid(
                    "bad_redrive",
                    "since must be before until",
                ));
            }
            Redrive::Template {
                template_id,
                since: since.timestamp_millis(),
                until: until.timestamp_millis(),
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "bad_redrive",
                "give message_ids, or template_id with an optional since and until",
            ));
        }
    };
    let ids = state
        .inner
        .store
        .redrive(&app.name, &selection, MAX_REDRIVE as i64)
        .await?;
    Ok(Json(json!({"redriven": ids.len(), "message_ids": ids})))
}

/// `GET /v1/apps/{app}/stats` (the app's name or id; only its own key): what holds the app's
/// messages back right now — the dispatch workers' lag on `herald.requests` (every app's
/// records), its messages waiting in the schedule per reason, and how far ahead each of its
/// rate-limited accounts is booked.
pub async fn app_stats(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if name != app.name && name != app.id.to_string() {
        return Err(ApiError::NotFound("no such app"));
    }
    let store = &state.inner.store;
    let lag = state
        .inner
        .bus
        .lag(REQUESTS_TOPIC, DISPATCH_GROUP)
        .await
        .ok();
    let mut waiting = serde_json::Map::new();
    let mut oldest_due = None::<i64>;
    for kind in ScheduleKind::ALL {
        waiting.insert(kind.as_str().into(), json!(0));
    }
    for (kind, count, due) in store.waiting(&app.name).await? {
        waiting.insert(kind.as_str().into(), json!(count));
        oldest_due = Some(oldest_due.map_or(due, |d| d.min(due)));
    }
    let (policy, _) = store.app_policy(app.id).await?;
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut limits = Vec::new();
    for l in &policy.rate_limits {
        let until = store.rate_reserved_until(l.account_id).await?;
        let booked_ms = until.map_or(0, |u| ((u - now_us) / 1000).max(0));
        limits.push(json!({
            "account_id": l.account_id,
            "per_second": l.per_second,
            "booked_ahead_ms": booked_ms,
        }));
    }
    Ok(Json(json!({
        "app": app.name,
        "requests_lag": lag,
        "waiting": waiting,
        "oldest_due_at": oldest_due.and_then(chrono::DateTime::from_timestamp_millis),
        "rate_limits": limits,
    })))
}

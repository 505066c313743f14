//! Reading back: `GET /v1/messages/{id}` (the trace) and the inbox.

use crate::auth::AuthApp;
use crate::body::JsonBody;
use crate::sql::from_warehouse;
use crate::{ApiError, ApiState};
use axum::Json;
use axum::extract::{Path, Query, State};
use herald_core::DeliveryEvent;
use serde::Deserialize;
use serde_json::{Value, json};

/// `GET /v1/messages/{id}`: the current state and every event, oldest first.
///
/// Events come from the store's index, which the warehouse sink fills after each commit, so a
/// message appears here within the sink's flush interval of each state change. A message the
/// index no longer holds (`analytics.index_retention`) is read from the warehouse; one made in
/// the last [`INDEX_ONLY`] is looked for in the index only, so polling a new message's trace
/// costs no warehouse query.
pub async fn trace(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ApiError::message_id(&id)?;
    let mut events = state.inner.store.message_events(&app.name, &id).await?;
    let recent = id
        .made_at()
        .is_some_and(|t| chrono::Utc::now() - t < INDEX_ONLY);
    if events.is_empty() && !recent {
        events = from_warehouse(&state, state.inner.sql.message_events(&app.name, &id)).await?;
        events.sort_by_key(DeliveryEvent::trace_order);
    }
    let last = events.last().ok_or(ApiError::NotFound(
        "no such message (events appear within the warehouse flush interval)",
    ))?;
    Ok(Json(json!({
        "message_id": id,
        "state": last.state,
        "channel": last.channel,
        "receiver": last.receiver,
        "template_id": last.template_id,
        "events": events,
    })))
}

/// How recent a time-ordered message id must be for its trace to be read from the index only.
const INDEX_ONLY: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Query of `GET /v1/inbox/{receiver}`.
#[derive(Debug, Deserialize)]
pub struct InboxQuery {
    limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    #[serde(default)]
    unread: bool,
}

/// `GET /v1/inbox/{receiver}`: newest first, `limit` per page, `cursor` for the next page.
pub async fn inbox(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(receiver): Path<String>,
    Query(q): Query<InboxQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(20).clamp(1, 200);
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            let (ts, id) = c.split_once('_').ok_or_else(|| {
                ApiError::invalid("bad_cursor", "use the next_cursor of the previous page")
            })?;
            Some((
                ts.parse().map_err(|_| {
                    ApiError::invalid("bad_cursor", "use the next_cursor of the previous page")
                })?,
                id.to_string(),
            ))
        }
    };
    let entries = state
        .inner
        .store
        .inbox(&app.name, &receiver, before, limit, q.unread)
        .await?;
    let next = (entries.len() as i64 == limit)
        .then(|| {
            entries
                .last()
                .map(|e| format!("{}_{}", e.created_at, e.message_id))
        })
        .flatten();
    Ok(Json(
        json!({"receiver": receiver, "messages": entries, "next_cursor": next}),
    ))
}

/// Body of `POST /v1/inbox/{receiver}/read`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    /// The messages to mark read; empty or absent marks every message of the receiver.
    #[serde(default)]
    message_ids: Vec<String>,
}

pub async fn mark_read(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(receiver): Path<String>,
    body: JsonBody<ReadBody>,
) -> Result<Json<Value>, ApiError> {
    let changed = state
        .inner
        .store
        .mark_read(&app.name, &receiver, &body.value.message_ids)
        .await?;
    Ok(Json(json!({"marked_read": changed})))
}

//! API keys and the audit log: `POST/GET /v1/keys`, `DELETE /v1/keys/{key_id}` (revoke),
//! `POST /v1/keys/{key_id}/rotate`, and `GET /v1/audit`. All need the `admin` scope. A key is
//! shown once, in the answer that made it; herald keeps only its hash.

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::{ApiError, ApiState};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use herald_core::store::Change;
use herald_core::store::{ApiKey, Audit, NewKey, Scope, Scopes, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

/// Body of `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    /// What the key is for (1–200 bytes).
    name: String,
    /// `send`, `read`, `templates`, `admin`; at least one.
    scopes: Vec<String>,
    /// When the key stops working (RFC 3339); never if absent.
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// Body of `POST /v1/keys/{key_id}/rotate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the old key keeps working, in seconds (default a day; 0 ends it now).
    #[serde(default)]
    grace_seconds: Option<u64>,
}

/// The old key's life after a rotation unless the body says otherwise.
const DEFAULT_ROTATION_GRACE_SECONDS: u64 = 24 * 3600;

fn scopes_of(raw: &[String]) -> Result<Scopes, ApiError> {
    let scopes = raw
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| ApiError::invalid("bad_scope", m))?;
    if scopes.is_empty() {
        return Err(ApiError::invalid(
            "bad_scope",
            "a key needs at least one scope: send, read, templates or admin",
        ));
    }
    Ok(Scopes::of(&scopes))
}

/// A key as answered: the stored fields, and the key itself only when just made.
fn answer(key: &ApiKey, secret: Option<&str>) -> Value {
    let mut v = serde_json::to_value(key).unwrap_or_default();
    if let Some(secret) = secret {
        v["key"] = json!(secret);
    }
    v
}

/// `POST /v1/keys`: a new key with the given scopes and expiry.
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    body: JsonBody<KeyBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let b = body.value;
    if b.name.is_empty() || b.name.len() > 200 {
        return Err(ApiError::invalid(
            "bad_name",
            "a name of 1 to 200 bytes is required",
        ));
    }
    let scopes = scopes_of(&b.scopes)?;
    let expires_at = b.expires_at.map(|t| t.timestamp_millis());
    if expires_at.is_some_and(|at| at <= Utc::now().timestamp_millis()) {
        return Err(ApiError::invalid("bad_expiry", "expires_at is in the past"));
    }
    let new = NewKey {
        name: b.name,
        scopes,
        expires_at,
    };
    let (key, secret) = state
        .inner
        .store
        .create_key(caller.app.id, &new, |key| {
            let detail =
                json!({"name": key.name, "scopes": key.scopes, "expires_at": key.expires_at});
            Audit::new(
                caller.actor(),
                "key.create",
                format!("key:{}", key.key_id),
                detail,
            )
        })
        .await?;
    Ok((StatusCode::CREATED, Json(answer(&key, Some(&secret)))))
}

/// `GET /v1/keys`: every key of the app, revoked and expired ones included, never a secret.
pub async fn list(State(state): State<ApiState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let keys = state.inner.store.keys(caller.app.id).await?;
    let keys: Vec<Value> = keys.iter().map(|k| answer(k, None)).collect();
    Ok(Json(json!({"keys": keys})))
}

/// `DELETE /v1/keys/{key_id}`: revokes a key at once.
pub async fn revoke(
    State(state): State<ApiState>,
    caller: Caller,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = state
        .inner
        .store
        .revoke_key(caller.app.id, &key_id, |key| {
            Audit::new(
                caller.actor(),
                "key.revoke",
                format!("key:{key_id}"),
                json!({"name": key.name}),
            )
        })
        .await
        .map_err(not_found)?;
    state.changed(Change::Keys).await;
    Ok(Json(answer(&key, None)))
}

/// `POST /v1/keys/{key_id}/rotate`: a new key with the old one's name and scopes; the old key
/// keeps working for `grace_seconds` (default a day), so clients move over without downtime.
pub async fn rotate(
    State(state): State<ApiState>,
    caller: Caller,
    Path(key_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // The body is optional: none means the defaults.
    let body: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|_| ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            code: "bad_json",
            message: "the body is not valid for this endpoint: {\"grace_seconds\"?: integer}"
                .into(),
            details: vec![],
        })?
    };
    let grace = body.grace_seconds.unwrap_or(DEFAULT_ROTATION_GRACE_SECONDS);
    let store = &state.inner.store;
    let app = caller.app.id;
    let old = store.key(app, &key_id).await.map_err(not_found)?;
    let now = Utc::now().timestamp_millis();
    if !old.live_at(now) {
        return Err(ApiError::Conflict {
            code: "key_not_live",
            message: "the key is revoked or expired; make a new key instead".into(),
        });
    }
    let grace_ms = i64::try_from(grace.saturating_mul(1000)).unwrap_or(i64::MAX);
    let (key, secret, old) = store
        .rotate_key(app, &key_id, now.saturating_add(grace_ms), |key, old| {
            let detail = json!({"new_key": key.key_id, "old_key_expires_at": old.expires_at});
            Audit::new(
                caller.actor(),
                "key.rotate",
                format!("key:{key_id}"),
                detail,
            )
        })
        .await
        .map_err(not_found)?;
    state.changed(Change::Keys).await;
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": answer(&key, Some(&secret)), "old_key": answer(&old, None)})),
    ))
}

fn not_found(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::NotFound("no such key"),
        e => e.into(),
    }
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    limit: Option<i64>,
    /// The `next_before` of the previous page.
    before: Option<i64>,
}

/// `GET /v1/audit`: the app's changes, newest first, `limit` per page (default 50, at most 500).
pub async fn audit_log(
    State(state): State<ApiState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let entries = state
        .inner
        .store
        .audit_log(caller.app.id, q.before, limit)
        .await?;
    let next = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(json!({"entries": entries, "next_before": next})))
}

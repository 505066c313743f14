//! Vendor-facing endpoints: receipt pushes (`POST /v1/receipts/{vendor}`) and media upload
//! (`POST /v1/accounts/{id}/media`).

use crate::auth::AuthApp;
use crate::{ApiError, ApiState, MediaUpload};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use herald_core::DeliveryEvent;
use herald_core::wire::DELIVERY_TOPIC;
use serde::Deserialize;
use serde_json::{Value, json};

/// Query of a receipt push.
#[derive(Debug, Deserialize)]
pub struct ReceiptQuery {
    token: Option<String>,
}

/// `POST /v1/receipts/{vendor}`: a vendor pushes delivery receipts (Tencent Cloud SMS, Alibaba
/// Cloud SMS, Yunpian). Each receipt becomes a `delivered` or `delivery_failed` event on
/// `herald.delivery`, joined to its message by the vendor's message id; the vendor gets the answer
/// its documentation asks for. Receipts for unknown ids are counted
/// (`herald_receipts_total{outcome="unmatched"}`) and acknowledged, since the vendor cannot do
/// better by sending them again.
pub async fn receipts(
    State(state): State<ApiState>,
    Path(vendor): Path<String>,
    Query(query): Query<ReceiptQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let inner = &state.inner;
    if let Some(token) = &inner.config.receipt_token
        && !constant_time_eq(query.token.as_deref().unwrap_or(""), token.expose())
    {
        return Err(ApiError::Unauthorized);
    }
    let (receipts, ack_type, ack_body) = inner
        .channels
        .parse_receipt_push(&vendor, &body)
        .map_err(|e| ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            code: "bad_receipt",
            message: e,
            details: vec![],
        })?;
    let (events, unmatched) = inner.store.receipt_events(&receipts).await?;
    if !unmatched.is_empty() {
        tracing::warn!(%vendor, count = unmatched.len(), "receipts for unknown vendor message ids");
    }
    let records = events.iter().map(DeliveryEvent::to_record).collect();
    inner.bus.publish(DELIVERY_TOPIC, records).await?;
    inner.store.mark_receipts(&events).await?;
    inner
        .metrics
        .receipts(&vendor, receipts.len() - unmatched.len(), unmatched.len());
    Ok(([(CONTENT_TYPE, ack_type)], ack_body).into_response())
}

/// Compares two strings in time independent of where they differ.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Query of a media upload.
#[derive(Debug, Deserialize)]
pub struct MediaQuery {
    /// `image`, `voice`, `video` or `file`.
    #[serde(rename = "type")]
    kind: String,
    filename: String,
}

/// Media types vendors take.
const MEDIA_KINDS: [&str; 4] = ["image", "voice", "video", "file"];

/// `POST /v1/accounts/{id}/media?type=image&filename=logo.png` with the file as the raw body
/// (its `Content-Type` is passed on): uploads it through the account's vendor (WeCom app,
/// DingTalk work notice, Feishu app) and answers `201 {"media_id", "account_id", "type"}`.
/// Channels without media get `422 not_supported`; a vendor's refusal is `422 vendor_rejected`,
/// its failure `502 vendor_unavailable`, both with the vendor's code.
pub async fn upload_media(
    State(state): State<ApiState>,
    AuthApp(app): AuthApp,
    Path(id): Path<i64>,
    Query(query): Query<MediaQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !MEDIA_KINDS.contains(&query.kind.as_str()) {
        return Err(ApiError::invalid(
            "bad_media_type",
            "`type` must be image, voice, video or file",
        ));
    }
    let filename = query.filename.trim();
    if filename.is_empty() || filename.len() > 255 || filename.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "bad_filename",
            "`filename` must be 1 to 255 bytes without control characters",
        ));
    }
    if body.is_empty() {
        return Err(ApiError::invalid("empty_media", "the body holds no file"));
    }
    let account = state.inner.store.account(app.id, id).await?;
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let upload = MediaUpload {
        kind: query.kind.clone(),
        filename: filename.to_string(),
        content_type,
        bytes: body,
    };
    match state.inner.channels.upload_media(&account, upload).await {
        Ok(media_id) => Ok((
            StatusCode::CREATED,
            Json(json!({"media_id": media_id, "account_id": account.id, "type": query.kind})),
        )),
        Err(f) if f.code == "not_supported" => Err(ApiError::invalid("not_supported", f.detail)),
        Err(f) => Err(ApiError::Invalid {
            status: if f.retryable {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            },
            code: if f.retryable {
                "vendor_unavailable"
            } else {
                "vendor_rejected"
            },
            message: format!("{}: {}", f.code, f.detail),
            details: vec![],
        }),
    }
}

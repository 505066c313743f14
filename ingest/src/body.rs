//! JSON request bodies, with every parse failure turned into an API error with a code.

use crate::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A JSON body, parsed with `deny_unknown_fields` types, keeping its raw bytes (for
/// idempotency hashing).
pub struct JsonBody<T> {
    pub value: T,
    pub raw: Bytes,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let raw = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::Invalid {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: "body_too_large",
                    message: "the request body is larger than the configured limit".into(),
                    details: vec![],
                }
            } else {
                ApiError::invalid("bad_body", "the request body could not be read")
            }
        })?;
        if !json {
            return Err(ApiError::Invalid {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: "unsupported_media_type",
                message: "send JSON with Content-Type: application/json".into(),
                details: vec![],
            });
        }
        let value = serde_json::from_slice(&raw).map_err(|e| ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            code: "bad_json",
            message: format!("the body is not valid for this endpoint: {e}"),
            details: vec![],
        })?;
        Ok(JsonBody { value, raw })
    }
}

//! The one API error type: a code table for statuses, internals never shown to clients, and the
//! full cause logged once.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_core::MessageId;
use herald_core::store::StoreError;
use serde::Serialize;

/// One bad item of a request, named by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detail {
    pub path: String,
    pub code: &'static str,
    pub message: String,
}

/// An error answered to an API client as `{"error": {"code", "message", "details"?}}`.
#[derive(Debug)]
pub enum ApiError {
    /// Bad input: every bad item is in `details`; nothing was written.
    Invalid {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: Vec<Detail>,
    },
    Unauthorized,
    /// The key worked once and has expired.
    KeyExpired,
    /// The key lacks the scope the route needs (named).
    MissingScope(&'static str),
    NotFound(&'static str),
    Conflict {
        code: &'static str,
        message: String,
    },
    /// A dependency (store, bus) is down; the client should retry.
    Unavailable(String),
    /// A bug or an unexpected failure: logged, shown to the client only as `internal`.
    Internal(String),
}

impl ApiError {
    /// A 422 with one detail.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code,
            message: message.into(),
            details: vec![],
        }
    }

    /// A 422 naming every bad item; the top-level code is the items' code when they share one.
    pub fn from_details(details: Vec<Detail>) -> Self {
        let code = match details.first() {
            Some(first) if details.iter().all(|d| d.code == first.code) => first.code,
            _ => "invalid_request",
        };
        let message = details
            .iter()
            .map(|d| format!("{}: {}", d.path, d.message))
            .collect::<Vec<_>>()
            .join("; ");
        let status = if code == "unknown_template" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::Invalid {
            status,
            code,
            message,
            details,
        }
    }

    /// Parses a message id from a path or body: a `422 bad_message_id` unless it is a UUID.
    pub fn message_id(raw: &str) -> Result<MessageId, ApiError> {
        raw.parse()
            .map_err(|_| ApiError::invalid("bad_message_id", "a message id is a UUID"))
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid { code, .. } | ApiError::Conflict { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::KeyExpired => "key_expired",
            ApiError::MissingScope(_) => "missing_scope",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("not found"),
            StoreError::Conflict(m) => ApiError::Conflict {
                code: "conflict",
                message: m,
            },
            e if e.is_unavailable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<herald_core::bus::BusError> for ApiError {
    fn from(e: herald_core::bus::BusError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        let (status, message, details) = match self {
            ApiError::Invalid {
                status,
                message,
                details,
                ..
            } => (status, message, details),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "a valid API key is required: Authorization: Bearer <key>".to_string(),
                vec![],
            ),
            ApiError::KeyExpired => (
                StatusCode::UNAUTHORIZED,
                "this API key has expired: use a current key".to_string(),
                vec![],
            ),
            ApiError::MissingScope(scope) => (
                StatusCode::FORBIDDEN,
                format!("this API key lacks the `{scope}` scope this request needs"),
                vec![],
            ),
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, what.to_string(), vec![]),
            ApiError::Conflict { message, .. } => (StatusCode::CONFLICT, message, vec![]),
            ApiError::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily unavailable, retry later".to_string(),
                    vec![],
                )
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_string(),
                    vec![],
                )
            }
        };
        let mut error = serde_json::json!({"code": code, "message": message});
        if !details.is_empty() {
            error["details"] = serde_json::to_value(details).unwrap_or_default();
        }
        let mut resp = (status, axum::Json(serde_json::json!({ "error": error }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

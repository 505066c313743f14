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
        let value = parse_json(&raw)?;
        Ok(JsonBody { value, raw })
    }
}

/// Parses a request body: a `400 bad_json` that names no value of the input when it is not
/// JSON of type `T`.
pub(crate) fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        code: "bad_json",
        message: format!(
            "the body is not valid for this endpoint: {}",
            without_quoted_values(&e.to_string())
        ),
        details: vec![],
    })
}

/// A serde error message with every double-quoted value replaced by `"…"`: serde quotes the
/// offending input ("invalid type: string \"…\""), which may be a secret. Field names are quoted
/// with backticks and stay.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    for part in parts {
        if inside {
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_quoted_values;

    #[test]
    fn quoted_values_are_never_echoed() {
        let e = serde_json::from_str::<std::collections::BTreeMap<String, i64>>(
            r#"{"secret": "hunter2"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hunter2"), "serde quotes the value: {e}");
        let shown = without_quoted_values(&e);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.starts_with("invalid type: string \"…\""), "{shown}");
        assert_eq!(
            without_quoted_values("unknown field `x`, expected `y`"),
            "unknown field `x`, expected `y`"
        );
    }
}

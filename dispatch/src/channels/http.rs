//! HTTP plumbing shared by every vendor client: the client itself, and the mapping of HTTP
//! failures to [`SendError`]s.

use super::{Media, SendError};
use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Client, StatusCode};
use std::time::Duration;

/// Most requests one batch call (`Sender::send_batch`) has in flight at once to its vendor, when
/// the batch needs several requests (different contents, or more numbers than one request takes).
pub const BATCH_REQUEST_CONCURRENCY: usize = 32;

/// Most bytes of an error response's body quoted in an error detail.
const DETAIL_BODY_BYTES: usize = 256;

/// The HTTP client every vendor shares (one connection pool): rustls with the platform's web
/// PKI roots (certificates are verified), a connect timeout, and no redirects — a `POST` must
/// not silently turn into a `GET` elsewhere.
///
/// # Panics
/// If the TLS backend cannot be initialised, which is a build defect, not a runtime state.
pub fn client() -> Client {
    builder().build().expect("the HTTP client (rustls) builds")
}

/// The client vendors are called with: [`client`], resolving names only to public addresses
/// unless `allow_private` (see [`super::fetch::PublicOnly`]).
pub fn vendor_client(allow_private: bool) -> Client {
    let builder = builder();
    let builder = if allow_private {
        builder
    } else {
        builder.dns_resolver(std::sync::Arc::new(super::fetch::PublicOnly))
    };
    builder.build().expect("the HTTP client (rustls) builds")
}

fn builder() -> reqwest::ClientBuilder {
    Client::builder()
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none())
}

/// Maps a non-2xx status: `408`, `429` and `5xx` are retryable (honouring `Retry-After`), the
/// rest permanent. Codes are `<prefix>_408`, `<prefix>_429`, `<prefix>_5xx`, `<prefix>_4xx`,
/// `<prefix>_status`.
pub fn status_error(
    prefix: &str,
    status: StatusCode,
    headers: &HeaderMap,
    detail: String,
) -> SendError {
    let retry_after = retry_after(headers);
    let retryable = |suffix: &str| SendError::Retryable {
        code: format!("{prefix}_{suffix}"),
        detail: detail.clone(),
        retry_after,
    };
    match status.as_u16() {
        408 => retryable("408"),
        429 => retryable("429"),
        500..=599 => retryable("5xx"),
        400..=499 => SendError::Permanent {
            code: format!("{prefix}_4xx"),
            detail,
        },
        // 3xx (redirects are not followed) and stray 1xx: the URL needs fixing.
        _ => SendError::Permanent {
            code: format!("{prefix}_status"),
            detail,
        },
    }
}

/// Maps a failure to get a response at all (retryable): `<prefix>_timeout`, `<prefix>_connect`
/// or `<prefix>_network`. The detail never quotes the URL, which may hold credentials.
pub fn request_error(prefix: &str, e: reqwest::Error) -> SendError {
    // A host refused by the public-only resolver: permanent, it will not become public.
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        if let Some(refused) = c.downcast_ref::<super::fetch::NotPublic>() {
            return SendError::Permanent {
                code: "url_refused".into(),
                detail: refused.to_string(),
            };
        }
        cause = c.source();
    }
    let suffix = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "network"
    };
    SendError::Retryable {
        code: format!("{prefix}_{suffix}"),
        detail: e.without_url().to_string(),
        retry_after: None,
    }
}

/// The `Retry-After` header's delay, if any.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, Utc::now()))
}

/// A `Retry-After` value: delay seconds, or an HTTP date (IMF-fixdate, e.g.
/// `Wed, 21 Oct 2015 07:28:00 GMT`; the obsolete RFC 850 and asctime forms are not read).
/// A date in the past means "now".
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// `: <the start of the body>` for an error detail, or nothing if the body is empty or unreadable.
pub async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < DETAIL_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    excerpt(&body)
}

/// `: <the start of body>` (at most 256 bytes), or nothing if it is empty.
pub fn excerpt(body: &[u8]) -> String {
    let body = &body[..body.len().min(DETAIL_BODY_BYTES)];
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Sends `request` and returns the body of a `2xx` answer; other answers and transport failures
/// become errors coded with `prefix` (see [`status_error`] and [`request_error`]). Vendors that
/// answer `200` with an error code in the body check that code themselves.
pub async fn send_for_body(
    prefix: &str,
    request: reqwest::RequestBuilder,
) -> Result<bytes::Bytes, SendError> {
    let response = request.send().await.map_err(|e| request_error(prefix, e))?;
    let status = response.status();
    if !status.is_success() {
        let headers = response.headers().clone();
        let detail = format!("HTTP {status}{}", body_excerpt(response).await);
        return Err(status_error(prefix, status, &headers, detail));
    }
    response.bytes().await.map_err(|e| request_error(prefix, e))
}

/// An account's `base_url`: `given` checked (http or https, a host, no query or fragment —
/// and never quoted in the error, as it may hold credentials), else `default`; without a
/// trailing slash.
pub fn base_url(given: Option<String>, default: &str) -> Result<String, String> {
    let Some(raw) = given else {
        return Ok(default.to_string());
    };
    let url = reqwest::Url::parse(&raw).map_err(|e| format!("`base_url`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("`base_url` must be an http or https URL with a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("`base_url` must not have a query or a fragment".into());
    }
    Ok(raw.trim_end_matches('/').to_string())
}

/// A `Permanent` `bad_account` error: the account's config does not parse.
pub fn bad_account(detail: impl Into<String>) -> SendError {
    SendError::Permanent {
        code: "bad_account".into(),
        detail: detail.into(),
    }
}

/// A `Permanent` `bad_content` error: the rendered content does not fit the channel.
pub fn bad_content(detail: impl Into<String>) -> SendError {
    SendError::Permanent {
        code: "bad_content".into(),
        detail: detail.into(),
    }
}

/// The `multipart/form-data` body of a media upload — the text `fields`, then the file as the
/// part named `file_field` (`media` for WeCom and DingTalk) — and its content type.
pub fn multipart(
    fields: &[(&str, &str)],
    file_field: &str,
    media: &Media,
) -> (String, bytes::Bytes) {
    let boundary = loop {
        let candidate = format!("herald-{:032x}", rand::random::<u128>());
        let needle = candidate.as_bytes();
        if !media.bytes.windows(needle.len()).any(|w| w == needle) {
            break candidate;
        }
    };
    // Quotes and line breaks would end the header value: percent-encode them, as browsers do.
    let filename = media
        .filename
        .replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A");
    let content_type =
        if media.content_type.is_empty() || media.content_type.chars().any(char::is_control) {
            "application/octet-stream"
        } else {
            media.content_type.as_str()
        };
    let mut body = Vec::with_capacity(media.bytes.len() + 400);
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; \
             filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&media.bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        body.into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .with_timezone(&Utc);
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(parse_retry_after("7", now), secs(7));
        assert_eq!(parse_retry_after(" 120 ", now), secs(120));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            secs(90)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            secs(0)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn statuses_map_to_retryable_or_permanent() {
        let h = HeaderMap::new();
        let e = |s: u16| status_error("v", StatusCode::from_u16(s).unwrap(), &h, String::new());
        assert_eq!(e(429).code(), "v_429");
        assert!(e(503).is_retryable());
        assert!(e(408).is_retryable());
        assert!(!e(400).is_retryable());
        assert_eq!(e(302).code(), "v_status");
    }
}

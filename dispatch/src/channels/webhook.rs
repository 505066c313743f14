//! Webhooks: a signed JSON `POST` to the URL of the channel account.
//!
//! # The request
//!
//! ```text
//! POST <account url>
//! Content-Type: application/json
//! X-Herald-Message-Id: <message_id>
//! X-Herald-Timestamp: <unix seconds>
//! X-Herald-Signature: v1=<hex(HMAC-SHA256(secret, "<X-Herald-Timestamp>.<raw body>"))>
//! <the account's extra headers>
//!
//! {"message_id", "request_id", "biz_id", "app", "template_id", "receiver", "content", "ts"}
//! ```
//!
//! `content` is the rendered template (any JSON), `biz_id` is `null` when the request had none,
//! and `ts` is the time of this attempt in RFC 3339 (the same instant as `X-Herald-Timestamp`).
//! A retried message is sent again with the same `message_id` and a fresh timestamp and
//! signature: receivers deduplicate on `X-Herald-Message-Id`.
//!
//! # Verifying a request (receivers)
//!
//! 1. Take the raw request body, as bytes, before any JSON parsing.
//! 2. Compute `HMAC-SHA256(secret, "<X-Herald-Timestamp>.<raw body>")` — the timestamp header's
//!    decimal text, a `.`, then the body — and hex-encode it (lowercase).
//! 3. Compare it with the `X-Herald-Signature` value after its `v1=` prefix, in constant time;
//!    reject the request if they differ.
//! 4. Reject the request if the timestamp is more than 5 minutes away from the receiver's
//!    clock, so a captured request cannot be replayed later.
//!
//! The `v1=` prefix names this scheme so that a later one can be introduced beside it. [`sign`]
//! computes the header value.
//!
//! # Answers
//!
//! Any `2xx` is success (the vendor id is the response's `X-Request-Id`, if any). `408`, `429`
//! and `5xx` are retryable, honouring `Retry-After`; other statuses are permanent. Redirects are
//! not followed: a `POST` must not silently turn into a `GET` elsewhere.

use super::http::{self, bad_account};
use super::{SendError, SendOutcome, Sender};
use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use herald_core::config::Secret;
use herald_core::{MessageId, MessageRecord};
use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::time::Duration;

/// The vendor name on delivery events.
const VENDOR: &str = "webhook";

/// The `X-Herald-Signature` value for a request: `v1=` and the lowercase hex of
/// `HMAC-SHA256(secret, "<timestamp>.<body>")`. The [module docs](crate::channels::webhook) say
/// how receivers verify it.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook channel account, parsed from its stored JSON config:
///
/// ```json
/// {"url": "https://hooks.example.com/herald", "secret": "…",
///  "timeout_ms": 5000, "headers": {"Authorization": "Bearer …"}}
/// ```
///
/// - `url`: where to `POST`; `http` or `https`.
/// - `secret`: the HMAC key the receiver verifies signatures with.
/// - `timeout_ms` (default 5000): limit on the whole request, response body included.
/// - `headers` (optional): extra request headers; they may not replace `Content-Type`, `Host`,
///   `Content-Length` or any `X-Herald-*` header.
#[derive(Debug, Clone)]
pub struct WebhookAccount {
    /// Where to `POST`.
    pub url: Url,
    /// The HMAC signing key.
    pub secret: Secret,
    /// Limit on the whole request.
    pub timeout: Duration,
    /// Extra request headers.
    pub headers: HeaderMap,
}

/// The config as stored; [`WebhookAccount::parse`] checks it into a [`WebhookAccount`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAccount {
    url: String,
    secret: Secret,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn default_timeout_ms() -> u64 {
    5_000
}

impl WebhookAccount {
    /// Parses and checks an account's stored config; the error says what is wrong (and never
    /// quotes a secret). Senders report it as a `Permanent` `bad_account`.
    pub fn parse(config: &serde_json::Value) -> Result<Self, String> {
        // serde quotes an ill-typed value in its error; check the secret's type first so that no
        // error can ever carry it.
        if config.get("secret").is_some_and(|s| !s.is_string()) {
            return Err("`secret` must be a string".into());
        }
        let stored: StoredAccount =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        // The URL may hold credentials (userinfo, a token in the query): never quote it.
        let url = Url::parse(&stored.url).map_err(|e| format!("`url`: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("`url` must be http or https".into());
        }
        if url.host().is_none() {
            return Err("`url` has no host".into());
        }
        if stored.secret.expose().is_empty() {
            return Err("`secret` is empty".into());
        }
        if stored.timeout_ms == 0 {
            return Err("`timeout_ms` must be positive".into());
        }
        let mut headers = HeaderMap::new();
        for (name, value) in stored.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`headers`: {name:?} is not a header name"))?;
            if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("x-herald-") {
                return Err(format!(
                    "`headers`: {name} is set by herald and cannot be replaced"
                ));
            }
            let value = HeaderValue::from_str(&value)
                .map_err(|_| format!("`headers`: the value of {name} is invalid"))?;
            headers.insert(name, value);
        }
        Ok(WebhookAccount {
            url,
            secret: stored.secret,
            timeout: Duration::from_millis(stored.timeout_ms),
            headers,
        })
    }
}

/// Headers herald sets itself (lowercase, as `HeaderName` keeps them), besides `x-herald-*`.
const RESERVED_HEADERS: &[&str] = &["content-type", "content-length", "host"];

/// The request body. Field names are a public contract (see the module docs).
#[derive(Serialize)]
struct Payload<'a> {
    message_id: &'a MessageId,
    request_id: &'a str,
    biz_id: Option<&'a str>,
    app: &'a str,
    template_id: i64,
    receiver: &'a str,
    content: &'a serde_json::Value,
    ts: String,
}

/// The webhook channel client: one HTTP client, with its connection pool, for every account.
pub struct WebhookSender {
    client: Client,
}

impl WebhookSender {
    /// A client over the shared HTTP connection pool.
    pub fn new(client: Client) -> Self {
        WebhookSender { client }
    }
}

#[async_trait]
impl Sender for WebhookSender {
    async fn send(
        &self,
        record: &MessageRecord,
        _account_id: i64,
        account: &serde_json::Value,
    ) -> Result<SendOutcome, SendError> {
        let account = WebhookAccount::parse(account).map_err(bad_account)?;
        let now = Utc::now();
        let body = serde_json::to_vec(&Payload {
            message_id: &record.message_id,
            request_id: &record.request_id,
            biz_id: record.biz_id.as_deref(),
            app: &record.app,
            template_id: record.template_id,
            receiver: &record.receiver,
            content: &record.content,
            ts: now.to_rfc3339_opts(SecondsFormat::Millis, true),
        })
        .expect("a payload of strings and JSON values serialises");

        let timestamp = now.timestamp();
        let mut headers = account.headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("x-herald-message-id", header_value(record.message_id));
        headers.insert("x-herald-timestamp", header_value(timestamp));
        headers.insert(
            "x-herald-signature",
            header_value(sign(account.secret.expose().as_bytes(), timestamp, &body)),
        );

        let response = self
            .client
            .post(account.url)
            .headers(headers)
            .timeout(account.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| http::request_error(VENDOR, e))?;

        let status = response.status();
        if status.is_success() {
            let vendor_message_id = response
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Ok(SendOutcome {
                vendor: VENDOR.into(),
                vendor_message_id,
                billing_units: None,
            });
        }
        let headers = response.headers().clone();
        let detail = format!("HTTP {status}{}", http::body_excerpt(response).await);
        Err(http::status_error(VENDOR, status, &headers, detail))
    }
}

/// Formats a value that is always a valid header value (digits, a UUID, hex).
fn header_value(value: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&value.to_string()).expect("digits, hex and UUIDs are valid headers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus, Uri};
    use axum::response::{IntoResponse, Response};
    use chrono::DateTime;
    use herald_core::{Channel, MsgType};
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};

    /// One request the test receiver accepted.
    struct Seen {
        path: String,
        headers: AxumHeaders,
        body: Value,
    }

    /// A webhook receiver that checks signatures itself, as a customer's server would.
    #[derive(Clone)]
    struct TestReceiver {
        secret: &'static [u8],
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    /// The receiver's own check, written from the documented scheme (not with `sign`).
    fn verify(secret: &[u8], headers: &AxumHeaders, body: &[u8]) -> Result<(), &'static str> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let timestamp = header("x-herald-timestamp").ok_or("no timestamp")?;
        let ts: i64 = timestamp.parse().map_err(|_| "bad timestamp")?;
        if (Utc::now().timestamp() - ts).abs() > 300 {
            return Err("stale timestamp");
        }
        let signature = header("x-herald-signature")
            .and_then(|s| s.strip_prefix("v1="))
            .and_then(|s| hex::decode(s).ok())
            .ok_or("no v1 signature")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&signature).map_err(|_| "bad signature")
    }

    async fn receive(
        State(rx): State<TestReceiver>,
        uri: Uri,
        headers: AxumHeaders,
        body: Bytes,
    ) -> Response {
        if let Err(why) = verify(rx.secret, &headers, &body) {
            return (AxumStatus::UNAUTHORIZED, why).into_response();
        }
        if headers.get("content-type").unwrap() != "application/json" {
            return (AxumStatus::UNSUPPORTED_MEDIA_TYPE, "not json").into_response();
        }
        let body: Value = serde_json::from_slice(&body).unwrap();
        rx.seen.lock().unwrap().push(Seen {
            path: uri.path().to_owned(),
            headers,
            body,
        });
        match uri.path() {
            "/ok" => ([("x-request-id", "rcv-42")], "thanks").into_response(),
            "/unavailable" => (
                AxumStatus::SERVICE_UNAVAILABLE,
                [("retry-after", "7")],
                "down for maintenance",
            )
                .into_response(),
            "/limited" => {
                let at = Utc::now() + chrono::Duration::seconds(30);
                let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                (AxumStatus::TOO_MANY_REQUESTS, [("retry-after", date)]).into_response()
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late".into_response()
            }
            _ => AxumStatus::GONE.into_response(),
        }
    }

    /// Starts the receiver on a free port; returns its base URL and what it saw.
    async fn start_receiver(secret: &'static [u8]) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(receive).with_state(TestReceiver {
            secret,
            seen: Arc::clone(&seen),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), seen)
    }

    const SECRET: &[u8] = b"whsec_receiver_secret";

    fn account(url: String) -> Value {
        json!({"url": url, "secret": std::str::from_utf8(SECRET).unwrap(), "timeout_ms": 2000})
    }

    fn record() -> MessageRecord {
        MessageRecord {
            v: 1,
            message_id: MessageId::new(),
            request_id: "req-9".into(),
            biz_id: Some("order-42".into()),
            app: "shop".into(),
            template_id: 11,
            channel: Channel::Webhook,
            msg_type: MsgType::Notice,
            account_id: Some(3),
            receiver: "ops-team".into(),
            content: json!({"title": "Order shipped", "order": {"id": 42, "items": ["a", "b"]}}),
            accepted_at: Utc::now(),
            send_at: None,
            timezone: None,
        }
    }

    #[test]
    fn signature_matches_a_vector_computed_independently() {
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec_test_2024",
        //   b"1700000000." + BODY, hashlib.sha256).hexdigest())'
        let body = br#"{"message_id":"0190b6a4-0000-7000-8000-000000000001","receiver":"ops"}"#;
        assert_eq!(
            sign(b"whsec_test_2024", 1_700_000_000, body),
            "v1=37f19590ce8aaee031b2f191264831c796806bb23daf59ebd45304d96a790f1f"
        );
    }

    #[tokio::test]
    async fn posts_a_signed_json_body_that_the_receiver_verifies() {
        let (base, seen) = start_receiver(SECRET).await;
        let sender = WebhookSender::new(http::client());
        let r = record();
        let mut config = account(format!("{base}/ok"));
        config["headers"] = json!({"Authorization": "Bearer abc"});
        let outcome = sender.send(&r, 3, &config).await.unwrap();
        assert_eq!(outcome.vendor, "webhook");
        assert_eq!(outcome.vendor_message_id.as_deref(), Some("rcv-42"));

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let Seen {
            path,
            headers,
            body,
        } = &seen[0];
        assert_eq!(path, "/ok");
        assert_eq!(headers["x-herald-message-id"], r.message_id.to_string());
        assert_eq!(headers["authorization"], "Bearer abc");
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut expected = [
            "message_id",
            "request_id",
            "biz_id",
            "app",
            "template_id",
            "receiver",
            "content",
            "ts",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(body["message_id"], r.message_id.to_string());
        assert_eq!(body["request_id"], "req-9");
        assert_eq!(body["biz_id"], "order-42");
        assert_eq!(body["app"], "shop");
        assert_eq!(body["template_id"], 11);
        assert_eq!(body["receiver"], "ops-team");
        assert_eq!(body["content"], r.content);
        let ts = DateTime::parse_from_rfc3339(body["ts"].as_str().unwrap()).unwrap();
        let header_ts: i64 = headers["x-herald-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ts.timestamp(), header_ts);
    }

    #[tokio::test]
    async fn statuses_map_to_retryable_or_permanent() {
        let (base, seen) = start_receiver(SECRET).await;
        let sender = WebhookSender::new(http::client());
        let r = record();

        let err = sender
            .send(&r, 3, &account(format!("{base}/unavailable")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "webhook_5xx");
        assert!(
            err.detail().contains("503") && err.detail().contains("maintenance"),
            "{err}"
        );
        let SendError::Retryable { retry_after, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(retry_after, Some(Duration::from_secs(7)));

        let err = sender
            .send(&r, 3, &account(format!("{base}/limited")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "webhook_429");
        let SendError::Retryable { retry_after, .. } = err else {
            panic!("{err:?}")
        };
        let after = retry_after.expect("Retry-After as an HTTP date");
        assert!((25..=30).contains(&after.as_secs()), "{after:?}");

        let err = sender
            .send(&r, 3, &account(format!("{base}/gone")))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "webhook_4xx");
        assert!(err.detail().contains("410"), "{err}");

        // A secret the receiver does not know: it answers 401, which retrying cannot fix.
        let mut wrong = account(format!("{base}/ok"));
        wrong["secret"] = json!("not-the-receivers-secret");
        let err = sender.send(&r, 3, &wrong).await.unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "webhook_4xx");
        assert!(
            err.detail().contains("401") && err.detail().contains("bad signature"),
            "{err}"
        );

        assert_eq!(
            seen.lock().unwrap().len(),
            3,
            "only verified requests are recorded"
        );
    }

    #[tokio::test]
    async fn timeouts_and_refused_connections_are_retryable() {
        let (base, _seen) = start_receiver(SECRET).await;
        let sender = WebhookSender::new(http::client());
        let mut config = account(format!("{base}/slow"));
        config["timeout_ms"] = json!(300);
        let started = std::time::Instant::now();
        let err = sender.send(&record(), 3, &config).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "webhook_timeout");
        assert!(started.elapsed() < Duration::from_secs(3));

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = sender
            .send(
                &record(),
                3,
                &account(format!("http://127.0.0.1:{port}/hook?token=s3cr3t")),
            )
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "webhook_connect");
        assert!(!err.detail().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let a = WebhookAccount::parse(&json!({"url": "https://h.example.com/x",
                                                  "secret": "hunter2"}))
        .unwrap();
        assert_eq!(a.timeout, Duration::from_millis(5000));
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );

        let bad = [
            json!({"secret": "hunter2"}),
            json!({"url": "ftp://h.example.com/x", "secret": "hunter2"}),
            json!({"url": "not a url", "secret": "hunter2"}),
            json!({"url": "https://h.example.com/x"}),
            json!({"url": "https://h.example.com/x", "secret": ""}),
            json!({"url": "https://h.example.com/x", "secret": 1234}),
            json!({"url": "https://h.example.com/x", "secret": "hunter2", "timeout_ms": 0}),
            json!({"url": "https://h.example.com/x", "secret": "hunter2", "extra": 1}),
            json!({"url": "https://h.example.com/x", "secret": "hunter2",
                   "headers": {"X-Herald-Signature": "v1=forged"}}),
            json!({"url": "https://h.example.com/x", "secret": "hunter2",
                   "headers": {"Content-Type": "text/plain"}}),
            json!({"url": "https://h.example.com/x", "secret": "hunter2",
                   "headers": {"bad name": "x"}}),
        ];
        for config in bad {
            let err = WebhookAccount::parse(&config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("1234"),
                "{config}: {err}"
            );
        }
    }
}

//! App push through GeTui (个推) RestAPI v2: the `push` channel. Receivers are GeTui client ids
//! (`cid`), which the app's GeTui SDK reports to the app's own server.
//!
//! # Account
//!
//! ```json
//! {"app_id": "xXmjbbab3b5F1m7wAYZoG2", "app_key": "…", "master_secret": "…",
//!  "base_url": "https://restapi.getui.com"}
//! ```
//!
//! - `app_id`, `app_key`, `master_secret`: the app's credentials from the GeTui developer
//!   centre (`master_secret` is never shown in errors or logs).
//! - `base_url` (optional, default `https://restapi.getui.com`): the API origin; every path is
//!   `<base_url>/v2/<app_id>/…`.
//!
//! # Content
//!
//! A notification the system shows:
//!
//! ```json
//! {"notification": {"title": "Order shipped", "body": "Order {$order} is on its way",
//!                   "click_type": "url", "url": "https://shop.example.com/o/{$order}"},
//!  "ttl_ms": 7200000,
//!  "push_channel": {"ios": {"type": "notify", "aps": {"alert": {"title": "…", "body": "…"}}}}}
//! ```
//!
//! or a transmission (透传) message handed to the app as it is:
//!
//! ```json
//! {"transmission": "{\"kind\":\"refresh\"}"}
//! ```
//!
//! - Exactly one of `notification` and `transmission`.
//! - `notification` needs `title`, `body` and `click_type`: `intent` (needs `intent`), `url`
//!   (needs `url`), `payload` or `payload_custom` (need `payload`), `startapp` or `none`. It may
//!   also set GeTui's other notification fields: `big_text`, `big_image`, `logo`, `logo_url`,
//!   `channel_id`, `channel_name`, `ring_name`, `thread_id` (strings) and `channel_level`,
//!   `notify_id`, `badge_add_num` (numbers or strings). Lengths are left to GeTui to check.
//! - `ttl_ms` (optional): how long GeTui keeps the message for an offline device, `-1` (not at
//!   all) to 259200000 (3 days); GeTui's default is 2 hours. Sent as `settings.ttl`.
//! - `push_channel` (optional): the vendor-channel (`android`, `ios`, …) message, passed to
//!   GeTui as it is.
//!
//! # Requests
//!
//! 1. Token: `POST /v2/<app_id>/auth` with `{"sign", "timestamp", "appkey"}`, where `timestamp`
//!    is the current time in milliseconds (a string) and `sign` the lowercase hex SHA-256 of
//!    `appkey + timestamp + master_secret` ([`sign`]). The answer's `data.token` is cached in the
//!    shared token cache under `getui:<app_id>` until `data.expire_time` (a millisecond epoch,
//!    about a day ahead) and sent as the `token` header of every other request.
//! 2. One receiver: `POST /v2/<app_id>/push/single/cid` with `{"request_id", "settings"?,
//!    "audience": {"cid": [cid]}, "push_message", "push_channel"?}`. `request_id` is the herald
//!    message id without dashes (32 hex digits): GeTui drops a request whose `request_id` it has
//!    seen, so a retried message is not shown twice. The answer `data` is
//!    `{"<taskid>": {"<cid>": "<status>"}}`; the task id is the vendor message id.
//! 3. Several receivers of identical content (`send_batch`, up to 1000 a request): `POST
//!    /v2/<app_id>/push/list/message` with `{"request_id", "settings"?, "push_message",
//!    "push_channel"?}` creates the message (`data.taskid`), then `POST
//!    /v2/<app_id>/push/list/cid` with `{"audience": {"cid": [...]}, "taskid", "is_async":
//!    false}` sends it and answers `{"<taskid>": {"<cid>": "<status>", ...}}`. Here `request_id`
//!    is the first 32 hex digits of the SHA-256 of the batch's message ids joined by `,`. A cid
//!    appears once per request: a repeated receiver goes into another request.
//!
//! # Answers
//!
//! Every answer is `{"code", "msg", "data"}`; `code` 0 is success. A cid's status
//! `successed_online` or `successed_offline` is a sent message; `successed_ignore` (the device
//! has been inactive for 90 days, GeTui does not deliver) is that receiver's permanent
//! `getui_ignored`, and a cid without a status is its permanent `getui_no_status`. When a list
//! push is refused because a cid is invalid (`20001 target user is invalid`), each receiver is
//! sent on its own, so that only the invalid ones fail.
//!
//! Error codes are `getui_<code>`, the detail GeTui's `msg`:
//! - `10001` (token invalid or expired): the token is dropped, a new one fetched and the request
//!   sent once more; a second `10001` is retryable.
//! - Retryable: `2` (service starting), `10003` (auth calls per minute), `10005` (calls per
//!   minute), `30004`, `30006`–`30015`, `30018` (daily and per-minute push and tag quotas) and
//!   `30019` (system busy); `Retry-After` is honoured when GeTui sends it.
//! - Permanent: `1` (not JSON), `301` (wrong domain for the app's data centre), `10002` (app id or
//!   IP black-listed), `10004`, `20001` (invalid parameter or cid), `22001`, `22002`, `23001`,
//!   `30000`–`30003`, `30005`, `30016`, `30017` (package permissions).
//! - Other codes follow the HTTP status (`408`, `429`, `5xx` retryable); answers that are not
//!   GeTui's JSON map by HTTP status like every vendor ([`http::status_error`]).
//!
//! # Documentation used
//!
//! - https://docs.getui.com/getui/server/rest_v2/token (auth, sign, token lifetime, `10001`)
//! - https://docs.getui.com/getui/server/rest_v2/push (single and list push, request and answer)
//! - https://docs.getui.com/getui/server/rest_v2/common_args (`token` header, answer envelope,
//!   `push_message`, `push_channel`)
//! - https://docs.getui.com/getui/server/rest_v2/code (return codes and their HTTP statuses)

use super::http::{self, bad_account, bad_content};
use super::token::{FreshToken, TokenCache};
use super::{SendError, SendOutcome, Sender};
use async_trait::async_trait;
use chrono::Utc;
use futures::stream::{self, StreamExt};
use herald_core::config::Secret;
use herald_core::{Channel, MessageRecord};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// The vendor name on delivery events and the prefix of error codes.
const VENDOR: &str = "getui";

/// GeTui's API origin.
const DEFAULT_BASE_URL: &str = "https://restapi.getui.com";

/// Most client ids one list push takes.
pub const MAX_BATCH: usize = 1000;

/// GeTui's "token invalid or expired" code.
const TOKEN_INVALID: i64 = 10001;

/// GeTui's "invalid parameter" code, and its message for a cid that is not the app's.
const INVALID_PARAM: i64 = 20001;
const TARGET_INVALID: &str = "target user is invalid";

/// The longest offline time GeTui takes: 3 days, in milliseconds.
const MAX_TTL_MS: i64 = 3 * 24 * 3600 * 1000;

/// Single pushes sent at once when a refused list push is split up.
const SPLIT_CONCURRENCY: usize = 8;

/// The `click_type`s of a notification, and the field each needs.
const CLICK_TYPES: [(&str, Option<&str>); 6] = [
    ("intent", Some("intent")),
    ("url", Some("url")),
    ("payload", Some("payload")),
    ("payload_custom", Some("payload")),
    ("startapp", None),
    ("none", None),
];

/// Notification fields that are strings.
const NOTIFICATION_STRINGS: [&str; 14] = [
    "title",
    "body",
    "click_type",
    "intent",
    "url",
    "payload",
    "big_text",
    "big_image",
    "logo",
    "logo_url",
    "channel_id",
    "channel_name",
    "ring_name",
    "thread_id",
];

/// Notification fields that are numbers (GeTui's SDKs also send them as strings).
const NOTIFICATION_NUMBERS: [&str; 3] = ["channel_level", "notify_id", "badge_add_num"];

/// The auth request's `sign`: the lowercase hex SHA-256 of `app_key`, the millisecond
/// `timestamp` in decimal and `master_secret`, concatenated in that order.
pub fn sign(app_key: &str, timestamp_ms: i64, master_secret: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(app_key.as_bytes());
    digest.update(timestamp_ms.to_string().as_bytes());
    digest.update(master_secret.as_bytes());
    hex::encode(digest.finalize())
}

/// Checks a GeTui account config (see the module docs); only the push channel uses GeTui.
pub fn check_account(channel: Channel, config: &Value) -> Result<(), String> {
    if channel != Channel::Push {
        return Err(format!("GeTui does not serve the {channel:?} channel"));
    }
    GetuiAccount::parse(config).map(drop)
}

/// Checks a push template's content (see the module docs).
pub fn check_content(channel: Channel, content: &Value) -> Result<(), String> {
    if channel != Channel::Push {
        return Err(format!("GeTui does not serve the {channel:?} channel"));
    }
    PushContent::parse(content).map(drop)
}

/// A GeTui account, parsed from its stored config.
#[derive(Debug, Clone)]
pub struct GetuiAccount {
    pub app_id: String,
    pub app_key: String,
    pub master_secret: Secret,
    /// `<base_url>/v2/<app_id>`, without a trailing slash.
    api: String,
}

/// The config as stored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAccount {
    app_id: String,
    app_key: String,
    master_secret: Secret,
    base_url: Option<String>,
}

impl GetuiAccount {
    /// Parses and checks an account config; the error says what is wrong and never quotes the
    /// master secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        if !config.is_object() {
            return Err("a GeTui account must be a JSON object".into());
        }
        // serde quotes an ill-typed value in its error: check the secret's type first.
        if config.get("master_secret").is_some_and(|s| !s.is_string()) {
            return Err("`master_secret` must be a string".into());
        }
        let stored: StoredAccount =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        // The app id is a path segment: keep it to the characters GeTui's ids are made of.
        if stored.app_id.is_empty()
            || !stored
                .app_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("`app_id` must be letters, digits, `-` or `_`".into());
        }
        if stored.app_key.trim().is_empty() {
            return Err("`app_key` is empty".into());
        }
        if stored.master_secret.expose().is_empty() {
            return Err("`master_secret` is empty".into());
        }
        let base = stored.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let url = Url::parse(base).map_err(|e| format!("`base_url`: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err("`base_url` must be an http or https URL with a host".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("`base_url` may not have a query or fragment".into());
        }
        let api = format!("{}/v2/{}", base.trim_end_matches('/'), stored.app_id);
        Ok(GetuiAccount {
            app_id: stored.app_id,
            app_key: stored.app_key,
            master_secret: stored.master_secret,
            api,
        })
    }

    /// The URL of `path` (no leading slash) for this app.
    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.api)
    }

    /// The token cache key.
    fn token_key(&self) -> String {
        format!("{VENDOR}:{}", self.app_id)
    }
}

/// A checked push content: what goes into a push request besides the audience.
#[derive(Debug, Clone, PartialEq)]
struct PushContent {
    /// `{"notification": {...}}` or `{"transmission": "..."}`.
    push_message: Value,
    ttl_ms: Option<i64>,
    push_channel: Option<Value>,
}

impl PushContent {
    fn parse(content: &Value) -> Result<Self, String> {
        let obj = content.as_object().ok_or("content must be a JSON object")?;
        if let Some(k) = obj.keys().find(|k| {
            !["notification", "transmission", "ttl_ms", "push_channel"].contains(&k.as_str())
        }) {
            return Err(format!(
                "unknown push content field `{k}` (expected notification, transmission, ttl_ms, \
                 push_channel)"
            ));
        }
        let push_message = match (obj.get("notification"), obj.get("transmission")) {
            (Some(n), None) => json!({"notification": check_notification(n)?}),
            (None, Some(Value::String(t))) if !t.is_empty() => json!({"transmission": t}),
            (None, Some(Value::String(_))) => return Err("`transmission` is empty".into()),
            (None, Some(_)) => return Err("`transmission` must be a string".into()),
            (Some(_), Some(_)) => {
                return Err("give either `notification` or `transmission`, not both".into());
            }
            (None, None) => {
                return Err("a push template needs `notification` or `transmission`".into());
            }
        };
        let ttl_ms = match obj.get("ttl_ms") {
            None => None,
            Some(v) => match v.as_i64() {
                Some(ttl) if (-1..=MAX_TTL_MS).contains(&ttl) => Some(ttl),
                _ => {
                    return Err(format!(
                        "`ttl_ms` must be an integer from -1 to {MAX_TTL_MS} (3 days)"
                    ));
                }
            },
        };
        let push_channel = match obj.get("push_channel") {
            None => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(_) => return Err("`push_channel` must be a JSON object".into()),
        };
        Ok(PushContent {
            push_message,
            ttl_ms,
            push_channel,
        })
    }

    /// The request body's fields other than `audience`.
    fn body(&self, request_id: &str) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("request_id".into(), request_id.into());
        if let Some(ttl) = self.ttl_ms {
            body.insert("settings".into(), json!({"ttl": ttl}));
        }
        body.insert("push_message".into(), self.push_message.clone());
        if let Some(channel) = &self.push_channel {
            body.insert("push_channel".into(), channel.clone());
        }
        body
    }
}

/// Checks a `notification` object and returns it as it is.
fn check_notification(n: &Value) -> Result<&Value, String> {
    let obj = n
        .as_object()
        .ok_or("`notification` must be a JSON object")?;
    for (k, v) in obj {
        let ok = if NOTIFICATION_STRINGS.contains(&k.as_str()) {
            v.is_string()
        } else if NOTIFICATION_NUMBERS.contains(&k.as_str()) {
            v.is_number() || v.is_string()
        } else {
            return Err(format!("unknown notification field `{k}`"));
        };
        if !ok {
            return Err(format!("`notification.{k}` has the wrong type"));
        }
    }
    let text = |k: &str| obj.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    for k in ["title", "body", "click_type"] {
        text(k).ok_or(format!("a notification needs `{k}`"))?;
    }
    let click_type = text("click_type").unwrap_or_default();
    let (_, needs) = CLICK_TYPES
        .iter()
        .find(|(t, _)| *t == click_type)
        .ok_or(format!(
            "`notification.click_type` must be intent, url, payload, payload_custom, startapp \
             or none, not `{click_type}`"
        ))?;
    if let Some(field) = needs
        && text(field).is_none()
    {
        return Err(format!(
            "a notification with click_type `{click_type}` needs `{field}`"
        ));
    }
    Ok(n)
}

/// GeTui's answer envelope.
#[derive(Deserialize)]
struct Envelope {
    code: i64,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    data: Value,
}

/// A parsed answer and what came with it.
struct Reply {
    status: StatusCode,
    retry_after: Option<Duration>,
    code: i64,
    msg: String,
    data: Value,
}

impl Reply {
    /// The answer's `data` on success, or the error its code means.
    fn into_data(self) -> Result<Value, SendError> {
        if self.code == 0 && self.status.is_success() {
            Ok(self.data)
        } else {
            Err(code_error(
                self.code,
                &self.msg,
                self.status,
                self.retry_after,
            ))
        }
    }
}

/// The error a non-zero GeTui code means (see the module docs).
fn code_error(
    code: i64,
    msg: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
) -> SendError {
    let retryable = match code {
        2 | TOKEN_INVALID | 10003 | 10005 | 30004 | 30006..=30015 | 30018 | 30019 => true,
        1
        | 301
        | 404
        | 405
        | 10002
        | 10004
        | INVALID_PARAM
        | 22001
        | 22002
        | 23001
        | 30000..=30003
        | 30005
        | 30016
        | 30017 => false,
        // Undocumented (0 with an error status included): the HTTP status decides.
        _ => matches!(status.as_u16(), 408 | 429 | 500..=599),
    };
    let code_text = format!("{VENDOR}_{code}");
    let detail = if msg.is_empty() {
        format!("GeTui answered code {code} (HTTP {status})")
    } else {
        format!("GeTui answered code {code}: {msg}")
    };
    if retryable {
        SendError::Retryable {
            code: code_text,
            detail,
            retry_after,
        }
    } else {
        SendError::Permanent {
            code: code_text,
            detail,
        }
    }
}

/// A `2xx` answer GeTui's API would not give.
fn bad_answer(detail: impl Into<String>) -> SendError {
    SendError::Retryable {
        code: format!("{VENDOR}_bad_answer"),
        detail: detail.into(),
        retry_after: None,
    }
}

fn outcome(taskid: &str) -> SendOutcome {
    SendOutcome {
        vendor: VENDOR.into(),
        vendor_message_id: Some(taskid.to_string()),
        billing_units: None,
    }
}

/// A receiver's result from its status in a push answer.
fn cid_result(taskid: &str, status: Option<&Value>) -> Result<SendOutcome, SendError> {
    match status.and_then(Value::as_str) {
        Some("successed_online" | "successed_offline") => Ok(outcome(taskid)),
        Some("successed_ignore") => Err(SendError::Permanent {
            code: format!("{VENDOR}_ignored"),
            detail: "GeTui did not deliver: the client id has been inactive for 90 days \
                     (successed_ignore)"
                .into(),
        }),
        Some(other) => Err(SendError::Permanent {
            code: format!("{VENDOR}_status"),
            detail: format!("GeTui answered the status `{other}` for this client id"),
        }),
        None => Err(SendError::Permanent {
            code: format!("{VENDOR}_no_status"),
            detail: format!("GeTui's answer for task {taskid} has no status for this client id"),
        }),
    }
}

/// The list push `request_id`: the first 32 hex digits of the SHA-256 of the message ids
/// joined by `,` (the same batch gets the same id when it is retried).
fn list_request_id(records: &[&MessageRecord]) -> String {
    let ids: Vec<String> = records.iter().map(|r| r.message_id.to_string()).collect();
    let digest = hex::encode(Sha256::digest(ids.join(",").as_bytes()));
    digest[..32].to_string()
}

/// Records sharing one push request: identical content, distinct client ids.
struct Group<'a> {
    content: &'a Value,
    parsed: Arc<PushContent>,
    members: Vec<usize>,
    cids: HashSet<&'a str>,
}

/// The GeTui client.
pub struct GetuiSender {
    client: Client,
    tokens: Arc<TokenCache>,
}

impl GetuiSender {
    /// A client over the shared HTTP pool and token cache.
    pub fn new(client: Client, tokens: Arc<TokenCache>) -> Self {
        GetuiSender { client, tokens }
    }

    /// Posts `body` as JSON and parses GeTui's answer, whatever its HTTP status; answers that
    /// are not GeTui's JSON become HTTP errors.
    async fn post(&self, url: &str, token: Option<&str>, body: &Value) -> Result<Reply, SendError> {
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json;charset=utf-8")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.header("token", token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| http::request_error(VENDOR, e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| http::request_error(VENDOR, e))?;
        match serde_json::from_slice::<Envelope>(&bytes) {
            Ok(envelope) => Ok(Reply {
                status,
                retry_after: http::retry_after(&headers),
                code: envelope.code,
                msg: envelope.msg.unwrap_or_default(),
                data: envelope.data,
            }),
            Err(_) if !status.is_success() => {
                let detail = format!("HTTP {status}{}", http::excerpt(&bytes));
                Err(http::status_error(VENDOR, status, &headers, detail))
            }
            Err(e) => Err(bad_answer(format!("the answer is not GeTui's JSON: {e}"))),
        }
    }

    /// Fetches a token from `/auth`.
    async fn fetch_token(&self, account: &GetuiAccount) -> Result<FreshToken, SendError> {
        let timestamp = Utc::now().timestamp_millis();
        let body = json!({
            "sign": sign(&account.app_key, timestamp, account.master_secret.expose()),
            "timestamp": timestamp.to_string(),
            "appkey": account.app_key,
        });
        let reply = self.post(&account.url("auth"), None, &body).await?;
        if reply.code == TOKEN_INVALID {
            // No token was sent: the credentials themselves were refused.
            return Err(SendError::Permanent {
                code: format!("{VENDOR}_{TOKEN_INVALID}"),
                detail: format!("GeTui refused the credentials: {}", reply.msg),
            });
        }
        let data = reply.into_data()?;
        let token = data
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad_answer("the auth answer has no token"))?;
        let expire_time = match data.get("expire_time") {
            Some(Value::String(s)) => s.parse::<i64>().ok(),
            Some(v) => v.as_i64(),
            None => None,
        }
        .ok_or_else(|| bad_answer("the auth answer has no expire_time"))?;
        let left_ms = expire_time
            .saturating_sub(Utc::now().timestamp_millis())
            .max(0);
        Ok(FreshToken {
            token: token.to_string(),
            expires_in: Duration::from_millis(left_ms.unsigned_abs()),
        })
    }

    /// The app's token, from the cache or `/auth`.
    async fn token(&self, account: &GetuiAccount) -> Result<String, SendError> {
        self.tokens
            .get(&account.token_key(), || self.fetch_token(account))
            .await
    }

    /// Posts `body` to `path` with the app's token and returns the answer's `data`; a rejected
    /// token is dropped and the request sent once more with a new one.
    async fn call(
        &self,
        account: &GetuiAccount,
        path: &str,
        body: &Value,
    ) -> Result<Value, SendError> {
        let url = account.url(path);
        let mut retried = false;
        loop {
            let token = self.token(account).await?;
            let reply = self.post(&url, Some(&token), body).await?;
            if reply.code == TOKEN_INVALID {
                self.tokens.invalidate(&account.token_key(), &token).await?;
                if !retried {
                    retried = true;
                    continue;
                }
            }
            return reply.into_data();
        }
    }

    /// Sends one record through `push/single/cid`.
    async fn push_single(
        &self,
        account: &GetuiAccount,
        record: &MessageRecord,
        content: &PushContent,
    ) -> Result<SendOutcome, SendError> {
        let mut body = content.body(&record.message_id.0.simple().to_string());
        body.insert("audience".into(), json!({"cid": [record.receiver]}));
        let data = self
            .call(account, "push/single/cid", &Value::Object(body))
            .await?;
        let tasks = data
            .as_object()
            .ok_or_else(|| bad_answer("the push answer's data is not an object"))?;
        let (taskid, statuses) = tasks
            .iter()
            .find(|(_, s)| s.get(&record.receiver).is_some())
            .or_else(|| tasks.iter().next())
            .ok_or_else(|| bad_answer("the push answer has no task id"))?;
        cid_result(taskid, statuses.get(&record.receiver))
    }

    /// Sends records of identical content, with distinct receivers, through a list push; one
    /// result per record.
    async fn push_list(
        &self,
        account: &GetuiAccount,
        records: &[&MessageRecord],
        content: &PushContent,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let all = |e: SendError| -> Vec<Result<SendOutcome, SendError>> {
            records.iter().map(|_| Err(e.clone())).collect()
        };
        let message = Value::Object(content.body(&list_request_id(records)));
        let taskid = match self.call(account, "push/list/message", &message).await {
            Ok(data) => match data.get("taskid").and_then(Value::as_str) {
                Some(t) if !t.is_empty() => t.to_string(),
                _ => return all(bad_answer("the message answer has no taskid")),
            },
            Err(e) => return all(e),
        };
        let cids: Vec<&str> = records.iter().map(|r| r.receiver.as_str()).collect();
        let push = json!({"audience": {"cid": cids}, "taskid": taskid, "is_async": false});
        match self.call(account, "push/list/cid", &push).await {
            Ok(data) => {
                let statuses = data.get(&taskid).or_else(|| match data.as_object() {
                    Some(tasks) if tasks.len() == 1 => tasks.values().next(),
                    _ => None,
                });
                records
                    .iter()
                    .map(|r| cid_result(&taskid, statuses.and_then(|s| s.get(&r.receiver))))
                    .collect()
            }
            // One bad cid refuses the list: send each on its own so only the bad ones fail.
            Err(e)
                if e.code() == format!("{VENDOR}_{INVALID_PARAM}")
                    && e.detail().contains(TARGET_INVALID) =>
            {
                let singles: Vec<_> = records
                    .iter()
                    .map(|r| self.push_single(account, r, content))
                    .collect();
                stream::iter(singles)
                    .buffered(SPLIT_CONCURRENCY)
                    .collect()
                    .await
            }
            Err(e) => all(e),
        }
    }
}

#[async_trait]
impl Sender for GetuiSender {
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn send(
        &self,
        record: &MessageRecord,
        account_id: i64,
        account: &Value,
    ) -> Result<SendOutcome, SendError> {
        self.send_batch(&[record], account_id, account)
            .await
            .pop()
            .expect("one result per record")
    }

    async fn send_batch(
        &self,
        records: &[&MessageRecord],
        _account_id: i64,
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let account = match GetuiAccount::parse(account) {
            Ok(a) => a,
            Err(e) => {
                return records
                    .iter()
                    .map(|_| Err(bad_account(e.clone())))
                    .collect();
            }
        };
        let mut results: Vec<Option<Result<SendOutcome, SendError>>> = vec![None; records.len()];
        let mut groups: Vec<Group> = Vec::new();
        for (i, record) in records.iter().enumerate() {
            if record.receiver.is_empty() {
                results[i] = Some(Err(SendError::Permanent {
                    code: format!("{VENDOR}_bad_receiver"),
                    detail: "the receiver (a GeTui client id) is empty".into(),
                }));
                continue;
            }
            let cid = record.receiver.as_str();
            if let Some(group) = groups.iter_mut().find(|g| {
                g.content == &record.content && !g.cids.contains(cid) && g.members.len() < MAX_BATCH
            }) {
                group.members.push(i);
                group.cids.insert(cid);
                continue;
            }
            // Content already checked for another group is not parsed again.
            let parsed = match groups.iter().find(|g| g.content == &record.content) {
                Some(g) => Arc::clone(&g.parsed),
                None => match PushContent::parse(&record.content) {
                    Ok(p) => Arc::new(p),
                    Err(e) => {
                        results[i] = Some(Err(bad_content(e)));
                        continue;
                    }
                },
            };
            groups.push(Group {
                content: &record.content,
                parsed,
                members: vec![i],
                cids: HashSet::from([cid]),
            });
        }
        for group in &groups {
            let members: Vec<&MessageRecord> = group.members.iter().map(|&i| records[i]).collect();
            let sent = match members.as_slice() {
                [one] => vec![self.push_single(&account, one, &group.parsed).await],
                _ => self.push_list(&account, &members, &group.parsed).await,
            };
            for (&i, result) in group.members.iter().zip(sent) {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every record has a result"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::testkit::{self, Answer, Captured, VendorServer};
    use axum::http::Method;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    const APP_ID: &str = "AppId123";
    const APP_KEY: &str = "AppKey456";
    const MASTER: &str = "MasterSecret789";

    fn account(url: &str) -> Value {
        json!({"app_id": APP_ID, "app_key": APP_KEY, "master_secret": MASTER, "base_url": url})
    }

    /// GeTui's JSON answer with an HTTP status.
    fn vendor(status: u16, body: Value) -> Answer {
        Answer {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    /// The sorted keys of a JSON object.
    fn keys(v: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// The vendor's `/auth`: verifies the sign with its own SHA-256 (not `sign`) and issues
    /// `tok-1`, `tok-2`, ... valid for a day.
    fn auth(c: &Captured, issued: &AtomicU32) -> Answer {
        let body = c.json();
        let Some(ts) = body["timestamp"].as_str() else {
            return vendor(400, json!({"code": 20001, "msg": "timestamp type error"}));
        };
        let now = Utc::now().timestamp_millis();
        let fresh = ts.len() == 13 && ts.parse::<i64>().is_ok_and(|t| (now - t).abs() < 300_000);
        let mut digest = Sha256::new();
        digest.update(format!("{APP_KEY}{ts}{MASTER}"));
        let expected: String = digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !fresh || body["appkey"] != APP_KEY || body["sign"] != expected.as_str() {
            return vendor(400, json!({"code": 20001, "msg": "sign is invalid"}));
        }
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        Answer::json(json!({"code": 0, "msg": "success", "data": {
            "expire_time": (now + 86_400_000).to_string(), "token": format!("tok-{n}")}}))
    }

    /// A GeTui stand-in: `/auth` as above, then `push` for every other request whose `token`
    /// header is the latest token issued and not in `rejected`.
    async fn getui(
        rejected: &'static [&'static str],
        push: impl Fn(&Captured) -> Answer + Send + Sync + 'static,
    ) -> (VendorServer, Arc<AtomicU32>) {
        let issued = Arc::new(AtomicU32::new(0));
        let count = Arc::clone(&issued);
        let server = VendorServer::start(move |c| {
            if c.path == format!("/v2/{APP_ID}/auth") {
                return auth(c, &count);
            }
            let latest = format!("tok-{}", count.load(Ordering::SeqCst));
            let token = c.header("token");
            if token != latest || rejected.contains(&token) {
                return vendor(401, json!({"code": 10001, "msg": "token错误/失效"}));
            }
            push(c)
        })
        .await;
        (server, issued)
    }

    async fn sender() -> (tempfile::TempDir, GetuiSender) {
        let (dir, store) = testkit::store().await;
        let sender = GetuiSender::new(http::client(), Arc::new(TokenCache::new(store)));
        (dir, sender)
    }

    fn notification() -> Value {
        json!({"notification": {"title": "Order shipped", "body": "Order 42 is on its way",
                                "click_type": "url", "url": "https://shop.example.com/o/42"},
               "ttl_ms": 3_600_000,
               "push_channel": {"ios": {"type": "notify",
                                        "aps": {"alert": {"title": "Shipped", "body": "42"}}}}})
    }

    /// A single push answer for the cid in the request's audience.
    fn single_ok(c: &Captured, taskid: &str, status: &str) -> Answer {
        let cid = c.json()["audience"]["cid"][0].as_str().unwrap().to_string();
        Answer::json(json!({"code": 0, "msg": "", "data": {taskid: {cid: status}}}))
    }

    #[test]
    fn sign_matches_a_vector_computed_independently() {
        // python3 -c 'import hashlib; print(hashlib.sha256(b"YZkTKbz91l84HyM0TGlb38"
        //   + b"1608172111917" + b"mS3cr3tExampleMasterSecret").hexdigest())'
        assert_eq!(
            sign(
                "YZkTKbz91l84HyM0TGlb38",
                1_608_172_111_917,
                "mS3cr3tExampleMasterSecret"
            ),
            "08dc982e7f59e88a39669af8701b326b9221fa000c39c7477c3025bab3c610ce"
        );
    }

    #[test]
    fn list_request_id_matches_a_vector_computed_independently() {
        // python3 -c 'import hashlib; print(hashlib.sha256(("0190b6a4-0000-7000-8000-"
        //   "000000000001,0190b6a4-0000-7000-8000-000000000002").encode()).hexdigest()[:32])'
        let mut a = testkit::record(Channel::Push, "c1", json!({}));
        let mut b = a.clone();
        a.message_id = "0190b6a4-0000-7000-8000-000000000001".parse().unwrap();
        b.message_id = "0190b6a4-0000-7000-8000-000000000002".parse().unwrap();
        assert_eq!(
            list_request_id(&[&a, &b]),
            "e674395a23b7eaeb30e7966baeb07597"
        );
    }

    #[tokio::test]
    async fn single_push_sends_every_documented_field() {
        let (server, issued) =
            getui(&[], |c| single_ok(c, "RASS_0611_abc", "successed_online")).await;
        let (_dir, sender) = sender().await;
        let record = testkit::record(Channel::Push, "cid-0001", notification());
        let outcome = sender
            .send(&record, 1, &account(&server.url))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            SendOutcome {
                vendor: "getui".into(),
                vendor_message_id: Some("RASS_0611_abc".into()),
                billing_units: None,
            }
        );
        assert_eq!(issued.load(Ordering::SeqCst), 1);

        let seen = server.requests();
        assert_eq!(seen.len(), 2);
        let auth = &seen[0];
        assert_eq!(auth.method, Method::POST);
        assert_eq!(auth.path, "/v2/AppId123/auth");
        assert_eq!(auth.query, "");
        assert!(auth.header("content-type").starts_with("application/json"));
        assert_eq!(auth.header("token"), "");
        let body = auth.json();
        assert_eq!(keys(&body), ["appkey", "sign", "timestamp"]);
        assert_eq!(body["appkey"], APP_KEY);

        let push = &seen[1];
        assert_eq!(push.method, Method::POST);
        assert_eq!(push.path, "/v2/AppId123/push/single/cid");
        assert_eq!(push.header("token"), "tok-1");
        assert!(push.header("content-type").starts_with("application/json"));
        let body = push.json();
        assert_eq!(
            keys(&body),
            [
                "audience",
                "push_channel",
                "push_message",
                "request_id",
                "settings"
            ]
        );
        let request_id = record.message_id.to_string().replace('-', "");
        assert_eq!(body["request_id"], request_id.as_str());
        assert_eq!(request_id.len(), 32);
        assert_eq!(body["settings"], json!({"ttl": 3_600_000}));
        assert_eq!(body["audience"], json!({"cid": ["cid-0001"]}));
        assert_eq!(
            body["push_message"],
            json!({"notification": {"title": "Order shipped", "body": "Order 42 is on its way",
                                    "click_type": "url", "url": "https://shop.example.com/o/42"}})
        );
        assert_eq!(body["push_channel"], notification()["push_channel"]);
    }

    #[tokio::test]
    async fn tokens_are_cached_and_refreshed_once_when_rejected() {
        // The vendor rejects the first token it issued (code 10001, HTTP 401).
        let (server, issued) =
            getui(&["tok-1"], |c| single_ok(c, "RASS_1", "successed_offline")).await;
        let (_dir, sender) = sender().await;
        let config = account(&server.url);
        let content = json!({"transmission": "{\"kind\":\"refresh\"}"});
        let first = testkit::record(Channel::Push, "cid-a", content.clone());
        let second = testkit::record(Channel::Push, "cid-b", content);
        let outcome = sender.send(&first, 1, &config).await.unwrap();
        assert_eq!(outcome.vendor_message_id.as_deref(), Some("RASS_1"));
        assert_eq!(issued.load(Ordering::SeqCst), 2, "a new token after 10001");
        sender.send(&second, 1, &config).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 2, "the new token is cached");

        let seen: Vec<(String, String)> = server
            .requests()
            .iter()
            .map(|c| (c.path.clone(), c.header("token").to_string()))
            .collect();
        let auth = ("/v2/AppId123/auth".to_string(), String::new());
        let push = |t: &str| ("/v2/AppId123/push/single/cid".to_string(), t.to_string());
        assert_eq!(
            seen,
            [
                auth.clone(),
                push("tok-1"),
                auth,
                push("tok-2"),
                push("tok-2")
            ]
        );
        // The retried request is the same request.
        let requests = server.requests();
        assert_eq!(requests[1].json(), requests[3].json());
        assert_eq!(
            requests[3].json()["push_message"],
            json!({"transmission": "{\"kind\":\"refresh\"}"})
        );
        assert!(requests[3].json().get("settings").is_none());
    }

    #[tokio::test]
    async fn a_token_rejected_twice_is_retryable() {
        let (server, issued) = getui(&["tok-1", "tok-2"], |_| unreachable!()).await;
        let (_dir, sender) = sender().await;
        let record = testkit::record(Channel::Push, "cid-a", notification());
        let err = sender
            .send(&record, 1, &account(&server.url))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "getui_10001");
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        assert_eq!(server.requests().len(), 4);
    }

    #[tokio::test]
    async fn list_push_maps_each_receivers_status() {
        let (server, _issued) = getui(&[], |c| match c.path.as_str() {
            "/v2/AppId123/push/list/message" => {
                Answer::json(json!({"code": 0, "msg": "", "data": {"taskid": "RASL_0611_x"}}))
            }
            "/v2/AppId123/push/list/cid" => Answer::json(json!({"code": 0, "msg": "", "data": {
                "RASL_0611_x": {"c1": "successed_online", "c2": "successed_ignore",
                                "c3": "successed_offline"}}})),
            _ => vendor(404, json!({"code": 404, "msg": "url错误"})),
        })
        .await;
        let (_dir, sender) = sender().await;
        let records: Vec<MessageRecord> = ["c1", "c2", "c3"]
            .into_iter()
            .map(|cid| testkit::record(Channel::Push, cid, notification()))
            .collect();
        let refs: Vec<&MessageRecord> = records.iter().collect();
        assert_eq!(sender.max_batch(), 1000);
        let results = sender.send_batch(&refs, 1, &account(&server.url)).await;
        assert_eq!(results.len(), 3);
        assert_eq!(
            results[0].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("RASL_0611_x")
        );
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.code(), "getui_ignored");
        assert!(!err.is_retryable());
        assert_eq!(
            results[2].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("RASL_0611_x")
        );

        let seen = server.requests();
        let paths: Vec<&str> = seen.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/v2/AppId123/auth",
                "/v2/AppId123/push/list/message",
                "/v2/AppId123/push/list/cid"
            ]
        );
        let message = seen[1].json();
        assert_eq!(seen[1].header("token"), "tok-1");
        assert_eq!(
            keys(&message),
            ["push_channel", "push_message", "request_id", "settings"]
        );
        let ids: Vec<String> = records.iter().map(|r| r.message_id.to_string()).collect();
        let mut digest = Sha256::new();
        digest.update(ids.join(","));
        let expected = hex::encode(digest.finalize());
        assert_eq!(message["request_id"], &expected[..32]);
        assert_eq!(message["settings"], json!({"ttl": 3_600_000}));
        assert_eq!(
            message["push_message"],
            json!({"notification": notification()["notification"]})
        );
        assert_eq!(message["push_channel"], notification()["push_channel"]);
        assert_eq!(seen[2].header("token"), "tok-1");
        assert_eq!(
            seen[2].json(),
            json!({"audience": {"cid": ["c1", "c2", "c3"]}, "taskid": "RASL_0611_x",
                   "is_async": false})
        );
    }

    #[tokio::test]
    async fn batches_share_requests_by_content_and_never_repeat_a_cid() {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&bodies);
        let (server, _issued) = getui(&[], move |c| {
            log.lock().unwrap().push((c.path.clone(), c.json()));
            match c.path.as_str() {
                "/v2/AppId123/push/list/message" => {
                    Answer::json(json!({"code": 0, "data": {"taskid": "RASL_1"}}))
                }
                "/v2/AppId123/push/list/cid" => {
                    let cids = c.json()["audience"]["cid"].clone();
                    let statuses: Map<String, Value> = cids
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| (c.as_str().unwrap().to_string(), json!("successed_online")))
                        .collect();
                    Answer::json(json!({"code": 0, "data": {"RASL_1": statuses}}))
                }
                _ => single_ok(c, "RASS_2", "successed_offline"),
            }
        })
        .await;
        let (_dir, sender) = sender().await;
        let a = notification();
        let b = json!({"transmission": "other"});
        let records = [
            testkit::record(Channel::Push, "c1", a.clone()),
            testkit::record(Channel::Push, "c2", b.clone()),
            testkit::record(Channel::Push, "c1", a.clone()),
            testkit::record(Channel::Push, "c3", a.clone()),
            testkit::record(Channel::Push, "c4", json!({"transmission": 5})),
        ];
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let results = sender.send_batch(&refs, 1, &account(&server.url)).await;
        let ids: Vec<Option<&str>> = results
            .iter()
            .map(|r| r.as_ref().ok().and_then(|o| o.vendor_message_id.as_deref()))
            .collect();
        assert_eq!(
            ids,
            [
                Some("RASL_1"),
                Some("RASS_2"),
                Some("RASS_2"),
                Some("RASL_1"),
                None
            ]
        );
        assert_eq!(results[4].as_ref().unwrap_err().code(), "bad_content");

        let bodies = bodies.lock().unwrap();
        let paths: Vec<&str> = bodies.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/v2/AppId123/push/list/message",
                "/v2/AppId123/push/list/cid",
                "/v2/AppId123/push/single/cid",
                "/v2/AppId123/push/single/cid"
            ]
        );
        assert_eq!(bodies[1].1["audience"], json!({"cid": ["c1", "c3"]}));
        assert_eq!(bodies[2].1["audience"], json!({"cid": ["c2"]}));
        assert_eq!(
            bodies[2].1["push_message"],
            json!({"transmission": "other"})
        );
        assert_eq!(bodies[3].1["audience"], json!({"cid": ["c1"]}));
        assert_eq!(
            bodies[3].1["request_id"],
            records[2].message_id.0.simple().to_string()
        );
    }

    #[tokio::test]
    async fn a_list_refused_for_an_invalid_cid_is_sent_one_by_one() {
        let (server, _issued) = getui(&[], |c| match c.path.as_str() {
            "/v2/AppId123/push/list/message" => {
                Answer::json(json!({"code": 0, "data": {"taskid": "RASL_9"}}))
            }
            "/v2/AppId123/push/list/cid" => {
                vendor(400, json!({"code": 20001, "msg": "target user is invalid"}))
            }
            _ if c.json()["audience"]["cid"][0] == "bad" => {
                vendor(400, json!({"code": 20001, "msg": "target user is invalid"}))
            }
            _ => single_ok(c, "RASS_5", "successed_online"),
        })
        .await;
        let (_dir, sender) = sender().await;
        let records: Vec<MessageRecord> = ["c1", "bad", "c3"]
            .into_iter()
            .map(|cid| testkit::record(Channel::Push, cid, notification()))
            .collect();
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let results = sender.send_batch(&refs, 1, &account(&server.url)).await;
        assert_eq!(
            results[0].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("RASS_5")
        );
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.code(), "getui_20001");
        assert!(!err.is_retryable());
        assert!(err.detail().contains("target user is invalid"), "{err}");
        assert_eq!(
            results[2].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("RASS_5")
        );
        let singles: Vec<Value> = server
            .requests()
            .iter()
            .filter(|c| c.path == "/v2/AppId123/push/single/cid")
            .map(|c| c.json()["audience"]["cid"][0].clone())
            .collect();
        assert_eq!(singles.len(), 3);
        for cid in ["c1", "bad", "c3"] {
            assert!(singles.contains(&json!(cid)), "{cid} sent on its own");
        }
    }

    #[tokio::test]
    async fn vendor_codes_map_to_retryable_or_permanent() {
        // The receiver picks the answer.
        let (server, _issued) = getui(&[], |c| {
            match c.json()["audience"]["cid"][0].as_str().unwrap() {
                "busy" => vendor(403, json!({"code": 30019, "msg": "系统繁忙，请稍后重试"})),
                "minute" => vendor(401, json!({"code": 10005, "msg": "每分钟调用频率超限"}))
                    .with_header("retry-after", "30"),
                "quota" => vendor(
                    403,
                    json!({"code": 30009, "msg": "推送次数超过每日推送总数限制"}),
                ),
                "down" => {
                    Answer::status(503, "<html>bad gateway</html>").with_header("retry-after", "7")
                }
                "invalid" => vendor(400, json!({"code": 20001, "msg": "target user is invalid"})),
                "black" => vendor(401, json!({"code": 10002, "msg": "appId或ip在黑名单中"})),
                "odd" => vendor(500, json!({"code": 99999, "msg": "unknown"})),
                _ => Answer::json(json!({"code": 0, "data": "not an object"})),
            }
        })
        .await;
        let (_dir, sender) = sender().await;
        let config = account(&server.url);
        let send = |cid: &'static str| {
            let record = testkit::record(Channel::Push, cid, notification());
            let sender = &sender;
            let config = &config;
            async move { sender.send(&record, 1, config).await.unwrap_err() }
        };

        let err = send("busy").await;
        assert_eq!(err.code(), "getui_30019");
        assert!(err.is_retryable());
        assert!(err.detail().contains("系统繁忙"), "{err}");

        let SendError::Retryable {
            code, retry_after, ..
        } = send("minute").await
        else {
            panic!("10005 is retryable")
        };
        assert_eq!(code, "getui_10005");
        assert_eq!(retry_after, Some(Duration::from_secs(30)));

        let err = send("quota").await;
        assert_eq!(err.code(), "getui_30009");
        assert!(err.is_retryable());

        let SendError::Retryable {
            code,
            retry_after,
            detail,
        } = send("down").await
        else {
            panic!("503 is retryable")
        };
        assert_eq!(code, "getui_5xx");
        assert_eq!(retry_after, Some(Duration::from_secs(7)));
        assert!(detail.contains("503"), "{detail}");

        let err = send("invalid").await;
        assert_eq!(err.code(), "getui_20001");
        assert!(!err.is_retryable());

        let err = send("black").await;
        assert_eq!(err.code(), "getui_10002");
        assert!(!err.is_retryable());
        assert!(!err.detail().contains(MASTER));

        let err = send("odd").await;
        assert_eq!(err.code(), "getui_99999");
        assert!(err.is_retryable(), "an unknown code with HTTP 500");

        let err = send("garbled").await;
        assert_eq!(err.code(), "getui_bad_answer");
    }

    #[tokio::test]
    async fn refused_credentials_are_permanent_and_unquoted() {
        let (server, issued) = getui(&[], |_| unreachable!()).await;
        let (_dir, sender) = sender().await;
        let mut config = account(&server.url);
        config["master_secret"] = json!("not-the-master-secret");
        let record = testkit::record(Channel::Push, "cid-a", notification());
        let err = sender.send(&record, 1, &config).await.unwrap_err();
        assert_eq!(err.code(), "getui_20001");
        assert!(!err.is_retryable());
        assert!(!err.detail().contains("not-the-master-secret"), "{err}");
        assert_eq!(issued.load(Ordering::SeqCst), 0);
        assert_eq!(server.requests().len(), 1, "no push without a token");
    }

    #[tokio::test]
    async fn bad_accounts_fail_every_record_without_a_request() {
        let (_dir, sender) = sender().await;
        let record = testkit::record(Channel::Push, "cid-a", notification());
        let results = sender
            .send_batch(&[&record, &record], 1, &json!({"app_id": "x"}))
            .await;
        assert_eq!(results.len(), 2);
        for r in results {
            assert_eq!(r.unwrap_err().code(), "bad_account");
        }
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let a = GetuiAccount::parse(&json!({"app_id": "A1", "app_key": "k",
                                             "master_secret": "hunter2"}))
        .unwrap();
        assert_eq!(a.url("auth"), "https://restapi.getui.com/v2/A1/auth");
        assert_eq!(a.token_key(), "getui:A1");
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );
        let b = GetuiAccount::parse(&json!({"app_id": "A1", "app_key": "k",
            "master_secret": "hunter2", "base_url": "http://127.0.0.1:9/"}))
        .unwrap();
        assert_eq!(
            b.url("push/single/cid"),
            "http://127.0.0.1:9/v2/A1/push/single/cid"
        );
        assert!(
            check_account(
                Channel::Push,
                &json!({"app_id": "A1", "app_key": "k",
                                                     "master_secret": "hunter2"})
            )
            .is_ok()
        );

        let ok = json!({"app_id": "A1", "app_key": "k", "master_secret": "hunter2"});
        assert!(check_account(Channel::Sms, &ok).is_err());
        let with = |k: &str, v: Value| {
            let mut c = ok.clone();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = ok.clone();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let bad = [
            json!("text"),
            without("app_id"),
            without("app_key"),
            without("master_secret"),
            with("app_id", json!("")),
            with("app_id", json!("a/../b")),
            with("app_key", json!(" ")),
            with("master_secret", json!("")),
            with("master_secret", json!(1234)),
            with("base_url", json!("ftp://h.example.com")),
            with("base_url", json!("not a url")),
            with("base_url", json!("https://h.example.com/?x=1")),
            with("extra", json!(1)),
        ];
        for config in bad {
            let err = check_account(Channel::Push, &config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("1234"),
                "{config}: {err}"
            );
        }
    }

    #[test]
    fn contents_are_checked() {
        let good = [
            notification(),
            json!({"transmission": "x"}),
            json!({"notification": {"title": "t", "body": "b", "click_type": "startapp"},
                   "ttl_ms": -1}),
            json!({"notification": {"title": "t", "body": "b", "click_type": "payload",
                                    "payload": "p", "channel_level": 4, "notify_id": "7",
                                    "badge_add_num": 1, "channel_id": "Default"}}),
            json!({"notification": {"title": "t", "body": "b", "click_type": "intent",
                                    "intent": "intent:#Intent;end"}}),
        ];
        for content in good {
            check_content(Channel::Push, &content).unwrap_or_else(|e| panic!("{content}: {e}"));
        }
        let n = |extra: Value| {
            let mut n = json!({"title": "t", "body": "b", "click_type": "none"});
            for (k, v) in extra.as_object().unwrap() {
                n[k] = v.clone();
            }
            json!({"notification": n})
        };
        let bad = [
            json!("text"),
            json!({}),
            json!({"notification": {"title": "t", "body": "b", "click_type": "none"},
                   "transmission": "x"}),
            json!({"transmission": ""}),
            json!({"transmission": {"a": 1}}),
            json!({"notification": "t"}),
            json!({"notification": {"body": "b", "click_type": "none"}}),
            json!({"notification": {"title": "t", "click_type": "none"}}),
            json!({"notification": {"title": "t", "body": "b"}}),
            n(json!({"click_type": "open"})),
            n(json!({"click_type": "url"})),
            n(json!({"click_type": "payload_custom"})),
            n(json!({"click_type": "intent", "url": "https://x"})),
            n(json!({"title": 5})),
            n(json!({"channel_level": [1]})),
            n(json!({"sound": "ding"})),
            json!({"transmission": "x", "ttl_ms": 259_200_001}),
            json!({"transmission": "x", "ttl_ms": -2}),
            json!({"transmission": "x", "ttl_ms": "7200000"}),
            json!({"transmission": "x", "push_channel": "ios"}),
            json!({"transmission": "x", "settings": {"ttl": 1}}),
        ];
        for content in bad {
            assert!(
                check_content(Channel::Push, &content).is_err(),
                "{content} passed"
            );
        }
        assert!(check_content(Channel::Email, &json!({"transmission": "x"})).is_err());
    }
}

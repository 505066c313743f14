//! Feishu (Lark): group custom bots (`feishu_robot`) and app messages (`feishu_app`).
//!
//! # Custom bot (`feishu_robot`)
//!
//! A custom bot belongs to one group chat and posts through its webhook:
//!
//! ```text
//! POST <base_url>/open-apis/bot/v2/hook/<hook_id>
//! Content-Type: application/json; charset=utf-8
//!
//! {"timestamp": "<unix seconds>", "sign": "<sign>", "msg_type": "text", "content": {...}}
//! {"timestamp": "<unix seconds>", "sign": "<sign>", "msg_type": "interactive", "card": {...}}
//! ```
//!
//! `timestamp` and `sign` are sent only when the account has a `secret` (the bot's "signature
//! verification" setting). The signature is, as Feishu documents it, the Base64 of an
//! HMAC-SHA256 whose **key** is `"<timestamp>\n<secret>"` and whose **message** is empty
//! ([`sign`]); Feishu refuses timestamps more than an hour away from its clock.
//!
//! Receivers are the people to mention: an open id (`ou_…`) or user id, or `@all` (also `all`)
//! for everyone. Messages of one batch with the same content are posted **once**, mentioning all
//! of their receivers (a group sees one message, not one per receiver):
//!
//! - `text`: `<at user_id="ou_…"></at>` tags (`<at user_id="all"></at>` for `@all`) are put
//!   before the text, separated by spaces;
//! - `post`: a last paragraph of `{"tag": "at", "user_id": …}` elements is added to every
//!   language of the post;
//! - `interactive`: a `{"tag": "markdown", "content": "<at id=ou_…></at> …"}` element is added
//!   at the end of the card's `elements` (card JSON 1.0) or `body.elements` (2.0); a card
//!   template (`{"type": "template", …}`) is sent as it is;
//! - `image` and `share_chat` cannot mention anyone and are sent as they are.
//!
//! A receiver that is not an id (anything but ASCII letters, digits, `_` and `-`) fails alone
//! with `bad_receiver`. The webhook answers no message id, and a custom bot cannot recall its
//! messages (`recall` answers `not_supported`).
//!
//! # App messages (`feishu_app`)
//!
//! An app bot sends to a user or a chat with a tenant access token:
//!
//! ```text
//! POST <base_url>/open-apis/auth/v3/tenant_access_token/internal
//! {"app_id": "cli_…", "app_secret": "…"}  →  {"code": 0, "tenant_access_token": "t-…", "expire": 7200}
//!
//! POST <base_url>/open-apis/im/v1/messages?receive_id_type=<receive_id_type>
//! Authorization: Bearer <tenant_access_token>
//! {"receive_id": "<receiver>", "msg_type": "text", "content": "{\"text\":\"…\"}", "uuid": "<message_id>"}
//!   →  {"code": 0, "data": {"message_id": "om_…", …}}
//!
//! DELETE <base_url>/open-apis/im/v1/messages/<message_id>      (recall)
//! POST <base_url>/open-apis/im/v1/images  multipart image_type=message, image   (media upload)
//! POST <base_url>/open-apis/im/v1/files   multipart file_type, file_name, file  (media upload)
//! ```
//!
//! `content` is the template's content object serialised to a JSON string, as the API wants;
//! `uuid` is herald's message id, so that a retried send is not delivered twice (Feishu sends
//! at most one message per uuid within an hour). The answer's `data.message_id` is the vendor
//! message id that `recall` uses. Tokens are cached under `feishu:<app_id>` in the shared
//! [`TokenCache`]; when Feishu answers that a token is invalid (codes 99991661, 99991663,
//! 99991665, 99991668, 99991671), it is dropped, a new one fetched, and the request tried once
//! more. Recalling a message Feishu says is already deleted (230110) counts as done.
//!
//! # Account config
//!
//! ```json
//! {"hook_id": "2b0e…", "secret": "…", "base_url": "https://open.larksuite.com"}
//! {"app_id": "cli_a1b2…", "app_secret": "…", "receive_id_type": "open_id", "base_url": "…"}
//! ```
//!
//! - `feishu_robot`: `hook_id` (the token at the end of the webhook URL
//!   `https://open.feishu.cn/open-apis/bot/v2/hook/<hook_id>`; ASCII letters, digits, `-`, `_`),
//!   `secret` (optional: the signature verification secret).
//! - `feishu_app`: `app_id`, `app_secret`, `receive_id_type` (`open_id` (default), `user_id`,
//!   `union_id`, `email` or `chat_id`: what the receivers are).
//! - Both: `base_url` (default `https://open.feishu.cn`; Lark tenants set
//!   `https://open.larksuite.com`). Unknown fields are refused.
//!
//! # Template content
//!
//! `{"msg_type": <type>, "content": {...}}`, or `{"msg_type": "interactive", "card": {...}}`,
//! where `content` is Feishu's own content object for the type:
//!
//! | type | `feishu_robot` | `feishu_app` |
//! | --- | --- | --- |
//! | `text` | `{"text": "…"}` | `{"text": "…"}` |
//! | `post` | `{"post": {"zh_cn": {"title": "…", "content": [[{"tag": "text", "text": "…"}]]}}}` | `{"zh_cn": {"title": "…", "content": [[…]]}}` |
//! | `image` | `{"image_key": "img_…"}` | `{"image_key": "img_…"}` |
//! | `share_chat` | `{"share_chat_id": "oc_…"}` | `{"chat_id": "oc_…"}` |
//! | `share_user` | — | `{"user_id": "ou_…"}` |
//! | `file`, `audio`, `sticker` | — | `{"file_key": "…"}` |
//! | `media` | — | `{"file_key": "…", "image_key": "…"}` (`image_key` optional) |
//! | `interactive` | `"card"`: a card JSON or `{"type": "template", "data": {…}}` | the same |
//!
//! A post needs at least one language (`zh_cn`, `en_us`, …), each with a `content` list of
//! paragraphs (lists).
//!
//! # Errors
//!
//! Transport failures are retryable (`feishu_timeout`, `feishu_connect`, `feishu_network`).
//! Feishu answers errors as `{"code": <n>, "msg": …}`, often with HTTP 400; the code becomes
//! `feishu_<n>`, the detail Feishu's message (and its `log_id`). Retryable: rate limits
//! (99991400, 11232, 11233, 11247, 230020, and 9499 when its message says "too many
//! requests"), "system busy" codes (1500, 2200, 5000, 10101, 10500, 55001, 65001, 18121,
//! 230049), an invalid token that survived the one refresh, and any code answered with HTTP
//! 408, 429 or 5xx. The wait is the `x-ogw-ratelimit-reset` header (seconds), else
//! `Retry-After`. Every other code is permanent — for example 9499 (bad request), 19001 (invalid
//! hook), 19021 (signature mismatch), 19022 (IP not allowed), 19024 (keyword missing), 230001
//! (invalid parameter), 230002 (bot not in the chat), 230013 (receiver outside the app's
//! availability), 10014/10015 (app disabled, wrong secret). An answer without a code maps by
//! its HTTP status (`feishu_429`, `feishu_5xx`, `feishu_4xx`, …); a 2xx answer that is not
//! Feishu's JSON is `feishu_bad_answer`, retryable for app messages (the uuid makes a resend
//! safe) and permanent for the bot (a resend could post twice).
//!
//! # Documentation used
//!
//! - Custom bot guide: https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot
//! - Send message: https://open.feishu.cn/document/server-docs/im-v1/message/create
//! - Message content: https://open.feishu.cn/document/server-docs/im-v1/message-content-description/create_json
//! - Recall message: https://open.feishu.cn/document/server-docs/im-v1/message/delete
//! - Tenant access token: https://open.feishu.cn/document/server-docs/authentication-management/access-token/tenant_access_token_internal
//! - Rate limits: https://open.feishu.cn/document/server-docs/api-call-guide/frequency-control
//! - Generic error codes: https://open.feishu.cn/document/server-docs/api-call-guide/generic-error-code

use super::http::{self, bad_account, bad_content};
use super::token::{FreshToken, TokenCache};
use super::{Media, SendError, SendOutcome, Sender};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use herald_core::config::Secret;
use herald_core::{Channel, DeliveryEvent, MessageRecord};
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Client, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// The vendor name on delivery events.
const VENDOR: &str = "feishu";
/// Feishu's API origin; Lark tenants use `https://open.larksuite.com`.
const DEFAULT_BASE_URL: &str = "https://open.feishu.cn";
/// The content type Feishu's API reference asks for.
const JSON_UTF8: &str = "application/json; charset=utf-8";
/// Most messages one batch carries: the receivers a bot message mentions at once, and the app
/// messages sent concurrently.
const MAX_BATCH: usize = 20;
/// App messages of one batch in flight at once (Feishu allows 50 requests a second per app).
const APP_CONCURRENCY: usize = 8;

/// Codes meaning "too many requests": retryable after the advertised wait.
const RATE_LIMITED: [i64; 5] = [99991400, 11232, 11233, 11247, 230020];
/// Codes meaning "internal error / busy, try again".
const BUSY: [i64; 9] = [1500, 2200, 5000, 10101, 10500, 55001, 65001, 18121, 230049];
/// Codes meaning the access token is invalid or expired: refresh it and try once more.
const TOKEN_INVALID: [i64; 5] = [99991661, 99991663, 99991665, 99991668, 99991671];
/// 9499 is "bad request", except when Feishu's message says it is a rate limit.
const BAD_REQUEST: i64 = 9499;
/// A recall of a message that is already gone.
const ALREADY_DELETED: i64 = 230110;

/// What a message id may contain unescaped in a URL path.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'-').remove(b'.');

/// The custom bot signature: Base64 of HMAC-SHA256 with key `"<timestamp>\n<secret>"` over an
/// empty message, exactly as Feishu's custom bot guide specifies (the key/message order is
/// Feishu's, not the usual one).
pub fn sign(secret: &str, timestamp: i64) -> String {
    let key = format!("{timestamp}\n{secret}");
    let mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    BASE64.encode(mac.finalize().into_bytes())
}

/// Checks an account config of `channel` (see the [module docs](self)).
pub fn check_account(channel: Channel, config: &Value) -> Result<(), String> {
    match channel {
        Channel::FeishuRobot => RobotAccount::parse(config).map(drop),
        Channel::FeishuApp => AppAccount::parse(config).map(drop),
        other => Err(format!("`{other}` is not a Feishu channel")),
    }
}

/// Checks a template's content for `channel` (see the [module docs](self)).
pub fn check_content(channel: Channel, content: &Value) -> Result<(), String> {
    Message::parse(channel, content).map(drop)
}

// ---------------------------------------------------------------------------------------------
// Accounts

/// A custom bot account.
#[derive(Debug, Clone)]
pub struct RobotAccount {
    /// The token at the end of the webhook URL.
    pub hook_id: Secret,
    /// The signature verification secret, when the bot has one.
    pub secret: Option<Secret>,
    /// The API origin, without a trailing slash.
    pub base_url: String,
}

/// An app account.
#[derive(Debug, Clone)]
pub struct AppAccount {
    pub app_id: String,
    pub app_secret: Secret,
    /// What the receivers of this account are.
    pub receive_id_type: ReceiveIdType,
    /// The API origin, without a trailing slash.
    pub base_url: String,
}

/// The kind of id an app account's receivers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiveIdType {
    #[default]
    OpenId,
    UserId,
    UnionId,
    Email,
    ChatId,
}

impl ReceiveIdType {
    /// The `receive_id_type` query value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiveIdType::OpenId => "open_id",
            ReceiveIdType::UserId => "user_id",
            ReceiveIdType::UnionId => "union_id",
            ReceiveIdType::Email => "email",
            ReceiveIdType::ChatId => "chat_id",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRobot {
    hook_id: Secret,
    #[serde(default)]
    secret: Option<Secret>,
    #[serde(default)]
    base_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredApp {
    app_id: String,
    app_secret: Secret,
    #[serde(default)]
    receive_id_type: ReceiveIdType,
    #[serde(default)]
    base_url: Option<String>,
}

/// Refuses a config that is not an object or whose secret fields are not strings, before serde
/// sees it: serde quotes ill-typed values in its errors.
fn check_shape(config: &Value, secrets: &[&str]) -> Result<(), String> {
    if !config.is_object() {
        return Err("a Feishu account must be a JSON object".into());
    }
    for field in secrets {
        if config.get(field).is_some_and(|v| !v.is_string()) {
            return Err(format!("`{field}` must be a string"));
        }
    }
    Ok(())
}

impl RobotAccount {
    /// Parses and checks a custom bot account; the error never quotes a secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        check_shape(config, &["hook_id", "secret"])?;
        let stored: StoredRobot =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        let hook = stored.hook_id.expose();
        if hook.is_empty() {
            return Err("`hook_id` is empty".into());
        }
        if hook.contains('/') {
            return Err(
                "`hook_id` must be the token at the end of the webhook URL, not the URL".into(),
            );
        }
        if !hook
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("`hook_id` may hold only ASCII letters, digits, `-` and `_`".into());
        }
        if stored
            .secret
            .as_ref()
            .is_some_and(|s| s.expose().is_empty())
        {
            return Err(
                "`secret` is empty (leave it out when signature verification is off)".into(),
            );
        }
        Ok(RobotAccount {
            hook_id: stored.hook_id,
            secret: stored.secret,
            base_url: http::base_url(stored.base_url, DEFAULT_BASE_URL)?,
        })
    }
}

impl AppAccount {
    /// Parses and checks an app account; the error never quotes a secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        check_shape(config, &["app_secret"])?;
        let stored: StoredApp =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        if stored.app_id.trim().is_empty() {
            return Err("`app_id` is empty".into());
        }
        if stored.app_secret.expose().is_empty() {
            return Err("`app_secret` is empty".into());
        }
        Ok(AppAccount {
            app_id: stored.app_id,
            app_secret: stored.app_secret,
            receive_id_type: stored.receive_id_type,
            base_url: http::base_url(stored.base_url, DEFAULT_BASE_URL)?,
        })
    }

    /// The token cache key.
    fn token_key(&self) -> String {
        format!("{VENDOR}:{}", self.app_id)
    }
}

// ---------------------------------------------------------------------------------------------
// Content

/// The message types herald sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsgType {
    Text,
    Post,
    Image,
    Interactive,
    ShareChat,
    ShareUser,
    File,
    Audio,
    Media,
    Sticker,
}

impl MsgType {
    fn parse(channel: Channel, name: &str) -> Result<Self, String> {
        let robot = channel == Channel::FeishuRobot;
        Ok(match name {
            "text" => MsgType::Text,
            "post" => MsgType::Post,
            "image" => MsgType::Image,
            "interactive" => MsgType::Interactive,
            "share_chat" => MsgType::ShareChat,
            "share_user" if !robot => MsgType::ShareUser,
            "file" if !robot => MsgType::File,
            "audio" if !robot => MsgType::Audio,
            "media" if !robot => MsgType::Media,
            "sticker" if !robot => MsgType::Sticker,
            _ if robot => {
                return Err(format!(
                    "unknown custom bot `msg_type` `{name}` (expected text, post, image, \
                     share_chat or interactive)"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown app `msg_type` `{name}` (expected text, post, image, interactive, \
                     share_chat, share_user, file, audio, media or sticker)"
                ));
            }
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            MsgType::Text => "text",
            MsgType::Post => "post",
            MsgType::Image => "image",
            MsgType::Interactive => "interactive",
            MsgType::ShareChat => "share_chat",
            MsgType::ShareUser => "share_user",
            MsgType::File => "file",
            MsgType::Audio => "audio",
            MsgType::Media => "media",
            MsgType::Sticker => "sticker",
        }
    }
}

/// A checked template content: the type and Feishu's content (or card) object for it.
#[derive(Debug, Clone, PartialEq)]
struct Message {
    msg_type: MsgType,
    /// `content`, or `card` for `interactive`.
    payload: Map<String, Value>,
}

impl Message {
    fn parse(channel: Channel, content: &Value) -> Result<Self, String> {
        if !matches!(channel, Channel::FeishuRobot | Channel::FeishuApp) {
            return Err(format!("`{channel}` is not a Feishu channel"));
        }
        let obj = content.as_object().ok_or("content must be a JSON object")?;
        if let Some(k) = obj
            .keys()
            .find(|k| !["msg_type", "content", "card"].contains(&k.as_str()))
        {
            return Err(format!(
                "unknown Feishu content field `{k}` (expected msg_type, content, card)"
            ));
        }
        let name = match obj.get("msg_type") {
            Some(Value::String(s)) => s,
            Some(_) => return Err("`msg_type` must be a string".into()),
            None => return Err("a Feishu template needs `msg_type`".into()),
        };
        let msg_type = MsgType::parse(channel, name)?;
        let (field, other) = if msg_type == MsgType::Interactive {
            ("card", "content")
        } else {
            ("content", "card")
        };
        if obj.contains_key(other) {
            return Err(format!("a `{name}` message takes `{field}`, not `{other}`"));
        }
        let payload = match obj.get(field) {
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(format!("`{field}` must be a JSON object")),
            None => return Err(format!("a `{name}` message needs `{field}`")),
        };
        let robot = channel == Channel::FeishuRobot;
        let need = |key: &str| -> Result<(), String> {
            match payload.get(key) {
                Some(Value::String(s)) if !s.is_empty() => Ok(()),
                Some(Value::String(_)) => Err(format!("`content.{key}` is empty")),
                Some(_) => Err(format!("`content.{key}` must be a string")),
                None => Err(format!("a `{name}` message needs `content.{key}`")),
            }
        };
        match msg_type {
            MsgType::Text => match payload.get("text") {
                Some(Value::String(_)) => {}
                Some(_) => return Err("`content.text` must be a string".into()),
                None => return Err("a `text` message needs `content.text`".into()),
            },
            MsgType::Post if robot => match payload.get("post") {
                Some(Value::Object(locales)) => check_post(locales, "content.post")?,
                Some(_) => return Err("`content.post` must be a JSON object".into()),
                None => {
                    return Err("a custom bot `post` message needs `content.post` \
                                ({\"zh_cn\": {\"title\", \"content\"}})"
                        .into());
                }
            },
            MsgType::Post => check_post(&payload, "content")?,
            MsgType::Image => need("image_key")?,
            MsgType::ShareChat if robot => need("share_chat_id")?,
            MsgType::ShareChat => need("chat_id")?,
            MsgType::ShareUser => need("user_id")?,
            MsgType::File | MsgType::Audio | MsgType::Media | MsgType::Sticker => need("file_key")?,
            MsgType::Interactive => {
                if payload.is_empty() {
                    return Err("`card` is empty".into());
                }
            }
        }
        Ok(Message { msg_type, payload })
    }

    /// The message with `mentions` added where its type can carry them (see the module docs).
    fn with_mentions(&self, mentions: &[Mention]) -> Message {
        let mut payload = self.payload.clone();
        if mentions.is_empty() {
            return Message {
                msg_type: self.msg_type,
                payload,
            };
        }
        match self.msg_type {
            MsgType::Text => {
                let tags: Vec<String> = mentions
                    .iter()
                    .map(|m| format!("<at user_id=\"{}\"></at>", m.id()))
                    .collect();
                let text = payload.get("text").and_then(Value::as_str).unwrap_or("");
                let text = format!("{} {text}", tags.join(" "));
                payload.insert("text".into(), Value::String(text));
            }
            MsgType::Post => {
                let paragraph: Vec<Value> = mentions
                    .iter()
                    .map(|m| json!({"tag": "at", "user_id": m.id()}))
                    .collect();
                if let Some(Value::Object(locales)) = payload.get_mut("post") {
                    for locale in locales.values_mut() {
                        if let Some(Value::Array(content)) = locale.get_mut("content") {
                            content.push(Value::Array(paragraph.clone()));
                        }
                    }
                }
            }
            MsgType::Interactive => {
                let tags: Vec<String> = mentions
                    .iter()
                    .map(|m| format!("<at id={}></at>", m.id()))
                    .collect();
                let element = json!({"tag": "markdown", "content": tags.join(" ")});
                let elements = if payload.contains_key("elements") {
                    payload.get_mut("elements")
                } else {
                    payload
                        .get_mut("body")
                        .and_then(|body| body.get_mut("elements"))
                };
                if let Some(Value::Array(elements)) = elements {
                    elements.push(element);
                }
            }
            _ => {}
        }
        Message {
            msg_type: self.msg_type,
            payload,
        }
    }
}

/// Checks a post's languages: each an object with a `content` list of paragraph lists.
fn check_post(locales: &Map<String, Value>, at: &str) -> Result<(), String> {
    if locales.is_empty() {
        return Err(format!(
            "`{at}` needs at least one language (zh_cn, en_us, …)"
        ));
    }
    for (lang, locale) in locales {
        let locale = locale
            .as_object()
            .ok_or_else(|| format!("`{at}.{lang}` must be a JSON object"))?;
        match locale.get("content") {
            Some(Value::Array(paragraphs)) => {
                if !paragraphs.iter().all(Value::is_array) {
                    return Err(format!(
                        "`{at}.{lang}.content` must be a list of paragraphs (lists)"
                    ));
                }
            }
            Some(_) => return Err(format!("`{at}.{lang}.content` must be a list")),
            None => return Err(format!("`{at}.{lang}` needs `content`")),
        }
        if locale.get("title").is_some_and(|t| !t.is_string()) {
            return Err(format!("`{at}.{lang}.title` must be a string"));
        }
    }
    Ok(())
}

/// Whom a custom bot message mentions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mention {
    All,
    User(String),
}

impl Mention {
    /// A receiver as a mention: `@all`/`all`, or an open id / user id.
    fn of(receiver: &str) -> Result<Self, SendError> {
        let receiver = receiver.trim();
        if receiver == "@all" || receiver == "all" {
            return Ok(Mention::All);
        }
        if !receiver.is_empty()
            && receiver
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Ok(Mention::User(receiver.to_string()));
        }
        Err(SendError::Permanent {
            code: "bad_receiver".into(),
            detail: format!(
                "`{}` is not a Feishu open id or user id (or @all)",
                receiver.escape_debug()
            ),
        })
    }

    /// The id in an `at` tag.
    fn id(&self) -> &str {
        match self {
            Mention::All => "all",
            Mention::User(id) => id,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Answers

/// A whole HTTP answer.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Sends `request` and reads the whole answer, whatever its status (Feishu puts its error code
/// in the body of 4xx answers too).
async fn call(request: RequestBuilder) -> Result<Reply, SendError> {
    let response = request
        .send()
        .await
        .map_err(|e| http::request_error(VENDOR, e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .map_err(|e| http::request_error(VENDOR, e))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

impl Reply {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .filter(Value::is_object)
    }
}

/// Feishu's code in an answer: `code`, or the bot webhook's legacy `StatusCode`.
fn code_of(json: &Value) -> Option<i64> {
    json.get("code")
        .and_then(Value::as_i64)
        .or_else(|| json.get("StatusCode").and_then(Value::as_i64))
}

/// The error detail of an answer: Feishu's message and its log id.
fn detail_of(json: &Value, status: StatusCode) -> String {
    let msg = json
        .get("msg")
        .and_then(Value::as_str)
        .or_else(|| json.get("StatusMessage").and_then(Value::as_str))
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("HTTP {status}"));
    match json.pointer("/error/log_id").and_then(Value::as_str) {
        Some(log_id) => format!("{msg} (log_id {log_id})"),
        None => msg,
    }
}

/// How long Feishu asks to wait: `x-ogw-ratelimit-reset` (seconds), else `Retry-After`.
fn rate_limit_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("x-ogw-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .or_else(|| http::retry_after(headers))
}

/// Whether a 9499 answer is a rate limit in disguise ("too many request").
fn says_rate_limited(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("too many") || detail.contains("frequency") || detail.contains("rate limit")
}

/// The error for Feishu's non-zero `code` (see the module docs).
fn code_error(code: i64, detail: String, status: StatusCode, headers: &HeaderMap) -> SendError {
    let retryable = RATE_LIMITED.contains(&code)
        || BUSY.contains(&code)
        || TOKEN_INVALID.contains(&code)
        || (code == BAD_REQUEST && says_rate_limited(&detail))
        || matches!(status.as_u16(), 408 | 429)
        || status.is_server_error();
    let code = format!("{VENDOR}_{code}");
    if retryable {
        SendError::Retryable {
            code,
            detail,
            retry_after: rate_limit_wait(headers),
        }
    } else {
        SendError::Permanent { code, detail }
    }
}

/// Whether `e` is Feishu saying the tenant access token is invalid or expired.
fn token_refused(e: &SendError) -> bool {
    TOKEN_INVALID
        .iter()
        .any(|c| e.code() == format!("{VENDOR}_{c}"))
}

/// The JSON of a successful answer (code 0, 2xx), or the error the answer means.
/// `resend_safe`: whether a 2xx answer that is not Feishu's JSON may be retried.
fn check(reply: &Reply, resend_safe: bool) -> Result<Value, SendError> {
    let json = reply.json();
    match json.as_ref().and_then(code_of) {
        Some(0) if reply.status.is_success() => Ok(json.unwrap_or(Value::Null)),
        Some(code) if code != 0 => Err(code_error(
            code,
            detail_of(json.as_ref().unwrap_or(&Value::Null), reply.status),
            reply.status,
            &reply.headers,
        )),
        _ if !reply.status.is_success() => Err(http::status_error(
            VENDOR,
            reply.status,
            &reply.headers,
            format!("HTTP {}{}", reply.status, http::excerpt(&reply.body)),
        )),
        _ => {
            let code = format!("{VENDOR}_bad_answer");
            let detail = format!(
                "an answer that is not Feishu's JSON{}",
                http::excerpt(&reply.body)
            );
            Err(if resend_safe {
                SendError::Retryable {
                    code,
                    detail,
                    retry_after: None,
                }
            } else {
                SendError::Permanent { code, detail }
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// The Feishu client, for both channels.
pub struct FeishuSender {
    client: Client,
    tokens: Arc<TokenCache>,
}

impl FeishuSender {
    /// A client over the shared HTTP pool and token cache.
    pub fn new(client: Client, tokens: Arc<TokenCache>) -> Self {
        FeishuSender { client, tokens }
    }

    // --- custom bot

    /// Sends custom bot messages: one webhook call per distinct content, mentioning every
    /// receiver of that content.
    async fn send_robot(
        &self,
        records: &[&MessageRecord],
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let account = match RobotAccount::parse(account) {
            Ok(a) => a,
            Err(e) => return vec![Err(bad_account(e)); records.len()],
        };

        /// A record's fate: its own error, or the result of group `n`.
        enum Slot {
            Own(Result<SendOutcome, SendError>),
            Group(usize),
        }
        struct Group<'a> {
            content: &'a Value,
            message: Message,
            mentions: Vec<Mention>,
        }

        let mut groups: Vec<Group> = Vec::new();
        let mut slots = Vec::with_capacity(records.len());
        for record in records {
            let mention = match Mention::of(&record.receiver) {
                Ok(m) => m,
                Err(e) => {
                    slots.push(Slot::Own(Err(e)));
                    continue;
                }
            };
            let n = match groups.iter().position(|g| *g.content == record.content) {
                Some(n) => n,
                None => match Message::parse(Channel::FeishuRobot, &record.content) {
                    Ok(message) => {
                        groups.push(Group {
                            content: &record.content,
                            message,
                            mentions: Vec::new(),
                        });
                        groups.len() - 1
                    }
                    Err(e) => {
                        slots.push(Slot::Own(Err(bad_content(e))));
                        continue;
                    }
                },
            };
            if !groups[n].mentions.contains(&mention) {
                groups[n].mentions.push(mention);
            }
            slots.push(Slot::Group(n));
        }

        let mut results = Vec::with_capacity(groups.len());
        for group in &groups {
            results.push(
                self.post_robot(&account, &group.message.with_mentions(&group.mentions))
                    .await,
            );
        }
        slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Own(result) => result,
                Slot::Group(n) => results[n].clone(),
            })
            .collect()
    }

    /// One webhook call.
    async fn post_robot(
        &self,
        account: &RobotAccount,
        message: &Message,
    ) -> Result<SendOutcome, SendError> {
        let mut body = Map::new();
        if let Some(secret) = &account.secret {
            let timestamp = chrono::Utc::now().timestamp();
            body.insert("timestamp".into(), Value::String(timestamp.to_string()));
            body.insert(
                "sign".into(),
                Value::String(sign(secret.expose(), timestamp)),
            );
        }
        body.insert("msg_type".into(), message.msg_type.as_str().into());
        let field = if message.msg_type == MsgType::Interactive {
            "card"
        } else {
            "content"
        };
        body.insert(field.into(), Value::Object(message.payload.clone()));
        let url = format!(
            "{}/open-apis/bot/v2/hook/{}",
            account.base_url,
            account.hook_id.expose()
        );
        let reply = call(
            self.client
                .post(url)
                .header(CONTENT_TYPE, JSON_UTF8)
                .body(Value::Object(body).to_string()),
        )
        .await?;
        check(&reply, false)?;
        Ok(SendOutcome {
            vendor: VENDOR.into(),
            vendor_message_id: None,
            billing_units: None,
        })
    }

    // --- app

    /// Fetches a tenant access token.
    async fn fetch_token(&self, account: &AppAccount) -> Result<FreshToken, SendError> {
        let url = format!(
            "{}/open-apis/auth/v3/tenant_access_token/internal",
            account.base_url
        );
        let body = json!({"app_id": account.app_id, "app_secret": account.app_secret.expose()});
        let reply = call(
            self.client
                .post(url)
                .header(CONTENT_TYPE, JSON_UTF8)
                .body(body.to_string()),
        )
        .await?;
        let json = check(&reply, true)?;
        let bad = |what: &str| SendError::Retryable {
            code: format!("{VENDOR}_bad_answer"),
            detail: format!("the token answer has no {what}"),
            retry_after: None,
        };
        let token = json
            .get("tenant_access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("tenant_access_token"))?;
        let expire = json
            .get("expire")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("expire"))?;
        Ok(FreshToken {
            token: token.to_string(),
            expires_in: Duration::from_secs(expire),
        })
    }

    /// Sends the request `build` makes with a tenant access token; when Feishu says the token
    /// is invalid, drops it, fetches another and sends once more. Returns the answer's JSON.
    async fn with_token(
        &self,
        account: &AppAccount,
        build: impl Fn(&str) -> RequestBuilder,
    ) -> Result<Value, SendError> {
        let send = |token: &str| {
            let request = build(token);
            async move { check(&call(request).await?, true) }
        };
        self.tokens
            .with_token(
                &account.token_key(),
                || self.fetch_token(account),
                send,
                token_refused,
            )
            .await
    }

    /// Sends one app message.
    async fn send_app(
        &self,
        record: &MessageRecord,
        account: &AppAccount,
    ) -> Result<SendOutcome, SendError> {
        let message = Message::parse(Channel::FeishuApp, &record.content).map_err(bad_content)?;
        let body = json!({
            "receive_id": record.receiver,
            "msg_type": message.msg_type.as_str(),
            "content": Value::Object(message.payload).to_string(),
            "uuid": record.message_id.to_string(),
        })
        .to_string();
        let url = format!("{}/open-apis/im/v1/messages", account.base_url);
        let json = self
            .with_token(account, |token| {
                self.client
                    .post(&url)
                    .query(&[("receive_id_type", account.receive_id_type.as_str())])
                    .bearer_auth(token)
                    .header(CONTENT_TYPE, JSON_UTF8)
                    .body(body.clone())
            })
            .await?;
        let vendor_message_id = json
            .pointer("/data/message_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        Ok(SendOutcome {
            vendor: VENDOR.into(),
            vendor_message_id,
            billing_units: None,
        })
    }

    /// Sends app messages, a few at a time, after one token look-up.
    async fn send_apps(
        &self,
        records: &[&MessageRecord],
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let account = match AppAccount::parse(account) {
            Ok(a) => a,
            Err(e) => return vec![Err(bad_account(e)); records.len()],
        };
        if records.len() > 1 {
            // One fetch for the batch rather than one per concurrent send.
            let key = account.token_key();
            if let Err(e) = self.tokens.get(&key, || self.fetch_token(&account)).await {
                return vec![Err(e); records.len()];
            }
        }
        // Futures built up front (not in a stream's closure), which keeps the future `Send`.
        let calls: Vec<_> = records
            .iter()
            .map(|record| self.send_app(record, &account))
            .collect();
        stream::iter(calls)
            .buffered(APP_CONCURRENCY)
            .collect()
            .await
    }
}

/// The error for a record of a channel that is not Feishu's.
fn wrong_channel(channel: Channel) -> SendError {
    SendError::Permanent {
        code: "wrong_channel".into(),
        detail: format!("the Feishu client cannot send `{channel}` messages"),
    }
}

#[async_trait]
impl Sender for FeishuSender {
    /// Bot messages with the same content share one webhook call (one mention each); app
    /// messages are sent concurrently.
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn send(
        &self,
        record: &MessageRecord,
        _account_id: i64,
        account: &Value,
    ) -> Result<SendOutcome, SendError> {
        match record.channel {
            Channel::FeishuRobot => {
                let mut results = self.send_robot(&[record], account).await;
                results
                    .pop()
                    .unwrap_or_else(|| Err(wrong_channel(record.channel)))
            }
            Channel::FeishuApp => {
                let account = AppAccount::parse(account).map_err(bad_account)?;
                self.send_app(record, &account).await
            }
            other => Err(wrong_channel(other)),
        }
    }

    async fn send_batch(
        &self,
        records: &[&MessageRecord],
        _account_id: i64,
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        // One batch is one account, hence one channel; split anyway rather than trust it.
        let robot: Vec<&MessageRecord> = records
            .iter()
            .copied()
            .filter(|r| r.channel == Channel::FeishuRobot)
            .collect();
        let app: Vec<&MessageRecord> = records
            .iter()
            .copied()
            .filter(|r| r.channel == Channel::FeishuApp)
            .collect();
        let mut robot_results = self.send_robot(&robot, account).await.into_iter();
        let mut app_results = if app.is_empty() {
            Vec::new()
        } else {
            self.send_apps(&app, account).await
        }
        .into_iter();
        records
            .iter()
            .map(|r| {
                let next = match r.channel {
                    Channel::FeishuRobot => robot_results.next(),
                    Channel::FeishuApp => app_results.next(),
                    _ => None,
                };
                next.unwrap_or_else(|| Err(wrong_channel(r.channel)))
            })
            .collect()
    }

    /// Uploads an image (`POST /open-apis/im/v1/images`, `image_type=message`) or a file
    /// (`POST /open-apis/im/v1/files`, `file_type` from the file name) for app messages; answers
    /// the `image_key` or `file_key` that `image`, `file`, `audio` and `media` messages take.
    async fn upload_media(
        &self,
        channel: Channel,
        _account_id: i64,
        account: &Value,
        media: &Media,
    ) -> Result<String, SendError> {
        if channel != Channel::FeishuApp {
            return Err(SendError::not_supported(
                "media upload by a Feishu custom bot",
            ));
        }
        let account = AppAccount::parse(account).map_err(bad_account)?;
        let file_type = feishu_file_type(&media.filename);
        let (path, key, (content_type, body)) = if media.kind == "image" {
            let form = http::multipart(&[("image_type", "message")], "image", media);
            ("images", "image_key", form)
        } else {
            let form = http::multipart(
                &[("file_type", file_type), ("file_name", &media.filename)],
                "file",
                media,
            );
            ("files", "file_key", form)
        };
        let url = format!("{}/open-apis/im/v1/{path}", account.base_url);
        let answer = self
            .with_token(&account, |token| {
                self.client
                    .post(&url)
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, content_type.as_str())
                    .body(body.clone())
            })
            .await?;
        answer
            .pointer(&format!("/data/{key}"))
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| SendError::Retryable {
                code: "feishu_bad_answer".into(),
                detail: format!("the upload answered without `data.{key}`"),
                retry_after: None,
            })
    }

    /// Recalls an app message by its vendor message id. Custom bots cannot recall.
    async fn recall(
        &self,
        sent: &DeliveryEvent,
        _account_id: i64,
        account: &Value,
    ) -> Result<(), SendError> {
        match sent.channel {
            Channel::FeishuApp => {}
            Channel::FeishuRobot => {
                return Err(SendError::not_supported("recall by a Feishu custom bot"));
            }
            other => return Err(wrong_channel(other)),
        }
        let account = AppAccount::parse(account).map_err(bad_account)?;
        let message_id = sent
            .vendor_message_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| SendError::Permanent {
                code: "no_vendor_message_id".into(),
                detail: "the sent event has no Feishu message id to recall".into(),
            })?;
        let url = format!(
            "{}/open-apis/im/v1/messages/{}",
            account.base_url,
            utf8_percent_encode(message_id, PATH_SEGMENT)
        );
        match self
            .with_token(&account, |token| {
                self.client.delete(&url).bearer_auth(token)
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == format!("{VENDOR}_{ALREADY_DELETED}") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Feishu's `file_type` for a file name: `opus`, `mp4`, `pdf`, `doc`, `xls`, `ppt`, else
/// `stream`.
fn feishu_file_type(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "opus" => "opus",
        "mp4" => "mp4",
        "pdf" => "pdf",
        "doc" | "docx" => "doc",
        "xls" | "xlsx" => "xls",
        "ppt" | "pptx" => "ppt",
        _ => "stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::testkit::{self, Answer, Captured, VendorServer};
    use herald_core::State;
    use std::sync::atomic::{AtomicU32, Ordering};

    const HOOK: &str = "2b0e6c3a-9d1f-4e58-a0b7-5c2d8e4f1a93";
    const BOT_SECRET: &str = "bot-signing-secret-42";
    const APP_SECRET: &str = "app-secret-hunter2";

    fn sender(tokens: Arc<TokenCache>) -> FeishuSender {
        FeishuSender::new(http::client(), tokens)
    }

    async fn cache() -> (tempfile::TempDir, Arc<TokenCache>) {
        let (dir, store) = testkit::store().await;
        (dir, Arc::new(TokenCache::new(store)))
    }

    /// The bot's own signature check, written from Feishu's guide (not with `sign`): the key
    /// is "<timestamp>\n<secret>", the message empty, the result Base64; the timestamp within
    /// an hour.
    fn verify_bot_signature(body: &Value, secret: &str) -> Result<(), &'static str> {
        let timestamp = body["timestamp"]
            .as_str()
            .ok_or("timestamp is not a string")?;
        let ts: i64 = timestamp.parse().map_err(|_| "timestamp is not a number")?;
        if (chrono::Utc::now().timestamp() - ts).abs() > 3600 {
            return Err("timestamp is not within one hour");
        }
        let given = BASE64
            .decode(body["sign"].as_str().ok_or("no sign")?)
            .map_err(|_| "sign is not base64")?;
        let key = format!("{timestamp}\n{secret}");
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(b"");
        mac.verify_slice(&given).map_err(|_| "sign match fail")
    }

    /// A custom bot webhook that checks what Feishu checks and answers as it documents.
    async fn bot_server(secret: Option<&'static str>) -> VendorServer {
        VendorServer::start(move |req: &Captured| {
            if req.method != axum::http::Method::POST
                || req.path != format!("/open-apis/bot/v2/hook/{HOOK}")
            {
                return Answer::json(json!({"code": 19001, "data": {},
                    "msg": "param invalid: incoming webhook access token invalid"}));
            }
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return Answer::json(json!({"code": 9499, "msg": "Bad Request", "data": {}}));
            };
            if let Some(secret) = secret
                && verify_bot_signature(&body, secret).is_err()
            {
                return Answer::json(json!({"code": 19021, "msg":
                    "sign match fail or timestamp is not within one hour from current time"}));
            }
            let text = body
                .pointer("/content/text")
                .and_then(Value::as_str)
                .unwrap_or("");
            if text.contains("limited") {
                return Answer::json(json!({"code": 11232, "data": {}, "msg":
                    "frequency limited psm[lark.oapi.app_platform_runtime]appID[1500]"}));
            }
            if text.contains("no keyword") {
                return Answer::json(json!({"code": 19024, "msg": "Key Words Not Found"}));
            }
            if text.contains("broken") {
                return Answer::status(502, "<html>bad gateway</html>");
            }
            if text.contains("garbage") {
                return Answer::status(200, "<html>ok?</html>");
            }
            Answer::json(json!({"StatusCode": 0, "StatusMessage": "success",
                                "code": 0, "data": {}, "msg": "success"}))
        })
        .await
    }

    fn bot_account(server: &VendorServer, secret: Option<&str>) -> Value {
        let mut a = json!({"hook_id": HOOK, "base_url": server.url});
        if let Some(s) = secret {
            a["secret"] = json!(s);
        }
        a
    }

    fn bot_record(receiver: &str, content: Value) -> MessageRecord {
        testkit::record(Channel::FeishuRobot, receiver, content)
    }

    #[test]
    fn signature_matches_a_vector_computed_independently() {
        // The guide's example inputs (secret "demo", timestamp 1599360473); expected values from
        // python3: base64.b64encode(hmac.new(f"{ts}\n{secret}".encode(), b"",
        //   hashlib.sha256).digest())
        assert_eq!(
            sign("demo", 1_599_360_473),
            "l1N0gAcBjdwBvGm1xMjOF0XSyaLRpR7tuO5dHfhAYc8="
        );
        assert_eq!(
            sign("s3cr3t-key", 1_700_000_000),
            "p7mdtaDLrpDawfeIjiUK0YNRezB4CnxrQoyiuCpZzYM="
        );
    }

    #[tokio::test]
    async fn bot_text_is_signed_and_mentions_every_receiver_once() {
        let server = bot_server(Some(BOT_SECRET)).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let alert = json!({"msg_type": "text", "content": {"text": "disk full on db-1"}});
        let other = json!({"msg_type": "text", "content": {"text": "backup done"}});
        let r1 = bot_record("ou_aaa111", alert.clone());
        let r2 = bot_record("ou_bbb222", other.clone());
        let r3 = bot_record("@all", alert.clone());
        let r4 = bot_record("ou_ccc333", alert.clone());
        let results = s
            .send_batch(
                &[&r1, &r2, &r3, &r4],
                1,
                &bot_account(&server, Some(BOT_SECRET)),
            )
            .await;
        assert_eq!(results.len(), 4);
        for r in &results {
            let o = r.as_ref().unwrap();
            assert_eq!(o.vendor, "feishu");
            assert_eq!(o.vendor_message_id, None);
        }

        let seen = server.requests();
        assert_eq!(seen.len(), 2, "one request per distinct content");
        assert_eq!(
            seen[0].header("content-type"),
            "application/json; charset=utf-8"
        );
        let first = seen[0].json();
        let mut keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["content", "msg_type", "sign", "timestamp"]);
        assert_eq!(first["msg_type"], "text");
        assert_eq!(
            first["content"],
            json!({"text": "<at user_id=\"ou_aaa111\"></at> <at user_id=\"all\"></at> \
                         <at user_id=\"ou_ccc333\"></at> disk full on db-1"})
        );
        let second = seen[1].json();
        assert_eq!(
            second["content"]["text"],
            "<at user_id=\"ou_bbb222\"></at> backup done"
        );
        verify_bot_signature(&second, BOT_SECRET).unwrap();
    }

    #[tokio::test]
    async fn bot_bodies_per_message_type() {
        let server = bot_server(None).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let account = bot_account(&server, None);
        let post = json!({"msg_type": "post", "content": {"post": {
            "zh_cn": {"title": "发布", "content": [[{"tag": "text", "text": "v2 上线"}]]},
            "en_us": {"title": "Release", "content": [[{"tag": "text", "text": "v2 is out"}]]}}}});
        let image = json!({"msg_type": "image", "content": {"image_key": "img_ecffc3b9"}});
        let share = json!({"msg_type": "share_chat", "content": {"share_chat_id": "oc_f5b1"}});
        let card1 = json!({"msg_type": "interactive", "card": {
            "header": {"title": {"tag": "plain_text", "content": "Alert"}},
            "elements": [{"tag": "div", "text": {"tag": "lark_md", "content": "cpu 99%"}}]}});
        let card2 = json!({"msg_type": "interactive", "card": {"schema": "2.0",
            "body": {"elements": [{"tag": "markdown", "content": "cpu 99%"}]}}});
        let template = json!({"msg_type": "interactive", "card": {"type": "template",
            "data": {"template_id": "AAqk1", "template_variable": {"host": "db-1"}}}});
        for content in [&post, &image, &share, &card1, &card2, &template] {
            let r = bot_record("ou_aaa111", content.clone());
            s.send(&r, 1, &account).await.unwrap();
        }
        let seen: Vec<Value> = server.requests().iter().map(Captured::json).collect();
        assert_eq!(seen.len(), 6);
        for body in &seen {
            assert!(
                body.get("timestamp").is_none() && body.get("sign").is_none(),
                "{body}"
            );
        }
        let at = json!([{"tag": "at", "user_id": "ou_aaa111"}]);
        assert_eq!(
            seen[0],
            json!({"msg_type": "post", "content": {"post": {
                "zh_cn": {"title": "发布", "content": [[{"tag": "text", "text": "v2 上线"}], at]},
                "en_us": {"title": "Release",
                          "content": [[{"tag": "text", "text": "v2 is out"}], at]}}}})
        );
        assert_eq!(seen[1], image, "an image cannot mention anyone");
        assert_eq!(seen[2], share);
        let mention = json!({"tag": "markdown", "content": "<at id=ou_aaa111></at>"});
        assert_eq!(
            seen[3],
            json!({"msg_type": "interactive", "card": {
                "header": {"title": {"tag": "plain_text", "content": "Alert"}},
                "elements": [{"tag": "div", "text": {"tag": "lark_md", "content": "cpu 99%"}},
                             mention]}})
        );
        assert_eq!(seen[4]["card"]["body"]["elements"][1], mention);
        assert_eq!(seen[4]["card"]["schema"], "2.0");
        assert_eq!(seen[5], template, "a card template is sent as it is");
    }

    #[tokio::test]
    async fn bot_errors_map_to_retryable_or_permanent() {
        let server = bot_server(Some(BOT_SECRET)).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let account = bot_account(&server, Some(BOT_SECRET));
        let send = |text: &str, account: Value| {
            let r = bot_record(
                "ou_aaa111",
                json!({"msg_type": "text", "content": {"text": text}}),
            );
            let s = &s;
            async move { s.send(&r, 1, &account).await.unwrap_err() }
        };

        let e = send("rate limited", account.clone()).await;
        assert!(e.is_retryable(), "{e:?}");
        assert_eq!(e.code(), "feishu_11232");
        assert!(e.detail().contains("frequency limited"), "{e}");

        let e = send("no keyword here", account.clone()).await;
        assert!(!e.is_retryable());
        assert_eq!(e.code(), "feishu_19024");
        assert_eq!(e.detail(), "Key Words Not Found");

        let e = send("broken", account.clone()).await;
        assert!(e.is_retryable());
        assert_eq!(e.code(), "feishu_5xx");

        let e = send("garbage", account.clone()).await;
        assert!(!e.is_retryable(), "a bot resend could post twice");
        assert_eq!(e.code(), "feishu_bad_answer");

        // The bot's secret differs: Feishu refuses the signature.
        let mut wrong = account.clone();
        wrong["secret"] = json!("not-the-bots-secret");
        let e = send("hello", wrong).await;
        assert!(!e.is_retryable());
        assert_eq!(e.code(), "feishu_19021");

        // An invalid hook.
        let mut wrong = account.clone();
        wrong["hook_id"] = json!("0000");
        let e = send("hello", wrong).await;
        assert!(!e.is_retryable());
        assert_eq!(e.code(), "feishu_19001");
        assert!(!e.detail().contains("0000"));
    }

    #[test]
    fn codes_map_by_the_documented_tables() {
        let ok = HeaderMap::new();
        let e = |code, detail: &str, status: u16| {
            code_error(
                code,
                detail.into(),
                StatusCode::from_u16(status).unwrap(),
                &ok,
            )
        };
        assert!(!e(9499, "Bad Request", 200).is_retryable());
        assert!(e(9499, "too many request", 200).is_retryable());
        assert!(e(9499, "Bad Request", 429).is_retryable());
        for code in [
            99991400, 11232, 11233, 230020, 1500, 55001, 230049, 99991663,
        ] {
            assert!(e(code, "x", 400).is_retryable(), "{code}");
        }
        for code in [
            19001, 19002, 19021, 19022, 19024, 230001, 230002, 230013, 10014, 99991403,
        ] {
            let err = e(code, "x", 400);
            assert!(!err.is_retryable(), "{code}");
            assert_eq!(err.code(), format!("feishu_{code}"));
        }
        assert!(
            e(230001, "x", 503).is_retryable(),
            "5xx is retryable whatever the code"
        );
    }

    #[tokio::test]
    async fn bot_refuses_bad_receivers_alone() {
        let server = bot_server(None).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let content = json!({"msg_type": "text", "content": {"text": "hi"}});
        let good = bot_record("ou_aaa111", content.clone());
        let bad = bot_record("ou_x\"></at><at user_id=\"all", content.clone());
        let results = s
            .send_batch(&[&good, &bad], 1, &bot_account(&server, None))
            .await;
        assert!(results[0].is_ok());
        let e = results[1].as_ref().unwrap_err();
        assert_eq!(e.code(), "bad_receiver");
        let seen = server.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].json()["content"]["text"],
            "<at user_id=\"ou_aaa111\"></at> hi"
        );

        // Bad content fails without a request.
        let r = bot_record(
            "ou_aaa111",
            json!({"msg_type": "file", "content": {"file_key": "k"}}),
        );
        let e = s
            .send(&r, 1, &bot_account(&server, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "bad_content");
        assert_eq!(server.requests().len(), 1);

        let event = DeliveryEvent::for_record(&good, State::Sent, 1);
        let e = s
            .recall(&event, 1, &bot_account(&server, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "not_supported");
    }

    // --- app messages

    /// Feishu's app API: the token endpoint issues `t-1`, `t-2`, …; sends with a token listed in
    /// `rejected` get 99991663; the receiver decides the answer otherwise.
    struct AppServer {
        server: VendorServer,
        fetches: Arc<AtomicU32>,
    }

    async fn app_server(rejected: &'static [&'static str]) -> AppServer {
        let fetches = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&fetches);
        let server = VendorServer::start(move |req: &Captured| {
            if req.path == "/open-apis/auth/v3/tenant_access_token/internal" {
                let body = req.json();
                let app_id = body["app_id"].as_str().unwrap_or("");
                if req.method != axum::http::Method::POST
                    || !app_id.starts_with("cli_")
                    || body != json!({"app_id": app_id, "app_secret": APP_SECRET})
                {
                    return Answer::json(json!({"code": 10014, "msg": "app secret invalid"}));
                }
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                return Answer::json(json!({"code": 0, "msg": "ok",
                    "tenant_access_token": format!("t-{n}"), "expire": 7200}));
            }
            let token = req.header("authorization").strip_prefix("Bearer ").unwrap_or("");
            if !token.starts_with("t-") || rejected.contains(&token) {
                let mut a = Answer::json(json!({"code": 99991663, "msg":
                    "Invalid access token for authorization. Please make a request with token attached.",
                    "error": {"log_id": "20240827103845"}}));
                a.status = 400;
                return a;
            }
            if req.method == axum::http::Method::DELETE {
                return match req.path.as_str() {
                    "/open-apis/im/v1/messages/om_dc132645" => {
                        Answer::json(json!({"code": 0, "msg": "success", "data": {}}))
                    }
                    "/open-apis/im/v1/messages/om_gone" => {
                        let mut a = Answer::json(json!({"code": 230110, "msg":
                            "Action unavailable as the message has been deleted."}));
                        a.status = 400;
                        a
                    }
                    _ => {
                        let mut a = Answer::json(json!({"code": 230009, "msg":
                            "Message has expired when recall message."}));
                        a.status = 400;
                        a
                    }
                };
            }
            if req.method == axum::http::Method::POST
                && matches!(req.path.as_str(), "/open-apis/im/v1/images" | "/open-apis/im/v1/files")
            {
                // Feishu's own reading of the form: the text fields and the file part.
                let text = String::from_utf8_lossy(&req.body).to_string();
                let field = |name: &str| {
                    let head = format!("name=\"{name}\"\r\n\r\n");
                    text.split_once(&head)
                        .and_then(|(_, rest)| rest.split_once("\r\n"))
                        .map(|(v, _)| v.to_string())
                };
                let ok = req.header("content-type").starts_with("multipart/form-data; boundary=");
                return match (ok, req.path.as_str()) {
                    (true, "/open-apis/im/v1/images")
                        if field("image_type").as_deref() == Some("message")
                            && text.contains("name=\"image\"; filename=\"photo.png\"") =>
                    {
                        Answer::json(json!({"code": 0, "msg": "success", "data": {"image_key": "img_v2_041b28e3"}}))
                    }
                    (true, "/open-apis/im/v1/files")
                        if field("file_type").as_deref() == Some("pdf")
                            && field("file_name").as_deref() == Some("report.PDF")
                            && text.contains("name=\"file\"; filename=\"report.PDF\"") =>
                    {
                        Answer::json(json!({"code": 0, "msg": "success", "data": {"file_key": "file_v2_7e91"}}))
                    }
                    _ => {
                        let mut a = Answer::json(json!({"code": 234001, "msg": "Invalid request param."}));
                        a.status = 400;
                        a
                    }
                };
            }
            if req.method != axum::http::Method::POST || req.path != "/open-apis/im/v1/messages" {
                return Answer::status(404, "404 page not found");
            }
            let body = req.json();
            let error = |status: u16, code: i64, msg: &str| {
                let mut a = Answer::json(json!({"code": code, "msg": msg,
                    "error": {"log_id": "2024091108525"}}));
                a.status = status;
                a
            };
            match body["receive_id"].as_str().unwrap_or("") {
                "ou_busy" => error(429, 99991400, "request trigger frequency limit")
                    .with_header("x-ogw-ratelimit-limit", "100")
                    .with_header("x-ogw-ratelimit-reset", "52"),
                "ou_busy_old" => error(400, 99991400, "request trigger frequency limit")
                    .with_header("x-ogw-ratelimit-reset", "7"),
                "ou_gone" => error(400, 230013, "Bot has NO availability to this user."),
                "oc_elsewhere" => error(400, 230002, "The bot can not be outside the group."),
                "" => error(400, 230001, "Your request contains an invalid request parameter, ext=invalid receive_id."),
                receiver => Answer::json(json!({"code": 0, "msg": "success", "data": {
                    "message_id": format!("om_{receiver}"), "msg_type": body["msg_type"],
                    "deleted": false, "updated": false, "chat_id": "oc_5ad11d72",
                    "body": {"content": body["content"]}}})),
            }
        })
        .await;
        AppServer { server, fetches }
    }

    fn app_account(server: &VendorServer) -> Value {
        json!({"app_id": "cli_a1b2c3", "app_secret": APP_SECRET, "base_url": server.url})
    }

    fn app_record(receiver: &str, content: Value) -> MessageRecord {
        testkit::record(Channel::FeishuApp, receiver, content)
    }

    #[tokio::test]
    async fn app_sends_with_a_cached_token_and_the_message_id_as_uuid() {
        let app = app_server(&[]).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let content = json!({"msg_type": "text",
                             "content": {"text": "<at user_id=\"all\"></at> 订单已发货"}});
        let r = app_record("ou_7d8a6e", content.clone());
        let mut account = app_account(&app.server);
        account["receive_id_type"] = json!("user_id");
        let o = s.send(&r, 1, &account).await.unwrap();
        assert_eq!(o.vendor, "feishu");
        assert_eq!(o.vendor_message_id.as_deref(), Some("om_ou_7d8a6e"));
        let post = json!({"msg_type": "post", "content": {"zh_cn": {"title": "T",
                          "content": [[{"tag": "text", "text": "hi"}]]}}});
        let r2 = app_record("ou_second", post.clone());
        s.send(&r2, 1, &account).await.unwrap();
        assert_eq!(app.fetches.load(Ordering::SeqCst), 1, "the token is cached");

        let seen = app.server.requests();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].method, axum::http::Method::POST);
        assert_eq!(
            seen[0].path,
            "/open-apis/auth/v3/tenant_access_token/internal"
        );
        assert_eq!(
            seen[0].header("content-type"),
            "application/json; charset=utf-8"
        );
        assert_eq!(
            seen[0].json(),
            json!({"app_id": "cli_a1b2c3", "app_secret": APP_SECRET})
        );
        let send = &seen[1];
        assert_eq!(send.method, axum::http::Method::POST);
        assert_eq!(send.path, "/open-apis/im/v1/messages");
        assert_eq!(
            send.query_param("receive_id_type").as_deref(),
            Some("user_id")
        );
        assert_eq!(send.header("authorization"), "Bearer t-1");
        assert_eq!(
            send.header("content-type"),
            "application/json; charset=utf-8"
        );
        let body = send.json();
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["content", "msg_type", "receive_id", "uuid"]);
        assert_eq!(body["receive_id"], "ou_7d8a6e");
        assert_eq!(body["msg_type"], "text");
        assert_eq!(body["uuid"], r.message_id.to_string());
        // `content` is a JSON string holding the template's content object.
        let inner: Value = serde_json::from_str(body["content"].as_str().unwrap()).unwrap();
        assert_eq!(inner, content["content"]);
        let inner: Value =
            serde_json::from_str(seen[2].json()["content"].as_str().unwrap()).unwrap();
        assert_eq!(inner, post["content"]);
        assert_eq!(seen[2].header("authorization"), "Bearer t-1");
    }

    #[tokio::test]
    async fn app_message_types_are_sent_as_content_strings() {
        let app = app_server(&[]).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let card = json!({"schema": "2.0", "body": {"elements": [
            {"tag": "markdown", "content": "<at id=all></at> deploy done"}]}});
        let cases = [
            (
                json!({"msg_type": "image", "content": {"image_key": "img_7ea7"}}),
                "image",
                json!({"image_key": "img_7ea7"}),
            ),
            (
                json!({"msg_type": "interactive", "card": card.clone()}),
                "interactive",
                card,
            ),
            (
                json!({"msg_type": "share_chat", "content": {"chat_id": "oc_0dd2"}}),
                "share_chat",
                json!({"chat_id": "oc_0dd2"}),
            ),
            (
                json!({"msg_type": "file", "content": {"file_key": "file_v2_1"}}),
                "file",
                json!({"file_key": "file_v2_1"}),
            ),
        ];
        let records: Vec<MessageRecord> = cases
            .iter()
            .map(|(c, _, _)| app_record("oc_84983ff6", c.clone()))
            .collect();
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let mut account = app_account(&app.server);
        account["receive_id_type"] = json!("chat_id");
        for r in s.send_batch(&refs, 1, &account).await {
            assert_eq!(
                r.unwrap().vendor_message_id.as_deref(),
                Some("om_oc_84983ff6")
            );
        }
        let sends: Vec<Captured> = app
            .server
            .requests()
            .into_iter()
            .filter(|c| c.path == "/open-apis/im/v1/messages")
            .collect();
        assert_eq!(sends.len(), 4);
        for (i, (_, msg_type, content)) in cases.iter().enumerate() {
            // Concurrent sends arrive in any order: find this record's by its uuid.
            let uuid = records[i].message_id.to_string();
            let send = sends
                .iter()
                .find(|c| c.json()["uuid"] == uuid.as_str())
                .unwrap();
            let body = send.json();
            assert_eq!(body["msg_type"], *msg_type);
            assert_eq!(
                send.query_param("receive_id_type").as_deref(),
                Some("chat_id")
            );
            let inner: Value = serde_json::from_str(body["content"].as_str().unwrap()).unwrap();
            assert_eq!(inner, *content);
        }
        assert_eq!(app.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_invalid_token_is_refreshed_once() {
        // The first token Feishu issues is rejected (revoked early); the module must drop it,
        // fetch `t-2` and send again with the same uuid.
        let app = app_server(&["t-1"]).await;
        let (_dir, tokens) = cache().await;
        let s = sender(Arc::clone(&tokens));
        let r = app_record(
            "ou_7d8a6e",
            json!({"msg_type": "text", "content": {"text": "hi"}}),
        );
        let o = s.send(&r, 1, &app_account(&app.server)).await.unwrap();
        assert_eq!(o.vendor_message_id.as_deref(), Some("om_ou_7d8a6e"));
        assert_eq!(app.fetches.load(Ordering::SeqCst), 2);
        let sends: Vec<Captured> = app
            .server
            .requests()
            .into_iter()
            .filter(|c| c.path == "/open-apis/im/v1/messages")
            .collect();
        assert_eq!(sends.len(), 2);
        assert_eq!(sends[0].header("authorization"), "Bearer t-1");
        assert_eq!(sends[1].header("authorization"), "Bearer t-2");
        assert_eq!(sends[0].json()["uuid"], sends[1].json()["uuid"]);
        // The new token is the cached one now.
        s.send(&r, 1, &app_account(&app.server)).await.unwrap();
        assert_eq!(app.fetches.load(Ordering::SeqCst), 2);

        // Every token rejected: one refresh, then a retryable error, no loop.
        let app = app_server(&["t-1", "t-2", "t-3"]).await;
        let (_dir2, tokens) = cache().await;
        let s = sender(tokens);
        let e = s.send(&r, 1, &app_account(&app.server)).await.unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.code(), "feishu_99991663");
        assert!(e.detail().contains("log_id 20240827103845"), "{e}");
        assert_eq!(app.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn app_rate_limits_are_retryable_and_refusals_permanent() {
        let app = app_server(&[]).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let account = app_account(&app.server);
        let text = json!({"msg_type": "text", "content": {"text": "hi"}});
        let recs: Vec<MessageRecord> =
            ["ou_busy", "ou_busy_old", "ou_gone", "oc_elsewhere", "ou_ok"]
                .iter()
                .map(|r| app_record(r, text.clone()))
                .collect();
        let refs: Vec<&MessageRecord> = recs.iter().collect();
        let results = s.send_batch(&refs, 1, &account).await;

        let SendError::Retryable {
            code, retry_after, ..
        } = results[0].clone().unwrap_err()
        else {
            panic!("{:?}", results[0])
        };
        assert_eq!(code, "feishu_99991400");
        assert_eq!(retry_after, Some(Duration::from_secs(52)));
        // Older APIs answer the rate limit with HTTP 400.
        let SendError::Retryable { retry_after, .. } = results[1].clone().unwrap_err() else {
            panic!("{:?}", results[1])
        };
        assert_eq!(retry_after, Some(Duration::from_secs(7)));
        let e = results[2].as_ref().unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(e.code(), "feishu_230013");
        assert_eq!(
            e.detail(),
            "Bot has NO availability to this user. (log_id 2024091108525)"
        );
        assert_eq!(results[3].as_ref().unwrap_err().code(), "feishu_230002");
        assert_eq!(
            results[4].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("om_ou_ok"),
            "one receiver's failure is not the batch's"
        );
        assert_eq!(app.fetches.load(Ordering::SeqCst), 1);

        // A wrong app secret: the token endpoint refuses, permanently, without quoting it.
        let mut wrong = account.clone();
        wrong["app_id"] = json!("cli_wrong");
        wrong["app_secret"] = json!("not-the-secret");
        let e = s.send(&recs[4], 1, &wrong).await.unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(e.code(), "feishu_10014");
        assert!(!e.detail().contains("not-the-secret"), "{e}");

        // Feishu down: the token endpoint unreachable is retryable.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut down = app_account(&app.server);
        down["app_id"] = json!("cli_other");
        down["base_url"] = json!(format!("http://127.0.0.1:{port}"));
        let e = s.send(&recs[4], 1, &down).await.unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.code(), "feishu_connect");
    }

    #[tokio::test]
    async fn app_messages_are_recalled_by_their_vendor_id() {
        let app = app_server(&[]).await;
        let (_dir, tokens) = cache().await;
        let s = sender(tokens);
        let account = app_account(&app.server);
        let r = app_record(
            "ou_7d8a6e",
            json!({"msg_type": "text", "content": {"text": "hi"}}),
        );
        let mut event = DeliveryEvent::for_record(&r, State::Sent, 1);
        event.vendor = Some("feishu".into());
        event.vendor_message_id = Some("om_dc132645".into());
        s.recall(&event, 1, &account).await.unwrap();
        let seen = app.server.requests();
        let delete = seen.last().unwrap();
        assert_eq!(delete.method, axum::http::Method::DELETE);
        assert_eq!(delete.path, "/open-apis/im/v1/messages/om_dc132645");
        assert_eq!(delete.header("authorization"), "Bearer t-1");

        // Already gone counts as recalled; too old is permanent.
        event.vendor_message_id = Some("om_gone".into());
        s.recall(&event, 1, &account).await.unwrap();
        event.vendor_message_id = Some("om_old".into());
        let e = s.recall(&event, 1, &account).await.unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(e.code(), "feishu_230009");
        event.vendor_message_id = None;
        let e = s.recall(&event, 1, &account).await.unwrap_err();
        assert_eq!(e.code(), "no_vendor_message_id");
        assert_eq!(app.fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let robot = RobotAccount::parse(&json!({"hook_id": HOOK, "secret": BOT_SECRET})).unwrap();
        assert_eq!(robot.base_url, "https://open.feishu.cn");
        let debug = format!("{robot:?}");
        assert!(
            !debug.contains(HOOK) && !debug.contains(BOT_SECRET),
            "{debug}"
        );
        let lark = RobotAccount::parse(&json!({"hook_id": HOOK,
                                               "base_url": "https://open.larksuite.com/"}))
        .unwrap();
        assert_eq!(lark.base_url, "https://open.larksuite.com");
        assert!(lark.secret.is_none());

        let app =
            AppAccount::parse(&json!({"app_id": "cli_a1", "app_secret": APP_SECRET})).unwrap();
        assert_eq!(app.receive_id_type, ReceiveIdType::OpenId);
        assert!(!format!("{app:?}").contains(APP_SECRET));
        for (t, want) in [
            ("user_id", ReceiveIdType::UserId),
            ("union_id", ReceiveIdType::UnionId),
            ("email", ReceiveIdType::Email),
            ("chat_id", ReceiveIdType::ChatId),
        ] {
            let a = AppAccount::parse(&json!({"app_id": "cli_a1", "app_secret": APP_SECRET,
                                               "receive_id_type": t}))
            .unwrap();
            assert_eq!(a.receive_id_type, want);
            assert_eq!(a.receive_id_type.as_str(), t);
        }

        let bad_robots = [
            json!({}),
            json!(HOOK),
            json!({"hook_id": 1234}),
            json!({"hook_id": ""}),
            json!({"hook_id": format!("https://open.feishu.cn/open-apis/bot/v2/hook/{HOOK}")}),
            json!({"hook_id": "ab cd"}),
            json!({"hook_id": HOOK, "secret": 1234}),
            json!({"hook_id": HOOK, "secret": ""}),
            json!({"hook_id": HOOK, "base_url": "ftp://open.feishu.cn"}),
            json!({"hook_id": HOOK, "base_url": "not a url"}),
            json!({"hook_id": HOOK, "base_url": "https://open.feishu.cn/?x=1"}),
            json!({"hook_id": HOOK, "webhook": "x"}),
        ];
        for config in bad_robots {
            let err = check_account(Channel::FeishuRobot, &config).unwrap_err();
            assert!(
                !err.contains(HOOK) && !err.contains("1234") && !err.contains(BOT_SECRET),
                "{config}: {err}"
            );
        }
        let bad_apps = [
            json!({"app_secret": APP_SECRET}),
            json!({"app_id": "cli_a1"}),
            json!({"app_id": "", "app_secret": APP_SECRET}),
            json!({"app_id": "cli_a1", "app_secret": ""}),
            json!({"app_id": "cli_a1", "app_secret": 1234}),
            json!({"app_id": "cli_a1", "app_secret": APP_SECRET, "receive_id_type": "mobile"}),
            json!({"app_id": "cli_a1", "app_secret": APP_SECRET, "secret": "x"}),
            json!({"app_id": "cli_a1", "app_secret": APP_SECRET, "base_url": "open.feishu.cn"}),
        ];
        for config in bad_apps {
            let err = check_account(Channel::FeishuApp, &config).unwrap_err();
            assert!(
                !err.contains(APP_SECRET) && !err.contains("1234"),
                "{config}: {err}"
            );
        }
        assert!(check_account(Channel::Sms, &json!({})).is_err());
    }

    #[test]
    fn contents_are_checked_per_channel() {
        let robot = Channel::FeishuRobot;
        let app = Channel::FeishuApp;
        let post_app = json!({"msg_type": "post", "content": {"zh_cn": {"title": "t",
                              "content": [[{"tag": "text", "text": "x"}]]}}});
        let post_bot = json!({"msg_type": "post", "content": {"post": post_app["content"]}});
        let ok = [
            (
                robot,
                json!({"msg_type": "text", "content": {"text": "hi"}}),
            ),
            (robot, post_bot.clone()),
            (
                robot,
                json!({"msg_type": "image", "content": {"image_key": "img_1"}}),
            ),
            (
                robot,
                json!({"msg_type": "share_chat", "content": {"share_chat_id": "oc_1"}}),
            ),
            (
                robot,
                json!({"msg_type": "interactive", "card": {"elements": []}}),
            ),
            (app, json!({"msg_type": "text", "content": {"text": ""}})),
            (app, post_app.clone()),
            (
                app,
                json!({"msg_type": "share_chat", "content": {"chat_id": "oc_1"}}),
            ),
            (
                app,
                json!({"msg_type": "share_user", "content": {"user_id": "ou_1"}}),
            ),
            (
                app,
                json!({"msg_type": "media", "content": {"file_key": "f", "image_key": "i"}}),
            ),
            (
                app,
                json!({"msg_type": "sticker", "content": {"file_key": "f"}}),
            ),
            (
                app,
                json!({"msg_type": "interactive", "card": {"type": "template",
                          "data": {"template_id": "AAq"}}}),
            ),
        ];
        for (channel, content) in ok {
            check_content(channel, &content).unwrap_or_else(|e| panic!("{content}: {e}"));
        }
        let bad = [
            (robot, json!("text")),
            (robot, json!({"content": {"text": "hi"}})),
            (robot, json!({"msg_type": 1, "content": {"text": "hi"}})),
            (robot, json!({"msg_type": "text", "content": {"text": 1}})),
            (robot, json!({"msg_type": "text", "content": "hi"})),
            (
                robot,
                json!({"msg_type": "text", "content": {"text": "hi"}, "extra": 1}),
            ),
            (robot, json!({"msg_type": "text", "card": {"text": "hi"}})),
            (robot, post_app.clone()),
            (
                robot,
                json!({"msg_type": "share_user", "content": {"user_id": "ou_1"}}),
            ),
            (
                robot,
                json!({"msg_type": "image", "content": {"image_key": ""}}),
            ),
            (
                robot,
                json!({"msg_type": "interactive", "content": {"elements": []}}),
            ),
            (robot, json!({"msg_type": "interactive", "card": {}})),
            (app, post_bot.clone()),
            (app, json!({"msg_type": "post", "content": {}})),
            (
                app,
                json!({"msg_type": "post", "content": {"zh_cn": {"content": ["flat"]}}}),
            ),
            (
                app,
                json!({"msg_type": "share_chat", "content": {"share_chat_id": "oc_1"}}),
            ),
            (app, json!({"msg_type": "system", "content": {}})),
            (app, json!({"msg_type": "file", "content": {}})),
        ];
        for (channel, content) in bad {
            assert!(
                check_content(channel, &content).is_err(),
                "{channel}: {content}"
            );
        }
    }

    #[tokio::test]
    async fn images_and_files_are_uploaded_for_app_messages() {
        let app = app_server(&["t-1"]).await;
        let (_dir, tokens) = cache().await;
        let sender = FeishuSender::new(http::client(), tokens);
        let media = |kind: &str, filename: &str| Media {
            kind: kind.into(),
            filename: filename.into(),
            content_type: "application/octet-stream".into(),
            bytes: bytes::Bytes::from_static(b"\x00\x01binary"),
        };
        let account = app_account(&app.server);
        let key = sender
            .upload_media(
                Channel::FeishuApp,
                1,
                &account,
                &media("image", "photo.png"),
            )
            .await
            .unwrap();
        assert_eq!(key, "img_v2_041b28e3");
        // The first token was refused: one refresh, then the upload went through.
        assert_eq!(app.fetches.load(Ordering::SeqCst), 2);
        let key = sender
            .upload_media(
                Channel::FeishuApp,
                1,
                &account,
                &media("file", "report.PDF"),
            )
            .await
            .unwrap();
        assert_eq!(key, "file_v2_7e91");
        let err = sender
            .upload_media(Channel::FeishuApp, 1, &account, &media("file", "notes.txt"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "feishu_234001");
        assert!(!err.is_retryable());
        let robot = json!({"hook_id": "abc"});
        assert_eq!(
            sender
                .upload_media(Channel::FeishuRobot, 1, &robot, &media("image", "a.png"))
                .await
                .unwrap_err()
                .code(),
            "not_supported"
        );
        assert_eq!(feishu_file_type("a.docx"), "doc");
        assert_eq!(feishu_file_type("noext"), "stream");
    }
}

//! DingTalk (钉钉): custom group robots (`dingtalk_robot`, 自定义机器人) and work notices
//! (`dingtalk_work`, 工作通知), both through the open platform's `oapi` API. Events carry the
//! vendor name `dingtalk`.
//!
//! # Robot (`dingtalk_robot`)
//!
//! A custom robot posts to the one group it was added to; the message's receivers are the people
//! to mention (@) in that group. Account config:
//!
//! ```json
//! {"access_token": "…", "secret": "SEC…", "base_url": "https://oapi.dingtalk.com"}
//! ```
//!
//! - `access_token`: the `access_token` query parameter of the robot's webhook URL (the token
//!   alone, not the URL).
//! - `secret` (optional): the signing secret (加签, `SEC…`) when the robot's security setting is
//!   signing; left out for robots secured by keywords or IP ranges only.
//! - `base_url` (optional, default `https://oapi.dingtalk.com`): the API origin.
//!
//! A message is `POST {base_url}/robot/send?access_token=…&timestamp=…&sign=…` with the
//! message as a UTF-8 JSON body. With a secret, `timestamp` is the time in milliseconds and
//! `sign` is `urlEncode(base64(HmacSHA256(key = secret, message = timestamp + "\n" + secret)))`
//! ([`sign`] computes the base64; the query serialiser does the URL encoding); DingTalk refuses
//! timestamps more than an hour off.
//!
//! Content is the robot message without `at` (`msgtype` and the object of that name):
//!
//! ```json
//! {"msgtype": "text", "text": {"content": "Deploy of {$app} finished"}}
//! {"msgtype": "markdown", "markdown": {"title": "Deploy", "text": "#### {$app}\n> done"}}
//! {"msgtype": "link", "link": {"title": "…", "text": "…", "messageUrl": "https://…", "picUrl": "https://…"}}
//! {"msgtype": "actionCard", "actionCard": {"title": "…", "text": "…", "singleTitle": "Open", "singleURL": "https://…"}}
//! {"msgtype": "actionCard", "actionCard": {"title": "…", "text": "…", "btnOrientation": "0",
//!                                          "btns": [{"title": "Yes", "actionURL": "https://…"}]}}
//! {"msgtype": "feedCard", "feedCard": {"links": [{"title": "…", "messageURL": "https://…", "picURL": "https://…"}]}}
//! ```
//!
//! Mentions: for `text` and `markdown` messages, `at` is built from the receivers — `@all` sets
//! `isAtAll`; a mainland mobile (`13800000000`, `+8613800000000`) or another E.164 number goes
//! to `atMobiles` (mainland numbers without `+86`); anything else is a userid in `atUserIds`.
//! DingTalk only highlights a mention whose `@<mobile>` / `@<userid>` also appears in the text,
//! so the missing ones are appended (after a space for `text`, on a new paragraph for
//! `markdown`). The other types cannot mention anyone: they are posted as they are. Messages of a
//! batch with identical content are posted once, mentioning all of their receivers — the robot
//! may post at most 20 messages a minute.
//!
//! Robots give no message id (`vendor_message_id` is `None`), cannot recall and send no receipts.
//!
//! # Work notices (`dingtalk_work`)
//!
//! Notices from an internal app to members of the organisation; receivers are userids, or
//! `@all` for everyone. Account config:
//!
//! ```json
//! {"app_key": "dingxxxx", "app_secret": "…", "agent_id": 836390886, "base_url": "https://oapi.dingtalk.com"}
//! ```
//!
//! - `app_key`, `app_secret`: the app's credentials, exchanged for an access token
//!   (`GET /gettoken?appkey&appsecret`, valid 7200 s) cached under `dingtalk:<app_key>`.
//! - `agent_id`: the app's AgentId (an integer).
//! - `base_url` (optional, default `https://oapi.dingtalk.com`): the API origin.
//!
//! Content is the `msg` object of `asyncsend_v2`:
//!
//! ```json
//! {"msgtype": "text", "text": {"content": "…"}}
//! {"msgtype": "image", "image": {"media_id": "@lADO…"}}
//! {"msgtype": "voice", "voice": {"media_id": "@lADO…", "duration": "10"}}
//! {"msgtype": "file", "file": {"media_id": "@lADO…"}}
//! {"msgtype": "link", "link": {"messageUrl": "https://…", "picUrl": "@lADO…", "title": "…", "text": "…"}}
//! {"msgtype": "markdown", "markdown": {"title": "…", "text": "…"}}
//! {"msgtype": "oa", "oa": {"message_url": "https://…", "head": {"bgcolor": "FFBBBBBB", "text": "…"},
//!                          "body": {"title": "…", "form": [{"key": "…", "value": "…"}], "content": "…"}}}
//! {"msgtype": "action_card", "action_card": {"title": "…", "markdown": "…",
//!                                            "single_title": "Open", "single_url": "https://…"}}
//! ```
//!
//! (`action_card` takes `btn_orientation` and `btn_json_list: [{title, action_url}]` instead of
//! the single button.) Required fields are checked; other fields of the message object are
//! passed to DingTalk as given.
//!
//! A notice is `POST /topapi/message/corpconversation/asyncsend_v2?access_token=…` with
//! `{"agent_id", "userid_list": "u1,u2", "msg"}` (or `"to_all_user": true` for `@all`), answered
//! by `{"errcode": 0, "task_id": 123}`; the task id is every receiver's `vendor_message_id`.
//! Messages of a batch with the same content from the same request share one task (up to 100
//! userids, the most `getsendresult` answers for); a task is never shared across requests,
//! because a recall takes back the whole task.
//!
//! - Receipts: [`Sender::pull_receipts`] asks `getsendresult` (`{agent_id, task_id}`, tasks of
//!   the last 24 hours) per task. Users in `read_user_id_list` or `unread_user_id_list` are
//!   delivered; `failed_user_id_list` (`dingtalk_send_failed`), `invalid_user_id_list`
//!   (`dingtalk_invalid_user`) and `forbidden_user_id_list` (flow control — the code of the
//!   user's `forbidden_list` entry, e.g. `dingtalk_143106` for the same content twice a day, else
//!   `dingtalk_forbidden`) failed; users in no list yet have no receipt yet. `@all` has no
//!   per-user receipt.
//! - Recall: `POST /topapi/message/corpconversation/recall` with `{agent_id, msg_task_id}`,
//!   within 24 hours of sending; it takes back the whole task.
//! - Media: `POST /media/upload?access_token=…&type=…` with a `multipart/form-data` body
//!   (fields `type` and `media`), answered with the `media_id` that `image`, `voice`, `file`,
//!   `link.picUrl` and `oa` messages reference. Kinds `image` (jpg, gif, png, bmp), `voice` (amr,
//!   mp3, wav; 2 MB at most), `video` (mp4) and `file` (doc, docx, xls, xlsx, ppt, pptx, zip, pdf,
//!   rar), 20 MB at most.
//!
//! # Errors
//!
//! Transport failures and HTTP 408/429/5xx are retryable (`dingtalk_timeout`, `dingtalk_5xx`,
//! …, honouring `Retry-After`). DingTalk answers errors as `{"errcode": n, "errmsg": …}` with
//! HTTP 200; they become `dingtalk_<errcode>`, with the errmsg as detail (`88` carries the real
//! code in `sub_code`, which is used instead):
//!
//! - retryable: `-1` system busy (`dingtalk_system_busy`); the robot's `130101` (more than 20
//!   messages a minute: the robot is throttled for 10 minutes, so `retry_after` is 600 s);
//!   flow control `90002` (all apps on one API), `90018`, `90019` (per-app rate limits) and
//!   `143103`, `143104`, `143203`, `143204` (notice recipients per minute); DingTalk's gateway
//!   throttle answer `{"status": 1111, "wait": <minutes>}` (`dingtalk_throttled`, retry after
//!   `wait` minutes). An answer that is not JSON is `dingtalk_bad_response`, also retryable.
//! - token: `40014` (invalid access token), `42001` (expired) and `40001` invalidate the cached
//!   token; the request is tried once more with a fresh one, and fails with that code if the fresh
//!   token is refused too.
//! - permanent: everything else, for example the robot's `310000` (keyword, signature or IP
//!   check failed) and `300001` (no such robot token), or `40035` (invalid parameter).
//!
//! Account and content errors are `bad_account` / `bad_content`; details never quote a secret.
//!
//! # Documentation
//!
//! - Custom robot, signing and rate limit:
//!   https://open.dingtalk.com/document/orgapp/custom-robot-access
//! - Access token: https://open.dingtalk.com/document/orgapp/obtain-orgapp-token
//! - Send a work notice:
//!   https://help.dingtalk.io/open/development/asynchronous-sending-of-enterprise-session-messages
//!   and https://developer.alibaba.com/docs/api.htm?apiId=37692
//! - Send result: https://help.dingtalk.io/open/development/gets-the-result-of-sending-messages-asynchronously-to-the-enterprise
//!   and https://developer.alibaba.com/docs/api.htm?apiId=37024
//! - Recall: https://help.dingtalk.io/open/development/notification-of-work-withdrawal
//! - Media upload: https://help.dingtalk.io/open/development/upload-media-files
//! - Global error codes: https://open.dingtalk.com/document/orgapp/server-api-error-codes-1
//!   and API rate limits: https://open.dingtalk.com/document/orgapp/invocation-frequency-limit

use super::http::{self, bad_account, bad_content};
use super::token::{FreshToken, TokenCache};
use super::{Media, SendError, SendOutcome, Sender};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use herald_core::config::Secret;
use herald_core::store::PendingReceipt;
use herald_core::{Channel, DeliveryEvent, MessageRecord, Receipt};
use hmac::{Hmac, Mac};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, RequestBuilder};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// The vendor name on delivery events and receipts.
pub const VENDOR: &str = "dingtalk";

/// The API origin when an account sets no `base_url`.
const DEFAULT_BASE_URL: &str = "https://oapi.dingtalk.com";

/// The most receivers one work notice request carries (and the most `getsendresult` answers for).
pub const MAX_BATCH: usize = 100;

/// The receiver that means "everyone" (`isAtAll` for robots, `to_all_user` for work notices).
const ALL: &str = "@all";

/// How long a robot that exceeded 20 messages a minute is throttled.
const ROBOT_THROTTLE: Duration = Duration::from_secs(600);

/// `getsendresult` and `recall` only know tasks of the last 24 hours.
const TASK_LIFETIME_MS: i64 = 24 * 60 * 60 * 1000;

/// A token's lifetime when `gettoken` does not say.
const DEFAULT_TOKEN_SECONDS: u64 = 7200;

/// Errcodes worth retrying: system busy, the robot's rate limit, and flow control.
const RETRYABLE_CODES: [i64; 9] = [
    -1, 130101, 90002, 90018, 90019, 143103, 143104, 143203, 143204,
];

/// Errcodes that mean the access token is invalid or expired.
const TOKEN_CODES: [&str; 3] = ["dingtalk_40001", "dingtalk_40014", "dingtalk_42001"];

/// Robot message types.
const ROBOT_TYPES: [&str; 5] = ["text", "markdown", "link", "actionCard", "feedCard"];

/// Work notice message types.
const WORK_TYPES: [&str; 8] = [
    "text",
    "image",
    "voice",
    "file",
    "link",
    "markdown",
    "oa",
    "action_card",
];

/// Media kinds `media/upload` takes, and the largest file of each.
const MEDIA_LIMITS: [(&str, usize); 4] = [
    ("image", 20 << 20),
    ("voice", 2 << 20),
    ("video", 20 << 20),
    ("file", 20 << 20),
];

/// The robot's `sign` query parameter before URL encoding:
/// `base64(HmacSHA256(key = secret, message = "<timestamp_ms>\n<secret>"))`.
pub fn sign(secret: &str, timestamp_ms: i64) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp_ms}\n{secret}").as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// A robot account, parsed from its stored config (see the module docs).
#[derive(Debug, Clone)]
pub struct RobotAccount {
    /// The webhook's `access_token`.
    pub access_token: Secret,
    /// The signing secret, when the robot signs.
    pub secret: Option<Secret>,
    /// The API origin, without a trailing slash.
    pub base_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRobot {
    access_token: Secret,
    #[serde(default)]
    secret: Option<Secret>,
    #[serde(default)]
    base_url: Option<String>,
}

impl RobotAccount {
    /// Parses and checks a robot account's config; the error never quotes a secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        check_secret_types(
            config,
            "a DingTalk robot account",
            &["access_token", "secret"],
        )?;
        let stored: StoredRobot =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        let token = stored.access_token.expose();
        if token.is_empty() {
            return Err("`access_token` is empty".into());
        }
        if token.contains("://") || token.contains('=') || token.contains('&') {
            return Err(
                "`access_token` must be the token alone (the value after `access_token=` in \
                 the webhook URL), not the URL"
                    .into(),
            );
        }
        if stored
            .secret
            .as_ref()
            .is_some_and(|s| s.expose().is_empty())
        {
            return Err("`secret` is empty (leave it out when the robot does not sign)".into());
        }
        Ok(RobotAccount {
            access_token: stored.access_token,
            secret: stored.secret,
            base_url: http::base_url(stored.base_url, DEFAULT_BASE_URL)?,
        })
    }
}

/// A work notice account, parsed from its stored config (see the module docs).
#[derive(Debug, Clone)]
pub struct WorkAccount {
    /// The app's AppKey (also the token cache key).
    pub app_key: String,
    /// The app's AppSecret.
    pub app_secret: Secret,
    /// The app's AgentId.
    pub agent_id: i64,
    /// The API origin, without a trailing slash.
    pub base_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredWork {
    app_key: String,
    app_secret: Secret,
    agent_id: i64,
    #[serde(default)]
    base_url: Option<String>,
}

impl WorkAccount {
    /// Parses and checks a work notice account's config; the error never quotes a secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        check_secret_types(config, "a DingTalk work account", &["app_secret"])?;
        let stored: StoredWork =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        if stored.app_key.trim().is_empty() {
            return Err("`app_key` is empty".into());
        }
        if stored.app_secret.expose().is_empty() {
            return Err("`app_secret` is empty".into());
        }
        if stored.agent_id <= 0 {
            return Err("`agent_id` must be a positive integer".into());
        }
        Ok(WorkAccount {
            app_key: stored.app_key,
            app_secret: stored.app_secret,
            agent_id: stored.agent_id,
            base_url: http::base_url(stored.base_url, DEFAULT_BASE_URL)?,
        })
    }

    /// The token cache key of this app.
    fn token_key(&self) -> String {
        format!("{VENDOR}:{}", self.app_key)
    }
}

/// Refuses a config that is not an object, or whose secret fields are not strings, before serde
/// sees it: serde quotes ill-typed values in its errors.
fn check_secret_types(config: &Value, what: &str, secrets: &[&str]) -> Result<(), String> {
    let obj = config
        .as_object()
        .ok_or_else(|| format!("{what} must be a JSON object"))?;
    match secrets
        .iter()
        .find(|k| obj.get(**k).is_some_and(|v| !v.is_string()))
    {
        Some(k) => Err(format!("`{k}` must be a string")),
        None => Ok(()),
    }
}

/// Checks an account config of `channel`.
pub fn check_account(channel: Channel, config: &Value) -> Result<(), String> {
    match channel {
        Channel::DingtalkRobot => RobotAccount::parse(config).map(drop),
        Channel::DingtalkWork => WorkAccount::parse(config).map(drop),
        other => Err(format!("`{other}` is not a DingTalk channel")),
    }
}

/// Checks a template's content for `channel` (see the module docs for the formats).
pub fn check_content(channel: Channel, content: &Value) -> Result<(), String> {
    message_type(channel, content).map(drop)
}

/// The message type of `content`, once its shape is checked.
fn message_type(channel: Channel, content: &Value) -> Result<&'static str, String> {
    let types: &[&'static str] = match channel {
        Channel::DingtalkRobot => &ROBOT_TYPES,
        Channel::DingtalkWork => &WORK_TYPES,
        other => return Err(format!("`{other}` is not a DingTalk channel")),
    };
    let obj = content.as_object().ok_or("content must be a JSON object")?;
    let given = match obj.get("msgtype") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("`msgtype` must be a string".into()),
        None => return Err(format!("content needs `msgtype` ({})", types.join(", "))),
    };
    let msgtype = types.iter().copied().find(|t| *t == given).ok_or_else(|| {
        format!(
            "unknown msgtype `{given}` for {channel} (expected {})",
            types.join(", ")
        )
    })?;
    if let Some(k) = obj.keys().find(|k| *k != "msgtype" && *k != msgtype) {
        return Err(if k == "at" && channel == Channel::DingtalkRobot {
            "`at` is built from the receivers; leave it out of the content".into()
        } else {
            format!(
                "unknown content field `{k}` (a {msgtype} message has `msgtype` and `{msgtype}`)"
            )
        });
    }
    let body = obj
        .get(msgtype)
        .and_then(Value::as_object)
        .ok_or_else(|| format!("a {msgtype} message needs `{msgtype}`: {{…}}"))?;
    check_body(channel, msgtype, body).map_err(|e| format!("`{msgtype}`: {e}"))?;
    Ok(msgtype)
}

/// Checks the required fields of a message object.
fn check_body(channel: Channel, msgtype: &str, body: &Map<String, Value>) -> Result<(), String> {
    let need = |k: &str| required_text(body, k);
    match (channel, msgtype) {
        (_, "text") => need("content"),
        (_, "markdown") => {
            need("title")?;
            need("text")
        }
        (_, "link") => {
            need("title")?;
            need("text")?;
            need("messageUrl")?;
            optional_text(body, "picUrl")
        }
        (Channel::DingtalkRobot, "actionCard") => {
            need("title")?;
            need("text")?;
            buttons(
                body,
                ["singleTitle", "singleURL"],
                ["btns", "title", "actionURL"],
            )
        }
        (Channel::DingtalkRobot, "feedCard") => items(body, "links", &["title", "messageURL"]),
        (Channel::DingtalkWork, "image" | "file") => need("media_id"),
        (Channel::DingtalkWork, "voice") => {
            need("media_id")?;
            match body.get("duration") {
                Some(Value::String(s)) if !s.is_empty() => Ok(()),
                Some(Value::Number(n)) if n.is_u64() => Ok(()),
                _ => Err("needs `duration` (seconds, under 60)".into()),
            }
        }
        (Channel::DingtalkWork, "oa") => {
            need("message_url")?;
            let head = body
                .get("head")
                .and_then(Value::as_object)
                .ok_or("needs `head`: {\"bgcolor\", \"text\"}")?;
            required_text(head, "bgcolor").map_err(|e| format!("`head`: {e}"))?;
            required_text(head, "text").map_err(|e| format!("`head`: {e}"))?;
            match body.get("body") {
                Some(Value::Object(_)) => Ok(()),
                _ => Err("needs `body`: {…}".into()),
            }
        }
        (Channel::DingtalkWork, "action_card") => {
            need("title")?;
            need("markdown")?;
            buttons(
                body,
                ["single_title", "single_url"],
                ["btn_json_list", "title", "action_url"],
            )
        }
        (_, other) => Err(format!("`{other}` is not a message type of {channel}")),
    }
}

/// `body[key]` must be a non-empty string.
fn required_text(body: &Map<String, Value>, key: &str) -> Result<(), String> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(()),
        Some(Value::String(_)) => Err(format!("`{key}` is empty")),
        Some(_) => Err(format!("`{key}` must be a string")),
        None => Err(format!("needs `{key}`")),
    }
}

/// `body[key]`, if present, must be a string.
fn optional_text(body: &Map<String, Value>, key: &str) -> Result<(), String> {
    match body.get(key) {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

/// An action card's buttons: one button (`single` title and URL), or a list of them.
fn buttons(
    body: &Map<String, Value>,
    [single_title, single_url]: [&str; 2],
    [list, title, url]: [&str; 3],
) -> Result<(), String> {
    if body.contains_key(single_title) || body.contains_key(single_url) {
        required_text(body, single_title)?;
        return required_text(body, single_url);
    }
    if body.contains_key(list) {
        return items(body, list, &[title, url]);
    }
    Err(format!(
        "needs `{single_title}` and `{single_url}`, or `{list}`: [{{\"{title}\", \"{url}\"}}]"
    ))
}

/// `body[key]` must be a non-empty list of objects, each with the `required` strings.
fn items(body: &Map<String, Value>, key: &str, required: &[&str]) -> Result<(), String> {
    let list = match body.get(key) {
        Some(Value::Array(list)) if !list.is_empty() => list,
        _ => return Err(format!("needs `{key}`: a non-empty list")),
    };
    for (i, item) in list.iter().enumerate() {
        let item = item
            .as_object()
            .ok_or_else(|| format!("`{key}[{i}]` must be an object"))?;
        for k in required {
            required_text(item, k).map_err(|e| format!("`{key}[{i}]`: {e}"))?;
        }
    }
    Ok(())
}

/// The people a robot message mentions, from its receivers.
#[derive(Debug, Default, PartialEq, Eq)]
struct Mentions {
    all: bool,
    mobiles: Vec<String>,
    user_ids: Vec<String>,
}

impl Mentions {
    fn of<'a>(receivers: impl IntoIterator<Item = &'a str>) -> Self {
        let mut m = Mentions::default();
        for receiver in receivers {
            if receiver == ALL {
                m.all = true;
            } else if let Some(mobile) = mobile(receiver) {
                if !m.mobiles.contains(&mobile) {
                    m.mobiles.push(mobile);
                }
            } else if !m.user_ids.iter().any(|u| u == receiver) {
                m.user_ids.push(receiver.to_string());
            }
        }
        m
    }

    /// The message's `at` object.
    fn at(&self) -> Value {
        json!({"atMobiles": self.mobiles, "atUserIds": self.user_ids, "isAtAll": self.all})
    }

    /// `text` with `@<mobile>` / `@<userid>` appended for every mention it does not show yet.
    fn shown_in(&self, text: &str, separator: &str) -> String {
        let missing: Vec<String> = self
            .mobiles
            .iter()
            .chain(&self.user_ids)
            .filter(|who| !mentioned(text, who))
            .map(|who| format!("@{who}"))
            .collect();
        if missing.is_empty() {
            text.to_string()
        } else {
            format!("{text}{separator}{}", missing.join(" "))
        }
    }
}

/// Whether `text` holds `@<who>` not followed by more of a name or number.
fn mentioned(text: &str, who: &str) -> bool {
    let needle = format!("@{who}");
    text.match_indices(&needle).any(|(at, _)| {
        !text[at + needle.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
    })
}

/// The mobile number a receiver names, if it looks like one: a mainland mobile (11 digits from
/// `1`, optionally after `+86`; given to DingTalk without `+86`) or another E.164 number.
fn mobile(receiver: &str) -> Option<String> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mainland = |s: &str| s.len() == 11 && s.starts_with('1') && digits(s);
    if let Some(rest) = receiver.strip_prefix("+86")
        && mainland(rest)
    {
        return Some(rest.to_string());
    }
    if let Some(rest) = receiver.strip_prefix('+')
        && (8..=15).contains(&rest.len())
        && digits(rest)
    {
        return Some(receiver.to_string());
    }
    mainland(receiver).then(|| receiver.to_string())
}

/// An integer that DingTalk may send as a number or as a string.
fn int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A string that DingTalk may send as a string or as a number.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A retryable error for an answer herald cannot read.
fn bad_response(detail: String) -> SendError {
    SendError::Retryable {
        code: format!("{VENDOR}_bad_response"),
        detail,
        retry_after: None,
    }
}

/// Checks a DingTalk answer: its JSON on `errcode` 0, else the error it names.
fn check_reply(body: &[u8]) -> Result<Value, SendError> {
    let reply: Value = serde_json::from_slice(body)
        .map_err(|_| bad_response(format!("the answer is not JSON{}", http::excerpt(body))))?;
    let Some(errcode) = reply.get("errcode").and_then(int) else {
        // The gateway's throttle answer: `{"status": 1111, "wait": 5, "punish": "deny", …}`.
        if reply.get("status").and_then(int) == Some(1111) {
            let minutes = reply
                .get("wait")
                .and_then(int)
                .filter(|m| *m > 0)
                .unwrap_or(5);
            return Err(SendError::Retryable {
                code: format!("{VENDOR}_throttled"),
                detail: format!("DingTalk's gateway throttles these calls for {minutes} minutes"),
                retry_after: Some(Duration::from_secs(minutes.unsigned_abs() * 60)),
            });
        }
        return Err(bad_response(format!(
            "the answer has no errcode{}",
            http::excerpt(body)
        )));
    };
    if errcode == 0 {
        return Ok(reply);
    }
    Err(vendor_error(errcode, &reply))
}

/// The error of a DingTalk answer with a non-zero `errcode`.
fn vendor_error(errcode: i64, reply: &Value) -> SendError {
    let errmsg = reply.get("errmsg").and_then(Value::as_str).unwrap_or("");
    // 88 is "see sub_code": the sub code is the real one.
    let sub_code = (errcode == 88)
        .then(|| reply.get("sub_code").and_then(text))
        .flatten()
        .filter(|s| !s.is_empty());
    let (name, number) = match &sub_code {
        Some(sub) => (sub.clone(), sub.parse::<i64>().ok()),
        None => (errcode.to_string(), Some(errcode)),
    };
    let code = if number == Some(-1) {
        format!("{VENDOR}_system_busy")
    } else {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{VENDOR}_{name}")
    };
    let detail = match (&sub_code, reply.get("sub_msg").and_then(Value::as_str)) {
        (Some(sub), Some(sub_msg)) => format!("errcode {errcode}, sub_code {sub}: {sub_msg}"),
        _ => format!("errcode {errcode}: {errmsg}"),
    };
    match number {
        Some(130101) => SendError::Retryable {
            code,
            detail,
            retry_after: Some(ROBOT_THROTTLE),
        },
        Some(n) if RETRYABLE_CODES.contains(&n) => SendError::Retryable {
            code,
            detail,
            retry_after: None,
        },
        _ => SendError::Permanent { code, detail },
    }
}

/// Whether DingTalk refused the access token (invalid or expired).
fn token_rejected(e: &SendError) -> bool {
    TOKEN_CODES.contains(&e.code())
}

/// Whether a robot error means "stop posting for a while" (the rest of a batch would fail too).
fn robot_throttled(e: &SendError) -> bool {
    matches!(
        e,
        SendError::Retryable {
            retry_after: Some(_),
            ..
        }
    )
}

/// A work notice receiver must fit in `userid_list` (comma-separated).
fn check_userid(receiver: &str) -> Result<(), SendError> {
    if receiver.is_empty() || receiver.contains(',') {
        return Err(SendError::Permanent {
            code: "bad_receiver".into(),
            detail: "a DingTalk userid is not empty and has no comma".into(),
        });
    }
    Ok(())
}

/// The result a batch slot starts with; every slot is overwritten by its request's result.
fn unsent() -> SendError {
    SendError::Permanent {
        code: "not_sent".into(),
        detail: "the message was not part of any DingTalk request".into(),
    }
}

/// A successful send's outcome.
fn sent(vendor_message_id: Option<String>) -> SendOutcome {
    SendOutcome {
        vendor: VENDOR.into(),
        vendor_message_id,
        billing_units: None,
    }
}

/// Splits `records` (indexes into it) into requests: records with identical content share one,
/// up to [`MAX_BATCH`]. For work notices a request also never mixes requests ids (a recall takes
/// back a whole task), never names a receiver twice, and `@all` goes alone.
fn requests(records: &[&MessageRecord], work: bool) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut open: HashMap<(String, &str), usize> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        if work && record.receiver == ALL {
            groups.push(vec![i]);
            continue;
        }
        let request_id = if work { record.request_id.as_str() } else { "" };
        let key = (record.content.to_string(), request_id);
        let fits = |g: &Vec<usize>| {
            g.len() < MAX_BATCH
                && !(work && g.iter().any(|&j| records[j].receiver == record.receiver))
        };
        match open.get(&key) {
            Some(&g) if fits(&groups[g]) => groups[g].push(i),
            _ => {
                open.insert(key, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// The DingTalk client: robots and work notices, over the shared HTTP pool and token cache.
pub struct DingtalkSender {
    client: Client,
    tokens: Arc<TokenCache>,
}

impl DingtalkSender {
    /// A client over the shared HTTP pool and token cache.
    pub fn new(client: Client, tokens: Arc<TokenCache>) -> Self {
        DingtalkSender { client, tokens }
    }

    /// Posts each group of identical robot messages once; after a throttling answer the rest of
    /// the batch gets the same answer without being posted.
    async fn robot_batch(
        &self,
        records: &[&MessageRecord],
        account: &RobotAccount,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let mut out = vec![Err(unsent()); records.len()];
        let mut throttled: Option<SendError> = None;
        for group in requests(records, false) {
            let result = match &throttled {
                Some(e) => Err(e.clone()),
                None => {
                    let members: Vec<&MessageRecord> = group.iter().map(|&i| records[i]).collect();
                    self.robot_post(account, &members).await
                }
            };
            if let Err(e) = &result
                && robot_throttled(e)
            {
                throttled = Some(e.clone());
            }
            for i in group {
                out[i] = result.clone().map(|()| sent(None));
            }
        }
        out
    }

    /// Posts one robot message (the content of `records`, which is the same for all) mentioning
    /// every record's receiver.
    async fn robot_post(
        &self,
        account: &RobotAccount,
        records: &[&MessageRecord],
    ) -> Result<(), SendError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let msgtype = message_type(Channel::DingtalkRobot, &first.content).map_err(bad_content)?;
        let mut body = first.content.clone();
        if let ("text" | "markdown", Some(obj)) = (msgtype, body.as_object_mut()) {
            let mentions = Mentions::of(records.iter().map(|r| r.receiver.as_str()));
            let (field, separator) = if msgtype == "text" {
                ("content", " ")
            } else {
                ("text", "\n\n")
            };
            if let Some(Value::String(s)) = obj.get_mut(msgtype).and_then(|b| b.get_mut(field)) {
                *s = mentions.shown_in(s, separator);
            }
            obj.insert("at".into(), mentions.at());
        }
        let mut query = vec![("access_token", account.access_token.expose().to_string())];
        if let Some(secret) = &account.secret {
            let timestamp = chrono::Utc::now().timestamp_millis();
            query.push(("timestamp", timestamp.to_string()));
            query.push(("sign", sign(secret.expose(), timestamp)));
        }
        let request = self
            .client
            .post(format!("{}/robot/send", account.base_url))
            .query(&query)
            .header(CONTENT_TYPE, "application/json; charset=utf-8")
            .body(body.to_string());
        check_reply(&http::send_for_body(VENDOR, request).await?).map(drop)
    }

    /// Sends work notices, one request per group of identical content; every receiver of a
    /// request gets its task id.
    async fn work_batch(
        &self,
        records: &[&MessageRecord],
        account: &WorkAccount,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let mut out = vec![Err(unsent()); records.len()];
        let mut valid = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            match check_userid(&record.receiver) {
                Ok(()) => valid.push(i),
                Err(e) => out[i] = Err(e),
            }
        }
        let candidates: Vec<&MessageRecord> = valid.iter().map(|&i| records[i]).collect();
        for group in requests(&candidates, true) {
            let members: Vec<&MessageRecord> = group.iter().map(|&k| candidates[k]).collect();
            let result = self.work_send(account, &members).await;
            for k in group {
                out[valid[k]] = result.clone().map(sent);
            }
        }
        out
    }

    /// Sends one work notice to the receivers of `records` (same content); the task id.
    async fn work_send(
        &self,
        account: &WorkAccount,
        records: &[&MessageRecord],
    ) -> Result<Option<String>, SendError> {
        let Some(first) = records.first() else {
            return Ok(None);
        };
        message_type(Channel::DingtalkWork, &first.content).map_err(bad_content)?;
        let mut body = json!({"agent_id": account.agent_id, "msg": first.content});
        if records.iter().any(|r| r.receiver == ALL) {
            body["to_all_user"] = json!(true);
        } else {
            let userids: Vec<&str> = records.iter().map(|r| r.receiver.as_str()).collect();
            body["userid_list"] = json!(userids.join(","));
        }
        let reply = self
            .topapi(
                account,
                "/topapi/message/corpconversation/asyncsend_v2",
                &body,
            )
            .await?;
        Ok(reply.get("task_id").and_then(int).map(|id| id.to_string()))
    }

    /// `POST`s `body` as JSON to a `topapi` path with the app's access token.
    async fn topapi(
        &self,
        account: &WorkAccount,
        path: &str,
        body: &Value,
    ) -> Result<Value, SendError> {
        let url = format!("{}{path}", account.base_url);
        self.with_token(account, |token| {
            self.client
                .post(&url)
                .query(&[("access_token", token)])
                .json(body)
        })
        .await
    }

    /// Sends the request `build` makes with the app's access token and checks the answer; when
    /// DingTalk refuses the token, drops it, fetches a fresh one and tries once more.
    async fn with_token(
        &self,
        account: &WorkAccount,
        build: impl Fn(&str) -> RequestBuilder + Send + Sync,
    ) -> Result<Value, SendError> {
        let call = |token: &str| {
            let request = build(token);
            async move { check_reply(&http::send_for_body(VENDOR, request).await?) }
        };
        self.tokens
            .with_token(
                &account.token_key(),
                || self.fetch_token(account),
                call,
                token_rejected,
            )
            .await
    }

    /// Exchanges the app's key and secret for an access token.
    async fn fetch_token(&self, account: &WorkAccount) -> Result<FreshToken, SendError> {
        let request = self
            .client
            .get(format!("{}/gettoken", account.base_url))
            .query(&[
                ("appkey", account.app_key.as_str()),
                ("appsecret", account.app_secret.expose()),
            ]);
        let reply = check_reply(&http::send_for_body(VENDOR, request).await?)?;
        let token = reply
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad_response("gettoken answered without an access_token".into()))?;
        let seconds = reply
            .get("expires_in")
            .and_then(int)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_TOKEN_SECONDS);
        Ok(FreshToken {
            token: token.to_string(),
            expires_in: Duration::from_secs(seconds),
        })
    }
}

/// The receipts of one task's `send_result`, for the `pending` receivers of that task.
fn task_receipts(task_id: &str, send_result: &Value, pending: &[&PendingReceipt]) -> Vec<Receipt> {
    let list = |k: &str| -> Vec<String> {
        send_result
            .get(k)
            .and_then(Value::as_array)
            .map(|l| l.iter().filter_map(text).collect())
            .unwrap_or_default()
    };
    let mut states: HashMap<String, (bool, Option<(String, String)>)> = HashMap::new();
    let mut mark = |key: &str, failure: Option<(&str, &str)>| {
        for user in list(key) {
            let failure = failure.map(|(c, d)| (format!("{VENDOR}_{c}"), d.to_string()));
            states.insert(user, (failure.is_none(), failure));
        }
    };
    mark("read_user_id_list", None);
    mark("unread_user_id_list", None);
    mark(
        "failed_user_id_list",
        Some(("send_failed", "DingTalk failed to deliver the notice")),
    );
    mark(
        "invalid_user_id_list",
        Some(("invalid_user", "not a userid of the organisation")),
    );
    mark(
        "forbidden_user_id_list",
        Some((
            "forbidden",
            "filtered by DingTalk's flow control (the same content once a day per user, a \
             daily limit of notices per user)",
        )),
    );
    // The reason of each flow-controlled user, where DingTalk gives it.
    for entry in send_result
        .get("forbidden_list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(user), Some(code)) = (
            entry.get("userid").and_then(text),
            entry.get("code").and_then(text),
        ) else {
            continue;
        };
        let limit = entry.get("count").and_then(int);
        let detail = match limit {
            Some(n) => format!("filtered by DingTalk's flow control {code} (limit {n})"),
            None => format!("filtered by DingTalk's flow control {code}"),
        };
        states.insert(user, (false, Some((format!("{VENDOR}_{code}"), detail))));
    }
    let now = chrono::Utc::now();
    pending
        .iter()
        .filter_map(|p| {
            let (delivered, failure) = states.get(&p.receiver)?;
            let (error_code, error_detail) = failure.clone().unzip();
            Some(Receipt {
                vendor: VENDOR.into(),
                vendor_message_id: task_id.to_string(),
                receiver: Some(p.receiver.clone()),
                delivered: *delivered,
                error_code,
                error_detail,
                at: now,
            })
        })
        .collect()
}

#[async_trait]
impl Sender for DingtalkSender {
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
            Channel::DingtalkRobot => {
                let account = RobotAccount::parse(account).map_err(bad_account)?;
                self.robot_post(&account, &[record])
                    .await
                    .map(|()| sent(None))
            }
            Channel::DingtalkWork => {
                let account = WorkAccount::parse(account).map_err(bad_account)?;
                check_userid(&record.receiver)?;
                self.work_send(&account, &[record]).await.map(sent)
            }
            other => Err(SendError::not_supported(&format!("the {other} channel"))),
        }
    }

    async fn send_batch(
        &self,
        records: &[&MessageRecord],
        _account_id: i64,
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let Some(channel) = records.first().map(|r| r.channel) else {
            return Vec::new();
        };
        let all = |e: SendError| vec![Err(e); records.len()];
        if records.iter().any(|r| r.channel != channel) {
            return all(SendError::Permanent {
                code: "mixed_channels".into(),
                detail: "one DingTalk batch holds messages of one channel".into(),
            });
        }
        match channel {
            Channel::DingtalkRobot => match RobotAccount::parse(account) {
                Ok(a) => self.robot_batch(records, &a).await,
                Err(e) => all(bad_account(e)),
            },
            Channel::DingtalkWork => match WorkAccount::parse(account) {
                Ok(a) => self.work_batch(records, &a).await,
                Err(e) => all(bad_account(e)),
            },
            other => all(SendError::not_supported(&format!("the {other} channel"))),
        }
    }

    async fn recall(
        &self,
        sent: &DeliveryEvent,
        _account_id: i64,
        account: &Value,
    ) -> Result<(), SendError> {
        if sent.channel != Channel::DingtalkWork {
            return Err(SendError::not_supported("recall of a robot message"));
        }
        let account = WorkAccount::parse(account).map_err(bad_account)?;
        let task_id = sent
            .vendor_message_id
            .as_deref()
            .and_then(|id| id.parse::<i64>().ok())
            .ok_or_else(|| SendError::Permanent {
                code: "no_vendor_message_id".into(),
                detail: "the sent event has no DingTalk task id".into(),
            })?;
        let body = json!({"agent_id": account.agent_id, "msg_task_id": task_id});
        self.topapi(&account, "/topapi/message/corpconversation/recall", &body)
            .await
            .map(drop)
    }

    async fn pull_receipts(
        &self,
        _account_id: i64,
        account: &Value,
        pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let account = match WorkAccount::parse(account) {
            Ok(a) => a,
            // Robots have no receipts.
            Err(_) if RobotAccount::parse(account).is_ok() => return Ok(Vec::new()),
            Err(e) => return Err(bad_account(e)),
        };
        let oldest = chrono::Utc::now().timestamp_millis() - TASK_LIFETIME_MS;
        let mut tasks: BTreeMap<i64, Vec<&PendingReceipt>> = BTreeMap::new();
        for p in pending {
            if p.receiver == ALL || p.sent_at < oldest {
                continue;
            }
            if let Ok(task_id) = p.vendor_message_id.parse::<i64>() {
                tasks.entry(task_id).or_default().push(p);
            }
        }
        let mut receipts = Vec::new();
        for (task_id, waiting) in tasks {
            let body = json!({"agent_id": account.agent_id, "task_id": task_id});
            match self
                .topapi(
                    &account,
                    "/topapi/message/corpconversation/getsendresult",
                    &body,
                )
                .await
            {
                Ok(reply) => {
                    let result = reply.get("send_result").cloned().unwrap_or(Value::Null);
                    receipts.extend(task_receipts(&task_id.to_string(), &result, &waiting));
                }
                // Come back later; what was gathered so far is kept.
                Err(e) if e.is_retryable() => {
                    if receipts.is_empty() {
                        return Err(e);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(task_id, error = %e, "DingTalk did not give a send result");
                }
            }
        }
        Ok(receipts)
    }

    async fn upload_media(
        &self,
        channel: Channel,
        _account_id: i64,
        account: &Value,
        media: &Media,
    ) -> Result<String, SendError> {
        if channel != Channel::DingtalkWork {
            return Err(SendError::not_supported("media upload for robots"));
        }
        let account = WorkAccount::parse(account).map_err(bad_account)?;
        let bad_media = |detail: String| SendError::Permanent {
            code: "bad_media".into(),
            detail,
        };
        let (_, limit) = MEDIA_LIMITS
            .iter()
            .find(|(kind, _)| *kind == media.kind)
            .ok_or_else(|| {
                bad_media(format!(
                    "DingTalk takes image, voice, video or file media, not `{}`",
                    media.kind
                ))
            })?;
        if media.bytes.len() > *limit {
            return Err(bad_media(format!(
                "{} media is at most {} MB",
                media.kind,
                limit >> 20
            )));
        }
        let (content_type, body) = http::multipart(&[("type", &media.kind)], "media", media);
        let url = format!("{}/media/upload", account.base_url);
        let reply = self
            .with_token(&account, |token| {
                self.client
                    .post(&url)
                    .query(&[("access_token", token), ("type", media.kind.as_str())])
                    .header(CONTENT_TYPE, content_type.as_str())
                    .body(body.clone())
            })
            .await?;
        reply
            .get("media_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| bad_response("media/upload answered without a media_id".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::testkit::{self, Answer, Captured, VendorServer};
    use herald_core::State;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ROBOT_TOKEN: &str = "robot-token-abc123";
    const ROBOT_SECRET: &str =
        "SECd1a9e5f0b2c34e7a8f6b0c9d2e1f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b";
    const APP_KEY: &str = "dingkey1";
    const APP_SECRET: &str = "app-secret-xyz789";
    const AGENT_ID: i64 = 836390886;

    fn robot_account(url: &str, signed: bool) -> Value {
        let mut a = json!({"access_token": ROBOT_TOKEN, "base_url": url});
        if signed {
            a["secret"] = json!(ROBOT_SECRET);
        }
        a
    }

    fn work_account(url: &str) -> Value {
        json!({"app_key": APP_KEY, "app_secret": APP_SECRET, "agent_id": AGENT_ID,
               "base_url": url})
    }

    async fn sender() -> (tempfile::TempDir, DingtalkSender) {
        let (dir, store) = testkit::store().await;
        let sender = DingtalkSender::new(http::client(), Arc::new(TokenCache::new(store)));
        (dir, sender)
    }

    /// The robot signature as DingTalk computes it, written from the documented scheme with the
    /// hmac crate (not with [`sign`]).
    fn expected_sign(secret: &str, timestamp: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(b"\n");
        mac.update(secret.as_bytes());
        BASE64.encode(mac.finalize().into_bytes())
    }

    /// What DingTalk checks on `/robot/send`; `signed` robots need a fresh, valid signature.
    fn check_robot_request(c: &Captured, signed: bool) -> Result<(), String> {
        if c.method != "POST" || c.path != "/robot/send" {
            return Err(format!("{} {}", c.method, c.path));
        }
        if c.query_param("access_token").as_deref() != Some(ROBOT_TOKEN) {
            return Err("token is not exist".into());
        }
        if c.header("content-type") != "application/json; charset=utf-8" {
            return Err(format!("content-type {}", c.header("content-type")));
        }
        if !signed {
            if c.query_param("timestamp").is_some() || c.query_param("sign").is_some() {
                return Err("an unsigned robot got a signature".into());
            }
            return Ok(());
        }
        let timestamp = c.query_param("timestamp").ok_or("no timestamp")?;
        let ms: i64 = timestamp.parse().map_err(|_| "bad timestamp")?;
        if (chrono::Utc::now().timestamp_millis() - ms).abs() > 3_600_000 {
            return Err("timestamp more than an hour off".into());
        }
        let expected = expected_sign(ROBOT_SECRET, &timestamp);
        if c.query_param("sign").as_deref() != Some(expected.as_str()) {
            return Err("sign not match".into());
        }
        // The sign travels URL-encoded: no raw `+`, `/` or `=` in the query string.
        let raw = c
            .query
            .split('&')
            .find_map(|p| p.strip_prefix("sign="))
            .ok_or("no sign")?;
        let encoded: String = url::form_urlencoded::byte_serialize(expected.as_bytes()).collect();
        if raw != encoded {
            return Err(format!("sign not URL-encoded: {raw}"));
        }
        Ok(())
    }

    /// A robot server answering success to requests DingTalk would accept, 310000 otherwise.
    async fn robot_server(signed: bool) -> VendorServer {
        VendorServer::start(move |c| match check_robot_request(c, signed) {
            Ok(()) => Answer::json(json!({"errcode": 0, "errmsg": "ok"})),
            Err(why) => Answer::json(json!({"errcode": 310000, "errmsg": why})),
        })
        .await
    }

    #[test]
    fn signature_matches_independent_vectors() {
        // Computed outside this code base:
        //   printf '1700000000000\nSECd1a9…293a4b' |
        //     openssl dgst -sha256 -hmac 'SECd1a9…293a4b' -binary | base64
        // (and the same with Python's hmac/base64; urllib's quote_plus gives
        // j3mug2%2F4cFM5HiYgEJw0w0C7G2vN5DHl9fsLdhlXqDc%3D on the wire).
        assert_eq!(
            sign(ROBOT_SECRET, 1_700_000_000_000),
            "j3mug2/4cFM5HiYgEJw0w0C7G2vN5DHl9fsLdhlXqDc="
        );
        for ts in [0, 1_552_920_546_388, chrono::Utc::now().timestamp_millis()] {
            assert_eq!(
                sign(ROBOT_SECRET, ts),
                expected_sign(ROBOT_SECRET, &ts.to_string())
            );
        }
        assert_ne!(
            sign("SECother", 1_700_000_000_000),
            sign(ROBOT_SECRET, 1_700_000_000_000)
        );
    }

    #[test]
    fn receivers_become_mentions() {
        let m = Mentions::of([
            "13800000000",
            "+8613900000001",
            "+14155550123",
            "user123",
            "25262904",
            "@all",
            "13800000000",
        ]);
        assert_eq!(
            m,
            Mentions {
                all: true,
                mobiles: vec![
                    "13800000000".into(),
                    "13900000001".into(),
                    "+14155550123".into()
                ],
                user_ids: vec!["user123".into(), "25262904".into()],
            }
        );
        assert!(mentioned("hi @user123, look", "user123"));
        assert!(!mentioned("hi @user1234", "user123"));
        assert!(mentioned("hi @user1234 and @user123", "user123"));
        let m = Mentions::of(["user123", "13800000000"]);
        assert_eq!(
            m.shown_in("ping @user123", " "),
            "ping @user123 @13800000000"
        );
        assert_eq!(
            m.shown_in("@13800000000 @user123", " "),
            "@13800000000 @user123"
        );
    }

    #[tokio::test]
    async fn robot_text_mentions_everyone_in_one_signed_post() {
        let server = robot_server(true).await;
        let (_dir, sender) = sender().await;
        let content = json!({"msgtype": "text",
                             "text": {"content": "Deploy done, @user123 please check"}});
        let records: Vec<MessageRecord> = ["13800000000", "+8613900000001", "user123", "@all"]
            .into_iter()
            .map(|r| testkit::record(Channel::DingtalkRobot, r, content.clone()))
            .collect();
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let results = sender
            .send_batch(&refs, 1, &robot_account(&server.url, true))
            .await;
        assert_eq!(results.len(), 4);
        for r in results {
            assert_eq!(r.unwrap(), sent(None));
        }

        let requests = server.requests();
        assert_eq!(requests.len(), 1, "identical content is posted once");
        check_robot_request(&requests[0], true).unwrap();
        assert_eq!(
            requests[0].json(),
            json!({
                "msgtype": "text",
                "text": {"content":
                    "Deploy done, @user123 please check @13800000000 @13900000001"},
                "at": {"atMobiles": ["13800000000", "13900000001"],
                       "atUserIds": ["user123"], "isAtAll": true}
            })
        );

        // One record through `send`: the same path.
        let one = testkit::record(Channel::DingtalkRobot, "user9", content.clone());
        sender
            .send(&one, 1, &robot_account(&server.url, true))
            .await
            .unwrap();
        let body = server.requests()[1].json();
        assert_eq!(
            body["text"]["content"],
            "Deploy done, @user123 please check @user9"
        );
        assert_eq!(
            body["at"],
            json!({"atMobiles": [], "atUserIds": ["user9"], "isAtAll": false})
        );
    }

    #[tokio::test]
    async fn robot_posts_every_message_type() {
        let server = robot_server(false).await;
        let (_dir, sender) = sender().await;
        let account = robot_account(&server.url, false);
        let markdown = json!({"msgtype": "markdown",
                              "markdown": {"title": "Weather", "text": "#### Hangzhou\n> 9°C"}});
        let link = json!({"msgtype": "link", "link": {
            "title": "Release", "text": "v2.1 is out", "messageUrl": "https://example.com/r",
            "picUrl": "https://example.com/p.png"}});
        let card = json!({"msgtype": "actionCard", "actionCard": {
            "title": "Review", "text": "## Review\nplease", "btnOrientation": "0",
            "btns": [{"title": "Yes", "actionURL": "https://example.com/y"},
                     {"title": "No", "actionURL": "https://example.com/n"}]}});
        let single = json!({"msgtype": "actionCard", "actionCard": {
            "title": "Review", "text": "one button", "singleTitle": "Open",
            "singleURL": "https://example.com/o"}});
        let feed = json!({"msgtype": "feedCard", "feedCard": {"links": [
            {"title": "A", "messageURL": "https://example.com/a", "picURL": "https://example.com/a.png"},
            {"title": "B", "messageURL": "https://example.com/b", "picURL": "https://example.com/b.png"}]}});
        let records = [
            testkit::record(Channel::DingtalkRobot, "13800000000", markdown.clone()),
            testkit::record(Channel::DingtalkRobot, "13800000000", link.clone()),
            testkit::record(Channel::DingtalkRobot, "13800000000", card.clone()),
            testkit::record(Channel::DingtalkRobot, "u1", single.clone()),
            testkit::record(Channel::DingtalkRobot, "u2", feed.clone()),
            testkit::record(Channel::DingtalkRobot, "u3", feed.clone()),
        ];
        let refs: Vec<&MessageRecord> = records.iter().collect();
        for r in sender.send_batch(&refs, 1, &account).await {
            r.unwrap();
        }
        let requests = server.requests();
        assert_eq!(requests.len(), 5, "the two feed cards are one post");
        for c in &requests {
            check_robot_request(c, false).unwrap();
        }
        assert_eq!(
            requests[0].json(),
            json!({"msgtype": "markdown",
                   "markdown": {"title": "Weather",
                                "text": "#### Hangzhou\n> 9°C\n\n@13800000000"},
                   "at": {"atMobiles": ["13800000000"], "atUserIds": [], "isAtAll": false}})
        );
        // Types that cannot mention are posted exactly as the template says.
        assert_eq!(requests[1].json(), link);
        assert_eq!(requests[2].json(), card);
        assert_eq!(requests[3].json(), single);
        assert_eq!(requests[4].json(), feed);
    }

    #[tokio::test]
    async fn robot_errors_map_to_retryable_or_permanent() {
        let server = VendorServer::start(|c| {
            if let Err(why) = check_robot_request(c, true) {
                return Answer::json(json!({"errcode": 310000, "errmsg": why}));
            }
            let body = c.json();
            let text = body["text"]["content"].as_str().unwrap_or("").to_string();
            match text.split(' ').next().unwrap_or("") {
                "fast" => Answer::json(json!({"status": 1111, "wait": 5, "punish": "deny",
                    "errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"})),
                "keyword" => {
                    Answer::json(json!({"errcode": 310000, "errmsg": "keywords not in content"}))
                }
                "token" => Answer::json(json!({"errcode": 300001, "errmsg": "token is not exist"})),
                "down" => Answer::status(503, "maintenance").with_header("retry-after", "7"),
                "gateway" => Answer::json(
                    json!({"status": 1111, "wait": 5, "source": "x5", "punish": "deny"}),
                ),
                "html" => Answer::status(200, "<html>busy</html>"),
                "busy" => Answer::json(json!({"errcode": -1, "errmsg": "系统繁忙"})),
                _ => Answer::json(json!({"errcode": 0, "errmsg": "ok"})),
            }
        })
        .await;
        let (_dir, sender) = sender().await;
        let account = robot_account(&server.url, true);
        let text = |s: &str| json!({"msgtype": "text", "text": {"content": s}});
        let record = |s: &str| testkit::record(Channel::DingtalkRobot, "u1", text(s));

        // Throttled: 10 minutes, and the rest of the batch is not posted into the throttle.
        let (a, b) = (record("fast one"), record("another"));
        let results = sender.send_batch(&[&a, &b], 1, &account).await;
        assert_eq!(server.requests().len(), 1);
        for r in results {
            let err = r.unwrap_err();
            assert_eq!(err.code(), "dingtalk_130101");
            assert!(err.detail().contains("send too fast"), "{err}");
            let SendError::Retryable { retry_after, .. } = err else {
                panic!("{err:?}")
            };
            assert_eq!(retry_after, Some(Duration::from_secs(600)));
        }

        let err = sender
            .send(&record("keyword missing"), 1, &account)
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "dingtalk_310000");
        assert_eq!(err.detail(), "errcode 310000: keywords not in content");

        let err = sender
            .send(&record("token gone"), 1, &account)
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "dingtalk_300001");
        assert!(!err.detail().contains(ROBOT_TOKEN));

        let err = sender
            .send(&record("down now"), 1, &account)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "dingtalk_5xx");
        assert_eq!(
            err,
            SendError::Retryable {
                code: "dingtalk_5xx".into(),
                detail: "HTTP 503 Service Unavailable: maintenance".into(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );

        let err = sender
            .send(&record("gateway limit"), 1, &account)
            .await
            .unwrap_err();
        let SendError::Retryable {
            code, retry_after, ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(code, "dingtalk_throttled");
        assert_eq!(retry_after, Some(Duration::from_secs(300)));

        let err = sender
            .send(&record("html page"), 1, &account)
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "dingtalk_bad_response");

        let err = sender
            .send(&record("busy now"), 1, &account)
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "dingtalk_system_busy");

        // A secret DingTalk does not know: the server's own check refuses the signature.
        let mut wrong = account.clone();
        wrong["secret"] = json!("SECnot-the-robots-secret");
        let err = sender.send(&record("hello"), 1, &wrong).await.unwrap_err();
        assert_eq!(err.code(), "dingtalk_310000");
        assert!(err.detail().contains("sign not match"), "{err}");
        assert!(!err.detail().contains("SECnot"), "{err}");
    }

    /// A work notice server: `/gettoken` hands out `tok-1`, `tok-2`, … (counted), and
    /// `asyncsend_v2` answers with `reply(token, body)`.
    struct WorkServer {
        server: VendorServer,
        token_fetches: Arc<AtomicUsize>,
    }

    impl WorkServer {
        async fn start(
            reply: impl Fn(&Captured, &str, &Value) -> Answer + Send + Sync + 'static,
        ) -> Self {
            let token_fetches = Arc::new(AtomicUsize::new(0));
            let fetches = Arc::clone(&token_fetches);
            let server = VendorServer::start(move |c| {
                if c.path == "/gettoken" {
                    assert_eq!(c.method, "GET");
                    if c.query_param("appkey").as_deref() != Some(APP_KEY)
                        || c.query_param("appsecret").as_deref() != Some(APP_SECRET)
                    {
                        return Answer::json(
                            json!({"errcode": 40089, "errmsg": "不合法的corpid或corpsecret"}),
                        );
                    }
                    let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
                    return Answer::json(json!({"errcode": 0, "errmsg": "ok",
                                               "access_token": format!("tok-{n}"),
                                               "expires_in": 7200}));
                }
                let token = c.query_param("access_token").unwrap_or_default();
                let body = if c.header("content-type").starts_with("application/json") {
                    c.json()
                } else {
                    Value::Null
                };
                reply(c, &token, &body)
            })
            .await;
            WorkServer {
                server,
                token_fetches,
            }
        }

        fn fetches(&self) -> usize {
            self.token_fetches.load(Ordering::SeqCst)
        }

        /// The requests other than `/gettoken`.
        fn calls(&self) -> Vec<Captured> {
            self.server
                .requests()
                .into_iter()
                .filter(|c| c.path != "/gettoken")
                .collect()
        }
    }

    const SEND_PATH: &str = "/topapi/message/corpconversation/asyncsend_v2";

    #[tokio::test]
    async fn work_notices_with_the_same_content_share_a_task() {
        let tasks = Arc::new(AtomicUsize::new(1000));
        let next = Arc::clone(&tasks);
        let server = WorkServer::start(move |c, token, body| {
            assert_eq!((c.method.as_str(), c.path.as_str()), ("POST", SEND_PATH));
            assert_eq!(token, "tok-1");
            assert_eq!(body["agent_id"], AGENT_ID);
            let id = next.fetch_add(1, Ordering::SeqCst) + 1;
            Answer::json(json!({"errcode": 0, "errmsg": "ok", "task_id": id,
                                "request_id": "4jzllmte0wau"}))
        })
        .await;
        let (_dir, sender) = sender().await;
        let a = json!({"msgtype": "markdown", "markdown": {"title": "Payslip", "text": "## May"}});
        let b = json!({"msgtype": "text", "text": {"content": "hello"}});
        let record =
            |to: &str, content: &Value| testkit::record(Channel::DingtalkWork, to, content.clone());
        let mut other_request = record("u4", &a);
        other_request.request_id = "req-2".into();
        let records = [
            record("u1", &a),
            record("u2", &a),
            record("u3", &b),
            record("@all", &a),
            other_request,
            record("bad,id", &a),
            record("u5", &a),
        ];
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let ids: Vec<Result<Option<String>, String>> = sender
            .send_batch(&refs, 1, &work_account(&server.server.url))
            .await
            .into_iter()
            .map(|r| {
                r.map(|o| {
                    assert_eq!(o.vendor, "dingtalk");
                    o.vendor_message_id
                })
                .map_err(|e| e.code().to_string())
            })
            .collect();
        let id = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(
            ids,
            [
                id("1001"),
                id("1001"),
                id("1002"),
                id("1003"),
                id("1004"),
                Err("bad_receiver".into()),
                id("1001"),
            ]
        );
        assert_eq!(server.fetches(), 1);
        let bodies: Vec<Value> = server.calls().iter().map(Captured::json).collect();
        assert_eq!(
            bodies,
            [
                json!({"agent_id": AGENT_ID, "userid_list": "u1,u2,u5", "msg": a}),
                json!({"agent_id": AGENT_ID, "userid_list": "u3", "msg": b}),
                json!({"agent_id": AGENT_ID, "to_all_user": true, "msg": a}),
                json!({"agent_id": AGENT_ID, "userid_list": "u4", "msg": a}),
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_once() {
        let server = WorkServer::start(|_, token, _| {
            if token == "tok-1" {
                Answer::json(json!({"errcode": 88, "sub_code": "40014",
                    "sub_msg": "不合法的access_token",
                    "errmsg": "ding talk error[subcode=40014,submsg=不合法的access_token]"}))
            } else {
                Answer::json(json!({"errcode": 0, "errmsg": "ok", "task_id": 77}))
            }
        })
        .await;
        let (_dir, sender) = sender().await;
        let account = work_account(&server.server.url);
        let r = testkit::record(
            Channel::DingtalkWork,
            "u1",
            json!({"msgtype": "text", "text": {"content": "hi"}}),
        );
        let outcome = sender.send(&r, 1, &account).await.unwrap();
        assert_eq!(outcome.vendor_message_id.as_deref(), Some("77"));
        assert_eq!(server.fetches(), 2);
        let tokens: Vec<String> = server
            .calls()
            .iter()
            .map(|c| c.query_param("access_token").unwrap())
            .collect();
        assert_eq!(tokens, ["tok-1", "tok-2"]);

        // The fresh token is cached.
        sender.send(&r, 1, &account).await.unwrap();
        assert_eq!(server.fetches(), 2);
        assert_eq!(server.calls().len(), 3);

        // A token refused again after the refresh: the error stands, no third fetch.
        let always = WorkServer::start(|_, _, _| {
            Answer::json(json!({"errcode": 42001, "errmsg": "access_token超时"}))
        })
        .await;
        let err = sender
            .send(&r, 1, &work_account(&always.server.url))
            .await
            .unwrap_err();
        // Same app key: the cache still holds tok-2 from the first server, which this one
        // refuses; the refresh gets tok-1 from this server, refused too.
        assert_eq!(err.code(), "dingtalk_42001");
        assert!(!err.is_retryable());
        assert_eq!(always.fetches(), 1);
        assert_eq!(always.calls().len(), 2);
    }

    #[tokio::test]
    async fn work_errors_map_to_retryable_or_permanent() {
        let server = WorkServer::start(|_, _, body| {
            let answer =
                |code: i64, msg: &str| Answer::json(json!({"errcode": code, "errmsg": msg}));
            match body["msg"]["text"]["content"].as_str().unwrap_or("") {
                "busy" => answer(-1, "系统繁忙"),
                "qps" => answer(90018, "当前企业调用该接口的频率超过上限"),
                "qpm" => answer(143104, "企业每分钟发送人次QPM超限"),
                "global" => answer(90002, "调用过于频繁"),
                _ => answer(40035, "不合法的参数"),
            }
        })
        .await;
        let (_dir, sender) = sender().await;
        let account = work_account(&server.server.url);
        let send = |s: &str| {
            let r = testkit::record(
                Channel::DingtalkWork,
                "u1",
                json!({"msgtype": "text", "text": {"content": s}}),
            );
            let sender = &sender;
            let account = &account;
            async move { sender.send(&r, 1, account).await.unwrap_err() }
        };
        for (text, code) in [
            ("busy", "dingtalk_system_busy"),
            ("qps", "dingtalk_90018"),
            ("qpm", "dingtalk_143104"),
            ("global", "dingtalk_90002"),
        ] {
            let err = send(text).await;
            assert_eq!(err.code(), code);
            assert!(err.is_retryable(), "{err:?}");
        }
        let err = send("bad").await;
        assert_eq!(
            err,
            SendError::Permanent {
                code: "dingtalk_40035".into(),
                detail: "errcode 40035: 不合法的参数".into(),
            }
        );

        // Wrong credentials (with no token cached yet): gettoken's own error, permanent,
        // without the secret.
        let (_dir, sender) = self::sender().await;
        let mut wrong = account.clone();
        wrong["app_secret"] = json!("not-the-secret");
        let r = testkit::record(
            Channel::DingtalkWork,
            "u1",
            json!({"msgtype": "text", "text": {"content": "x"}}),
        );
        let err = sender.send(&r, 1, &wrong).await.unwrap_err();
        assert_eq!(err.code(), "dingtalk_40089");
        assert!(!err.is_retryable());
        assert!(!err.detail().contains("not-the-secret"));
    }

    #[tokio::test]
    async fn recall_takes_back_the_task() {
        let server = WorkServer::start(|c, token, body| {
            assert_eq!(c.path, "/topapi/message/corpconversation/recall");
            assert_eq!(c.method, "POST");
            assert_eq!(token, "tok-1");
            assert_eq!(
                *body,
                json!({"agent_id": AGENT_ID, "msg_task_id": 256271667526_i64})
            );
            Answer::json(json!({"errcode": 0, "errmsg": "ok"}))
        })
        .await;
        let (_dir, sender) = sender().await;
        let account = work_account(&server.server.url);
        let r = testkit::record(
            Channel::DingtalkWork,
            "u1",
            json!({"msgtype": "text", "text": {"content": "oops"}}),
        );
        let mut event = DeliveryEvent::for_record(&r, State::Sent, 1);
        event.vendor_message_id = Some("256271667526".into());
        sender.recall(&event, 1, &account).await.unwrap();
        assert_eq!(server.calls().len(), 1);

        event.vendor_message_id = None;
        let err = sender.recall(&event, 1, &account).await.unwrap_err();
        assert_eq!(err.code(), "no_vendor_message_id");

        let robot = testkit::record(
            Channel::DingtalkRobot,
            "u1",
            json!({"msgtype": "text", "text": {"content": "x"}}),
        );
        let err = sender
            .recall(
                &DeliveryEvent::for_record(&robot, State::Sent, 1),
                1,
                &robot_account(&server.server.url, true),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "not_supported");
        assert_eq!(server.calls().len(), 1);
    }

    #[tokio::test]
    async fn receipts_come_from_the_send_result_of_each_task() {
        let server = WorkServer::start(|c, _, body| {
            assert_eq!(c.path, "/topapi/message/corpconversation/getsendresult");
            assert_eq!(body["agent_id"], AGENT_ID);
            match body["task_id"].as_i64() {
                Some(501) => Answer::json(json!({"errcode": 0, "errmsg": "ok", "send_result": {
                    "read_user_id_list": ["u1"],
                    "unread_user_id_list": ["u2", "someone-else"],
                    "failed_user_id_list": ["u3"],
                    "invalid_user_id_list": ["u4"],
                    "forbidden_user_id_list": ["u5", "u6"],
                    "invalid_dept_id_list": [],
                    "forbidden_list": [{"code": "143106", "count": 1, "userid": "u5"}]
                }})),
                _ => Answer::json(json!({"errcode": 40035, "errmsg": "不合法的参数"})),
            }
        })
        .await;
        let (_dir, sender) = sender().await;
        let now = chrono::Utc::now().timestamp_millis();
        let pending = |id: &str, to: &str, sent_at: i64| PendingReceipt {
            vendor_message_id: id.into(),
            receiver: to.into(),
            sent_at,
        };
        let list = [
            pending("501", "u1", now),
            pending("501", "u2", now),
            pending("501", "u3", now),
            pending("501", "u4", now),
            pending("501", "u5", now),
            pending("501", "u6", now),
            pending("501", "u7", now),
            pending("502", "u8", now),
            pending("503", "u9", now - 25 * 3600 * 1000),
            pending("504", "@all", now),
            pending("not-a-task", "u10", now),
        ];
        let receipts = sender
            .pull_receipts(1, &work_account(&server.server.url), &list)
            .await
            .unwrap();
        let got: Vec<(String, bool, Option<String>)> = receipts
            .iter()
            .map(|r| {
                assert_eq!(r.vendor, "dingtalk");
                assert_eq!(r.vendor_message_id, "501");
                (
                    r.receiver.clone().unwrap(),
                    r.delivered,
                    r.error_code.clone(),
                )
            })
            .collect();
        let failed = |to: &str, code: &str| (to.to_string(), false, Some(code.to_string()));
        assert_eq!(
            got,
            [
                ("u1".to_string(), true, None),
                ("u2".to_string(), true, None),
                failed("u3", "dingtalk_send_failed"),
                failed("u4", "dingtalk_invalid_user"),
                failed("u5", "dingtalk_143106"),
                failed("u6", "dingtalk_forbidden"),
            ]
        );
        assert_eq!(
            receipts[4].error_detail.as_deref(),
            Some("filtered by DingTalk's flow control 143106 (limit 1)")
        );
        // Only the tasks that can still answer are asked, once each.
        let asked: Vec<Value> = server
            .calls()
            .iter()
            .map(|c| c.json()["task_id"].clone())
            .collect();
        assert_eq!(asked, [json!(501), json!(502)]);

        // Busy with nothing gathered: the caller comes back later.
        let busy =
            WorkServer::start(|_, _, _| Answer::json(json!({"errcode": -1, "errmsg": "系统繁忙"})))
                .await;
        let err = sender
            .pull_receipts(1, &work_account(&busy.server.url), &list)
            .await
            .unwrap_err();
        assert!(err.is_retryable());

        // Robots have no receipts.
        let none = sender
            .pull_receipts(1, &robot_account(&busy.server.url, false), &list)
            .await
            .unwrap();
        assert!(none.is_empty());
        assert_eq!(busy.calls().len(), 1);
    }

    /// The parts of a `multipart/form-data` body: each part's header block and its data.
    fn parse_multipart(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
        let boundary = content_type
            .strip_prefix("multipart/form-data; boundary=")
            .expect("a multipart content type");
        let delimiter = format!("--{boundary}");
        let d = delimiter.as_bytes();
        let at: Vec<usize> = (0..=body.len() - d.len())
            .filter(|&i| &body[i..i + d.len()] == d)
            .collect();
        assert!(body[at[at.len() - 1] + d.len()..].starts_with(b"--\r\n"));
        at.windows(2)
            .map(|w| {
                let part = &body[w[0] + d.len()..w[1]];
                let part = part.strip_prefix(b"\r\n").unwrap();
                let part = part.strip_suffix(b"\r\n").unwrap();
                let split = part.windows(4).position(|x| x == b"\r\n\r\n").unwrap();
                (
                    String::from_utf8(part[..split].to_vec()).unwrap(),
                    part[split + 4..].to_vec(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn media_is_uploaded_as_multipart() {
        let file = b"\x89PNG\r\n\x1a\n--not-a-boundary\r\n\x00\xff binary".to_vec();
        let expected = file.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let parts_seen = Arc::clone(&seen);
        let server = WorkServer::start(move |c, token, _| {
            assert_eq!(
                (c.method.as_str(), c.path.as_str()),
                ("POST", "/media/upload")
            );
            assert_eq!(token, "tok-1");
            assert_eq!(c.query_param("type").as_deref(), Some("image"));
            let parts = parse_multipart(c.header("content-type"), &c.body);
            *parts_seen.lock().unwrap() = parts.clone();
            if parts.len() != 2 || parts[1].1 != expected {
                return Answer::json(json!({"errcode": 40004, "errmsg": "无效的媒体文件类型"}));
            }
            Answer::json(json!({"errcode": 0, "errmsg": "ok", "type": "image",
                                "media_id": "@lADOADmaWMzazQKA", "created_at": 1605863153573_i64}))
        })
        .await;
        let (_dir, sender) = sender().await;
        let account = work_account(&server.server.url);
        let media = Media {
            kind: "image".into(),
            filename: "logo \"1\".png".into(),
            content_type: "image/png".into(),
            bytes: file.into(),
        };
        let id = sender
            .upload_media(Channel::DingtalkWork, 1, &account, &media)
            .await
            .unwrap();
        assert_eq!(id, "@lADOADmaWMzazQKA");
        let parts = seen.lock().unwrap().clone();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0],
            (
                "Content-Disposition: form-data; name=\"type\"".to_string(),
                b"image".to_vec()
            )
        );
        assert_eq!(
            parts[1].0,
            "Content-Disposition: form-data; name=\"media\"; filename=\"logo %221%22.png\"\r\n\
             Content-Type: image/png"
        );
        assert_eq!(parts[1].1, media.bytes.to_vec());

        let mut gif = media.clone();
        gif.kind = "gif".into();
        let err = sender
            .upload_media(Channel::DingtalkWork, 1, &account, &gif)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "bad_media");
        let mut voice = media.clone();
        voice.kind = "voice".into();
        voice.bytes = vec![0u8; (2 << 20) + 1].into();
        let err = sender
            .upload_media(Channel::DingtalkWork, 1, &account, &voice)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "bad_media");
        assert!(err.detail().contains("2 MB"), "{err}");
        let err = sender
            .upload_media(
                Channel::DingtalkRobot,
                1,
                &robot_account(&server.server.url, false),
                &media,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "not_supported");
        assert_eq!(server.calls().len(), 1);
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let robot = RobotAccount::parse(&json!({"access_token": "tok-hunter2"})).unwrap();
        assert_eq!(robot.base_url, "https://oapi.dingtalk.com");
        assert!(robot.secret.is_none());
        let work = WorkAccount::parse(&json!({"app_key": "k", "app_secret": "hunter2",
                                              "agent_id": 5, "base_url": "http://h:1/"}))
        .unwrap();
        assert_eq!(work.base_url, "http://h:1");
        assert_eq!(work.token_key(), "dingtalk:k");
        let debug = format!("{robot:?} {work:?}");
        assert!(!debug.contains("hunter2"), "{debug}");

        let bad_robots = [
            json!("tok-hunter2"),
            json!({}),
            json!({"access_token": ""}),
            json!({"access_token": 12345678}),
            json!({"access_token": "https://oapi.dingtalk.com/robot/send?access_token=hunter2"}),
            json!({"access_token": "tok-hunter2", "secret": ""}),
            json!({"access_token": "tok-hunter2", "secret": 12345678}),
            json!({"access_token": "tok-hunter2", "base_url": "ftp://h"}),
            json!({"access_token": "tok-hunter2", "base_url": "https://h/?x=1"}),
            json!({"access_token": "tok-hunter2", "webhook": "x"}),
        ];
        for config in bad_robots {
            let err = check_account(Channel::DingtalkRobot, &config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("12345678"),
                "{config}: {err}"
            );
        }
        let bad_work = [
            json!({"app_key": "k", "app_secret": "hunter2"}),
            json!({"app_key": "k", "app_secret": "hunter2", "agent_id": "5"}),
            json!({"app_key": "k", "app_secret": "hunter2", "agent_id": 0}),
            json!({"app_key": "", "app_secret": "hunter2", "agent_id": 5}),
            json!({"app_key": "k", "app_secret": 12345678, "agent_id": 5}),
            json!({"app_key": "k", "app_secret": "", "agent_id": 5}),
            json!({"app_key": "k", "app_secret": "hunter2", "agent_id": 5, "corp_id": "c"}),
        ];
        for config in bad_work {
            let err = check_account(Channel::DingtalkWork, &config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("12345678"),
                "{config}: {err}"
            );
        }
        assert!(check_account(Channel::Email, &json!({})).is_err());
    }

    #[test]
    fn contents_are_checked_per_channel_and_type() {
        let robot = |c: Value| check_content(Channel::DingtalkRobot, &c);
        let work = |c: Value| check_content(Channel::DingtalkWork, &c);
        assert!(robot(json!({"msgtype": "text", "text": {"content": "hi"}})).is_ok());
        assert!(
            robot(
                json!({"msgtype": "link", "link": {"title": "t", "text": "x",
                                                        "messageUrl": "https://e"}})
            )
            .is_ok()
        );
        assert!(
            robot(json!({"msgtype": "feedCard", "feedCard": {"links": [
            {"title": "t", "messageURL": "https://e", "picURL": "https://p"}]}}))
            .is_ok()
        );
        assert!(work(json!({"msgtype": "image", "image": {"media_id": "@lADO"}})).is_ok());
        assert!(
            work(json!({"msgtype": "voice", "voice": {"media_id": "@l", "duration": "10"}}))
                .is_ok()
        );
        assert!(work(json!({"msgtype": "file", "file": {"media_id": "@l"}})).is_ok());
        assert!(
            work(json!({"msgtype": "oa", "oa": {"message_url": "https://e",
            "head": {"bgcolor": "FFBBBBBB", "text": "h"},
            "body": {"title": "t", "form": [{"key": "k", "value": "v"}]}}}))
            .is_ok()
        );
        assert!(
            work(
                json!({"msgtype": "action_card", "action_card": {"title": "t",
            "markdown": "m", "btn_orientation": "1",
            "btn_json_list": [{"title": "a", "action_url": "https://a"}]}})
            )
            .is_ok()
        );

        let errors = [
            (robot(json!("text")), "content must be a JSON object"),
            (
                robot(json!({"text": {"content": "x"}})),
                "content needs `msgtype`",
            ),
            (
                robot(json!({"msgtype": "image", "image": {}})),
                "unknown msgtype `image`",
            ),
            (
                work(json!({"msgtype": "feedCard", "feedCard": {}})),
                "unknown msgtype `feedCard`",
            ),
            (
                robot(json!({"msgtype": "text", "text": {"content": "x"}, "at": {}})),
                "`at` is built from the receivers",
            ),
            (
                work(json!({"msgtype": "text", "text": {"content": "x"}, "extra": 1})),
                "unknown content field `extra`",
            ),
            (
                robot(json!({"msgtype": "text"})),
                "a text message needs `text`",
            ),
            (
                robot(json!({"msgtype": "text", "text": {"content": ""}})),
                "`text`: `content` is empty",
            ),
            (
                robot(json!({"msgtype": "markdown", "markdown": {"text": "x"}})),
                "`markdown`: needs `title`",
            ),
            (
                robot(json!({"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x"}})),
                "needs `singleTitle` and `singleURL`, or `btns`",
            ),
            (
                robot(
                    json!({"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x",
                    "btns": [{"title": "a"}]}}),
                ),
                "`btns[0]`: needs `actionURL`",
            ),
            (
                robot(json!({"msgtype": "feedCard", "feedCard": {"links": []}})),
                "needs `links`: a non-empty list",
            ),
            (
                work(json!({"msgtype": "voice", "voice": {"media_id": "@l"}})),
                "needs `duration`",
            ),
            (
                work(json!({"msgtype": "oa", "oa": {"message_url": "https://e", "body": {}}})),
                "needs `head`",
            ),
            (
                work(json!({"msgtype": "oa", "oa": {"message_url": "https://e",
                    "head": {"bgcolor": "FF", "text": "h"}}})),
                "needs `body`",
            ),
            (
                work(
                    json!({"msgtype": "link", "link": {"title": "t", "text": "x",
                    "messageUrl": 5}}),
                ),
                "`messageUrl` must be a string",
            ),
            (
                check_content(Channel::Sms, &json!({})),
                "not a DingTalk channel",
            ),
        ];
        for (result, expected) in errors {
            let err = result.unwrap_err();
            assert!(err.contains(expected), "{err} (expected {expected})");
        }
    }

    #[tokio::test]
    async fn bad_configs_fail_the_whole_batch_without_a_request() {
        let server = robot_server(false).await;
        let (_dir, sender) = sender().await;
        let good = testkit::record(
            Channel::DingtalkRobot,
            "u1",
            json!({"msgtype": "text", "text": {"content": "x"}}),
        );
        let results = sender
            .send_batch(&[&good, &good], 1, &json!({"access_token": ""}))
            .await;
        for r in results {
            assert_eq!(r.unwrap_err().code(), "bad_account");
        }
        let bad = testkit::record(
            Channel::DingtalkRobot,
            "u1",
            json!({"msgtype": "text", "text": {"content": 5}}),
        );
        let err = sender
            .send(&bad, 1, &robot_account(&server.url, false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "bad_content");
        assert!(server.requests().is_empty());
    }
}

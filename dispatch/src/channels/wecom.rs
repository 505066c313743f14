//! WeCom (企业微信): self-built app messages (`wecom_app`) and group robots (`wecom_robot`).
//! Events carry the vendor name `wecom`.
//!
//! # App messages (`wecom_app`)
//!
//! Account config:
//!
//! ```json
//! {"corp_id": "ww…", "corp_secret": "…", "agent_id": 1000002, "base_url": "https://qyapi.weixin.qq.com"}
//! ```
//!
//! The app's secret is exchanged for an access token (`GET /cgi-bin/gettoken?corpid&corpsecret`,
//! `expires_in` 7200 s), cached under `wecom:<corp_id>:<agent_id>` and shared by every worker;
//! answers `40014` (invalid token) and `42001` (expired) drop it, and the request is sent once
//! more with a fresh one. Messages are `POST /cgi-bin/message/send?access_token=…` with
//! `{"touser", "msgtype", "agentid", <msgtype>: {...}, "safe"?, "enable_duplicate_check"?,
//! "duplicate_check_interval"?}`. Receivers are userids, or `@all` for the whole visible range.
//!
//! Content is the message type and its object, as documented:
//!
//! ```json
//! {"msgtype": "text", "text": {"content": "Your order {$order} shipped"}}
//! {"msgtype": "markdown", "markdown": {"content": "**{$order}** shipped"}}
//! {"msgtype": "textcard", "textcard": {"title": "…", "description": "…", "url": "https://…", "btntxt": "More"}}
//! {"msgtype": "news", "news": {"articles": [{"title": "…", "url": "https://…", "picurl": "https://…"}]}}
//! {"msgtype": "image", "image": {"media_id": "…"}}
//! {"msgtype": "file", "file": {"media_id": "…"}}
//! ```
//!
//! plus, optionally, `safe` (0/1), `enable_duplicate_check` (0/1) and `duplicate_check_interval`
//! (seconds). Media ids come from `POST /v1/accounts/{id}/media` ([`Sender::upload_media`]:
//! `POST /cgi-bin/media/upload?access_token&type=`, multipart part `media`).
//!
//! Messages of one batch with identical content share a request: `touser` is up to 1,000
//! userids joined by `|` (`@all` always goes alone). The answer's `msgid` is every receiver's
//! vendor message id; receivers named in `invaliduser` or `unlicenseduser` fail with the
//! permanent `wecom_invalid_user`. [`Sender::recall`] recalls by `msgid`
//! (`POST /cgi-bin/message/recall`) — for every receiver of that request, as WeCom recalls
//! whole messages.
//!
//! # Group robots (`wecom_robot`)
//!
//! Account config: `{"webhook_key": "…", "base_url"?}` — the `key` of the robot's webhook
//! `https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=…`. Receivers are who to mention:
//! `@all`, mobile numbers (`mentioned_mobile_list`, mainland numbers without `+86`) or userids
//! (`mentioned_list`). Content is one of
//!
//! ```json
//! {"msgtype": "text", "text": {"content": "Build {$build} failed"}}
//! {"msgtype": "markdown", "markdown": {"content": "### {$build}\n> failed"}}
//! {"msgtype": "image", "image": {"base64": "…", "md5": "…"}}
//! {"msgtype": "news", "news": {"articles": [{"title": "…", "url": "https://…"}]}}
//! {"msgtype": "file", "file": {"media_id": "…"}}
//! ```
//!
//! Mentions go in `text` (both lists) and `markdown` (`<@userid>` appended; markdown cannot
//! mention by mobile); the other types are posted as they are. Messages of a batch with
//! identical content are posted once, mentioning all their receivers: a robot may post 20
//! messages a minute. Robots give no message id and cannot recall. Their `file` and `voice`
//! messages take media uploaded through the robot itself
//! (`POST /cgi-bin/webhook/upload_media?key&type=file|voice`, multipart part `media`), which
//! `POST /v1/accounts/{id}/media` does for robot accounts.
//!
//! # Errors
//!
//! `errcode` 0 is success. Retryable: `-1` (system busy), `45009` (frequency limit; for robots
//! the 20-a-minute limit, retried after 60 s), `45033` (concurrency limit), HTTP 408/429/5xx and
//! transport failures. Token answers `40014`/`42001` are refreshed once (then retryable). Anything
//! else is permanent (`40001`/`40013` bad credentials, `60020` IP not allowed, `81013` no valid
//! receiver, `93000` bad robot key, `40058` bad parameter, …), coded `wecom_<errcode>` with WeCom's
//! `errmsg` as the detail.
//!
//! Documentation used: <https://developer.work.weixin.qq.com/document/path/91039> (gettoken),
//! <https://developer.work.weixin.qq.com/document/path/90236> (message/send),
//! <https://developer.work.weixin.qq.com/document/path/94867> (message/recall),
//! <https://developer.work.weixin.qq.com/document/path/90253> (media/upload),
//! <https://developer.work.weixin.qq.com/document/path/91770> (group robots),
//! <https://developer.work.weixin.qq.com/document/path/90313> (error codes).

use super::http::{self, bad_account, bad_content};
use super::token::{FreshToken, TokenCache};
use super::{Media, SendError, SendOutcome, Sender};
use async_trait::async_trait;
use herald_core::config::Secret;
use herald_core::{Channel, DeliveryEvent, MessageRecord};
use reqwest::{Client, RequestBuilder};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// The vendor name on delivery events.
const VENDOR: &str = "wecom";

/// WeCom's API origin.
const DEFAULT_BASE_URL: &str = "https://qyapi.weixin.qq.com";

/// Most userids in one app message's `touser`.
const MAX_TOUSER: usize = 1000;

/// How long a robot waits after its 20-a-minute limit.
const ROBOT_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// Content fields besides the message object that app messages pass on.
const APP_OPTIONS: [&str; 3] = ["safe", "enable_duplicate_check", "duplicate_check_interval"];

/// The message types of app messages and their required fields.
const APP_TYPES: [(&str, &[&str]); 6] = [
    ("text", &["content"]),
    ("markdown", &["content"]),
    ("textcard", &["title", "description", "url"]),
    ("news", &["articles"]),
    ("image", &["media_id"]),
    ("file", &["media_id"]),
];

/// The message types of robots and their required fields.
const ROBOT_TYPES: [(&str, &[&str]); 5] = [
    ("text", &["content"]),
    ("markdown", &["content"]),
    ("image", &["base64", "md5"]),
    ("news", &["articles"]),
    ("file", &["media_id"]),
];

/// A `wecom_app` account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppAccount {
    corp_id: String,
    corp_secret: Secret,
    agent_id: i64,
    /// Empty when the config leaves it out: WeCom's own origin.
    #[serde(default)]
    base_url: String,
}

/// A `wecom_robot` account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RobotAccount {
    webhook_key: Secret,
    /// Empty when the config leaves it out: WeCom's own origin.
    #[serde(default)]
    base_url: String,
}

/// Parses an account, refusing ill-typed secrets before serde could quote them.
fn parse<T: for<'de> Deserialize<'de>>(config: &Value, secret: &str) -> Result<T, String> {
    if config.get(secret).is_some_and(|s| !s.is_string()) {
        return Err(format!("`{secret}` must be a string"));
    }
    serde_json::from_value(config.clone()).map_err(|e| e.to_string())
}

impl AppAccount {
    fn parse(config: &Value) -> Result<Self, String> {
        let mut a: AppAccount = parse(config, "corp_secret")?;
        if a.corp_id.trim().is_empty() || a.corp_secret.expose().is_empty() {
            return Err("`corp_id` and `corp_secret` must not be empty".into());
        }
        a.base_url = http::base_url(Some(a.base_url).filter(|b| !b.is_empty()), DEFAULT_BASE_URL)?;
        Ok(a)
    }

    fn token_key(&self) -> String {
        format!("{VENDOR}:{}:{}", self.corp_id, self.agent_id)
    }
}

impl RobotAccount {
    fn parse(config: &Value) -> Result<Self, String> {
        let mut a: RobotAccount = parse(config, "webhook_key")?;
        let key = a.webhook_key.expose();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("`webhook_key` must be the robot's key alone (letters, digits, -)".into());
        }
        a.base_url = http::base_url(Some(a.base_url).filter(|b| !b.is_empty()), DEFAULT_BASE_URL)?;
        Ok(a)
    }
}

/// Checks an account config of `channel`.
pub fn check_account(channel: Channel, config: &Value) -> Result<(), String> {
    match channel {
        Channel::WecomApp => AppAccount::parse(config).map(drop),
        Channel::WecomRobot => RobotAccount::parse(config).map(drop),
        other => Err(format!("{other} is not a WeCom channel")),
    }
}

/// Checks a template's content for `channel` (see the module docs).
pub fn check_content(channel: Channel, content: &Value) -> Result<(), String> {
    let (types, options): (&[(&str, &[&str])], &[&str]) = match channel {
        Channel::WecomApp => (&APP_TYPES, &APP_OPTIONS),
        Channel::WecomRobot => (&ROBOT_TYPES, &[]),
        other => return Err(format!("{other} is not a WeCom channel")),
    };
    let obj = content.as_object().ok_or("content must be a JSON object")?;
    let msgtype = obj
        .get("msgtype")
        .and_then(Value::as_str)
        .ok_or("content needs `msgtype`")?;
    let (_, required) = types.iter().find(|(t, _)| *t == msgtype).ok_or_else(|| {
        let names: Vec<&str> = types.iter().map(|(t, _)| *t).collect();
        format!("`msgtype` must be one of {}", names.join(", "))
    })?;
    let body = obj
        .get(msgtype)
        .and_then(Value::as_object)
        .ok_or_else(|| format!("content needs the object `{msgtype}`"))?;
    for field in *required {
        match body.get(*field) {
            None | Some(Value::Null) => return Err(format!("`{msgtype}.{field}` is required")),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(format!("`{msgtype}.{field}` is empty"));
            }
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(format!("`{msgtype}.{field}` is empty"));
            }
            _ => {}
        }
    }
    if body.contains_key("mentioned_list") || body.contains_key("mentioned_mobile_list") {
        return Err("mentions are built from the receivers; leave them out of the content".into());
    }
    if let Some(k) = obj
        .keys()
        .find(|k| *k != "msgtype" && *k != msgtype && !options.contains(&k.as_str()))
    {
        return Err(format!("unknown content field `{k}`"));
    }
    Ok(())
}

/// The WeCom client, for both channels.
pub struct WecomSender {
    client: Client,
    tokens: Arc<TokenCache>,
}

impl WecomSender {
    /// A client over the shared HTTP pool and token cache.
    pub fn new(client: Client, tokens: Arc<TokenCache>) -> Self {
        WecomSender { client, tokens }
    }

    /// Exchanges the app's secret for an access token.
    async fn fetch_token(&self, account: &AppAccount) -> Result<FreshToken, SendError> {
        let request = self
            .client
            .get(format!("{}/cgi-bin/gettoken", account.base_url))
            .query(&[
                ("corpid", account.corp_id.as_str()),
                ("corpsecret", account.corp_secret.expose()),
            ]);
        let reply = check_reply(&http::send_for_body(VENDOR, request).await?)?;
        let token = reply
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad_reply("gettoken answered without an access_token"))?;
        let seconds = reply
            .get("expires_in")
            .and_then(Value::as_u64)
            .filter(|s| *s > 0)
            .unwrap_or(7200);
        Ok(FreshToken {
            token: token.to_string(),
            expires_in: Duration::from_secs(seconds),
        })
    }

    /// Sends the request `build` makes with the app's token; when WeCom refuses the token, drops
    /// it, fetches a fresh one and tries once more.
    async fn with_token(
        &self,
        account: &AppAccount,
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
                token_refused,
            )
            .await
    }

    /// App messages: identical contents share a request of up to 1,000 userids.
    async fn send_app(
        &self,
        records: &[&MessageRecord],
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let account = match AppAccount::parse(account) {
            Ok(a) => a,
            Err(e) => {
                return records
                    .iter()
                    .map(|_| Err(bad_account(e.clone())))
                    .collect();
            }
        };
        let mut results: Vec<Option<Result<SendOutcome, SendError>>> = vec![None; records.len()];
        for group in group_by_content(records, MAX_TOUSER) {
            let first = records[group[0]];
            if let Err(e) = check_content(Channel::WecomApp, &first.content) {
                for &i in &group {
                    results[i] = Some(Err(bad_content(e.clone())));
                }
                continue;
            }
            let touser: Vec<&str> = group
                .iter()
                .map(|&i| records[i].receiver.as_str())
                .collect();
            let mut body = first.content.as_object().cloned().unwrap_or_default();
            body.insert("touser".into(), touser.join("|").into());
            body.insert("agentid".into(), account.agent_id.into());
            let url = format!("{}/cgi-bin/message/send", account.base_url);
            let reply = self
                .with_token(&account, |token| {
                    self.client
                        .post(&url)
                        .query(&[("access_token", token)])
                        .json(&body)
                })
                .await;
            for &i in &group {
                results[i] = Some(app_result(&reply, &records[i].receiver));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(bad_content("not sent"))))
            .collect()
    }

    /// Robot messages: identical contents are posted once, mentioning all their receivers.
    async fn send_robot(
        &self,
        records: &[&MessageRecord],
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let account = match RobotAccount::parse(account) {
            Ok(a) => a,
            Err(e) => {
                return records
                    .iter()
                    .map(|_| Err(bad_account(e.clone())))
                    .collect();
            }
        };
        let mut results: Vec<Option<Result<SendOutcome, SendError>>> = vec![None; records.len()];
        for group in group_by_content(records, usize::MAX) {
            let first = records[group[0]];
            let result = match check_content(Channel::WecomRobot, &first.content) {
                Err(e) => Err(bad_content(e)),
                Ok(()) => {
                    let receivers: Vec<&str> = group
                        .iter()
                        .map(|&i| records[i].receiver.as_str())
                        .collect();
                    let body = with_mentions(&first.content, &receivers);
                    let request = self
                        .client
                        .post(format!("{}/cgi-bin/webhook/send", account.base_url))
                        .query(&[("key", account.webhook_key.expose())])
                        .json(&body);
                    match http::send_for_body(VENDOR, request).await {
                        Ok(reply) => check_reply(&reply).map(|_| outcome(None)),
                        Err(e) => Err(e),
                    }
                    .map_err(robot_wait)
                }
            };
            for &i in &group {
                results[i] = Some(result.clone());
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(bad_content("not sent"))))
            .collect()
    }
}

#[async_trait]
impl Sender for WecomSender {
    fn max_batch(&self) -> usize {
        MAX_TOUSER
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
            .unwrap_or_else(|| Err(bad_content("not sent")))
    }

    async fn send_batch(
        &self,
        records: &[&MessageRecord],
        _account_id: i64,
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        match records.first().map(|r| r.channel) {
            Some(Channel::WecomApp) => self.send_app(records, account).await,
            Some(Channel::WecomRobot) => self.send_robot(records, account).await,
            _ => records
                .iter()
                .map(|r| Err(bad_content(format!("{} is not a WeCom channel", r.channel))))
                .collect(),
        }
    }

    async fn recall(
        &self,
        sent: &DeliveryEvent,
        _account_id: i64,
        account: &Value,
    ) -> Result<(), SendError> {
        if sent.channel != Channel::WecomApp {
            return Err(SendError::not_supported("recall of robot messages"));
        }
        let msgid = sent
            .vendor_message_id
            .as_deref()
            .ok_or_else(|| bad_content("the message has no WeCom msgid"))?;
        let account = AppAccount::parse(account).map_err(bad_account)?;
        let url = format!("{}/cgi-bin/message/recall", account.base_url);
        let body = json!({ "msgid": msgid });
        self.with_token(&account, |token| {
            self.client
                .post(&url)
                .query(&[("access_token", token)])
                .json(&body)
        })
        .await
        .map(drop)
    }

    async fn upload_media(
        &self,
        channel: Channel,
        _account_id: i64,
        account: &Value,
        media: &Media,
    ) -> Result<String, SendError> {
        let (content_type, body) = http::multipart(&[], "media", media);
        if channel == Channel::WecomRobot {
            // A robot's `file` and `voice` messages take media uploaded through that robot.
            if !matches!(media.kind.as_str(), "file" | "voice") {
                return Err(SendError::not_supported(
                    "robot media other than file and voice",
                ));
            }
            let account = RobotAccount::parse(account).map_err(bad_account)?;
            let request = self
                .client
                .post(format!("{}/cgi-bin/webhook/upload_media", account.base_url))
                .query(&[
                    ("key", account.webhook_key.expose()),
                    ("type", media.kind.as_str()),
                ])
                .header(reqwest::header::CONTENT_TYPE, content_type.as_str())
                .body(body);
            let reply = check_reply(&http::send_for_body(VENDOR, request).await?)?;
            return media_id(&reply);
        }
        let account = AppAccount::parse(account).map_err(bad_account)?;
        let url = format!("{}/cgi-bin/media/upload", account.base_url);
        let reply = self
            .with_token(&account, |token| {
                self.client
                    .post(&url)
                    .query(&[("access_token", token), ("type", media.kind.as_str())])
                    .header(reqwest::header::CONTENT_TYPE, content_type.as_str())
                    .body(body.clone())
            })
            .await?;
        media_id(&reply)
    }
}

/// The `media_id` of an upload's answer.
fn media_id(reply: &Value) -> Result<String, SendError> {
    reply
        .get("media_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad_reply("the upload answered without a media_id"))
}

/// The record indices of `records` grouped by identical content (in order of first
/// appearance), each group at most `max` long with distinct receivers; `@all` goes alone.
fn group_by_content(records: &[&MessageRecord], max: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<(usize, HashSet<&str>, Vec<usize>)> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let alone = r.receiver == "@all";
        let open = groups.iter_mut().find(|(first, receivers, members)| {
            !alone
                && members.len() < max
                && !receivers.contains("@all")
                && !receivers.contains(r.receiver.as_str())
                && records[*first].content == r.content
        });
        match open {
            Some((_, receivers, members)) => {
                receivers.insert(&r.receiver);
                members.push(i);
            }
            None => groups.push((i, HashSet::from([r.receiver.as_str()]), vec![i])),
        }
    }
    groups.into_iter().map(|(_, _, members)| members).collect()
}

/// A robot message with its receivers as mentions (see the module docs).
fn with_mentions(content: &Value, receivers: &[&str]) -> Value {
    let mut body = content.clone();
    let Some(msgtype) = content.get("msgtype").and_then(Value::as_str) else {
        return body;
    };
    let (mut users, mut mobiles) = (Vec::new(), Vec::new());
    for r in receivers {
        if *r == "@all" {
            users.push("@all".to_string());
        } else if let Some(mobile) = mobile(r) {
            mobiles.push(mobile);
        } else {
            users.push(r.to_string());
        }
    }
    let Some(object) = body.get_mut(msgtype).and_then(Value::as_object_mut) else {
        return body;
    };
    match msgtype {
        "text" => {
            if !users.is_empty() {
                object.insert("mentioned_list".into(), json!(users));
            }
            if !mobiles.is_empty() {
                object.insert("mentioned_mobile_list".into(), json!(mobiles));
            }
        }
        "markdown" => {
            let tags: Vec<String> = users
                .iter()
                .filter(|u| *u != "@all")
                .map(|u| format!("<@{u}>"))
                .collect();
            if let (false, Some(Value::String(text))) = (tags.is_empty(), object.get_mut("content"))
            {
                text.push('\n');
                text.push_str(&tags.join(" "));
            }
        }
        _ => {}
    }
    body
}

/// A receiver that is a phone number, as WeCom wants it (mainland numbers without `+86`).
fn mobile(receiver: &str) -> Option<String> {
    let e164 = herald_core::domain::parse_phone(receiver).ok()?;
    if !(receiver.starts_with('+') || receiver.len() == 11) {
        return None;
    }
    Some(e164.strip_prefix("+86").unwrap_or(&e164).to_string())
}

/// The result of an app message for one of its receivers.
fn app_result(reply: &Result<Value, SendError>, receiver: &str) -> Result<SendOutcome, SendError> {
    let reply = reply.as_ref().map_err(Clone::clone)?;
    for field in ["invaliduser", "unlicenseduser"] {
        let listed = reply
            .get(field)
            .and_then(Value::as_str)
            .is_some_and(|l| l.split('|').any(|u| u == receiver));
        if listed {
            return Err(SendError::Permanent {
                code: "wecom_invalid_user".into(),
                detail: format!("WeCom listed the receiver in `{field}`"),
            });
        }
    }
    let msgid = reply
        .get("msgid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(outcome(msgid))
}

fn outcome(vendor_message_id: Option<String>) -> SendOutcome {
    SendOutcome {
        vendor: VENDOR.into(),
        vendor_message_id,
        billing_units: None,
    }
}

/// Checks WeCom's `{"errcode", "errmsg", ...}` answer; returns it when `errcode` is 0.
fn check_reply(body: &[u8]) -> Result<Value, SendError> {
    let reply: Map<String, Value> =
        serde_json::from_slice(body).map_err(|_| SendError::Retryable {
            code: "wecom_bad_response".into(),
            detail: format!("not a WeCom answer{}", http::excerpt(body)),
            retry_after: None,
        })?;
    let code = reply.get("errcode").and_then(Value::as_i64).unwrap_or(0);
    if code == 0 {
        return Ok(Value::Object(reply));
    }
    let detail = format!(
        "errcode {code}: {}",
        reply.get("errmsg").and_then(Value::as_str).unwrap_or("")
    );
    let code_name = format!("{VENDOR}_{code}");
    Err(match code {
        -1 | 45009 | 45033 | 40014 | 42001 => SendError::Retryable {
            code: code_name,
            detail,
            retry_after: None,
        },
        _ => SendError::Permanent {
            code: code_name,
            detail,
        },
    })
}

/// Whether WeCom refused the access token (invalid or expired).
fn token_refused(e: &SendError) -> bool {
    matches!(e.code(), "wecom_40014" | "wecom_42001")
}

/// A robot's frequency limit waits out the minute.
fn robot_wait(e: SendError) -> SendError {
    match e {
        SendError::Retryable { code, detail, .. } if code == "wecom_45009" => {
            SendError::Retryable {
                code,
                detail,
                retry_after: Some(ROBOT_LIMIT_WAIT),
            }
        }
        other => other,
    }
}

fn bad_reply(detail: &str) -> SendError {
    SendError::Retryable {
        code: "wecom_bad_response".into(),
        detail: detail.into(),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests;

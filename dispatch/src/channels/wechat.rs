//! WeChat: official account template messages (`wechat_official`) and mini program subscribe
//! messages (`wechat_mini`). Receivers are the user's openid under the account's app id.
//!
//! # Account
//!
//! Both channels take the same account config:
//!
//! ```json
//! {"app_id": "wx1234567890abcdef", "app_secret": "…", "base_url": "https://api.weixin.qq.com"}
//! ```
//!
//! - `app_id`: the official account's or mini program's AppID.
//! - `app_secret`: its AppSecret (never printed, never quoted in errors).
//! - `base_url` (optional, default `https://api.weixin.qq.com`): replaces the API origin; it may
//!   carry a path prefix (a proxy), but no query or fragment.
//!
//! # Access token
//!
//! `POST {base_url}/cgi-bin/stable_token` with
//! `{"grant_type": "client_credential", "appid", "secret", "force_refresh": false}` answers
//! `{"access_token", "expires_in"}`. The token is shared by every worker through the
//! [`TokenCache`] under `wechat:<app_id>` and refreshed ahead of its expiry.
//!
//! When a send is answered with 40001, 40014 or 42001 (invalid or expired token), the token is
//! invalidated and fetched again, and that message is sent once more. The new fetch uses normal
//! mode (`force_refresh: false`), which hands out the platform's current token; only when normal
//! mode returns the very token that was just rejected does it ask again with
//! `force_refresh: true`. Forced refreshes are limited (20 a day, at least 30 s apart, and they
//! invalidate the token every other holder uses), so they are kept for that case alone.
//!
//! # Content: `wechat_official` (template message)
//!
//! ```json
//! {"template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
//!  "url": "https://shop.example.com/orders/{$order_id}",
//!  "miniprogram": {"appid": "wxabcdef1234567890", "pagepath": "pages/order?id={$order_id}"},
//!  "data": {"thing1": "{$item}", "amount2": "{$amount}"}}
//! ```
//!
//! `template_id` and `data` (a non-empty object of strings, one per template keyword) are
//! required; `url` and `miniprogram` (`appid` required, `pagepath` optional) are the optional
//! jump targets (WeChat prefers the mini program when both are given). Each data value is sent as
//! `{"value": ...}`. The request is
//! `POST {base_url}/cgi-bin/message/template/send?access_token=...` with
//! `{touser, template_id, url?, miniprogram?, client_msg_id, data}`; `client_msg_id` is the
//! herald message id, so WeChat sends a retried message only once (it deduplicates
//! openid + `client_msg_id` for 10 minutes). The answer `{"errcode": 0, "errmsg": "ok",
//! "msgid": 200228332}` gives the vendor message id (the `MsgID` of WeChat's
//! `TEMPLATESENDJOBFINISH` event).
//!
//! # Content: `wechat_mini` (subscribe message)
//!
//! ```json
//! {"template_id": "bDmywsp2oEHjwAadTGKkUHpC0RgBVPvfAKRm6cHzWDQ",
//!  "page": "pages/order/detail?id={$order_id}",
//!  "miniprogram_state": "formal", "lang": "zh_CN",
//!  "data": {"thing1": "{$item}", "time2": "{$time}"}}
//! ```
//!
//! `template_id` and `data` are required as above; `page` (the page opened from the card),
//! `miniprogram_state` (`developer`, `trial` or `formal`; WeChat's default is `formal`) and
//! `lang` (`zh_CN`, `en_US`, `zh_HK` or `zh_TW`; default `zh_CN`) are optional and left out of the
//! request when absent. The request is
//! `POST {base_url}/cgi-bin/message/subscribe/send?access_token=...` with
//! `{touser, template_id, page?, miniprogram_state?, lang?, data}`; the answer is
//! `{"errcode": 0, "errmsg": "ok"}` (a `msgid`, if WeChat adds one, is kept as the vendor id).
//! WeChat checks each value against its keyword's type (`thing` at most 20 characters, `number`
//! 32 digits, `phrase` 5 characters, ...) and answers 47003 when one does not fit.
//!
//! # Errors
//!
//! Codes are `wechat_<errcode>` (`wechat_busy` for -1), the detail is `errcode N: <errmsg>`.
//!
//! - Retryable: -1 (system busy), 45009 (daily API quota reached), 45011 (per-minute quota,
//!   retried after 60 s), 45047 (downlink count limit); transport failures, HTTP 408/429/5xx
//!   (`Retry-After` honoured); a token still rejected after one refresh; an answer that is not
//!   WeChat's JSON (`wechat_bad_response`).
//! - Permanent: every other errcode, among them 43101 (the user refused or cancelled the
//!   subscription), 40003 (invalid openid), 40037 (invalid template_id), 47003 (template data
//!   does not fit the template), 41030 (invalid page), 40013 (invalid AppID), 40125 (invalid
//!   AppSecret), 40164 (the caller's IP is not whitelisted), 48001 (no permission for the API);
//!   40001 answered by the token endpoint itself (wrong AppSecret). 45015 ("response out of time
//!   limit or subscription is canceled") is a customer-service message code, not a rate limit,
//!   and stays permanent.
//!
//! # Documentation used
//!
//! - Stable access token: https://developers.weixin.qq.com/doc/service/api/base/api_getstableaccesstoken.html
//!   (also https://developers.weixin.qq.com/minigame/dev/api-backend/open-api/access-token/auth.getStableAccessToken.html)
//! - Template message: https://developers.weixin.qq.com/doc/service/api/notify/template/api_sendtemplatemessage.html
//!   and https://developers.weixin.qq.com/doc/service/en/guide/product/template_message/Template_Message_Interface.html
//! - Subscribe message: https://developers.weixin.qq.com/miniprogram/dev/OpenApiDoc/mp-message-management/subscribe-message/sendMessage.html
//!   and https://developers.weixin.qq.com/minigame/dev/api-backend/open-api/subscribe-message/subscribeMessage.send.html
//! - Error codes: https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html
//!   and https://developers.weixin.qq.com/doc/channels/API/basics/commErrCode.html

use super::http::{self, bad_account, bad_content};
use super::token::{FreshToken, TokenCache};
use super::{SendError, SendOutcome, Sender};
use async_trait::async_trait;
use herald_core::config::Secret;
use herald_core::{Channel, MessageRecord};
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The vendor name on delivery events and the prefix of error codes.
const VENDOR: &str = "wechat";

/// WeChat's API origin.
const DEFAULT_BASE_URL: &str = "https://api.weixin.qq.com";

/// Errcodes meaning "this access token is invalid or expired" on a send.
const TOKEN_REJECTED: [i64; 3] = [40001, 40014, 42001];

/// How long to wait after 45011 (per-minute quota): WeChat says to retry the next minute.
const MINUTE_QUOTA_WAIT: Duration = Duration::from_secs(60);

/// Checks an account config of `channel` (both WeChat channels take the same config).
pub fn check_account(_channel: Channel, config: &Value) -> Result<(), String> {
    WechatAccount::parse(config).map(drop)
}

/// Checks a template's content for `channel`.
pub fn check_content(channel: Channel, content: &Value) -> Result<(), String> {
    match channel {
        Channel::WechatOfficial => TemplateContent::parse(content).map(drop),
        Channel::WechatMini => SubscribeContent::parse(content).map(drop),
        other => Err(format!("{other:?} is not a WeChat channel")),
    }
}

/// A WeChat account (official account or mini program), parsed from its stored config.
#[derive(Debug, Clone)]
pub struct WechatAccount {
    pub app_id: String,
    pub app_secret: Secret,
    /// The API origin (and path prefix), without a trailing slash.
    pub base_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAccount {
    app_id: String,
    app_secret: Secret,
    #[serde(default)]
    base_url: Option<String>,
}

impl WechatAccount {
    /// Parses and checks an account's stored config; the error never quotes the secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        if !config.is_object() {
            return Err("a WeChat account must be a JSON object".into());
        }
        // serde quotes an ill-typed value in its error: check the secret's type first.
        if config.get("app_secret").is_some_and(|s| !s.is_string()) {
            return Err("`app_secret` must be a string".into());
        }
        let stored: StoredAccount =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        if stored.app_id.trim().is_empty() {
            return Err("`app_id` is empty".into());
        }
        if stored.app_secret.expose().is_empty() {
            return Err("`app_secret` is empty".into());
        }
        let base_url = match stored.base_url {
            None => DEFAULT_BASE_URL.to_string(),
            Some(raw) => {
                let url = Url::parse(&raw).map_err(|e| format!("`base_url`: {e}"))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err("`base_url` must be http or https".into());
                }
                if url.host().is_none() {
                    return Err("`base_url` has no host".into());
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err("`base_url` may not have a query or fragment".into());
                }
                url.as_str().trim_end_matches('/').to_string()
            }
        };
        Ok(WechatAccount {
            app_id: stored.app_id,
            app_secret: stored.app_secret,
            base_url,
        })
    }

    /// The key of this account's access token in the [`TokenCache`].
    fn token_key(&self) -> String {
        format!("{VENDOR}:{}", self.app_id)
    }
}

/// The `miniprogram` jump target of a template message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MiniProgramLink {
    appid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pagepath: Option<String>,
}

/// The content of a `wechat_official` template (see the module docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateContent {
    template_id: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    miniprogram: Option<MiniProgramLink>,
    data: BTreeMap<String, String>,
}

impl TemplateContent {
    fn parse(content: &Value) -> Result<Self, String> {
        check_data(content)?;
        let parsed: TemplateContent =
            serde_json::from_value(content.clone()).map_err(|e| e.to_string())?;
        check_template_id(&parsed.template_id)?;
        if parsed.url.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return Err("`url` is empty (leave it out for no link)".into());
        }
        if parsed
            .miniprogram
            .as_ref()
            .is_some_and(|link| link.appid.trim().is_empty())
        {
            return Err("`miniprogram.appid` is empty".into());
        }
        Ok(parsed)
    }
}

/// `miniprogram_state` of a subscribe message.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum MiniProgramState {
    Developer,
    Trial,
    Formal,
}

/// `lang` of a subscribe message.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
enum Lang {
    #[serde(rename = "zh_CN")]
    ZhCn,
    #[serde(rename = "en_US")]
    EnUs,
    #[serde(rename = "zh_HK")]
    ZhHk,
    #[serde(rename = "zh_TW")]
    ZhTw,
}

/// The content of a `wechat_mini` template (see the module docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeContent {
    template_id: String,
    #[serde(default)]
    page: Option<String>,
    #[serde(default)]
    miniprogram_state: Option<MiniProgramState>,
    #[serde(default)]
    lang: Option<Lang>,
    data: BTreeMap<String, String>,
}

impl SubscribeContent {
    fn parse(content: &Value) -> Result<Self, String> {
        check_data(content)?;
        let parsed: SubscribeContent =
            serde_json::from_value(content.clone()).map_err(|e| e.to_string())?;
        check_template_id(&parsed.template_id)?;
        if parsed.page.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err("`page` is empty (leave it out for no jump)".into());
        }
        Ok(parsed)
    }
}

/// Checks `data` before serde does, for precise messages: an object of strings, not empty.
fn check_data(content: &Value) -> Result<(), String> {
    let obj = content
        .as_object()
        .ok_or("a WeChat template's content must be a JSON object")?;
    let data = obj.get("data").ok_or("a WeChat template needs `data`")?;
    let data = data
        .as_object()
        .ok_or("`data` must be an object of keyword names to strings")?;
    if data.is_empty() {
        return Err("`data` is empty".into());
    }
    for (key, value) in data {
        if key.trim().is_empty() {
            return Err("`data` has an empty keyword name".into());
        }
        if !value.is_string() {
            return Err(format!("`data.{key}` must be a string"));
        }
    }
    Ok(())
}

fn check_template_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err("`template_id` is empty".into());
    }
    Ok(())
}

/// One data value as WeChat takes it.
#[derive(Serialize)]
struct DataValue<'a> {
    value: &'a str,
}

fn wrap_data(data: &BTreeMap<String, String>) -> BTreeMap<&str, DataValue<'_>> {
    data.iter()
        .map(|(k, v)| (k.as_str(), DataValue { value: v }))
        .collect()
}

/// The body of `message/template/send`.
#[derive(Serialize)]
struct TemplateSend<'a> {
    touser: &'a str,
    template_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    miniprogram: Option<&'a MiniProgramLink>,
    client_msg_id: String,
    data: BTreeMap<&'a str, DataValue<'a>>,
}

/// The body of `message/subscribe/send`.
#[derive(Serialize)]
struct SubscribeSend<'a> {
    touser: &'a str,
    template_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    miniprogram_state: Option<MiniProgramState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lang: Option<Lang>,
    data: BTreeMap<&'a str, DataValue<'a>>,
}

/// A message ready to post: the API path and the JSON body.
struct Prepared {
    path: &'static str,
    body: Vec<u8>,
}

impl Prepared {
    fn new(record: &MessageRecord) -> Result<Self, SendError> {
        let (path, body) = match record.channel {
            Channel::WechatOfficial => {
                let content = TemplateContent::parse(&record.content).map_err(bad_content)?;
                let body = serde_json::to_vec(&TemplateSend {
                    touser: &record.receiver,
                    template_id: &content.template_id,
                    url: content.url.as_deref(),
                    miniprogram: content.miniprogram.as_ref(),
                    client_msg_id: record.message_id.to_string(),
                    data: wrap_data(&content.data),
                });
                ("/cgi-bin/message/template/send", body)
            }
            Channel::WechatMini => {
                let content = SubscribeContent::parse(&record.content).map_err(bad_content)?;
                let body = serde_json::to_vec(&SubscribeSend {
                    touser: &record.receiver,
                    template_id: &content.template_id,
                    page: content.page.as_deref(),
                    miniprogram_state: content.miniprogram_state,
                    lang: content.lang,
                    data: wrap_data(&content.data),
                });
                ("/cgi-bin/message/subscribe/send", body)
            }
            other => return Err(SendError::not_supported(&format!("{other:?} on WeChat"))),
        };
        let body = body.map_err(|e| bad_content(e.to_string()))?;
        Ok(Prepared { path, body })
    }
}

/// WeChat's answer to a send.
#[derive(Deserialize)]
struct SendAnswer {
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
    #[serde(default)]
    msgid: Option<Value>,
}

/// WeChat's answer to `stable_token`.
#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The body of `stable_token`.
#[derive(Serialize)]
struct TokenRequest<'a> {
    grant_type: &'static str,
    appid: &'a str,
    secret: &'a str,
    force_refresh: bool,
}

/// What one send attempt came to.
enum Attempt {
    Sent(SendOutcome),
    /// WeChat rejected the access token (40001, 40014, 42001).
    TokenRejected(SendError),
}

/// Maps a non-zero errcode (not a token rejection on a send) to an error.
fn vendor_error(errcode: i64, errmsg: &str) -> SendError {
    let detail = format!("errcode {errcode}: {errmsg}");
    let retryable = |code: String, retry_after| SendError::Retryable {
        code,
        detail: detail.clone(),
        retry_after,
    };
    match errcode {
        -1 => retryable(format!("{VENDOR}_busy"), None),
        45009 | 45047 => retryable(format!("{VENDOR}_{errcode}"), None),
        45011 => retryable(format!("{VENDOR}_{errcode}"), Some(MINUTE_QUOTA_WAIT)),
        _ => SendError::Permanent {
            code: format!("{VENDOR}_{errcode}"),
            detail,
        },
    }
}

/// A `2xx` answer that is not WeChat's JSON (a proxy's page, a truncated body): retryable.
fn bad_response(what: &str, body: &[u8]) -> SendError {
    SendError::Retryable {
        code: format!("{VENDOR}_bad_response"),
        detail: format!("{what}{}", http::excerpt(body)),
        retry_after: None,
    }
}

/// The WeChat client for both channels: one HTTP pool, tokens shared through the cache.
pub struct WechatSender {
    client: Client,
    tokens: Arc<TokenCache>,
}

impl WechatSender {
    /// A client over the shared HTTP pool and token cache.
    pub fn new(client: Client, tokens: Arc<TokenCache>) -> Self {
        WechatSender { client, tokens }
    }

    /// Calls `stable_token` once.
    async fn stable_token(
        &self,
        account: &WechatAccount,
        force_refresh: bool,
    ) -> Result<FreshToken, SendError> {
        let request = self
            .client
            .post(format!("{}/cgi-bin/stable_token", account.base_url))
            .json(&TokenRequest {
                grant_type: "client_credential",
                appid: &account.app_id,
                secret: account.app_secret.expose(),
                force_refresh,
            });
        let body = http::send_for_body(VENDOR, request).await?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| bad_response("stable_token answered with no JSON", &body))?;
        if answer.errcode != 0 {
            // Here 40001 means a wrong AppSecret, not a stale token: permanent like 40125.
            return Err(vendor_error(answer.errcode, &answer.errmsg));
        }
        match (answer.access_token, answer.expires_in) {
            (Some(token), Some(expires_in)) if !token.is_empty() => Ok(FreshToken {
                token,
                expires_in: Duration::from_secs(expires_in),
            }),
            _ => Err(SendError::Retryable {
                code: format!("{VENDOR}_bad_response"),
                detail: "stable_token answered without access_token or expires_in".into(),
                retry_after: None,
            }),
        }
    }

    /// A token to replace `rejected`: normal mode first (it hands out the platform's current
    /// token), forced refresh only if normal mode returns the rejected token again.
    async fn replacement_token(
        &self,
        account: &WechatAccount,
        rejected: &str,
    ) -> Result<FreshToken, SendError> {
        let fresh = self.stable_token(account, false).await?;
        if fresh.token != rejected {
            return Ok(fresh);
        }
        self.stable_token(account, true).await
    }

    /// Posts `prepared` with `token` once.
    async fn attempt(
        &self,
        account: &WechatAccount,
        prepared: &Prepared,
        token: &str,
    ) -> Result<Attempt, SendError> {
        let request = self
            .client
            .post(format!("{}{}", account.base_url, prepared.path))
            .query(&[("access_token", token)])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(prepared.body.clone());
        let body = http::send_for_body(VENDOR, request).await?;
        let answer: SendAnswer = serde_json::from_slice(&body)
            .map_err(|_| bad_response("the send answered with no JSON", &body))?;
        if TOKEN_REJECTED.contains(&answer.errcode) {
            return Ok(Attempt::TokenRejected(SendError::Retryable {
                code: format!("{VENDOR}_{}", answer.errcode),
                detail: format!(
                    "errcode {}: {} (after a token refresh)",
                    answer.errcode, answer.errmsg
                ),
                retry_after: None,
            }));
        }
        if answer.errcode != 0 {
            return Err(vendor_error(answer.errcode, &answer.errmsg));
        }
        let vendor_message_id = match answer.msgid {
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            _ => None,
        };
        Ok(Attempt::Sent(SendOutcome {
            vendor: VENDOR.into(),
            vendor_message_id,
            billing_units: None,
        }))
    }
}

#[async_trait]
impl Sender for WechatSender {
    async fn send(
        &self,
        record: &MessageRecord,
        _account_id: i64,
        account: &Value,
    ) -> Result<SendOutcome, SendError> {
        let account = WechatAccount::parse(account).map_err(bad_account)?;
        let prepared = Prepared::new(record)?;
        let key = account.token_key();

        let token = self
            .tokens
            .get(&key, || self.stable_token(&account, false))
            .await?;
        match self.attempt(&account, &prepared, &token).await? {
            Attempt::Sent(outcome) => return Ok(outcome),
            Attempt::TokenRejected(_) => {}
        }

        // The token was invalidated or expired under us: drop it, get another, try once more.
        self.tokens.invalidate(&key, &token).await?;
        let token = self
            .tokens
            .get(&key, || self.replacement_token(&account, &token))
            .await?;
        match self.attempt(&account, &prepared, &token).await? {
            Attempt::Sent(outcome) => Ok(outcome),
            Attempt::TokenRejected(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::testkit::{self, Answer, Captured, VendorServer, record};
    use serde_json::json;
    use std::sync::Mutex;

    const APP_ID: &str = "wx5f2a9c31d07b4e68";
    const SECRET: &str = "0b8f6c2e4d1a9375e6c8b2f0a4d7e193";
    const TOKEN_PATH: &str = "/cgi-bin/stable_token";
    const TEMPLATE_PATH: &str = "/cgi-bin/message/template/send";
    const SUBSCRIBE_PATH: &str = "/cgi-bin/message/subscribe/send";
    const OPENID: &str = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o";

    fn account(base: &str) -> Value {
        json!({"app_id": APP_ID, "app_secret": SECRET, "base_url": base})
    }

    fn sender(store: herald_core::store::Store) -> WechatSender {
        WechatSender::new(http::client(), Arc::new(TokenCache::new(store)))
    }

    /// The token endpoint as WeChat runs it: POST JSON with the right grant type and
    /// credentials; `issue` says which token to hand out for a `force_refresh` flag.
    fn token_endpoint(c: &Captured, issue: impl Fn(bool) -> String) -> Answer {
        assert_eq!(c.method, "POST");
        assert_eq!(c.query, "", "stable_token takes no query");
        assert!(
            c.header("content-type").starts_with("application/json"),
            "stable_token takes POST JSON only"
        );
        let body = c.json();
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "{body}");
        if body["grant_type"] != "client_credential" {
            return Answer::json(json!({"errcode": 40002, "errmsg": "invalid grant_type"}));
        }
        if body["appid"] != APP_ID {
            return Answer::json(json!({"errcode": 40013, "errmsg": "invalid appid rid: r1"}));
        }
        if body["secret"] != SECRET {
            return Answer::json(json!({"errcode": 40125, "errmsg": "invalid appsecret rid: r2"}));
        }
        let force = body["force_refresh"]
            .as_bool()
            .expect("force_refresh is a boolean");
        Answer::json(json!({"access_token": issue(force), "expires_in": 7200}))
    }

    /// The access token a send request carries.
    fn token_of(c: &Captured) -> String {
        c.query_param("access_token").unwrap_or_default()
    }

    fn paths(server: &VendorServer, path: &str) -> Vec<Captured> {
        server
            .requests()
            .into_iter()
            .filter(|c| c.path == path)
            .collect()
    }

    fn official_content() -> Value {
        json!({
            "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
            "url": "https://shop.example.com/orders/42?from=wx",
            "miniprogram": {"appid": "wxabcdef1234567890", "pagepath": "pages/order?id=42"},
            "data": {"thing1": "巧克力", "amount2": "39.8元", "time3": "2024-09-22 12:30"}
        })
    }

    #[tokio::test]
    async fn official_template_message_is_sent_with_one_token_for_many() {
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(|c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| "TOKEN-1".into()),
            TEMPLATE_PATH if token_of(c) == "TOKEN-1" => {
                Answer::json(json!({"errcode": 0, "errmsg": "ok", "msgid": 200228332}))
            }
            TEMPLATE_PATH => {
                Answer::json(json!({"errcode": 40001, "errmsg": "invalid credential"}))
            }
            _ => Answer::status(404, "no such API"),
        })
        .await;
        let sender = sender(store);
        let config = account(&server.url);

        let records: Vec<MessageRecord> = (0..3)
            .map(|_| record(Channel::WechatOfficial, OPENID, official_content()))
            .collect();
        for r in &records {
            let outcome = sender.send(r, 1, &config).await.unwrap();
            assert_eq!(outcome.vendor, "wechat");
            assert_eq!(outcome.vendor_message_id.as_deref(), Some("200228332"));
            assert_eq!(outcome.billing_units, None);
        }

        let token_calls = paths(&server, TOKEN_PATH);
        assert_eq!(token_calls.len(), 1, "one token for every message");
        assert_eq!(
            token_calls[0].json(),
            json!({"grant_type": "client_credential", "appid": APP_ID, "secret": SECRET,
                   "force_refresh": false})
        );

        let sends = paths(&server, TEMPLATE_PATH);
        assert_eq!(sends.len(), 3);
        for (c, r) in sends.iter().zip(&records) {
            assert_eq!(c.method, "POST");
            assert_eq!(c.query, "access_token=TOKEN-1");
            assert!(c.header("content-type").starts_with("application/json"));
            assert_eq!(
                c.json(),
                json!({
                    "touser": OPENID,
                    "template_id": "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY",
                    "url": "https://shop.example.com/orders/42?from=wx",
                    "miniprogram": {"appid": "wxabcdef1234567890",
                                    "pagepath": "pages/order?id=42"},
                    "client_msg_id": r.message_id.to_string(),
                    "data": {
                        "thing1": {"value": "巧克力"},
                        "amount2": {"value": "39.8元"},
                        "time3": {"value": "2024-09-22 12:30"}
                    }
                })
            );
        }
    }

    #[tokio::test]
    async fn optional_fields_are_left_out() {
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(|c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| "TOKEN-1".into()),
            _ => Answer::json(json!({"errcode": 0, "errmsg": "ok"})),
        })
        .await;
        let sender = sender(store);
        let config = account(&server.url);

        let r = record(
            Channel::WechatOfficial,
            OPENID,
            json!({"template_id": "T1", "miniprogram": {"appid": "wxmini"},
                   "data": {"keyword1": "a"}}),
        );
        let outcome = sender.send(&r, 1, &config).await.unwrap();
        assert_eq!(outcome.vendor_message_id, None);
        let m = record(
            Channel::WechatMini,
            OPENID,
            json!({"template_id": "T2", "data": {"thing1": "b"}}),
        );
        sender.send(&m, 1, &config).await.unwrap();

        let sent = paths(&server, TEMPLATE_PATH);
        assert_eq!(
            sent[0].json(),
            json!({"touser": OPENID, "template_id": "T1", "miniprogram": {"appid": "wxmini"},
                   "client_msg_id": r.message_id.to_string(),
                   "data": {"keyword1": {"value": "a"}}})
        );
        let sent = paths(&server, SUBSCRIBE_PATH);
        assert_eq!(
            sent[0].json(),
            json!({"touser": OPENID, "template_id": "T2", "data": {"thing1": {"value": "b"}}})
        );
    }

    #[tokio::test]
    async fn mini_program_subscribe_message_is_sent() {
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(|c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| "MINI-TOKEN".into()),
            SUBSCRIBE_PATH if token_of(c) == "MINI-TOKEN" => {
                Answer::json(json!({"errcode": 0, "errmsg": "ok"}))
            }
            SUBSCRIBE_PATH => {
                Answer::json(json!({"errcode": 40014, "errmsg": "invalid access_token"}))
            }
            _ => Answer::status(404, "no such API"),
        })
        .await;
        let sender = sender(store);
        let r = record(
            Channel::WechatMini,
            OPENID,
            json!({
                "template_id": "bDmywsp2oEHjwAadTGKkUHpC0RgBVPvfAKRm6cHzWDQ",
                "page": "pages/order/detail?id=42",
                "miniprogram_state": "trial",
                "lang": "en_US",
                "data": {"number01": "339208499", "date01": "2015-01-05", "thing03": "TIT"}
            }),
        );
        let outcome = sender.send(&r, 1, &account(&server.url)).await.unwrap();
        assert_eq!(outcome.vendor, "wechat");
        assert_eq!(
            outcome.vendor_message_id, None,
            "subscribe/send returns no msgid"
        );

        let sends = paths(&server, SUBSCRIBE_PATH);
        assert_eq!(sends.len(), 1);
        assert_eq!(sends[0].method, "POST");
        assert_eq!(sends[0].query, "access_token=MINI-TOKEN");
        assert_eq!(
            sends[0].json(),
            json!({
                "touser": OPENID,
                "template_id": "bDmywsp2oEHjwAadTGKkUHpC0RgBVPvfAKRm6cHzWDQ",
                "page": "pages/order/detail?id=42",
                "miniprogram_state": "trial",
                "lang": "en_US",
                "data": {
                    "number01": {"value": "339208499"},
                    "date01": {"value": "2015-01-05"},
                    "thing03": {"value": "TIT"}
                }
            })
        );
        assert!(paths(&server, TEMPLATE_PATH).is_empty());
    }

    #[tokio::test]
    async fn an_expired_token_is_replaced_and_the_message_sent_again() {
        let (_dir, store) = testkit::store().await;
        // The platform's current token; stable_token in normal mode hands it out.
        let current = Arc::new(Mutex::new("OLD".to_string()));
        let handler_current = Arc::clone(&current);
        let server = VendorServer::start(move |c| {
            let now = handler_current.lock().unwrap().clone();
            match c.path.as_str() {
                TOKEN_PATH => token_endpoint(c, |_| now.clone()),
                TEMPLATE_PATH if token_of(c) == now => {
                    Answer::json(json!({"errcode": 0, "errmsg": "ok", "msgid": 77}))
                }
                TEMPLATE_PATH => Answer::json(json!({
                    "errcode": 42001, "errmsg": "access_token expired rid: 6523"})),
                _ => Answer::status(404, "no such API"),
            }
        })
        .await;
        let sender = sender(store);
        let config = account(&server.url);
        let first = record(Channel::WechatOfficial, OPENID, official_content());
        sender.send(&first, 1, &config).await.unwrap();

        // The token changes on WeChat's side (another holder force-refreshed it).
        *current.lock().unwrap() = "NEW".into();
        let second = record(Channel::WechatOfficial, OPENID, official_content());
        let outcome = sender.send(&second, 1, &config).await.unwrap();
        assert_eq!(outcome.vendor_message_id.as_deref(), Some("77"));
        // And the next message uses the new token straight away.
        let third = record(Channel::WechatOfficial, OPENID, official_content());
        sender.send(&third, 1, &config).await.unwrap();

        let token_calls = paths(&server, TOKEN_PATH);
        assert_eq!(
            token_calls.len(),
            2,
            "one fetch at start, one after the rejection"
        );
        assert!(
            token_calls
                .iter()
                .all(|c| c.json()["force_refresh"] == false)
        );
        let sends: Vec<(String, String)> = paths(&server, TEMPLATE_PATH)
            .iter()
            .map(|c| {
                (
                    token_of(c),
                    c.json()["client_msg_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            sends,
            vec![
                ("OLD".to_string(), first.message_id.to_string()),
                ("OLD".to_string(), second.message_id.to_string()),
                ("NEW".to_string(), second.message_id.to_string()),
                ("NEW".to_string(), third.message_id.to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn a_rejected_token_handed_out_again_is_force_refreshed() {
        let (_dir, store) = testkit::store().await;
        // WeChat revoked "STUCK" but normal mode keeps returning it; a forced refresh gives
        // a working one.
        let server = VendorServer::start(|c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |force| if force { "FRESH" } else { "STUCK" }.into()),
            SUBSCRIBE_PATH if token_of(c) == "FRESH" => {
                Answer::json(json!({"errcode": 0, "errmsg": "ok"}))
            }
            SUBSCRIBE_PATH => Answer::json(json!({
                "errcode": 40001,
                "errmsg": "invalid credential, access_token is invalid or not latest"})),
            _ => Answer::status(404, "no such API"),
        })
        .await;
        let sender = sender(store);
        let r = record(
            Channel::WechatMini,
            OPENID,
            json!({"template_id": "T", "data": {"thing1": "x"}}),
        );
        sender.send(&r, 1, &account(&server.url)).await.unwrap();

        let flags: Vec<Value> = paths(&server, TOKEN_PATH)
            .iter()
            .map(|c| c.json()["force_refresh"].clone())
            .collect();
        assert_eq!(flags, vec![json!(false), json!(false), json!(true)]);
        let used: Vec<String> = paths(&server, SUBSCRIBE_PATH)
            .iter()
            .map(token_of)
            .collect();
        assert_eq!(used, vec!["STUCK", "FRESH"]);
    }

    #[tokio::test]
    async fn a_token_rejected_twice_is_retryable_after_one_retry() {
        let (_dir, store) = testkit::store().await;
        let issued = Arc::new(Mutex::new(0u32));
        let server = VendorServer::start(move |c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| {
                let mut n = issued.lock().unwrap();
                *n += 1;
                format!("T{n}")
            }),
            _ => Answer::json(json!({"errcode": 40014, "errmsg": "invalid access_token"})),
        })
        .await;
        let sender = sender(store);
        let r = record(Channel::WechatOfficial, OPENID, official_content());
        let err = sender.send(&r, 1, &account(&server.url)).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "wechat_40014");
        assert_eq!(paths(&server, TOKEN_PATH).len(), 2);
        let used: Vec<String> = paths(&server, TEMPLATE_PATH).iter().map(token_of).collect();
        assert_eq!(
            used,
            vec!["T1", "T2"],
            "the message is tried once more, not again"
        );
    }

    /// A server whose sends all answer `answer`; returns the error the module maps it to.
    async fn error_for(channel: Channel, answer: Value) -> SendError {
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(move |c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| "TOKEN".into()),
            _ => Answer::json(answer.clone()),
        })
        .await;
        let content = match channel {
            Channel::WechatOfficial => official_content(),
            _ => json!({"template_id": "T", "data": {"thing1": "x"}}),
        };
        let r = record(channel, OPENID, content);
        let err = sender(store)
            .send(&r, 1, &account(&server.url))
            .await
            .unwrap_err();
        assert_eq!(
            paths(&server, TOKEN_PATH).len(),
            1,
            "no refresh for {err:?}"
        );
        err
    }

    #[tokio::test]
    async fn busy_and_quota_codes_are_retryable() {
        let err = error_for(
            Channel::WechatOfficial,
            json!({"errcode": -1, "errmsg": "system error rid: 6107"}),
        )
        .await;
        assert!(err.is_retryable());
        assert_eq!(err.code(), "wechat_busy");
        assert_eq!(err.detail(), "errcode -1: system error rid: 6107");

        let err = error_for(
            Channel::WechatMini,
            json!({"errcode": 45009, "errmsg": "reach max api daily quota limit"}),
        )
        .await;
        assert!(err.is_retryable());
        assert_eq!(err.code(), "wechat_45009");

        let err = error_for(
            Channel::WechatOfficial,
            json!({"errcode": 45011,
                   "errmsg": "api minute-quota reach limit  mustslower  retry next minute"}),
        )
        .await;
        assert_eq!(err.code(), "wechat_45011");
        let SendError::Retryable { retry_after, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(retry_after, Some(Duration::from_secs(60)));

        let err = error_for(
            Channel::WechatOfficial,
            json!({"errcode": 45047, "errmsg": "out of response count limit"}),
        )
        .await;
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn receiver_and_template_codes_are_permanent() {
        let cases = [
            (
                Channel::WechatMini,
                43101,
                "user refuse to accept the msg rid: 1",
            ),
            (Channel::WechatOfficial, 40003, "invalid openid rid: 2"),
            (Channel::WechatOfficial, 40037, "invalid template_id rid: 3"),
            (
                Channel::WechatMini,
                47003,
                "argument invalid! data.thing1.value too long",
            ),
            (Channel::WechatMini, 41030, "invalid page rid: 5"),
            (
                Channel::WechatOfficial,
                45015,
                "response out of time limit or subscription is canceled",
            ),
        ];
        for (channel, errcode, errmsg) in cases {
            let err = error_for(channel, json!({"errcode": errcode, "errmsg": errmsg})).await;
            assert!(!err.is_retryable(), "{errcode}: {err:?}");
            assert_eq!(err.code(), format!("wechat_{errcode}"));
            assert_eq!(err.detail(), format!("errcode {errcode}: {errmsg}"));
        }
    }

    #[tokio::test]
    async fn http_failures_are_retryable_with_retry_after() {
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(|c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| "TOKEN".into()),
            TEMPLATE_PATH => Answer::status(503, "upstream down").with_header("retry-after", "9"),
            _ => Answer::status(200, "<html>portal</html>"),
        })
        .await;
        let sender = sender(store);
        let config = account(&server.url);
        let err = sender
            .send(
                &record(Channel::WechatOfficial, OPENID, official_content()),
                1,
                &config,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "wechat_5xx");
        assert!(!err.detail().contains("TOKEN"), "{err}");
        let SendError::Retryable { retry_after, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(retry_after, Some(Duration::from_secs(9)));

        let mini = record(
            Channel::WechatMini,
            OPENID,
            json!({"template_id": "T", "data": {"a": "b"}}),
        );
        let err = sender.send(&mini, 1, &config).await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "wechat_bad_response");
    }

    #[tokio::test]
    async fn token_endpoint_errors_stop_the_send() {
        // A wrong secret: WeChat answers 40125, which retrying cannot fix; nothing is sent.
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(|c| match c.path.as_str() {
            TOKEN_PATH => token_endpoint(c, |_| "TOKEN".into()),
            _ => Answer::json(json!({"errcode": 0, "errmsg": "ok"})),
        })
        .await;
        let sender = sender(store);
        let r = record(Channel::WechatOfficial, OPENID, official_content());
        let mut wrong = account(&server.url);
        wrong["app_secret"] = json!("not-the-secret-0000000000000000");
        let err = sender.send(&r, 1, &wrong).await.unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "wechat_40125");
        assert!(!err.detail().contains("not-the-secret"), "{err}");

        let mut wrong = account(&server.url);
        wrong["app_id"] = json!("wx0000000000000000");
        let err = sender.send(&r, 1, &wrong).await.unwrap_err();
        assert_eq!(err.code(), "wechat_40013");
        assert!(paths(&server, TEMPLATE_PATH).is_empty());

        // A busy token endpoint is retryable.
        let (_dir2, store) = testkit::store().await;
        let busy =
            VendorServer::start(|_| Answer::json(json!({"errcode": -1, "errmsg": "system error"})))
                .await;
        let err = super::WechatSender::new(http::client(), Arc::new(TokenCache::new(store)))
            .send(&r, 1, &account(&busy.url))
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "wechat_busy");
        assert_eq!(busy.requests().len(), 1);
    }

    #[tokio::test]
    async fn bad_content_and_accounts_send_nothing() {
        let (_dir, store) = testkit::store().await;
        let server = VendorServer::start(|_| Answer::status(500, "must not be called")).await;
        let sender = sender(store);
        let r = record(Channel::WechatOfficial, OPENID, json!({"template_id": "T"}));
        let err = sender.send(&r, 1, &account(&server.url)).await.unwrap_err();
        assert_eq!(err.code(), "bad_content");
        let r = record(Channel::WechatOfficial, OPENID, official_content());
        let err = sender
            .send(&r, 1, &json!({"app_id": APP_ID}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "bad_account");
        let r = record(Channel::Webhook, OPENID, official_content());
        let err = sender.send(&r, 1, &account(&server.url)).await.unwrap_err();
        assert_eq!(err.code(), "not_supported");
        assert!(server.requests().is_empty());
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let a = WechatAccount::parse(&json!({"app_id": APP_ID, "app_secret": SECRET})).unwrap();
        assert_eq!(a.base_url, "https://api.weixin.qq.com");
        assert_eq!(a.token_key(), format!("wechat:{APP_ID}"));
        let debug = format!("{a:?}");
        assert!(!debug.contains(SECRET) && debug.contains("***"), "{debug}");
        let a = WechatAccount::parse(&json!({"app_id": APP_ID, "app_secret": SECRET,
                                              "base_url": "http://127.0.0.1:8080/wx/"}))
        .unwrap();
        assert_eq!(a.base_url, "http://127.0.0.1:8080/wx");
        assert!(
            check_account(
                Channel::WechatMini,
                &json!({"app_id": "a", "app_secret": "s"})
            )
            .is_ok()
        );

        let bad = [
            (json!({"app_secret": SECRET}), "app_id"),
            (json!({"app_id": APP_ID}), "app_secret"),
            (
                json!({"app_id": "", "app_secret": SECRET}),
                "`app_id` is empty",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": ""}),
                "`app_secret` is empty",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": 123456789}),
                "`app_secret` must be a string",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": [SECRET]}),
                "`app_secret` must be a string",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": SECRET, "token": "x"}),
                "unknown field `token`",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": SECRET, "base_url": "ftp://h"}),
                "http or https",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": SECRET, "base_url": "nope"}),
                "`base_url`",
            ),
            (
                json!({"app_id": APP_ID, "app_secret": SECRET, "base_url": "https://h/?a=1"}),
                "query",
            ),
            (json!("wx"), "JSON object"),
        ];
        for (config, expected) in bad {
            let err = check_account(Channel::WechatOfficial, &config).unwrap_err();
            assert!(err.contains(expected), "{config}: {err}");
            assert!(
                !err.contains(SECRET) && !err.contains("123456789"),
                "{config}: {err}"
            );
        }
    }

    #[test]
    fn contents_are_checked_per_channel() {
        let official = Channel::WechatOfficial;
        let mini = Channel::WechatMini;
        assert!(check_content(official, &official_content()).is_ok());
        assert!(check_content(official, &json!({"template_id": "T", "data": {"k": "v"}})).is_ok());
        assert!(
            check_content(
                mini,
                &json!({"template_id": "T", "page": "index", "miniprogram_state": "developer",
                        "lang": "zh_TW", "data": {"thing1": "{$name}"}})
            )
            .is_ok()
        );

        let bad = [
            (official, json!("text"), "JSON object"),
            (official, json!({"template_id": "T"}), "needs `data`"),
            (
                official,
                json!({"data": {"k": "v"}}),
                "missing field `template_id`",
            ),
            (
                official,
                json!({"template_id": "", "data": {"k": "v"}}),
                "`template_id` is empty",
            ),
            (
                official,
                json!({"template_id": "T", "data": {}}),
                "`data` is empty",
            ),
            (
                official,
                json!({"template_id": "T", "data": {"k": 5}}),
                "`data.k` must be a string",
            ),
            (
                official,
                json!({"template_id": "T", "data": {"k": {"value": "v"}}}),
                "`data.k` must be a string",
            ),
            (
                official,
                json!({"template_id": "T", "data": ["v"]}),
                "`data` must be an object",
            ),
            (
                official,
                json!({"template_id": "T", "data": {"k": "v"}, "page": "index"}),
                "unknown field `page`",
            ),
            (
                official,
                json!({"template_id": "T", "data": {"k": "v"},
                              "miniprogram": {"pagepath": "index"}}),
                "missing field `appid`",
            ),
            (
                official,
                json!({"template_id": "T", "data": {"k": "v"},
                              "miniprogram": {"appid": "wx", "path": "index"}}),
                "unknown field `path`",
            ),
            (
                official,
                json!({"template_id": "T", "data": {"k": "v"}, "url": ""}),
                "`url` is empty",
            ),
            (
                mini,
                json!({"template_id": "T", "data": {"k": "v"}, "url": "https://x"}),
                "unknown field `url`",
            ),
            (
                mini,
                json!({"template_id": "T", "data": {"k": "v"}, "miniprogram_state": "beta"}),
                "unknown variant `beta`",
            ),
            (
                mini,
                json!({"template_id": "T", "data": {"k": "v"}, "lang": "fr_FR"}),
                "unknown variant `fr_FR`",
            ),
            (
                mini,
                json!({"template_id": "T", "data": {"k": "v"}, "page": " "}),
                "`page` is empty",
            ),
            (Channel::Webhook, official_content(), "not a WeChat channel"),
        ];
        for (channel, content, expected) in bad {
            let err = check_content(channel, &content).unwrap_err();
            assert!(err.contains(expected), "{content}: {err}");
        }
    }
}

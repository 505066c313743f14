//! Yunpian SMS (云片, API v2, `sms.yunpian.com`): approved templates sent with
//! `tpl_batch_send` (指定模板群发).
//!
//! # Account
//!
//! ```json
//! {"apikey": "9b11127a9701975c734b8aee81ee3526", "sign_name": "云片网"}
//! ```
//!
//! - `apikey`: the account's (or sub-account's) API key.
//! - `sign_name` (optional): the signature. Yunpian templates carry their `【signature】`
//!   themselves; herald uses this only to count billing units.
//! - `base_url` (optional, default `https://sms.yunpian.com`): replaces the API origin, e.g.
//!   `https://us.yunpian.com` (Yunpian's overseas servers) or a local server in tests.
//!
//! # Content
//!
//! The template's `yunpian` entry names the approved template and its variables:
//!
//! ```json
//! {"tpl_id": 123, "params": {"code": "1234"}}
//! ```
//!
//! `tpl_id` is a positive integer; `params` (default `{}`) maps variable names, without the
//! `#…#` the template writes around them, to string values.
//!
//! # Requests
//!
//! `POST <base_url>/v2/sms/tpl_batch_send.json` with `Accept: application/json;charset=utf-8`
//! and an `application/x-www-form-urlencoded;charset=utf-8` body of `apikey`, `mobile` (numbers
//! separated by commas), `tpl_id` and `tpl_value`. `tpl_value` is
//! `urlencode("#code#") + "=" + urlencode("1234") + "&" + …`, form-encoded once more as a field
//! of the body, as Yunpian documents for raw requests.
//!
//! Records with the same `tpl_id` and `params` share a request, up to 1000 numbers (Yunpian's
//! documented maximum), each number at most once per request. Receivers are E.164
//! (`+8613812345678`): mainland China numbers are sent as their 11 national digits (Yunpian
//! wants no `+86`), other numbers with `+` and country code (`+85291234567`).
//!
//! Yunpian answers each number in `data` (`{code, msg, count, fee, unit, mobile, sid}`),
//! matched back to its record by `mobile`: `code` 0 is success with `sid` as the
//! `vendor_message_id`; any other code is that record's error. A number missing from `data`
//! fails with the permanent `yunpian_no_result` (it may or may not have been sent). A refusal of
//! the whole request (HTTP 400 `{"http_status_code": 400, "code", "msg", "detail"}`) is the
//! error of every record in it.
//!
//! # Errors
//!
//! Yunpian's code becomes `yunpian_<code>` (`yunpian_2`, `yunpian_-1`); the detail is
//! `<code>: <msg> (<detail>)`, with the apikey scrubbed should Yunpian ever echo it. Retryable:
//! `-4` and `-5` (the account's call count and call rate limits) and `-50`, `-51`, `-53`
//! (Yunpian's internal errors: unknown exception, database failure, failure to submit the
//! message), and answers without a code by HTTP status (408, 429 and 5xx, honouring
//! `Retry-After`). Everything else is permanent, notably `-1` (invalid apikey), `-2`/`-3` (API or
//! IP not allowed), `1`/`2` (missing or malformed parameter, including a malformed number), `3`
//! (balance), `4` (blocked keyword), `5`/`7` (template not found or unusable), `8`/`9`/`17`/`22`/
//! `33` (frequency limits on one number for the same content or per hour/day: sending the same
//! message again soon would only hit them again), `10` (number on the blacklist), `20`/`23`
//! (region not supported). Transport failures are retryable.
//!
//! # Receipts
//!
//! Yunpian pushes them (推送状态报告): a form `POST` whose `sms_status` field holds the URL-encoded
//! JSON array `[{sid, uid, user_receive_time, error_msg, mobile, report_status, error_detail}]`,
//! answered with the text `SUCCESS`. `report_status` `SUCCESS` is delivered, `FAIL` failed with
//! `error_msg` (the carrier's code, e.g. `DB:0103`) as the error code and `error_detail` as the
//! detail; `user_receive_time` is Beijing time (UTC+8). A `sid` names one message to one
//! number, so receipts carry no receiver. Yunpian is not polled: `pull_receipts` returns nothing.
//!
//! # Documentation
//!
//! - tpl_batch_send: https://www.yunpian.com/official/document/sms/zh_CN/domestic_tpl_batch_send
//! - Status report push: https://www.yunpian.com/official/document/sms/zh_CN/domestic_push_report
//!   and https://www.yunpian.com/official/document/sms/zh_CN/intl_push_report
//! - Return codes: the table of Yunpian's Java SDK,
//!   https://github.com/yunpian/yunpian-java-sdk (`com/yunpian/sdk/constant/Code.java`), and
//!   the failure shape `{"http_status_code": 400, "code", "msg", "detail"}` of Yunpian's
//!   "返回值示例" page

use super::vendor_entry;
use crate::channels::http::{self, BATCH_REQUEST_CONCURRENCY, bad_content};
use crate::channels::{SendError, SendOutcome};
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};
use futures::StreamExt;
use herald_core::config::Secret;
use herald_core::store::PendingReceipt;
use herald_core::{MessageRecord, Receipt};
use percent_encoding::percent_decode_str;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The vendor name on delivery events and receipts.
const VENDOR: &str = "yunpian";

/// Yunpian's API origin.
const DEFAULT_BASE_URL: &str = "https://sms.yunpian.com";

/// The path of `tpl_batch_send`.
const TPL_BATCH_SEND: &str = "/v2/sms/tpl_batch_send.json";

/// Most numbers one `tpl_batch_send` takes.
const BATCH_MAX: usize = 1000;

/// Codes after which the same request may succeed later.
const RETRYABLE_CODES: &[i64] = &[-4, -5, -50, -51, -53];

/// What Yunpian expects in answer to a receipt push: content type and body.
pub const RECEIPT_ACK: (&str, &str) = ("text/plain", "SUCCESS");

/// A Yunpian SMS account (see the module docs for its JSON).
#[derive(Debug, Clone)]
pub struct YunpianAccount {
    pub apikey: Secret,
    pub sign_name: Option<String>,
    /// The URL of `tpl_batch_send` under the account's origin.
    pub tpl_batch_send: Url,
}

/// The config as stored; [`YunpianAccount::parse`] checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAccount {
    apikey: Secret,
    #[serde(default)]
    sign_name: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
}

impl YunpianAccount {
    /// Parses the account config (without its `vendor` field); the error never quotes the
    /// apikey.
    pub fn parse(config: &Value) -> Result<Self, String> {
        // serde quotes an ill-typed value in its error: check the secret's type first.
        if !config.is_object() {
            return Err("a yunpian account must be a JSON object".into());
        }
        if config.get("apikey").is_some_and(|s| !s.is_string()) {
            return Err("`apikey` must be a string".into());
        }
        let stored: StoredAccount =
            serde_json::from_value(config.clone()).map_err(|e| format!("yunpian account: {e}"))?;
        if stored.apikey.expose().trim().is_empty() {
            return Err("`apikey` is empty".into());
        }
        if stored
            .sign_name
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return Err("`sign_name` is empty (leave it out instead)".into());
        }
        let base = stored.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let origin = Url::parse(base).map_err(|e| format!("`base_url`: {e}"))?;
        if !matches!(origin.scheme(), "http" | "https") || origin.host().is_none() {
            return Err("`base_url` must be an http or https URL with a host".into());
        }
        let tpl_batch_send = Url::parse(&format!(
            "{}{TPL_BATCH_SEND}",
            origin.as_str().trim_end_matches('/')
        ))
        .map_err(|e| format!("`base_url`: {e}"))?;
        Ok(YunpianAccount {
            apikey: stored.apikey,
            sign_name: stored.sign_name,
            tpl_batch_send,
        })
    }
}

/// A template's `yunpian` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    tpl_id: u64,
    #[serde(default)]
    params: Map<String, Value>,
}

fn parse_entry(entry: &Value) -> Result<Entry, String> {
    let entry: Entry = serde_json::from_value(entry.clone()).map_err(|e| e.to_string())?;
    if entry.tpl_id == 0 {
        return Err("`tpl_id` must be positive".into());
    }
    for (name, value) in &entry.params {
        if name.is_empty() || name.contains('#') {
            return Err(format!(
                "`params`: {name:?} is not a variable name (write `code` for `#code#`)"
            ));
        }
        if !value.is_string() {
            return Err(format!("`params.{name}` must be a string"));
        }
    }
    Ok(entry)
}

/// Checks the template content's `yunpian` entry: `{"tpl_id", "params"?}`.
pub fn check_content(entry: &Value) -> Result<(), String> {
    parse_entry(entry).map(drop)
}

/// `tpl_value`: `urlencode("#name#")=urlencode(value)` pairs joined by `&`.
fn tpl_value(params: &Map<String, Value>) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    params
        .iter()
        .map(|(name, value)| {
            format!(
                "{}={}",
                enc(&format!("#{name}#")),
                enc(value.as_str().unwrap_or_default())
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The number as Yunpian takes it: 11 national digits for mainland China, else `+` and
/// country code and number.
fn vendor_phone(receiver: &str) -> Result<String, SendError> {
    let valid = receiver
        .strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()));
    if !valid {
        return Err(SendError::Permanent {
            code: "bad_receiver".into(),
            detail: format!("{receiver:?} is not an E.164 phone number"),
        });
    }
    Ok(mobile_key(receiver))
}

/// A number as Yunpian writes it, in the form herald sends it (Yunpian drops `+86`).
fn mobile_key(mobile: &str) -> String {
    let mobile = mobile.trim();
    mobile
        .strip_prefix("+86")
        .filter(|national| national.len() == 11)
        .unwrap_or(mobile)
        .to_string()
}

/// A refusal with Yunpian's `code` (see the module docs for the mapping).
fn vendor_error(
    answer: &Value,
    status: StatusCode,
    headers: &HeaderMap,
    apikey: &Secret,
) -> SendError {
    let Some(code) = answer.get("code").and_then(Value::as_i64) else {
        return SendError::Permanent {
            code: "yunpian_bad_response".into(),
            detail: format!("a result without a code: {answer}"),
        };
    };
    let msg = answer.get("msg").and_then(Value::as_str).unwrap_or("");
    let mut detail = format!("{code}: {msg}");
    if let Some(more) = answer
        .get("detail")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
    {
        detail.push_str(&format!(" ({more})"));
    }
    let key = apikey.expose();
    if !key.is_empty() {
        detail = detail.replace(key, "***");
    }
    let code_text = format!("yunpian_{code}");
    if RETRYABLE_CODES.contains(&code) || matches!(status.as_u16(), 408 | 429 | 500..=599) {
        SendError::Retryable {
            code: code_text,
            detail,
            retry_after: http::retry_after(headers),
        }
    } else {
        SendError::Permanent {
            code: code_text,
            detail,
        }
    }
}

/// What records must share to share a request: `tpl_id` and `tpl_value`.
type TemplateKey = (u64, String);

/// A record on its way into a request.
struct Item {
    index: usize,
    phone: String,
}

/// The Yunpian SMS client.
pub struct YunpianSms {
    client: Client,
}

impl YunpianSms {
    /// A client over the shared HTTP pool.
    pub fn new(client: Client) -> Self {
        YunpianSms { client }
    }

    /// Sends `records` (any number; the client splits them into vendor requests), one result
    /// per record in order.
    pub async fn send(
        &self,
        account: &YunpianAccount,
        records: &[&MessageRecord],
    ) -> Vec<Result<SendOutcome, SendError>> {
        let mut results: Vec<Option<Result<SendOutcome, SendError>>> =
            records.iter().map(|_| None).collect();
        // Per (tpl_id, tpl_value), in order of first appearance: batches of distinct numbers.
        let mut groups: Vec<(TemplateKey, Vec<Vec<Item>>)> = Vec::new();
        let mut group_of: HashMap<TemplateKey, usize> = HashMap::new();
        for (index, record) in records.iter().enumerate() {
            let prepared = vendor_entry(record, VENDOR).and_then(|entry| {
                let entry =
                    parse_entry(entry).map_err(|e| bad_content(format!("`yunpian`: {e}")))?;
                Ok((entry, vendor_phone(&record.receiver)?))
            });
            let (entry, phone) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    results[index] = Some(Err(e));
                    continue;
                }
            };
            let key = (entry.tpl_id, tpl_value(&entry.params));
            let g = *group_of.entry(key.clone()).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            let item = Item { index, phone };
            let batches = &mut groups[g].1;
            match batches
                .iter_mut()
                .find(|b| b.len() < BATCH_MAX && b.iter().all(|i| i.phone != item.phone))
            {
                Some(batch) => batch.push(item),
                None => batches.push(vec![item]),
            }
        }
        let requests: Vec<_> = groups
            .into_iter()
            .flat_map(|((tpl_id, tpl_value), batches)| {
                batches
                    .into_iter()
                    .map(move |batch| (tpl_id, tpl_value.clone(), batch))
            })
            .map(|(tpl_id, tpl_value, batch)| {
                self.tpl_batch_send(account, tpl_id, tpl_value, batch)
            })
            .collect();
        let done: Vec<Vec<(usize, Result<SendOutcome, SendError>)>> =
            futures::stream::iter(requests)
                .buffer_unordered(BATCH_REQUEST_CONCURRENCY)
                .collect()
                .await;
        for (index, result) in done.into_iter().flatten() {
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(SendError::Permanent {
                        code: "yunpian_no_result".into(),
                        detail: "no request carried this record".into(),
                    })
                })
            })
            .collect()
    }

    /// One `tpl_batch_send` to distinct numbers; each record's result.
    async fn tpl_batch_send(
        &self,
        account: &YunpianAccount,
        tpl_id: u64,
        tpl_value: String,
        batch: Vec<Item>,
    ) -> Vec<(usize, Result<SendOutcome, SendError>)> {
        let all = |error: SendError| -> Vec<(usize, Result<SendOutcome, SendError>)> {
            batch
                .iter()
                .map(|item| (item.index, Err(error.clone())))
                .collect()
        };
        let mobiles: Vec<&str> = batch.iter().map(|i| i.phone.as_str()).collect();
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("apikey", account.apikey.expose())
            .append_pair("mobile", &mobiles.join(","))
            .append_pair("tpl_id", &tpl_id.to_string())
            .append_pair("tpl_value", &tpl_value)
            .finish();
        let response = match self
            .client
            .post(account.tpl_batch_send.clone())
            .header(ACCEPT, "application/json;charset=utf-8")
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) => return all(http::request_error(VENDOR, e)),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => return all(http::request_error(VENDOR, e)),
        };
        let answer: Option<Value> = serde_json::from_slice(&bytes).ok();
        let Some(answer) = answer.filter(Value::is_object) else {
            let detail = format!("HTTP {status}{}", http::excerpt(&bytes));
            return all(if status.is_success() {
                SendError::Permanent {
                    code: "yunpian_bad_response".into(),
                    detail,
                }
            } else {
                http::status_error(VENDOR, status, &headers, detail)
            });
        };
        let Some(data) = answer.get("data").and_then(Value::as_array) else {
            return all(vendor_error(&answer, status, &headers, &account.apikey));
        };
        let by_mobile: HashMap<String, &Value> = data
            .iter()
            .filter_map(|r| Some((mobile_key(r.get("mobile")?.as_str()?), r)))
            .collect();
        batch
            .iter()
            .map(|item| {
                let result = match by_mobile.get(&item.phone) {
                    Some(r) if r.get("code").and_then(Value::as_i64) == Some(0) => {
                        Ok(SendOutcome {
                            vendor: VENDOR.into(),
                            vendor_message_id: match r.get("sid") {
                                Some(Value::Number(n)) => Some(n.to_string()),
                                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                                _ => None,
                            },
                            billing_units: None,
                        })
                    }
                    Some(r) => Err(vendor_error(r, status, &headers, &account.apikey)),
                    None => Err(SendError::Permanent {
                        code: "yunpian_no_result".into(),
                        detail: format!("Yunpian's answer has no result for {}", item.phone),
                    }),
                };
                (item.index, result)
            })
            .collect()
    }

    /// Yunpian pushes its receipts (see the module docs); there is nothing to pull.
    pub async fn pull_receipts(
        &self,
        _account: &YunpianAccount,
        _pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        Ok(Vec::new())
    }
}

/// One entry of a status report push.
#[derive(Deserialize)]
struct StatusReport {
    sid: Value,
    report_status: String,
    #[serde(default)]
    error_msg: Option<String>,
    #[serde(default)]
    error_detail: Option<String>,
    #[serde(default)]
    user_receive_time: Option<String>,
}

/// `yyyy-MM-dd HH:mm:ss` in Beijing time.
fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(s?.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    let beijing = FixedOffset::east_opt(8 * 3600)?;
    let local = beijing.from_local_datetime(&naive).single()?;
    Some(local.with_timezone(&Utc))
}

/// Parses a status report push: the form field `sms_status` holding the URL-encoded JSON array
/// (see the module docs).
pub fn parse_receipt_push(body: &[u8]) -> Result<Vec<Receipt>, String> {
    let raw = url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "sms_status")
        .map(|(_, value)| value.into_owned())
        .ok_or("yunpian push: no `sms_status` field")?;
    let reports: Vec<StatusReport> = match serde_json::from_str(&raw) {
        Ok(reports) => reports,
        // Yunpian notes that some senders' data needs decoding twice.
        Err(first) => {
            let spaced = raw.replace('+', " ");
            let once_more = percent_decode_str(&spaced)
                .decode_utf8()
                .map_err(|_| format!("yunpian push: `sms_status` is not JSON: {first}"))?;
            serde_json::from_str(&once_more)
                .map_err(|_| format!("yunpian push: `sms_status` is not JSON: {first}"))?
        }
    };
    reports
        .into_iter()
        .map(|r| {
            let sid = match r.sid {
                Value::Number(n) => n.to_string(),
                Value::String(s) if !s.is_empty() => s,
                other => return Err(format!("yunpian push: {other} is not a sid")),
            };
            let delivered = match r.report_status.trim() {
                "SUCCESS" => true,
                "FAIL" => false,
                other => return Err(format!("yunpian push: unknown report_status {other:?}")),
            };
            Ok(Receipt {
                vendor: VENDOR.into(),
                vendor_message_id: sid,
                receiver: None,
                delivered,
                error_code: (!delivered).then(|| {
                    r.error_msg
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| "FAIL".into())
                }),
                error_detail: if delivered {
                    None
                } else {
                    r.error_detail.filter(|d| !d.is_empty())
                },
                at: parse_time(r.user_receive_time.as_deref()).unwrap_or_else(Utc::now),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::Sender;
    use crate::channels::sms::SmsSender;
    use crate::channels::testkit::{self, Answer, Captured, VendorServer};
    use herald_core::Channel;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::time::Duration;

    const APIKEY: &str = "9b11127a9701975c734b8aee81ee3526";

    fn refusal(code: i64, msg: &str, detail: &str) -> Answer {
        Answer {
            status: 400,
            headers: vec![("content-type".into(), "application/json".into())],
            body: json!({"http_status_code": 400, "code": code, "msg": msg, "detail": detail})
                .to_string(),
        }
    }

    /// What Yunpian checks before sending: a form `POST` to the path, the apikey, and every
    /// parameter present. The body's fields when the request passes.
    fn verify(c: &Captured) -> Result<BTreeMap<String, String>, Answer> {
        if c.method != "POST" || c.path != "/v2/sms/tpl_batch_send.json" {
            return Err(Answer::status(404, "not found"));
        }
        if !c
            .header("content-type")
            .starts_with("application/x-www-form-urlencoded")
        {
            return Err(refusal(2, "请求参数格式错误", "Content-Type"));
        }
        let form: BTreeMap<String, String> = testkit::form_pairs(&c.body).into_iter().collect();
        if form.get("apikey").map(String::as_str) != Some(APIKEY) {
            return Err(refusal(-1, "非法的apikey", "请检查的apikey是否正确"));
        }
        for field in ["mobile", "tpl_id", "tpl_value"] {
            if !form.contains_key(field) {
                return Err(refusal(
                    1,
                    "请求参数缺失",
                    &format!("参数 {field} 必须传入"),
                ));
            }
        }
        Ok(form)
    }

    /// The documented success answer, with `code_of(mobile)` deciding each number's code.
    fn answer(form: &BTreeMap<String, String>, code_of: impl Fn(&str) -> i64) -> Answer {
        let data: Vec<Value> = form["mobile"]
            .split(',')
            .map(|mobile| {
                let code = code_of(mobile);
                if code == 0 {
                    let digits: String = mobile.chars().filter(char::is_ascii_digit).collect();
                    let sid: i64 = digits[digits.len() - 4..].parse().unwrap();
                    json!({"code": 0, "msg": "发送成功", "count": 1, "fee": 0.05,
                           "unit": "RMB", "mobile": mobile, "sid": 3_310_000_000i64 + sid})
                } else {
                    json!({"code": code, "msg": "请求参数格式错误", "count": 0, "fee": 0,
                           "unit": "RMB", "mobile": mobile,
                           "detail": "参数 mobile 格式不正确"})
                }
            })
            .collect();
        let sent = data.iter().filter(|d| d["code"] == 0).count();
        Answer::json(
            json!({"total_count": sent, "total_fee": format!("{:.4}", sent as f64 * 0.05),
                            "unit": "RMB", "data": data}),
        )
    }

    async fn server(
        respond: impl Fn(&BTreeMap<String, String>) -> Answer + Send + Sync + 'static,
    ) -> VendorServer {
        VendorServer::start(move |c| match verify(c) {
            Ok(form) => respond(&form),
            Err(refused) => refused,
        })
        .await
    }

    fn config(url: &str) -> Value {
        json!({"apikey": APIKEY, "sign_name": "云片网", "base_url": url})
    }

    fn sms(receiver: &str, entry: Value) -> MessageRecord {
        testkit::record(
            Channel::Sms,
            receiver,
            json!({"text": "您的验证码是1234", "yunpian": entry}),
        )
    }

    fn tpl(id: u64, code: &str) -> Value {
        json!({"tpl_id": id, "params": {"code": code}})
    }

    async fn send_with(
        config: &Value,
        records: &[MessageRecord],
    ) -> Vec<Result<SendOutcome, SendError>> {
        let refs: Vec<&MessageRecord> = records.iter().collect();
        YunpianSms::new(http::client())
            .send(&YunpianAccount::parse(config).unwrap(), &refs)
            .await
    }

    async fn send_all(url: &str, records: &[MessageRecord]) -> Vec<Result<SendOutcome, SendError>> {
        send_with(&config(url), records).await
    }

    fn form_of(c: &Captured) -> BTreeMap<String, String> {
        testkit::form_pairs(&c.body).into_iter().collect()
    }

    fn sid(result: &Result<SendOutcome, SendError>) -> &str {
        result
            .as_ref()
            .unwrap()
            .vendor_message_id
            .as_deref()
            .unwrap()
    }

    #[tokio::test]
    async fn records_with_the_same_template_and_params_share_one_request() {
        let vendor = server(|form| answer(form, |_| 0)).await;
        let shared = json!({"tpl_id": 100, "params": {"code": "1234", "name": "张三"}});
        let records = [
            sms("+8613800000001", shared.clone()),
            sms("+85291234567", shared.clone()),
            sms("+8613800000002", tpl(100, "9999")),
        ];
        let results = send_all(&vendor.url, &records).await;
        assert_eq!(sid(&results[0]), "3310000001");
        assert_eq!(sid(&results[1]), "3310004567");
        assert_eq!(sid(&results[2]), "3310000002");
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap().vendor == "yunpian")
        );

        let seen = vendor.requests();
        assert_eq!(seen.len(), 2);
        let first = seen
            .iter()
            .find(|c| form_of(c)["mobile"].contains(','))
            .unwrap();
        assert_eq!(first.header("accept"), "application/json;charset=utf-8");
        assert_eq!(
            first.header("content-type"),
            "application/x-www-form-urlencoded;charset=utf-8"
        );
        let form = form_of(first);
        assert_eq!(
            form.keys().map(String::as_str).collect::<Vec<_>>(),
            ["apikey", "mobile", "tpl_id", "tpl_value"]
        );
        assert_eq!(form["mobile"], "13800000001,+85291234567");
        assert_eq!(form["tpl_id"], "100");
        // tpl_value is itself urlencoded pairs, encoded once more in the body.
        assert_eq!(
            testkit::form_pairs(form["tpl_value"].as_bytes()),
            [
                ("#code#".to_string(), "1234".to_string()),
                ("#name#".to_string(), "张三".to_string())
            ]
        );
        let body = std::str::from_utf8(&first.body).unwrap();
        assert!(
            body.contains(
                "&tpl_value=%2523code%2523%3D1234%26%2523name%2523%3D%25E5%25BC%25A0%25E4%25B8%2589"
            ),
            "{body}"
        );
        let second = seen
            .iter()
            .find(|c| !form_of(c)["mobile"].contains(','))
            .unwrap();
        let form = form_of(second);
        assert_eq!(form["mobile"], "13800000002");
        assert_eq!(
            testkit::form_pairs(form["tpl_value"].as_bytes()),
            [("#code#".to_string(), "9999".to_string())]
        );
    }

    #[tokio::test]
    async fn each_number_gets_its_own_result() {
        let vendor = server(|form| {
            answer(form, |mobile| match mobile {
                "13800000002" => 2,
                "13800000003" => 8,
                "13800000004" => 33,
                _ => 0,
            })
        })
        .await;
        let records: Vec<MessageRecord> = (1..=4)
            .map(|i| sms(&format!("+861380000000{i}"), tpl(7, "1234")))
            .collect();
        let results = send_all(&vendor.url, &records).await;
        assert_eq!(sid(&results[0]), "3310000001");
        assert_eq!(
            results[1].as_ref().unwrap_err(),
            &SendError::Permanent {
                code: "yunpian_2".into(),
                detail: "2: 请求参数格式错误 (参数 mobile 格式不正确)".into()
            }
        );
        assert_eq!(results[2].as_ref().unwrap_err().code(), "yunpian_8");
        assert!(!results[2].as_ref().unwrap_err().is_retryable());
        assert_eq!(results[3].as_ref().unwrap_err().code(), "yunpian_33");
        assert!(!results[3].as_ref().unwrap_err().is_retryable());
        assert_eq!(vendor.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_number_missing_from_the_answer_fails_alone() {
        let vendor = server(|form| {
            let mut narrowed = form.clone();
            narrowed.insert("mobile".into(), "13800000001".into());
            answer(&narrowed, |_| 0)
        })
        .await;
        let records = [
            sms("+8613800000001", tpl(7, "1")),
            sms("+8613800000002", tpl(7, "1")),
        ];
        let results = send_all(&vendor.url, &records).await;
        assert_eq!(sid(&results[0]), "3310000001");
        assert_eq!(results[1].as_ref().unwrap_err().code(), "yunpian_no_result");
    }

    #[tokio::test]
    async fn batches_hold_at_most_1000_distinct_numbers() {
        let vendor = server(|form| answer(form, |_| 0)).await;
        let mut records: Vec<MessageRecord> = (0..1001)
            .map(|i| sms(&format!("+86139{i:08}"), tpl(7, "1")))
            .collect();
        records.push(sms("+8613900000000", tpl(7, "1")));
        let results = send_all(&vendor.url, &records).await;
        assert!(results.iter().all(Result::is_ok));
        let mut sizes: Vec<usize> = vendor
            .requests()
            .iter()
            .map(|c| form_of(c)["mobile"].split(',').count())
            .collect();
        sizes.sort_unstable();
        // 1000, then the 1001st number and the repeated one together.
        assert_eq!(sizes, [2, 1000]);
    }

    #[tokio::test]
    async fn request_refusals_fail_every_record_of_the_request() {
        let vendor = server(|form| match form["tpl_id"].as_str() {
            "5" => refusal(5, "未找到对应id的模板", "模板不存在"),
            "45" => refusal(-5, "访问频率超限", "请降低访问频率"),
            "50" => refusal(-50, "未知异常", "系统出现未知的异常情况"),
            "53" => Answer::status(503, "busy").with_header("retry-after", "7"),
            _ => answer(form, |_| 0),
        })
        .await;
        let two = |id: u64| {
            [
                sms("+8613800000001", tpl(id, "1")),
                sms("+8613800000002", tpl(id, "1")),
            ]
        };

        // A wrong apikey: refused, permanently, without the key in the detail.
        let mut wrong = config(&vendor.url);
        wrong["apikey"] = json!("0000-not-the-key");
        let results = send_with(&wrong, &two(1)).await;
        for r in &results {
            let err = r.as_ref().unwrap_err();
            assert!(!err.is_retryable());
            assert_eq!(err.code(), "yunpian_-1");
            assert_eq!(err.detail(), "-1: 非法的apikey (请检查的apikey是否正确)");
        }

        let results = send_all(&vendor.url, &two(5)).await;
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap_err().code() == "yunpian_5")
        );
        assert!(!results[0].as_ref().unwrap_err().is_retryable());

        for (id, code) in [(45, "yunpian_-5"), (50, "yunpian_-50")] {
            let results = send_all(&vendor.url, &two(id)).await;
            for r in &results {
                let err = r.as_ref().unwrap_err();
                assert!(err.is_retryable(), "{err:?}");
                assert_eq!(err.code(), code);
            }
        }

        let results = send_all(&vendor.url, &two(53)).await;
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.code(), "yunpian_5xx");
        let SendError::Retryable { retry_after, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(*retry_after, Some(Duration::from_secs(7)));

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let results = send_all(&format!("http://127.0.0.1:{port}"), &two(1)).await;
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap_err().code() == "yunpian_connect")
        );

        let odd = VendorServer::start(|_| Answer::status(200, "<html></html>")).await;
        let results = send_all(&odd.url, &two(1)).await;
        assert_eq!(
            results[0].as_ref().unwrap_err().code(),
            "yunpian_bad_response"
        );
    }

    #[test]
    fn an_echoed_apikey_is_scrubbed() {
        let key = Secret::new(APIKEY);
        let err = vendor_error(
            &json!({"code": -1, "msg": "非法的apikey", "detail": format!("apikey {APIKEY}")}),
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            &key,
        );
        assert!(!err.detail().contains(APIKEY), "{err}");
    }

    #[tokio::test]
    async fn bad_content_and_receivers_fail_without_a_request() {
        let vendor = server(|form| answer(form, |_| 0)).await;
        let records = [
            testkit::record(
                Channel::Sms,
                "+8613800000001",
                json!({"text": "hi", "aliyun": {"template_code": "SMS_1"}}),
            ),
            sms("+8613800000001", json!({"tpl_id": "7"})),
            sms(
                "+8613800000001",
                json!({"tpl_id": 7, "params": {"#code#": "1"}}),
            ),
            sms("13800000001", tpl(7, "1")),
        ];
        let results = send_all(&vendor.url, &records).await;
        let codes: Vec<&str> = results
            .iter()
            .map(|r| r.as_ref().unwrap_err().code())
            .collect();
        assert_eq!(
            codes,
            [
                "no_vendor_template",
                "bad_content",
                "bad_content",
                "bad_receiver"
            ]
        );
        assert!(vendor.requests().is_empty());
    }

    #[test]
    fn content_entries_are_checked() {
        assert!(check_content(&json!({"tpl_id": 1, "params": {"code": "1234"}})).is_ok());
        assert!(check_content(&json!({"tpl_id": 1})).is_ok());
        let bad = [
            json!({"params": {"code": "1"}}),
            json!({"tpl_id": 0}),
            json!({"tpl_id": -3}),
            json!({"tpl_id": "1"}),
            json!({"tpl_id": 1, "params": {"code": 1}}),
            json!({"tpl_id": 1, "params": {"#code#": "1"}}),
            json!({"tpl_id": 1, "params": {"": "1"}}),
            json!({"tpl_id": 1, "other": 1}),
        ];
        for entry in bad {
            assert!(check_content(&entry).is_err(), "{entry}");
        }
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let a = YunpianAccount::parse(&json!({"apikey": "hunter2"})).unwrap();
        assert_eq!(
            a.tpl_batch_send.as_str(),
            "https://sms.yunpian.com/v2/sms/tpl_batch_send.json"
        );
        assert_eq!(a.sign_name, None);
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );
        let us = YunpianAccount::parse(&json!({"apikey": "hunter2", "sign_name": "云片网",
                    "base_url": "https://us.yunpian.com/"}))
        .unwrap();
        assert_eq!(
            us.tpl_batch_send.as_str(),
            "https://us.yunpian.com/v2/sms/tpl_batch_send.json"
        );
        assert_eq!(us.sign_name.as_deref(), Some("云片网"));

        let bad = [
            json!({"apikey": 1234}),
            json!({"apikey": ""}),
            json!({"sign_name": "云片网"}),
            json!({"apikey": "hunter2", "sign_name": ""}),
            json!({"apikey": "hunter2", "base_url": "ftp://h.example.com"}),
            json!({"apikey": "hunter2", "base_url": "nope"}),
            json!({"apikey": "hunter2", "region": "cn"}),
            json!("hunter2"),
        ];
        for config in bad {
            let err = YunpianAccount::parse(&config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("1234"),
                "{config}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn the_sms_channel_routes_yunpian_accounts_here() {
        let vendor = server(|form| answer(form, |_| 0)).await;
        let mut account = config(&vendor.url);
        account["vendor"] = json!("yunpian");
        let record = sms("+8613800000001", tpl(7, "1234"));
        let sender = SmsSender::new(http::client());
        let outcome = sender.send(&record, 1, &account).await.unwrap();
        assert_eq!(outcome.vendor, "yunpian");
        assert_eq!(outcome.vendor_message_id.as_deref(), Some("3310000001"));
        assert_eq!(outcome.billing_units, Some(1));
        // Yunpian pushes receipts: nothing is pulled, nothing is asked.
        let pending = PendingReceipt {
            vendor_message_id: "3310000001".into(),
            receiver: "+8613800000001".into(),
            sent_at: 0,
        };
        assert!(
            sender
                .pull_receipts(1, &account, &[pending])
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(vendor.requests().len(), 1);
    }

    fn push_body(reports: &Value) -> Vec<u8> {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("sms_status", &reports.to_string())
            .finish()
            .into_bytes()
    }

    #[test]
    fn pushed_status_reports_become_receipts() {
        let reports = json!([
            {"error_detail": "接收成功", "sid": 9527, "uid": null,
             "user_receive_time": "2014-03-17 22:55:21", "error_msg": "",
             "mobile": "15205201314", "report_status": "SUCCESS"},
            {"error_detail": "错误号码,不扣费", "sid": 9528, "uid": null,
             "user_receive_time": "2014-03-17 22:55:23", "error_msg": "YP:54",
             "mobile": "+93701234566", "report_status": "FAIL"}
        ]);
        let time = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let expected = [
            Receipt {
                vendor: "yunpian".into(),
                vendor_message_id: "9527".into(),
                receiver: None,
                delivered: true,
                error_code: None,
                error_detail: None,
                at: time("2014-03-17T14:55:21Z"),
            },
            Receipt {
                vendor: "yunpian".into(),
                vendor_message_id: "9528".into(),
                receiver: None,
                delivered: false,
                error_code: Some("YP:54".into()),
                error_detail: Some("错误号码,不扣费".into()),
                at: time("2014-03-17T14:55:23Z"),
            },
        ];
        let push = crate::channels::parse_receipt_push("yunpian", &push_body(&reports)).unwrap();
        assert_eq!(push.receipts, expected);
        assert_eq!(push.ack, ("text/plain", "SUCCESS"));

        // Encoded twice, as Yunpian warns some senders do.
        let once: String =
            url::form_urlencoded::byte_serialize(reports.to_string().as_bytes()).collect();
        let twice: String = url::form_urlencoded::byte_serialize(once.as_bytes()).collect();
        let body = format!("sms_status={twice}");
        assert_eq!(parse_receipt_push(body.as_bytes()).unwrap(), expected);

        assert!(parse_receipt_push(b"other=1").is_err());
        assert!(parse_receipt_push(b"sms_status=not-json").is_err());
        assert!(
            parse_receipt_push(&push_body(&json!([{"sid": 1, "report_status": "MAYBE"}]))).is_err()
        );
        assert!(parse_receipt_push(&push_body(&json!([{"report_status": "SUCCESS"}]))).is_err());
        assert_eq!(parse_receipt_push(&push_body(&json!([]))).unwrap(), []);
    }
}

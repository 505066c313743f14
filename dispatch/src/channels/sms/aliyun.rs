//! Alibaba Cloud SMS (阿里云短信服务, `dysmsapi`, API version 2017-05-25): template messages sent
//! through the RPC-style API, signed with Signature Version 1.0.
//!
//! # Account
//!
//! ```json
//! {"access_key_id": "LTAI5tExample", "access_key_secret": "…", "sign_name": "阿里云短信测试",
//!  "region": "cn-hangzhou"}
//! ```
//!
//! - `access_key_id`, `access_key_secret`: an AccessKey pair allowed `dysms:SendSms`,
//!   `dysms:SendBatchSms` and `dysms:QuerySendDetails`.
//! - `sign_name`: the approved signature (签名) the receiver sees as `【sign_name】`.
//! - `region` (default `cn-hangzhou`): picks the endpoint. `ap-southeast-1`, `ap-southeast-5` and
//!   `eu-central-1` have their own hosts (`dysmsapi.<region>.aliyuncs.com`); the Chinese mainland
//!   regions, `cn-hongkong` and the finance/government clouds use `dysmsapi.aliyuncs.com`.
//! - `base_url` (optional): replaces the API origin, e.g. `http://127.0.0.1:8080` (tests).
//!
//! # Content
//!
//! The template's `aliyun` entry names the approved template and its variables:
//!
//! ```json
//! {"template_code": "SMS_153055065", "params": {"code": "1234"}}
//! ```
//!
//! `params` (default `{}`) holds string values only: Alibaba Cloud refuses any other JSON type
//! (`isv.INVALID_JSON_PARAM`).
//!
//! # Requests
//!
//! Every call is a `POST` to the endpoint's `/` with all parameters in an
//! `application/x-www-form-urlencoded` body: the common parameters (`AccessKeyId`, `Action`,
//! `Format=JSON`, `SignatureMethod=HMAC-SHA1`, `SignatureNonce` (a random UUID),
//! `SignatureVersion=1.0`, `Timestamp` (ISO 8601 UTC, `2024-03-01T12:00:00Z`),
//! `Version=2017-05-25`), the action's own parameters, and `Signature`:
//!
//! ```text
//! StringToSign = "POST" + "&" + enc("/") + "&" + enc(k1=v1&k2=v2&…)   (sorted by name, each
//!                                                                       name and value enc()'d)
//! Signature    = Base64(HMAC-SHA1(AccessKeySecret + "&", StringToSign))
//! ```
//!
//! where `enc` percent-encodes UTF-8 bytes except `A-Z a-z 0-9 - _ . ~` (a space is `%20`).
//! [`sign`] computes it.
//!
//! Receivers are E.164 (`+8613812345678`); mainland China numbers are sent as their 11 national
//! digits, other numbers as country code and number without `+` (`85291234567`).
//!
//! A record alone with its `template_code` goes through `SendSms` (`PhoneNumbers`, `SignName`,
//! `TemplateCode`, `TemplateParam`). Records sharing a `template_code` go through `SendBatchSms`,
//! up to 100 numbers a request (`PhoneNumberJson`, `SignNameJson`, `TemplateCode`,
//! `TemplateParamJson`; each number keeps its own params). A number appears at most once per
//! request. Alibaba Cloud answers one `BizId` per request: it is the `vendor_message_id` of every
//! record in it, and receipts join on `BizId` and phone number. When a batch is refused for a
//! reason that belongs to one number (`isv.MOBILE_NUMBER_ILLEGAL`, `isv.BUSINESS_LIMIT_CONTROL`,
//! a bad parameter value, …) nothing was sent, and each of its records is sent again alone
//! through `SendSms`, so that the failure lands on its own record.
//!
//! # Errors
//!
//! The answer's `Code` (`OK` is success) becomes `aliyun_<code in snake case>`, e.g.
//! `isv.BUSINESS_LIMIT_CONTROL` → `aliyun_isv_business_limit_control`,
//! `InvalidAccessKeyId.NotFound` → `aliyun_invalid_access_key_id_not_found`; the detail is
//! `<Code>: <Message>`. Retryable: `isp.SYSTEM_ERROR`, `isv.BUSINESS_LIMIT_CONTROL` (the
//! per-number frequency limit), `Throttling*`, `ServiceUnavailable*`, `InternalError*`,
//! `SignatureNonceUsed`, and any code answered with HTTP 408, 429 or 5xx (honouring
//! `Retry-After`). Everything else is permanent: bad credentials (`InvalidAccessKeyId.*`,
//! `SignatureDoesNotMatch`), bad numbers (`isv.MOBILE_NUMBER_ILLEGAL`), bad templates or
//! signatures (`isv.SMS_TEMPLATE_ILLEGAL`, `isv.SMS_SIGNATURE_ILLEGAL`), exhausted quotas and
//! balance (`isv.DAY_LIMIT_CONTROL`, `isv.AMOUNT_NOT_ENOUGH`, `isv.OUT_OF_SERVICE`), and so on.
//! Answers without a `Code` map by HTTP status (see [`http::status_error`]); a `2xx` without one
//! is the permanent `aliyun_bad_response`. Transport failures are retryable.
//!
//! # Receipts
//!
//! Pulled with `QuerySendDetails` (`PhoneNumber`, `BizId`, `SendDate` = the send's date in
//! Beijing time as `yyyyMMdd`, `PageSize`, `CurrentPage`): `SendStatus` 3 is delivered, 2 failed
//! (`ErrCode` is the error code), 1 still waiting (no receipt yet). Pushed as `SmsReport` (HTTP
//! batch push): a JSON array of `{phone_number, send_time, report_time, success, err_code,
//! err_msg, sms_size, biz_id, out_id}`, answered with `{"code":0,"msg":"成功"}`. Times are
//! Beijing time (UTC+8). A pushed `phone_number` of 11 digits in a mainland mobile range is read
//! as a mainland number (`+86…`), anything else as country code and number.
//!
//! # Documentation
//!
//! - Signature (RPC, V1.0): https://help.aliyun.com/document_detail/145075.html and
//!   https://alibabacloud.com/help/en/ram/common-parameters-2; the worked example
//!   (`testid`/`testsecret`): https://developer.aliyun.com/ask/210168
//! - SendSms: https://help.aliyun.com/en/sms/developer-reference/api-dysmsapi-2017-05-25-sendsms
//! - SendBatchSms: https://help.aliyun.com/document_detail/66041.html
//! - QuerySendDetails: https://help.aliyun.com/document_detail/419277.html
//! - SmsReport: https://help.aliyun.com/zh/sms/developer-reference/smsreport-2
//! - API error codes: https://help.aliyun.com/document_detail/101346.html
//! - Endpoints: https://help.aliyun.com/document_detail/68360.html

use super::vendor_entry;
use crate::channels::http::{self, BATCH_REQUEST_CONCURRENCY, bad_content};
use crate::channels::{SendError, SendOutcome};
use base64::Engine;
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};
use futures::StreamExt;
use herald_core::config::Secret;
use herald_core::domain::parse_phone;
use herald_core::store::PendingReceipt;
use herald_core::{MessageRecord, Receipt};
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha1::Sha1;
use std::collections::HashMap;

/// The vendor name on delivery events and receipts.
const VENDOR: &str = "aliyun";

/// The API version of every call.
const API_VERSION: &str = "2017-05-25";

/// The region of accounts that name none.
const DEFAULT_REGION: &str = "cn-hangzhou";

/// Most numbers one `SendBatchSms` takes.
const BATCH_MAX: usize = 100;

/// What Alibaba Cloud expects in answer to a receipt push: content type and body.
pub const RECEIPT_ACK: (&str, &str) = ("application/json", r#"{"code":0,"msg":"成功"}"#);

/// Regions served by the global endpoint `dysmsapi.aliyuncs.com`.
const GLOBAL_ENDPOINT_REGIONS: &[&str] = &[
    "cn-hangzhou",
    "cn-shanghai",
    "cn-qingdao",
    "cn-beijing",
    "cn-zhangjiakou",
    "cn-huhehaote",
    "cn-wulanchabu",
    "cn-shenzhen",
    "cn-chengdu",
    "cn-hongkong",
    "cn-hangzhou-finance",
    "cn-shanghai-finance-1",
    "cn-shenzhen-finance-1",
    "cn-beijing-finance-1",
    "cn-north-2-gov-1",
];

/// Regions with an endpoint of their own, `dysmsapi.<region>.aliyuncs.com`.
const REGIONAL_ENDPOINT_REGIONS: &[&str] = &["ap-southeast-1", "ap-southeast-5", "eu-central-1"];

/// Codes after which the same request may succeed later (prefixes end at a `.`).
const RETRYABLE_CODES: &[&str] = &[
    "isp.SYSTEM_ERROR",
    "isv.BUSINESS_LIMIT_CONTROL",
    "Throttling",
    "ServiceUnavailable",
    "InternalError",
    "SignatureNonceUsed",
];

/// Codes that refuse a whole request for what may be one number or one number's parameters:
/// a batch refused with one of these is sent again record by record.
const PER_NUMBER_CODES: &[&str] = &[
    "isv.MOBILE_NUMBER_ILLEGAL",
    "isv.BUSINESS_LIMIT_CONTROL",
    "isv.DOMESTIC_NUMBER_NOT_SUPPORTED",
    "isv.BLACK_KEY_CONTROL_LIMIT",
    "isv.PARAM_LENGTH_LIMIT",
    "isv.PARAM_NOT_SUPPORT_URL",
    "isv.INVALID_JSON_PARAM",
    "isv.TEMPLATE_PARAMS_ILLEGAL",
    "isv.TEMPLATE_MISSING_PARAMETERS",
];

/// Percent-encoding of the RPC signature: everything but `A-Z a-z 0-9 - _ . ~`.
const RPC_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, RPC_ENCODE).to_string()
}

/// `k1=v1&k2=v2&…` sorted by name, names and values percent-encoded.
fn canonical_query(params: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    sorted
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The string a request signs: `<method>&%2F&<percent-encoded canonical query>`.
fn string_to_sign(method: &str, params: &[(&str, &str)]) -> String {
    format!(
        "{method}&{}&{}",
        encode("/"),
        encode(&canonical_query(params))
    )
}

/// The `Signature` of an RPC request with `params` (every parameter but `Signature`):
/// `Base64(HMAC-SHA1(access_key_secret + "&", StringToSign))`; see the module docs.
pub fn sign(method: &str, params: &[(&str, &str)], access_key_secret: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(format!("{access_key_secret}&").as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(string_to_sign(method, params).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// An Alibaba Cloud SMS account (see the module docs for its JSON).
#[derive(Debug, Clone)]
pub struct AliyunAccount {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    pub sign_name: String,
    /// Where requests go: the region's endpoint, or the config's `base_url`.
    pub endpoint: Url,
}

/// The config as stored; [`AliyunAccount::parse`] checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAccount {
    access_key_id: String,
    access_key_secret: Secret,
    sign_name: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
}

impl AliyunAccount {
    /// Parses the account config (without its `vendor` field); the error never quotes the
    /// secret.
    pub fn parse(config: &Value) -> Result<Self, String> {
        // serde quotes an ill-typed value in its error: check the secret's type first.
        if !config.is_object() {
            return Err("an aliyun account must be a JSON object".into());
        }
        if config
            .get("access_key_secret")
            .is_some_and(|s| !s.is_string())
        {
            return Err("`access_key_secret` must be a string".into());
        }
        let stored: StoredAccount =
            serde_json::from_value(config.clone()).map_err(|e| format!("aliyun account: {e}"))?;
        if stored.access_key_id.trim().is_empty() {
            return Err("`access_key_id` is empty".into());
        }
        if stored.access_key_secret.expose().is_empty() {
            return Err("`access_key_secret` is empty".into());
        }
        if stored.sign_name.trim().is_empty() {
            return Err("`sign_name` is empty".into());
        }
        let region_endpoint = region_endpoint(stored.region.as_deref().unwrap_or(DEFAULT_REGION))?;
        let endpoint = match stored.base_url {
            Some(base) => {
                let url = Url::parse(&base).map_err(|e| format!("`base_url`: {e}"))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err("`base_url` must be an http or https URL with a host".into());
                }
                url
            }
            None => Url::parse(&region_endpoint).map_err(|e| format!("endpoint: {e}"))?,
        };
        Ok(AliyunAccount {
            access_key_id: stored.access_key_id,
            access_key_secret: stored.access_key_secret,
            sign_name: stored.sign_name,
            endpoint,
        })
    }
}

/// The endpoint of `region`.
fn region_endpoint(region: &str) -> Result<String, String> {
    if GLOBAL_ENDPOINT_REGIONS.contains(&region) {
        Ok("https://dysmsapi.aliyuncs.com/".into())
    } else if REGIONAL_ENDPOINT_REGIONS.contains(&region) {
        Ok(format!("https://dysmsapi.{region}.aliyuncs.com/"))
    } else {
        Err(format!(
            "`region`: unknown region {region:?} (expected one of {})",
            GLOBAL_ENDPOINT_REGIONS
                .iter()
                .chain(REGIONAL_ENDPOINT_REGIONS)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// A template's `aliyun` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    template_code: String,
    #[serde(default)]
    params: Map<String, Value>,
}

fn parse_entry(entry: &Value) -> Result<Entry, String> {
    let entry: Entry = serde_json::from_value(entry.clone()).map_err(|e| e.to_string())?;
    if entry.template_code.trim().is_empty() {
        return Err("`template_code` is empty".into());
    }
    if let Some((name, _)) = entry.params.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!(
            "`params.{name}` must be a string (Alibaba Cloud takes only string values)"
        ));
    }
    Ok(entry)
}

/// Checks the template content's `aliyun` entry: `{"template_code", "params"?}`.
pub fn check_content(entry: &Value) -> Result<(), String> {
    parse_entry(entry).map(drop)
}

/// The number as Alibaba Cloud takes it: 11 national digits for mainland China, else country
/// code and number without `+`.
fn vendor_phone(receiver: &str) -> Result<String, SendError> {
    let digits = receiver
        .strip_prefix('+')
        .filter(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()));
    match digits {
        Some(d) => Ok(d
            .strip_prefix("86")
            .filter(|national| national.len() == 11)
            .unwrap_or(d)
            .to_string()),
        None => Err(SendError::Permanent {
            code: "bad_receiver".into(),
            detail: format!("{receiver:?} is not an E.164 phone number"),
        }),
    }
}

/// A number as Alibaba Cloud reports it, in E.164.
fn e164(phone: &str) -> Result<String, String> {
    parse_phone(phone)
        .or_else(|_| parse_phone(&format!("+{phone}")))
        .map_err(|_| format!("{phone:?} is not a phone number"))
}

/// Beijing time, in which Alibaba Cloud gives dates and times.
fn beijing() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// `yyyy-MM-dd HH:mm:ss` in Beijing time.
fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(s?.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    let local = beijing().from_local_datetime(&naive).single()?;
    Some(local.with_timezone(&Utc))
}

/// `Code` → `aliyun_<snake case>`:
/// `isv.BUSINESS_LIMIT_CONTROL` → `aliyun_isv_business_limit_control`.
fn error_code(code: &str) -> String {
    let mut out = String::from("aliyun_");
    let mut after_lower = false;
    for c in code.chars() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && after_lower {
                out.push('_');
            }
            after_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            out.push(c.to_ascii_lowercase());
        } else {
            if !out.ends_with('_') {
                out.push('_');
            }
            after_lower = false;
        }
    }
    out.trim_end_matches('_').to_string()
}

/// Whether `code` is `listed` or under it (`Throttling` covers `Throttling.User`).
fn listed(code: &str, list: &[&str]) -> bool {
    list.iter().any(|p| {
        code == *p
            || code
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// A refusal with Alibaba Cloud's `Code` (see the module docs for the mapping).
fn vendor_error(code: &str, message: &str, status: StatusCode, headers: &HeaderMap) -> SendError {
    let detail = format!("{code}: {message}");
    if listed(code, RETRYABLE_CODES) || matches!(status.as_u16(), 408 | 429 | 500..=599) {
        SendError::Retryable {
            code: error_code(code),
            detail,
            retry_after: http::retry_after(headers),
        }
    } else {
        SendError::Permanent {
            code: error_code(code),
            detail,
        }
    }
}

/// One record on its way into a request.
struct Item {
    index: usize,
    phone: String,
    params: Map<String, Value>,
}

/// The Alibaba Cloud SMS client.
pub struct AliyunSms {
    client: Client,
}

impl AliyunSms {
    /// A client over the shared HTTP pool.
    pub fn new(client: Client) -> Self {
        AliyunSms { client }
    }

    /// Sends `records` (any number; the client splits them into vendor requests), one result
    /// per record in order.
    pub async fn send(
        &self,
        account: &AliyunAccount,
        records: &[&MessageRecord],
    ) -> Vec<Result<SendOutcome, SendError>> {
        let mut results: Vec<Option<Result<SendOutcome, SendError>>> =
            records.iter().map(|_| None).collect();
        // Per template code, in order of first appearance: batches of distinct numbers.
        let mut groups: Vec<(String, Vec<Vec<Item>>)> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        for (index, record) in records.iter().enumerate() {
            let prepared = vendor_entry(record, VENDOR).and_then(|entry| {
                let entry =
                    parse_entry(entry).map_err(|e| bad_content(format!("`aliyun`: {e}")))?;
                Ok((entry, vendor_phone(&record.receiver)?))
            });
            let (entry, phone) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    results[index] = Some(Err(e));
                    continue;
                }
            };
            let g = *group_of
                .entry(entry.template_code.clone())
                .or_insert_with(|| {
                    groups.push((entry.template_code.clone(), Vec::new()));
                    groups.len() - 1
                });
            let item = Item {
                index,
                phone,
                params: entry.params,
            };
            let batches = &mut groups[g].1;
            match batches
                .iter_mut()
                .find(|b| b.len() < BATCH_MAX && b.iter().all(|i| i.phone != item.phone))
            {
                Some(batch) => batch.push(item),
                None => batches.push(vec![item]),
            }
        }
        let requests = groups.into_iter().flat_map(|(template_code, batches)| {
            batches
                .into_iter()
                .map(move |batch| (template_code.clone(), batch))
        });
        let done: Vec<Vec<(usize, Result<SendOutcome, SendError>)>> =
            futures::stream::iter(requests)
                .map(|(template_code, batch)| self.send_batch(account, template_code, batch))
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
                        code: "aliyun_no_result".into(),
                        detail: "no request carried this record".into(),
                    })
                })
            })
            .collect()
    }

    /// Sends one batch of distinct numbers sharing `template_code`: `SendSms` for one,
    /// `SendBatchSms` for more, and record by record again when the batch is refused for what
    /// may be one number's fault.
    async fn send_batch(
        &self,
        account: &AliyunAccount,
        template_code: String,
        batch: Vec<Item>,
    ) -> Vec<(usize, Result<SendOutcome, SendError>)> {
        if let [item] = &batch[..] {
            let result = self.send_sms(account, &template_code, item).await;
            return vec![(item.index, result)];
        }
        match self.send_batch_sms(account, &template_code, &batch).await {
            Ok(outcome) => batch
                .iter()
                .map(|item| (item.index, Ok(outcome.clone())))
                .collect(),
            Err(CallError {
                code: Some(code), ..
            }) if listed(&code, PER_NUMBER_CODES) => {
                tracing::debug!(
                    code,
                    count = batch.len(),
                    "aliyun refused a batch; sending its records one by one"
                );
                // Futures collected first: a stream mapping borrowed items through a closure
                // is not `Send` for every lifetime, which `async_trait` needs.
                let sends: Vec<_> = batch
                    .iter()
                    .map(|item| async {
                        let result = self.send_sms(account, &template_code, item).await;
                        (item.index, result)
                    })
                    .collect();
                futures::stream::iter(sends)
                    .buffer_unordered(BATCH_REQUEST_CONCURRENCY)
                    .collect()
                    .await
            }
            Err(CallError { error, .. }) => batch
                .iter()
                .map(|item| (item.index, Err(error.clone())))
                .collect(),
        }
    }

    /// `SendSms` to one number.
    async fn send_sms(
        &self,
        account: &AliyunAccount,
        template_code: &str,
        item: &Item,
    ) -> Result<SendOutcome, SendError> {
        let mut params = vec![
            ("PhoneNumbers", item.phone.clone()),
            ("SignName", account.sign_name.clone()),
            ("TemplateCode", template_code.to_string()),
        ];
        if !item.params.is_empty() {
            params.push((
                "TemplateParam",
                Value::Object(item.params.clone()).to_string(),
            ));
        }
        let answer = self
            .call(account, "SendSms", params)
            .await
            .map_err(|e| e.error)?;
        Ok(outcome(&answer))
    }

    /// `SendBatchSms` to several distinct numbers.
    async fn send_batch_sms(
        &self,
        account: &AliyunAccount,
        template_code: &str,
        batch: &[Item],
    ) -> Result<SendOutcome, CallError> {
        let phones: Vec<&str> = batch.iter().map(|i| i.phone.as_str()).collect();
        let signs: Vec<&str> = batch.iter().map(|_| account.sign_name.as_str()).collect();
        let mut params = vec![
            ("PhoneNumberJson", json_text(&phones)),
            ("SignNameJson", json_text(&signs)),
            ("TemplateCode", template_code.to_string()),
        ];
        if batch.iter().any(|i| !i.params.is_empty()) {
            let values: Vec<&Map<String, Value>> = batch.iter().map(|i| &i.params).collect();
            params.push(("TemplateParamJson", json_text(&values)));
        }
        let answer = self.call(account, "SendBatchSms", params).await?;
        Ok(outcome(&answer))
    }

    /// Pulls receipts for `pending` messages with `QuerySendDetails`, one query each; messages
    /// still waiting for theirs are absent. A query refused for its own number or parameters
    /// is skipped (and logged); any other failure fails the pull.
    pub async fn pull_receipts(
        &self,
        account: &AliyunAccount,
        pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        let queries: Vec<_> = pending
            .iter()
            .map(|p| self.query_send_details(account, p))
            .collect();
        let answers: Vec<Result<Option<Receipt>, CallError>> = futures::stream::iter(queries)
            .buffered(BATCH_REQUEST_CONCURRENCY)
            .collect()
            .await;
        let mut receipts = Vec::new();
        for (answer, p) in answers.into_iter().zip(pending) {
            match answer {
                Ok(Some(receipt)) => receipts.push(receipt),
                Ok(None) => {}
                Err(CallError { error, code })
                    if error.code() == "bad_receiver"
                        || code.as_deref().is_some_and(|c| {
                            listed(c, &["isv.MOBILE_NUMBER_ILLEGAL", "isv.INVALID_PARAMETERS"])
                        }) =>
                {
                    tracing::warn!(
                        biz_id = p.vendor_message_id,
                        error = %error,
                        "aliyun refused a receipt query; skipping it"
                    );
                }
                Err(CallError { error, .. }) => return Err(error),
            }
        }
        Ok(receipts)
    }

    /// The receipt of one sent message, if it has arrived.
    async fn query_send_details(
        &self,
        account: &AliyunAccount,
        pending: &PendingReceipt,
    ) -> Result<Option<Receipt>, CallError> {
        let phone =
            vendor_phone(&pending.receiver).map_err(|error| CallError { error, code: None })?;
        let Some(sent_at) = DateTime::from_timestamp_millis(pending.sent_at) else {
            return Ok(None);
        };
        let send_date = sent_at
            .with_timezone(&beijing())
            .format("%Y%m%d")
            .to_string();
        let params = vec![
            ("PhoneNumber", phone),
            ("BizId", pending.vendor_message_id.clone()),
            ("SendDate", send_date),
            ("PageSize", "10".to_string()),
            ("CurrentPage", "1".to_string()),
        ];
        let answer = self.call(account, "QuerySendDetails", params).await?;
        let detail = answer
            .pointer("/SmsSendDetailDTOs/SmsSendDetailDTO")
            .and_then(Value::as_array)
            .and_then(|details| details.first());
        let Some(detail) = detail else {
            return Ok(None);
        };
        let status = match detail.get("SendStatus") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let delivered = match status {
            Some(3) => true,
            Some(2) => false,
            // 1: waiting for the carrier's receipt.
            _ => return Ok(None),
        };
        let text = |name: &str| detail.get(name).and_then(Value::as_str);
        Ok(Some(Receipt {
            vendor: VENDOR.into(),
            vendor_message_id: pending.vendor_message_id.clone(),
            receiver: Some(pending.receiver.clone()),
            delivered,
            error_code: (!delivered).then(|| text("ErrCode").unwrap_or("FAILED").to_string()),
            error_detail: None,
            at: parse_time(text("ReceiveDate")).unwrap_or_else(Utc::now),
        }))
    }

    /// Signs and sends one RPC call; the answer's JSON when its `Code` is `OK`.
    async fn call(
        &self,
        account: &AliyunAccount,
        action: &str,
        params: Vec<(&str, String)>,
    ) -> Result<Value, CallError> {
        let nonce = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
        let timestamp = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let common = [
            ("AccessKeyId", account.access_key_id.as_str()),
            ("Action", action),
            ("Format", "JSON"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", nonce.as_str()),
            ("SignatureVersion", "1.0"),
            ("Timestamp", timestamp.as_str()),
            ("Version", API_VERSION),
        ];
        let all: Vec<(&str, &str)> = common
            .into_iter()
            .chain(params.iter().map(|(k, v)| (*k, v.as_str())))
            .collect();
        let signature = sign("POST", &all, account.access_key_secret.expose());
        let body = format!("{}&Signature={}", canonical_query(&all), encode(&signature));
        let transport = |e| CallError {
            error: http::request_error(VENDOR, e),
            code: None,
        };
        let response = self
            .client
            .post(account.endpoint.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(transport)?;
        let answer: Option<Value> = serde_json::from_slice(&bytes).ok();
        let code = answer
            .as_ref()
            .and_then(|a| a.get("Code"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        match (code, answer) {
            (Some(code), Some(answer)) if code == "OK" && status.is_success() => Ok(answer),
            (Some(code), Some(answer)) => {
                let message = answer.get("Message").and_then(Value::as_str).unwrap_or("");
                Err(CallError {
                    error: vendor_error(&code, message, status, &headers),
                    code: Some(code),
                })
            }
            _ if status.is_success() => Err(CallError {
                error: SendError::Permanent {
                    code: "aliyun_bad_response".into(),
                    detail: format!("HTTP {status} without a Code{}", http::excerpt(&bytes)),
                },
                code: None,
            }),
            _ => Err(CallError {
                error: http::status_error(
                    VENDOR,
                    status,
                    &headers,
                    format!("HTTP {status}{}", http::excerpt(&bytes)),
                ),
                code: None,
            }),
        }
    }
}

/// A failed call: the error, and Alibaba Cloud's `Code` when it answered one.
struct CallError {
    error: SendError,
    code: Option<String>,
}

/// The outcome of an accepted send: its `BizId`.
fn outcome(answer: &Value) -> SendOutcome {
    SendOutcome {
        vendor: VENDOR.into(),
        vendor_message_id: answer
            .get("BizId")
            .and_then(Value::as_str)
            .map(str::to_owned),
        billing_units: None,
    }
}

/// A JSON array of strings or objects as text.
fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("strings and JSON objects serialise")
}

/// One entry of an `SmsReport` push.
#[derive(Deserialize)]
struct Report {
    phone_number: String,
    success: bool,
    biz_id: String,
    #[serde(default)]
    report_time: Option<String>,
    #[serde(default)]
    send_time: Option<String>,
    #[serde(default)]
    err_code: Option<String>,
    #[serde(default)]
    err_msg: Option<String>,
}

/// Parses an `SmsReport` push body (a JSON array; see the module docs).
pub fn parse_receipt_push(body: &[u8]) -> Result<Vec<Receipt>, String> {
    let reports: Vec<Report> =
        serde_json::from_slice(body).map_err(|e| format!("aliyun SmsReport: {e}"))?;
    reports
        .into_iter()
        .map(|r| {
            let receiver = e164(&r.phone_number).map_err(|e| format!("aliyun SmsReport: {e}"))?;
            Ok(Receipt {
                vendor: VENDOR.into(),
                vendor_message_id: r.biz_id,
                receiver: Some(receiver),
                delivered: r.success,
                error_code: if r.success {
                    None
                } else {
                    Some(r.err_code.unwrap_or_else(|| "FAILED".into()))
                },
                error_detail: if r.success { None } else { r.err_msg },
                at: parse_time(r.report_time.as_deref())
                    .or_else(|| parse_time(r.send_time.as_deref()))
                    .unwrap_or_else(Utc::now),
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
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Mutex;
    use std::time::Duration;

    const KEY_ID: &str = "LTAI5tTestKeyId";
    const SECRET: &str = "test-access-key-secret";
    const SIGN: &str = "阿里云短信测试";

    #[test]
    fn signature_matches_the_documented_example() {
        // The worked example of Alibaba Cloud's RPC signature documentation (AccessKey `testid`
        // / `testsecret`, DescribeRegions, as written there, `TimeStamp` included).
        let params = [
            ("TimeStamp", "2016-02-23T12:46:24Z"),
            ("Format", "XML"),
            ("AccessKeyId", "testid"),
            ("Action", "DescribeRegions"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
            ("Version", "2014-05-26"),
            ("SignatureVersion", "1.0"),
        ];
        assert_eq!(
            string_to_sign("GET", &params),
            "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML\
             %26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf\
             %26SignatureVersion%3D1.0%26TimeStamp%3D2016-02-23T12%253A46%253A24Z\
             %26Version%3D2014-05-26"
        );
        assert_eq!(
            sign("GET", &params, "testsecret"),
            "CT9X0VtwR86fNWSnsc6v8YGOjuE="
        );
    }

    #[test]
    fn percent_encoding_follows_rfc3986() {
        assert_eq!(encode("a b*c~d-e_f.g+h/"), "a%20b%2Ac~d-e_f.g%2Bh%2F");
        assert_eq!(encode("阿里"), "%E9%98%BF%E9%87%8C");
        assert_eq!(
            canonical_query(&[("b", "2"), ("a", "1 1"), ("B", "3")]),
            "B=3&a=1%201&b=2"
        );
    }

    #[test]
    fn codes_become_snake_case() {
        assert_eq!(
            error_code("isv.BUSINESS_LIMIT_CONTROL"),
            "aliyun_isv_business_limit_control"
        );
        assert_eq!(
            error_code("InvalidAccessKeyId.NotFound"),
            "aliyun_invalid_access_key_id_not_found"
        );
        assert_eq!(error_code("Throttling.User"), "aliyun_throttling_user");
        assert_eq!(
            error_code("SignatureDoesNotMatch"),
            "aliyun_signature_does_not_match"
        );
        assert!(listed("Throttling.User", RETRYABLE_CODES));
        assert!(!listed("ThrottlingX", RETRYABLE_CODES));
    }

    /// Alibaba Cloud's documented encoding recipe, independent of `encode`: form-urlencode,
    /// then `+` → `%20`, `*` → `%2A`, `%7E` → `~`.
    fn pop_encode(s: &str) -> String {
        url::form_urlencoded::byte_serialize(s.as_bytes())
            .collect::<String>()
            .replace('+', "%20")
            .replace('*', "%2A")
            .replace("%7E", "~")
    }

    fn refusal(status: u16, code: &str, message: &str) -> Answer {
        Answer {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: json!({"RequestId": "F655A8D5-B967-440B-8683-DAD6FF8DE990",
                         "HostId": "dysmsapi.aliyuncs.com", "Code": code, "Message": message})
            .to_string(),
        }
    }

    fn ok(extra: Value) -> Answer {
        let mut body = json!({"Code": "OK", "Message": "OK",
                              "RequestId": "F655A8D5-B967-440B-8683-DAD6FF8DE990"});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        Answer::json(body)
    }

    /// What the vendor checks before the action: a form `POST` to `/`, the common parameters,
    /// a fresh nonce, a recent timestamp and the signature, recomputed here from the request
    /// as received. The request's parameters (without `Signature`) when it passes.
    fn verify(
        c: &Captured,
        nonces: &Mutex<HashSet<String>>,
    ) -> Result<BTreeMap<String, String>, Answer> {
        if c.method != "POST"
            || c.path != "/"
            || c.header("content-type") != "application/x-www-form-urlencoded"
        {
            return Err(refusal(400, "InvalidRequest", "expected a form POST to /"));
        }
        let mut params = BTreeMap::new();
        for (k, v) in testkit::form_pairs(c.query.as_bytes())
            .into_iter()
            .chain(testkit::form_pairs(&c.body))
        {
            if params.insert(k.clone(), v).is_some() {
                return Err(refusal(400, "InvalidParameter", &format!("{k} twice")));
            }
        }
        let Some(signature) = params.remove("Signature") else {
            return Err(refusal(400, "MissingSignature", "Signature is mandatory"));
        };
        for (k, want) in [
            ("Format", "JSON"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureVersion", "1.0"),
            ("Version", "2017-05-25"),
        ] {
            if params.get(k).map(String::as_str) != Some(want) {
                return Err(refusal(400, "InvalidParameter", k));
            }
        }
        if params.get("AccessKeyId").map(String::as_str) != Some(KEY_ID) {
            return Err(refusal(
                404,
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            ));
        }
        let fresh = params
            .get("Timestamp")
            .filter(|t| t.len() == 20 && t.ends_with('Z'))
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| (Utc::now() - t.with_timezone(&Utc)).num_seconds().abs() < 900);
        if !fresh {
            return Err(refusal(400, "InvalidTimeStamp.Expired", "bad Timestamp"));
        }
        let nonce = params.get("SignatureNonce").cloned().unwrap_or_default();
        if nonce.is_empty() || !nonces.lock().unwrap().insert(nonce) {
            return Err(refusal(400, "SignatureNonceUsed", "nonce used"));
        }
        let canonical = params
            .iter()
            .map(|(k, v)| format!("{}={}", pop_encode(k), pop_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let to_sign = format!("POST&{}&{}", pop_encode("/"), pop_encode(&canonical));
        let mut mac = Hmac::<Sha1>::new_from_slice(format!("{SECRET}&").as_bytes()).unwrap();
        mac.update(to_sign.as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        if expected != signature {
            return Err(refusal(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
            ));
        }
        Ok(params)
    }

    /// A stand-in for `dysmsapi` that verifies every request and answers with `answer`.
    async fn server(
        answer: impl Fn(&BTreeMap<String, String>) -> Answer + Send + Sync + 'static,
    ) -> VendorServer {
        let nonces = Mutex::new(HashSet::new());
        VendorServer::start(move |c| match verify(c, &nonces) {
            Ok(params) => answer(&params),
            Err(refused) => refused,
        })
        .await
    }

    /// The parameters of a request the server saw (body and query), without `Signature`.
    fn params_of(c: &Captured) -> BTreeMap<String, String> {
        let mut p: BTreeMap<String, String> = testkit::form_pairs(&c.body).into_iter().collect();
        p.remove("Signature");
        p
    }

    /// The action's own parameters (the common ones removed).
    fn own_params(c: &Captured) -> BTreeMap<String, String> {
        let mut p = params_of(c);
        for k in [
            "AccessKeyId",
            "Action",
            "Format",
            "SignatureMethod",
            "SignatureNonce",
            "SignatureVersion",
            "Timestamp",
            "Version",
        ] {
            p.remove(k);
        }
        p
    }

    fn config(url: &str) -> Value {
        json!({"access_key_id": KEY_ID, "access_key_secret": SECRET, "sign_name": SIGN,
               "base_url": url})
    }

    fn account(url: &str) -> AliyunAccount {
        AliyunAccount::parse(&config(url)).unwrap()
    }

    fn sms(receiver: &str, entry: Value) -> MessageRecord {
        testkit::record(
            Channel::Sms,
            receiver,
            json!({"text": "Your code is 1234.", "aliyun": entry}),
        )
    }

    fn code(template: &str, code: &str) -> Value {
        json!({"template_code": template, "params": {"code": code}})
    }

    async fn send_all(url: &str, records: &[MessageRecord]) -> Vec<Result<SendOutcome, SendError>> {
        let refs: Vec<&MessageRecord> = records.iter().collect();
        AliyunSms::new(http::client())
            .send(&account(url), &refs)
            .await
    }

    #[tokio::test]
    async fn one_record_goes_through_send_sms_with_every_field() {
        let vendor = server(|p| match p.get("Action").map(String::as_str) {
            Some("SendSms") => ok(json!({"BizId": "900619746936498440^0"})),
            _ => refusal(400, "InvalidAction.NotFound", "no such action"),
        })
        .await;
        let results = send_all(
            &vendor.url,
            &[sms("+8613812345678", code("SMS_153055065", "1234"))],
        )
        .await;
        let outcome = results[0].as_ref().unwrap();
        assert_eq!(outcome.vendor, "aliyun");
        assert_eq!(
            outcome.vendor_message_id.as_deref(),
            Some("900619746936498440^0")
        );

        let seen = vendor.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header("accept"), "application/json");
        assert_eq!(seen[0].query, "");
        let p = params_of(&seen[0]);
        assert_eq!(p["Action"], "SendSms");
        assert_eq!(p["AccessKeyId"], KEY_ID);
        let own = own_params(&seen[0]);
        assert_eq!(
            own.keys().map(String::as_str).collect::<Vec<_>>(),
            ["PhoneNumbers", "SignName", "TemplateCode", "TemplateParam"]
        );
        assert_eq!(own["PhoneNumbers"], "13812345678");
        assert_eq!(own["SignName"], SIGN);
        assert_eq!(own["TemplateCode"], "SMS_153055065");
        let params: Value = serde_json::from_str(&own["TemplateParam"]).unwrap();
        assert_eq!(params, json!({"code": "1234"}));
    }

    #[tokio::test]
    async fn international_numbers_lose_the_plus_and_empty_params_are_left_out() {
        let vendor = server(|_| ok(json!({"BizId": "1^0"}))).await;
        let results = send_all(
            &vendor.url,
            &[sms("+85291234567", json!({"template_code": "SMS_1"}))],
        )
        .await;
        assert!(results[0].is_ok(), "{results:?}");
        let own = own_params(&vendor.requests()[0]);
        assert_eq!(own["PhoneNumbers"], "85291234567");
        assert!(!own.contains_key("TemplateParam"), "{own:?}");
    }

    #[tokio::test]
    async fn records_sharing_a_template_go_through_send_batch_sms() {
        let vendor = server(|p| match p.get("Action").map(String::as_str) {
            Some("SendBatchSms") => ok(json!({"BizId": format!("batch-{}", p["TemplateCode"])})),
            Some("SendSms") => ok(json!({
                "BizId": format!("single-{}-{}", p["PhoneNumbers"], p["TemplateCode"])
            })),
            _ => refusal(400, "InvalidAction.NotFound", "no such action"),
        })
        .await;
        let records = [
            sms("+8613800000001", code("SMS_A", "1111")),
            sms("+8613800000002", code("SMS_A", "2222")),
            sms("+8613800000003", code("SMS_B", "3333")),
            // The same number again: it must go in a request of its own.
            sms("+8613800000001", code("SMS_A", "4444")),
            sms("+85291234567", code("SMS_A", "5555")),
        ];
        let results = send_all(&vendor.url, &records).await;
        let ids: Vec<&str> = results
            .iter()
            .map(|r| r.as_ref().unwrap().vendor_message_id.as_deref().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "batch-SMS_A",
                "batch-SMS_A",
                "single-13800000003-SMS_B",
                "single-13800000001-SMS_A",
                "batch-SMS_A"
            ]
        );

        let seen = vendor.requests();
        assert_eq!(seen.len(), 3);
        let batch = seen
            .iter()
            .find(|c| params_of(c)["Action"] == "SendBatchSms")
            .unwrap();
        let own = own_params(batch);
        assert_eq!(
            own.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "PhoneNumberJson",
                "SignNameJson",
                "TemplateCode",
                "TemplateParamJson"
            ]
        );
        let json_of = |k: &str| serde_json::from_str::<Value>(&own[k]).unwrap();
        assert_eq!(
            json_of("PhoneNumberJson"),
            json!(["13800000001", "13800000002", "85291234567"])
        );
        assert_eq!(json_of("SignNameJson"), json!([SIGN, SIGN, SIGN]));
        assert_eq!(
            json_of("TemplateParamJson"),
            json!([{"code": "1111"}, {"code": "2222"}, {"code": "5555"}])
        );
        assert_eq!(own["TemplateCode"], "SMS_A");
    }

    #[tokio::test]
    async fn batches_hold_at_most_100_numbers() {
        let vendor = server(|p| {
            let n = p
                .get("PhoneNumberJson")
                .map(|j| serde_json::from_str::<Vec<String>>(j).unwrap().len())
                .unwrap_or(1);
            ok(json!({"BizId": format!("{}-{n}", p["Action"])}))
        })
        .await;
        let records: Vec<MessageRecord> = (0..101)
            .map(|i| sms(&format!("+86139{i:08}"), code("SMS_A", "1")))
            .collect();
        let results = send_all(&vendor.url, &records).await;
        let ids: Vec<String> = results
            .into_iter()
            .map(|r| r.unwrap().vendor_message_id.unwrap())
            .collect();
        assert!(
            ids[..100].iter().all(|id| id == "SendBatchSms-100"),
            "{ids:?}"
        );
        assert_eq!(ids[100], "SendSms-1");
        assert_eq!(vendor.requests().len(), 2);
    }

    #[tokio::test]
    async fn a_batch_refused_for_a_number_is_sent_again_record_by_record() {
        let vendor = server(|p| match p["Action"].as_str() {
            "SendBatchSms" => ok(json!({"Code": "isv.MOBILE_NUMBER_ILLEGAL",
                                        "Message": "非法手机号"})),
            "SendSms" if p["PhoneNumbers"] == "13800000002" => ok(json!({
                "Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": "非法手机号"
            })),
            _ => ok(json!({"BizId": format!("single-{}", p["PhoneNumbers"])})),
        })
        .await;
        let records = [
            sms("+8613800000001", code("SMS_A", "1")),
            sms("+8613800000002", code("SMS_A", "2")),
            sms("+8613800000003", code("SMS_A", "3")),
        ];
        let results = send_all(&vendor.url, &records).await;
        assert_eq!(
            results[0].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("single-13800000001")
        );
        let err = results[1].as_ref().unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "aliyun_isv_mobile_number_illegal");
        assert_eq!(err.detail(), "isv.MOBILE_NUMBER_ILLEGAL: 非法手机号");
        assert_eq!(
            results[2].as_ref().unwrap().vendor_message_id.as_deref(),
            Some("single-13800000003")
        );
        let actions: Vec<String> = vendor
            .requests()
            .iter()
            .map(|c| params_of(c)["Action"].clone())
            .collect();
        assert_eq!(actions.len(), 4);
        assert_eq!(actions[0], "SendBatchSms");
        assert!(actions[1..].iter().all(|a| a == "SendSms"), "{actions:?}");
    }

    #[tokio::test]
    async fn a_batch_refused_for_its_template_fails_every_record_once() {
        let vendor = server(|_| {
            ok(json!({"Code": "isv.SMS_TEMPLATE_ILLEGAL",
                      "Message": "模板不合法(不存在或被拉黑)"}))
        })
        .await;
        let records = [
            sms("+8613800000001", code("SMS_X", "1")),
            sms("+8613800000002", code("SMS_X", "2")),
        ];
        let results = send_all(&vendor.url, &records).await;
        for r in &results {
            let err = r.as_ref().unwrap_err();
            assert!(!err.is_retryable());
            assert_eq!(err.code(), "aliyun_isv_sms_template_illegal");
        }
        assert_eq!(vendor.requests().len(), 1);
    }

    #[tokio::test]
    async fn busy_and_rate_limit_answers_are_retryable() {
        let cases: [(Answer, &str, Option<u64>); 5] = [
            (
                refusal(
                    400,
                    "Throttling.User",
                    "Request was denied due to user flow control.",
                ),
                "aliyun_throttling_user",
                None,
            ),
            (
                refusal(
                    503,
                    "ServiceUnavailable",
                    "The request has failed due to a temporary failure of the server.",
                )
                .with_header("retry-after", "7"),
                "aliyun_service_unavailable",
                Some(7),
            ),
            (
                ok(json!({"Code": "isp.SYSTEM_ERROR", "Message": "系统错误"})),
                "aliyun_isp_system_error",
                None,
            ),
            (
                ok(
                    json!({"Code": "isv.BUSINESS_LIMIT_CONTROL", "Message": "触发分钟级流控Permits:1"}),
                ),
                "aliyun_isv_business_limit_control",
                None,
            ),
            (Answer::status(502, "Bad Gateway"), "aliyun_5xx", None),
        ];
        for (answer, code, after) in cases {
            let answer = std::sync::Arc::new(answer);
            let shared = std::sync::Arc::clone(&answer);
            let vendor = server(move |_| Answer {
                status: shared.status,
                headers: shared.headers.clone(),
                body: shared.body.clone(),
            })
            .await;
            let results = send_all(&vendor.url, &[sms("+8613800000001", code_entry())]).await;
            let err = results[0].as_ref().unwrap_err();
            assert_eq!(err.code(), code, "{err:?}");
            let SendError::Retryable { retry_after, .. } = err else {
                panic!("{err:?}")
            };
            assert_eq!(*retry_after, after.map(Duration::from_secs));
        }

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let results = send_all(
            &format!("http://127.0.0.1:{port}"),
            &[sms("+8613800000001", code_entry())],
        )
        .await;
        let err = results[0].as_ref().unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "aliyun_connect");
    }

    fn code_entry() -> Value {
        code("SMS_A", "1234")
    }

    #[tokio::test]
    async fn credential_number_and_template_errors_are_permanent() {
        let vendor = server(|p| match p["PhoneNumbers"].as_str() {
            "13800000001" => {
                ok(json!({"Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": "非法手机号"}))
            }
            "13800000002" => {
                ok(json!({"Code": "isv.AMOUNT_NOT_ENOUGH", "Message": "账户余额不足"}))
            }
            _ => ok(json!({"BizId": "1^0"})),
        })
        .await;
        let results = send_all(&vendor.url, &[sms("+8613800000001", code("SMS_A", "1"))]).await;
        assert_eq!(
            results[0].as_ref().unwrap_err(),
            &SendError::Permanent {
                code: "aliyun_isv_mobile_number_illegal".into(),
                detail: "isv.MOBILE_NUMBER_ILLEGAL: 非法手机号".into()
            }
        );
        let results = send_all(&vendor.url, &[sms("+8613800000002", code("SMS_A", "1"))]).await;
        assert_eq!(
            results[0].as_ref().unwrap_err().code(),
            "aliyun_isv_amount_not_enough"
        );

        // A secret the vendor does not know: the signature does not match.
        let mut wrong = config(&vendor.url);
        wrong["access_key_secret"] = json!("not-the-secret");
        let refs = [&sms("+8613800000003", code_entry())];
        let results = AliyunSms::new(http::client())
            .send(&AliyunAccount::parse(&wrong).unwrap(), &refs)
            .await;
        let err = results[0].as_ref().unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "aliyun_signature_does_not_match");
        assert!(!err.detail().contains("not-the-secret"), "{err}");

        // An unknown AccessKey id.
        let mut unknown = config(&vendor.url);
        unknown["access_key_id"] = json!("LTAI-unknown");
        let results = AliyunSms::new(http::client())
            .send(&AliyunAccount::parse(&unknown).unwrap(), &refs)
            .await;
        let err = results[0].as_ref().unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), "aliyun_invalid_access_key_id_not_found");

        // A 2xx that is not an Alibaba Cloud answer.
        let odd = VendorServer::start(|_| Answer::status(200, "<html>portal</html>")).await;
        let results = send_all(&odd.url, &[sms("+8613800000003", code_entry())]).await;
        assert_eq!(
            results[0].as_ref().unwrap_err().code(),
            "aliyun_bad_response"
        );
    }

    #[tokio::test]
    async fn bad_content_and_receivers_fail_without_a_request() {
        let vendor = server(|_| ok(json!({"BizId": "1^0"}))).await;
        let no_entry = testkit::record(
            Channel::Sms,
            "+8613800000001",
            json!({"text": "hi", "tencent": {"template_id": "1", "params": []}}),
        );
        let records = [
            no_entry,
            sms(
                "+8613800000001",
                json!({"template_code": "SMS_A", "params": {"n": 5}}),
            ),
            sms("13800000001", code_entry()),
            sms(
                "+8613800000001",
                json!({"template_code": "SMS_A", "extra": 1}),
            ),
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
                "bad_receiver",
                "bad_content"
            ]
        );
        assert!(vendor.requests().is_empty());
    }

    #[test]
    fn content_entries_are_checked() {
        assert!(check_content(&json!({"template_code": "SMS_1", "params": {"code": "1"}})).is_ok());
        assert!(check_content(&json!({"template_code": "SMS_1"})).is_ok());
        let bad = [
            json!({"params": {"code": "1"}}),
            json!({"template_code": " "}),
            json!({"template_code": "SMS_1", "params": {"code": 1}}),
            json!({"template_code": "SMS_1", "params": ["1"]}),
            json!({"template_code": "SMS_1", "other": true}),
            json!("SMS_1"),
        ];
        for entry in bad {
            assert!(check_content(&entry).is_err(), "{entry}");
        }
        let err = check_content(&json!({"template_code": "SMS_1", "params": {"code": 1}}));
        assert_eq!(
            err.unwrap_err(),
            "`params.code` must be a string (Alibaba Cloud takes only string values)"
        );
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let base = json!({"access_key_id": KEY_ID, "access_key_secret": "hunter2",
                          "sign_name": SIGN});
        let a = AliyunAccount::parse(&base).unwrap();
        assert_eq!(a.endpoint.as_str(), "https://dysmsapi.aliyuncs.com/");
        assert_eq!(a.sign_name, SIGN);
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );

        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            c
        };
        let singapore = AliyunAccount::parse(&with("region", json!("ap-southeast-1"))).unwrap();
        assert_eq!(
            singapore.endpoint.as_str(),
            "https://dysmsapi.ap-southeast-1.aliyuncs.com/"
        );
        let shenzhen = AliyunAccount::parse(&with("region", json!("cn-shenzhen"))).unwrap();
        assert_eq!(shenzhen.endpoint.as_str(), "https://dysmsapi.aliyuncs.com/");
        let local = AliyunAccount::parse(&with("base_url", json!("http://127.0.0.1:9"))).unwrap();
        assert_eq!(local.endpoint.as_str(), "http://127.0.0.1:9/");

        let mut without_secret = base.clone();
        without_secret
            .as_object_mut()
            .unwrap()
            .remove("access_key_secret");
        let bad = [
            with("access_key_secret", json!(1234)),
            with("access_key_secret", json!("")),
            with("access_key_id", json!("")),
            with("sign_name", json!(" ")),
            with("region", json!("mars-1")),
            with("base_url", json!("ftp://h.example.com")),
            with("base_url", json!("not a url")),
            with("extra", json!(1)),
            without_secret,
            json!("hunter2"),
        ];
        for config in bad {
            let err = AliyunAccount::parse(&config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("1234"),
                "{config}: {err}"
            );
        }
        assert_eq!(
            AliyunAccount::parse(&with("access_key_secret", json!(1234))).unwrap_err(),
            "`access_key_secret` must be a string"
        );
    }

    #[tokio::test]
    async fn the_sms_channel_routes_aliyun_accounts_here() {
        let vendor = server(|_| ok(json!({"BizId": "77^0"}))).await;
        let mut account = config(&vendor.url);
        account["vendor"] = json!("aliyun");
        let record = sms("+8613800000001", code_entry());
        let outcome = SmsSender::new(http::client())
            .send(&record, 1, &account)
            .await
            .unwrap();
        assert_eq!(outcome.vendor, "aliyun");
        assert_eq!(outcome.vendor_message_id.as_deref(), Some("77^0"));
        // 【阿里云短信测试】Your code is 1234. — UCS-2, one part.
        assert_eq!(outcome.billing_units, Some(1));
    }

    fn pending(biz_id: &str, receiver: &str, sent_at: &str) -> PendingReceipt {
        PendingReceipt {
            vendor_message_id: biz_id.into(),
            receiver: receiver.into(),
            sent_at: DateTime::parse_from_rfc3339(sent_at)
                .unwrap()
                .timestamp_millis(),
        }
    }

    #[tokio::test]
    async fn receipts_are_pulled_with_query_send_details() {
        let vendor = server(|p| {
            if p["Action"] != "QuerySendDetails" {
                return refusal(400, "InvalidAction.NotFound", "no such action");
            }
            let dto = |status: u8, err: &str| {
                json!({"SmsSendDetailDTOs": {"SmsSendDetailDTO": [{
                    "ErrCode": err, "TemplateCode": "SMS_A", "OutId": "",
                    "ReceiveDate": "2024-03-02 04:00:05", "SendDate": "2024-03-02 04:00:01",
                    "PhoneNum": p["PhoneNumber"], "Content": "【阿里云短信测试】…",
                    "SendStatus": status}]}, "TotalCount": 1})
            };
            match p["BizId"].as_str() {
                "B1" => ok(dto(3, "DELIVERED")),
                "B2" => ok(dto(2, "MK:0001")),
                "B3" => ok(dto(1, "")),
                "B5" => ok(json!({"Code": "isv.MOBILE_NUMBER_ILLEGAL", "Message": "非法手机号"})),
                _ => ok(json!({"SmsSendDetailDTOs": {"SmsSendDetailDTO": []}, "TotalCount": 0})),
            }
        })
        .await;
        let pending = [
            // 20:00 UTC is already the next day in Beijing.
            pending("B1", "+8613800000001", "2024-03-01T20:00:00Z"),
            pending("B2", "+8613800000002", "2024-03-01T10:00:00Z"),
            pending("B3", "+8613800000003", "2024-03-01T10:00:00Z"),
            pending("B4", "+85291234567", "2024-03-01T10:00:00Z"),
            pending("B5", "+8613800000005", "2024-03-01T10:00:00Z"),
        ];
        let receipts = AliyunSms::new(http::client())
            .pull_receipts(&account(&vendor.url), &pending)
            .await
            .unwrap();
        let at = DateTime::parse_from_rfc3339("2024-03-01T20:00:05Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            receipts,
            [
                Receipt {
                    vendor: "aliyun".into(),
                    vendor_message_id: "B1".into(),
                    receiver: Some("+8613800000001".into()),
                    delivered: true,
                    error_code: None,
                    error_detail: None,
                    at,
                },
                Receipt {
                    vendor: "aliyun".into(),
                    vendor_message_id: "B2".into(),
                    receiver: Some("+8613800000002".into()),
                    delivered: false,
                    error_code: Some("MK:0001".into()),
                    error_detail: None,
                    at,
                },
            ]
        );

        let seen = vendor.requests();
        assert_eq!(seen.len(), 5);
        let mut queries: Vec<BTreeMap<String, String>> = seen.iter().map(own_params).collect();
        queries.sort_by(|a, b| a["BizId"].cmp(&b["BizId"]));
        assert_eq!(
            queries[0],
            BTreeMap::from([
                ("BizId".to_string(), "B1".to_string()),
                ("CurrentPage".to_string(), "1".to_string()),
                ("PageSize".to_string(), "10".to_string()),
                ("PhoneNumber".to_string(), "13800000001".to_string()),
                ("SendDate".to_string(), "20240302".to_string()),
            ])
        );
        assert_eq!(queries[1]["SendDate"], "20240301");
        assert_eq!(queries[3]["PhoneNumber"], "85291234567");
    }

    #[tokio::test]
    async fn a_refused_account_fails_the_pull() {
        let vendor = server(|_| ok(json!({}))).await;
        let mut unknown = config(&vendor.url);
        unknown["access_key_id"] = json!("LTAI-unknown");
        let err = AliyunSms::new(http::client())
            .pull_receipts(
                &AliyunAccount::parse(&unknown).unwrap(),
                &[pending("B1", "+8613800000001", "2024-03-01T10:00:00Z")],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "aliyun_invalid_access_key_id_not_found");
    }

    #[test]
    fn pushed_reports_become_receipts() {
        let body = json!([
            {"phone_number": "13812345678", "send_time": "2017-01-01 00:00:00",
             "report_time": "2017-01-01 00:00:05", "success": true, "err_code": "DELIVERED",
             "err_msg": "用户接收成功", "sms_size": "1", "biz_id": "12345^0", "out_id": "67890"},
            {"phone_number": "85291234567", "send_time": "2017-01-01 00:00:00",
             "report_time": "2017-01-01 00:01:00", "success": false, "err_code": "MK:0001",
             "err_msg": "用户不在服务区", "sms_size": "2", "biz_id": "12345^0", "out_id": ""}
        ])
        .to_string();
        let push = crate::channels::parse_receipt_push("aliyun", body.as_bytes()).unwrap();
        let time = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(
            push.receipts,
            [
                Receipt {
                    vendor: "aliyun".into(),
                    vendor_message_id: "12345^0".into(),
                    receiver: Some("+8613812345678".into()),
                    delivered: true,
                    error_code: None,
                    error_detail: None,
                    at: time("2016-12-31T16:00:05Z"),
                },
                Receipt {
                    vendor: "aliyun".into(),
                    vendor_message_id: "12345^0".into(),
                    receiver: Some("+85291234567".into()),
                    delivered: false,
                    error_code: Some("MK:0001".into()),
                    error_detail: Some("用户不在服务区".into()),
                    at: time("2016-12-31T16:01:00Z"),
                },
            ]
        );
        assert_eq!(push.ack.0, "application/json");
        let ack: Value = serde_json::from_str(push.ack.1).unwrap();
        assert_eq!(ack["code"], 0);

        assert!(parse_receipt_push(b"{}").is_err());
        assert!(
            parse_receipt_push(b"[{\"phone_number\": \"13812345678\", \"success\": true}]")
                .is_err()
        );
        assert!(
            parse_receipt_push(
                b"[{\"phone_number\": \"abc\", \"success\": true, \"biz_id\": \"1\"}]"
            )
            .is_err()
        );
        assert_eq!(parse_receipt_push(b"[]").unwrap(), []);
    }
}

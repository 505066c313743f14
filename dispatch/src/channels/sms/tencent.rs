//! Tencent Cloud SMS through TencentCloud API 3.0 (`sms.tencentcloudapi.com`, version
//! `2021-01-11`): `SendSms` to send, `PullSmsSendStatus` to pull delivery receipts, and the
//! status-report callback for pushed receipts.
//!
//! # Account
//!
//! ```json
//! {"vendor": "tencent", "secret_id": "AKID…", "secret_key": "…", "sdk_app_id": "1400006666",
//!  "sign_name": "腾讯云", "region": "ap-guangzhou"}
//! ```
//!
//! - `secret_id`, `secret_key`: a TencentCloud API key pair (CAM); the key only ever signs.
//! - `sdk_app_id`: the SMS application's `SmsSdkAppId` (digits, from the SMS console).
//! - `sign_name`: the approved SMS signature (`SignName`), shown as `【sign_name】` before the text.
//! - `region` (default `ap-guangzhou`): the `X-TC-Region` of every request.
//! - `base_url` (optional): an origin (`https://host[:port]`, no path) replacing
//!   `https://sms.tencentcloudapi.com`, e.g. `https://sms.intl.tencentcloudapi.com` or a test
//!   server.
//!
//! # Content
//!
//! The SMS template's `tencent` entry: `{"template_id": "1110", "params": ["{$code}", "5"]}` —
//! the approved Tencent template (`TemplateId`) and its parameters in template order
//! (`TemplateParamSet`, strings; `params` may be left out when the template has none).
//!
//! # Requests
//!
//! Every call is `POST /` with a JSON body, `Content-Type: application/json; charset=utf-8` and
//! the headers `X-TC-Action`, `X-TC-Version: 2021-01-11`, `X-TC-Timestamp`, `X-TC-Region` and
//! `Authorization`, signed with TC3-HMAC-SHA256 ([`authorization`]) over `content-type`, `host`
//! and `x-tc-action`.
//!
//! `SendSms` takes up to 200 numbers for one template and parameter list, and never mixes
//! Chinese mainland (`+86`) with other numbers: records with the same `template_id` and `params`
//! share a request per side, in chunks of at most 200 distinct numbers (a number twice in one
//! batch goes into another request, since statuses come back keyed by number). Each number's
//! `SendStatusSet` entry is that record's result: `Code` `Ok` is success, with `SerialNo` as the
//! vendor message id (receipts carry it); any other code is that receiver's error.
//!
//! # Errors
//!
//! A request-level `Response.Error` is the result of every record of the request; a per-number
//! `Code` is that record's. Codes become `tencent_<snake_case code>`
//! (`LimitExceeded.PhoneNumberDailyLimit` → `tencent_limit_exceeded_phone_number_daily_limit`),
//! with the vendor's code, message and `RequestId` as the detail. Retryable:
//! `RequestLimitExceeded` (and its sub-codes), `ServiceUnavailable`, `InternalError` and the
//! internal errors Tencent documents as transient (`InternalError.Timeout`, `.SendAndRecvFail`,
//! `.OtherError`, `.UnknownError`). Everything else is permanent: credentials and signatures
//! (`AuthFailure.*`, including an expired signature, which means a wrong clock), bad numbers,
//! unapproved signs or templates, blocklisted numbers, and the per-number and daily frequency
//! limits (`LimitExceeded.*`: sending the same message again soon would hit them again). HTTP
//! failures map as in [`http`]; a `200` whose body is not the
//! documented envelope is the retryable `tencent_bad_response`, and a number missing from
//! `SendStatusSet` the permanent `tencent_no_status`.
//!
//! # Receipts
//!
//! [`TencentSms::pull_receipts`] calls `PullSmsSendStatus` (`Limit` 100) for the account's
//! `SmsSdkAppId`. Tencent hands out each status once, whatever is queued, so the `pending` list
//! is not sent; full pages are followed by another pull (up to 10), and an error after the first
//! page keeps the receipts already taken rather than losing them. [`parse_receipt_push`] reads
//! the status callback (`POST /v1/receipts/tencent`), answered with [`RECEIPT_ACK`].
//!
//! # Documentation used
//!
//! - Signature v3 (worked example): https://cloud.tencent.com/document/api/213/30654
//! - SendSms: https://www.tencentcloud.com/document/api/382/40536
//! - PullSmsSendStatus: https://www.tencentcloud.com/document/api/382/40519
//! - Status-report callback: https://www.tencentcloud.com/document/api/382/43547
//! - Error codes (common and SMS): https://cloud.tencent.com/document/api/382/38780
//! - Send and receipt status codes: https://cloud.tencent.com/document/api/382/59177
//! - Responses (the `Error` envelope): https://www.tencentcloud.com/document/product/597/35338

use crate::channels::http::BATCH_REQUEST_CONCURRENCY;
use crate::channels::http::{self, bad_content};
use crate::channels::sms::vendor_entry;
use crate::channels::{SendError, SendOutcome};
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use futures::stream::{self, StreamExt};
use herald_core::config::Secret;
use herald_core::store::PendingReceipt;
use herald_core::{MessageRecord, Receipt};
use hmac::{Hmac, Mac};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use reqwest::{Client, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

/// The vendor name on delivery events and receipts.
const VENDOR: &str = "tencent";
/// The API origin.
const DEFAULT_BASE_URL: &str = "https://sms.tencentcloudapi.com";
/// The product name in the credential scope.
const SERVICE: &str = "sms";
/// The API version of every action used here.
const API_VERSION: &str = "2021-01-11";
/// The region when the account names none.
const DEFAULT_REGION: &str = "ap-guangzhou";
/// The body's content type, exactly as signed.
const CONTENT_TYPE_JSON: &str = "application/json; charset=utf-8";
/// The signature algorithm.
const ALGORITHM: &str = "TC3-HMAC-SHA256";
/// Most numbers in one `SendSms` request.
const MAX_NUMBERS: usize = 200;
/// Most statuses one `PullSmsSendStatus` returns.
const PULL_LIMIT: usize = 100;
/// Most `PullSmsSendStatus` calls in one [`TencentSms::pull_receipts`].
const MAX_PULLS: usize = 10;
/// Tencent's callback times are China Standard Time (UTC+8).
const CST_OFFSET_HOURS: i64 = 8;

/// What Tencent expects in answer to a status callback: `{"result": 0, "errmsg": "OK"}`.
pub const RECEIPT_ACK: (&str, &str) = ("application/json", r#"{"result":0,"errmsg":"OK"}"#);

/// The TC3-HMAC-SHA256 `Authorization` header value of a `POST /` (empty query) with body
/// `payload`, signing `headers` (name, value pairs; `content-type` and `host` are required by
/// Tencent) at unix time `timestamp`, for the product `service` (`sms`).
///
/// Header names and values are lowercased and trimmed, sorted by name; the credential scope is
/// `<UTC date of timestamp>/<service>/tc3_request`; the key is derived as
/// `HMAC(HMAC(HMAC("TC3" + secret_key, date), service), "tc3_request")`.
pub fn authorization(
    secret_id: &str,
    secret_key: &str,
    service: &str,
    timestamp: i64,
    headers: &[(&str, &str)],
    payload: &[u8],
) -> String {
    let (canonical, signed_headers) = canonical_request(headers, payload);
    let date = DateTime::from_timestamp(timestamp, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string();
    let scope = format!("{date}/{service}/tc3_request");
    let string_to_sign = format!(
        "{ALGORITHM}\n{timestamp}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let key = hmac_sha256(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let key = hmac_sha256(&key, service.as_bytes());
    let key = hmac_sha256(&key, b"tc3_request");
    let signature = hex::encode(hmac_sha256(&key, string_to_sign.as_bytes()));
    format!(
        "{ALGORITHM} Credential={secret_id}/{scope}, SignedHeaders={signed_headers}, \
         Signature={signature}"
    )
}

/// The canonical request of a `POST /` and its `SignedHeaders` list.
fn canonical_request(headers: &[(&str, &str)], payload: &[u8]) -> (String, String) {
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_lowercase()))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical = format!(
        "POST\n/\n\n{canonical_headers}\n{signed_headers}\n{}",
        hex::encode(Sha256::digest(payload))
    );
    (canonical, signed_headers)
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// A Tencent SMS account, parsed from its stored config (see the module docs).
#[derive(Debug, Clone)]
pub struct TencentAccount {
    /// The API key's id (`Credential=` in the signature).
    pub secret_id: String,
    /// The API key's secret, which signs requests.
    pub secret_key: Secret,
    /// The SMS application (`SmsSdkAppId`).
    pub sdk_app_id: String,
    /// The approved signature (`SignName`).
    pub sign_name: String,
    /// `X-TC-Region`.
    pub region: String,
    /// Where requests go: the API origin or `base_url`.
    pub endpoint: Url,
}

/// The config as stored; [`TencentAccount::parse`] checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAccount {
    secret_id: String,
    secret_key: Secret,
    sdk_app_id: String,
    sign_name: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
}

impl TencentAccount {
    /// Parses and checks an account's config (without its `vendor` field); the error says what
    /// is wrong and never quotes the secret key.
    pub fn parse(config: &Value) -> Result<Self, String> {
        // serde quotes an ill-typed value in its error: check the secret's type first.
        if config.get("secret_key").is_some_and(|s| !s.is_string()) {
            return Err("`secret_key` must be a string".into());
        }
        let stored: StoredAccount =
            serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        if stored.secret_id.trim().is_empty() {
            return Err("`secret_id` is empty".into());
        }
        if stored.secret_key.expose().is_empty() {
            return Err("`secret_key` is empty".into());
        }
        if stored.sdk_app_id.is_empty() || !stored.sdk_app_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err("`sdk_app_id` must be the SMS application's SdkAppId (digits)".into());
        }
        if stored.sign_name.trim().is_empty() {
            return Err("`sign_name` is empty".into());
        }
        let region = stored.region.unwrap_or_else(|| DEFAULT_REGION.into());
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("`region` must be a region name such as ap-guangzhou".into());
        }
        let endpoint = match stored.base_url {
            None => Url::parse(DEFAULT_BASE_URL).map_err(|e| e.to_string())?,
            Some(base) => {
                let url = Url::parse(&base).map_err(|e| format!("`base_url`: {e}"))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err("`base_url` must be http or https".into());
                }
                if url.host().is_none() {
                    return Err("`base_url` has no host".into());
                }
                if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
                    return Err("`base_url` must be an origin, without path or query".into());
                }
                url
            }
        };
        Ok(TencentAccount {
            secret_id: stored.secret_id,
            secret_key: stored.secret_key,
            sdk_app_id: stored.sdk_app_id,
            sign_name: stored.sign_name,
            region,
            endpoint,
        })
    }

    /// The `Host` header value, as sent and signed: the host, and the port when not the default.
    fn host(&self) -> String {
        let host = self.endpoint.host_str().unwrap_or_default();
        match self.endpoint.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }
}

/// The template content's `tencent` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
struct TencentContent {
    template_id: String,
    #[serde(default)]
    params: Vec<String>,
}

impl TencentContent {
    fn parse(entry: &Value) -> Result<Self, String> {
        if !entry.is_object() {
            return Err("must be a JSON object {\"template_id\", \"params\"}".into());
        }
        if entry.get("template_id").is_some_and(|t| !t.is_string()) {
            return Err("`template_id` must be a string".into());
        }
        if entry
            .get("params")
            .is_some_and(|p| !p.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
        {
            return Err("`params` must be an array of strings".into());
        }
        let content: TencentContent =
            serde_json::from_value(entry.clone()).map_err(|e| e.to_string())?;
        if content.template_id.trim().is_empty() {
            return Err("`template_id` is empty".into());
        }
        Ok(content)
    }
}

/// Checks the template content's `tencent` entry (see the module docs).
pub fn check_content(entry: &Value) -> Result<(), String> {
    TencentContent::parse(entry).map(drop)
}

/// Whether `number` is E.164: `+`, then 2 to 15 digits not starting with 0.
fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (2..=15).contains(&digits.len())
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The status callback's entries (unknown fields are ignored: Tencent may add some).
#[derive(Deserialize)]
struct PushedStatus {
    #[serde(default)]
    user_receive_time: Option<String>,
    nationcode: String,
    mobile: String,
    report_status: String,
    #[serde(default)]
    errmsg: Option<String>,
    #[serde(default)]
    description: Option<String>,
    sid: String,
}

/// Parses a status callback body: a JSON array of
/// `{"user_receive_time": "2015-10-17 08:03:04", "nationcode": "86", "mobile": "13…",
/// "report_status": "SUCCESS" | "FAIL", "errmsg": "DELIVRD", "description": "…", "sid": "…"}`.
/// `sid` is the `SerialNo` returned by `SendSms`; the receiver is `+<nationcode><mobile>`; a
/// failure carries `errmsg` (the receipt status code) as its code and `description` as its
/// detail. The time is read as China Standard Time; a missing or unreadable time is now.
pub fn parse_receipt_push(body: &[u8]) -> Result<Vec<Receipt>, String> {
    let statuses: Vec<PushedStatus> = serde_json::from_slice(body)
        .map_err(|e| format!("not a Tencent status callback (a JSON array of statuses): {e}"))?;
    statuses
        .into_iter()
        .map(|s| {
            if s.sid.is_empty() {
                return Err("a status has an empty `sid`".to_string());
            }
            let cc = s.nationcode.trim().trim_start_matches('+');
            let mobile = s.mobile.trim();
            let receiver = if mobile.starts_with('+') {
                mobile.to_string()
            } else {
                format!("+{cc}{mobile}")
            };
            if !is_e164(&receiver) {
                return Err(format!(
                    "status {}: `{receiver}` is not a phone number",
                    s.sid
                ));
            }
            let delivered =
                report_delivered(&s.report_status).map_err(|e| format!("status {}: {e}", s.sid))?;
            let at = s
                .user_receive_time
                .as_deref()
                .and_then(|t| NaiveDateTime::parse_from_str(t.trim(), "%Y-%m-%d %H:%M:%S").ok())
                .map(|t| (t - TimeDelta::hours(CST_OFFSET_HOURS)).and_utc())
                .unwrap_or_else(Utc::now);
            let (error_code, error_detail) = if delivered {
                (None, None)
            } else {
                (
                    Some(
                        s.errmsg
                            .filter(|e| !e.is_empty())
                            .unwrap_or(s.report_status),
                    ),
                    s.description.filter(|d| !d.is_empty()),
                )
            };
            Ok(Receipt {
                vendor: VENDOR.into(),
                vendor_message_id: s.sid,
                receiver: Some(receiver),
                delivered,
                error_code,
                error_detail,
                at,
            })
        })
        .collect()
}

/// `SUCCESS` is delivered, `FAIL` is not; anything else is not a documented status.
fn report_delivered(status: &str) -> Result<bool, String> {
    match status {
        "SUCCESS" => Ok(true),
        "FAIL" => Ok(false),
        other => Err(format!("unknown report_status `{other}` (SUCCESS or FAIL)")),
    }
}

/// `SendSms`'s answer.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SendSmsAnswer {
    #[serde(default)]
    send_status_set: Vec<SendStatus>,
}

/// One number's result in `SendStatusSet`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SendStatus {
    #[serde(default)]
    serial_no: String,
    phone_number: String,
    code: String,
    #[serde(default)]
    message: String,
}

/// `PullSmsSendStatus`'s answer.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PullAnswer {
    #[serde(default)]
    pull_sms_send_status_set: Vec<PulledStatus>,
}

/// One delivery status in `PullSmsSendStatusSet`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PulledStatus {
    #[serde(default)]
    user_receive_time: Option<i64>,
    #[serde(default)]
    country_code: Option<String>,
    #[serde(default)]
    subscriber_number: Option<String>,
    #[serde(default)]
    phone_number: Option<String>,
    serial_no: String,
    report_status: String,
    #[serde(default)]
    description: Option<String>,
}

impl PulledStatus {
    /// The receipt, or `None` for an entry without a usable number or status.
    fn into_receipt(self) -> Option<Receipt> {
        let receiver = self.phone_number.filter(|p| is_e164(p)).or_else(|| {
            let cc = self.country_code?;
            let number = self.subscriber_number?;
            Some(format!("+{}{number}", cc.trim_start_matches('+'))).filter(|p| is_e164(p))
        })?;
        let delivered = report_delivered(&self.report_status).ok()?;
        let at = self
            .user_receive_time
            .filter(|t| *t > 0)
            .and_then(|t| DateTime::from_timestamp(t, 0))
            .unwrap_or_else(Utc::now);
        let (error_code, error_detail) = if delivered {
            (None, None)
        } else {
            (
                Some(self.report_status),
                self.description.filter(|d| !d.is_empty()),
            )
        };
        Some(Receipt {
            vendor: VENDOR.into(),
            vendor_message_id: self.serial_no,
            receiver: Some(receiver),
            delivered,
            error_code,
            error_detail,
            at,
        })
    }
}

/// `tencent_` and the snake_case of a Tencent error code (`LimitExceeded.PhoneNumberDailyLimit`
/// → `tencent_limit_exceeded_phone_number_daily_limit`, `RequestLimitExceeded.IPLimitExceeded`
/// → `tencent_request_limit_exceeded_ip_limit_exceeded`).
fn error_code(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::from("tencent_");
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            let boundary = prev.is_some_and(|p| {
                p.is_ascii_lowercase()
                    || p.is_ascii_digit()
                    || (p.is_ascii_uppercase() && next_lower)
            });
            if boundary {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// Whether Tencent documents `code` as transient (see the module docs).
fn is_transient(code: &str) -> bool {
    code == "RequestLimitExceeded"
        || code.starts_with("RequestLimitExceeded.")
        || matches!(
            code,
            "ServiceUnavailable"
                | "InternalError"
                | "InternalError.Timeout"
                | "InternalError.SendAndRecvFail"
                | "InternalError.OtherError"
                | "InternalError.UnknownError"
        )
}

/// The error for a Tencent error `code` (request-level or per number).
fn vendor_error(code: &str, message: &str, request_id: &str) -> SendError {
    let mut detail = if message.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {message}")
    };
    if !request_id.is_empty() {
        detail.push_str(&format!(" (RequestId {request_id})"));
    }
    let code_out = error_code(code);
    if is_transient(code) {
        SendError::Retryable {
            code: code_out,
            detail,
            retry_after: None,
        }
    } else {
        SendError::Permanent {
            code: code_out,
            detail,
        }
    }
}

/// A `200` whose body is not the documented envelope (retryable: usually a proxy's page).
fn bad_response(detail: String) -> SendError {
    SendError::Retryable {
        code: "tencent_bad_response".into(),
        detail,
        retry_after: None,
    }
}

/// Reads `{"Response": {...}}`: its `Error` as an error, else the response as `T`.
fn read_response<T: DeserializeOwned>(body: &[u8]) -> Result<T, SendError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad_response(format!(
            "the answer is not JSON ({e}){}",
            http::excerpt(body)
        ))
    })?;
    let response = value.get("Response").ok_or_else(|| {
        bad_response(format!(
            "the answer has no `Response`{}",
            http::excerpt(body)
        ))
    })?;
    let request_id = response
        .get("RequestId")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(error) = response.get("Error") {
        let code = error.get("Code").and_then(Value::as_str).ok_or_else(|| {
            bad_response(format!("an `Error` without `Code`{}", http::excerpt(body)))
        })?;
        let message = error.get("Message").and_then(Value::as_str).unwrap_or("");
        return Err(vendor_error(code, message, request_id));
    }
    T::deserialize(response)
        .map_err(|e| bad_response(format!("unexpected answer ({e}){}", http::excerpt(body))))
}

/// Records that share one `SendSms` request: indexes into the batch, and their numbers.
struct Chunk<'a> {
    content: &'a TencentContent,
    records: Vec<usize>,
    numbers: HashSet<&'a str>,
}

/// The Tencent SMS client.
pub struct TencentSms {
    client: Client,
}

impl TencentSms {
    /// A client over the shared HTTP pool.
    pub fn new(client: Client) -> Self {
        TencentSms { client }
    }

    /// Sends `records` (any number; they are grouped into `SendSms` requests as the module docs
    /// say), one result per record in order.
    pub async fn send(
        &self,
        account: &TencentAccount,
        records: &[&MessageRecord],
    ) -> Vec<Result<SendOutcome, SendError>> {
        let mut results: Vec<Option<Result<SendOutcome, SendError>>> =
            records.iter().map(|_| None).collect();
        let mut contents = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            match prepare(record) {
                Ok(content) => contents.push(Some(content)),
                Err(e) => {
                    contents.push(None);
                    results[i] = Some(Err(e));
                }
            }
        }

        // Group by content and mainland/other, then cut into chunks of distinct numbers.
        let mut groups: HashMap<(&TencentContent, bool), Vec<Chunk<'_>>> = HashMap::new();
        let mut order: Vec<(&TencentContent, bool)> = Vec::new();
        for (i, content) in contents.iter().enumerate() {
            let Some(content) = content else { continue };
            let number = records[i].receiver.as_str();
            let key = (content, number.starts_with("+86"));
            let chunks = groups.entry(key).or_insert_with(|| {
                order.push(key);
                Vec::new()
            });
            let open = chunks
                .iter_mut()
                .find(|c| c.records.len() < MAX_NUMBERS && !c.numbers.contains(number));
            match open {
                Some(chunk) => {
                    chunk.records.push(i);
                    chunk.numbers.insert(number);
                }
                None => chunks.push(Chunk {
                    content,
                    records: vec![i],
                    numbers: HashSet::from([number]),
                }),
            }
        }
        let chunks: Vec<Chunk<'_>> = order
            .iter()
            .filter_map(|key| groups.remove(key))
            .flatten()
            .collect();

        let calls: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let numbers: Vec<&str> = chunk
                    .records
                    .iter()
                    .map(|&i| records[i].receiver.as_str())
                    .collect();
                self.send_sms(account, chunk.content, numbers)
            })
            .collect();
        let answers: Vec<_> = stream::iter(calls)
            .buffered(BATCH_REQUEST_CONCURRENCY)
            .collect()
            .await;

        for (chunk, answer) in chunks.iter().zip(answers) {
            for &i in &chunk.records {
                let number = records[i].receiver.as_str();
                results[i] = Some(match &answer {
                    Err(e) => Err(e.clone()),
                    Ok((statuses, request_id)) => match statuses.get(number) {
                        None => Err(SendError::Permanent {
                            code: "tencent_no_status".into(),
                            detail: format!(
                                "SendStatusSet has no entry for {number} (RequestId {request_id})"
                            ),
                        }),
                        Some(s) if s.code == "Ok" => Ok(SendOutcome {
                            vendor: VENDOR.into(),
                            vendor_message_id: Some(s.serial_no.clone()).filter(|n| !n.is_empty()),
                            billing_units: None,
                        }),
                        Some(s) => Err(vendor_error(&s.code, &s.message, request_id)),
                    },
                });
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every record is prepared into a chunk or failed"))
            .collect()
    }

    /// One `SendSms` request: each number's status, and the request id.
    async fn send_sms(
        &self,
        account: &TencentAccount,
        content: &TencentContent,
        numbers: Vec<&str>,
    ) -> Result<(HashMap<String, SendStatus>, String), SendError> {
        let body = json!({
            "PhoneNumberSet": numbers,
            "SmsSdkAppId": account.sdk_app_id,
            "SignName": account.sign_name,
            "TemplateId": content.template_id,
            "TemplateParamSet": content.params,
        });
        let answer = self.call(account, "SendSms", &body).await?;
        let request_id = answer
            .get("RequestId")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let statuses: SendSmsAnswer = read_value(&answer)?;
        let statuses = statuses
            .send_status_set
            .into_iter()
            .map(|s| (s.phone_number.clone(), s))
            .collect();
        Ok((statuses, request_id))
    }

    /// Pulls the delivery statuses Tencent has queued for the account's application (see the
    /// module docs); `pending` is not needed, Tencent returns whatever is queued.
    pub async fn pull_receipts(
        &self,
        account: &TencentAccount,
        _pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        let body = json!({"Limit": PULL_LIMIT, "SmsSdkAppId": account.sdk_app_id});
        let mut receipts = Vec::new();
        for page in 0..MAX_PULLS {
            let answer = match self.call(account, "PullSmsSendStatus", &body).await {
                Ok(answer) => read_value::<PullAnswer>(&answer),
                Err(e) => Err(e),
            };
            let statuses = match answer {
                Ok(a) => a.pull_sms_send_status_set,
                // Statuses already pulled are not handed out again: keep them.
                Err(e) if page > 0 => {
                    tracing::warn!(error = %e, "tencent: a later PullSmsSendStatus page failed");
                    break;
                }
                Err(e) => return Err(e),
            };
            let full = statuses.len() >= PULL_LIMIT;
            for status in statuses {
                let serial_no = status.serial_no.clone();
                match status.into_receipt() {
                    Some(receipt) => receipts.push(receipt),
                    None => tracing::warn!(
                        serial_no,
                        "tencent: a pulled status without a phone number or known ReportStatus"
                    ),
                }
            }
            if !full {
                break;
            }
        }
        Ok(receipts)
    }

    /// Signs and posts `action` with `body`; returns the `Response` object of a non-error answer.
    async fn call(
        &self,
        account: &TencentAccount,
        action: &str,
        body: &Value,
    ) -> Result<Value, SendError> {
        let body = serde_json::to_vec(body).expect("a JSON value serialises");
        let timestamp = Utc::now().timestamp();
        let host = account.host();
        let authorization = authorization(
            &account.secret_id,
            account.secret_key.expose(),
            SERVICE,
            timestamp,
            &[
                ("content-type", CONTENT_TYPE_JSON),
                ("host", &host),
                ("x-tc-action", action),
            ],
            &body,
        );
        let request = self
            .client
            .post(account.endpoint.clone())
            .header(CONTENT_TYPE, CONTENT_TYPE_JSON)
            .header(HOST, host)
            .header("X-TC-Action", action)
            .header("X-TC-Version", API_VERSION)
            .header("X-TC-Timestamp", timestamp.to_string())
            .header("X-TC-Region", &account.region)
            .header(AUTHORIZATION, authorization)
            .body(body);
        let answer = http::send_for_body(VENDOR, request).await?;
        read_response::<Value>(&answer)
    }
}

/// Deserialises an already checked `Response` object.
fn read_value<T: DeserializeOwned>(response: &Value) -> Result<T, SendError> {
    T::deserialize(response).map_err(|e| bad_response(format!("unexpected answer: {e}")))
}

/// A record's `tencent` entry, after checking its receiver.
fn prepare(record: &MessageRecord) -> Result<TencentContent, SendError> {
    let entry = vendor_entry(record, VENDOR)?;
    let content =
        TencentContent::parse(entry).map_err(|e| bad_content(format!("`tencent`: {e}")))?;
    if !is_e164(&record.receiver) {
        return Err(SendError::Permanent {
            code: "bad_receiver".into(),
            detail: "an SMS receiver must be an E.164 number such as +8613812345678".into(),
        });
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::testkit::{Answer, Captured, VendorServer, record};
    use herald_core::Channel;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const SECRET_ID: &str = "AKIDtestid0000000000000000000000000";
    const SECRET_KEY: &str = "test-secret-key-0123456789abcdef";
    const APP_ID: &str = "1400006666";
    const SIGN: &str = "腾讯云";

    // The worked example of Tencent's signature v3 documentation (DescribeInstances on CVM).
    const DOC_SECRET_ID: &str = "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE";
    const DOC_SECRET_KEY: &str = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE";
    const DOC_PAYLOAD: &str =
        r#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;

    #[test]
    fn signature_matches_tencents_worked_example() {
        let headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Host", "cvm.tencentcloudapi.com"),
        ];
        let (canonical, signed) = canonical_request(&headers, DOC_PAYLOAD.as_bytes());
        assert_eq!(
            canonical,
            "POST\n/\n\ncontent-type:application/json; charset=utf-8\n\
             host:cvm.tencentcloudapi.com\n\ncontent-type;host\n\
             35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
        );
        assert_eq!(signed, "content-type;host");
        assert_eq!(
            hex::encode(Sha256::digest(canonical.as_bytes())),
            "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
        );
        assert_eq!(
            authorization(
                DOC_SECRET_ID,
                DOC_SECRET_KEY,
                "cvm",
                1551113065,
                &headers,
                DOC_PAYLOAD.as_bytes()
            ),
            "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/\
             tc3_request, SignedHeaders=content-type;host, \
             Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
        );
    }

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn mac(key: &[u8], data: &str) -> Vec<u8> {
        let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// The server's own TC3-HMAC-SHA256 check, written from the documentation (not with
    /// `authorization`): rebuilds the canonical request from what it received.
    fn verify_tc3(req: &Captured) -> Result<(), String> {
        let auth = req.header("authorization");
        let rest = auth
            .strip_prefix("TC3-HMAC-SHA256 ")
            .ok_or("not TC3-HMAC-SHA256")?;
        let mut parts = HashMap::new();
        for part in rest.split(", ") {
            let (k, v) = part.split_once('=').ok_or("malformed Authorization")?;
            parts.insert(k, v);
        }
        let credential = parts.get("Credential").ok_or("no Credential")?;
        let signed = *parts.get("SignedHeaders").ok_or("no SignedHeaders")?;
        let signature = parts.get("Signature").ok_or("no Signature")?;
        let (id, scope) = credential.split_once('/').ok_or("bad Credential")?;
        if id != SECRET_ID {
            return Err(format!("unknown SecretId {id}"));
        }
        let ts: i64 = req
            .header("x-tc-timestamp")
            .parse()
            .map_err(|_| "bad X-TC-Timestamp")?;
        if (Utc::now().timestamp() - ts).abs() > 300 {
            return Err("signature expired".into());
        }
        let date = DateTime::from_timestamp(ts, 0)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string();
        if *scope != format!("{date}/sms/tc3_request") {
            return Err(format!("bad credential scope {scope}"));
        }
        if signed != "content-type;host;x-tc-action" {
            return Err(format!("unexpected SignedHeaders {signed}"));
        }
        let mut canonical_headers = String::new();
        for name in signed.split(';') {
            let value = req.header(name).trim().to_lowercase();
            canonical_headers += &format!("{name}:{value}\n");
        }
        let canonical = format!(
            "{}\n{}\n{}\n{canonical_headers}\n{signed}\n{}",
            req.method,
            req.path,
            req.query,
            sha256_hex(&req.body)
        );
        let to_sign = format!(
            "TC3-HMAC-SHA256\n{ts}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let k = mac(format!("TC3{SECRET_KEY}").as_bytes(), &date);
        let k = mac(&k, "sms");
        let k = mac(&k, "tc3_request");
        if hex::encode(mac(&k, &to_sign)) != *signature {
            return Err("signature mismatch".into());
        }
        Ok(())
    }

    fn error_answer(code: &str, message: &str) -> Answer {
        Answer::json(json!({"Response": {
            "Error": {"Code": code, "Message": message},
            "RequestId": "ed93f3cb-f35e-473f-b9f3-0d451b8b79c6"
        }}))
    }

    /// Checks what Tencent checks of every request; `Err` is the answer to give instead.
    fn check_request(req: &Captured, action: &str) -> Result<Value, Answer> {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/");
        assert_eq!(req.query, "");
        assert_eq!(
            req.header("content-type"),
            "application/json; charset=utf-8"
        );
        assert_eq!(req.header("x-tc-action"), action);
        assert_eq!(req.header("x-tc-version"), "2021-01-11");
        assert_eq!(req.header("x-tc-region"), "ap-guangzhou");
        if let Err(why) = verify_tc3(req) {
            return Err(error_answer(
                "AuthFailure.SignatureFailure",
                &format!("The provided credentials could not be validated ({why})."),
            ));
        }
        Ok(req.json())
    }

    fn account(server: &VendorServer) -> TencentAccount {
        TencentAccount::parse(&json!({
            "secret_id": SECRET_ID, "secret_key": SECRET_KEY, "sdk_app_id": APP_ID,
            "sign_name": SIGN, "base_url": server.url,
        }))
        .unwrap()
    }

    fn sms(receiver: &str, template_id: &str, params: &[&str]) -> MessageRecord {
        record(
            Channel::Sms,
            receiver,
            json!({"text": "Your code is 4821",
                   "tencent": {"template_id": template_id, "params": params}}),
        )
    }

    /// Answers `SendSms` per number: `+8613800000002` has a bad format, `+8613800000004` hit its
    /// daily limit, the others are sent with serial `5000:<number>`.
    fn send_sms_server(req: &Captured) -> Answer {
        let body = match check_request(req, "SendSms") {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        let numbers: Vec<String> = body["PhoneNumberSet"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        let statuses: Vec<Value> = numbers
            .iter()
            .map(|n| {
                let iso = if n.starts_with("+86") { "CN" } else { "US" };
                match n.as_str() {
                    "+8613800000002" => json!({"SerialNo": "", "PhoneNumber": n, "Fee": 0,
                        "SessionContext": "", "Code": "InvalidParameterValue.IncorrectPhoneNumber",
                        "Message": "incorrect phone number", "IsoCode": iso}),
                    "+8613800000004" => json!({"SerialNo": "", "PhoneNumber": n, "Fee": 0,
                        "SessionContext": "", "Code": "LimitExceeded.PhoneNumberDailyLimit",
                        "Message": "the number exceeds its daily limit", "IsoCode": iso}),
                    _ => json!({"SerialNo": format!("5000:{}", &n[1..]), "PhoneNumber": n,
                        "Fee": 1, "SessionContext": "", "Code": "Ok",
                        "Message": "send success", "IsoCode": iso}),
                }
            })
            .collect();
        Answer::json(json!({"Response": {
            "SendStatusSet": statuses,
            "RequestId": "a0aabda6-cf91-4f3e-a81f-9198114a2279"
        }}))
    }

    fn request_with(requests: &[Captured], number: &str) -> Value {
        requests
            .iter()
            .map(Captured::json)
            .find(|b| {
                b["PhoneNumberSet"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n == number)
            })
            .unwrap_or_else(|| panic!("no request for {number}"))
    }

    #[tokio::test]
    async fn a_batch_is_grouped_and_each_number_gets_its_own_result() {
        let server = VendorServer::start(send_sms_server).await;
        let sender = TencentSms::new(http::client());
        let records = [
            sms("+8613800000001", "1110", &["4821", "5"]),
            sms("+8613800000002", "1110", &["4821", "5"]),
            sms("+8613800000003", "1110", &["4821", "5"]),
            sms("+8613800000004", "1110", &["9999", "5"]),
            sms("+14155550100", "1110", &["4821", "5"]),
            record(
                Channel::Sms,
                "+8613800000005",
                json!({"text": "t", "aliyun": {"template_code": "SMS_1", "params": {}}}),
            ),
            sms("13800000006", "1110", &["4821", "5"]),
        ];
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let results = sender.send(&account(&server), &refs).await;
        assert_eq!(results.len(), 7);

        let sent = |i: usize| results[i].as_ref().unwrap().clone();
        assert_eq!(
            sent(0),
            SendOutcome {
                vendor: "tencent".into(),
                vendor_message_id: Some("5000:8613800000001".into()),
                billing_units: None,
            }
        );
        assert_eq!(
            sent(2).vendor_message_id.as_deref(),
            Some("5000:8613800000003")
        );
        assert_eq!(
            sent(4).vendor_message_id.as_deref(),
            Some("5000:14155550100")
        );

        let err = results[1].as_ref().unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        assert_eq!(
            err.code(),
            "tencent_invalid_parameter_value_incorrect_phone_number"
        );
        assert!(
            err.detail().contains("incorrect phone number")
                && err
                    .detail()
                    .contains("a0aabda6-cf91-4f3e-a81f-9198114a2279"),
            "{err}"
        );
        let err = results[3].as_ref().unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        assert_eq!(
            err.code(),
            "tencent_limit_exceeded_phone_number_daily_limit"
        );
        assert_eq!(
            results[5].as_ref().unwrap_err().code(),
            "no_vendor_template"
        );
        assert_eq!(results[6].as_ref().unwrap_err().code(), "bad_receiver");

        // Same template and params on the mainland side share one request; other parameters
        // and non-mainland numbers get their own.
        let requests = server.requests();
        assert_eq!(requests.len(), 3);
        assert_eq!(
            request_with(&requests, "+8613800000001"),
            json!({
                "PhoneNumberSet": ["+8613800000001", "+8613800000002", "+8613800000003"],
                "SmsSdkAppId": APP_ID, "SignName": SIGN, "TemplateId": "1110",
                "TemplateParamSet": ["4821", "5"],
            })
        );
        assert_eq!(
            request_with(&requests, "+8613800000004"),
            json!({
                "PhoneNumberSet": ["+8613800000004"], "SmsSdkAppId": APP_ID, "SignName": SIGN,
                "TemplateId": "1110", "TemplateParamSet": ["9999", "5"],
            })
        );
        assert_eq!(
            request_with(&requests, "+14155550100"),
            json!({
                "PhoneNumberSet": ["+14155550100"], "SmsSdkAppId": APP_ID, "SignName": SIGN,
                "TemplateId": "1110", "TemplateParamSet": ["4821", "5"],
            })
        );
        let host = server.url.trim_start_matches("http://");
        assert!(requests.iter().all(|r| r.header("host") == host));
    }

    #[tokio::test]
    async fn requests_hold_at_most_200_distinct_numbers() {
        let server = VendorServer::start(send_sms_server).await;
        let sender = TencentSms::new(http::client());
        let mut records: Vec<MessageRecord> = (0..401)
            .map(|i| sms(&format!("+86139{i:08}"), "1110", &["1"]))
            .collect();
        // The first number again: it cannot share a request with itself.
        records.push(sms("+8613900000000", "1110", &["1"]));
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let results = sender.send(&account(&server), &refs).await;
        for (record, result) in records.iter().zip(&results) {
            let id = result.as_ref().unwrap().vendor_message_id.clone();
            assert_eq!(id, Some(format!("5000:{}", &record.receiver[1..])));
        }
        let requests = server.requests();
        let mut sizes: Vec<usize> = requests
            .iter()
            .map(|r| {
                let numbers = r.json()["PhoneNumberSet"].as_array().unwrap().clone();
                let distinct: HashSet<String> = numbers.iter().map(|n| n.to_string()).collect();
                assert_eq!(distinct.len(), numbers.len(), "a number twice in a request");
                numbers.len()
            })
            .collect();
        sizes.sort_unstable();
        assert_eq!(sizes, [2, 200, 200]);
    }

    #[tokio::test]
    async fn request_level_errors_apply_to_every_record_of_the_request() {
        let server = VendorServer::start(|req: &Captured| {
            let body = match check_request(req, "SendSms") {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            match body["TemplateId"].as_str().unwrap() {
                "1" => error_answer(
                    "RequestLimitExceeded",
                    "Your current request times exceeds the frequency limit.",
                ),
                "2" => error_answer("InternalError.Timeout", "Request timed out."),
                "3" => error_answer(
                    "FailedOperation.TemplateIncorrectOrUnapproved",
                    "template is not approved",
                ),
                _ => Answer::status(503, "busy").with_header("retry-after", "7"),
            }
        })
        .await;
        let sender = TencentSms::new(http::client());
        let records: Vec<MessageRecord> = ["1", "2", "3", "4"]
            .iter()
            .flat_map(|t| {
                [
                    sms("+8613800000001", t, &["1"]),
                    sms("+8613800000003", t, &["1"]),
                ]
            })
            .collect();
        let refs: Vec<&MessageRecord> = records.iter().collect();
        let results = sender.send(&account(&server), &refs).await;
        assert_eq!(server.requests().len(), 4);
        let errors: Vec<&SendError> = results.iter().map(|r| r.as_ref().unwrap_err()).collect();
        for pair in errors.chunks(2) {
            assert_eq!(pair[0], pair[1]);
        }
        assert_eq!(errors[0].code(), "tencent_request_limit_exceeded");
        assert!(errors[0].is_retryable());
        assert!(
            errors[0]
                .detail()
                .contains("RequestLimitExceeded: Your current request")
                && errors[0].detail().contains("ed93f3cb"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[2].code(), "tencent_internal_error_timeout");
        assert!(errors[2].is_retryable());
        assert_eq!(
            errors[4].code(),
            "tencent_failed_operation_template_incorrect_or_unapproved"
        );
        assert!(!errors[4].is_retryable());
        assert_eq!(errors[6].code(), "tencent_5xx");
        let SendError::Retryable { retry_after, .. } = errors[6] else {
            panic!("{:?}", errors[6])
        };
        assert_eq!(*retry_after, Some(Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn a_wrong_key_is_a_permanent_signature_failure() {
        let server = VendorServer::start(send_sms_server).await;
        let sender = TencentSms::new(http::client());
        let mut account = account(&server);
        account.secret_key = Secret::new("not-the-key");
        let r = sms("+8613800000001", "1110", &["1"]);
        let results = sender.send(&account, &[&r]).await;
        let err = results[0].as_ref().unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        assert_eq!(err.code(), "tencent_auth_failure_signature_failure");
        assert!(err.detail().contains("signature mismatch"), "{err}");
        assert!(!err.detail().contains("not-the-key"), "{err}");
    }

    #[tokio::test]
    async fn a_200_that_is_not_the_envelope_is_retryable() {
        let server =
            VendorServer::start(|_: &Captured| Answer::status(200, "<html>ok</html>")).await;
        let sender = TencentSms::new(http::client());
        let r = sms("+8613800000001", "1110", &["1"]);
        let results = sender.send(&account(&server), &[&r]).await;
        let err = results[0].as_ref().unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "tencent_bad_response");
    }

    fn pulled(serial: &str, number: &str, ok: bool) -> Value {
        json!({
            "UserReceiveTime": 1_700_000_000, "CountryCode": "86",
            "SubscriberNumber": &number[3..], "PhoneNumber": number, "SerialNo": serial,
            "ReportStatus": if ok { "SUCCESS" } else { "FAIL" },
            "Description": if ok { "DELIVRD" } else { "MK:0001 user's phone is switched off" },
            "SessionContext": ""
        })
    }

    #[tokio::test]
    async fn receipts_are_pulled_for_the_application() {
        let server = VendorServer::start(|req: &Captured| {
            let body = match check_request(req, "PullSmsSendStatus") {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            assert_eq!(body, json!({"Limit": 100, "SmsSdkAppId": APP_ID}));
            Answer::json(json!({"Response": {
                "PullSmsSendStatusSet": [
                    pulled("5000:1", "+8613800000001", true),
                    pulled("5000:2", "+8613800000002", false),
                ],
                "RequestId": "b5b41468-520d-4192-b42f-595cc34b6c1c"
            }}))
        })
        .await;
        let sender = TencentSms::new(http::client());
        let receipts = sender.pull_receipts(&account(&server), &[]).await.unwrap();
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            receipts,
            [
                Receipt {
                    vendor: "tencent".into(),
                    vendor_message_id: "5000:1".into(),
                    receiver: Some("+8613800000001".into()),
                    delivered: true,
                    error_code: None,
                    error_detail: None,
                    at,
                },
                Receipt {
                    vendor: "tencent".into(),
                    vendor_message_id: "5000:2".into(),
                    receiver: Some("+8613800000002".into()),
                    delivered: false,
                    error_code: Some("FAIL".into()),
                    error_detail: Some("MK:0001 user's phone is switched off".into()),
                    at,
                },
            ]
        );
        assert_eq!(server.requests().len(), 1);
    }

    #[tokio::test]
    async fn full_pages_are_followed_and_kept_when_a_later_page_fails() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let server = VendorServer::start(move |req: &Captured| {
            if let Err(answer) = check_request(req, "PullSmsSendStatus") {
                return answer;
            }
            match counter.fetch_add(1, Ordering::SeqCst) {
                0 => Answer::json(json!({"Response": {
                    "PullSmsSendStatusSet": (0..100)
                        .map(|i| pulled(&format!("5000:{i}"), "+8613800000001", true))
                        .collect::<Vec<_>>(),
                    "RequestId": "r1"
                }})),
                1 => Answer::json(json!({"Response": {
                    "PullSmsSendStatusSet": [pulled("5000:100", "+8613800000001", true)],
                    "RequestId": "r2"
                }})),
                2 => Answer::json(json!({"Response": {
                    "PullSmsSendStatusSet": (0..100)
                        .map(|i| pulled(&format!("5000:{i}"), "+8613800000001", true))
                        .collect::<Vec<_>>(),
                    "RequestId": "r3"
                }})),
                3 => error_answer("RequestLimitExceeded", "too many requests"),
                _ => error_answer("InternalError", "internal error"),
            }
        })
        .await;
        let sender = TencentSms::new(http::client());
        let account = account(&server);
        assert_eq!(
            sender.pull_receipts(&account, &[]).await.unwrap().len(),
            101
        );
        assert_eq!(
            sender.pull_receipts(&account, &[]).await.unwrap().len(),
            100
        );
        let err = sender.pull_receipts(&account, &[]).await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.code(), "tencent_internal_error");
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn the_documented_status_callback_is_parsed() {
        let body = br#"[{"user_receive_time": "2015-10-17 08:03:04", "nationcode": "86",
            "mobile": "13800000001", "report_status": "SUCCESS", "errmsg": "DELIVRD",
            "description": "The SMS message is successfully delivered", "sid": "5000:1"},
            {"user_receive_time": "2015-10-17 08:03:05", "nationcode": "1",
            "mobile": "4155550100", "report_status": "FAIL", "errmsg": "MK:0001",
            "description": "switched off", "sid": "5000:2", "ext": {}}]"#;
        let receipts = parse_receipt_push(body).unwrap();
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(
            receipts,
            [
                Receipt {
                    vendor: "tencent".into(),
                    vendor_message_id: "5000:1".into(),
                    receiver: Some("+8613800000001".into()),
                    delivered: true,
                    error_code: None,
                    error_detail: None,
                    at: at("2015-10-17T00:03:04Z"),
                },
                Receipt {
                    vendor: "tencent".into(),
                    vendor_message_id: "5000:2".into(),
                    receiver: Some("+14155550100".into()),
                    delivered: false,
                    error_code: Some("MK:0001".into()),
                    error_detail: Some("switched off".into()),
                    at: at("2015-10-17T00:03:05Z"),
                },
            ]
        );
        assert_eq!(RECEIPT_ACK.0, "application/json");
        assert_eq!(
            serde_json::from_str::<Value>(RECEIPT_ACK.1).unwrap(),
            json!({"result": 0, "errmsg": "OK"})
        );

        assert!(parse_receipt_push(b"{}").is_err());
        assert!(parse_receipt_push(b"not json").is_err());
        assert!(parse_receipt_push(br#"[{"nationcode": "86", "mobile": "1"}]"#).is_err());
        assert!(
            parse_receipt_push(
                br#"[{"nationcode": "86", "mobile": "13800000001", "report_status": "MAYBE",
                      "sid": "5000:3"}]"#
            )
            .is_err()
        );
    }

    #[test]
    fn error_codes_are_snake_case() {
        assert_eq!(
            error_code("RequestLimitExceeded.IPLimitExceeded"),
            "tencent_request_limit_exceeded_ip_limit_exceeded"
        );
        assert_eq!(
            error_code("UnauthorizedOperation.SdkAppIdIsDisabled"),
            "tencent_unauthorized_operation_sdk_app_id_is_disabled"
        );
        assert_eq!(
            error_code("AuthFailure.MFAFailure"),
            "tencent_auth_failure_mfa_failure"
        );
        assert_eq!(error_code("InternalError"), "tencent_internal_error");
        assert!(vendor_error("RequestLimitExceeded.UinLimitExceeded", "", "").is_retryable());
        assert!(vendor_error("ServiceUnavailable", "", "").is_retryable());
        assert!(!vendor_error("InternalError.SigVerificationFail", "", "").is_retryable());
        assert!(!vendor_error("AuthFailure.SignatureExpire", "", "").is_retryable());
        assert!(!vendor_error("FailedOperation.PhoneNumberInBlacklist", "", "").is_retryable());
        assert!(!vendor_error("LimitExceeded.PhoneNumberThirtySecondLimit", "", "").is_retryable());
    }

    #[test]
    fn accounts_are_checked_and_secrets_not_shown() {
        let a = TencentAccount::parse(&json!({
            "secret_id": SECRET_ID, "secret_key": "hunter2", "sdk_app_id": APP_ID,
            "sign_name": SIGN,
        }))
        .unwrap();
        assert_eq!(a.region, "ap-guangzhou");
        assert_eq!(a.endpoint.as_str(), "https://sms.tencentcloudapi.com/");
        assert_eq!(a.host(), "sms.tencentcloudapi.com");
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***"),
            "{debug}"
        );

        let good = json!({"secret_id": SECRET_ID, "secret_key": "hunter2",
                          "sdk_app_id": APP_ID, "sign_name": SIGN});
        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let bad = [
            without("secret_id"),
            without("secret_key"),
            without("sdk_app_id"),
            without("sign_name"),
            with("secret_key", json!(1234)),
            with("secret_key", json!("")),
            with("secret_id", json!(" ")),
            with("sdk_app_id", json!("app-1")),
            with("sdk_app_id", json!(1400006666)),
            with("sign_name", json!("")),
            with("region", json!("Guangzhou ")),
            with("base_url", json!("ftp://h.example.com")),
            with("base_url", json!("https://h.example.com/sms?token=hunter2")),
            with("base_url", json!("not a url")),
            with("vendor_extra", json!(1)),
        ];
        for config in bad {
            let err = TencentAccount::parse(&config).unwrap_err();
            assert!(
                !err.contains("hunter2") && !err.contains("1234"),
                "{config}: {err}"
            );
        }
        let intl = TencentAccount::parse(&with(
            "base_url",
            json!("https://sms.intl.tencentcloudapi.com"),
        ))
        .unwrap();
        assert_eq!(intl.host(), "sms.intl.tencentcloudapi.com");
    }

    #[test]
    fn content_entries_are_checked() {
        assert!(check_content(&json!({"template_id": "1110", "params": ["{$code}", "5"]})).is_ok());
        assert!(check_content(&json!({"template_id": "1110"})).is_ok());
        let bad = [
            json!("1110"),
            json!({"params": ["1"]}),
            json!({"template_id": 1110, "params": []}),
            json!({"template_id": "", "params": []}),
            json!({"template_id": "1110", "params": [1]}),
            json!({"template_id": "1110", "params": "1"}),
            json!({"template_id": "1110", "params": [], "sign": "x"}),
        ];
        for entry in bad {
            assert!(check_content(&entry).is_err(), "{entry}");
        }
    }
}

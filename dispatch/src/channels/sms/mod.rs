//! SMS: one channel, three vendors (Tencent Cloud, Alibaba Cloud, Yunpian), so that routing and
//! failover can move traffic between them. Receivers are E.164 numbers (ingest normalises them).
//!
//! # Account
//!
//! `{"vendor": "tencent" | "aliyun" | "yunpian", ...the vendor's fields}` — see each vendor's
//! module. Every vendor account may set `base_url` (for tests) and `sign_name`.
//!
//! # Content
//!
//! SMS vendors send only templates registered with them, so one herald template carries the
//! text the receiver sees and, per vendor, which vendor template to use with which parameters:
//!
//! ```json
//! {"text": "Your code is {$code}, valid for 5 minutes.",
//!  "tencent": {"template_id": "1110", "params": ["{$code}", "5"]},
//!  "aliyun":  {"template_code": "SMS_153055065", "params": {"code": "{$code}"}},
//!  "yunpian": {"tpl_id": 1, "params": {"code": "{$code}"}}}
//! ```
//!
//! `text` is what billing units are counted on (after the account's `【sign_name】`); at least
//! one vendor entry is required, and a message sent through a vendor without an entry fails with
//! `no_vendor_template`.
//!
//! # Billing units
//!
//! [`billing_units`] counts segments as carriers bill them: GSM-7 text is one unit up to 160
//! characters and 153 per part beyond (extension characters such as `€` count twice); anything
//! else is UCS-2, 70 UTF-16 units for one part and 67 per part beyond. The count is put on the
//! `sent` event for reconciliation.

pub mod aliyun;
pub mod tencent;
pub mod yunpian;

use super::http::{bad_account, bad_content};
use super::{SendError, SendOutcome, Sender};
use async_trait::async_trait;
use herald_core::store::PendingReceipt;
use herald_core::{MessageRecord, Receipt};
use reqwest::Client;
use serde_json::Value;

/// The SMS vendors, by their names on accounts and events.
pub const VENDORS: [&str; 3] = ["tencent", "aliyun", "yunpian"];

/// A parsed SMS account: one vendor's config.
pub enum SmsAccount {
    Tencent(tencent::TencentAccount),
    Aliyun(aliyun::AliyunAccount),
    Yunpian(yunpian::YunpianAccount),
}

impl SmsAccount {
    /// Parses `{"vendor": ..., ...}`; the vendor's own parser sees the config without `vendor`.
    pub fn parse(config: &Value) -> Result<Self, String> {
        let mut rest = config
            .as_object()
            .ok_or("an SMS account must be a JSON object")?
            .clone();
        let vendor = rest
            .remove("vendor")
            .ok_or("an SMS account needs `vendor` (tencent, aliyun or yunpian)")?;
        let rest = Value::Object(rest);
        match vendor.as_str() {
            Some("tencent") => tencent::TencentAccount::parse(&rest).map(SmsAccount::Tencent),
            Some("aliyun") => aliyun::AliyunAccount::parse(&rest).map(SmsAccount::Aliyun),
            Some("yunpian") => yunpian::YunpianAccount::parse(&rest).map(SmsAccount::Yunpian),
            _ => Err("`vendor` must be tencent, aliyun or yunpian".into()),
        }
    }

    /// The signature the receiver sees before the text, if the account names one.
    fn sign_name(&self) -> Option<&str> {
        match self {
            SmsAccount::Tencent(a) => Some(&a.sign_name),
            SmsAccount::Aliyun(a) => Some(&a.sign_name),
            SmsAccount::Yunpian(a) => a.sign_name.as_deref(),
        }
    }
}

/// Checks an SMS template's content (see the module docs).
pub fn check_content(content: &Value) -> Result<(), String> {
    let obj = content.as_object().ok_or("content must be a JSON object")?;
    match obj.get("text") {
        Some(Value::String(_)) => {}
        Some(_) => return Err("`text` must be a string".into()),
        None => return Err("an SMS template needs `text` (what the receiver reads)".into()),
    }
    if let Some(k) = obj
        .keys()
        .find(|k| *k != "text" && !VENDORS.contains(&k.as_str()))
    {
        return Err(format!(
            "unknown SMS content field `{k}` (expected text, tencent, aliyun, yunpian)"
        ));
    }
    let mut any = false;
    for (vendor, check) in [
        (
            "tencent",
            tencent::check_content as fn(&Value) -> Result<(), String>,
        ),
        ("aliyun", aliyun::check_content),
        ("yunpian", yunpian::check_content),
    ] {
        if let Some(v) = obj.get(vendor) {
            check(v).map_err(|e| format!("`{vendor}`: {e}"))?;
            any = true;
        }
    }
    if !any {
        return Err(
            "an SMS template needs at least one vendor entry (tencent, aliyun, yunpian)".into(),
        );
    }
    Ok(())
}

/// The vendor entry of a rendered SMS content, or `no_vendor_template`.
pub fn vendor_entry<'a>(record: &'a MessageRecord, vendor: &str) -> Result<&'a Value, SendError> {
    record
        .content
        .get(vendor)
        .ok_or_else(|| SendError::Permanent {
            code: "no_vendor_template".into(),
            detail: format!("the template has no `{vendor}` entry"),
        })
}

/// The SMS channel client.
pub struct SmsSender {
    tencent: tencent::TencentSms,
    aliyun: aliyun::AliyunSms,
    yunpian: yunpian::YunpianSms,
}

impl SmsSender {
    /// The three vendors' clients over the shared HTTP pool.
    pub fn new(client: Client) -> Self {
        SmsSender {
            tencent: tencent::TencentSms::new(client.clone()),
            aliyun: aliyun::AliyunSms::new(client.clone()),
            yunpian: yunpian::YunpianSms::new(client),
        }
    }
}

#[async_trait]
impl Sender for SmsSender {
    fn max_batch(&self) -> usize {
        1000
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
        let account = match SmsAccount::parse(account) {
            Ok(a) => a,
            Err(e) => {
                return records
                    .iter()
                    .map(|_| Err(bad_account(e.clone())))
                    .collect();
            }
        };
        let mut results = match &account {
            SmsAccount::Tencent(a) => self.tencent.send(a, records).await,
            SmsAccount::Aliyun(a) => self.aliyun.send(a, records).await,
            SmsAccount::Yunpian(a) => self.yunpian.send(a, records).await,
        };
        debug_assert_eq!(results.len(), records.len());
        for (record, result) in records.iter().zip(&mut results) {
            if let Ok(outcome) = result {
                let text = record.content.get("text").and_then(Value::as_str);
                let Some(text) = text else {
                    *result = Err(bad_content("the SMS content has no `text`"));
                    continue;
                };
                outcome.billing_units = Some(match account.sign_name() {
                    Some(sign) => billing_units(&format!("【{sign}】{text}")),
                    None => billing_units(text),
                });
            }
        }
        results
    }

    async fn pull_receipts(
        &self,
        _account_id: i64,
        account: &Value,
        pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        match SmsAccount::parse(account).map_err(bad_account)? {
            SmsAccount::Tencent(a) => self.tencent.pull_receipts(&a, pending).await,
            SmsAccount::Aliyun(a) => self.aliyun.pull_receipts(&a, pending).await,
            // Yunpian pushes its receipts (`POST /v1/receipts/yunpian`).
            SmsAccount::Yunpian(_) => Ok(Vec::new()),
        }
    }
}

/// The characters of the GSM 03.38 default alphabet (one septet each).
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The characters of the GSM 03.38 extension table (an escape and a septet: two each).
const GSM7_EXTENSION: &str = "\u{c}^{}\\[~]|€";

/// The units (segments) a carrier bills for `text`; see the module docs.
pub fn billing_units(text: &str) -> u32 {
    let mut septets = 0u32;
    let mut gsm7 = true;
    for c in text.chars() {
        if GSM7_BASIC.contains(c) {
            septets += 1;
        } else if GSM7_EXTENSION.contains(c) {
            septets += 2;
        } else {
            gsm7 = false;
            break;
        }
    }
    let (length, single, part) = if gsm7 {
        (septets, 160, 153)
    } else {
        (text.encode_utf16().count() as u32, 70, 67)
    };
    if length <= single {
        1
    } else {
        length.div_ceil(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn billing_units_follow_gsm7_and_ucs2_segment_sizes() {
        assert_eq!(billing_units(""), 1);
        assert_eq!(billing_units(&"a".repeat(160)), 1);
        assert_eq!(billing_units(&"a".repeat(161)), 2);
        assert_eq!(billing_units(&"a".repeat(306)), 2);
        assert_eq!(billing_units(&"a".repeat(307)), 3);
        // Extension characters take two septets.
        assert_eq!(billing_units(&"€".repeat(80)), 1);
        assert_eq!(billing_units(&"€".repeat(81)), 2);
        // Chinese text is UCS-2.
        assert_eq!(billing_units(&"验".repeat(70)), 1);
        assert_eq!(billing_units(&"验".repeat(71)), 2);
        assert_eq!(billing_units(&"验".repeat(134)), 2);
        assert_eq!(billing_units(&"验".repeat(135)), 3);
        // One non-GSM character makes the whole message UCS-2.
        assert_eq!(billing_units(&format!("{}验", "a".repeat(69))), 1);
        assert_eq!(billing_units(&format!("{}验", "a".repeat(70))), 2);
        // Characters outside the BMP are two UTF-16 units.
        assert_eq!(billing_units(&"😀".repeat(35)), 1);
        assert_eq!(billing_units(&"😀".repeat(36)), 2);
    }

    #[test]
    fn content_needs_text_and_a_vendor_entry() {
        assert!(check_content(&json!({"text": "hi"})).is_err());
        assert!(check_content(&json!({"tencent": {"template_id": "1", "params": []}})).is_err());
        assert!(check_content(&json!({"text": "hi", "fax": {}})).is_err());
        assert!(
            check_content(&json!({"text": "hi", "tencent": {"template_id": "1", "params": ["1"]}}))
                .is_ok()
        );
    }

    #[test]
    fn accounts_name_their_vendor() {
        assert!(SmsAccount::parse(&json!({"secret_id": "x"})).is_err());
        assert!(SmsAccount::parse(&json!({"vendor": "fax"})).is_err());
    }
}

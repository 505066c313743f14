//! Domain types that every stage past the edge works with. Input becomes these through `TryFrom` /
//! `FromStr` at ingest; later stages never see raw strings for these concepts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A delivery channel: where a message goes. A channel may have several vendors (SMS); each
/// channel account names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// herald's own per-receiver inbox (Austin's unimplemented IM channel).
    Inbox,
    /// Email over SMTP.
    Email,
    /// A signed JSON POST to the account's URL.
    Webhook,
    /// SMS through Tencent Cloud, Alibaba Cloud or Yunpian; receivers are phone numbers.
    Sms,
    /// WeChat official account template messages; receivers are openids.
    WechatOfficial,
    /// WeChat mini program subscribe messages; receivers are openids.
    WechatMini,
    /// WeCom (WeChat Work) app messages; receivers are user ids or `@all`.
    WecomApp,
    /// A WeCom group robot; receivers are the user ids (or `@all`) to mention.
    WecomRobot,
    /// A DingTalk group robot; receivers are the mobiles or user ids (or `@all`) to mention.
    DingtalkRobot,
    /// DingTalk work notices; receivers are user ids or `@all`.
    DingtalkWork,
    /// A Feishu/Lark group robot; receivers are the open ids (or `@all`) to mention.
    FeishuRobot,
    /// Feishu/Lark app messages; receivers are ids of the account's `receive_id_type`.
    FeishuApp,
    /// App push through GeTui; receivers are client ids (cid).
    Push,
}

impl Channel {
    /// Every channel, in a stable order.
    pub const ALL: [Channel; 13] = [
        Channel::Inbox,
        Channel::Email,
        Channel::Webhook,
        Channel::Sms,
        Channel::WechatOfficial,
        Channel::WechatMini,
        Channel::WecomApp,
        Channel::WecomRobot,
        Channel::DingtalkRobot,
        Channel::DingtalkWork,
        Channel::FeishuRobot,
        Channel::FeishuApp,
        Channel::Push,
    ];

    /// The wire name (`inbox`, `email`, `sms`, `wecom_app`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Inbox => "inbox",
            Channel::Email => "email",
            Channel::Webhook => "webhook",
            Channel::Sms => "sms",
            Channel::WechatOfficial => "wechat_official",
            Channel::WechatMini => "wechat_mini",
            Channel::WecomApp => "wecom_app",
            Channel::WecomRobot => "wecom_robot",
            Channel::DingtalkRobot => "dingtalk_robot",
            Channel::DingtalkWork => "dingtalk_work",
            Channel::FeishuRobot => "feishu_robot",
            Channel::FeishuApp => "feishu_app",
            Channel::Push => "push",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Channel::ALL.iter().map(|c| c.as_str()).collect();
                format!(
                    "unknown channel `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// The kind of message, which later drives policies (quiet hours, priority lanes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MsgType {
    Notice,
    Marketing,
    AuthCode,
}

impl MsgType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            MsgType::Notice => "notice",
            MsgType::Marketing => "marketing",
            MsgType::AuthCode => "auth_code",
        }
    }
}

impl FromStr for MsgType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notice" => Ok(MsgType::Notice),
            "marketing" => Ok(MsgType::Marketing),
            "auth_code" => Ok(MsgType::AuthCode),
            _ => Err(format!(
                "unknown msg_type `{s}` (expected notice, marketing or auth_code)"
            )),
        }
    }
}

/// A message id: a UUIDv7, so ids sort by acceptance time and Parquet min/max statistics prune well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub uuid::Uuid);

impl MessageId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        MessageId(uuid::Uuid::now_v7())
    }

    /// When a time-ordered (version 7) id was made, to the second; `None` for other ids (those
    /// derived from a producer record's place on the bus).
    pub fn made_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        if self.0.get_version_num() != 7 {
            return None;
        }
        let (secs, _) = self.0.get_timestamp()?.to_unix();
        chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0)
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(MessageId)
    }
}

/// Checks a receiver for a channel and returns it normalised: email addresses with a lower-cased
/// domain, phone numbers in E.164 (`+8613812345678`), other ids trimmed.
pub fn parse_receiver(channel: Channel, raw: &str) -> Result<String, String> {
    let r = raw.trim();
    if r.is_empty() {
        return Err("receiver is empty".into());
    }
    if r.len() > 320 {
        return Err("receiver is longer than 320 bytes".into());
    }
    if r.chars().any(char::is_control) {
        return Err("receiver contains control characters".into());
    }
    match channel {
        Channel::Email => parse_email(r),
        Channel::Sms => parse_phone(r),
        _ => Ok(r.to_string()),
    }
}

fn parse_email(r: &str) -> Result<String, String> {
    let bad = || format!("`{r}` is not an email address");
    let (local, domain) = r.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if local.is_empty() || local.len() > 64 || local.contains(char::is_whitespace) || !domain_ok {
        return Err(bad());
    }
    Ok(format!("{local}@{}", domain.to_ascii_lowercase()))
}

/// A phone number in E.164. Mainland China mobiles may be given bare (`13812345678`) or with
/// `86`, `+86` or `0086`, and must fall in a number range the MIIT has assigned to mobile
/// networks; other numbers must be `+` and 8 to 15 digits with a country code.
pub fn parse_phone(r: &str) -> Result<String, String> {
    let compact: String = r.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let bad = || format!("`{r}` is not a phone number (E.164, or a mainland China mobile)");
    if !compact
        .trim_start_matches('+')
        .bytes()
        .all(|b| b.is_ascii_digit())
        || compact.len() < 2
        || compact[1..].contains('+')
    {
        return Err(bad());
    }
    let mainland = compact
        .strip_prefix("+86")
        .or_else(|| compact.strip_prefix("0086"))
        .or_else(|| compact.strip_prefix("86").filter(|n| n.len() == 11))
        .or_else(|| (compact.len() == 11 && compact.starts_with('1')).then_some(&compact[..]));
    if let Some(national) = mainland {
        return if is_mainland_mobile(national) {
            Ok(format!("+86{national}"))
        } else {
            Err(format!(
                "`{r}` is not a mainland China mobile number (11 digits in an assigned range)"
            ))
        };
    }
    let digits = compact.strip_prefix('+').ok_or_else(bad)?;
    if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
        return Err(bad());
    }
    Ok(compact)
}

/// Whether an 11-digit national number falls in a mainland China mobile range (China Mobile,
/// Unicom, Telecom, Broadnet and the virtual operators' 162/165/167/170/171 blocks, and the
/// 14x data-card and IoT ranges that accept SMS), as assigned by the MIIT up to 2024.
fn is_mainland_mobile(n: &str) -> bool {
    if n.len() != 11 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let b = n.as_bytes();
    let (second, third) = (b[1] - b'0', b[2] - b'0');
    match second {
        3 | 8 => true,
        4 => matches!(third, 5..=9),
        5 => third != 4,
        6 => matches!(third, 2 | 5 | 6 | 7),
        7 => matches!(third, 0..=8),
        9 => third != 4,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip_through_their_names() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>().unwrap(), c);
        }
        assert!("fax".parse::<Channel>().is_err());
    }

    #[test]
    fn email_receivers_are_checked_and_normalised() {
        assert_eq!(
            parse_receiver(Channel::Email, " Ann@Example.COM ").unwrap(),
            "Ann@example.com"
        );
        for bad in [
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "a b@example.com",
            "ann@.com",
        ] {
            assert!(parse_receiver(Channel::Email, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_and_control_receivers_are_refused() {
        assert!(parse_receiver(Channel::Inbox, "  ").is_err());
        assert!(parse_receiver(Channel::Inbox, "a\u{0}b").is_err());
        assert_eq!(parse_receiver(Channel::Inbox, "user-1").unwrap(), "user-1");
    }

    #[test]
    fn phone_numbers_become_e164() {
        for (raw, want) in [
            ("13812345678", "+8613812345678"),
            ("+86 138-1234-5678", "+8613812345678"),
            ("8619912345678", "+8619912345678"),
            ("008617012345678", "+8617012345678"),
            ("+14155550123", "+14155550123"),
            ("+442071838750", "+442071838750"),
        ] {
            assert_eq!(parse_phone(raw).unwrap(), want, "{raw}");
        }
        for bad in [
            "12012345678",
            "+8612012345678",
            "1381234567",
            "+86138123456789",
            "15412345678",
            "19412345678",
            "4155550123",
            "+0123456789",
            "+1234",
            "138a2345678",
            "+86+13812345678",
        ] {
            assert!(parse_phone(bad).is_err(), "{bad}");
        }
    }
}

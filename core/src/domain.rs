//! Domain types that every stage past the edge works with. Input becomes these through `TryFrom` /
//! `FromStr` at ingest; later stages never see raw strings for these concepts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A delivery channel: where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// herald's own per-receiver inbox (Austin's unimplemented IM channel).
    Inbox,
    /// Email over SMTP.
    Email,
    /// A signed JSON POST to the account's URL.
    Webhook,
}

impl Channel {
    /// Every channel, in a stable order.
    pub const ALL: [Channel; 3] = [Channel::Inbox, Channel::Email, Channel::Webhook];

    /// The wire name (`inbox`, `email`, `webhook`).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Inbox => "inbox",
            Channel::Email => "email",
            Channel::Webhook => "webhook",
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
            .ok_or_else(|| format!("unknown channel `{s}` (expected inbox, email or webhook)"))
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

/// Checks a receiver for a channel and returns it normalised (trimmed; email lower-cased domain).
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
        Channel::Inbox | Channel::Webhook => Ok(r.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip_through_their_names() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>().unwrap(), c);
        }
        assert!("sms".parse::<Channel>().is_err());
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
}

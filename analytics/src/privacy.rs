//! Receivers in the warehouse: personal data, so they may be written masked or hashed
//! (`analytics.receivers`). Both forms are deterministic — one receiver always gives the same
//! string — so reconciliation, which applies the same form to the bill's receivers on import,
//! still pairs bill rows with messages by receiver, and price rules by country prefix still
//! apply:
//!
//! | receiver | `masked` | `hashed` |
//! |---|---|---|
//! | `+8613800001234` | `+86138****1234` | `+861~` + 32 hex digits |
//! | `alice@example.com` | `a***@example.com` | `~` + 32 hex digits + `@example.com` |
//! | `oUpF8uMuAJO_M2pxb1Q9zNjWeS6o` (an id) | `oU************************6o` | `~` + 32 hex digits |
//!
//! A hash is HMAC-SHA256 under `analytics.receiver_hash_key`, truncated to 128 bits: without
//! the key no one can test guesses (there are few enough phone numbers to try them all against
//! a plain hash). Masking hides less: two receivers can share a mask, so the by-receiver
//! fallback of reconciliation may pair the wrong two of them (pairs by vendor message id are
//! unaffected).

use herald_core::config::{AnalyticsConfig, ReceiverMode};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::borrow::Cow;

/// How receivers are written to the warehouse.
#[derive(Clone, Default)]
pub enum ReceiverPrivacy {
    /// As sent.
    #[default]
    Clear,
    /// The middle replaced by `*`.
    Masked,
    /// A keyed hash, with a phone number's first digits or an address's domain kept.
    Hashed(Hmac<Sha256>),
}

impl std::fmt::Debug for ReceiverPrivacy {
    /// Never shows the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReceiverPrivacy::Clear => "Clear",
            ReceiverPrivacy::Masked => "Masked",
            ReceiverPrivacy::Hashed(_) => "Hashed",
        })
    }
}

impl ReceiverPrivacy {
    /// The form `config` asks for; `hashed` needs `receiver_hash_key`.
    pub fn from_config(config: &AnalyticsConfig) -> Result<Self, String> {
        Ok(match config.receivers {
            ReceiverMode::Clear => ReceiverPrivacy::Clear,
            ReceiverMode::Masked => ReceiverPrivacy::Masked,
            ReceiverMode::Hashed => {
                let key = config
                    .receiver_hash_key
                    .as_ref()
                    .map(|k| k.expose())
                    .filter(|k| k.len() >= 16)
                    .ok_or(
                        "analytics.receivers = \"hashed\" needs analytics.receiver_hash_key \
                         (at least 16 characters)",
                    )?;
                ReceiverPrivacy::hashed(key.as_bytes())
            }
        })
    }

    /// Hashing under `key`.
    pub fn hashed(key: &[u8]) -> Self {
        // HMAC takes a key of any length.
        ReceiverPrivacy::Hashed(Hmac::new_from_slice(key).expect("any key length"))
    }

    /// `receiver` as the warehouse stores it.
    pub fn apply<'a>(&self, receiver: &'a str) -> Cow<'a, str> {
        match self {
            ReceiverPrivacy::Clear => Cow::Borrowed(receiver),
            ReceiverPrivacy::Masked => Cow::Owned(mask(receiver)),
            ReceiverPrivacy::Hashed(mac) => Cow::Owned(hash(mac, receiver)),
        }
    }
}

fn is_phone(receiver: &str) -> bool {
    receiver
        .strip_prefix('+')
        .is_some_and(|d| d.len() >= 7 && d.bytes().all(|b| b.is_ascii_digit()))
}

fn mask(receiver: &str) -> String {
    let chars: Vec<char> = receiver.chars().collect();
    let (head, tail) = if is_phone(receiver) {
        // `+` and the country code with the first digits (the carrier), and the last four.
        if chars.len() >= 12 { (6, 4) } else { (4, 2) }
    } else if let Some(at) = receiver.find('@') {
        let local = receiver[..at].chars().count();
        return format!(
            "{}{}{}",
            chars.iter().take(1.min(local)).collect::<String>(),
            "*".repeat(3),
            &receiver[at..]
        );
    } else if chars.len() > 6 {
        (2, 2)
    } else {
        (0, 0)
    };
    let hidden = chars.len() - head - tail;
    let mut out: String = chars[..head].iter().collect();
    out.push_str(&"*".repeat(hidden.max(1)));
    out.extend(&chars[chars.len() - tail..]);
    out
}

fn hash(mac: &Hmac<Sha256>, receiver: &str) -> String {
    let mut mac = mac.clone();
    mac.update(receiver.as_bytes());
    let digest = hex::encode(&mac.finalize().into_bytes()[..16]);
    if is_phone(receiver) {
        // `+` and three digits: every country code, and so every price rule by country.
        format!("{}~{digest}", &receiver[..4])
    } else if let Some(at) = receiver.find('@') {
        format!("~{digest}{}", &receiver[at..])
    } else {
        format!("~{digest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_ends_and_hide_the_middle() {
        let m = ReceiverPrivacy::Masked;
        assert_eq!(m.apply("+8613800001234"), "+86138****1234");
        assert_eq!(m.apply("+14155550100"), "+14155**0100");
        assert_eq!(m.apply("+4930123"), "+493**23");
        assert_eq!(m.apply("alice@example.com"), "a***@example.com");
        assert_eq!(m.apply("@example.com"), "***@example.com");
        assert_eq!(
            m.apply("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"),
            "oU************************6o"
        );
        assert_eq!(m.apply("u1"), "**");
        assert_eq!(m.apply("用户名字很长的人"), "用户****的人");
    }

    #[test]
    fn hashes_are_keyed_stable_and_keep_the_country_code() {
        let a = ReceiverPrivacy::hashed(b"0123456789abcdef");
        let b = ReceiverPrivacy::hashed(b"another key, another hash");
        let phone = a.apply("+8613800001234");
        assert!(phone.starts_with("+861~"), "{phone}");
        assert_eq!(phone.len(), 5 + 32);
        assert_eq!(phone, a.apply("+8613800001234"));
        assert_ne!(phone, a.apply("+8613800001235"));
        assert_ne!(phone, b.apply("+8613800001234"));
        assert!(!phone.contains("13800001234"));
        let mail = a.apply("alice@example.com");
        assert!(
            mail.starts_with('~') && mail.ends_with("@example.com"),
            "{mail}"
        );
        assert!(!mail.contains("alice"));
        // HMAC-SHA256("0123456789abcdef", "u1"), first 16 bytes (RFC 2104; checked with
        // Python's hmac module).
        assert_eq!(a.apply("u1"), "~5162bddb18bda0082a7b39c472f7d118");
    }

    #[test]
    fn hashed_needs_a_key_of_sixteen_characters() {
        let mut config = AnalyticsConfig {
            receivers: ReceiverMode::Hashed,
            ..AnalyticsConfig::default()
        };
        assert!(ReceiverPrivacy::from_config(&config).is_err());
        config.receiver_hash_key = Some(herald_core::config::Secret::new("short"));
        assert!(ReceiverPrivacy::from_config(&config).is_err());
        config.receiver_hash_key = Some(herald_core::config::Secret::new("0123456789abcdef"));
        assert!(matches!(
            ReceiverPrivacy::from_config(&config),
            Ok(ReceiverPrivacy::Hashed(_))
        ));
        assert_eq!(
            format!("{:?}", ReceiverPrivacy::from_config(&config).unwrap()),
            "Hashed"
        );
    }
}

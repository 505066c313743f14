//! Channels: one module per vendor, each with its account config, its client and its tests.
//! [`Senders::from_config`] builds all of them; the worker picks one by the record's channel.
//!
//! The inbox channel is not a [`Sender`]: its "send" is a row in the store written in the same
//! transaction as the send ledger, which makes it exactly-once (see `worker`).

pub mod email;
pub mod webhook;

use async_trait::async_trait;
use herald_core::{Channel, MessageRecord};
use serde_json::Value;
use std::time::Duration;

/// What a vendor said when it took a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendOutcome {
    /// The vendor's name as it appears on delivery events (`smtp`, `webhook`, ...).
    pub vendor: String,
    /// The vendor's id for the message, when it gives one (SMTP: the Message-ID header).
    pub vendor_message_id: Option<String>,
    /// Units the vendor bills for this message (SMS segments); `None` where billing is per message.
    pub billing_units: Option<u32>,
}

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// A transient failure (timeout, 5xx, 429, SMTP 4xx): the same message may succeed later.
    #[error("{code}: {detail}")]
    Retryable {
        code: String,
        detail: String,
        /// The vendor's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// A failure that will repeat (bad credentials, bad receiver, 4xx, SMTP 5xx).
    #[error("{code}: {detail}")]
    Permanent { code: String, detail: String },
}

impl SendError {
    /// The short machine-readable code put on the `send_failed` event.
    pub fn code(&self) -> &str {
        match self {
            SendError::Retryable { code, .. } | SendError::Permanent { code, .. } => code,
        }
    }

    /// The human-readable detail put on the `send_failed` event (never holds secrets).
    pub fn detail(&self) -> &str {
        match self {
            SendError::Retryable { detail, .. } | SendError::Permanent { detail, .. } => detail,
        }
    }

    /// Whether the message may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SendError::Retryable { .. })
    }
}

/// A channel client. `account` is the channel account's stored config (JSON), which each
/// implementation parses into its own config struct.
#[async_trait]
pub trait Sender: Send + Sync {
    /// Sends one rendered message to its receiver.
    async fn send(
        &self,
        record: &MessageRecord,
        account_id: i64,
        account: &serde_json::Value,
    ) -> Result<SendOutcome, SendError>;
}

/// Checks a channel account's config when it is created: the config must parse as the channel's
/// account struct. The inbox needs no account config.
pub fn check_account(channel: Channel, config: &Value) -> Result<(), String> {
    match channel {
        Channel::Inbox => Ok(()),
        Channel::Email => email::EmailAccount::parse(config).map(drop),
        Channel::Webhook => webhook::WebhookAccount::parse(config).map(drop),
    }
}

/// Checks a template's content fields for its channel:
/// - inbox: `{"title"?, "content", ...}` — `content` is required, other fields are kept as given;
/// - email: `{"subject", "html"?, "text"?}` — a subject and at least one body;
/// - webhook: any JSON object, posted as the message's `content`.
pub fn check_content(channel: Channel, content: &Value) -> Result<(), String> {
    let obj = content.as_object().ok_or("content must be a JSON object")?;
    let string = |k: &str| {
        obj.get(k)
            .map(|v| {
                v.as_str()
                    .map(drop)
                    .ok_or(format!("`{k}` must be a string"))
            })
            .transpose()
    };
    match channel {
        Channel::Inbox => {
            string("title")?;
            string("content")?.ok_or("an inbox template needs `content`")?;
        }
        Channel::Email => {
            string("subject")?.ok_or("an email template needs `subject`")?;
            let (html, text) = (string("html")?, string("text")?);
            if html.is_none() && text.is_none() {
                return Err("an email template needs `html`, `text` or both".into());
            }
            if let Some(k) = obj
                .keys()
                .find(|k| !["subject", "html", "text"].contains(&k.as_str()))
            {
                return Err(format!("unknown email content field `{k}`"));
            }
        }
        Channel::Webhook => {}
    }
    Ok(())
}

/// Every channel client, built once.
pub struct Senders {
    pub email: email::EmailSender,
    pub webhook: webhook::WebhookSender,
}

impl Senders {
    /// Builds every channel client.
    pub fn new() -> Self {
        Senders {
            email: email::EmailSender::new(),
            webhook: webhook::WebhookSender::new(),
        }
    }
}

impl Default for Senders {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_is_checked_per_channel() {
        assert!(check_content(Channel::Inbox, &json!({"title": "t", "content": "c"})).is_ok());
        assert!(check_content(Channel::Inbox, &json!({"title": "t"})).is_err());
        assert!(
            check_content(Channel::Email, &json!({"subject": "s", "html": "<b>h</b>"})).is_ok()
        );
        assert!(check_content(Channel::Email, &json!({"subject": "s"})).is_err());
        assert!(
            check_content(
                Channel::Email,
                &json!({"subject": "s", "text": "t", "cc": "x"})
            )
            .is_err()
        );
        assert!(check_content(Channel::Webhook, &json!({"anything": [1, 2]})).is_ok());
        assert!(check_content(Channel::Webhook, &json!("text")).is_err());
    }
}

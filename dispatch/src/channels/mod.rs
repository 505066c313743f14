//! Channels: one module per vendor, each with its account config, its client and its tests.
//! [`Senders::new`] builds all of them; the worker picks one by the record's channel.
//!
//! The inbox channel is not a [`Sender`]: its "send" is a row in the store written in the same
//! transaction as the send ledger, which makes it exactly-once (see `worker`).
//!
//! Every vendor account's config may set `base_url`, which replaces the vendor's API origin
//! (tests point it at a local server).

pub mod dingtalk;
pub mod email;
pub mod feishu;
pub mod fetch;
pub mod getui;
pub mod http;
pub mod sms;
#[cfg(test)]
pub mod testkit;
pub mod token;
pub mod webhook;
pub mod wechat;
pub mod wecom;

use async_trait::async_trait;
use herald_core::config::DispatchConfig;
use herald_core::store::{PendingReceipt, Store};
use herald_core::{Channel, DeliveryEvent, MessageRecord, Receipt};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use token::TokenCache;

/// What a vendor said when it took a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendOutcome {
    /// The vendor's name as it appears on delivery events (`smtp`, `webhook`, `tencent`, ...).
    pub vendor: String,
    /// The vendor's id for the message, when it gives one (SMTP: the Message-ID header). Receipts
    /// and recalls find the message by it.
    pub vendor_message_id: Option<String>,
    /// Units the vendor bills for this message (SMS segments); `None` where billing is per message.
    pub billing_units: Option<u32>,
}

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// A transient failure (timeout, 5xx, 429, SMTP 4xx, a vendor's rate-limit or busy code):
    /// the same message may succeed later.
    #[error("{code}: {detail}")]
    Retryable {
        code: String,
        detail: String,
        /// How long the vendor asked to wait (`Retry-After`), when it said.
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

    /// The `not_supported` answer of an operation a vendor does not offer.
    pub fn not_supported(what: &str) -> Self {
        SendError::Permanent {
            code: "not_supported".into(),
            detail: format!("{what} is not supported by this channel"),
        }
    }
}

/// A file to upload to a vendor, which answers with the media id that messages then reference.
#[derive(Debug, Clone)]
pub struct Media {
    /// The vendor's media type: `image`, `voice`, `video` or `file`.
    pub kind: String,
    pub filename: String,
    pub content_type: String,
    pub bytes: bytes::Bytes,
}

/// A channel client. `account` is the channel account's stored config (JSON), which each
/// implementation parses into its own config struct.
#[async_trait]
pub trait Sender: Send + Sync {
    /// The most messages one [`send_batch`](Self::send_batch) call should get; 1 (the default)
    /// when the vendor has no batch API.
    fn max_batch(&self) -> usize {
        1
    }

    /// Sends one rendered message to its receiver.
    async fn send(
        &self,
        record: &MessageRecord,
        account_id: i64,
        account: &Value,
    ) -> Result<SendOutcome, SendError>;

    /// Sends several messages through one account, using the vendor's batch API where it has one
    /// (messages with the same content share a request); one result per record, in order. A
    /// failure for one receiver is that receiver's result, not the whole batch's.
    async fn send_batch(
        &self,
        records: &[&MessageRecord],
        account_id: i64,
        account: &Value,
    ) -> Vec<Result<SendOutcome, SendError>> {
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            out.push(self.send(record, account_id, account).await);
        }
        out
    }

    /// Recalls a sent message through the vendor; `sent` is its `sent` event (vendor message id,
    /// receiver, channel). `not_supported` by default.
    async fn recall(
        &self,
        _sent: &DeliveryEvent,
        _account_id: i64,
        _account: &Value,
    ) -> Result<(), SendError> {
        Err(SendError::not_supported("recall"))
    }

    /// Asks the vendor for the receipts of `pending` messages sent through this account; those
    /// without a receipt yet are simply absent from the answer. Nothing by default (vendors that
    /// push receipts, or have none).
    async fn pull_receipts(
        &self,
        _account_id: i64,
        _account: &Value,
        _pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        Ok(Vec::new())
    }

    /// Uploads `media` for messages of `channel` that reference a media id; returns the id.
    /// `not_supported` by default.
    async fn upload_media(
        &self,
        _channel: Channel,
        _account_id: i64,
        _account: &Value,
        _media: &Media,
    ) -> Result<String, SendError> {
        Err(SendError::not_supported("media upload"))
    }
}

/// What a vendor's receipt push parsed into, and what the vendor expects as the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptPush {
    pub receipts: Vec<Receipt>,
    /// The answer's content type and body, as the vendor documents it.
    pub ack: (&'static str, &'static str),
}

/// Parses a receipt push (`POST /v1/receipts/{vendor}`) from `vendor`.
pub fn parse_receipt_push(vendor: &str, body: &[u8]) -> Result<ReceiptPush, String> {
    let (receipts, ack) = match vendor {
        "tencent" => (
            sms::tencent::parse_receipt_push(body)?,
            sms::tencent::RECEIPT_ACK,
        ),
        "aliyun" => (
            sms::aliyun::parse_receipt_push(body)?,
            sms::aliyun::RECEIPT_ACK,
        ),
        "yunpian" => (
            sms::yunpian::parse_receipt_push(body)?,
            sms::yunpian::RECEIPT_ACK,
        ),
        other => {
            return Err(format!(
                "no receipt push from `{other}` (expected tencent, aliyun or yunpian)"
            ));
        }
    };
    Ok(ReceiptPush { receipts, ack })
}

/// Checks a channel account's config when it is created: the config must parse as the channel's
/// account struct. The inbox needs no account config.
pub fn check_account(channel: Channel, config: &Value) -> Result<(), String> {
    match channel {
        Channel::Inbox => Ok(()),
        Channel::Email => email::EmailAccount::parse(config).map(drop),
        Channel::Webhook => webhook::WebhookAccount::parse(config).map(drop),
        Channel::Sms => sms::SmsAccount::parse(config).map(drop),
        Channel::WechatOfficial | Channel::WechatMini => wechat::check_account(channel, config),
        Channel::WecomApp | Channel::WecomRobot => wecom::check_account(channel, config),
        Channel::DingtalkRobot | Channel::DingtalkWork => dingtalk::check_account(channel, config),
        Channel::FeishuRobot | Channel::FeishuApp => feishu::check_account(channel, config),
        Channel::Push => getui::check_account(channel, config),
    }
}

/// Checks a template's content fields for its channel:
/// - inbox: `{"title"?, "content", ...}` — `content` is required, other fields are kept as given;
/// - email: `{"subject", "html"?, "text"?, "attachments"?}` — a subject and at least one body
///   (attachments: see [`email::check_attachments`]);
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
            if let Some(attachments) = obj.get("attachments") {
                email::check_attachments(attachments)?;
            }
            if let Some(k) = obj
                .keys()
                .find(|k| !["subject", "html", "text", "attachments"].contains(&k.as_str()))
            {
                return Err(format!("unknown email content field `{k}`"));
            }
        }
        Channel::Webhook => {}
        Channel::Sms => sms::check_content(content)?,
        Channel::WechatOfficial | Channel::WechatMini => wechat::check_content(channel, content)?,
        Channel::WecomApp | Channel::WecomRobot => wecom::check_content(channel, content)?,
        Channel::DingtalkRobot | Channel::DingtalkWork => {
            dingtalk::check_content(channel, content)?
        }
        Channel::FeishuRobot | Channel::FeishuApp => feishu::check_content(channel, content)?,
        Channel::Push => getui::check_content(channel, content)?,
    }
    Ok(())
}

/// Every channel client, built once, sharing one HTTP connection pool and one token cache.
pub struct Senders {
    pub email: email::EmailSender,
    pub webhook: webhook::WebhookSender,
    pub sms: sms::SmsSender,
    pub wechat: wechat::WechatSender,
    pub wecom: wecom::WecomSender,
    pub dingtalk: dingtalk::DingtalkSender,
    pub feishu: feishu::FeishuSender,
    pub getui: getui::GetuiSender,
    /// Whether vendor and webhook URLs may reach private addresses.
    allow_private_urls: bool,
}

impl Senders {
    /// Builds every channel client; vendor tokens are shared through `store`; `config` sets
    /// what URLs may be fetched on a user's behalf (email attachments).
    pub fn new(store: Store, config: &DispatchConfig) -> Self {
        let client = http::vendor_client(config.allow_private_urls);
        let tokens = Arc::new(TokenCache::new(store));
        Senders {
            email: email::EmailSender::new(fetch::UrlPolicy::from_config(config)),
            webhook: webhook::WebhookSender::new(client.clone()),
            sms: sms::SmsSender::new(client.clone()),
            wechat: wechat::WechatSender::new(client.clone(), Arc::clone(&tokens)),
            wecom: wecom::WecomSender::new(client.clone(), Arc::clone(&tokens)),
            dingtalk: dingtalk::DingtalkSender::new(client.clone(), Arc::clone(&tokens)),
            feishu: feishu::FeishuSender::new(client.clone(), Arc::clone(&tokens)),
            getui: getui::GetuiSender::new(client, tokens),
            allow_private_urls: config.allow_private_urls,
        }
    }

    /// Checks an account config ([`check_account`]) and, unless `allow_private_urls`, that its
    /// URLs name no private address.
    pub fn check_account(&self, channel: Channel, config: &Value) -> Result<(), String> {
        check_account(channel, config)?;
        if self.allow_private_urls {
            Ok(())
        } else {
            fetch::check_account_urls(config)
        }
    }

    /// The client of `channel`; `None` for the inbox, which has none.
    pub fn for_channel(&self, channel: Channel) -> Option<&dyn Sender> {
        Some(match channel {
            Channel::Inbox => return None,
            Channel::Email => &self.email,
            Channel::Webhook => &self.webhook,
            Channel::Sms => &self.sms,
            Channel::WechatOfficial | Channel::WechatMini => &self.wechat,
            Channel::WecomApp | Channel::WecomRobot => &self.wecom,
            Channel::DingtalkRobot | Channel::DingtalkWork => &self.dingtalk,
            Channel::FeishuRobot | Channel::FeishuApp => &self.feishu,
            Channel::Push => &self.getui,
        })
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

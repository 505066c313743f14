//! Channels: one module per vendor, each with its account config, its client and its tests.
//! [`Senders::from_config`] builds all of them; the worker picks one by the record's channel.
//!
//! The inbox channel is not a [`Sender`]: its "send" is a row in the store written in the same
//! transaction as the send ledger, which makes it exactly-once (see `worker`).

pub mod email;
pub mod webhook;

use async_trait::async_trait;
use herald_core::MessageRecord;
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

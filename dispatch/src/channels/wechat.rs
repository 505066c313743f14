//! Wechat (stub: replaced by the vendor implementation).

use super::token::TokenCache;
use super::{SendError, SendOutcome, Sender};
use async_trait::async_trait;
use herald_core::{Channel, MessageRecord};
use reqwest::Client;
use serde_json::Value;
use std::sync::Arc;

/// Checks an account config of `channel`.
pub fn check_account(_channel: Channel, _config: &Value) -> Result<(), String> {
    Err("not implemented".into())
}

/// Checks a template's content for `channel`.
pub fn check_content(_channel: Channel, _content: &Value) -> Result<(), String> {
    Err("not implemented".into())
}

/// The Wechat client.
pub struct WechatSender {
    _client: Client,
    _tokens: Arc<TokenCache>,
}

impl WechatSender {
    /// A client over the shared HTTP pool and token cache.
    pub fn new(client: Client, tokens: Arc<TokenCache>) -> Self {
        WechatSender {
            _client: client,
            _tokens: tokens,
        }
    }
}

#[async_trait]
impl Sender for WechatSender {
    async fn send(
        &self,
        _record: &MessageRecord,
        _account_id: i64,
        _account: &Value,
    ) -> Result<SendOutcome, SendError> {
        Err(SendError::not_supported("wechat"))
    }
}

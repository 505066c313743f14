//! Aliyun SMS (stub: replaced by the vendor implementation).

use crate::channels::{SendError, SendOutcome};
use herald_core::store::PendingReceipt;
use herald_core::{MessageRecord, Receipt};
use reqwest::Client;
use serde_json::Value;

/// What the vendor expects in answer to a receipt push: content type and body.
pub const RECEIPT_ACK: (&str, &str) = ("text/plain", "");

/// A Aliyun SMS account.
pub struct AliyunAccount {
    pub sign_name: String,
}

impl AliyunAccount {
    /// Parses the account config (without its `vendor` field).
    pub fn parse(_config: &Value) -> Result<Self, String> {
        Err("not implemented".into())
    }
}

/// Checks the template content's `aliyun` entry.
pub fn check_content(_entry: &Value) -> Result<(), String> {
    Err("not implemented".into())
}

/// Parses a receipt push body.
pub fn parse_receipt_push(_body: &[u8]) -> Result<Vec<Receipt>, String> {
    Err("not implemented".into())
}

/// The Aliyun SMS client.
pub struct AliyunSms {
    _client: Client,
}

impl AliyunSms {
    /// A client over the shared HTTP pool.
    pub fn new(client: Client) -> Self {
        AliyunSms { _client: client }
    }

    /// Sends `records` (any number; the client splits them into vendor requests), one result
    /// per record in order.
    pub async fn send(
        &self,
        _account: &AliyunAccount,
        records: &[&MessageRecord],
    ) -> Vec<Result<SendOutcome, SendError>> {
        records
            .iter()
            .map(|_| Err(SendError::not_supported("aliyun")))
            .collect()
    }

    /// Pulls receipts for `pending` messages.
    pub async fn pull_receipts(
        &self,
        _account: &AliyunAccount,
        _pending: &[PendingReceipt],
    ) -> Result<Vec<Receipt>, SendError> {
        Ok(Vec::new())
    }
}

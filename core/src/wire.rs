//! Wire formats: the record on `herald.requests` and the delivery event on `herald.delivery`.
//! Both are JSON, versioned by the `v` field, and public contracts (see the README).

use crate::bus::Record;
use crate::domain::{Channel, MessageId, MsgType};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod timestamp;

/// Topic of send requests, keyed by receiver.
pub const REQUESTS_TOPIC: &str = "herald.requests";
/// The consumer group of dispatch workers on [`REQUESTS_TOPIC`].
pub const DISPATCH_GROUP: &str = "herald-dispatch";
/// Topic of delivery events, keyed by receiver so one message's events stay in order.
pub const DELIVERY_TOPIC: &str = "herald.delivery";
/// Topic of request records that could not be processed, with the reason in a header.
pub const REQUESTS_DLQ_TOPIC: &str = "herald.requests.dlq";

/// One message to one receiver, validated and rendered by ingest: everything dispatch needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// Format version of this record.
    pub v: u32,
    pub message_id: MessageId,
    /// One request (an HTTP call or a producer's record) may hold many messages.
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biz_id: Option<String>,
    pub app: String,
    pub template_id: i64,
    pub channel: Channel,
    pub msg_type: MsgType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<i64>,
    pub receiver: String,
    /// The template's content fields with every `{$name}` placeholder replaced.
    pub content: serde_json::Value,
    #[serde(deserialize_with = "timestamp::deserialize")]
    pub accepted_at: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "timestamp::deserialize_option"
    )]
    pub send_at: Option<DateTime<Utc>>,
    /// The receiver's IANA time zone for quiet hours, when the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// How a signed message record's JSON ends: `,"sig":"` + 64 hex digits + `"}`.
const SIG_FIELD: &[u8] = br#","sig":""#;
/// Length of that ending.
const SIG_LEN: usize = SIG_FIELD.len() + 64 + 2;

/// Signs the message records herald's own roles put on `herald.requests`, so that dispatch can
/// tell them from a record a Kafka producer shaped like one: the record's JSON gets a last field
/// `sig`, the HMAC-SHA256 (hex) of the JSON without it, under a key kept in the store (only
/// herald's processes read it). The signature is in the payload, not a Kafka header: tansu, the
/// test broker, fetches records with headers 20 times slower.
#[derive(Clone)]
pub struct RecordSigner {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for RecordSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordSigner(***)")
    }
}

impl RecordSigner {
    /// A signer under `key`.
    pub fn new(key: &[u8]) -> Self {
        RecordSigner {
            mac: Hmac::new_from_slice(key).expect("HMAC takes a key of any length"),
        }
    }

    /// `record` as a signed bus record keyed by its receiver.
    pub fn record(&self, record: &MessageRecord) -> Record {
        let payload =
            serde_json::to_vec(record).expect("a record of strings and numbers serialises");
        self.signed(record.receiver.as_bytes().to_vec(), payload)
    }

    /// A signed bus record of an already serialised message record (a JSON object).
    pub fn signed(&self, key: Vec<u8>, mut payload: Vec<u8>) -> Record {
        let signature = hex::encode(self.mac_of(&payload));
        if payload.last() == Some(&b'}') {
            payload.pop();
        }
        payload.extend_from_slice(SIG_FIELD);
        payload.extend_from_slice(signature.as_bytes());
        payload.extend_from_slice(b"\"}");
        Record::new(key, payload)
    }

    /// Whether `record`'s payload ends with a valid signature of the rest (compared in
    /// constant time).
    pub fn verify(&self, record: &Record) -> bool {
        let p = &record.payload;
        let Some(at) = p.len().checked_sub(SIG_LEN) else {
            return false;
        };
        if !p[at..].starts_with(SIG_FIELD) || !p.ends_with(b"\"}") {
            return false;
        }
        let Ok(signature) = hex::decode(&p[at + SIG_FIELD.len()..p.len() - 2]) else {
            return false;
        };
        let mut mac = self.mac.clone();
        mac.update(&p[..at]);
        mac.update(b"}");
        mac.verify_slice(&signature).is_ok()
    }

    fn mac_of(&self, payload: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }
}

/// A message's state; each change is one [`DeliveryEvent`]. Extends Austin's anchor states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Accepted,
    Received,
    Discarded,
    Blocked,
    Deferred,
    Scheduled,
    DedupContent,
    DedupFrequency,
    Filtered,
    RateLimited,
    Sending,
    Sent,
    SendFailed,
    Retrying,
    Delivered,
    DeliveryFailed,
    Recalled,
    Expired,
}

impl State {
    /// Every state, in pipeline order.
    pub const ALL: [State; 18] = [
        State::Accepted,
        State::Received,
        State::Discarded,
        State::Blocked,
        State::Deferred,
        State::Scheduled,
        State::DedupContent,
        State::DedupFrequency,
        State::Filtered,
        State::RateLimited,
        State::Sending,
        State::Sent,
        State::SendFailed,
        State::Retrying,
        State::Delivered,
        State::DeliveryFailed,
        State::Recalled,
        State::Expired,
    ];

    /// The wire name, as in JSON and in the warehouse.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "accepted",
            State::Received => "received",
            State::Discarded => "discarded",
            State::Blocked => "blocked",
            State::Deferred => "deferred",
            State::Scheduled => "scheduled",
            State::DedupContent => "dedup_content",
            State::DedupFrequency => "dedup_frequency",
            State::Filtered => "filtered",
            State::RateLimited => "rate_limited",
            State::Sending => "sending",
            State::Sent => "sent",
            State::SendFailed => "send_failed",
            State::Retrying => "retrying",
            State::Delivered => "delivered",
            State::DeliveryFailed => "delivery_failed",
            State::Recalled => "recalled",
            State::Expired => "expired",
        }
    }
}

/// One state change of one message. Field names are the public warehouse contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// Deterministic: the same state change emitted twice (after a crash) has the same id, which
    /// is how the warehouse sink drops the copy. See [`event_id`].
    pub event_id: String,
    #[serde(deserialize_with = "timestamp::deserialize")]
    pub ts: DateTime<Utc>,
    pub message_id: MessageId,
    pub request_id: String,
    pub biz_id: Option<String>,
    pub app: String,
    pub template_id: i64,
    pub channel: Channel,
    pub msg_type: MsgType,
    pub receiver: String,
    pub state: State,
    pub vendor: Option<String>,
    pub account_id: Option<i64>,
    pub vendor_message_id: Option<String>,
    pub attempt: u32,
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
    pub latency_ms: Option<u64>,
    pub billing_units: Option<u32>,
    pub cost_micros: Option<i64>,
    pub currency: Option<String>,
    /// Set when dispatch emits an event again for a message the bus redelivered after a crash;
    /// the sink then checks the event id against what it already wrote.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redelivered: bool,
}

impl DeliveryEvent {
    /// The event as a record of `herald.delivery`, keyed by receiver so that one message's
    /// events stay in order on one partition.
    pub fn to_record(&self) -> crate::bus::Record {
        crate::bus::Record::new(
            self.receiver.as_bytes().to_vec(),
            serde_json::to_vec(self).expect("an event of strings and numbers serialises"),
        )
    }

    /// Where the event sorts in its message's trace: time (µs), attempt, then the state's place
    /// in the pipeline order ([`State::ALL`]), which breaks ties within one time and attempt.
    pub fn trace_order(&self) -> (i64, u32, i64) {
        let rank = State::ALL
            .iter()
            .position(|s| *s == self.state)
            .map_or(i64::MAX, |i| i as i64);
        (self.ts.timestamp_micros(), self.attempt, rank)
    }

    /// A bare event for `record` in `state`: vendor fields empty, ts now.
    pub fn for_record(record: &MessageRecord, state: State, attempt: u32) -> Self {
        DeliveryEvent {
            event_id: event_id(&record.message_id, state, attempt),
            ts: Utc::now(),
            message_id: record.message_id,
            request_id: record.request_id.clone(),
            biz_id: record.biz_id.clone(),
            app: record.app.clone(),
            template_id: record.template_id,
            channel: record.channel,
            msg_type: record.msg_type,
            receiver: record.receiver.clone(),
            state,
            vendor: None,
            account_id: record.account_id,
            vendor_message_id: None,
            attempt,
            error_code: None,
            error_detail: None,
            latency_ms: None,
            billing_units: None,
            cost_micros: None,
            currency: None,
            redelivered: false,
        }
    }
}

/// A vendor's delivery receipt for one receiver of a sent message, pushed to
/// `POST /v1/receipts/{vendor}` or pulled by dispatch. It becomes a `delivered` or
/// `delivery_failed` event joined to the message by (`vendor`, `vendor_message_id`, `receiver`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The vendor name as on the `sent` event (`tencent`, `aliyun`, `yunpian`, `dingtalk`, ...).
    pub vendor: String,
    pub vendor_message_id: String,
    /// The receiver as herald sent it (phone numbers in E.164); `None` when the vendor's id
    /// names one receiver already.
    pub receiver: Option<String>,
    /// Whether the vendor reports the message delivered (else failed).
    pub delivered: bool,
    /// The vendor's status or error code, on failure.
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
    /// When the vendor says it happened.
    #[serde(deserialize_with = "timestamp::deserialize")]
    pub at: DateTime<Utc>,
}

/// The event id of `message_id` reaching `state` on `attempt`: the first 16 bytes of a SHA-256,
/// formatted as a UUID. Deterministic so that re-emission after a crash can be recognised.
pub fn event_id(message_id: &MessageId, state: State, attempt: u32) -> String {
    hashed_uuid(&[
        message_id.0.as_bytes(),
        state.as_str().as_bytes(),
        &attempt.to_be_bytes(),
    ])
    .to_string()
}

/// A deterministic UUID of `parts`: the first 16 bytes of their SHA-256, marked as a version-8
/// (custom) UUID with the RFC 4122 variant.
pub fn hashed_uuid(parts: &[&[u8]]) -> uuid::Uuid {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_record() -> MessageRecord {
        MessageRecord {
            v: 1,
            message_id: MessageId::new(),
            request_id: "req".into(),
            biz_id: None,
            app: "shop".into(),
            template_id: 7,
            channel: Channel::Inbox,
            msg_type: MsgType::Notice,
            account_id: None,
            receiver: "u-1".into(),
            content: serde_json::json!({"title": "hi"}),
            accepted_at: Utc::now(),
            send_at: None,
            timezone: None,
        }
    }

    #[test]
    fn only_records_signed_under_the_same_key_verify() {
        let signer = RecordSigner::new(b"key one");
        let sample = sample_record();
        let record = signer.record(&sample);
        assert_eq!(record.key, b"u-1");
        assert!(signer.verify(&record));
        assert!(!RecordSigner::new(b"key two").verify(&record));
        // Still the message record, with one more field.
        let back: MessageRecord = serde_json::from_slice(&record.payload).unwrap();
        assert_eq!(back, sample);
        let text = String::from_utf8(record.payload.clone()).unwrap();
        assert!(text.contains(r#","sig":""#), "{text}");

        let unsigned = Record::new("u-1", serde_json::to_vec(&sample).unwrap());
        assert!(!signer.verify(&unsigned));
        let mut altered = record.clone();
        let at = altered
            .payload
            .windows(4)
            .position(|w| w == b"shop")
            .unwrap();
        altered.payload[at + 3] = b'q';
        assert!(!signer.verify(&altered));
        let mut garbled = record.clone();
        let n = garbled.payload.len();
        garbled.payload[n - 3] = b'x';
        assert!(!signer.verify(&garbled));
        assert!(!signer.verify(&Record::new("k", "}")));
    }

    #[test]
    fn states_serialise_to_their_wire_names() {
        for s in State::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
        }
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let m = MessageId::new();
        assert_eq!(event_id(&m, State::Sent, 1), event_id(&m, State::Sent, 1));
        assert_ne!(event_id(&m, State::Sent, 1), event_id(&m, State::Sent, 2));
        assert_ne!(
            event_id(&m, State::Sent, 1),
            event_id(&m, State::Sending, 1)
        );
        assert_ne!(
            event_id(&m, State::Sent, 1),
            event_id(&MessageId::new(), State::Sent, 1)
        );
    }
}

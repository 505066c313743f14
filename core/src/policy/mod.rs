//! Per-app pipeline policies: the JSON document an app manages through `PUT /v1/policy`, checked
//! and compiled once into the form dispatch evaluates.
//!
//! ```json
//! {
//!   "timezone": "Asia/Shanghai",
//!   "quiet_hours": {"start": "22:00", "end": "08:00", "marketing": "drop", "notice": "defer"},
//!   "content_dedup_secs": 300,
//!   "frequency_caps": [{"channel": "sms", "msg_type": "marketing", "max": 3, "period_secs": 86400}],
//!   "sensitive_words": ["赌博"],
//!   "templates": {"42": {"discarded": true}, "43": {"sensitive_words": "reject"}},
//!   "routes": [{"channel": "sms", "accounts": [{"account_id": 3, "weight": 80}, {"account_id": 4, "weight": 20}]}],
//!   "rate_limits": [{"account_id": 3, "per_second": 3000}]
//! }
//! ```

pub mod quiet_hours;
pub mod rate_limits;
pub mod routes;
pub mod sensitive;

use crate::domain::{Channel, MsgType};
use chrono_tz::Tz;
use quiet_hours::QuietWindow;
use rate_limits::{RateLimit, ReceiverRateLimit};
use routes::Route;
use sensitive::Dictionary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest frequency-cap period and content-dedup window: 31 days.
const MAX_PERIOD_SECS: u64 = 31 * 86_400;

/// An app's policy document, as stored and as the API shows it. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppPolicy {
    /// IANA time zone of receivers whose request names none (default `UTC`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
    /// Drop a message whose template, receiver and rendered content equal one accepted within
    /// this many seconds (`dedup_content`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_dedup_secs: Option<u64>,
    /// At most `max` messages per receiver per period (`dedup_frequency`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub frequency_caps: Vec<FrequencyCap>,
    /// Words matched in every text field of a message; what happens is set per template.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sensitive_words: Vec<String>,
    /// Per-template settings, keyed by template id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<String, TemplatePolicy>,
    /// Weighted vendor accounts per channel (and message type), in place of the template's
    /// account; the first route that matches a message applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// The most messages a second each listed account sends, from all workers together.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
    /// The most messages per period each receiver gets; more wait, they are not dropped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub receiver_rate_limits: Vec<ReceiverRateLimit>,
}

/// A daily quiet-hours window and what it does to each message type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// Local start, `HH:MM` or `HH:MM:SS`.
    pub start: String,
    /// Local end, `HH:MM` or `HH:MM:SS`; before `start` for a window across midnight.
    pub end: String,
    #[serde(default = "QuietMode::drop")]
    pub marketing: QuietMode,
    #[serde(default = "QuietMode::defer")]
    pub notice: QuietMode,
    /// Auth codes are exempt unless this says otherwise.
    #[serde(default = "QuietMode::send")]
    pub auth_code: QuietMode,
}

/// What quiet hours do to a message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuietMode {
    /// Not sent (`discarded`).
    Drop,
    /// Kept durably and sent when the window ends (`deferred`).
    Defer,
    /// Exempt: sent at once.
    Send,
}

impl QuietMode {
    fn drop() -> Self {
        QuietMode::Drop
    }
    fn defer() -> Self {
        QuietMode::Defer
    }
    fn send() -> Self {
        QuietMode::Send
    }
}

/// At most `max` messages per receiver per `period_secs`, on one channel (or all) and for one
/// message type (or all). Periods are fixed windows aligned to midnight in the app's time zone
/// (a period of 86400 is a local calendar day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_type: Option<MsgType>,
    pub max: u32,
    pub period_secs: u64,
}

/// Settings of one template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatePolicy {
    /// The kill switch: every message of the template is `discarded`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub discarded: bool,
    /// What a sensitive word does (default `off`).
    pub sensitive_words: SensitiveAction,
    /// Not counted against frequency caps nor deduplicated (for example a login code template).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exempt_from_dedup: bool,
}

/// What a sensitive word in a message does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensitiveAction {
    #[default]
    Off,
    /// Replaced by `*` (a `filtered` event, then the message is sent).
    Mask,
    /// Not sent (`filtered`).
    Reject,
}

/// An [`AppPolicy`] checked and compiled for evaluation.
#[derive(Debug, Clone)]
pub struct Policy {
    pub timezone: Tz,
    pub quiet_hours: Option<(QuietWindow, QuietHours)>,
    pub content_dedup_secs: Option<u64>,
    pub frequency_caps: Vec<FrequencyCap>,
    pub dictionary: Dictionary,
    pub templates: BTreeMap<i64, TemplatePolicy>,
    pub routes: Vec<Route>,
    pub rate_limits: Vec<RateLimit>,
    pub receiver_rate_limits: Vec<ReceiverRateLimit>,
}

impl Default for Policy {
    fn default() -> Self {
        AppPolicy::default()
            .compile()
            .expect("the empty policy is valid")
    }
}

/// Most sensitive words in one policy document (a shared dictionary file may hold more).
const MAX_APP_WORDS: usize = 10_000;

impl AppPolicy {
    /// Checks the document and compiles it; the error says which field is wrong.
    pub fn compile(&self) -> Result<Policy, String> {
        self.compile_with(&[])
    }

    /// [`Self::compile`], with `shared` sensitive words (the dispatch workers' dictionary file)
    /// added to the app's own.
    pub fn compile_with(&self, shared: &[String]) -> Result<Policy, String> {
        let timezone = match &self.timezone {
            Some(name) => {
                quiet_hours::parse_timezone(name).map_err(|e| format!("timezone: {e}"))?
            }
            None => Tz::UTC,
        };
        let quiet_hours = match &self.quiet_hours {
            Some(q) => Some((
                QuietWindow::parse(&q.start, &q.end).map_err(|e| format!("quiet_hours: {e}"))?,
                q.clone(),
            )),
            None => None,
        };
        if let Some(secs) = self.content_dedup_secs
            && !(1..=MAX_PERIOD_SECS).contains(&secs)
        {
            return Err(format!(
                "content_dedup_secs: {secs} is not between 1 and {MAX_PERIOD_SECS}"
            ));
        }
        for (i, cap) in self.frequency_caps.iter().enumerate() {
            if cap.max == 0 {
                return Err(format!(
                    "frequency_caps[{i}].max: 0 would block everything; use a template's \
                     `discarded` instead"
                ));
            }
            if !(60..=MAX_PERIOD_SECS).contains(&cap.period_secs) {
                return Err(format!(
                    "frequency_caps[{i}].period_secs: {} is not between 60 and {MAX_PERIOD_SECS}",
                    cap.period_secs
                ));
            }
        }
        if self.frequency_caps.len() > 20 {
            return Err("frequency_caps: at most 20 caps".into());
        }
        if self.sensitive_words.len() > MAX_APP_WORDS {
            return Err(format!(
                "sensitive_words: {} words, but at most {MAX_APP_WORDS} are allowed",
                self.sensitive_words.len()
            ));
        }
        let words: Vec<String> = self.sensitive_words.iter().chain(shared).cloned().collect();
        let dictionary = Dictionary::new(&words).map_err(|e| format!("sensitive_words: {e}"))?;
        let mut templates = BTreeMap::new();
        for (id, t) in &self.templates {
            let id: i64 = id
                .parse()
                .map_err(|_| format!("templates: `{id}` is not a template id"))?;
            templates.insert(id, t.clone());
        }
        routes::check(&self.routes)?;
        rate_limits::check(&self.rate_limits)?;
        rate_limits::check_receivers(&self.receiver_rate_limits)?;
        Ok(Policy {
            timezone,
            quiet_hours,
            content_dedup_secs: self.content_dedup_secs,
            frequency_caps: self.frequency_caps.clone(),
            dictionary,
            templates,
            routes: self.routes.clone(),
            rate_limits: self.rate_limits.clone(),
            receiver_rate_limits: self.receiver_rate_limits.clone(),
        })
    }
}

impl Policy {
    /// The settings of template `id` (the defaults when it has none).
    pub fn template(&self, id: i64) -> TemplatePolicy {
        self.templates.get(&id).cloned().unwrap_or_default()
    }

    /// The route of a message of `channel` and `msg_type`, when one matches.
    pub fn route(&self, channel: Channel, msg_type: MsgType) -> Option<&Route> {
        routes::route_for(&self.routes, channel, msg_type)
    }

    /// The rate limit of `account`, per second, when the app set one.
    pub fn rate_limit(&self, account: i64) -> Option<u32> {
        self.rate_limits
            .iter()
            .find(|l| l.account_id == account)
            .map(|l| l.per_second)
    }

    /// The per-receiver limits that apply to a message of `channel` and `msg_type`, with their
    /// index (which names the limit in its timeline's key).
    pub fn receiver_limits_for(
        &self,
        channel: Channel,
        msg_type: MsgType,
    ) -> impl Iterator<Item = (usize, &ReceiverRateLimit)> {
        self.receiver_rate_limits
            .iter()
            .enumerate()
            .filter(move |(_, l)| {
                l.channel.is_none_or(|c| c == channel) && l.msg_type.is_none_or(|m| m == msg_type)
            })
    }

    /// The quiet-hours mode for `msg_type`, when the app has quiet hours.
    pub fn quiet_mode(&self, msg_type: MsgType) -> Option<(QuietWindow, QuietMode)> {
        self.quiet_hours.as_ref().map(|(w, q)| {
            let mode = match msg_type {
                MsgType::Marketing => q.marketing,
                MsgType::Notice => q.notice,
                MsgType::AuthCode => q.auth_code,
            };
            (*w, mode)
        })
    }

    /// The caps that apply to a message of `channel` and `msg_type`, with their index (which
    /// names the cap in its counter).
    pub fn caps_for(
        &self,
        channel: Channel,
        msg_type: MsgType,
    ) -> impl Iterator<Item = (usize, &FrequencyCap)> {
        self.frequency_caps
            .iter()
            .enumerate()
            .filter(move |(_, c)| {
                c.channel.is_none_or(|ch| ch == channel) && c.msg_type.is_none_or(|m| m == msg_type)
            })
    }
}

/// The start (unix ms) of the fixed window of `period_secs` holding `at_ms`, windows aligned to
/// local midnight in `tz` (so a period of one day is the local calendar day).
pub fn window_start(at_ms: i64, period_secs: u64, tz: Tz) -> i64 {
    use chrono::{Offset, TimeZone};
    let at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default();
    let offset_ms = i64::from(
        tz.offset_from_utc_datetime(&at.naive_utc())
            .fix()
            .local_minus_utc(),
    ) * 1000;
    let period_ms = period_secs as i64 * 1000;
    let local = at_ms + offset_ms;
    local - local.rem_euclid(period_ms) - offset_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_document_compiles() {
        let doc: AppPolicy = serde_json::from_value(json!({
            "timezone": "Asia/Shanghai",
            "quiet_hours": {"start": "22:00", "end": "08:00"},
            "content_dedup_secs": 300,
            "frequency_caps": [{"channel": "sms", "msg_type": "marketing", "max": 3, "period_secs": 86400}],
            "sensitive_words": ["赌博"],
            "templates": {"42": {"discarded": true}, "43": {"sensitive_words": "reject"}}
        }))
        .unwrap();
        let p = doc.compile().unwrap();
        assert_eq!(p.timezone, Tz::Asia__Shanghai);
        assert!(p.template(42).discarded);
        assert_eq!(p.template(43).sensitive_words, SensitiveAction::Reject);
        assert_eq!(p.template(1), TemplatePolicy::default());
        let (_, q) = p.quiet_hours.as_ref().unwrap();
        assert_eq!(
            (q.marketing, q.notice, q.auth_code),
            (QuietMode::Drop, QuietMode::Defer, QuietMode::Send)
        );
        assert_eq!(p.caps_for(Channel::Sms, MsgType::Marketing).count(), 1);
        assert_eq!(p.caps_for(Channel::Sms, MsgType::Notice).count(), 0);
        assert_eq!(p.caps_for(Channel::Email, MsgType::Marketing).count(), 0);
    }

    #[test]
    fn bad_documents_name_the_field() {
        for (doc, field) in [
            (json!({"timezone": "Mars/Base"}), "timezone"),
            (
                json!({"quiet_hours": {"start": "25:00", "end": "08:00"}}),
                "quiet_hours",
            ),
            (json!({"content_dedup_secs": 0}), "content_dedup_secs"),
            (
                json!({"frequency_caps": [{"max": 0, "period_secs": 3600}]}),
                "frequency_caps[0].max",
            ),
            (
                json!({"frequency_caps": [{"max": 1, "period_secs": 5}]}),
                "frequency_caps[0].period_secs",
            ),
            (json!({"sensitive_words": [""]}), "sensitive_words"),
            (json!({"templates": {"x": {}}}), "templates"),
        ] {
            let p: AppPolicy = serde_json::from_value(doc.clone()).unwrap();
            let e = p.compile().unwrap_err();
            assert!(e.starts_with(field), "{doc}: {e}");
        }
        assert!(serde_json::from_value::<AppPolicy>(json!({"quiet": 1})).is_err());
    }

    #[test]
    fn windows_align_to_local_midnight() {
        // 2026-11-27 01:30 in Shanghai is 2026-11-26 17:30 UTC; its local day began at
        // 2026-11-26 16:00 UTC.
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-26T17:30:00Z").unwrap();
        let start = window_start(at.timestamp_millis(), 86_400, Tz::Asia__Shanghai);
        let want = chrono::DateTime::parse_from_rfc3339("2026-11-26T16:00:00Z").unwrap();
        assert_eq!(start, want.timestamp_millis());
        let hour = window_start(at.timestamp_millis(), 3600, Tz::UTC);
        let want = chrono::DateTime::parse_from_rfc3339("2026-11-26T17:00:00Z").unwrap();
        assert_eq!(hour, want.timestamp_millis());
    }

    proptest::proptest! {
        #[test]
        fn an_instant_lies_in_its_window(at in 1_577_836_800_000i64..2_082_758_400_000, period in 60u64..=2_678_400) {
            for tz in [Tz::UTC, Tz::Asia__Shanghai, Tz::Asia__Kolkata] {
                let start = window_start(at, period, tz);
                proptest::prop_assert!(start <= at && at < start + period as i64 * 1000);
            }
        }
    }
}

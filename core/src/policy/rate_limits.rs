//! Rate limits of vendor accounts, in the policy document of the app that owns them, and the
//! priority lanes that share them.
//!
//! A limit holds across every dispatch worker (see `Store::reserve_rate`). Lanes are message
//! types: an auth code may reserve slots up to [`horizon`] ahead of now, a notice a little, a
//! marketing message only when nothing is waiting, so a marketing blast never builds a queue in
//! front of a login code.

use crate::domain::MsgType;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Most rate limits in one policy document.
const MAX_LIMITS: usize = 100;
/// Highest limit: a million messages a second.
const MAX_PER_SECOND: u32 = 1_000_000;

/// At most `per_second` messages a second through one account, from every worker together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub account_id: i64,
    pub per_second: u32,
}

/// At most `max` messages per `period_secs` to one receiver (on one channel and/or of one
/// message type, or all), from every worker together; messages over it wait (`rate_limited`)
/// instead of being dropped. Paced evenly: one every `period_secs / max`, after a burst of
/// `max`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::domain::Channel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_type: Option<MsgType>,
    pub max: u32,
    pub period_secs: u64,
}

impl ReceiverRateLimit {
    /// The pace (one message per this many µs) and the burst allowance (µs).
    pub fn pace(&self) -> (i64, i64) {
        let period_us = self.period_secs as i64 * 1_000_000;
        let interval = (period_us / i64::from(self.max.max(1))).max(1);
        (interval, period_us - interval)
    }
}

/// Checks the per-receiver limits of a document; the error names the bad field.
pub fn check_receivers(limits: &[ReceiverRateLimit]) -> Result<(), String> {
    if limits.len() > 20 {
        return Err("receiver_rate_limits: at most 20 limits".into());
    }
    for (i, l) in limits.iter().enumerate() {
        if !(1..=10_000).contains(&l.max) {
            return Err(format!(
                "receiver_rate_limits[{i}].max: {} is not between 1 and 10000",
                l.max
            ));
        }
        if !(1..=86_400).contains(&l.period_secs) {
            return Err(format!(
                "receiver_rate_limits[{i}].period_secs: {} is not between 1 and 86400",
                l.period_secs
            ));
        }
    }
    Ok(())
}

/// Checks the rate limits of a document; the error names the bad field.
pub fn check(limits: &[RateLimit]) -> Result<(), String> {
    if limits.len() > MAX_LIMITS {
        return Err(format!("rate_limits: at most {MAX_LIMITS} limits"));
    }
    for (i, l) in limits.iter().enumerate() {
        if !(1..=MAX_PER_SECOND).contains(&l.per_second) {
            return Err(format!(
                "rate_limits[{i}].per_second: {} is not between 1 and {MAX_PER_SECOND}",
                l.per_second
            ));
        }
        if limits[..i].iter().any(|m| m.account_id == l.account_id) {
            return Err(format!(
                "rate_limits[{i}]: account {} has a limit already",
                l.account_id
            ));
        }
    }
    Ok(())
}

/// How far ahead of now a message of `lane` may reserve an account's time: the queue it may
/// join. Lower lanes wait until the queue is shorter than theirs.
pub fn horizon(lane: MsgType) -> Duration {
    match lane {
        MsgType::AuthCode => Duration::from_secs(2),
        MsgType::Notice => Duration::from_millis(200),
        MsgType::Marketing => Duration::ZERO,
    }
}

/// A lane's rank: 0 (auth codes) goes first.
pub fn lane_rank(lane: MsgType) -> usize {
    match lane {
        MsgType::AuthCode => 0,
        MsgType::Notice => 1,
        MsgType::Marketing => 2,
    }
}

/// The more urgent of two lanes.
pub fn most_urgent(a: MsgType, b: MsgType) -> MsgType {
    if lane_rank(b) < lane_rank(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_limits_name_the_field() {
        let l = |account_id, per_second| RateLimit {
            account_id,
            per_second,
        };
        assert!(check(&[l(1, 3000), l(2, 1)]).is_ok());
        assert!(
            check(&[l(1, 0)])
                .unwrap_err()
                .starts_with("rate_limits[0].per_second")
        );
        assert!(
            check(&[l(1, 5), l(1, 6)])
                .unwrap_err()
                .starts_with("rate_limits[1]")
        );
    }

    #[test]
    fn lanes_rank_auth_codes_first() {
        assert!(horizon(MsgType::AuthCode) > horizon(MsgType::Notice));
        assert!(horizon(MsgType::Notice) > horizon(MsgType::Marketing));
        assert_eq!(
            most_urgent(MsgType::Marketing, MsgType::AuthCode),
            MsgType::AuthCode
        );
        assert_eq!(
            most_urgent(MsgType::Notice, MsgType::Marketing),
            MsgType::Notice
        );
    }
}

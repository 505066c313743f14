//! Reading the RFC 3339 times of herald's records without chrono's general format parser.
//!
//! Every record and event herald writes carries its times as chrono serialises a
//! `DateTime<Utc>`: `YYYY-MM-DDTHH:MM:SS`, a fraction of up to nine digits when it is not zero,
//! and `Z`. [`deserialize`] reads that layout (and a `+00:00` offset) directly, without chrono's
//! general format machinery (the sink decodes millions of events); anything else (other
//! offsets, lower-case letters, a leap second, bad input) goes to chrono's parser, so the result
//! and the errors are always chrono's own.

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use serde::de::{self, Deserializer, Visitor};
use std::fmt;

/// Deserialises a `DateTime<Utc>` from a string to the same value, or the same error, as
/// chrono's `Deserialize`, faster for the layout herald writes. (A value that is not a string
/// gets serde's type error, worded differently.) Use with `#[serde(deserialize_with = "…")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    deserializer.deserialize_str(Rfc3339)
}

/// [`deserialize`] for an optional time (`null` or absent is `None`).
pub fn deserialize_option<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    deserializer.deserialize_option(OptionalRfc3339)
}

/// Parses `s` as chrono's `DateTime<FixedOffset>` parser would, in UTC.
fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match parse_utc_layout(s.as_bytes()) {
        Some(t) => Ok(t),
        None => s
            .parse::<DateTime<FixedOffset>>()
            .map(|t| t.with_timezone(&Utc)),
    }
}

/// The fast path: `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+00:00)`, or `None` for anything else.
fn parse_utc_layout(b: &[u8]) -> Option<DateTime<Utc>> {
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let (month, day) = (digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    let mut rest = &b[19..];
    let mut nanos = 0;
    if let Some((b'.', fraction)) = rest.split_first() {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(&fraction[..n])? * 10u32.pow(9 - n as u32);
        rest = &fraction[n..];
    }
    if rest != b"Z" && rest != b"+00:00" {
        return None;
    }
    // A leap second (`:60`) and every invalid field go to chrono.
    NaiveDate::from_ymd_opt(year as i32, month, day)?
        .and_hms_nano_opt(hour, minute, second, nanos)
        .map(|t| t.and_utc())
}

/// The value of a run of ASCII digits (at most nine), or `None` if one is not a digit.
fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

struct Rfc3339;

impl Visitor<'_> for Rfc3339 {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        parse(s).map_err(E::custom)
    }
}

struct OptionalRfc3339;

impl<'de> Visitor<'de> for OptionalRfc3339 {
    type Value = Option<DateTime<Utc>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an RFC 3339 date and time or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{SecondsFormat, TimeZone};
    use proptest::prelude::*;

    /// chrono's own deserialiser: what [`parse`] must always agree with.
    fn chrono_parse(s: &str) -> Result<DateTime<Utc>, String> {
        serde_json::from_value::<DateTime<Utc>>(serde_json::Value::String(s.into()))
            .map_err(|e| e.to_string())
    }

    fn ours(s: &str) -> Result<DateTime<Utc>, String> {
        #[derive(serde::Deserialize)]
        struct T(#[serde(deserialize_with = "deserialize")] DateTime<Utc>);
        serde_json::from_value::<T>(serde_json::Value::String(s.into()))
            .map(|t| t.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn agrees_with_chrono_on_layouts_and_bad_input() {
        for s in [
            "2026-11-28T15:35:38Z",
            "2026-11-28T15:35:38.1Z",
            "2026-11-28T15:35:38.120Z",
            "2026-11-28T15:35:38.123456Z",
            "2026-11-28T15:35:38.123456789Z",
            "2026-11-28T15:35:38.123456789+00:00",
            "2026-11-28T23:35:38.5+08:00",
            "2026-11-28t15:35:38z",
            "2026-11-28 15:35:38Z",
            "2024-02-29T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2016-12-31T23:59:60Z",
            "2026-11-28T15:35:38.1234567890Z",
            "2026-11-28T15:35:38.Z",
            "2026-11-28T15:35:38",
            "2026-11-28T15:35:38Zjunk",
            "+2026-11-28T15:35:38Z",
            "2026-1x-28T15:35:38Z",
            "",
        ] {
            assert_eq!(ours(s), chrono_parse(s), "{s:?}");
        }
    }

    #[test]
    fn optional_times_read_null_absent_and_values() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct T {
            #[serde(default, deserialize_with = "deserialize_option")]
            at: Option<DateTime<Utc>>,
        }
        let read = |j: &str| serde_json::from_str::<T>(j).map(|t| t.at).ok();
        assert_eq!(read("{}"), Some(None));
        assert_eq!(read(r#"{"at":null}"#), Some(None));
        assert_eq!(
            read(r#"{"at":"2026-11-28T15:35:38Z"}"#),
            Some(Some(
                Utc.with_ymd_and_hms(2026, 11, 28, 15, 35, 38).unwrap()
            ))
        );
        assert_eq!(read(r#"{"at":"yesterday"}"#), None);
    }

    proptest! {
        /// Every time chrono writes (any precision) reads back the same, as chrono reads it.
        #[test]
        fn reads_what_chrono_writes(secs in -62_000_000_000i64..250_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            let written = serde_json::to_value(t).unwrap();
            let s = written.as_str().unwrap();
            prop_assert_eq!(ours(s), Ok(t));
            for format in [SecondsFormat::Secs, SecondsFormat::Millis, SecondsFormat::Micros, SecondsFormat::Nanos] {
                let s = t.to_rfc3339_opts(format, false);
                prop_assert_eq!(ours(&s), chrono_parse(&s));
            }
        }
    }
}

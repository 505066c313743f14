//! Quiet hours: a daily window of local time, read in a receiver's time zone, during which
//! messages are not sent. [`QuietWindow::ends_after`] says whether an instant falls inside the
//! window and, if it does, the instant the window is over, with daylight-saving gaps and folds
//! resolved.

use chrono::{DateTime, MappedLocalTime, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// A daily window of local time in which messages are not sent, e.g. 22:00–08:00.
///
/// It holds the local times `t` with `start <= t < end`, or, for a window across midnight
/// (`start > end`), those with `t >= start || t < end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietWindow {
    start: NaiveTime,
    end: NaiveTime,
}

impl QuietWindow {
    /// Parses `HH:MM` (or `HH:MM:SS`) start and end, 24-hour; an empty window (start == end)
    /// is an error.
    pub fn parse(start: &str, end: &str) -> Result<Self, String> {
        let (start, end) = (parse_hhmm(start)?, parse_hhmm(end)?);
        if start == end {
            return Err(format!(
                "start and end are both {}: the window would be empty",
                start.format("%H:%M")
            ));
        }
        Ok(Self { start, end })
    }

    /// When `at`, read as local time in `tz`, falls inside the window, the first UTC instant
    /// after `at` at which the window is over (local `end` on the right day); else `None`.
    ///
    /// An `end` skipped by a daylight-saving gap is the first instant after the gap; an `end`
    /// repeated by a fold is the earlier of its instants that is after `at`. Should the gap
    /// also have skipped past the next `start`, the window never paused, and the next end counts.
    pub fn ends_after(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&tz).naive_local();
        if !self.contains(local.time()) {
            return None;
        }
        let mut day = local.date();
        if local.time() >= self.end {
            // Inside a window across midnight, before midnight: it ends tomorrow.
            day = day.succ_opt()?;
        }
        let end = first_instant(tz, day.and_time(self.end), at);
        Some(self.ends_after(end, tz).unwrap_or(end))
    }

    /// Whether local time `t` falls inside the window.
    fn contains(&self, t: NaiveTime) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&t)
        } else {
            t >= self.start || t < self.end
        }
    }
}

/// Parses an IANA time zone name (`Asia/Shanghai`, `UTC`); a readable error otherwise.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse()
        .map_err(|_| format!("{name:?} is not an IANA time zone name such as \"Asia/Shanghai\""))
}

/// Parses a strict `HH:MM` or `HH:MM:SS`, 00:00 to 23:59:59.
fn parse_hhmm(s: &str) -> Result<NaiveTime, String> {
    let b = s.as_bytes();
    let pair = |i: usize| b[i].is_ascii_digit() && b[i + 1].is_ascii_digit();
    let shaped = (b.len() == 5 || (b.len() == 8 && b[5] == b':' && pair(6) && b[6] < b'6'))
        && b[2] == b':'
        && pair(0)
        && pair(3);
    let invalid = || format!("{s:?} is not a time HH:MM (or HH:MM:SS) between 00:00 and 23:59");
    if !shaped {
        return Err(invalid());
    }
    let format = if b.len() == 5 { "%H:%M" } else { "%H:%M:%S" };
    NaiveTime::parse_from_str(s, format).map_err(|_| invalid())
}

/// The instant local time `local` has in `tz`, looking past `at`: in a fold the earlier instant
/// after `at`, in a gap the first instant after the gap (found minute by minute, as zone
/// transitions fall on whole minutes).
fn first_instant(tz: Tz, mut local: NaiveDateTime, at: DateTime<Utc>) -> DateTime<Utc> {
    loop {
        match tz.from_local_datetime(&local) {
            MappedLocalTime::Single(t) => return t.with_timezone(&Utc),
            MappedLocalTime::Ambiguous(earlier, later) => {
                let earlier = earlier.with_timezone(&Utc);
                return if earlier > at {
                    earlier
                } else {
                    later.with_timezone(&Utc)
                };
            }
            MappedLocalTime::None => local += TimeDelta::minutes(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn window(start: &str, end: &str) -> QuietWindow {
        QuietWindow::parse(start, end).unwrap()
    }

    #[test]
    fn a_window_across_midnight_in_shanghai() {
        let (w, tz) = (window("22:00", "08:00"), Tz::Asia__Shanghai);
        // Shanghai is UTC+8 all year: local 2026-03-08 08:00 is 2026-03-08T00:00Z.
        let end = Some(utc("2026-03-08T00:00:00Z"));
        assert_eq!(
            w.ends_after(utc("2026-03-07T15:30:00Z"), tz),
            end,
            "23:30 the day before"
        );
        assert_eq!(w.ends_after(utc("2026-03-07T19:00:00Z"), tz), end, "03:00");
        assert_eq!(
            w.ends_after(utc("2026-03-07T14:00:00Z"), tz),
            end,
            "22:00 is inside"
        );
        assert_eq!(
            w.ends_after(utc("2026-03-07T23:59:59Z"), tz),
            end,
            "07:59:59"
        );
        assert_eq!(
            w.ends_after(utc("2026-03-08T00:00:00Z"), tz),
            None,
            "08:00 is outside"
        );
        assert_eq!(w.ends_after(utc("2026-03-08T04:00:00Z"), tz), None, "12:00");
        assert_eq!(
            w.ends_after(utc("2026-03-08T13:59:59Z"), tz),
            None,
            "21:59:59"
        );
    }

    #[test]
    fn a_daytime_window() {
        let (w, tz) = (window("12:00", "14:00"), Tz::Asia__Shanghai);
        let end = Some(utc("2026-05-01T06:00:00Z"));
        assert_eq!(w.ends_after(utc("2026-05-01T04:00:00Z"), tz), end, "12:00");
        assert_eq!(w.ends_after(utc("2026-05-01T05:59:00Z"), tz), end, "13:59");
        assert_eq!(w.ends_after(utc("2026-05-01T06:00:00Z"), tz), None, "14:00");
        assert_eq!(
            w.ends_after(utc("2026-05-01T03:59:59Z"), tz),
            None,
            "11:59:59"
        );
        assert_eq!(w.ends_after(utc("2026-05-01T15:00:00Z"), tz), None, "23:00");
    }

    #[test]
    fn an_end_in_a_spring_forward_gap_is_the_end_of_the_gap() {
        // New York, 2026-03-08: 02:00 EST (07:00Z) jumps to 03:00 EDT.
        let tz = Tz::America__New_York;
        let at = utc("2026-03-08T06:30:00Z"); // 01:30 EST
        let end = Some(utc("2026-03-08T07:00:00Z")); // 03:00 EDT
        assert_eq!(window("01:00", "03:00").ends_after(at, tz), end);
        assert_eq!(window("01:00", "02:30").ends_after(at, tz), end);
        assert_eq!(window("22:00", "02:30").ends_after(at, tz), end);
        // 23:00 EST the evening before.
        assert_eq!(
            window("22:00", "02:30").ends_after(utc("2026-03-08T04:00:00Z"), tz),
            end
        );
        // The gap skipped both the end (02:30) and the next start (02:45): no pause that day.
        assert_eq!(
            window("02:45", "02:30").ends_after(at, tz),
            Some(utc("2026-03-09T06:30:00Z"))
        );
    }

    #[test]
    fn an_end_in_a_fall_back_fold_is_the_first_after_the_instant() {
        // New York, 2026-11-01: 02:00 EDT (06:00Z) falls back to 01:00 EST, so 01:00–02:00
        // happens twice: 05:00Z–06:00Z (EDT), then 06:00Z–07:00Z (EST).
        let tz = Tz::America__New_York;
        let w = window("00:00", "01:30");
        assert_eq!(
            w.ends_after(utc("2026-11-01T04:30:00Z"), tz),
            Some(utc("2026-11-01T05:30:00Z")),
            "00:30 EDT ends at 01:30 EDT"
        );
        assert_eq!(
            w.ends_after(utc("2026-11-01T06:15:00Z"), tz),
            Some(utc("2026-11-01T06:30:00Z")),
            "01:15 EST ends at 01:30 EST"
        );
        assert_eq!(
            w.ends_after(utc("2026-11-01T05:45:00Z"), tz),
            None,
            "01:45 EDT"
        );
        assert_eq!(
            window("01:00", "03:00").ends_after(utc("2026-11-01T05:30:00Z"), tz),
            Some(utc("2026-11-01T08:00:00Z")),
            "01:30 EDT ends at 03:00 EST"
        );
    }

    #[test]
    fn malformed_windows_are_errors() {
        for (start, end) in [
            ("24:00", "08:00"),
            ("22:00", "08:60"),
            ("8:00", "09:00"),
            ("08:00:60", "09:00"),
            ("08:00:0", "09:00"),
            ("0800", "0900"),
            ("+8:00", "09:00"),
            ("ab:cd", "09:00"),
            ("", "09:00"),
            ("08:00", "08:00"),
        ] {
            assert!(QuietWindow::parse(start, end).is_err(), "{start}–{end}");
        }
        assert!(QuietWindow::parse("00:00", "23:59").is_ok());
        assert!(QuietWindow::parse("08:00:30", "09:00").is_ok());
    }

    #[test]
    fn time_zones_parse_by_iana_name() {
        assert_eq!(parse_timezone("UTC"), Ok(Tz::UTC));
        assert_eq!(parse_timezone("Asia/Shanghai"), Ok(Tz::Asia__Shanghai));
        for bad in ["", "Mars/Base", "+08:00"] {
            let e = parse_timezone(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    const ZONES: [Tz; 6] = [
        Tz::UTC,
        Tz::Asia__Shanghai,
        Tz::America__New_York,
        Tz::Europe__London,
        Tz::Australia__Lord_Howe,
        Tz::Asia__Kolkata,
    ];

    /// The window's definition, restated over minutes of the day.
    fn inside(start: u32, end: u32, t: NaiveTime) -> bool {
        let m = t.hour() * 60 + t.minute();
        if start < end {
            (start..end).contains(&m)
        } else {
            m >= start || m < end
        }
    }

    proptest! {
        #[test]
        fn the_end_is_the_first_instant_outside_the_window(
            start in 0u32..1440,
            end in 0u32..1440,
            // 2020-01-01 to 2035-12-31, UTC.
            secs in 1_577_836_800i64..2_082_758_400,
            tz in proptest::sample::select(ZONES.to_vec()),
        ) {
            prop_assume!(start != end);
            let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
            let w = window(&hhmm(start), &hhmm(end));
            let at = DateTime::from_timestamp(secs, 0).unwrap();
            let local_time = |t: DateTime<Utc>| t.with_timezone(&tz).time();
            match w.ends_after(at, tz) {
                Some(e) => {
                    prop_assert!(inside(start, end, local_time(at)));
                    prop_assert!(e > at);
                    prop_assert!(e - at <= TimeDelta::hours(25));
                    prop_assert!(!inside(start, end, local_time(e)));
                    prop_assert_eq!(w.ends_after(e, tz), None);
                    if [Tz::UTC, Tz::Asia__Shanghai, Tz::Asia__Kolkata].contains(&tz) {
                        for t in [at + (e - at) / 4, at + (e - at) / 2, e - TimeDelta::seconds(1)] {
                            prop_assert!(inside(start, end, local_time(t)), "{t}");
                        }
                    }
                }
                None => prop_assert!(!inside(start, end, local_time(at))),
            }
        }
    }
}

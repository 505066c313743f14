//! Cron schedules of campaigns: 5 fields (minute, hour, day of month, month, day of week) or 6
//! with seconds first, read in a time zone, so `0 9 * * *` in `Asia/Shanghai` is 09:00 there
//! whatever the season (a wall-clock time skipped by a DST change runs when the clock resumes).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed cron expression and the time zone it is read in.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `expr` (5 or 6 fields); the error says why it is not a schedule, including one
    /// that never fires (`0 0 30 2 *`).
    pub(crate) fn parse(expr: &str, tz: Tz) -> Result<Schedule, String> {
        let fields = expr.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "a cron expression has 5 fields (minute hour day month weekday) or 6 (seconds \
                 first), got {fields}"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| format!("{expr:?} is not a cron expression: {e}"))?;
        let schedule = Schedule { cron, tz };
        if schedule.next_after(Utc::now()).is_none() {
            return Err(format!("{expr:?} never fires"));
        }
        Ok(schedule)
    }

    /// The first time the schedule fires strictly after `after`.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn five_fields_are_read_in_the_time_zone() {
        let s = Schedule::parse("0 9 * * *", Tz::Asia__Shanghai).unwrap();
        // 09:00 in Shanghai is 01:00 UTC; at 02:00 UTC today's has passed.
        assert_eq!(
            s.next_after(utc(2024, 3, 1, 0, 30, 0)),
            Some(utc(2024, 3, 1, 1, 0, 0))
        );
        assert_eq!(
            s.next_after(utc(2024, 3, 1, 2, 0, 0)),
            Some(utc(2024, 3, 2, 1, 0, 0))
        );
        // Strictly after: a run finishing at the exact time does not fire again.
        assert_eq!(
            s.next_after(utc(2024, 3, 1, 1, 0, 0)),
            Some(utc(2024, 3, 2, 1, 0, 0))
        );
    }

    #[test]
    fn six_fields_have_seconds() {
        let s = Schedule::parse("*/2 * * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(utc(2024, 3, 1, 0, 0, 1)),
            Some(utc(2024, 3, 1, 0, 0, 2))
        );
        assert_eq!(
            s.next_after(utc(2024, 3, 1, 0, 0, 2)),
            Some(utc(2024, 3, 1, 0, 0, 4))
        );
    }

    #[test]
    fn daylight_saving_time_keeps_the_wall_clock() {
        let s = Schedule::parse("30 8 * * MON", Tz::Europe__Berlin).unwrap();
        // Before the change on 31 March 2024 Berlin is UTC+1, after it UTC+2.
        assert_eq!(
            s.next_after(utc(2024, 3, 20, 0, 0, 0)),
            Some(utc(2024, 3, 25, 7, 30, 0))
        );
        assert_eq!(
            s.next_after(utc(2024, 3, 26, 0, 0, 0)),
            Some(utc(2024, 4, 1, 6, 30, 0))
        );
        // 02:30 does not exist on 31 March in Berlin: that day's run is at 03:00 local.
        let gap = Schedule::parse("30 2 * * *", Tz::Europe__Berlin).unwrap();
        assert_eq!(
            gap.next_after(utc(2024, 3, 30, 12, 0, 0)),
            Some(utc(2024, 3, 31, 1, 0, 0))
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        for (expr, why) in [
            ("* * * *", "5 fields"),
            ("* * * * * * *", "got 7"),
            ("61 * * * *", "not a cron expression"),
            ("0 0 30 2 *", "never fires"),
            ("every day", "got 2"),
        ] {
            let e = Schedule::parse(expr, Tz::UTC).unwrap_err();
            assert!(e.contains(why), "{expr}: {e}");
        }
    }
}

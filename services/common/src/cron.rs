//! Cron expressions of `[schedules.<name>]` (docs/actions.md#schedules): parsing, and the next
//! and previous times they name, in UTC. Pure code, no I/O.
//!
//! Five fields, `minute hour day-of-month month day-of-week`, or six with `second` first. Each
//! field is `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`, or a comma-separated list of
//! those. Day of week is 0-7 (0 and 7 are Sunday). As in cron, when both day fields are
//! restricted a day matching either runs. Names (`MON`, `JAN`) and `L`, `W`, `#`, `?` are not
//! supported.

use jiff::civil::{Date, DateTime, Time};
use jiff::{Timestamp, tz::TimeZone};

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

/// Years searched for the next or previous time before giving up (an impossible date like
/// 31 February).
const SEARCH_DAYS: i64 = 366 * 5;

fn field(text: &str, min: u32, max: u32, what: &str) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{what}: step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{what}: a step of 0"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u32 = a
                .parse()
                .map_err(|_| format!("{what}: {a:?} is not a number"))?;
            let b: u32 = b
                .parse()
                .map_err(|_| format!("{what}: {b:?} is not a number"))?;
            (a, b)
        } else {
            let a: u32 = range
                .parse()
                .map_err(|_| format!("{what}: {range:?} is not a number"))?;
            // `a/n` means from a to the end, every n.
            (a, if part.contains('/') { max } else { a })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!(
                "{what}: {part:?} is outside {min}-{max} (or its range is reversed)"
            ));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl Cron {
    /// Parses `expr`; `Err` says which field is wrong.
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let (second, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(format!(
                    "cron {expr:?} has {n} fields; 5 (minute hour day month weekday) or 6 (second first)"
                ));
            }
        };
        let mut weekdays = field(rest[4], 0, 7, "day of week")?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        Ok(Cron {
            seconds: field(second, 0, 59, "second")?,
            minutes: field(rest[0], 0, 59, "minute")?,
            hours: field(rest[1], 0, 23, "hour")?,
            days: field(rest[2], 1, 31, "day of month")?,
            months: field(rest[3], 1, 12, "month")?,
            weekdays,
            days_restricted: rest[2] != "*",
            weekdays_restricted: rest[4] != "*",
        })
    }

    fn day_matches(&self, date: Date) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << date.day()) != 0;
        let dow = self.weekdays & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The times of day of `date` this expression names, in order (as seconds of the day).
    fn times(&self) -> impl DoubleEndedIterator<Item = i64> + '_ {
        (0..24i64)
            .filter(|h| self.hours & (1 << h) != 0)
            .flat_map(move |h| {
                (0..60i64)
                    .filter(|m| self.minutes & (1 << m) != 0)
                    .flat_map(move |m| {
                        (0..60i64)
                            .filter(|s| self.seconds & (1 << s) != 0)
                            .map(move |s| h * 3600 + m * 60 + s)
                    })
            })
    }

    /// The first time strictly after `after` (UTC); `None` when none comes within five years.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = after.to_zoned_datetime(TimeZone::UTC).datetime();
        let start_secs = i64::from(start.hour()) * 3600
            + i64::from(start.minute()) * 60
            + i64::from(start.second());
        let mut date = start.date();
        for day in 0..SEARCH_DAYS {
            if self.day_matches(date) {
                let found = self
                    .times()
                    .find(|&t| day > 0 || t > start_secs)
                    .and_then(|t| at(date, t));
                if found.is_some() {
                    return found;
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }

    /// The last time at or before `at_or_before` (UTC); `None` when none was within five years.
    pub fn prev_at_or_before(&self, at_or_before: Timestamp) -> Option<Timestamp> {
        let start = at_or_before.to_zoned_datetime(TimeZone::UTC).datetime();
        let start_secs = i64::from(start.hour()) * 3600
            + i64::from(start.minute()) * 60
            + i64::from(start.second());
        let mut date = start.date();
        for day in 0..SEARCH_DAYS {
            if self.day_matches(date) {
                let found = self
                    .times()
                    .rev()
                    .find(|&t| day > 0 || t <= start_secs)
                    .and_then(|t| at(date, t));
                if found.is_some() {
                    return found;
                }
            }
            date = date.yesterday().ok()?;
        }
        None
    }
}

fn at(date: Date, secs: i64) -> Option<Timestamp> {
    let time = Time::new(
        i8::try_from(secs / 3600).ok()?,
        i8::try_from(secs / 60 % 60).ok()?,
        i8::try_from(secs % 60).ok()?,
        0,
    )
    .ok()?;
    DateTime::from_parts(date, time)
        .to_zoned_datetime(TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn parses_and_refuses_naming_the_field() {
        assert!(Cron::parse("0 3 * * *").is_ok());
        assert!(Cron::parse("*/2 * * * * *").is_ok());
        assert!(Cron::parse("0 0 1,15 * 1-5").is_ok());
        for (bad, says) in [
            ("* * * *", "4 fields"),
            ("61 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * MON", "day of week"),
            ("*/0 * * * *", "step of 0"),
            ("5-2 * * * *", "reversed"),
        ] {
            let err = Cron::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn next_and_previous_times() {
        let c = Cron::parse("0 3 * * *").expect("cron");
        assert_eq!(
            c.next_after(ts("2026-12-06T03:00:00Z")),
            Some(ts("2026-12-07T03:00:00Z"))
        );
        assert_eq!(
            c.next_after(ts("2026-12-06T02:59:59Z")),
            Some(ts("2026-12-06T03:00:00Z"))
        );
        assert_eq!(
            c.prev_at_or_before(ts("2026-12-06T03:00:00Z")),
            Some(ts("2026-12-06T03:00:00Z"))
        );
        assert_eq!(
            c.prev_at_or_before(ts("2026-12-06T02:00:00Z")),
            Some(ts("2026-12-05T03:00:00Z"))
        );
        let every2 = Cron::parse("*/2 * * * * *").expect("cron");
        assert_eq!(
            every2.next_after(ts("2026-12-06T03:00:59Z")),
            Some(ts("2026-12-06T03:01:00Z"))
        );
        // 2026-12-07 is a Monday; with both day fields restricted, either matches.
        let mondays = Cron::parse("30 9 * * 1").expect("cron");
        assert_eq!(
            mondays.next_after(ts("2026-12-06T00:00:00Z")),
            Some(ts("2026-12-07T09:30:00Z"))
        );
        let either = Cron::parse("0 0 25 * 1").expect("cron");
        assert_eq!(
            either.next_after(ts("2026-12-06T00:00:00Z")),
            Some(ts("2026-12-07T00:00:00Z"))
        );
        let sunday7 = Cron::parse("0 0 * * 7").expect("cron");
        assert_eq!(
            sunday7.next_after(ts("2026-12-06T00:00:00Z")),
            Some(ts("2026-12-13T00:00:00Z"))
        );
        assert_eq!(
            Cron::parse("0 0 31 2 *")
                .expect("cron")
                .next_after(ts("2026-01-01T00:00:00Z")),
            None
        );
    }
}

//! Window math (SPEC §3), pure: which window contains an instant, and when it resets.
//!
//! Usage is kept in minute buckets, so every window is a whole number of minutes:
//! - rolling `d`: the minutes `(t − d, t]` at minute resolution, i.e. `[minute(t) − d + 1m,
//!   minute(t) + 1m)`; usage ages out minute by minute;
//! - calendar: local periods in an IANA zone starting at `reset_at` (days, weeks from
//!   `week_start`, months from day 1). Local boundaries are converted to UTC one by one, so DST
//!   days are 23 or 25 hours long. A boundary that falls in a spring-forward gap starts at the
//!   first valid local minute after the gap; one that falls in a fall-back overlap starts at the
//!   earlier of the two instants;
//! - periodic: `[anchor + k·every, anchor + (k+1)·every)` for every integer k (before the anchor
//!   too: k is the floor of the exact distance, fractions of a second included, so the window
//!   reported for t always contains t). Anchors are whole minutes (a write with any other anchor
//!   is refused); an anchor of an older event that is not is truncated to the minute;
//! - lifetime: no bounds.
//!
//! A boundary instant belongs to the window it starts.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc,
    Weekday,
};
use chrono_tz::Tz;

use crate::Error;
use crate::model::{CalendarUnit, Window, WindowBounds, parse_duration_minutes};

/// A validated window, ready to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub enum WindowSpec {
    /// Usage in `(t − minutes, t]` at minute resolution.
    Rolling {
        /// Length in minutes.
        minutes: i64,
    },
    /// Local calendar periods.
    Calendar {
        /// Day, week or month.
        unit: CalendarUnit,
        /// Time zone.
        tz: Tz,
        /// Local minute of the day at which periods start.
        reset_minute_of_day: u32,
        /// First day of a week.
        week_start: Weekday,
    },
    /// Fixed-length periods from an anchor.
    Periodic {
        /// Length in minutes.
        every_minutes: i64,
        /// Start of period 0, truncated to the minute.
        anchor: DateTime<Utc>,
    },
    /// Never resets.
    Lifetime,
}

/// Minutes since the epoch of an instant (floor, also before 1970).
pub fn epoch_minute(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(60)
}

/// Truncate to the minute.
pub fn minute_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp().div_euclid(60) * 60;
    DateTime::from_timestamp(secs, 0).unwrap_or(t)
}

/// Parse a calendar `reset_at`, `HH:MM` in 24-hour digits only (`+4:00`, `4:00`, `04:00:00` and
/// `24:00` are refused), into the minute of the day.
pub fn parse_reset_at(field: &str, text: &str) -> Result<u32, Error> {
    let bad = || {
        Error::invalid(
            field,
            format!("`{text}` is not a time like 04:00 (HH:MM, 24-hour)"),
        )
    };
    let b = text.as_bytes();
    let digit = |i: usize| b[i].is_ascii_digit();
    if b.len() != 5 || b[2] != b':' || ![0, 1, 3, 4].into_iter().all(digit) {
        return Err(bad());
    }
    let num = |i: usize| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0');
    let (h, m) = (num(0), num(3));
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// A weekly window's `week_start` names, in the order of the week.
pub const WEEKDAYS: [(&str, Weekday); 7] = [
    ("monday", Weekday::Mon),
    ("tuesday", Weekday::Tue),
    ("wednesday", Weekday::Wed),
    ("thursday", Weekday::Thu),
    ("friday", Weekday::Fri),
    ("saturday", Weekday::Sat),
    ("sunday", Weekday::Sun),
];

fn parse_weekday(field: &str, text: &str) -> Result<Weekday, Error> {
    WEEKDAYS
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, day)| *day)
        .ok_or_else(|| {
            Error::invalid(
                field,
                format!("`{text}` is not a weekday (monday … sunday)"),
            )
        })
}

/// Anchors must lie in a range where every window computation stays representable.
fn anchor_in_range(t: DateTime<Utc>) -> bool {
    (1970..=2200).contains(&t.year())
}

impl WindowSpec {
    /// Validate and compile, naming fields `window.…`. `created_at` is the default anchor of
    /// periodic windows.
    pub fn compile(window: &Window, created_at: DateTime<Utc>) -> Result<WindowSpec, Error> {
        Self::compile_in("window", window, created_at)
    }

    /// [`WindowSpec::compile`] naming fields `{prefix}.…` (e.g. `data.window.every`).
    pub fn compile_in(
        prefix: &str,
        window: &Window,
        created_at: DateTime<Utc>,
    ) -> Result<WindowSpec, Error> {
        let f = |name: &str| format!("{prefix}.{name}");
        Ok(match window {
            Window::Rolling { duration } => WindowSpec::Rolling {
                minutes: parse_duration_minutes(&f("duration"), duration)?,
            },
            Window::Calendar {
                unit,
                timezone,
                reset_at,
                week_start,
            } => compile_calendar(prefix, *unit, timezone, reset_at, week_start)?,
            Window::Periodic { every, anchor } => {
                let anchor = minute_floor(anchor.unwrap_or(created_at));
                if !anchor_in_range(anchor) {
                    return Err(Error::invalid(
                        f("anchor"),
                        "must lie between 1970 and 2200",
                    ));
                }
                WindowSpec::Periodic {
                    every_minutes: parse_duration_minutes(&f("every"), every)?,
                    anchor,
                }
            }
            Window::Lifetime {} => WindowSpec::Lifetime,
        })
    }

    /// `rolling`, `calendar`, `periodic` or `lifetime`.
    pub fn kind(&self) -> &'static str {
        match self {
            WindowSpec::Rolling { .. } => "rolling",
            WindowSpec::Calendar { .. } => "calendar",
            WindowSpec::Periodic { .. } => "periodic",
            WindowSpec::Lifetime => "lifetime",
        }
    }

    /// The window containing `t` (lifetime: none).
    pub fn bounds(&self, t: DateTime<Utc>) -> Option<WindowBounds> {
        match self {
            WindowSpec::Rolling { minutes } => {
                let end = minute_floor(t) + Duration::minutes(1);
                Some(WindowBounds {
                    start: end - Duration::minutes(*minutes),
                    end,
                })
            }
            WindowSpec::Periodic {
                every_minutes,
                anchor,
            } => {
                // Floor of the exact distance in minutes: epoch minutes are floors of the exact
                // instant (chrono keeps sub-second parts non-negative), and the anchor is a whole
                // minute, so an instant half a second before the anchor lies in window k = -1.
                let since = epoch_minute(t) - epoch_minute(*anchor);
                let k = since.div_euclid(*every_minutes);
                let start = *anchor + Duration::minutes(k * every_minutes);
                Some(WindowBounds {
                    start,
                    end: start + Duration::minutes(*every_minutes),
                })
            }
            WindowSpec::Calendar {
                unit,
                tz,
                reset_minute_of_day,
                week_start,
            } => Some(calendar_bounds(
                *unit,
                *tz,
                *reset_minute_of_day,
                *week_start,
                t,
            )),
            WindowSpec::Lifetime => None,
        }
    }

    /// When the window containing `t` ends (calendar and periodic windows).
    pub fn next_reset(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            WindowSpec::Calendar { .. } | WindowSpec::Periodic { .. } => {
                self.bounds(t).map(|b| b.end)
            }
            _ => None,
        }
    }
}

fn compile_calendar(
    prefix: &str,
    unit: CalendarUnit,
    timezone: &Option<String>,
    reset_at: &Option<String>,
    week_start: &Option<String>,
) -> Result<WindowSpec, Error> {
    let f = |name: &str| format!("{prefix}.{name}");
    let tz = match timezone.as_deref() {
        None => Tz::UTC,
        Some(name) => name.parse::<Tz>().map_err(|_| {
            Error::invalid(f("timezone"), format!("`{name}` is not an IANA time zone"))
        })?,
    };
    let reset_minute_of_day = reset_at
        .as_deref()
        .map(|r| parse_reset_at(&f("reset_at"), r))
        .transpose()?
        .unwrap_or(0);
    let week_start = week_start
        .as_deref()
        .map(|w| parse_weekday(&f("week_start"), w))
        .transpose()?
        .unwrap_or(Weekday::Mon);
    if week_start != Weekday::Mon && unit != CalendarUnit::Week {
        return Err(Error::invalid(
            f("week_start"),
            "only applies to weekly windows",
        ));
    }
    Ok(WindowSpec::Calendar {
        unit,
        tz,
        reset_minute_of_day,
        week_start,
    })
}

/// The UTC instant a local boundary (date at the reset minute) falls on.
fn boundary(tz: Tz, date: NaiveDate, reset_minute: u32) -> DateTime<Utc> {
    let time = NaiveTime::from_hms_opt(reset_minute / 60, reset_minute % 60, 0)
        .expect("valid reset minute");
    let mut local: NaiveDateTime = date.and_time(time);
    // A gap is at most a few hours; step minute by minute to the first valid local time.
    for _ in 0..(24 * 60) {
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(earlier, _) => return earlier.with_timezone(&Utc),
            LocalResult::None => local += Duration::minutes(1),
        }
    }
    Utc.from_utc_datetime(&date.and_time(time))
}

/// The start date of the period containing local `date`, and the next period's start date.
fn period_dates(
    unit: CalendarUnit,
    week_start: Weekday,
    date: NaiveDate,
) -> (NaiveDate, NaiveDate) {
    match unit {
        CalendarUnit::Day => (date, date + Duration::days(1)),
        CalendarUnit::Week => {
            let back = (7 + date.weekday().num_days_from_monday() as i64
                - week_start.num_days_from_monday() as i64)
                % 7;
            let start = date - Duration::days(back);
            (start, start + Duration::days(7))
        }
        CalendarUnit::Month => {
            let start = date.with_day(1).expect("day 1 exists");
            let next = if start.month() == 12 {
                NaiveDate::from_ymd_opt(start.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(start.year(), start.month() + 1, 1)
            }
            .expect("first of next month exists");
            (start, next)
        }
    }
}

fn calendar_bounds(
    unit: CalendarUnit,
    tz: Tz,
    reset_minute: u32,
    week_start: Weekday,
    t: DateTime<Utc>,
) -> WindowBounds {
    let local_date = t.with_timezone(&tz).date_naive();
    let (mut start_date, mut end_date) = period_dates(unit, week_start, local_date);
    // The period containing the local date may not contain t: before the reset time, t lies in
    // the previous period; past the end boundary (rare, around DST), in the next.
    if t < boundary(tz, start_date, reset_minute) {
        let prev_day = start_date - Duration::days(1);
        (start_date, end_date) = period_dates(unit, week_start, prev_day);
    } else if t >= boundary(tz, end_date, reset_minute) {
        (start_date, end_date) = period_dates(unit, week_start, end_date);
    }
    WindowBounds {
        start: boundary(tz, start_date, reset_minute),
        end: boundary(tz, end_date, reset_minute),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn cal(unit: CalendarUnit, tz: &str, reset: Option<&str>, week: Option<&str>) -> WindowSpec {
        let w = Window::Calendar {
            unit,
            timezone: Some(tz.into()),
            reset_at: reset.map(Into::into),
            week_start: week.map(Into::into),
        };
        WindowSpec::compile(&w, Utc::now()).unwrap()
    }

    fn b(spec: &WindowSpec, at: &str) -> (DateTime<Utc>, DateTime<Utc>) {
        let w = spec.bounds(t(at)).unwrap();
        (w.start, w.end)
    }

    #[test]
    fn shanghai_day_resets_at_four() {
        let s = cal(CalendarUnit::Day, "Asia/Shanghai", Some("04:00"), None);
        // 2026-05-01 03:59 local = 2026-04-30T19:59Z: still the previous day's window.
        assert_eq!(
            b(&s, "2026-04-30T19:59:00Z"),
            (t("2026-04-29T20:00:00Z"), t("2026-04-30T20:00:00Z"))
        );
        assert_eq!(
            b(&s, "2026-04-30T20:00:00Z"),
            (t("2026-04-30T20:00:00Z"), t("2026-05-01T20:00:00Z"))
        );
    }

    #[test]
    fn new_york_dst_days_are_23_and_25_hours() {
        let s = cal(CalendarUnit::Day, "America/New_York", None, None);
        let (a, e) = b(&s, "2026-03-08T12:00:00Z");
        assert_eq!(
            (a, e),
            (t("2026-03-08T05:00:00Z"), t("2026-03-09T04:00:00Z"))
        );
        assert_eq!(e - a, Duration::hours(23));
        let (a, e) = b(&s, "2026-11-01T12:00:00Z");
        assert_eq!(e - a, Duration::hours(25));
        // Reset at 02:30 on the spring-forward day: 02:30 does not exist, the window starts 03:00.
        let g = cal(CalendarUnit::Day, "America/New_York", Some("02:30"), None);
        assert_eq!(b(&g, "2026-03-08T12:00:00Z").0, t("2026-03-08T07:00:00Z"));
    }

    #[test]
    fn weeks_start_on_the_configured_day() {
        let s = cal(CalendarUnit::Week, "Europe/London", None, Some("sunday"));
        // Wednesday 2026-07-15 (BST, UTC+1): week from Sunday 2026-07-12 00:00 local.
        assert_eq!(
            b(&s, "2026-07-15T10:00:00Z"),
            (t("2026-07-11T23:00:00Z"), t("2026-07-18T23:00:00Z"))
        );
    }

    #[test]
    fn months_start_on_day_one_at_reset_time() {
        let s = cal(CalendarUnit::Month, "UTC", Some("04:00"), None);
        assert_eq!(
            b(&s, "2028-02-29T12:00:00Z"),
            (t("2028-02-01T04:00:00Z"), t("2028-03-01T04:00:00Z"))
        );
        assert_eq!(
            b(&s, "2026-02-28T12:00:00Z"),
            (t("2026-02-01T04:00:00Z"), t("2026-03-01T04:00:00Z"))
        );
        assert_eq!(
            b(&s, "2026-03-01T03:59:59Z"),
            (t("2026-02-01T04:00:00Z"), t("2026-03-01T04:00:00Z"))
        );
        assert_eq!(b(&s, "2026-01-31T23:00:00Z").1, t("2026-02-01T04:00:00Z"));
    }

    #[test]
    fn periodic_boundaries_belong_to_the_new_window() {
        let w = Window::Periodic {
            every: "90m".into(),
            anchor: Some(t("2026-01-01T00:00:00Z")),
        };
        let s = WindowSpec::compile(&w, Utc::now()).unwrap();
        assert_eq!(
            b(&s, "2026-01-01T01:30:00Z"),
            (t("2026-01-01T01:30:00Z"), t("2026-01-01T03:00:00Z"))
        );
        assert_eq!(
            b(&s, "2026-01-01T01:29:59Z"),
            (t("2026-01-01T00:00:00Z"), t("2026-01-01T01:30:00Z"))
        );
        assert_eq!(
            b(&s, "2025-12-31T23:00:00Z"),
            (t("2025-12-31T22:30:00Z"), t("2026-01-01T00:00:00Z"))
        );
        assert_eq!(
            s.next_reset(t("2026-01-01T00:10:00Z")),
            Some(t("2026-01-01T01:30:00Z"))
        );
    }

    #[test]
    fn rolling_covers_whole_minutes_up_to_t() {
        let s = WindowSpec::compile(
            &Window::Rolling {
                duration: "5h".into(),
            },
            Utc::now(),
        )
        .unwrap();
        assert_eq!(
            b(&s, "2026-01-01T10:00:30Z"),
            (t("2026-01-01T05:01:00Z"), t("2026-01-01T10:01:00Z"))
        );
        assert_eq!(s.next_reset(t("2026-01-01T10:00:30Z")), None);
    }

    #[test]
    fn invalid_windows_name_the_field() {
        let field = |w: Window| match WindowSpec::compile(&w, Utc::now()) {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let c = |tz: &str, reset: Option<&str>, week: Option<&str>| Window::Calendar {
            unit: CalendarUnit::Week,
            timezone: Some(tz.into()),
            reset_at: reset.map(Into::into),
            week_start: week.map(Into::into),
        };
        assert_eq!(field(c("Mars/Base", None, None)), "window.timezone");
        assert_eq!(field(c("UTC", Some("25:00"), None)), "window.reset_at");
        assert_eq!(field(c("UTC", Some("4:00"), None)), "window.reset_at");
        assert_eq!(field(c("UTC", None, Some("funday"))), "window.week_start");
        assert_eq!(
            field(Window::Periodic {
                every: "0m".into(),
                anchor: None
            }),
            "window.every"
        );
        assert_eq!(
            field(Window::Periodic {
                every: "30s".into(),
                anchor: None
            }),
            "window.every"
        );
        assert_eq!(
            field(Window::Rolling {
                duration: "5".into()
            }),
            "window.duration"
        );
    }
}

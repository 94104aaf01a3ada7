//! Compaction horizons (DESIGN §4, SPEC v2 §7): how far back each resolution of usage must be
//! kept so that every window of every configured policy, evaluated at any time an admission may
//! still name (`now − max_backfill` to now), sums exactly.
//!
//! For each policy: its *reach* is the start of the window containing `now − max_backfill` (for a
//! rolling window, that minute less the window's length), and its *grain* the coarsest bucket
//! none of its window boundaries cut in that range: a day (boundaries at UTC midnight), an hour,
//! or a minute (a rolling window, a time zone with a :30 offset, a `reset_at` of 04:30, an anchor
//! at :17). Minutes are kept back to the earliest reach of a minute-grain policy, hours back to the
//! earliest reach of an hour-grain one, days back to the earliest reach of any; older usage lives
//! only in the lifetime total.
//!
//! Floors keep more than today's policies need, so that a policy created later still sees exact
//! totals at the current time for the windows operators create most: minutes for the last
//! [`MINUTE_FLOOR_MINUTES`] (a rolling window up to a day, any calendar day), hours and days for
//! the last [`HOUR_FLOOR_MINUTES`] (a calendar week or month in a whole-hour time zone).

use chrono::{DateTime, Utc};

use super::buckets::{DAY, HOUR, Horizons};
use super::config::Config;
use crate::window::{WindowSpec, epoch_minute};

/// Minutes always kept at minute resolution: 26 h covers a rolling window of a day and any
/// local day (23 to 25 h).
pub const MINUTE_FLOOR_MINUTES: i64 = 26 * HOUR;
/// Minutes always kept at hour (and day) resolution: 32 days cover any local month.
pub const HOUR_FLOOR_MINUTES: i64 = 32 * DAY;
/// Most window boundaries examined per policy to find its grain: beyond this many the policy is
/// taken to need minutes (safe, only less compaction).
const MAX_BOUNDARIES: usize = 512;

/// The bucket size a policy's windows need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grain {
    /// Boundaries at arbitrary minutes (and every rolling window).
    Minute,
    /// Boundaries on whole UTC hours.
    Hour,
    /// Boundaries on UTC midnights.
    Day,
}

fn grain_of_minute(m: i64) -> Grain {
    if m.rem_euclid(DAY) == 0 {
        Grain::Day
    } else if m.rem_euclid(HOUR) == 0 {
        Grain::Hour
    } else {
        Grain::Minute
    }
}

/// The reach (epoch minute) and grain of a window evaluated at times in `[from, to]`; None for
/// lifetime windows, which read only the total.
pub fn reach_and_grain(
    spec: &WindowSpec,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Option<(i64, Grain)> {
    match spec {
        WindowSpec::Lifetime => None,
        WindowSpec::Rolling { minutes } => Some((epoch_minute(from) - minutes + 1, Grain::Minute)),
        WindowSpec::Periodic {
            every_minutes,
            anchor,
        } => {
            let start = epoch_minute(spec.bounds(from)?.start);
            let a = epoch_minute(*anchor);
            let grain = match (every_minutes % DAY, every_minutes % HOUR) {
                (0, _) => grain_of_minute(a),
                (_, 0) => grain_of_minute(a).min(Grain::Hour),
                _ => Grain::Minute,
            };
            Some((start, grain))
        }
        WindowSpec::Calendar { .. } => {
            let first = spec.bounds(from)?;
            let mut grain = grain_of_minute(epoch_minute(first.start));
            let mut end = first.end;
            for _ in 0..MAX_BOUNDARIES {
                if end > to || grain == Grain::Minute {
                    return Some((epoch_minute(first.start), grain));
                }
                grain = grain.min(grain_of_minute(epoch_minute(end)));
                end = spec.bounds(end)?.end;
            }
            Some((epoch_minute(first.start), Grain::Minute))
        }
    }
}

/// The horizons for `config` at `now` with admissions allowed up to `backfill` in the past.
pub fn horizons(config: &Config, now: DateTime<Utc>, backfill: chrono::Duration) -> Horizons {
    let now_m = epoch_minute(now);
    let from = now.checked_sub_signed(backfill).unwrap_or(now);
    let mut minute = now_m - MINUTE_FLOOR_MINUTES;
    let mut hour = now_m - HOUR_FLOOR_MINUTES;
    let mut day = hour;
    for p in config.policies() {
        match reach_and_grain(&p.spec, from, now) {
            Some((reach, Grain::Minute)) => minute = minute.min(reach),
            Some((reach, Grain::Hour)) => hour = hour.min(reach),
            Some((reach, Grain::Day)) => day = day.min(reach),
            None => {}
        }
    }
    let minute = minute.div_euclid(HOUR) * HOUR;
    let hour = hour.min(minute).div_euclid(DAY) * DAY;
    let day = day.min(hour).div_euclid(DAY) * DAY;
    Horizons { minute, hour, day }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CalendarUnit, Window};

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn grain(w: Window) -> Grain {
        let spec = WindowSpec::compile(&w, t("2026-01-01T00:00:00Z")).unwrap();
        reach_and_grain(&spec, t("2026-03-01T00:00:00Z"), t("2026-04-10T00:00:00Z"))
            .unwrap()
            .1
    }

    fn cal(unit: CalendarUnit, tz: &str, reset: &str) -> Window {
        Window::Calendar {
            unit,
            timezone: Some(tz.into()),
            reset_at: Some(reset.into()),
            week_start: None,
        }
    }

    #[test]
    fn grains_follow_the_boundaries() {
        assert_eq!(grain(cal(CalendarUnit::Day, "UTC", "00:00")), Grain::Day);
        assert_eq!(grain(cal(CalendarUnit::Month, "UTC", "00:00")), Grain::Day);
        assert_eq!(
            grain(cal(CalendarUnit::Day, "Asia/Shanghai", "04:00")),
            Grain::Hour
        );
        // New York's offset changes in March: still whole hours.
        assert_eq!(
            grain(cal(CalendarUnit::Day, "America/New_York", "00:00")),
            Grain::Hour
        );
        assert_eq!(
            grain(cal(CalendarUnit::Day, "Asia/Kolkata", "00:00")),
            Grain::Minute
        );
        assert_eq!(
            grain(cal(CalendarUnit::Week, "UTC", "04:30")),
            Grain::Minute
        );
        let periodic = |every: &str, anchor: &str| Window::Periodic {
            every: every.into(),
            anchor: Some(t(anchor)),
        };
        assert_eq!(grain(periodic("1d", "2026-01-01T00:00:00Z")), Grain::Day);
        assert_eq!(grain(periodic("5h", "2026-01-01T00:00:00Z")), Grain::Hour);
        assert_eq!(
            grain(periodic("90m", "2026-01-01T00:00:00Z")),
            Grain::Minute
        );
        assert_eq!(grain(periodic("1d", "2026-01-01T00:17:00Z")), Grain::Minute);
        assert_eq!(
            grain(Window::Rolling {
                duration: "5h".into()
            }),
            Grain::Minute
        );
    }
}

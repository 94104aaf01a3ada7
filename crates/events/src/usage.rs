//! The usage fold: settled usage per chain subject, model, model group, counted flags and minute.
//! The projector applies it to ledger rows; anything else that needs the same totals (replay,
//! audit, the API) folds the same events with the same function.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::envelope::{Envelope, EventData};
use crate::model::Usage;

/// Where a settled amount is counted. `""` stands for "no model" / "no model group".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UsageKey {
    /// A subject of the request's chain.
    pub subject: String,
    /// Model, or "".
    pub model: String,
    /// Model group, or "".
    pub model_group: String,
    /// Frozen flag of the request.
    pub counted_in_key_global: bool,
    /// Frozen flag of the request.
    pub counted_in_user_global: bool,
    /// Start of the minute containing the usage's window time.
    pub minute: DateTime<Utc>,
}

/// Accumulated usage per key.
pub type UsageTotals = BTreeMap<UsageKey, Usage>;

/// Start of the minute containing `t`.
pub fn minute_of(t: DateTime<Utc>) -> DateTime<Utc> {
    crate::window::minute_floor(t)
}

/// Fold one event: a `usage.settled` adds its usage once for every subject of its chain, at the
/// minute of its window time; every other event leaves the totals unchanged.
pub fn fold_usage(mut totals: UsageTotals, env: &Envelope) -> UsageTotals {
    let EventData::UsageSettled(d) = &env.data else {
        return totals;
    };
    if d.usage.is_zero() {
        return totals;
    }
    for subject in &d.chain {
        let key = UsageKey {
            subject: subject.as_str().to_owned(),
            model: d.model.clone().unwrap_or_default(),
            model_group: d.model_group.clone().unwrap_or_default(),
            counted_in_key_global: d.counted_in_key_global,
            counted_in_user_global: d.counted_in_user_global,
            minute: minute_of(d.window_at),
        };
        let slot = totals.entry(key).or_default();
        *slot = slot.plus(&d.usage);
    }
    totals
}

/// A chain subject, a model (`""` for none) and a local day.
pub type DayKey = (String, String, chrono::NaiveDate);

/// Settled usage per chain subject × model × day.
pub type DailyTotals = BTreeMap<DayKey, Usage>;

/// The day containing `t` in `tz`.
pub fn day_of(t: DateTime<Utc>, tz: chrono_tz::Tz) -> chrono::NaiveDate {
    t.with_timezone(&tz).date_naive()
}

/// Fold one event into daily totals, days in `tz`: a `usage.settled` adds its usage once for
/// every subject of its chain, on the local day of its window time (the same amounts
/// [`fold_usage`] counts, grouped by day).
pub fn fold_daily(totals: &mut DailyTotals, env: &Envelope, tz: chrono_tz::Tz) {
    let EventData::UsageSettled(d) = &env.data else {
        return;
    };
    if d.usage.is_zero() {
        return;
    }
    let day = day_of(d.window_at, tz);
    for subject in &d.chain {
        let key = (
            subject.as_str().to_owned(),
            d.model.clone().unwrap_or_default(),
            day,
        );
        let slot = totals.entry(key).or_default();
        *slot = slot.plus(&d.usage);
    }
}

#[cfg(test)]
mod daily_tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn local_days_split_where_the_time_zone_says() {
        let t = Utc.with_ymd_and_hms(2026, 3, 1, 23, 30, 0).unwrap();
        assert_eq!(day_of(t, chrono_tz::UTC).to_string(), "2026-03-01");
        assert_eq!(day_of(t, chrono_tz::Asia::Tokyo).to_string(), "2026-03-02");
        assert_eq!(
            day_of(t, chrono_tz::America::Los_Angeles).to_string(),
            "2026-03-01"
        );
    }
}

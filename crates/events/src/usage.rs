//! The usage fold: settled usage per chain subject, model, model group, counted flags and minute.
//! The projector applies it to ledger rows; anything else that needs the same totals (replay,
//! audit, the API) folds the same events with the same function.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

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
    t.duration_trunc(TimeDelta::minutes(1))
        .expect("minute truncation of a valid time")
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

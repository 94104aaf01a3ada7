//! Usage of one subject slice over time, at the resolution its windows need (DESIGN §4).
//!
//! Every entry is keyed by the epoch minute its bucket starts at. Recent usage is kept per minute;
//! [`Buckets::compact`] merges minutes older than a horizon into hour buckets, hours older than a
//! second horizon into day buckets, and drops days older than a third (the lifetime total keeps
//! everything). The horizons come from the configuration ([`super::compact`]) so that no window
//! that can still be evaluated ever cuts a merged bucket: sums stay exact.
//!
//! A slice with few entries is a sorted vector (most keys see a handful of requests a day); one
//! that grows past [`SPARSE_MAX`] entries becomes minute, hour and day maps, so the sum over any
//! range costs at most about 2·60 + 2·24 lookups plus one per whole day.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::Usage;

pub use crate::window::epoch_minute;

/// Minutes per hour and per day, the bucket sizes.
pub const HOUR: i64 = 60;
/// See [`HOUR`].
pub const DAY: i64 = 1440;
/// Most entries a slice keeps as a plain sorted vector before it switches to maps: a scan of
/// this many entries is cheaper than three map lookups per hour of a long window.
pub const SPARSE_MAX: usize = 96;

/// The instant of an epoch minute.
pub fn minute_instant(m: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(m.saturating_mul(60), 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Epoch minutes below which usage may be kept at a coarser resolution: minutes before `minute`
/// only as hours, before `hour` only as days, before `day` only in the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Horizons {
    /// Keep minute resolution from here on.
    pub minute: i64,
    /// Keep hour resolution from here on (≤ `minute`).
    pub hour: i64,
    /// Keep day resolution from here on (≤ `hour`).
    pub day: i64,
}

impl Horizons {
    /// Keep everything at minute resolution.
    pub const NONE: Horizons = Horizons {
        minute: i64::MIN,
        hour: i64::MIN,
        day: i64::MIN,
    };

    /// The bucket a minute belongs to under these horizons: its start, or None when it is only
    /// in the total.
    fn bucket_of(&self, m: i64) -> Option<i64> {
        if m >= self.minute {
            Some(m)
        } else if m >= self.hour {
            Some(m.div_euclid(HOUR) * HOUR)
        } else if m >= self.day {
            Some(m.div_euclid(DAY) * DAY)
        } else {
            None
        }
    }
}

/// Minute, hour and day maps of a busy slice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dense {
    minutes: BTreeMap<i64, Usage>,
    hours: BTreeMap<i64, Usage>,
    days: BTreeMap<i64, Usage>,
}

/// One slice of usage over time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    /// Everything ever added (the lifetime windows' sum).
    total: Usage,
    store: Store,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Store {
    /// `(bucket start, usage)` sorted by start; buckets are minutes, or hours and days once
    /// compacted.
    Sparse(Vec<(i64, Usage)>),
    /// Minutes (only those not compacted), hours (each the sum of its minutes, compacted or
    /// not) and days likewise.
    Dense(Box<Dense>),
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            total: Usage::default(),
            store: Store::Sparse(Vec::new()),
        }
    }
}

fn add_to(map: &mut BTreeMap<i64, Usage>, key: i64, u: &Usage) {
    let slot = map.entry(key).or_default();
    *slot = slot.plus(u);
}

fn sum_range(map: &BTreeMap<i64, Usage>, from: i64, to: i64) -> Usage {
    if from >= to {
        return Usage::default();
    }
    map.range(from..to)
        .fold(Usage::default(), |acc, (_, u)| acc.plus(u))
}

fn ceil_div(a: i64, b: i64) -> i64 {
    -((-a).div_euclid(b))
}

impl Dense {
    fn add(&mut self, m: i64, u: &Usage) {
        add_to(&mut self.minutes, m, u);
        add_to(&mut self.hours, m.div_euclid(HOUR), u);
        add_to(&mut self.days, m.div_euclid(DAY), u);
    }

    fn sum(&self, from: i64, to: i64) -> Usage {
        let h0 = ceil_div(from, HOUR);
        let h1 = to.div_euclid(HOUR);
        if h0 >= h1 {
            return sum_range(&self.minutes, from, to);
        }
        sum_range(&self.minutes, from, h0 * HOUR)
            .plus(&self.sum_hours(h0, h1))
            .plus(&sum_range(&self.minutes, h1 * HOUR, to))
    }

    fn sum_hours(&self, from: i64, to: i64) -> Usage {
        let d0 = ceil_div(from, 24);
        let d1 = to.div_euclid(24);
        if d0 >= d1 {
            return sum_range(&self.hours, from, to);
        }
        sum_range(&self.hours, from, d0 * 24)
            .plus(&sum_range(&self.days, d0, d1))
            .plus(&sum_range(&self.hours, d1 * 24, to))
    }

    fn compact(&mut self, h: &Horizons) {
        self.minutes = self.minutes.split_off(&h.minute);
        self.hours = self.hours.split_off(&h.hour.div_euclid(HOUR));
        self.days = self.days.split_off(&h.day.div_euclid(DAY));
    }

    fn len(&self) -> usize {
        self.minutes.len() + self.hours.len() + self.days.len()
    }
}

impl Buckets {
    /// Add `u` at epoch minute `m`.
    pub fn add(&mut self, m: i64, u: &Usage) {
        self.total = self.total.plus(u);
        match &mut self.store {
            Store::Sparse(v) => {
                match v.binary_search_by_key(&m, |(k, _)| *k) {
                    Ok(i) => v[i].1 = v[i].1.plus(u),
                    Err(i) => v.insert(i, (m, *u)),
                }
                if v.len() > SPARSE_MAX {
                    self.densify();
                }
            }
            Store::Dense(d) => d.add(m, u),
        }
    }

    /// Sparse entries at minute resolution become maps (compacted entries stay where they are:
    /// an hour or day bucket is added at its start minute, and its hour and day sums are right).
    fn densify(&mut self) {
        if let Store::Sparse(v) = &mut self.store {
            let mut d = Dense::default();
            for (m, u) in v.drain(..) {
                d.add(m, &u);
            }
            self.store = Store::Dense(Box::new(d));
        }
    }

    /// Everything ever added.
    pub fn total(&self) -> Usage {
        self.total
    }

    /// Usage in epoch minutes `[from, to)`. Exact when no bucket coarser than a minute straddles
    /// `from` or `to`, which the compaction horizons guarantee for every window still evaluated.
    pub fn sum(&self, from: i64, to: i64) -> Usage {
        if from >= to {
            return Usage::default();
        }
        match &self.store {
            Store::Sparse(v) => {
                let lo = v.partition_point(|(k, _)| *k < from);
                let hi = v.partition_point(|(k, _)| *k < to);
                v[lo..hi]
                    .iter()
                    .fold(Usage::default(), |acc, (_, u)| acc.plus(u))
            }
            Store::Dense(d) => d.sum(from, to),
        }
    }

    /// Minute buckets in `[from, to)`, oldest first (for "when does enough usage age out").
    pub fn minutes_in(&self, from: i64, to: i64) -> Vec<(i64, Usage)> {
        let to = to.max(from);
        match &self.store {
            Store::Sparse(v) => {
                let lo = v.partition_point(|(k, _)| *k < from);
                let hi = v.partition_point(|(k, _)| *k < to);
                v[lo..hi].to_vec()
            }
            Store::Dense(d) => d.minutes.range(from..to).map(|(m, u)| (*m, *u)).collect(),
        }
    }

    /// Merge what is older than the horizons into coarser buckets (see the module doc).
    pub fn compact(&mut self, h: &Horizons) {
        match &mut self.store {
            Store::Sparse(v) => {
                if v.first().is_none_or(|(k, _)| *k >= h.minute) {
                    return;
                }
                let mut out: Vec<(i64, Usage)> = Vec::with_capacity(v.len());
                for (m, u) in v.drain(..) {
                    let Some(key) = h.bucket_of(m) else { continue };
                    match out.last_mut() {
                        Some((k, acc)) if *k == key => *acc = acc.plus(&u),
                        _ => out.push((key, u)),
                    }
                }
                *v = out;
            }
            Store::Dense(d) => d.compact(h),
        }
    }

    /// Entries held (for memory accounting and tests).
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Sparse(v) => v.len(),
            Store::Dense(d) => d.len(),
        }
    }

    /// True when nothing is held but (possibly) the total.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(cost: i64) -> Usage {
        Usage {
            cost,
            ..Usage::default()
        }
    }

    #[test]
    fn range_sums_match_a_plain_scan_sparse_and_dense() {
        for n in [40, 3000] {
            let mut b = Buckets::default();
            let mut plain = BTreeMap::new();
            // A deterministic scatter over five days, including negative epoch minutes.
            let mut x: i64 = 7;
            for _ in 0..n {
                x = (x * 1_103_515_245 + 12_345).rem_euclid(1 << 31);
                let m = x % (5 * DAY) - DAY;
                b.add(m, &usage(x % 100));
                *plain.entry(m).or_insert(0) += x % 100;
            }
            let mut y: i64 = 3;
            for _ in 0..500 {
                y = (y * 1_103_515_245 + 12_345).rem_euclid(1 << 31);
                let from = y % (6 * DAY) - 2000;
                let to = from + (y / 7) % (4 * DAY);
                let want: i64 = plain.range(from..to.max(from)).map(|(_, v)| v).sum();
                assert_eq!(b.sum(from, to).cost, want, "[{from}, {to}) n={n}");
            }
            assert_eq!(b.total().cost, plain.values().sum::<i64>());
        }
    }

    #[test]
    fn compaction_keeps_aligned_sums_and_frees_entries() {
        for n in [40, 3000] {
            let mut b = Buckets::default();
            for i in 0..n {
                b.add(i * 7, &usage(1));
            }
            let before = b.clone();
            let h = Horizons {
                minute: 10 * DAY,
                hour: 5 * DAY,
                day: 2 * DAY,
            };
            b.compact(&h);
            assert!(b.len() < before.len(), "entries freed");
            assert_eq!(b.total(), before.total());
            // Ranges whose ends respect the horizons' alignment are exact.
            for (from, to) in [
                (2 * DAY, 4 * DAY),
                (5 * DAY + 3 * HOUR, 9 * DAY),
                (10 * DAY + 17, 12 * DAY + 5),
                (2 * DAY, 20 * DAY),
            ] {
                assert_eq!(b.sum(from, to), before.sum(from, to), "[{from}, {to})");
            }
        }
    }
}

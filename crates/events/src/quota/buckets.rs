//! Usage in minute, hour and day buckets, so the sum over any minute-aligned range costs at most
//! about 2·60 + 2·24 lookups plus one per whole day, whatever the range's length.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::model::Usage;

/// Minutes since the epoch of an instant (floor).
pub fn epoch_minute(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(60)
}

/// The instant of an epoch minute.
pub fn minute_instant(m: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(m.saturating_mul(60), 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// One slice of usage over time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buckets {
    minutes: BTreeMap<i64, Usage>,
    hours: BTreeMap<i64, Usage>,
    days: BTreeMap<i64, Usage>,
    total: Usage,
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

impl Buckets {
    /// Add `u` at epoch minute `m`.
    pub fn add(&mut self, m: i64, u: &Usage) {
        add_to(&mut self.minutes, m, u);
        add_to(&mut self.hours, m.div_euclid(60), u);
        add_to(&mut self.days, m.div_euclid(1440), u);
        self.total = self.total.plus(u);
    }

    /// Everything ever added.
    pub fn total(&self) -> Usage {
        self.total
    }

    /// Usage in epoch minutes `[from, to)`.
    pub fn sum(&self, from: i64, to: i64) -> Usage {
        if from >= to {
            return Usage::default();
        }
        let h0 = ceil_div(from, 60);
        let h1 = to.div_euclid(60);
        if h0 >= h1 {
            return sum_range(&self.minutes, from, to);
        }
        sum_range(&self.minutes, from, h0 * 60)
            .plus(&self.sum_hours(h0, h1))
            .plus(&sum_range(&self.minutes, h1 * 60, to))
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

    /// Minute buckets in `[from, to)`, oldest first (for "when does enough usage age out").
    pub fn minutes_in(&self, from: i64, to: i64) -> impl Iterator<Item = (i64, &Usage)> {
        self.minutes.range(from..to.max(from)).map(|(m, u)| (*m, u))
    }
}

fn ceil_div(a: i64, b: i64) -> i64 {
    -((-a).div_euclid(b))
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
    fn range_sums_match_a_plain_scan() {
        let mut b = Buckets::default();
        let mut plain = BTreeMap::new();
        // A deterministic scatter over five days, including negative epoch minutes.
        let mut x: i64 = 7;
        for _ in 0..3000 {
            x = (x * 1_103_515_245 + 12_345).rem_euclid(1 << 31);
            let m = x % (5 * 1440) - 1440;
            b.add(m, &usage(x % 100));
            *plain.entry(m).or_insert(0) += x % 100;
        }
        let mut y: i64 = 3;
        for _ in 0..500 {
            y = (y * 1_103_515_245 + 12_345).rem_euclid(1 << 31);
            let from = y % (6 * 1440) - 2000;
            let to = from + (y / 7) % (4 * 1440);
            let want: i64 = plain.range(from..to.max(from)).map(|(_, v)| v).sum();
            assert_eq!(b.sum(from, to).cost, want, "[{from}, {to})");
        }
        assert_eq!(b.total().cost, plain.values().sum::<i64>());
    }
}

//! Usage of one subject slice over time, at the resolution its windows need (DESIGN §4).
//!
//! Every entry is keyed by the epoch minute its bucket starts at. Recent usage is kept per minute;
//! [`Buckets::compact`] merges minutes older than a horizon into hour buckets, hours older than a
//! second horizon into day buckets, and drops days older than a third (the lifetime total keeps
//! everything). The horizons come from the configuration ([`super::compact`]) so that no window
//! that can still be evaluated ever cuts a merged bucket: sums stay exact.
//!
//! Memory (issue 5: a state over 10 M events must fit in a few hundred MiB): entries are one
//! sorted vector of 24-byte records (minute as `i32`, each amount as `u32`), the usual case by
//! far; a bucket whose minute or amounts do not fit is kept exactly in a second, wide list. A
//! slice with more than [`SPARSE_MAX`] entries also keeps the total of every [`BLOCK`]
//! consecutive entries, so the sum over any range scans at most two partial blocks and adds
//! whole ones (a month's window over a busy customer: a few hundred additions, not thousands).
//! Hour and day sums are not kept beside the minutes: the block totals serve long ranges.
//!
//! Snapshots carry a slice as its sorted `(minute, usage)` list (format 1's sparse form); the
//! map form earlier builds wrote for busy slices is still read.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::Usage;

pub use crate::window::epoch_minute;

/// Minutes per hour and per day, the bucket sizes.
pub const HOUR: i64 = 60;
/// See [`HOUR`].
pub const DAY: i64 = 1440;
/// Most entries a slice keeps without block totals: a scan of this many 24-byte records is
/// cheaper than keeping and updating the totals.
pub const SPARSE_MAX: usize = 96;
/// A busy slice is rewritten by compaction once a 1/this share of its entries is stale.
pub const COMPACT_RATIO: usize = 16;
/// Entries per block total of a busy slice: a partial block costs at most this many additions,
/// a whole one a single addition (40 bytes of totals per 64 × 24 bytes of entries).
pub const BLOCK: usize = 64;

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

/// One bucket in 24 bytes: its epoch minute and its five amounts, each within `u32`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    minute: i32,
    /// In [`Usage::from_amounts`] order.
    amounts: [u32; 5],
}

impl Entry {
    /// The bucket as an entry, if its minute fits `i32` and every amount fits `u32`.
    fn narrow(m: i64, u: &Usage) -> Option<Entry> {
        let f = |v: i64| u32::try_from(v).ok();
        Some(Entry {
            minute: i32::try_from(m).ok()?,
            amounts: [
                f(u.requests)?,
                f(u.input_tokens)?,
                f(u.output_tokens)?,
                f(u.cost)?,
                f(u.credits)?,
            ],
        })
    }

    fn minute(&self) -> i64 {
        i64::from(self.minute)
    }

    fn usage(&self) -> Usage {
        Usage::from_amounts(self.amounts.map(i64::from))
    }

    fn pair(&self) -> (i64, Usage) {
        (self.minute(), self.usage())
    }
}

/// The sum of `entries` (saturating, like every sum of usage).
fn sum_entries(entries: &[Entry]) -> Usage {
    let mut acc = [0i64; 5];
    for e in entries {
        for (a, v) in acc.iter_mut().zip(e.amounts) {
            *a = a.saturating_add(i64::from(v));
        }
    }
    Usage::from_amounts(acc)
}

fn sum_wide(wide: &[(i64, Usage)], from: i64, to: i64) -> Usage {
    let lo = wide.partition_point(|(m, _)| *m < from);
    let hi = wide.partition_point(|(m, _)| *m < to);
    wide[lo..hi]
        .iter()
        .fold(Usage::default(), |acc, (_, u)| acc.plus(u))
}

/// What only busy or extreme slices need, behind one pointer so a quiet slice pays 8 bytes.
#[derive(Clone, Debug, Default)]
struct Extra {
    /// Totals of entries `[i·BLOCK, (i+1)·BLOCK)`, kept while there are more than
    /// [`SPARSE_MAX`] entries.
    blocks: Vec<Usage>,
    /// Buckets that do not fit an [`Entry`], sorted by minute; never a minute `entries` holds.
    wide: Vec<(i64, Usage)>,
}

/// One slice of usage over time.
#[derive(Clone, Debug, Default)]
pub struct Buckets {
    /// Everything ever added (the lifetime windows' sum).
    total: Usage,
    /// Buckets sorted by minute: minutes, or hours and days once compacted.
    entries: Vec<Entry>,
    extra: Option<Box<Extra>>,
}

impl Buckets {
    /// Add `u` at epoch minute `m`.
    pub fn add(&mut self, m: i64, u: &Usage) {
        self.total = self.total.plus(u);
        if let Some(x) = self.extra.as_mut()
            && let Ok(i) = x.wide.binary_search_by_key(&m, |(k, _)| *k)
        {
            x.wide[i].1 = x.wide[i].1.plus(u);
            return;
        }
        match self.entries.binary_search_by_key(&m, Entry::minute) {
            Ok(i) => {
                let sum = self.entries[i].usage().plus(u);
                match Entry::narrow(m, &sum) {
                    Some(e) => {
                        self.entries[i] = e;
                        if let Some(b) = self
                            .extra
                            .as_mut()
                            .and_then(|x| x.blocks.get_mut(i / BLOCK))
                        {
                            // Exact: the entry changed by exactly `u` (its sum fits).
                            *b = b.plus(u);
                        }
                    }
                    None => {
                        self.entries.remove(i);
                        self.insert_wide(m, sum);
                        self.reindex(i);
                    }
                }
            }
            Err(i) => match Entry::narrow(m, u) {
                Some(e) => {
                    self.entries.insert(i, e);
                    self.reindex(i);
                }
                None => self.insert_wide(m, *u),
            },
        }
    }

    fn insert_wide(&mut self, m: i64, u: Usage) {
        let x = self.extra.get_or_insert_with(Box::default);
        match x.wide.binary_search_by_key(&m, |(k, _)| *k) {
            Ok(i) => x.wide[i].1 = x.wide[i].1.plus(&u),
            Err(i) => x.wide.insert(i, (m, u)),
        }
    }

    /// Recompute the block totals from entry `from` on (entries before it did not change), or
    /// drop them when the slice is small.
    fn reindex(&mut self, from: usize) {
        if self.entries.len() <= SPARSE_MAX {
            if let Some(x) = self.extra.as_mut() {
                x.blocks = Vec::new();
            }
        } else {
            let x = self.extra.get_or_insert_with(Box::default);
            let first = if x.blocks.is_empty() { 0 } else { from / BLOCK };
            x.blocks.truncate(first);
            x.blocks
                .extend(self.entries[first * BLOCK..].chunks(BLOCK).map(sum_entries));
        }
        if self
            .extra
            .as_ref()
            .is_some_and(|x| x.blocks.is_empty() && x.wide.is_empty())
        {
            self.extra = None;
        }
    }

    /// Everything ever added.
    pub fn total(&self) -> Usage {
        self.total
    }

    fn wide(&self) -> &[(i64, Usage)] {
        self.extra.as_ref().map_or(&[], |x| &x.wide)
    }

    /// Usage in epoch minutes `[from, to)`. Exact when no bucket coarser than a minute straddles
    /// `from` or `to`, which the compaction horizons guarantee for every window still evaluated.
    pub fn sum(&self, from: i64, to: i64) -> Usage {
        if from >= to {
            return Usage::default();
        }
        let lo = self.entries.partition_point(|e| e.minute() < from);
        let hi = self.entries.partition_point(|e| e.minute() < to);
        self.sum_entries(lo, hi)
            .plus(&sum_wide(self.wide(), from, to))
    }

    /// The sum of entries `lo..hi`: partial blocks entry by entry, whole blocks by their total.
    fn sum_entries(&self, lo: usize, hi: usize) -> Usage {
        let blocks = self.extra.as_ref().map_or(&[][..], |x| &x.blocks);
        let (b0, b1) = (lo.div_ceil(BLOCK), hi / BLOCK);
        if blocks.is_empty() || b0 >= b1 {
            return sum_entries(&self.entries[lo..hi]);
        }
        blocks[b0..b1]
            .iter()
            .fold(sum_entries(&self.entries[lo..b0 * BLOCK]), |acc, b| {
                acc.plus(b)
            })
            .plus(&sum_entries(&self.entries[b1 * BLOCK..hi]))
    }

    /// Buckets in `[from, to)`, oldest first (for "when does enough usage age out").
    pub fn minutes_in(&self, from: i64, to: i64) -> Vec<(i64, Usage)> {
        let to = to.max(from);
        let lo = self.entries.partition_point(|e| e.minute() < from);
        let hi = self.entries.partition_point(|e| e.minute() < to);
        let mut out: Vec<(i64, Usage)> = self.entries[lo..hi].iter().map(Entry::pair).collect();
        let wide = self.wide();
        if !wide.is_empty() {
            let (wl, wh) = (
                wide.partition_point(|(m, _)| *m < from),
                wide.partition_point(|(m, _)| *m < to),
            );
            out.extend_from_slice(&wide[wl..wh]);
            out.sort_unstable_by_key(|(m, _)| *m);
        }
        out
    }

    /// Every bucket, oldest first.
    fn pairs(&self) -> Vec<(i64, Usage)> {
        self.minutes_in(i64::MIN, i64::MAX)
    }

    /// A slice holding `total` and `pairs` (any order; buckets of one minute are added up).
    fn from_pairs(total: Usage, mut pairs: Vec<(i64, Usage)>) -> Buckets {
        pairs.sort_by_key(|(m, _)| *m);
        let mut b = Buckets {
            total,
            entries: Vec::with_capacity(pairs.len()),
            extra: None,
        };
        let mut wide: Vec<(i64, Usage)> = Vec::new();
        for (m, u) in coalesce(pairs) {
            match Entry::narrow(m, &u) {
                Some(e) => b.entries.push(e),
                None => wide.push((m, u)),
            }
        }
        if !wide.is_empty() {
            b.extra = Some(Box::new(Extra {
                blocks: Vec::new(),
                wide,
            }));
        }
        b.reindex(0);
        b
    }

    /// Merge what is older than the horizons into coarser buckets (see the module doc).
    pub fn compact(&mut self, h: &Horizons) {
        let p = self.entries.partition_point(|e| e.minute() < h.minute);
        let wp = self.wide().partition_point(|(m, _)| *m < h.minute);
        let in_place = |m: i64| h.bucket_of(m) == Some(m);
        let stale = self.entries[..p]
            .iter()
            .filter(|e| !in_place(e.minute()))
            .count()
            + self.wide()[..wp]
                .iter()
                .filter(|(m, _)| !in_place(*m))
                .count();
        // Rewriting a busy slice moves all its entries: wait until a 1/COMPACT_RATIO share of
        // them is stale (finer than needed, or past every window: sums stay exact meanwhile),
        // so the cost is a few moves per entry merged, and memory at most that share more.
        if stale == 0 || (self.len() > SPARSE_MAX && stale * COMPACT_RATIO < self.len()) {
            return;
        }
        let mut old: Vec<(i64, Usage)> = self.entries[..p]
            .iter()
            .map(Entry::pair)
            .chain(self.wide()[..wp].iter().copied())
            .filter_map(|(m, u)| Some((h.bucket_of(m)?, u)))
            .collect();
        let rest = self.entries.split_off(p);
        let mut wide = self.wide()[wp..].to_vec();
        old.sort_by_key(|(m, _)| *m);
        self.entries.clear();
        let mut old_wide = Vec::new();
        for (m, u) in coalesce(old) {
            match Entry::narrow(m, &u) {
                Some(e) => self.entries.push(e),
                None => old_wide.push((m, u)),
            }
        }
        // Every merged bucket starts before the minute horizon, every kept one at or after it.
        self.entries.extend(rest);
        self.entries.shrink_to_fit();
        old_wide.append(&mut wide);
        self.extra.get_or_insert_with(Box::default).wide = old_wide;
        self.reindex(0);
    }

    /// Entries held (for memory accounting and tests).
    pub fn len(&self) -> usize {
        self.entries.len() + self.wide().len()
    }

    /// True when nothing is held but (possibly) the total.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sorted `pairs` with the buckets of one minute added up.
fn coalesce(pairs: Vec<(i64, Usage)>) -> Vec<(i64, Usage)> {
    let mut out: Vec<(i64, Usage)> = Vec::with_capacity(pairs.len());
    for (m, u) in pairs {
        match out.last_mut() {
            Some((k, acc)) if *k == m => *acc = acc.plus(&u),
            _ => out.push((m, u)),
        }
    }
    out
}

impl PartialEq for Buckets {
    fn eq(&self, o: &Buckets) -> bool {
        self.total == o.total && self.pairs() == o.pairs()
    }
}

impl Eq for Buckets {}

/// The snapshot form of a slice (format 1): its total and its buckets as a sorted list.
#[derive(Serialize)]
#[serde(rename = "Buckets")]
struct WireOut<'a> {
    total: &'a Usage,
    store: StoreOut,
}

#[derive(Serialize)]
#[serde(rename = "Store")]
enum StoreOut {
    Sparse(Vec<(i64, Usage)>),
}

/// What snapshots may hold: the sorted list, or the minute, hour and day maps that builds before
/// the compact form wrote for busy slices (hours keyed by epoch hour, days by epoch day, each
/// the sum of everything added in it).
#[derive(Deserialize)]
#[serde(rename = "Buckets")]
struct WireIn {
    total: Usage,
    store: StoreIn,
}

#[derive(Deserialize)]
#[serde(rename = "Store")]
enum StoreIn {
    Sparse(Vec<(i64, Usage)>),
    Dense(Box<DenseIn>),
}

#[derive(Deserialize)]
struct DenseIn {
    minutes: BTreeMap<i64, Usage>,
    hours: BTreeMap<i64, Usage>,
    days: BTreeMap<i64, Usage>,
}

impl DenseIn {
    /// The same usage as buckets: the minutes, then what each hour (day) holds beyond its
    /// minutes (hours), at the hour's (day's) first minute, where compaction puts it.
    fn into_pairs(self) -> Vec<(i64, Usage)> {
        fn remainders(
            coarse: &BTreeMap<i64, Usage>,
            fine: &BTreeMap<i64, Usage>,
            per: i64,
            scale: i64,
        ) -> Vec<(i64, Usage)> {
            coarse
                .iter()
                .filter_map(|(k, u)| {
                    let lo = k.saturating_mul(per);
                    let inside = sum_range(fine, lo, lo.saturating_add(per));
                    let rest = u.minus(&inside);
                    (!rest.is_zero()).then(|| (k.saturating_mul(scale), rest))
                })
                .collect()
        }
        let mut pairs = remainders(&self.hours, &self.minutes, HOUR, HOUR);
        pairs.extend(remainders(&self.days, &self.hours, 24, DAY));
        pairs.extend(self.minutes);
        pairs
    }
}

fn sum_range(map: &BTreeMap<i64, Usage>, from: i64, to: i64) -> Usage {
    if from >= to {
        return Usage::default();
    }
    map.range(from..to)
        .fold(Usage::default(), |acc, (_, u)| acc.plus(u))
}

impl Serialize for Buckets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireOut {
            total: &self.total,
            store: StoreOut::Sparse(self.pairs()),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Buckets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Buckets, D::Error> {
        let w = WireIn::deserialize(d)?;
        let pairs = match w.store {
            StoreIn::Sparse(v) => v,
            StoreIn::Dense(d) => d.into_pairs(),
        };
        Ok(Buckets::from_pairs(w.total, pairs))
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

    /// A deterministic scatter of `n` buckets: minutes over five days, amounts from tiny to
    /// beyond `u32` (and minutes beyond `i32` every so often), added to `b` and to a plain map.
    fn scatter(b: &mut Buckets, plain: &mut BTreeMap<i64, i64>, n: usize, seed: i64) {
        let mut x = seed;
        for i in 0..n {
            x = (x * 1_103_515_245 + 12_345).rem_euclid(1 << 31);
            let m = match i % 97 {
                0 => i64::from(i32::MAX) + x % 50,
                1 => i64::from(i32::MIN) - 1 - x % 50,
                _ => x % (5 * DAY),
            };
            let cost = match i % 13 {
                0 => i64::from(u32::MAX) - x % 3,
                1 => MAX_AMOUNT_TEST,
                _ => x % 1000,
            };
            b.add(m, &usage(cost));
            let slot = plain.entry(m).or_insert(0);
            *slot = slot.saturating_add(cost);
        }
    }

    const MAX_AMOUNT_TEST: i64 = crate::model::MAX_AMOUNT;

    #[test]
    fn amounts_and_minutes_beyond_the_compact_form_stay_exact() {
        for n in [30, 500, 5000] {
            let mut b = Buckets::default();
            let mut plain = BTreeMap::new();
            scatter(&mut b, &mut plain, n, 11);
            assert!(!b.wide().is_empty(), "some buckets are wide");
            assert_eq!(b.len(), plain.len(), "one bucket per minute");
            let mut y: i64 = 5;
            for _ in 0..500 {
                y = (y * 1_103_515_245 + 12_345).rem_euclid(1 << 31);
                let from = y % (6 * DAY) - DAY;
                let to = from + (y / 7) % (4 * DAY);
                let want = plain
                    .range(from..to.max(from))
                    .fold(0i64, |a, (_, v)| a.saturating_add(*v));
                assert_eq!(b.sum(from, to).cost, want, "[{from}, {to}) n={n}");
            }
            let all = plain.values().fold(0i64, |a, v| a.saturating_add(*v));
            assert_eq!(b.sum(i64::MIN, i64::MAX).cost, all);
            assert_eq!(b.total().cost, all);
        }
    }

    #[test]
    fn a_bucket_that_outgrows_the_compact_form_moves_whole() {
        let mut b = Buckets::default();
        for m in 0..200 {
            b.add(m, &usage(1));
        }
        b.add(50, &usage(i64::from(u32::MAX)));
        assert_eq!(b.wide(), &[(50, usage(i64::from(u32::MAX) + 1))]);
        assert_eq!(b.len(), 200);
        assert_eq!(b.sum(0, 200).cost, 199 + i64::from(u32::MAX) + 1);
        assert_eq!(b.sum(51, 200).cost, 149, "block totals follow the move");
        b.add(50, &usage(1));
        assert_eq!(b.sum(50, 51).cost, i64::from(u32::MAX) + 2);
    }

    #[test]
    fn snapshots_carry_the_sorted_list_and_read_the_older_map_form() {
        let mut b = Buckets::default();
        let mut plain = BTreeMap::new();
        scatter(&mut b, &mut plain, 3000, 3);
        let bytes = postcard::to_allocvec(&b).unwrap();
        let back: Buckets = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.sum(100, 4000), b.sum(100, 4000));

        // The map form: minutes kept, hours and days as sums of everything in them (here an
        // hour and a day whose minutes were compacted away).
        #[derive(Serialize)]
        struct OldDense {
            minutes: BTreeMap<i64, Usage>,
            hours: BTreeMap<i64, Usage>,
            days: BTreeMap<i64, Usage>,
        }
        #[derive(Serialize)]
        enum OldStore {
            #[allow(dead_code)]
            Sparse(Vec<(i64, Usage)>),
            Dense(Box<OldDense>),
        }
        #[derive(Serialize)]
        struct Old {
            total: Usage,
            store: OldStore,
        }
        let old = Old {
            total: usage(1111),
            store: OldStore::Dense(Box::new(OldDense {
                minutes: [(DAY + 61, usage(1)), (DAY + 62, usage(2))].into(),
                hours: [(24, usage(100)), (25, usage(3))].into(),
                days: [(0, usage(1000)), (1, usage(103))].into(),
            })),
        };
        let b: Buckets = postcard::from_bytes(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(
            b.pairs(),
            vec![
                (0, usage(1000)),
                (DAY, usage(100)),
                (DAY + 61, usage(1)),
                (DAY + 62, usage(2)),
            ]
        );
        assert_eq!(b.total().cost, 1111);
        assert_eq!(b.sum(DAY, 2 * DAY).cost, 103);
    }

    #[test]
    fn a_busy_slice_is_rewritten_once_enough_of_it_is_stale() {
        let mut b = Buckets::default();
        let n = 1600;
        for m in 0..n {
            b.add(DAY + m, &usage(1));
        }
        let h = |minute: i64| Horizons {
            minute,
            hour: 0,
            day: 0,
        };
        // 60 stale minutes of 1600: fewer than 1/16, left as they are (sums stay exact).
        b.compact(&h(DAY + 60));
        assert_eq!(b.len(), n as usize);
        assert_eq!(b.sum(DAY, 3 * DAY).cost, n);
        // 120 of 1600: merged into their two hours.
        b.compact(&h(DAY + 120));
        assert_eq!(b.len(), n as usize - 120 + 2);
        assert_eq!(b.sum(DAY, DAY + 60).cost, 60);
        assert_eq!(b.sum(DAY, 3 * DAY).cost, n);
        // Past the day horizon: dropped from the buckets, kept in the total.
        b.compact(&Horizons {
            minute: 3 * DAY,
            hour: 3 * DAY,
            day: 3 * DAY,
        });
        assert!(b.is_empty());
        assert_eq!(b.total().cost, n);
    }
}

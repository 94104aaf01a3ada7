//! A hash map split into [`SHARDS`] independent tables, for the maps that hold one entry per
//! request (up to millions: every request of the idempotency window).
//!
//! A `HashMap` grows by moving every entry into a table twice the size in one step, and a scan
//! (expiry, pruning) touches every entry. On one table both are as long as the map is big, and
//! both happen under the lock every admission needs: `perf` over the bench's open loop (empty
//! configuration, ~2,200 admissions/s) caught one thread rehashing the open-request map for
//! 140 ms while the other core idled and every admission waited (p99 115-320 ms against 3 ms
//! for the rest of the run). Split into shards, a growth step moves 1/[`SHARDS`] of the entries,
//! and a scan can let go of the lock between shards ([`shard_index`], [`Sharded::shard_mut`]).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::hash::{BuildHasher, Hash};

/// Shards per map. At the largest request maps ([`super::MAX_OPEN_REQUESTS`], 4 M entries) a
/// shard holds ~62 k, so one growth step or one shard's scan is a few milliseconds; 64 empty
/// tables cost nothing (an empty `HashMap` does not allocate).
pub const SHARDS: usize = 64;

/// The shard of `k` under `pick` (a hasher of its own, independent of the tables' hashers, so
/// the entries of one shard still spread over all of that table's buckets).
pub fn shard_index<Q: Hash + ?Sized>(pick: &RandomState, k: &Q) -> usize {
    // SHARDS is a power of two: the low bits of a SipHash are uniform.
    (pick.hash_one(k) as usize) & (SHARDS - 1)
}

/// A map of [`SHARDS`] `HashMap`s; an entry lives in the shard its key hashes to.
#[derive(Clone, Debug)]
pub struct Sharded<K, V> {
    shards: Vec<HashMap<K, V>>,
    pub(super) pick: RandomState,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            pick: RandomState::new(),
        }
    }
}

impl<K: Eq + Hash, V> Sharded<K, V> {
    fn of<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        shard_index(&self.pick, k)
    }

    /// The value of `k`.
    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.of(k)].get(k)
    }

    /// The value of `k`, mutably.
    pub fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.of(k);
        self.shards[i].get_mut(k)
    }

    /// Whether `k` is present.
    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(k).is_some()
    }

    /// Remove `k`, returning its value.
    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.of(k);
        self.shards[i].remove(k)
    }

    /// Insert `v` at `k`, returning the value it replaced.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = self.of(&k);
        self.shards[i].insert(k, v)
    }

    /// The entry of `k` in its shard.
    pub fn entry(&mut self, k: K) -> Entry<'_, K, V> {
        let i = self.of(&k);
        self.shards[i].entry(k)
    }

    /// Entries in all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    /// True when no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    /// Slots allocated in all shards.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(HashMap::capacity).sum()
    }

    /// Every entry, shard by shard (no order).
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    /// Keep the entries `f` accepts, in every shard.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        for s in &mut self.shards {
            s.retain(|k, v| f(k, v));
        }
    }

    /// Shard `i` (`i < SHARDS`).
    pub fn shard(&self, i: usize) -> &HashMap<K, V> {
        &self.shards[i % SHARDS]
    }

    /// Shard `i` (`i < SHARDS`), mutably. Entries must stay in the shard they hash to: remove
    /// and change values, never insert here.
    pub fn shard_mut(&mut self, i: usize) -> &mut HashMap<K, V> {
        &mut self.shards[i % SHARDS]
    }
}

impl<K: Eq + Hash, V> FromIterator<(K, V)> for Sharded<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = Sharded::default();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map_and_spreads_over_every_shard() {
        let mut m: Sharded<String, usize> = Sharded::default();
        let n = 20_000;
        for i in 0..n {
            assert_eq!(m.insert(format!("r{i}"), i), None);
        }
        assert_eq!(m.len(), n);
        assert_eq!(m.insert("r7".into(), 70), Some(7));
        assert_eq!(m.get("r7"), Some(&70));
        *m.get_mut("r8").unwrap() += 1;
        assert_eq!(m.get("r8"), Some(&9));
        *m.entry("new".into()).or_default() += 5;
        assert_eq!(m.get("new"), Some(&5));
        assert_eq!(m.remove("new"), Some(5));
        assert!(!m.contains_key("new") && m.contains_key("r0"));
        // Every shard gets a share; none gets a large part (a growth step stays small).
        for i in 0..SHARDS {
            let share = m.shard(i).len();
            assert!(
                share > n / SHARDS / 2 && share < n / SHARDS * 2,
                "{i}: {share}"
            );
            for k in m.shard(i).keys() {
                assert_eq!(shard_index(&m.pick, k.as_str()), i);
            }
        }
        m.retain(|_, v| *v % 2 == 0);
        assert_eq!(m.len(), n / 2);
        assert_eq!(m.iter().count(), n / 2);
        let copy: Sharded<String, usize> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(copy.len(), n / 2);
        assert_eq!(copy.get("r10"), Some(&10));
        assert!(!m.is_empty() && Sharded::<String, usize>::default().is_empty());
    }
}

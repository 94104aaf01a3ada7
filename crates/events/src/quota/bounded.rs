//! A set with a capacity: past it, the oldest insertions are forgotten first. Every piece of
//! bookkeeping in the quota state that exists only to recognise a repeat (an event id already
//! applied, an alert already sent, a credit write already answered) is one of these, so a flood
//! of distinct ids costs at most the capacity, never unbounded memory (DESIGN §4).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Insertion-ordered map with a capacity; inserting past it evicts the oldest entry.
#[derive(Clone, Debug)]
pub struct Bounded<K: Eq + Hash + Clone, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> Bounded<K, V> {
    /// An empty map holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a bounded map needs room for one entry");
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Insert `k` unless present. Returns false (and changes nothing) when it was present.
    pub fn insert(&mut self, k: K, v: V) -> bool {
        if self.map.contains_key(&k) {
            return false;
        }
        if self.map.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.map.remove(&old);
        }
        self.order.push_back(k.clone());
        self.map.insert(k, v);
        true
    }

    /// Remove `k`, returning its value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let v = self.map.remove(k)?;
        if let Some(i) = self.order.iter().position(|o| o == k) {
            self.order.remove(i);
        }
        Some(v)
    }

    /// Whether `k` is present.
    pub fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// The value of `k`.
    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    /// Keep only the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.map.retain(|k, v| keep(k, v));
        let map = &self.map;
        self.order.retain(|k| map.contains_key(k));
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.order.iter().filter_map(|k| self.map.get_key_value(k))
    }

    /// A bounded map holding `entries` (oldest first; past the capacity the oldest are dropped).
    pub fn from_entries(capacity: usize, entries: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut b = Bounded::new(capacity);
        for (k, v) in entries {
            b.insert(k, v);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_at_capacity() {
        let mut b = Bounded::new(3);
        for i in 0..5 {
            assert!(b.insert(i, ()));
        }
        assert_eq!(b.len(), 3);
        assert!(!b.contains(&0) && !b.contains(&1));
        assert!(b.contains(&2) && b.contains(&4));
        assert!(!b.insert(4, ()), "a repeat is recognised");
        b.retain(|k, _| *k != 3);
        assert_eq!(b.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![2, 4]);
    }
}

//! The in-memory request table: every request seen within the reservation TTL, folded from this
//! instance's own writes and from the stream (so a settlement may reach any instance, and an
//! admission retried after a restart is recognised).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tally_events::quota::{SHARDS, shard_index};
use tally_events::{Envelope, RequestView};

/// Most requests tracked at once. At 10k admissions/s with a 15-minute TTL a busy instance would
/// hold about 9M; this bound keeps memory in check whatever the rate or a flood of distinct
/// request ids. At the bound the requests seen longest ago and not in use are dropped (see
/// [`EVICT_FRACTION`]): the table is a cache, whether a request id was admitted is the quota
/// state's to say, and a request that left the table is recalled from the ledger when it comes
/// back. Only when every tracked request is in use does a new one get 503.
pub const MAX_TRACKED_REQUESTS: usize = 4_000_000;

/// At the bound, a shard drops the least recently seen 1/`EVICT_FRACTION` of its idle requests
/// at once: one scan of a shard (a 64th of the table) makes room for many admissions, instead of
/// a scan per admission.
pub const EVICT_FRACTION: usize = 8;

/// One tracked request; the async mutex serializes admission/settlement of the same request id.
pub type Slot = Arc<tokio::sync::Mutex<RequestView>>;

struct Entry {
    slot: Slot,
    seen: Instant,
}

type Shard = HashMap<String, Entry>;

/// Requests by id, in [`SHARDS`] tables with a lock each (see [`tally_events::quota::Sharded`]):
/// a table's growth step or the sweep's scan holds up only the requests of its shard, for a
/// 64th of the time one table would.
pub struct RequestTable {
    shards: Vec<Mutex<Shard>>,
    pick: RandomState,
    /// Requests held in all shards (the bound is on the whole table).
    held: AtomicUsize,
    ttl: Duration,
    capacity: usize,
}

impl RequestTable {
    /// A table keeping requests for `ttl` after they were last touched, at most
    /// [`MAX_TRACKED_REQUESTS`].
    pub fn new(ttl: Duration) -> Self {
        Self::with_capacity(ttl, MAX_TRACKED_REQUESTS)
    }

    /// A table holding at most `capacity` requests.
    pub fn with_capacity(ttl: Duration, capacity: usize) -> Self {
        RequestTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            pick: RandomState::new(),
            held: AtomicUsize::new(0),
            ttl,
            capacity,
        }
    }

    /// The shard of `request_id`, locked. A panic while a shard was locked leaves a map that is
    /// still whole (no operation here panics half-way), so a poisoned lock is taken over.
    fn shard(&self, request_id: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_index(&self.pick, request_id)])
    }

    /// The slot of `request_id`, created empty if absent. `None` when the table is full of
    /// requests in use.
    pub fn slot(&self, request_id: &str) -> Option<Slot> {
        let shard = shard_index(&self.pick, request_id);
        for attempt in 0..2 {
            let mut map = lock(&self.shards[shard]);
            if let Some(e) = map.get_mut(request_id) {
                e.seen = Instant::now();
                return Some(e.slot.clone());
            }
            // Counted before inserting, so two shards racing for the last place cannot both win.
            if self.held.fetch_add(1, Ordering::AcqRel) < self.capacity {
                return Some(self.insert(&mut map, request_id));
            }
            self.held.fetch_sub(1, Ordering::AcqRel);
            drop(map); // one shard locked at a time: making room locks others
            if attempt == 0 {
                self.make_room(shard);
            }
        }
        None
    }

    fn insert(&self, map: &mut Shard, request_id: &str) -> Slot {
        let idempotency = chrono::Duration::from_std(self.ttl * 2).unwrap_or(chrono::Duration::MAX);
        let view = RequestView::new(request_id).with_idempotency(idempotency);
        let slot: Slot = Arc::new(tokio::sync::Mutex::new(view));
        map.insert(
            request_id.to_owned(),
            Entry {
                slot: slot.clone(),
                seen: Instant::now(),
            },
        );
        slot
    }

    /// At the bound: drop idle requests from the first shard, starting at `from`, that has any.
    fn make_room(&self, from: usize) {
        for k in 0..SHARDS {
            if evict_idle(&mut lock(&self.shards[(from + k) % SHARDS]), &self.held) > 0 {
                return;
            }
        }
    }

    /// The slot of `request_id` if tracked.
    pub fn get(&self, request_id: &str) -> Option<Slot> {
        self.shard(request_id)
            .get(request_id)
            .map(|e| e.slot.clone())
    }

    /// Fold an event from the stream into its request (idempotent).
    pub async fn apply(&self, env: &Envelope) {
        let Some(rid) = env.request_id.as_deref() else {
            return;
        };
        if let Some(slot) = self.slot(rid) {
            slot.lock().await.apply(env);
        }
    }

    /// Drop requests untouched for longer than the TTL (plus a grace for late settlements, which
    /// then fall back to the ledger). Returns how many remain.
    pub fn sweep(&self) -> usize {
        let horizon = self.ttl * 2;
        // One shard at a time: admissions of the other shards go on meanwhile.
        for shard in &self.shards {
            let mut map = lock(shard);
            let before = map.len();
            let now = Instant::now();
            map.retain(|_, e| now.saturating_duration_since(e.seen) < horizon);
            self.held.fetch_sub(before - map.len(), Ordering::AcqRel);
        }
        self.len()
    }

    /// How many requests are tracked.
    pub fn len(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drop the least recently seen [`EVICT_FRACTION`]th of the shard's idle requests (no one holds
/// their slot; the shard is locked, so no one can take one meanwhile). Returns how many.
fn evict_idle(map: &mut Shard, held: &AtomicUsize) -> usize {
    let idle = |e: &Entry| Arc::strong_count(&e.slot) == 1;
    let mut seen: Vec<Instant> = map.values().filter(|e| idle(e)).map(|e| e.seen).collect();
    if seen.is_empty() {
        return 0;
    }
    let n = (seen.len() / EVICT_FRACTION).max(1);
    let cutoff = *seen.select_nth_unstable(n - 1).1;
    let before = map.len();
    map.retain(|_, e| !(e.seen <= cutoff && idle(e)));
    let dropped = before - map.len();
    held.fetch_sub(dropped, Ordering::AcqRel);
    dropped
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_drops_idle_requests_and_refuses_only_when_all_are_in_use() {
        let t = RequestTable::with_capacity(Duration::from_secs(60), 3);
        let held: Vec<Slot> = (0..3).map(|i| t.slot(&format!("r{i}")).unwrap()).collect();
        assert!(
            t.slot("r3").is_none(),
            "every slot in use: the admission gets 503"
        );
        assert!(
            t.slot("r1").is_some(),
            "a tracked request still has its slot"
        );
        drop(held);
        std::thread::sleep(Duration::from_millis(2));
        let r3 = t.slot("r3").expect("room made by dropping an idle request");
        assert_eq!(t.len(), 3, "never past the bound");
        let gone = (0..3).filter(|i| t.get(&format!("r{i}")).is_none()).count();
        assert_eq!(gone, 1, "one idle request dropped");
        // A dropped one comes back as a new slot (its history is recalled from the ledger).
        let r4 = t.slot("r4").expect("room again");
        assert_eq!(t.len(), 3);
        drop((r3, r4));
    }

    #[test]
    fn sweep_frees_requests_past_twice_the_ttl() {
        let t = RequestTable::with_capacity(Duration::from_millis(1), 3);
        for i in 0..3 {
            assert!(t.slot(&format!("r{i}")).is_some());
        }
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.sweep(), 0, "past 2 x TTL every request is swept");
        assert!(t.slot("r3").is_some());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn at_the_bound_a_shard_drops_an_eighth_of_its_idle_requests_at_once() {
        let cap = 64 * 400;
        let t = RequestTable::with_capacity(Duration::from_secs(60), cap);
        for i in 0..cap {
            t.slot(&format!("r{i}")).unwrap();
        }
        assert_eq!(t.len(), cap);
        t.slot("one more").unwrap();
        let after = t.len();
        assert!(
            after < cap - 400 / EVICT_FRACTION / 2 && after > cap - 400,
            "one shard made room for many: {after}"
        );
        assert!(
            t.get(&format!("r{}", cap - 1)).is_some(),
            "recent requests stay"
        );
    }
}

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

/// Most requests tracked at once. At 10k admissions/s with a 15-minute TTL a busy instance holds
/// about 9M; this bound stops an unbounded flood of distinct request ids from exhausting memory
/// (new admissions then get 503 until the sweep frees room).
pub const MAX_TRACKED_REQUESTS: usize = 4_000_000;

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

    /// The slot of `request_id`, created empty if absent. `None` when the table is full.
    pub fn slot(&self, request_id: &str) -> Option<Slot> {
        let mut map = self.shard(request_id);
        if let Some(e) = map.get_mut(request_id) {
            e.seen = Instant::now();
            return Some(e.slot.clone());
        }
        // Counted before inserting, so two shards racing for the last place cannot both win.
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
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
        Some(slot)
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

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_refuses_new_requests_and_frees_room_on_sweep() {
        let t = RequestTable::with_capacity(Duration::from_millis(1), 3);
        for i in 0..3 {
            assert!(t.slot(&format!("r{i}")).is_some());
        }
        assert!(t.slot("r3").is_none(), "full: the admission gets 503");
        assert!(
            t.slot("r1").is_some(),
            "a tracked request still has its slot"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.sweep(), 0, "past 2 x TTL every request is swept");
        assert!(t.slot("r3").is_some());
    }
}

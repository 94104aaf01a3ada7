//! Measure the quota state's heap over a generated history (issue 5's memory target): folds
//! `HistorySpec::large(N)` in process (nothing published), compacts it as a live instance
//! would, and prints the bytes the state holds, its entry counts and its snapshot's size.
//!
//! `cargo run --release --example state_memory -- 1000000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tally::history::{self, HistorySpec};
use tally_events::quota::{QuotaState, horizons};

struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn note(delta: isize) {
    let now = HELD.fetch_add(delta, Ordering::Relaxed) + delta;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as isize));
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n as isize - l.size() as isize);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mib(b: isize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let spec = HistorySpec::large(n);
    let (mut q, stats) = history::fold(&spec, |_| {}).await?;
    let forgotten = q.prune();
    println!("pruned {forgotten} requests; stream clock {:?}", q.clock());
    let now = chrono::Utc::now();
    let backfill = chrono::Duration::days(35);
    let h = horizons(&q.config, now, backfill);
    // One round over every subject (a call takes the next batch of the round).
    let subjects = q.config.subjects().count() + 1;
    let mut done = 0;
    while done < subjects {
        done += q.compact(&h, now - backfill, subjects);
    }
    // The generator's state keeps the hash tables' peak capacities (every request it ever held
    // open); a starting instance holds what its snapshot decodes to, so that is what counts.
    let snap = q.encode_snapshot(1, now);
    let entries = q.usage_entries();
    drop(q);
    let before = HELD.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (_, state) = QuotaState::decode_snapshot(&snap)?;
    println!(
        "events {} (admissions {}, settlements {}): usage entries {entries}, open requests {}; \
         snapshot {:.1} MiB; state decoded from it {:.1} MiB (peak while decoding {:.1} MiB)",
        stats.events,
        stats.admissions,
        stats.settlements,
        state.open_requests(),
        mib(snap.len() as isize),
        mib(HELD.load(Ordering::Relaxed) - before),
        mib(PEAK.load(Ordering::Relaxed) - before),
    );
    Ok(())
}

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

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        HELD.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
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
    let before = HELD.load(Ordering::Relaxed);
    let copy = q.clone();
    let state = HELD.load(Ordering::Relaxed) - before;
    let snap = copy.encode_snapshot(1, now);
    println!(
        "events {} (admissions {}, settlements {}); state {:.1} MiB; usage entries {}; open {}; snapshot {:.1} MiB",
        stats.events,
        stats.admissions,
        stats.settlements,
        mib(state),
        copy.usage_entries(),
        copy.open_requests(),
        mib(snap.len() as isize)
    );
    let before = HELD.load(Ordering::Relaxed);
    let (_, decoded) = QuotaState::decode_snapshot(&snap)?;
    println!(
        "decoded from the snapshot: {:.1} MiB",
        mib(HELD.load(Ordering::Relaxed) - before)
    );
    drop(decoded);
    Ok(())
}

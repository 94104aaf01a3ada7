//! The API's background work as supervised tasks (DESIGN §3): follow the stream, expire
//! reservations, sweep the in-memory tables, compact usage, and (with `--fail-open`) drain the
//! spool. Each is its own loop with its own task; every one gets the shutdown signal. A watcher
//! holds their handles: a task that ends while the instance is meant to run (a panic, an error it
//! cannot recover from) marks the state broken — admissions answer 503 and `/readyz` fails, so
//! the instance never decides on a frozen state — and the watcher's own handle ends with the
//! task's name and reason, which the process supervisor turns into a clear exit.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tally_events::Envelope;
use tally_events::quota::SHARDS;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::AppState;

/// How often the tables are swept of requests past their TTL.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often reservations past their TTL are expired: bounds how long an expired reservation
/// keeps holding quota beyond the TTL.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Most expiries published per round (the rest wait for the next round).
pub const MAX_EXPIRIES_PER_ROUND: usize = 10_000;
/// How often a slice of the usage is compacted.
pub const COMPACT_EVERY: Duration = Duration::from_secs(1);
/// Subjects compacted per round: the state lock is held for milliseconds, and a state of 100,000
/// subjects is compacted every ~50 s.
pub const COMPACT_SUBJECTS_PER_ROUND: usize = 2_000;

/// A background task that ended while the instance was meant to run.
#[derive(Debug, thiserror::Error)]
#[error("background task `{task}` ended: {reason}")]
pub struct TaskFailed {
    /// Which task.
    pub task: &'static str,
    /// Its error or panic.
    pub reason: String,
}

/// Resolves once shutdown was asked for.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Start every background task of `state` and the watcher over them. The returned handle ends
/// `Ok` after a shutdown, or `Err` as soon as any task ends on its own.
pub fn spawn(state: AppState, stop: watch::Receiver<bool>) -> JoinHandle<Result<(), TaskFailed>> {
    let mut set = JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let mut add =
        |name: &'static str,
         fut: std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>| {
            let id = set.spawn(fut).id();
            names.insert(id, name);
        };
    add(
        "follow",
        Box::pin(crate::tail::follow_task(state.clone(), stop.clone())),
    );
    add("expire", Box::pin(expire_task(state.clone(), stop.clone())));
    add("sweep", Box::pin(sweep_task(state.clone(), stop.clone())));
    add(
        "compact",
        Box::pin(compact_task(state.clone(), stop.clone())),
    );
    if let Some(spool) = state.spool().cloned() {
        let mut s = stop.clone();
        add(
            "spool",
            Box::pin(async move {
                spool.drain(async move { stopped(&mut s).await }).await;
                Ok(())
            }),
        );
    }
    tokio::spawn(async move {
        while let Some(joined) = set.join_next_with_id().await {
            if *stop.borrow() {
                continue;
            }
            let (task, reason) = match joined {
                Ok((id, Ok(()))) => (
                    names[&id],
                    "returned without being asked to stop".to_owned(),
                ),
                Ok((id, Err(e))) => (names[&id], e),
                Err(e) => (names.get(&e.id()).copied().unwrap_or("?"), panic_text(e)),
            };
            state.mark_broken(task);
            state.set_failed_task(task, &reason);
            tracing::error!(task, %reason, "a background task of the API ended; the instance stops deciding admissions");
            set.abort_all();
            return Err(TaskFailed { task, reason });
        }
        Ok(())
    })
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| format!("panicked: {s}"))
        .or_else(|| p.downcast_ref::<String>().map(|s| format!("panicked: {s}")))
        .unwrap_or_else(|| "panicked".into())
}

/// A ticker for a periodic task: rounds that run late are not bunched up afterwards.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

async fn expire_task(state: AppState, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let mut tick = ticker(EXPIRE_EVERY);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            _ = tick.tick() => {}
        }
        if state.0.tail_ready.load(Ordering::Relaxed) {
            expire_reservations(&state).await;
        }
    }
}

async fn sweep_task(state: AppState, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let mut tick = ticker(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            _ = tick.tick() => {}
        }
        state.requests().sweep();
        state.sweep_in_doubt(state.0.config.reservation_ttl);
        prune_requests(&state);
    }
}

async fn compact_task(state: AppState, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let mut tick = ticker(COMPACT_EVERY);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            _ = tick.tick() => {}
        }
        if !state.0.tail_ready.load(Ordering::Relaxed) {
            continue;
        }
        let backfill = chrono::Duration::from_std(state.0.config.max_backfill)
            .unwrap_or(chrono::Duration::MAX);
        let now = chrono::Utc::now();
        state
            .quota()
            .compact_as_of(now, backfill, COMPACT_SUBJECTS_PER_ROUND);
    }
}

/// Forget old closed requests shard by shard (each shard also within its share of
/// [`tally_events::quota::MAX_OPEN_REQUESTS`]), letting go of the quota lock in between (see
/// [`tally_events::quota::Sharded`]).
fn prune_requests(state: &AppState) {
    for i in 0..SHARDS {
        state.quota().prune_shard(i);
    }
}

/// Publish `reservation.expired` for every reservation past its TTL. Every instance does this;
/// the event id is derived from the admission id, so JetStream (duplicate window) and the ledger
/// (primary key) keep exactly one, and the tail closes it on the others.
async fn expire_reservations(state: &AppState) {
    let ttl =
        chrono::Duration::from_std(state.0.config.reservation_ttl).unwrap_or(chrono::Duration::MAX);
    let now = chrono::Utc::now();
    let mut due = Vec::new();
    // Shard by shard, the lock let go in between: a scan of every request (millions within the
    // idempotency window) would hold every admission up for as long.
    for i in 0..SHARDS {
        if due.len() >= MAX_EXPIRIES_PER_ROUND {
            break;
        }
        due.extend(state.quota().expired_in_shard(i, now, ttl));
    }
    due.truncate(MAX_EXPIRIES_PER_ROUND);
    for (request_id, admission_id, leaf) in due {
        let data = tally_events::EventData::ReservationExpired(tally_events::ReservationEnded {
            admission_id,
        });
        let mut env = Envelope::new(data, now, Some(request_id.clone()), leaf);
        env.id = crate::durable::derived_id(&format!("expired|{admission_id}"));
        if let Err(e) = state.publish(&env).await {
            tracing::warn!(error = %tally_ledger::error::Chain(&e), request_id, "reservation expiry not published; retrying");
            return;
        }
        state.quota().apply(&env);
        state.requests().apply(&env).await;
        state.metrics().expiries.inc();
    }
}

//! The stream tail. At start the quota state is built once, to completion: the newest valid
//! snapshot at or below the ledger frontier (older ones, then a full rebuild, when it is missing,
//! damaged or of another format — each fallback logged and shown on `/readyz`), then the ledger
//! rows after it in stream order. The tail then follows the stream from the frontier, folding
//! every event into the quota state and request events into the request table. A tail that
//! loses its consumer resumes after the last sequence it folded; one that finds the stream no
//! longer holds the next sequence rebuilds from the ledger.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;
use serde::Serialize;
use tally_events::Envelope;
use tally_events::quota::QuotaState;
use tally_ledger::error::Chain;

use crate::AppState;

/// Backoff before re-creating the tail after an error.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// How the instance started, for `/readyz` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Startup {
    /// `waiting_for_spool`, `loading_snapshot`, `rebuilding`, `following`.
    pub phase: &'static str,
    /// The snapshot started from: id, the stream sequence it covers, when it was taken.
    pub snapshot: Option<serde_json::Value>,
    /// Snapshots passed over and why, or that there was none (a full rebuild).
    pub fallbacks: Vec<String>,
    /// Ledger rows folded after the snapshot.
    pub rows_folded: u64,
    /// Their rate.
    pub rows_per_s: f64,
    /// From the start of the rebuild until the state was ready, in ms.
    pub ready_ms: Option<u64>,
}

/// The ledger writer's durable consumer: everything at or below its ack floor is in the ledger.
const LEDGER_CONSUMER: &str = "tally-ledger";

/// The instance's stream and the first sequence it still holds.
async fn open_stream(
    state: &AppState,
) -> Result<(async_nats::jetstream::stream::Stream, u64), String> {
    let publisher = &state.0.publisher;
    let mut stream = publisher
        .jetstream()
        .get_stream(&publisher.settings().name)
        .await
        .map_err(|e| e.to_string())?;
    let first = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .first_sequence;
    Ok((stream, first))
}

/// The first stream sequence not known to be in the ledger.
async fn ledger_frontier(state: &AppState) -> Result<u64, String> {
    let (stream, first) = open_stream(state).await?;
    let floor = match stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(LEDGER_CONSUMER)
        .await
    {
        Ok(mut c) => {
            c.info()
                .await
                .map_err(|e| e.to_string())?
                .ack_floor
                .stream_sequence
        }
        Err(_) => 0,
    };
    Ok((floor + 1).max(first).max(1))
}

impl AppState {
    fn set_startup(&self, f: impl FnOnce(&mut Startup)) {
        f(&mut self.0.startup.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// How the instance started.
    pub fn startup(&self) -> Startup {
        self.0
            .startup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Build the quota state from the newest usable snapshot and the ledger rows after it; install
/// it; return the frontier the stream tail starts at.
async fn rebuild(state: &AppState) -> Result<u64, String> {
    let started = Instant::now();
    let frontier = ledger_frontier(state).await?;
    let stream = state.0.publisher.settings().name.clone();
    state.set_startup(|s| s.phase = "loading_snapshot");
    let loaded = tally_ledger::snapshots::load_newest(&state.0.db, &stream, frontier - 1)
        .await
        .map_err(|e| Chain(&e).to_string())?;
    let mut fallbacks: Vec<String> = loaded
        .skipped
        .iter()
        .map(|(s, why)| {
            format!(
                "snapshot {} (stream sequence {}) skipped: {why}",
                s.id, s.stream_seq
            )
        })
        .collect();
    let (mut q, from, used): (QuotaState, u64, _) = match loaded.snapshot {
        Some((s, q)) => {
            let used =
                serde_json::json!({"id": s.id, "stream_seq": s.stream_seq, "taken_at": s.taken_at});
            (q, s.stream_seq.max(0) as u64, Some(used))
        }
        None => {
            tracing::warn!(
                frontier,
                "no usable snapshot: rebuilding the quota state from the first ledger row"
            );
            fallbacks.push("no usable snapshot: full rebuild from the ledger".into());
            (QuotaState::default(), 0, None)
        }
    };
    q.set_idempotency(state.idempotency());
    state.set_startup(|s| {
        s.phase = "rebuilding";
        s.snapshot = used;
        s.fallbacks = fallbacks;
    });
    let p = tally_ledger::reader::fold_by_seq(&state.0.db, from, frontier, |page, p| {
        for (_, env) in page {
            q.apply(env);
        }
        // Forget and compact as the live instance would have, as the rebuild goes: memory
        // follows the active state, not the history being read.
        maintain(state, &mut q, REBUILD_COMPACT_SUBJECTS);
        state.set_startup(|s| (s.rows_folded, s.rows_per_s) = (p.rows, p.rows_per_s));
    })
    .await
    .map_err(|e| Chain(&e).to_string())?;
    maintain(state, &mut q, usize::MAX);
    *state.quota() = q;
    state.0.tail_seq.store(frontier - 1, Ordering::Release);
    let ready_ms = started.elapsed().as_millis() as u64;
    state.set_startup(|s| s.ready_ms = Some(ready_ms));
    tracing::info!(
        snapshot_seq = from,
        rows = p.rows,
        rows_per_s = p.rows_per_s as u64,
        frontier,
        ready_ms,
        "quota state built"
    );
    Ok(frontier)
}

/// Subjects compacted after each page of a rebuild: a round of the whole state every few pages.
const REBUILD_COMPACT_SUBJECTS: usize = 20_000;

/// Forget what a live instance would have forgotten by now (by the stream's clock), and compact
/// up to `subjects` subjects' usage.
fn maintain(state: &AppState, q: &mut QuotaState, subjects: usize) {
    let cfg = &state.0.config;
    let now = chrono::Utc::now();
    q.prune();
    let backfill = chrono::Duration::from_std(cfg.max_backfill).unwrap_or(chrono::Duration::MAX);
    q.compact_as_of(now, backfill, subjects);
}

/// The follow task: wait for an earlier run's spool, build the state once, then follow the
/// stream until `stop`, resuming after errors.
pub async fn follow_task(
    state: AppState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    tokio::select! {
        _ = crate::tasks::stopped(&mut stop) => return Ok(()),
        _ = wait_for_spool_backlog(&state) => {}
    }
    let mut resume = loop {
        tokio::select! {
            _ = crate::tasks::stopped(&mut stop) => return Ok(()),
            r = rebuild(&state) => match r {
                Ok(frontier) => break frontier - 1,
                Err(e) => {
                    tracing::warn!(error = %e, "building the quota state failed; retrying");
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
            },
        }
    };
    state.set_startup(|s| s.phase = "following");
    loop {
        tokio::select! {
            _ = crate::tasks::stopped(&mut stop) => return Ok(()),
            r = follow(&state, &mut resume) => {
                if let Err(e) = r {
                    state.metrics().tail_restarts.inc();
                    tracing::warn!(error = %e, resume_after = resume, "stream tail failed; resuming");
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
        }
    }
}

/// Follow the stream after `resume`, updating it as events are folded. Returns on error.
async fn follow(state: &AppState, resume: &mut u64) -> Result<(), String> {
    let inner = &state.0;
    let settings = inner.publisher.settings();
    let (stream, first) = open_stream(state).await?;
    if first > *resume + 1 {
        // The stream no longer holds what this instance has not folded yet: start over from
        // the ledger, which does.
        tracing::error!(
            resume_after = *resume,
            stream_first = first,
            "the stream dropped events the tail had not folded; rebuilding"
        );
        inner.tail_ready.store(false, Ordering::Relaxed);
        *resume = rebuild(state).await? - 1;
    }
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("{}.>", settings.prefix()),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: *resume + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    if consumer
        .info()
        .await
        .map_err(|e| e.to_string())?
        .num_pending
        == 0
    {
        inner.tail_ready.store(true, Ordering::Relaxed);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        // A test makes the tail panic here to show a dead task is noticed (no-op normally).
        fail::fail_point!("tail-apply");
        if !is_own(state, &m)
            && let Ok(env) = Envelope::decode(&m.payload)
        {
            state.quota().apply(&env);
            state.requests().apply(&env).await;
        }
        if let Ok(info) = m.info() {
            *resume = info.stream_sequence;
            inner
                .tail_seq
                .store(info.stream_sequence, Ordering::Release);
            inner.tail_lag_ms.store(behind_ms(&info), Ordering::Relaxed);
            if info.pending == 0 {
                inner.tail_ready.store(true, Ordering::Relaxed);
            }
        }
    }
    Err("tail ended".into())
}

/// Whether `m` is an event this instance already applied itself (by its `Nats-Msg-Id`, the
/// event id): then it is not decoded again.
fn is_own(state: &AppState, m: &async_nats::jetstream::Message) -> bool {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .and_then(|v| uuid::Uuid::parse_str(v.as_str()).ok())
        .is_some_and(|id| state.take_own(&id))
}

/// How far behind the head a message was folded: 0 when nothing was pending after it.
fn behind_ms(info: &async_nats::jetstream::message::Info<'_>) -> u64 {
    if info.pending == 0 {
        return 0;
    }
    let published = chrono::DateTime::<chrono::Utc>::from_timestamp(
        info.published.unix_timestamp(),
        info.published.nanosecond(),
    );
    published.map_or(0, |p| {
        (chrono::Utc::now() - p).num_milliseconds().max(0) as u64
    })
}

/// Events a previous run spooled (`--fail-open`) must reach the stream before the state is
/// rebuilt from it, or admissions would be decided without them.
async fn wait_for_spool_backlog(state: &AppState) {
    let Some(spool) = state.spool() else { return };
    state.set_startup(|s| s.phase = "waiting_for_spool");
    let mut logged = false;
    while !spool.backlog_drained() {
        if !logged {
            tracing::warn!(
                pending = spool.pending(),
                "waiting for events spooled by an earlier run to be published"
            );
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

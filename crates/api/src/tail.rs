//! The stream tail. At start the quota state is rebuilt from the ledger (every row the ledger
//! writer has acknowledged, in stream order); the tail then follows the stream from the next
//! sequence, folding every event into the quota state (other instances' admissions, settlements
//! and admin writes) and request events into the request table, so any instance can settle any
//! request and admissions stay idempotent across restarts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;
use tally_events::Envelope;

use crate::AppState;

/// How often the table is swept of requests past their TTL.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often reservations past their TTL are expired: bounds how long an expired reservation
/// keeps holding quota beyond the TTL.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Most expiries published per round (the rest wait for the next round).
pub const MAX_EXPIRIES_PER_ROUND: usize = 10_000;
/// Backoff before re-creating the tail after an error.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Follow the stream forever (until the task is dropped). Marks the state ready once it has read
/// everything that was in the stream when it started.
pub async fn run(state: AppState) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    // The last stream sequence folded: a restarted tail resumes after it instead of rebuilding,
    // so admissions never see a state that has lost recent events.
    let mut resume_after: Option<u64> = None;
    loop {
        tokio::select! {
            _ = expire.tick() => {
                if state.0.tail_ready.load(Ordering::Relaxed) {
                    expire_reservations(&state).await;
                }
            }
            r = follow(&state, &mut resume_after) => {
                if let Err(e) = r {
                    state.metrics().tail_restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "stream tail failed; resuming");
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            _ = sweep.tick() => {
                state.requests().sweep();
                state.sweep_in_doubt(state.0.config.reservation_ttl);
                let ttl = chrono::Duration::from_std(state.0.config.reservation_ttl)
                    .unwrap_or(chrono::Duration::MAX);
                state.quota().prune(chrono::Utc::now() - ttl * 2);
            }
        }
    }
}

/// The ledger writer's durable consumer: everything at or below its ack floor is in the ledger.
const LEDGER_CONSUMER: &str = "tally-ledger";
/// Ledger rows read per round trip while rebuilding.
const BOOTSTRAP_PAGE_ROWS: i64 = 10_000;

/// The first stream sequence not known to be in the ledger.
async fn ledger_frontier(state: &AppState) -> Result<u64, String> {
    let inner = &state.0;
    let js = inner.publisher.jetstream();
    let mut stream = js
        .get_stream(&inner.publisher.settings().name)
        .await
        .map_err(|e| e.to_string())?;
    let first = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .first_sequence;
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

/// Fold every ledger row below `frontier` (stream order) into the quota state; rows within the
/// request table's horizon also into the request table.
async fn bootstrap(
    state: &AppState,
    frontier: u64,
    quota: &mut tally_events::quota::QuotaState,
) -> Result<u64, String> {
    let horizon = chrono::Utc::now()
        - chrono::Duration::from_std(state.0.config.reservation_ttl * 2)
            .map_err(|e| e.to_string())?;
    let mut after: i64 = 0;
    let mut rows = 0u64;
    loop {
        let page: Vec<(i64, serde_json::Value)> = sqlx::query_as(
            "SELECT stream_seq, payload FROM ledger WHERE stream_seq > $1 AND stream_seq < $2 \
             ORDER BY stream_seq LIMIT $3",
        )
        .bind(after)
        .bind(i64::try_from(frontier).unwrap_or(i64::MAX))
        .bind(BOOTSTRAP_PAGE_ROWS)
        .fetch_all(&state.0.db)
        .await
        .map_err(|e| e.to_string())?;
        let Some((last, _)) = page.last() else {
            return Ok(rows);
        };
        after = *last;
        for (_, payload) in page {
            let Ok(bytes) = serde_json::to_vec(&payload) else {
                continue;
            };
            let Ok(env) = Envelope::decode(&bytes) else {
                continue;
            };
            quota.apply(&env);
            if env.occurred_at >= horizon {
                state.requests().apply(&env).await;
            }
            rows += 1;
        }
    }
}

async fn follow(state: &AppState, resume_after: &mut Option<u64>) -> Result<(), String> {
    let inner = &state.0;
    let settings = inner.publisher.settings();
    let js = inner.publisher.jetstream();
    let frontier = match *resume_after {
        Some(seq) => seq + 1,
        None => {
            wait_for_spool_backlog(state).await;
            let frontier = ledger_frontier(state).await?;
            let mut rebuilt = tally_events::quota::QuotaState::default();
            let rows = bootstrap(state, frontier, &mut rebuilt).await?;
            *state.quota() = rebuilt;
            *resume_after = Some(frontier - 1);
            state.0.tail_seq.store(frontier - 1, Ordering::Release);
            tracing::info!(rows, frontier, "quota state rebuilt from the ledger");
            frontier
        }
    };
    let stream = js
        .get_stream(&settings.name)
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("{}.>", settings.prefix()),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: frontier,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let pending_at_start = consumer
        .info()
        .await
        .map_err(|e| e.to_string())?
        .num_pending;
    if pending_at_start == 0 {
        inner.tail_ready.store(true, Ordering::Relaxed);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        if let Ok(env) = Envelope::decode(&m.payload) {
            state.quota().apply(&env);
            state.requests().apply(&env).await;
        }
        if let Ok(info) = m.info() {
            *resume_after = Some(info.stream_sequence);
            state
                .0
                .tail_seq
                .store(info.stream_sequence, Ordering::Release);
        }
        if m.info().map(|i| i.pending == 0).unwrap_or(false) {
            inner.tail_ready.store(true, Ordering::Relaxed);
        }
    }
    Err("tail ended".into())
}

/// Events a previous run spooled (`--fail-open`) must reach the stream before the state is
/// rebuilt from it, or admissions would be decided without them.
async fn wait_for_spool_backlog(state: &AppState) {
    let Some(spool) = state.spool() else { return };
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

/// Publish `reservation.expired` for every reservation past its TTL. Every instance does this;
/// the event id is derived from the admission id, so JetStream (duplicate window) and the ledger
/// (primary key) keep exactly one, and the tail closes it on the others.
async fn expire_reservations(state: &AppState) {
    let ttl =
        chrono::Duration::from_std(state.0.config.reservation_ttl).unwrap_or(chrono::Duration::MAX);
    let now = chrono::Utc::now();
    let mut due = state.quota().expired(now, ttl);
    due.truncate(MAX_EXPIRIES_PER_ROUND);
    for (request_id, admission_id, leaf) in due {
        let data = tally_events::EventData::ReservationExpired(tally_events::ReservationEnded {
            admission_id,
        });
        let mut env = Envelope::new(data, now, Some(request_id.clone()), leaf);
        env.id = crate::handlers::derived_id(&format!("expired|{admission_id}"));
        if let Err(e) = state.publish(&env).await {
            tracing::warn!(error = %e, request_id, "reservation expiry not published; retrying");
            return;
        }
        state.quota().apply(&env);
        state.requests().apply(&env).await;
        state.metrics().expiries.fetch_add(1, Ordering::Relaxed);
    }
}

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
/// Backoff before re-creating the tail after an error.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Follow the stream forever (until the task is dropped). Marks the state ready once it has read
/// everything that was in the stream when it started.
pub async fn run(state: AppState) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            r = follow(&state) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "stream tail failed; restarting");
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            _ = sweep.tick() => {
                state.requests().sweep();
                let ttl = chrono::Duration::from_std(state.0.config.reservation_ttl)
                    .unwrap_or(chrono::Duration::MAX);
                state.quota().prune(chrono::Utc::now() - ttl);
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

async fn follow(state: &AppState) -> Result<(), String> {
    let inner = &state.0;
    let settings = inner.publisher.settings();
    let js = inner.publisher.jetstream();
    let frontier = ledger_frontier(state).await?;
    // Built aside and swapped in: admissions keep deciding on the old state meanwhile, and their
    // events (at or past the frontier) reach the new one through the tail.
    let mut rebuilt = tally_events::quota::QuotaState::default();
    let rows = bootstrap(state, frontier, &mut rebuilt).await?;
    *state.quota() = rebuilt;
    tracing::info!(rows, frontier, "quota state rebuilt from the ledger");
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
        if m.info().map(|i| i.pending == 0).unwrap_or(false) {
            inner.tail_ready.store(true, Ordering::Relaxed);
        }
    }
    Err("tail ended".into())
}

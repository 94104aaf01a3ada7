//! The stream tail: folds every request event of the last TTL into the request table, so any
//! instance can settle any request and admissions stay idempotent across restarts.

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
            _ = sweep.tick() => { state.requests().sweep(); }
        }
    }
}

async fn follow(state: &AppState) -> Result<(), String> {
    let inner = &state.0;
    let settings = inner.publisher.settings();
    let js = inner.publisher.jetstream();
    let ttl =
        chrono::Duration::from_std(inner.config.reservation_ttl).map_err(|e| e.to_string())?;
    let since = chrono::Utc::now() - ttl * 2;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(
        since.timestamp_nanos_opt().unwrap_or(0).into(),
    )
    .map_err(|e| e.to_string())?;
    let stream = js
        .get_stream(&settings.name)
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("{}.usage.>", settings.prefix()),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
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
            state.requests().apply(&env).await;
        }
        if m.info().map(|i| i.pending == 0).unwrap_or(false) {
            inner.tail_ready.store(true, Ordering::Relaxed);
        }
    }
    Err("tail ended".into())
}

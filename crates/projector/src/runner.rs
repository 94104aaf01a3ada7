//! The projection runner: tail the ledger, fold, write rows and checkpoint in one transaction.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tally_events::Envelope;

use crate::Error;

/// Ledger rows folded per transaction: big enough to amortize the commit, small enough that a
/// rebuild shows progress and holds no long transaction.
pub const MAX_BATCH: i64 = 2000;
/// How often an idle projector looks for new rows even without a notification (a lost NOTIFY,
/// e.g. across a Postgres restart, delays a projection by at most this much).
pub const IDLE_POLL: Duration = Duration::from_millis(200);
/// Backoff while Postgres fails.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Boxed future returned by [`Projection::apply`].
pub type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// A projection: its name (also its checkpoint's key) and how a batch of events is applied.
pub trait Projection: Send + Sync + 'static {
    /// Unique name, e.g. `usage`.
    fn name(&self) -> &'static str;
    /// Fold `events` (in ledger order) and write the result inside the caller's transaction.
    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a [Envelope]) -> ApplyFuture<'a>;
    /// Called before [`Projection::apply`] with the checkpoint the batch starts after, in the
    /// same transaction: a projection that keeps state in memory rebuilds it here when it does
    /// not reflect exactly `from`.
    fn prepare<'a>(&'a self, _tx: &'a mut PgConnection, _from: i64) -> ApplyFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    /// Called once the batch ending at `to` is committed.
    fn committed(&self, _to: i64) {}
}

/// Counters for `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct ProjectorStats {
    /// Checkpoint (`ledger.pos`).
    pub checkpoint: AtomicI64,
    /// Events folded.
    pub events: AtomicU64,
}

/// Runs one projection.
pub struct Projector {
    pool: PgPool,
    projection: Arc<dyn Projection>,
    stats: Arc<ProjectorStats>,
}

impl Projector {
    /// A runner for `projection`.
    pub fn new(pool: PgPool, projection: Arc<dyn Projection>) -> Self {
        Projector {
            pool,
            projection,
            stats: Arc::default(),
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<ProjectorStats> {
        self.stats.clone()
    }

    /// Follow the ledger until `shutdown` resolves.
    #[tracing::instrument(skip_all, fields(projection = self.projection.name()))]
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut listener = None;
        loop {
            match self.catch_up().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "projection batch failed; retrying");
                    listener = None;
                    tokio::select! { _ = &mut shutdown => return Ok(()), _ = tokio::time::sleep(RETRY_BACKOFF) => {} }
                    continue;
                }
            }
            if listener.is_none() {
                listener = self.listen().await;
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = wait_for_notify(&mut listener) => {}
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(tally_ledger::writer::LEDGER_NOTIFY_CHANNEL)
            .await
            .ok()?;
        Some(l)
    }

    /// Fold every ledger row after the checkpoint, one batch per transaction. Returns how many
    /// rows the last batch had (0 when caught up).
    pub async fn catch_up(&self) -> Result<usize, Error> {
        let name = self.projection.name();
        let mut tx = self.pool.begin().await?;
        // Lock the checkpoint row: two runners of one projection must not fold the same rows.
        sqlx::query("INSERT INTO projection_checkpoints (projection, last_pos) VALUES ($1, 0) ON CONFLICT DO NOTHING")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let from: i64 = sqlx::query_scalar(
            "SELECT last_pos FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        let rows: Vec<(i64, serde_json::Value)> =
            sqlx::query_as("SELECT pos, payload FROM ledger WHERE pos > $1 ORDER BY pos LIMIT $2")
                .bind(from)
                .bind(MAX_BATCH)
                .fetch_all(&mut *tx)
                .await?;
        let Some(&(to, _)) = rows.last() else {
            return Ok(0);
        };
        assert!(to > from, "projection checkpoint must only move forward");
        let events = decode_rows(&rows)?;
        self.projection.prepare(&mut tx, from).await?;
        self.projection.apply(&mut tx, &events).await?;
        sqlx::query("UPDATE projection_checkpoints SET last_pos = $2, updated_at = clock_timestamp() WHERE projection = $1")
            .bind(name)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.projection.committed(to);
        self.stats.checkpoint.store(to, Ordering::Relaxed);
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(rows.len())
    }
}

pub(crate) fn decode_rows(rows: &[(i64, serde_json::Value)]) -> Result<Vec<Envelope>, Error> {
    rows.iter()
        .map(|(pos, payload)| {
            let bytes = serde_json::to_vec(payload).expect("json re-encodes");
            Envelope::decode(&bytes).map_err(|source| Error::Undecodable { pos: *pos, source })
        })
        .collect()
}

async fn wait_for_notify(listener: &mut Option<PgListener>) {
    match listener {
        Some(l) => {
            if let Ok(Err(_)) = tokio::time::timeout(IDLE_POLL, l.recv()).await {
                *listener = None; // reconnect on the next round
            }
        }
        None => tokio::time::sleep(IDLE_POLL).await,
    }
}

/// How far a projection trails the ledger, in rows.
pub async fn lag_rows(pool: &PgPool, projection: &str) -> Result<i64, Error> {
    let lag: Option<i64> = sqlx::query_scalar(
        "SELECT COALESCE((SELECT max(pos) FROM ledger), 0) - \
         COALESCE((SELECT last_pos FROM projection_checkpoints WHERE projection = $1), 0)",
    )
    .bind(projection)
    .fetch_one(pool)
    .await?;
    Ok(lag.unwrap_or(0).max(0))
}

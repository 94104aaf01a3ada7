//! The `quota` projection: configuration tables (subjects, model groups, policies, grants, credit
//! balances) and per-window totals and exhaustion states of every pool a request touched, folded
//! by the same [`QuotaState`] the API decides with, so the tables and the live decisions agree.
//!
//! It folds in stream order (ADR 0005) and is also the snapshot writer: every
//! [`QuotaSettings::snapshot_every_events`] events or [`QuotaSettings::snapshot_interval`],
//! whichever first, it writes its state, tagged with the stream sequence it covers, to the
//! snapshot store. When it starts (or after a failed batch) it loads the newest snapshot at or
//! below its checkpoint and folds only the rows after it: no re-fold of history in one
//! transaction, ever.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::{PgConnection, PgPool};
use tally_events::Envelope;
use tally_events::quota::QuotaState;

use crate::Error;
use crate::claims::{Claim, ClaimsFuture, DayRange};
use crate::quota_rows::{Rows, Touched, WindowRows};
use crate::runner::{ApplyFuture, Order, Projection};
use crate::tables::Tables;

/// Subjects compacted after each batch: bounds the time the state is locked for it.
pub const COMPACT_SUBJECTS_PER_BATCH: usize = 2_000;
/// Shards of the request map pruned after each batch (of [`tally_events::quota::SHARDS`]): a whole
/// pass every 16 batches, each a 16th of the requests of the idempotency window (millions at
/// production rates) instead of all of them after every batch.
pub const PRUNE_SHARDS_PER_BATCH: usize = 4;
/// Least time between two snapshots written because traffic went quiet: a snapshot of a large
/// state costs a moment of CPU and a few MB written, so bursts with short pauses between them
/// wait for the regular schedule (a restart then folds at most what arrived since the last
/// quiet snapshot, a few seconds of traffic).
pub const QUIET_SNAPSHOT_MIN_GAP: Duration = Duration::from_secs(10);

/// What the quota projection needs to know beyond the ledger.
#[derive(Clone, Debug)]
pub struct QuotaSettings {
    /// The stream whose snapshots it writes and reads.
    pub stream: String,
    /// Write a snapshot after this many events (0: never).
    pub snapshot_every_events: u64,
    /// … or after this long, whichever first (if any event was folded since).
    pub snapshot_interval: Duration,
    /// How far back admissions may name `at` (compaction keeps what windows there need).
    pub max_backfill: Duration,
    /// Reservation TTL (requests closed longer ago than twice this are forgotten).
    pub reservation_ttl: Duration,
}

impl QuotaSettings {
    /// Defaults for `stream`.
    pub fn for_stream(stream: &str) -> Self {
        QuotaSettings {
            stream: stream.to_owned(),
            snapshot_every_events: 100_000,
            snapshot_interval: Duration::from_secs(300),
            max_backfill: Duration::from_secs(35 * 86_400),
            reservation_ttl: Duration::from_secs(15 * 60),
        }
    }
}

struct Folded {
    /// The stream sequence the state reflects (None while a batch is in flight or after a failed
    /// one: the next batch reloads).
    at: Option<i64>,
    q: QuotaState,
    since_snapshot: u64,
    last_snapshot: Instant,
    /// When a snapshot was last written because traffic went quiet.
    last_quiet_snapshot: Option<Instant>,
}

/// The quota projection (name `quota`).
pub struct QuotaProjection {
    pool: PgPool,
    settings: QuotaSettings,
    /// Live: starts from snapshots and writes them. A rebuild folds from the first row and
    /// writes none.
    snapshots: bool,
    state: Mutex<Folded>,
}

impl QuotaProjection {
    /// The live projection over `pool` with `settings`.
    pub fn new(pool: PgPool, settings: QuotaSettings) -> Self {
        Self::with_snapshots(pool, settings, true)
    }

    /// A projection that folds from the first ledger row and never reads or writes snapshots
    /// (a rebuild: its tables must be a recomputation from the ledger alone).
    pub fn rebuilding(pool: PgPool, settings: QuotaSettings) -> Self {
        Self::with_snapshots(pool, settings, false)
    }

    /// [`QuotaProjection::new`] or, when `rebuilding`, [`QuotaProjection::rebuilding`].
    pub fn with(pool: PgPool, settings: QuotaSettings, rebuilding: bool) -> Self {
        Self::with_snapshots(pool, settings, !rebuilding)
    }

    fn with_snapshots(pool: PgPool, settings: QuotaSettings, snapshots: bool) -> Self {
        QuotaProjection {
            pool,
            settings,
            snapshots,
            state: Mutex::new(Folded {
                at: None,
                q: QuotaState::default(),
                since_snapshot: 0,
                last_snapshot: Instant::now(),
                last_quiet_snapshot: None,
            }),
        }
    }

    /// How long a request id names one request: twice the reservation TTL.
    fn idempotency(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.reservation_ttl * 2)
            .unwrap_or(chrono::Duration::MAX)
    }

    fn folded(&self) -> std::sync::MutexGuard<'_, Folded> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state as of stream sequence `upto`: the newest usable snapshot at or below it, then
    /// the ledger rows after it, read in pages (no long transaction).
    async fn load(&self, upto: i64) -> Result<(QuotaState, u64), Error> {
        let upto = u64::try_from(upto).unwrap_or(0);
        let loaded = if self.snapshots {
            tally_ledger::snapshots::load_newest(&self.pool, &self.settings.stream, upto).await?
        } else {
            tally_ledger::snapshots::Loaded {
                snapshot: None,
                skipped: Vec::new(),
            }
        };
        let (mut q, from) = match loaded.snapshot {
            Some((s, q)) => (q, s.stream_seq.max(0) as u64),
            None => (QuotaState::default(), 0),
        };
        q.set_idempotency(self.idempotency());
        let p = tally_ledger::reader::fold_by_seq(
            &self.pool,
            from,
            upto.saturating_add(1),
            |page, _| {
                for (_, env) in page {
                    q.apply(env);
                }
                q.prune();
            },
        )
        .await?;
        tracing::info!(
            snapshot_seq = from,
            rows = p.rows,
            rows_per_s = p.rows_per_s as u64,
            upto,
            "quota projection state loaded"
        );
        Ok((q, upto.saturating_sub(from)))
    }

    /// Write a snapshot when one is due (or, `quiet`, when traffic stopped with events not in
    /// any snapshot); compact a slice of the state either way.
    async fn maintain(&self, quiet: bool) -> Result<(), Error> {
        let due = {
            let mut f = self.folded();
            let s = &self.settings;
            let now = Utc::now();
            let backfill =
                chrono::Duration::from_std(s.max_backfill).unwrap_or(chrono::Duration::MAX);
            // Compaction follows the fold's stream clock (the newest server time folded), not
            // the wall clock: the rows this projection writes are the windows of the events it
            // folds, so a rebuild over last year's events must keep what those windows needed
            // then. Following live, the clock is the wall clock within the tail's lag.
            let at = f.q.clock().map_or(now, |c| c.min(now));
            f.q.compact_as_of(at, backfill, COMPACT_SUBJECTS_PER_BATCH);
            f.q.prune_next_shards(PRUNE_SHARDS_PER_BATCH);
            let quiet_due = quiet
                && f.last_quiet_snapshot
                    .is_none_or(|t| t.elapsed() >= QUIET_SNAPSHOT_MIN_GAP);
            let due = self.snapshots
                && s.snapshot_every_events > 0
                && f.since_snapshot > 0
                && (f.since_snapshot >= s.snapshot_every_events
                    || f.last_snapshot.elapsed() >= s.snapshot_interval
                    || quiet_due);
            match (due, f.at) {
                (true, Some(at)) => {
                    let seq = at.max(0) as u64;
                    f.since_snapshot = 0;
                    f.last_snapshot = Instant::now();
                    if quiet_due {
                        f.last_quiet_snapshot = Some(f.last_snapshot);
                    }
                    Some((seq, off_the_runtime(|| f.q.encode_snapshot(seq, now))))
                }
                _ => None,
            }
        };
        if let Some((seq, bytes)) = due {
            let meta = QuotaState::snapshot_meta(&bytes).map_err(|e| Error::InvalidQuery {
                field: "snapshot",
                message: e.to_string(),
            })?;
            let started = Instant::now();
            let id = tally_ledger::snapshots::write(
                &self.pool,
                &self.settings.stream,
                seq,
                meta.format,
                meta.checksum,
                meta.taken_at,
                &bytes,
            )
            .await?;
            tracing::info!(
                snapshot = id,
                stream_seq = seq,
                size = bytes.len(),
                write_ms = started.elapsed().as_millis() as u64,
                "quota snapshot written"
            );
        }
        Ok(())
    }
}

impl Projection for QuotaProjection {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn order(&self) -> Order {
        Order::StreamSeq
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "cfg_subjects",
            "cfg_model_groups",
            "cfg_policies",
            "cfg_grants",
            "credit_balances",
            "quota_windows",
        ]
    }

    fn schema(&self) -> &'static str {
        include_str!("quota.sql")
    }

    fn volatile_columns(&self) -> &'static [&'static str] {
        &["updated_at"]
    }

    fn prepare<'a>(&'a self, from: i64) -> ApplyFuture<'a> {
        Box::pin(async move {
            if self.folded().at == Some(from) {
                return Ok(());
            }
            let (mut loaded, unsnapshotted) = self.load(from).await?;
            loaded.set_idempotency(self.idempotency());
            let mut f = self.folded();
            f.q = loaded;
            f.at = Some(from);
            // Events folded since the newest snapshot count towards the next one (after a
            // rebuild built the tables there may be no snapshot at all yet).
            f.since_snapshot = unsnapshotted;
            Ok(())
        })
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        events: &'a [Envelope],
    ) -> ApplyFuture<'a> {
        Box::pin(async move {
            let mut touched = Touched::default();
            let rows = {
                let mut guard = self.folded();
                guard.at = None;
                guard.since_snapshot += events.len() as u64;
                let q = &mut guard.q;
                let mut windows = WindowRows::default();
                for env in events {
                    q.apply(env);
                    let before = touched.requests.len();
                    touched.note(env);
                    for r in &touched.requests[before..] {
                        windows.add(q, r);
                    }
                }
                Rows::of(q, &touched, windows)
            };
            rows.write(tx, tables).await
        })
    }

    fn claims<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        _range: DayRange,
    ) -> ClaimsFuture<'a> {
        Box::pin(async move {
            // Calendar and periodic windows (keyed by their start) and lifetime windows (no
            // bounds); rolling rows show the window of their last update, which moves.
            let table = tables.name("quota_windows");
            let rows: Vec<(String, String, Option<chrono::DateTime<Utc>>, i64)> =
                sqlx::query_as(&format!(
                    "SELECT policy_id, subject, window_start, used FROM {table} \
                     WHERE window_key > '-infinity' OR window_start IS NULL"
                ))
                .fetch_all(&mut *tx)
                .await?;
            let rows: BTreeMap<_, _> = rows
                .into_iter()
                .map(|(p, s, w, u)| ((p, s, w), u))
                .collect();
            Ok(vec![Claim::PoolUsed { table, rows }])
        })
    }

    fn committed(&self, to: i64) {
        self.folded().at = Some(to);
    }

    fn after_commit<'a>(&'a self) -> ApplyFuture<'a> {
        Box::pin(self.maintain(false))
    }

    fn on_quiet<'a>(&'a self) -> ApplyFuture<'a> {
        Box::pin(self.maintain(true))
    }
}

/// Run `work` (CPU for milliseconds or more: a snapshot of millions of requests) so that the
/// other tasks of this worker thread move to another one meanwhile (`block_in_place`), instead of
/// waiting behind it — in `tally up` those are the API's admissions. On a current-thread runtime
/// (tests, tools) there is nowhere to move them, so it simply runs.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

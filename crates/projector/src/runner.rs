//! The projection runner: tail the ledger, fold, write rows and checkpoint in one transaction.
//!
//! A runner works on one projection's live tables, or on its rebuild tables (`tally replay`, a
//! new or changed projection): the [`Tables`] it is given decide which, and which checkpoint row
//! it keeps. Before following, a live runner makes sure the live tables exist at the projection's
//! version; if not, it builds them from the first ledger row (`rebuild.rs`) and swaps them in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tally_events::Envelope;
use tally_ledger::reader::RawPage;

use crate::Error;
use crate::claims::{ClaimsFuture, DayRange};
use crate::tables::Tables;

/// Ledger rows folded per transaction: big enough to amortize the commit, small enough that a
/// rebuild shows progress and holds no long transaction.
pub const MAX_BATCH: i64 = 2000;
/// Ledger rows folded per transaction of a rebuild: nobody reads its tables until the swap, so
/// the batch is sized for throughput (fewer round trips and commits, pools written once per
/// batch); a page of decoded events stays some tens of MiB.
pub const REBUILD_BATCH: i64 = 10_000;
/// Pages a rebuild reads ahead of its fold: one ready while one is folded, so reading (Postgres,
/// decoding) overlaps folding and writing without holding more than two pages of events.
pub const READ_AHEAD_PAGES: usize = 2;
/// How often an idle projector looks for new rows even without a notification (a lost NOTIFY,
/// e.g. across a Postgres restart, delays a projection by at most this much).
pub const IDLE_POLL: Duration = Duration::from_millis(200);
/// Backoff while Postgres fails.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// A live runner that has folded rows and then seen none for this long calls
/// [`Projection::on_quiet`] once: long enough that a steady trickle of traffic does not count
/// as quiet, short enough that the end of a burst is noticed within seconds.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);

/// Boxed future returned by [`Projection::apply`].
pub type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// The order a projection folds the ledger in, and what its checkpoint counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Commit order (`ledger.pos`): for folds whose result does not depend on order (sums).
    Pos,
    /// Stream order (`ledger.stream_seq`), up to the writer's contiguous watermark: for folds
    /// that must see events as the stream recorded them (configuration before admissions).
    StreamSeq,
}

/// A projection: one unit of code (SPEC v2 §8) — its name, its tables and their DDL, a pure fold
/// of ledger events into rows, and the totals it claims for the audit. [`crate::registry`] is the
/// only list of them.
pub trait Projection: Send + Sync + 'static {
    /// Unique name, e.g. `usage` (also its checkpoint's key).
    fn name(&self) -> &'static str;
    /// Change it when the tables or the fold change (or a setting the rows depend on, such as a
    /// time zone): a live runner finding its tables at another version rebuilds them from the
    /// first ledger row and swaps them in.
    fn version(&self) -> String {
        "1".to_owned()
    }
    /// The order it folds in; its checkpoint is a `pos` or a `stream_seq` accordingly.
    fn order(&self) -> Order {
        Order::Pos
    }
    /// The tables it owns (unqualified names).
    fn tables(&self) -> &'static [&'static str];
    /// DDL creating them, each name written `{schema}.<table>`.
    fn schema(&self) -> &'static str;
    /// The event types its fold looks at (None: all). A [`Order::Pos`] runner reads only their
    /// payloads; its checkpoint still moves past the other rows.
    fn event_types(&self) -> Option<&'static [&'static str]> {
        None
    }
    /// Columns that record when a row was written rather than a fact (left out of comparisons).
    fn volatile_columns(&self) -> &'static [&'static str] {
        &[]
    }
    /// Fold `events` (in its order) and write the result to `tables` inside the transaction.
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        events: &'a [Envelope],
    ) -> ApplyFuture<'a>;
    /// Called before [`Projection::apply`] with the checkpoint the batch starts after: a
    /// projection that keeps state in memory makes sure it reflects exactly `from`.
    fn prepare<'a>(&'a self, _from: i64) -> ApplyFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    /// Called once the batch ending at `to` is committed.
    fn committed(&self, _to: i64) {}
    /// Called after [`Projection::committed`], outside any transaction: periodic work such as
    /// writing a snapshot.
    fn after_commit<'a>(&'a self) -> ApplyFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    /// Called once in a rebuild's last transaction, after its last batch and before the swap
    /// or the comparison: work a rebuild does once over all its rows rather than per batch (the
    /// usage projection derives its hour and day tables from its minutes in one statement each).
    fn finish_rebuild<'a>(&'a self, _tx: &'a mut PgConnection, _tables: Tables) -> ApplyFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    /// Called once when the ledger has been quiet for [`QUIET_AFTER`] after rows were folded,
    /// outside any transaction: work best done between bursts (the quota projection writes a
    /// snapshot, so an instance started after a burst folds nothing after it).
    fn on_quiet<'a>(&'a self) -> ApplyFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    /// The totals its `tables` show, read in the caller's transaction, for the audit.
    fn claims<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        tables: Tables,
        range: DayRange,
    ) -> ClaimsFuture<'a>;
}

/// Counters for `/metrics` and `/readyz`.
#[derive(Debug)]
pub struct ProjectorStats {
    /// Checkpoint (`ledger.pos`, or `stream_seq` for stream-ordered projections).
    pub checkpoint: AtomicI64,
    /// Ledger rows moved past (folded, or of types the projection ignores).
    pub events: AtomicU64,
    /// Time of one committed batch (read, fold, write, commit), labelled with the projection.
    pub batch_seconds: prometheus::Histogram,
}

impl ProjectorStats {
    /// Counters of the projection `name`.
    pub fn new(name: &str) -> Self {
        ProjectorStats {
            checkpoint: AtomicI64::new(0),
            events: AtomicU64::new(0),
            batch_seconds: tally_ledger::metrics::seconds_histogram(
                "tally_projection_batch_seconds",
                "Projection batch: read, fold, write and commit, in seconds.",
                &[("projection", name)],
            ),
        }
    }
}

/// Makes the instance that builds a projection's tables from the first ledger row.
pub type Fresh = Arc<dyn Fn() -> Arc<dyn Projection> + Send + Sync>;

/// Runs one projection on one set of tables.
pub struct Projector {
    pool: PgPool,
    projection: Arc<dyn Projection>,
    tables: Tables,
    stats: Arc<ProjectorStats>,
    /// Rows per batch: [`MAX_BATCH`] live, [`REBUILD_BATCH`] for rebuild tables.
    batch: i64,
}

impl Projector {
    /// A runner for `projection`'s live tables.
    pub fn new(pool: PgPool, projection: Arc<dyn Projection>) -> Self {
        Self::on(pool, projection, Tables::LIVE)
    }

    /// A runner for `projection` writing `tables`.
    pub fn on(pool: PgPool, projection: Arc<dyn Projection>, tables: Tables) -> Self {
        let stats = Arc::new(ProjectorStats::new(projection.name()));
        Projector {
            pool,
            projection,
            tables,
            stats,
            batch: if tables == Tables::LIVE {
                MAX_BATCH
            } else {
                REBUILD_BATCH
            },
        }
    }

    /// The same runner, its batches observed in `batch_seconds` (another runner's histogram).
    pub fn observed_in(self, batch_seconds: prometheus::Histogram) -> Self {
        let stats = Arc::new(ProjectorStats {
            checkpoint: AtomicI64::new(0),
            events: AtomicU64::new(0),
            batch_seconds,
        });
        Projector { stats, ..self }
    }

    /// The order its projection folds in.
    pub fn order(&self) -> Order {
        self.projection.order()
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<ProjectorStats> {
        self.stats.clone()
    }

    /// Follow the ledger until `shutdown` resolves. A live runner first builds its tables if
    /// they are missing or of another version (`fresh` gives the instance that builds them).
    #[tracing::instrument(skip_all, fields(projection = self.projection.name()))]
    pub async fn run(self, fresh: Fresh, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        loop {
            let ready = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = crate::rebuild::ensure_live(&self.pool, &fresh, &self.stats.batch_seconds) => r,
            };
            match ready {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "building the projection's tables failed; retrying");
                    tokio::select! { _ = &mut shutdown => return Ok(()), _ = tokio::time::sleep(RETRY_BACKOFF * 4) => {} }
                }
            }
        }
        if let Err(e) = self.warm_up().await {
            // Not fatal: the first batch loads what it needs itself.
            tracing::warn!(error = %e, "loading the projection's state at start failed");
        }
        let mut listener = None;
        // Since when nothing new arrived, while rows folded before it still await `on_quiet`.
        let mut quiet_since: Option<std::time::Instant> = None;
        loop {
            match self.catch_up(None).await {
                Ok(n) if n > 0 => {
                    quiet_since = Some(std::time::Instant::now());
                    continue;
                }
                Ok(_) => {
                    if quiet_since.is_some_and(|t| t.elapsed() >= QUIET_AFTER) {
                        quiet_since = None;
                        if let Err(e) = self.projection.on_quiet().await {
                            tracing::warn!(error = %e, "the projection's work between bursts failed");
                        }
                    }
                }
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

    /// Load the projection's state at its checkpoint and do its upkeep once (the quota
    /// projection writes a snapshot when the rows folded since the newest one call for it,
    /// e.g. right after its tables were built), before any new row arrives.
    async fn warm_up(&self) -> Result<(), Error> {
        let key = self.tables.checkpoint_key(self.projection.name());
        let from: Option<i64> =
            sqlx::query_scalar("SELECT last_pos FROM projection_checkpoints WHERE projection = $1")
                .bind(&key)
                .fetch_optional(&self.pool)
                .await?;
        if let Some(from) = from {
            self.projection.prepare(from).await?;
            self.projection.committed(from);
            self.projection.after_commit().await?;
        }
        Ok(())
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(tally_ledger::writer::LEDGER_NOTIFY_CHANNEL)
            .await
            .ok()?;
        Some(l)
    }

    /// Fold the next batch after the checkpoint (not past `upto`) in one transaction. Returns
    /// how many rows the batch read (0 when caught up).
    pub async fn catch_up(&self, upto: Option<i64>) -> Result<usize, Error> {
        self.catch_up_with(upto, None).await
    }

    /// [`Projector::catch_up`] with the batch already read (`page`, from [`Projector::read_ahead`]).
    pub async fn fold_page(&self, page: Page) -> Result<usize, Error> {
        self.catch_up_with(None, Some(page)).await
    }

    async fn catch_up_with(&self, upto: Option<i64>, page: Option<Page>) -> Result<usize, Error> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        if self.tables != Tables::LIVE {
            // A rebuild's batches need not wait for the WAL flush: each commits its rows with
            // its checkpoint, so a crash loses the last few batches together (the rebuild goes
            // on from the checkpoint that survived). The swap itself commits synchronously.
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await?;
        }
        let Some((to, n)) = self.step_with(&mut tx, upto, page).await? else {
            return Ok(0);
        };
        tx.commit().await?;
        self.stats
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.projection.committed(to);
        self.stats.checkpoint.store(to, Ordering::Relaxed);
        self.stats.events.fetch_add(n as u64, Ordering::Relaxed);
        self.projection.after_commit().await?;
        Ok(n.max(1))
    }

    /// One batch inside the caller's transaction: lock the checkpoint, read the rows after it
    /// (not past `upto`), fold and write them, move the checkpoint. Returns the new checkpoint
    /// and the ledger rows it moved past (folded or of types the projection ignores), or None
    /// when there was nothing to read.
    pub async fn step(
        &self,
        tx: &mut PgConnection,
        upto: Option<i64>,
    ) -> Result<Option<(i64, usize)>, Error> {
        self.step_with(tx, upto, None).await
    }

    async fn step_with(
        &self,
        tx: &mut PgConnection,
        upto: Option<i64>,
        page: Option<Page>,
    ) -> Result<Option<(i64, usize)>, Error> {
        let key = self.tables.checkpoint_key(self.projection.name());
        let from = lock_checkpoint(tx, &key).await?;
        let page = match page {
            Some(p) if p.from != from => {
                return Err(Error::Busy(format!(
                    "the checkpoint of `{key}` moved to {from} while the page after {} was read",
                    p.from
                )));
            }
            Some(p) => p,
            None => {
                let limit = upto.map_or(self.batch, |u| (u - from).clamp(0, self.batch));
                if limit == 0 {
                    return Ok(None);
                }
                let order = self.projection.order();
                read_page(tx, order, from, limit, self.projection.event_types()).await?
            }
        };
        let Some(to) = page.last else {
            return Ok(None);
        };
        self.projection.prepare(from).await?;
        self.projection.apply(tx, self.tables, &page.events).await?;
        sqlx::query(
            "UPDATE projection_checkpoints SET last_pos = $2, updated_at = clock_timestamp() WHERE projection = $1",
        )
        .bind(&key)
        .bind(to)
        .execute(&mut *tx)
        .await?;
        Ok(Some((to, page.spanned)))
    }

    /// Pages after `from`, read on a connection of their own at most [`READ_AHEAD_PAGES`] ahead
    /// of the fold, until one comes back empty (the head at that moment) or the receiver is
    /// dropped. Three stages run side by side: Postgres reads a page, a blocking thread decodes
    /// the one before, the rebuild folds and writes the one before that (read and decode in one
    /// task left the fold waiting on each page's query: a third of a quota replay, measured).
    pub fn read_ahead(&self, from: i64) -> tokio::sync::mpsc::Receiver<Result<Page, Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES);
        // One raw page waits while the one before is decoded: the read never runs further ahead.
        let (raw_tx, raw_rx) = tokio::sync::mpsc::channel(1);
        let (pool, limit) = (self.pool.clone(), self.batch);
        let (order, types) = (self.projection.order(), self.projection.event_types());
        tokio::spawn(async move {
            let read = async {
                let mut conn = pool.acquire().await?;
                let mut from = from;
                loop {
                    let raw = read_raw_after(&mut conn, order, from, limit, types).await?;
                    let Some(to) = raw.last else {
                        return Ok::<(), Error>(());
                    };
                    if raw_tx.send(Ok((from, raw))).await.is_err() {
                        return Ok(());
                    }
                    from = to;
                }
            };
            if let Err(e) = read.await {
                let _ = raw_tx.send(Err(e)).await;
            }
        });
        // The reader sends no empty page: the stage ends when it does (the rebuild then catches
        // up to the head from its checkpoint, so no page is taken as the last).
        tokio::spawn(tally_ledger::reader::decode_ahead(
            raw_rx,
            tx,
            |(from, raw)| Page::decoded(from, raw),
            Error::ReadAhead,
            |_| false,
        ));
        rx
    }
}

/// A batch of ledger rows after a checkpoint, decoded.
pub struct Page {
    /// The checkpoint it starts after.
    from: i64,
    /// The events of the projection's types, in its order.
    events: Vec<Envelope>,
    /// The position (or stream sequence) of the last row read; None when there was none.
    last: Option<i64>,
    /// Ledger rows moved past, including those of other types.
    spanned: usize,
}

impl Page {
    /// `raw`, read after checkpoint `from`, with its events decoded.
    fn decoded(from: i64, raw: RawPage) -> Page {
        let (last, spanned) = (raw.last, raw.spanned);
        Page {
            from,
            events: raw.decode().into_iter().map(|(_, e)| e).collect(),
            last,
            spanned,
        }
    }
}

async fn read_page(
    conn: &mut PgConnection,
    order: Order,
    from: i64,
    limit: i64,
    types: Option<&[&str]>,
) -> Result<Page, Error> {
    let raw = read_raw_after(conn, order, from, limit, types).await?;
    Ok(Page::decoded(from, raw))
}

/// Lock (creating it at 0) the checkpoint row `key`: two runners of one projection must not fold
/// the same rows. Returns its position.
pub async fn lock_checkpoint(tx: &mut PgConnection, key: &str) -> Result<i64, Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, last_pos) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(key)
    .execute(&mut *tx)
    .await?;
    Ok(sqlx::query_scalar(
        "SELECT last_pos FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(key)
    .fetch_one(&mut *tx)
    .await?)
}

/// Up to `limit` rows after `from` in `order`, not decoded yet: `pos` order (only events of
/// `types`), or stream order up to the writer's contiguous watermark (every type: stream-ordered
/// folds need all).
async fn read_raw_after(
    tx: &mut PgConnection,
    order: Order,
    from: i64,
    limit: i64,
    types: Option<&[&str]>,
) -> Result<RawPage, Error> {
    Ok(match order {
        Order::Pos => tally_ledger::reader::raw_page_after_pos_of(tx, from, limit, types).await?,
        Order::StreamSeq => {
            let upto = tally_ledger::reader::contiguous_seq(&mut *tx).await?;
            let from = u64::try_from(from).unwrap_or(0);
            tally_ledger::reader::raw_page_by_seq(&mut *tx, from, upto.saturating_add(1), limit)
                .await?
        }
    })
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

/// The head a projection of `order` catches up to: the last `pos`, or the writer's watermark.
pub async fn head(conn: &mut PgConnection, order: Order) -> Result<i64, Error> {
    Ok(match order {
        Order::Pos => sqlx::query_scalar::<_, Option<i64>>("SELECT max(pos) FROM ledger")
            .fetch_one(&mut *conn)
            .await?
            .unwrap_or(0),
        Order::StreamSeq => {
            i64::try_from(tally_ledger::reader::contiguous_seq(&mut *conn).await?).unwrap_or(0)
        }
    })
}

/// How far a projection trails the ledger: `pos` rows, or stream sequences up to the writer's
/// watermark for stream-ordered projections. None while its live tables are being built.
pub async fn lag_rows(pool: &PgPool, projection: &str, order: Order) -> Result<Option<i64>, Error> {
    Ok(lag(pool, projection, order).await?.map(|l| l.rows))
}

/// How far a projection trails the ledger: rows, and the age of the oldest row it has not
/// folded yet (0 when caught up). None while its live tables are being built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// The projection's checkpoint.
    pub checkpoint: i64,
    /// Rows (or stream sequences) behind.
    pub rows: i64,
    /// Seconds since the oldest unfolded row was recorded.
    pub seconds: f64,
}

/// [`lag_rows`] with the age of the oldest row not yet folded.
pub async fn lag(pool: &PgPool, projection: &str, order: Order) -> Result<Option<Lag>, Error> {
    let mut conn = pool.acquire().await?;
    let cp: Option<i64> =
        sqlx::query_scalar("SELECT last_pos FROM projection_checkpoints WHERE projection = $1")
            .bind(projection)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(cp) = cp else { return Ok(None) };
    let head = head(&mut conn, order).await?;
    let rows = (head - cp).max(0);
    if rows == 0 {
        return Ok(Some(Lag {
            checkpoint: cp,
            rows,
            seconds: 0.0,
        }));
    }
    let column = match order {
        Order::Pos => "pos",
        Order::StreamSeq => "stream_seq",
    };
    let seconds: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT extract(epoch FROM clock_timestamp() - recorded_at)::float8 FROM ledger \
         WHERE {column} > $1 ORDER BY {column} LIMIT 1"
    ))
    .bind(cp)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(Some(Lag {
        checkpoint: cp,
        rows,
        seconds: seconds.unwrap_or(0.0).max(0.0),
    }))
}

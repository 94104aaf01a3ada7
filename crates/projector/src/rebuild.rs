//! Building a projection from the first ledger row while its live tables keep serving (SPEC v2
//! §8, esrs `PgRebuilder`): the tables are created in the rebuild schema and folded up to the
//! head; then, in one transaction holding the live checkpoint's lock (so the live runner is
//! paused, never racing), the last rows are folded and either the schemas are swapped together
//! with the checkpoint (`Goal::Swap`) or the two sets of tables are compared row by row
//! (`Goal::Verify`). Used by `tally replay`, by a runner whose tables are missing (a projection
//! attached to a running deployment) or of another version.

use std::sync::Arc;
use std::time::Instant;

use sqlx::{PgConnection, PgPool};

use crate::Error;
use crate::runner::{Projection, Projector, ProjectorStats, head, lock_checkpoint};
use crate::tables::{LIVE_SCHEMA, REBUILD_SCHEMA, RETIRED_SCHEMA, Tables};

/// Most differing rows a verification keeps (all are counted).
pub const MAX_DIFFERENCES: usize = 10_000;

/// What a rebuild is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Replace the live tables with the rebuilt ones.
    Swap,
    /// Compare the rebuilt tables with the live ones and change nothing.
    Verify,
}

/// Progress of a rebuild, for a progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    /// Rows folded so far.
    pub rows: u64,
    /// Checkpoint reached.
    pub at: i64,
    /// The head it is catching up to.
    pub head: i64,
    /// Rows per second so far.
    pub rows_per_s: f64,
}

/// A row that differs between the live and the rebuilt table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Difference {
    /// Table.
    pub table: String,
    /// Its primary key's values.
    pub key: serde_json::Value,
    /// The live row (None: only in the rebuild).
    pub live: Option<serde_json::Value>,
    /// The rebuilt row (None: only live).
    pub rebuilt: Option<serde_json::Value>,
}

/// How a rebuild ended.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    /// Rows folded.
    pub rows: u64,
    /// Rate.
    pub rows_per_s: f64,
    /// The checkpoint the tables reflect.
    pub checkpoint: i64,
    /// Differences found (Verify), at most [`MAX_DIFFERENCES`].
    pub differences: Vec<Difference>,
    /// All differences (Verify).
    pub difference_count: u64,
}

/// Advisory lock key of "a rebuild of `name` is running" (FNV-1a of the name): one at a time.
fn lock_key(name: &str) -> i64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h as i64
}

/// Build `projection` (a fresh instance) from the first ledger row and swap or verify it.
/// `progress` is called after every batch. Cancelling the future leaves only rebuild tables,
/// which the next rebuild drops first.
pub async fn rebuild(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    goal: Goal,
    progress: impl FnMut(&Progress) + Send,
) -> Result<Outcome, Error> {
    let batch_seconds = ProjectorStats::new(projection.name()).batch_seconds;
    rebuild_observed(pool, projection, goal, batch_seconds, progress).await
}

/// [`rebuild`], every batch (the last ones, folded inside the swap, too) observed in
/// `batch_seconds`: a live runner building its missing tables counts those batches as its own,
/// so its histogram shows every batch that brought the live tables to the head.
pub async fn rebuild_observed(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    goal: Goal,
    batch_seconds: prometheus::Histogram,
    mut progress: impl FnMut(&Progress) + Send,
) -> Result<Outcome, Error> {
    let name = projection.name();
    let mut guard = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock_key(name))
        .fetch_one(&mut *guard)
        .await?;
    if !locked {
        return Err(Error::Busy(format!(
            "a rebuild of `{name}` is already running"
        )));
    }
    let result = build_and_finish(pool, projection, goal, batch_seconds, &mut progress).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock_key(name))
        .execute(&mut *guard)
        .await;
    result
}

async fn build_and_finish(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    goal: Goal,
    batch_seconds: prometheus::Histogram,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Outcome, Error> {
    let started = Instant::now();
    create_tables(pool, projection.as_ref(), Tables::REBUILD).await?;
    let runner = Projector::on(pool.clone(), projection.clone(), Tables::REBUILD)
        .observed_in(batch_seconds.clone());
    let mut p = Progress::default();
    // Most of the history: pages read ahead while the previous one is folded and written.
    let mut pages = runner.read_ahead(0);
    while let Some(page) = pages.recv().await {
        let n = runner.fold_page(page?).await?;
        report(pool, &runner, &mut p, n, started, progress).await?;
    }
    // What arrived meanwhile, page by page, up to the head.
    loop {
        let n = runner.catch_up(None).await?;
        report(pool, &runner, &mut p, n, started, progress).await?;
        if n == 0 {
            break;
        }
    }
    let mut tx = pool.begin().await?;
    let live_at = lock_checkpoint(&mut tx, projection.name()).await?;
    let upto = match goal {
        Goal::Swap => None,
        Goal::Verify => Some(live_at),
    };
    let mut step_started = Instant::now();
    while let Some((to, n)) = runner.step(&mut tx, upto).await? {
        // All in one transaction: if it fails the rebuild fails and this instance is dropped.
        batch_seconds.observe(step_started.elapsed().as_secs_f64());
        step_started = Instant::now();
        projection.committed(to);
        p.rows += n as u64;
    }
    projection.finish_rebuild(&mut tx, Tables::REBUILD).await?;
    let key = Tables::REBUILD.checkpoint_key(projection.name());
    let at: i64 =
        sqlx::query_scalar("SELECT last_pos FROM projection_checkpoints WHERE projection = $1")
            .bind(&key)
            .fetch_one(&mut *tx)
            .await?;
    let mut out = Outcome {
        rows: p.rows,
        rows_per_s: p.rows as f64 / started.elapsed().as_secs_f64().max(1e-6),
        checkpoint: at,
        ..Outcome::default()
    };
    match goal {
        Goal::Swap => swap(&mut tx, projection.as_ref(), at).await?,
        Goal::Verify => {
            compare(&mut tx, projection.as_ref(), &mut out).await?;
            drop_tables(&mut tx, projection.as_ref(), REBUILD_SCHEMA).await?;
        }
    }
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(out)
}

/// Count `n` more rows folded and tell `progress` where the rebuild stands.
async fn report(
    pool: &PgPool,
    runner: &Projector,
    p: &mut Progress,
    n: usize,
    started: Instant,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<(), Error> {
    p.rows += n as u64;
    p.at = runner
        .stats()
        .checkpoint
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut conn = pool.acquire().await?;
    p.head = head(&mut conn, runner.order()).await?;
    p.rows_per_s = p.rows as f64 / started.elapsed().as_secs_f64().max(1e-6);
    progress(p);
    Ok(())
}

async fn drop_tables(tx: &mut PgConnection, p: &dyn Projection, schema: &str) -> Result<(), Error> {
    for t in p.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {schema}.{t} CASCADE"))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// (Re)create `p`'s tables in `tables`, empty, with the checkpoint at 0.
async fn create_tables(pool: &PgPool, p: &dyn Projection, tables: Tables) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    drop_tables(&mut tx, p, tables.schema()).await?;
    // Simple-query protocol (no arguments), so the DDL may hold several statements. Not
    // `sqlx::raw_sql`: its future is not provably Send inside a spawned task.
    let ddl = tables.ddl(p.schema());
    sqlx::Executor::execute(&mut *tx, ddl.as_str()).await?;
    let key = tables.checkpoint_key(p.name());
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, last_pos, version) VALUES ($1, 0, $2) \
         ON CONFLICT (projection) DO UPDATE SET last_pos = 0, version = $2, updated_at = clock_timestamp()",
    )
    .bind(&key)
    .bind(p.version())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Move the rebuilt tables into the live schema and the live ones out, and set the live
/// checkpoint to the rebuild's, in the caller's transaction.
async fn swap(tx: &mut PgConnection, p: &dyn Projection, at: i64) -> Result<(), Error> {
    for t in p.tables() {
        sqlx::query(&format!(
            "DROP TABLE IF EXISTS {RETIRED_SCHEMA}.{t} CASCADE"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "ALTER TABLE IF EXISTS {LIVE_SCHEMA}.{t} SET SCHEMA {RETIRED_SCHEMA}"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "ALTER TABLE {REBUILD_SCHEMA}.{t} SET SCHEMA {LIVE_SCHEMA}"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DROP TABLE IF EXISTS {RETIRED_SCHEMA}.{t} CASCADE"
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "UPDATE projection_checkpoints SET last_pos = $2, version = $3, updated_at = clock_timestamp() \
         WHERE projection = $1",
    )
    .bind(p.name())
    .bind(at)
    .bind(p.version())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Compare every table of `p`, live against rebuilt, row by primary key (columns that only
/// record write times left out).
async fn compare(
    tx: &mut PgConnection,
    p: &dyn Projection,
    out: &mut Outcome,
) -> Result<(), Error> {
    let volatile: String = p
        .volatile_columns()
        .iter()
        .map(|c| format!(" - '{c}'"))
        .collect();
    for t in p.tables() {
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
             ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY a.attnum",
        )
        .bind(format!("{LIVE_SCHEMA}.{t}"))
        .fetch_all(&mut *tx)
        .await?;
        let key = format!(
            "jsonb_build_array({})",
            keys.iter()
                .map(|k| format!("x.{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let sql = format!(
            "SELECT COALESCE(l.k, r.k), l.v, r.v FROM \
             (SELECT {key} AS k, to_jsonb(x){volatile} AS v FROM {LIVE_SCHEMA}.{t} x) l \
             FULL JOIN (SELECT {key} AS k, to_jsonb(x){volatile} AS v FROM {REBUILD_SCHEMA}.{t} x) r \
             ON l.k = r.k WHERE l.v IS DISTINCT FROM r.v ORDER BY 1"
        );
        let rows: Vec<(
            serde_json::Value,
            Option<serde_json::Value>,
            Option<serde_json::Value>,
        )> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?;
        out.difference_count += rows.len() as u64;
        for (key, live, rebuilt) in rows {
            if out.differences.len() < MAX_DIFFERENCES {
                out.differences.push(Difference {
                    table: t.to_string(),
                    key,
                    live,
                    rebuilt,
                });
            }
        }
    }
    Ok(())
}

/// Make sure `fresh()`'s live tables exist at its version; if not, build them from the first
/// ledger row and swap them in (a projection just added to a running deployment, or changed).
/// Its batches are observed in `batch_seconds`, the live runner's histogram.
pub async fn ensure_live(
    pool: &PgPool,
    fresh: &crate::runner::Fresh,
    batch_seconds: &prometheus::Histogram,
) -> Result<(), Error> {
    let p = fresh();
    let version: Option<String> =
        sqlx::query_scalar("SELECT version FROM projection_checkpoints WHERE projection = $1")
            .bind(p.name())
            .fetch_optional(pool)
            .await?;
    let mut missing = false;
    for t in p.tables() {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(format!("{LIVE_SCHEMA}.{t}"))
            .fetch_one(pool)
            .await?;
        missing |= exists.is_none();
    }
    if !missing && version.as_deref() == Some(p.version().as_str()) {
        return Ok(());
    }
    tracing::warn!(
        projection = p.name(),
        ?version,
        wanted = p.version(),
        missing,
        "building the projection from the first ledger row"
    );
    // Boxed as `dyn Send`: proves Send here, where every lifetime is concrete (rustc cannot
    // prove it through the spawned runner's generic future otherwise, rust-lang/rust#110338).
    let build: std::pin::Pin<Box<dyn Future<Output = Result<Outcome, Error>> + Send + '_>> =
        Box::pin(rebuild_observed(
            pool,
            p,
            Goal::Swap,
            batch_seconds.clone(),
            |pr: &Progress| {
                tracing::debug!(rows = pr.rows, at = pr.at, head = pr.head, "rebuilding");
            },
        ));
    let out = build.await?;
    tracing::info!(
        rows = out.rows,
        rows_per_s = out.rows_per_s as u64,
        checkpoint = out.checkpoint,
        "projection built and swapped in"
    );
    Ok(())
}

//! Every read of the ledger (DESIGN §1): rows after a position (projections), rows in stream
//! order between two sequences (start-up, snapshots), the rows of one request (late settlements,
//! `GET /v1/requests`), each payload decoded once, straight from its text, into an [`Envelope`].
//!
//! A row that no longer decodes (written by a newer or an older build with other rules) is never
//! allowed to stop a reader: it is skipped, counted and logged with its position, and the reader
//! goes on (SPEC v2 §10.10). The rows are still in the ledger for an operator to look at.

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{PgConnection, PgPool};
use tally_events::Envelope;

use crate::Error;

/// Rows per page of a sequential read: large enough to amortize the round trip, small enough
/// that one page of decoded events stays a few MiB.
pub const PAGE_ROWS: i64 = 5_000;

/// Ledger rows skipped because they did not decode, since the process started.
static UNDECODABLE_ROWS: AtomicU64 = AtomicU64::new(0);

/// How many ledger rows readers skipped because they did not decode.
pub fn undecodable_rows() -> u64 {
    UNDECODABLE_ROWS.load(Ordering::Relaxed)
}

/// Ledger rows as read, their payloads not decoded yet: a reader can fetch the next page while
/// another task decodes this one (Postgres, decoding and the fold each on their own core).
#[derive(Debug, Default)]
pub struct RawPage {
    /// `(key, payload text)` of the rows wanted, in order.
    pub rows: Vec<(i64, String)>,
    /// The key (`pos` or stream sequence) of the last row read, wanted or not; None when none.
    pub last: Option<i64>,
    /// Ledger rows the page moved past, including those not wanted.
    pub spanned: usize,
    /// Which key the rows carry (`pos`, `stream_seq`), for the log of a row that does not decode.
    pub key: &'static str,
}

impl RawPage {
    /// The page's events, decoded; undecodable rows are skipped and logged.
    pub fn decode(self) -> Vec<(i64, Envelope)> {
        decode_page(self.rows, self.key)
    }
}

/// Decode a page of `(key, payload text)` rows; undecodable ones are skipped and logged.
/// The page is allocated once at its full size: grown by doubling, a page of large envelopes
/// was reallocated a dozen times into fresh memory (a sixth of a quota replay's time, measured).
fn decode_page(rows: Vec<(i64, String)>, what: &'static str) -> Vec<(i64, Envelope)> {
    let mut page = Vec::with_capacity(rows.len());
    for (key, text) in rows {
        match Envelope::decode(text.as_bytes()) {
            Ok(env) => page.push((key, env)),
            Err(e) => {
                UNDECODABLE_ROWS.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%what, key, error = %e, "ledger row does not decode; skipped");
            }
        }
    }
    page
}

/// The writer's contiguous watermark (see `watermark.rs`): every stream sequence at or below it
/// is final in the ledger. The highest over writers.
pub async fn contiguous_seq<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<u64, Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT max(contiguous_seq) FROM consumer_checkpoints")
            .fetch_one(conn)
            .await?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// Up to `limit` rows with `pos > after`, in `pos` (commit) order, keeping only the payloads of
/// events of `types` (None: all). The page still spans `limit` rows and its last `pos` is that of
/// the last row read, whatever its type, so a caller's checkpoint moves past the rows it has no
/// use for; their payloads are neither converted to text by Postgres nor sent nor decoded (the
/// usage projections need one type in three).
pub async fn raw_page_after_pos_of(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
    types: Option<&[&str]>,
) -> Result<RawPage, Error> {
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT pos, CASE WHEN $3::text[] IS NULL OR event_type = ANY($3) THEN payload::text END \
         FROM ledger WHERE pos > $1 ORDER BY pos LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(types)
    .fetch_all(&mut *conn)
    .await?;
    Ok(RawPage {
        last: rows.last().map(|(p, _)| *p),
        spanned: rows.len(),
        rows: rows
            .into_iter()
            .filter_map(|(p, text)| text.map(|t| (p, t)))
            .collect(),
        key: "pos",
    })
}

/// Up to `limit` rows with `after < stream_seq < before`, in stream order, and the last sequence
/// read (see [`raw_page_after_pos_of`]).
pub async fn raw_page_by_seq<'c, E: sqlx::PgExecutor<'c>>(
    pool: E,
    after: u64,
    before: u64,
    limit: i64,
) -> Result<RawPage, Error> {
    // Only the lower bound goes to Postgres: with an upper bound too, a table not analyzed yet
    // (a restart right after heavy writes) gets a bitmap scan of every row and a sort per page
    // instead of the ordered index scan; the upper bound is applied here.
    let mut rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT stream_seq, payload::text FROM ledger WHERE stream_seq > $1 \
         ORDER BY stream_seq LIMIT $2",
    )
    .bind(i64::try_from(after).unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let before = i64::try_from(before).unwrap_or(i64::MAX);
    rows.retain(|(seq, _)| *seq < before);
    Ok(RawPage {
        last: rows.last().map(|(s, _)| *s),
        spanned: rows.len(),
        rows,
        key: "stream_seq",
    })
}

/// Most ledger rows one request may have: an admission, a release or expiry, the settlements
/// (bounded per request) and alerts; a bound on what one lookup reads.
pub const MAX_ROWS_PER_REQUEST: i64 = 8192;

/// Every event of one request, in commit order.
pub async fn request_events(pool: &PgPool, request_id: &str) -> Result<Vec<Envelope>, Error> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT pos, payload::text FROM ledger WHERE request_id = $1 ORDER BY pos LIMIT $2",
    )
    .bind(request_id)
    .bind(MAX_ROWS_PER_REQUEST)
    .fetch_all(pool)
    .await?;
    Ok(decode_page(rows, "request")
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

/// Pages decoded ahead of the fold: the next page is fetched and decoded while the current one
/// is folded (IO and decoding on one core, the fold on the other).
pub const PREFETCH_PAGES: usize = 2;

/// Progress of a sequential fold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FoldProgress {
    /// Rows folded so far.
    pub rows: u64,
    /// The last stream sequence read.
    pub last_seq: u64,
    /// Rows per second so far.
    pub rows_per_s: f64,
}

/// Fold every ledger row with `after < stream_seq < before` in stream order, a page at a time,
/// into `page` (which also gets the progress so far), reading pages ahead of the fold. Returns
/// the final progress. Three stages overlap: Postgres reads a page, a blocking thread decodes
/// the one before, `page` folds the one before that.
pub async fn fold_by_seq(
    pool: &PgPool,
    after: u64,
    before: u64,
    mut page: impl FnMut(&[(i64, Envelope)], &FoldProgress),
) -> Result<FoldProgress, Error> {
    let started = std::time::Instant::now();
    // One raw page waits while the one before is decoded: the read never runs further ahead.
    let (raw_tx, raw_rx) = tokio::sync::mpsc::channel(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel(PREFETCH_PAGES);
    let reader = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut at = after;
            loop {
                let raw = raw_page_by_seq(&pool, at, before, PAGE_ROWS).await;
                let next = match &raw {
                    Ok(RawPage {
                        last: Some(last), ..
                    }) => Some(u64::try_from(*last).unwrap_or(u64::MAX)),
                    _ => None,
                };
                if raw_tx.send(raw).await.is_err() {
                    return;
                }
                match next {
                    Some(n) => at = n,
                    None => return,
                }
            }
        })
    };
    let decoder = tokio::spawn(decode_ahead(
        raw_rx,
        tx,
        |raw: RawPage| {
            let last = raw.last;
            (raw.decode(), last)
        },
        Error::ReadAhead,
        |(_, last)| last.is_none(),
    ));
    let mut p = FoldProgress {
        last_seq: after,
        ..FoldProgress::default()
    };
    let mut reached_the_end = false;
    while let Some(next) = rx.recv().await {
        let (events, last) = next?;
        let Some(last) = last else {
            reached_the_end = true;
            break;
        };
        p.rows += events.len() as u64;
        p.last_seq = u64::try_from(last).unwrap_or(p.last_seq);
        p.rows_per_s = p.rows as f64 / started.elapsed().as_secs_f64().max(1e-6);
        page(&events, &p);
    }
    drop(rx);
    let (read, decoded) = (reader.await, decoder.await);
    if !reached_the_end {
        // The pages stopped before the last one: a stage died. Folding on would return a state
        // missing the rest of the range as if it were whole.
        read.and(decoded).map_err(Error::ReadAhead)?;
    }
    Ok(p)
}

/// The decoding stage of a paged read ([`fold_by_seq`], the projector's read-ahead): each raw
/// page `decode`d on a blocking thread (CPU work a runtime worker must not sit in), passed on in
/// order. An error (a decoding thread that died is `died`'s), or a page `is_last` accepts, is
/// passed on and ends the stage; so does the sender or the receiver going away.
pub async fn decode_ahead<R, D, E>(
    mut raw: tokio::sync::mpsc::Receiver<Result<R, E>>,
    tx: tokio::sync::mpsc::Sender<Result<D, E>>,
    decode: fn(R) -> D,
    died: fn(tokio::task::JoinError) -> E,
    is_last: fn(&D) -> bool,
) where
    R: Send + 'static,
    D: Send + 'static,
    E: Send + 'static,
{
    while let Some(next) = raw.recv().await {
        let page = match next {
            Ok(r) => tokio::task::spawn_blocking(move || decode(r))
                .await
                .map_err(died),
            Err(e) => Err(e),
        };
        let done = page.as_ref().map_or(true, is_last);
        if tx.send(page).await.is_err() || done {
            return;
        }
    }
}

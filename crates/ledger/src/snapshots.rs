//! The snapshot store (ADR 0005): quota snapshots as rows of `quota_snapshots` with their bytes
//! in chunks, written in one transaction, newest [`KEEP_SNAPSHOTS`] kept per stream. Readers try
//! the newest first and fall back to older ones; the bytes are checked by the caller
//! (`QuotaState::decode_snapshot`), so a damaged snapshot is noticed, never loaded.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::Error;

/// Bytes per chunk row: large enough that a snapshot is a few dozen rows, small enough that no
/// single value is near Postgres' limits or a large allocation on its own.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Snapshots kept per stream: the newest and two to fall back on.
pub const KEEP_SNAPSHOTS: i64 = 3;
/// Advisory lock every snapshot writer holds while writing (arbitrary, fixed: "TALLYSNP").
pub const SNAPSHOT_WRITE_LOCK: i64 = 0x5441_4c4c_5953_4e50;

/// A stored snapshot's row.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredSnapshot {
    /// Row id.
    pub id: i64,
    /// The last stream sequence it covers.
    pub stream_seq: i64,
    /// Its format version.
    pub format: i32,
    /// Its size.
    pub size_bytes: i64,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

/// Write a snapshot (one transaction: the row and every chunk, or nothing), then forget all but
/// the newest [`KEEP_SNAPSHOTS`] of the stream. Returns the new row's id.
#[tracing::instrument(skip(pool, bytes), fields(size = bytes.len()))]
pub async fn write(
    pool: &PgPool,
    stream: &str,
    stream_seq: u64,
    format: u32,
    checksum: u32,
    taken_at: DateTime<Utc>,
    bytes: &[u8],
) -> Result<i64, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SNAPSHOT_WRITE_LOCK)
        .execute(&mut *tx)
        .await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO quota_snapshots (stream, stream_seq, format, checksum, size_bytes, taken_at) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(stream)
    .bind(i64::try_from(stream_seq).unwrap_or(i64::MAX))
    .bind(format as i32)
    .bind(i64::from(checksum))
    .bind(bytes.len() as i64)
    .bind(taken_at)
    .fetch_one(&mut *tx)
    .await?;
    for (i, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
        sqlx::query(
            "INSERT INTO quota_snapshot_chunks (snapshot_id, idx, data) VALUES ($1, $2, $3)",
        )
        .bind(id)
        .bind(i as i32)
        .bind(chunk)
        .execute(&mut *tx)
        .await?;
        // A test pauses here to kill the writer half way (a no-op without `failpoints`).
        fail::fail_point!("snapshot-write-chunk");
    }
    sqlx::query(
        "DELETE FROM quota_snapshots WHERE stream = $1 AND id NOT IN \
         (SELECT id FROM quota_snapshots WHERE stream = $1 ORDER BY stream_seq DESC, id DESC LIMIT $2)",
    )
    .bind(stream)
    .bind(KEEP_SNAPSHOTS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// The stream's snapshots, newest first.
pub async fn list(pool: &PgPool, stream: &str) -> Result<Vec<StoredSnapshot>, Error> {
    Ok(sqlx::query_as(
        "SELECT id, stream_seq, format, size_bytes, taken_at FROM quota_snapshots \
         WHERE stream = $1 ORDER BY stream_seq DESC, id DESC",
    )
    .bind(stream)
    .fetch_all(pool)
    .await?)
}

/// Most bytes reserved up front for a snapshot from its row's `size_bytes` (a damaged row must
/// not make the reader reserve more than any real snapshot; past it the buffer just grows).
const MAX_RESERVE_BYTES: usize = 1 << 30;

/// A snapshot's bytes, its chunks concatenated in order. The chunks are streamed into one
/// buffer of the snapshot's size: holding every chunk and then their concatenation cost twice
/// (and growing the buffer up to three times) the snapshot's size at the moment a starting
/// instance also builds its state from it (issue 5's memory bound).
#[tracing::instrument(skip(pool, s), fields(id = s.id, size = s.size_bytes))]
pub async fn read(pool: &PgPool, s: &StoredSnapshot) -> Result<Vec<u8>, Error> {
    use futures::TryStreamExt as _;
    let mut bytes = Vec::new();
    let expected = usize::try_from(s.size_bytes).unwrap_or(0);
    // Best effort: a failed reservation only means the buffer grows as chunks arrive.
    let _ = bytes.try_reserve_exact(expected.min(MAX_RESERVE_BYTES));
    let mut chunks = sqlx::query_scalar::<_, Vec<u8>>(
        "SELECT data FROM quota_snapshot_chunks WHERE snapshot_id = $1 ORDER BY idx",
    )
    .bind(s.id)
    .fetch(pool);
    while let Some(chunk) = chunks.try_next().await? {
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The outcome of looking for a snapshot to start from.
pub struct Loaded {
    /// The snapshot used and the state it holds, if one was usable.
    pub snapshot: Option<(StoredSnapshot, tally_events::quota::QuotaState)>,
    /// Snapshots passed over, newest first, with why (each also logged as an error).
    pub skipped: Vec<(StoredSnapshot, String)>,
}

/// The newest snapshot of `stream` covering at most `max_seq` that reads back whole (magic,
/// format, length, checksum, body); damaged or incompatible ones are skipped, loudly, for older
/// ones. `Loaded::snapshot` is None when there is none to use (a full rebuild follows).
pub async fn load_newest(pool: &PgPool, stream: &str, max_seq: u64) -> Result<Loaded, Error> {
    let mut skipped = Vec::new();
    for s in list(pool, stream).await? {
        if s.stream_seq < 0 || s.stream_seq as u64 > max_seq {
            continue;
        }
        let bytes = read(pool, &s).await?;
        match tally_events::quota::QuotaState::decode_snapshot(&bytes) {
            Ok((meta, state)) if meta.stream_seq == s.stream_seq as u64 => {
                return Ok(Loaded {
                    snapshot: Some((s, state)),
                    skipped,
                });
            }
            Ok((meta, _)) => {
                let why = format!(
                    "header covers sequence {}, row says {}",
                    meta.stream_seq, s.stream_seq
                );
                tracing::error!(snapshot = s.id, reason = %why, "snapshot skipped");
                skipped.push((s, why));
            }
            Err(e) => {
                tracing::error!(snapshot = s.id, stream_seq = s.stream_seq, reason = %e, "snapshot skipped");
                skipped.push((s, e.to_string()));
            }
        }
    }
    Ok(Loaded {
        snapshot: None,
        skipped,
    })
}

//! The ledger writer: a durable pull consumer that appends every event to Postgres.
//!
//! Each batch (bounded in size and time) is written in one transaction together with the
//! consumer's checkpoint; messages are acked only after the commit. Undecodable or invalid
//! messages go to the dead-letter stream and `ledger_rejects` with the reason, in the same
//! transaction, and the pipeline keeps going.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, Message, consumer::pull};
use futures::StreamExt;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgPool, Postgres, QueryBuilder, Transaction};
use tally_events::{Envelope, EventData, LedgerFacts};

use crate::watermark::Watermark;
use crate::{Error, Publisher, StreamSettings, stream};

/// Most messages per batch/transaction: 20 bound columns × 1000 rows stays well under Postgres'
/// 65 535 bind parameters, and a 1000-row insert commits in a few ms.
pub const MAX_BATCH: usize = 1000;
/// Longest a batch waits to fill before the writer commits what it has: bounds ledger lag at low load.
pub const BATCH_WAIT: Duration = Duration::from_millis(20);
/// Heartbeat of the continuous pull: a silent server is noticed (and re-subscribed) this fast.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long an idle writer waits for a message before doing its periodic checks.
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long JetStream waits for an ack before redelivering. Far above a batch commit (ms), and
/// short because it is also how long a crashed writer's in-flight batch waits to be redelivered.
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// Most unacked messages the server hands this consumer: a few batches.
pub const MAX_ACK_PENDING: i64 = 10 * MAX_BATCH as i64;
/// Backoff bounds while Postgres (or the dead-letter publish) fails: retry fast, never spin.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// See [`RETRY_BACKOFF_MIN`].
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle writer re-checks the stream against its checkpoint.
pub const ALARM_CHECK_EVERY: Duration = Duration::from_secs(5);
/// A pull subscription silent this long while the consumer has messages waiting is replaced:
/// past the heartbeat (a live subscription hears from the server within it) and past the ack
/// wait (messages delivered into a dead connection come back after it).
pub const STALLED_AFTER: Duration = Duration::from_secs(15);
/// Postgres channel notified after each committed batch, so projectors wake at once.
pub const LEDGER_NOTIFY_CHANNEL: &str = "tally_ledger";

/// Advisory lock key every ledger writer holds while it commits (arbitrary, fixed: "TALLYLDG").
pub const LEDGER_WRITE_LOCK: i64 = 0x5441_4c4c_594c_4447;

/// How the writer consumes.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Durable consumer name (also the checkpoint's key).
    pub consumer: String,
    /// Messages per batch, at most [`MAX_BATCH`].
    pub batch_max: usize,
    /// Time a batch may wait to fill.
    pub batch_wait: Duration,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            consumer: "tally-ledger".into(),
            batch_max: MAX_BATCH,
            batch_wait: BATCH_WAIT,
        }
    }
}

/// Counters an operator graphs (exposed on `/metrics`).
#[derive(Debug)]
pub struct WriterStats {
    /// Ledger rows appended.
    pub rows_appended: AtomicU64,
    /// Messages that were already in the ledger (redeliveries, duplicate settlements).
    pub duplicates: AtomicU64,
    /// Messages dead-lettered.
    pub rejects: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Checkpoint (last committed stream sequence).
    pub checkpoint: AtomicU64,
    /// Contiguous watermark (every sequence at or below it is committed).
    pub contiguous: AtomicU64,
    /// Pull subscriptions replaced because they fell silent while messages waited.
    pub resubscribes: AtomicU64,
    /// Time from the start of a batch's transaction to its commit.
    pub batch_commit_seconds: prometheus::Histogram,
}

impl Default for WriterStats {
    fn default() -> Self {
        WriterStats {
            rows_appended: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejects: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            checkpoint: AtomicU64::new(0),
            contiguous: AtomicU64::new(0),
            resubscribes: AtomicU64::new(0),
            batch_commit_seconds: crate::metrics::seconds_histogram(
                "tally_ledger_batch_commit_seconds",
                "Ledger batch: insert, checkpoint and commit, in seconds.",
                &[],
            ),
        }
    }
}

/// The ledger writer.
pub struct LedgerWriter {
    js: jetstream::Context,
    pool: PgPool,
    stream: StreamSettings,
    settings: WriterSettings,
    dead_letters: Publisher,
    stats: Arc<WriterStats>,
}

/// The writer's live pull subscription and what it knows about the stream.
struct Subscription {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    messages: pull::Stream,
    /// Highest stream sequence below which everything is in the ledger.
    mark: Watermark,
    /// When the subscription last delivered a message (or was made).
    last_message: tokio::time::Instant,
}

impl Subscription {
    /// This fresh subscription with the watermark of the one it replaces: the sequences that
    /// one committed above its contiguous mark stay known (the fresh mark only has what Postgres
    /// and the ack floor say), so the mark never steps back on a re-subscribe.
    fn keeping_mark_of(mut self, old: Subscription) -> Subscription {
        let fresh = self.mark.get();
        self.mark = old.mark;
        self.mark.raise_to(fresh);
        self
    }
}

struct Row {
    seq: u64,
    env: Envelope,
    /// The message as published (valid UTF-8 JSON: it decoded), stored as `json`: the raw
    /// payload, byte for byte.
    payload: String,
}

struct Reject {
    seq: u64,
    nats_subject: String,
    reason: String,
    field: Option<String>,
    payload: Vec<u8>,
}

impl LedgerWriter {
    /// A writer for `stream`, which must exist ([`stream::ensure_stream`]).
    pub fn new(
        js: jetstream::Context,
        pool: PgPool,
        stream: StreamSettings,
        settings: WriterSettings,
    ) -> Self {
        assert!(
            settings.batch_max > 0 && settings.batch_max <= MAX_BATCH,
            "batch_max out of range"
        );
        let dead_letters = Publisher::new(js.clone(), stream.clone());
        LedgerWriter {
            js,
            pool,
            stream,
            settings,
            dead_letters,
            stats: Arc::default(),
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Consume until `shutdown` resolves or an unrecoverable error (the stream-behind alarm).
    /// Everything else (NATS or Postgres away at start or later, a pull subscription that went
    /// silent after a server restart) is retried with backoff and logged.
    #[tracing::instrument(skip_all, fields(stream = %self.stream.name, consumer = %self.settings.consumer))]
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let Some(mut sub) = self.subscribe_retrying(&mut shutdown).await? else {
            return Ok(());
        };
        let mut last_check = tokio::time::Instant::now();
        loop {
            let batch = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                b = self.next_batch(&mut sub.messages) => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %crate::error::Chain(&e), "consuming failed; re-subscribing");
                    match self.subscribe_retrying(&mut shutdown).await? {
                        Some(fresh) => sub = fresh.keeping_mark_of(sub),
                        None => return Ok(()),
                    }
                    continue;
                }
            };
            if !batch.is_empty() {
                sub.last_message = tokio::time::Instant::now();
            }
            if last_check.elapsed() > ALARM_CHECK_EVERY {
                if self.periodic_check(&mut sub).await? {
                    match self.subscribe_retrying(&mut shutdown).await? {
                        Some(fresh) => sub = fresh.keeping_mark_of(sub),
                        None => return Ok(()),
                    }
                }
                last_check = tokio::time::Instant::now();
            }
            if batch.is_empty() {
                continue;
            }
            for m in &batch {
                if let Ok(info) = m.info() {
                    sub.mark.note(info.stream_sequence);
                }
            }
            self.commit_with_retry(&batch, sub.mark.get()).await;
            ack_all(&batch).await;
        }
    }

    /// The consumer, its pull subscription and the contiguous watermark, retried with backoff
    /// until they are there (None: `shutdown` came first). Only the stream-behind alarm is fatal.
    async fn subscribe_retrying(
        &self,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<Option<Subscription>, Error> {
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            match self.subscribe().await {
                Ok(sub) => return Ok(Some(sub)),
                Err(e @ Error::StreamBehindCheckpoint { .. }) => return Err(e),
                Err(e) => tracing::warn!(
                    error = %crate::error::Chain(&e),
                    retry_in_ms = backoff.as_millis() as u64,
                    "subscribing to the stream failed; retrying"
                ),
            }
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    async fn subscribe(&self) -> Result<Subscription, Error> {
        let mut consumer = self.consumer().await?;
        let messages = self.messages(&consumer).await?;
        self.check_alarm().await?;
        let stored = load_contiguous(&self.pool, &self.settings.consumer).await?;
        let mut mark = Watermark::at(stored);
        mark.raise_to(ack_floor(&mut consumer).await?.ack_floor.stream_sequence);
        Ok(Subscription {
            consumer,
            messages,
            mark,
            last_message: tokio::time::Instant::now(),
        })
    }

    /// The stream-behind alarm, the ack floor, and the stall watchdog: true when the pull
    /// subscription has delivered nothing for [`STALLED_AFTER`] while the consumer has messages
    /// waiting (a server restart can leave a pull subscription silent for good), so the caller
    /// subscribes afresh.
    async fn periodic_check(&self, sub: &mut Subscription) -> Result<bool, Error> {
        match self.check_alarm().await {
            Err(e @ Error::StreamBehindCheckpoint { .. }) => return Err(e),
            // Postgres or NATS briefly away: the check runs again next time; a batch waits for
            // Postgres in its own retry loop.
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "stream/checkpoint check failed")
            }
            Ok(()) => {}
        }
        let Ok(info) = ack_floor(&mut sub.consumer).await else {
            return Ok(false);
        };
        sub.mark.raise_to(info.ack_floor.stream_sequence);
        let waiting = info.num_pending + info.num_ack_pending as u64;
        let stalled = waiting > 0 && sub.last_message.elapsed() > STALLED_AFTER;
        if stalled {
            self.stats.resubscribes.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                pending = info.num_pending,
                ack_pending = info.num_ack_pending,
                silent_ms = sub.last_message.elapsed().as_millis() as u64,
                "the pull subscription delivers nothing while messages wait; re-subscribing"
            );
        }
        Ok(stalled)
    }

    async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
        let context = format!("consumer {}", self.settings.consumer);
        let stream = self
            .js
            .get_stream(&self.stream.name)
            .await
            .map_err(|e| Error::jetstream(context.clone(), e))?;
        let config = pull::Config {
            durable_name: Some(self.settings.consumer.clone()),
            description: Some("tally ledger writer".into()),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        stream
            .get_or_create_consumer(&self.settings.consumer, config)
            .await
            .map_err(|e| Error::jetstream(context, e))
    }

    /// A continuous pull: the server keeps up to a batch ahead of us, so a busy writer never
    /// waits a round trip between batches.
    async fn messages(
        &self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
    ) -> Result<pull::Stream, Error> {
        consumer
            .stream()
            .max_messages_per_batch(self.settings.batch_max)
            .heartbeat(HEARTBEAT)
            .messages()
            .await
            .map_err(|e| Error::jetstream("starting the pull", e))
    }

    /// The next batch: waits up to [`IDLE_POLL`] for a first message, then takes what arrives
    /// within `batch_wait` of it, up to `batch_max`.
    async fn next_batch(&self, messages: &mut pull::Stream) -> Result<Vec<Message>, Error> {
        let mut out = Vec::with_capacity(self.settings.batch_max);
        let first = match tokio::time::timeout(IDLE_POLL, messages.next()).await {
            Err(_) => return Ok(out),
            Ok(None) => {
                return Err(Error::jetstream(
                    "pulling messages",
                    "the consumer's message stream ended",
                ));
            }
            Ok(Some(m)) => m.map_err(|e| Error::jetstream("pulling messages", e))?,
        };
        out.push(first);
        let deadline = tokio::time::Instant::now() + self.settings.batch_wait;
        while out.len() < self.settings.batch_max {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(m)) => out.push(m.map_err(|e| Error::jetstream("pulling messages", e))?),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Stop with a loud alarm if the stream restarted below the checkpoint.
    pub async fn check_alarm(&self) -> Result<(), Error> {
        let checkpoint = load_checkpoint(&self.pool, &self.settings.consumer).await?;
        let last = stream::last_sequence(&self.js, &self.stream.name).await?;
        if last < checkpoint {
            let e = Error::StreamBehindCheckpoint {
                stream: self.stream.name.clone(),
                stream_last_seq: last,
                checkpoint,
            };
            tracing::error!(alarm = true, "{e}");
            return Err(e);
        }
        Ok(())
    }

    async fn commit_with_retry(&self, batch: &[Message], contiguous: u64) {
        let (rows, rejects) = classify(batch);
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            match self.commit(&rows, &rejects, contiguous).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %crate::error::Chain(&e), retry_in_ms = backoff.as_millis() as u64, "batch not committed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }

    #[tracing::instrument(skip_all, fields(rows = rows.len(), rejects = rejects.len()))]
    async fn commit(&self, rows: &[Row], rejects: &[Reject], contiguous: u64) -> Result<(), Error> {
        for r in rejects {
            self.dead_letter(r).await?;
        }
        let max_seq = rows
            .iter()
            .map(|r| r.seq)
            .chain(rejects.iter().map(|r| r.seq))
            .max()
            .unwrap_or(0);
        // Committed batches only (a timer guard would also record the failed ones on drop).
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        // Serialize writers' commits so `ledger.pos` order is commit order (see the migration).
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(LEDGER_WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        let appended = insert_rows(&mut tx, rows).await?;
        insert_rejects(&mut tx, &self.stream.name, rejects).await?;
        let checkpoint = save_checkpoint(
            &mut tx,
            &self.settings.consumer,
            &self.stream.name,
            (max_seq, contiguous),
        )
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(LEDGER_NOTIFY_CHANNEL)
            .bind(checkpoint.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.stats
            .batch_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let s = &self.stats;
        s.rows_appended.fetch_add(appended, Ordering::Relaxed);
        s.duplicates
            .fetch_add(rows.len() as u64 - appended, Ordering::Relaxed);
        s.rejects.fetch_add(rejects.len() as u64, Ordering::Relaxed);
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.checkpoint.store(checkpoint, Ordering::Relaxed);
        s.contiguous.store(contiguous, Ordering::Relaxed);
        Ok(())
    }

    async fn dead_letter(&self, r: &Reject) -> Result<(), Error> {
        let (_, subject) = self.stream.dead_letter();
        let msg_id = format!("dlq-{}-{}", self.stream.name, r.seq);
        self.dead_letters
            .publish_raw(subject, msg_id, r.payload.clone().into())
            .await?;
        tracing::warn!(stream_seq = r.seq, reason = %r.reason, "message dead-lettered");
        Ok(())
    }
}

fn classify(batch: &[Message]) -> (Vec<Row>, Vec<Reject>) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut rejects = Vec::new();
    for m in batch {
        // A pull consumer's messages always carry their stream sequence; one that does not
        // cannot be placed in the ledger, and is reported rather than trusted.
        let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
            tracing::error!(subject = %m.subject, "a message without JetStream metadata; not stored");
            continue;
        };
        let decoded = Envelope::decode(&m.payload).and_then(|env| {
            String::from_utf8(m.payload.to_vec())
                .map(|p| (env, p))
                .map_err(|e| tally_events::Error::Malformed {
                    field: None,
                    message: e.to_string(),
                })
        });
        match decoded {
            Ok((env, payload)) => rows.push(Row { seq, env, payload }),
            Err(e) => rejects.push(Reject {
                seq,
                nats_subject: m.subject.to_string(),
                reason: e.to_string(),
                field: e.field().map(str::to_owned),
                payload: m.payload.to_vec(),
            }),
        }
    }
    (rows, rejects)
}

async fn ack_all(batch: &[Message]) {
    for m in batch {
        // A lost ack only means a redelivery, which the ledger deduplicates.
        if let Err(e) = m.ack().await {
            tracing::warn!(error = %crate::error::Chain(e.as_ref()), "ack failed; the message will be redelivered and deduplicated");
        }
    }
}

const INSERT_LEDGER: &str = "INSERT INTO ledger (event_id, stream_seq, event_type, schema_version, \
    occurred_at, window_at, request_id, settlement_id, subject, chain, model, model_group, requests, \
    input_tokens, output_tokens, cost, credits, counted_in_key_global, counted_in_user_global, payload, \
    admission_id) ";

/// Values bound per ledger row.
const ARGS_PER_ROW: usize = 21;

/// Room for one row's bound values besides its payload: 21 length prefixes, two uuids, eight
/// integers, three timestamps, and the short strings and chain (a few hundred bytes).
const ARG_BYTES_PER_ROW: usize = 512;

/// Room for one row's placeholders in the statement: `($1, … $20::json, $21)`, at most eight
/// characters each (`$21000, `).
const SQL_BYTES_PER_ROW: usize = ARGS_PER_ROW * 8 + 16;

/// The statement's text, with room for every row's placeholders.
fn sized_sql(rows: &[Row]) -> String {
    let mut sql = String::with_capacity(INSERT_LEDGER.len() + rows.len() * SQL_BYTES_PER_ROW + 32);
    sql.push_str(INSERT_LEDGER);
    sql
}

/// The bound values' buffer, sized for the batch at once: grown by doubling, a batch of
/// admissions (2 kB payloads) was reallocated a dozen times into fresh pages (realloc alone 5.8 %
/// of the bench process under load, 2.8 % after).
fn sized_args(rows: &[Row]) -> PgArguments {
    let payload_bytes: usize = rows.iter().map(|r| r.payload.len()).sum();
    let mut args = PgArguments::default();
    args.reserve(
        rows.len() * ARGS_PER_ROW,
        payload_bytes + rows.len() * ARG_BYTES_PER_ROW,
    );
    args
}

async fn insert_rows(tx: &mut Transaction<'_, Postgres>, rows: &[Row]) -> Result<u64, Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut qb: QueryBuilder<Postgres> =
        QueryBuilder::with_arguments(sized_sql(rows), sized_args(rows));
    qb.push_values(rows, |mut b, r| {
        let f = LedgerFacts::of(&r.env);
        let settlement_id = match &r.env.data {
            EventData::UsageSettled(d) => Some(d.settlement_id.clone()),
            _ => None,
        };
        b.push_bind(r.env.id)
            .push_bind(i64::try_from(r.seq).expect("stream sequence fits i64"))
            .push_bind(r.env.event_type().as_str())
            .push_bind(r.env.schema as i32)
            .push_bind(r.env.occurred_at)
            .push_bind(f.window_at)
            .push_bind(r.env.request_id.clone())
            .push_bind(settlement_id)
            .push_bind(r.env.subject.as_ref().map(|s| s.as_str().to_owned()))
            .push_bind(f.chain)
            .push_bind(f.model)
            .push_bind(f.model_group)
            .push_bind(f.amounts.requests)
            .push_bind(f.amounts.input_tokens)
            .push_bind(f.amounts.output_tokens)
            .push_bind(f.amounts.cost)
            .push_bind(f.amounts.credits)
            .push_bind(f.counted_in_key_global)
            .push_bind(f.counted_in_user_global)
            .push_bind(&r.payload)
            .push_unseparated("::json")
            .push_bind(f.admission_id);
    });
    // No conflict target: a redelivered event (same event_id) and a retried settlement (same
    // request, admission and settlement id, ledger_settlement_once) are both the same fact,
    // appended once.
    qb.push(" ON CONFLICT DO NOTHING");
    Ok(qb.build().execute(&mut **tx).await?.rows_affected())
}

async fn insert_rejects(
    tx: &mut Transaction<'_, Postgres>,
    stream: &str,
    rejects: &[Reject],
) -> Result<(), Error> {
    for r in rejects {
        sqlx::query(
            "INSERT INTO ledger_rejects (stream, stream_seq, nats_subject, reason, field, payload) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(stream)
        .bind(r.seq as i64)
        .bind(&r.nats_subject)
        .bind(&r.reason)
        .bind(&r.field)
        .bind(&r.payload)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The consumer's checkpoint (0 when it never committed).
pub async fn load_checkpoint(pool: &PgPool, consumer: &str) -> Result<u64, Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT last_seq FROM consumer_checkpoints WHERE consumer = $1")
            .bind(consumer)
            .fetch_optional(pool)
            .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// The contiguous watermark stored for `consumer` (0 when it never committed).
pub async fn load_contiguous(pool: &PgPool, consumer: &str) -> Result<u64, Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT contiguous_seq FROM consumer_checkpoints WHERE consumer = $1")
            .bind(consumer)
            .fetch_optional(pool)
            .await?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// The writer's durable consumer as JetStream sees it (ack floor, pending messages).
async fn ack_floor(
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
) -> Result<jetstream::consumer::Info, Error> {
    consumer
        .info()
        .await
        .cloned()
        .map_err(|e| Error::jetstream("reading the consumer's ack floor", e))
}

async fn save_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    stream: &str,
    (seq, contiguous): (u64, u64),
) -> Result<u64, Error> {
    // GREATEST: a batch of redeliveries must never move either mark backwards.
    let saved: i64 = sqlx::query_scalar(
        "INSERT INTO consumer_checkpoints (consumer, stream, last_seq, contiguous_seq) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (consumer) DO UPDATE SET last_seq = GREATEST(consumer_checkpoints.last_seq, EXCLUDED.last_seq), \
         contiguous_seq = GREATEST(consumer_checkpoints.contiguous_seq, EXCLUDED.contiguous_seq), \
         updated_at = clock_timestamp() RETURNING last_seq",
    )
    .bind(consumer)
    .bind(stream)
    .bind(i64::try_from(seq).unwrap_or(i64::MAX))
    .bind(i64::try_from(contiguous).unwrap_or(i64::MAX))
    .fetch_one(&mut **tx)
    .await?;
    Ok(saved.max(0) as u64)
}

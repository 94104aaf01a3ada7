//! The fail-open spool (SPEC §4, `--fail-open`): while NATS cannot take an event, the API appends
//! it to a local file and fsyncs before answering; a drainer publishes the spooled events in
//! order, with `Nats-Msg-Id` = event id, once NATS is back, so each reaches the stream (and the
//! ledger) exactly once.
//!
//! Files in the spool directory:
//! - `spool.log`: one record per line, `<subject> <msg-id> <payload>\n`. A line without its
//!   newline is a torn write from a crash before the fsync; no client was answered for it, and it
//!   is cut off when the spool is opened.
//! - `spool.cursor`: the byte offset of the first record not yet acknowledged by JetStream,
//!   replaced atomically (write, fsync, rename) after each drained batch. Records before it are
//!   never published again; records after it may be published twice after a crash, which the
//!   stream's duplicate window and the ledger's primary key absorb.
//! - `drained-<unix-ms>.log`: a spool that was fully published, kept for audit (the newest
//!   [`KEEP_DRAINED_FILES`]).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_events::Envelope;

use crate::{Error, Publisher};

/// The spool's size cap. Beyond it appends fail and the API answers 503 (fail closed) rather than
/// filling the disk: 1 GiB holds about a million events (a long outage at a busy gateway).
pub const MAX_SPOOL_BYTES: u64 = 1 << 30;
/// Records published per drain round before the cursor is saved: bounds both the memory of one
/// round and the events published again if the process dies mid-round.
pub const DRAIN_BATCH_RECORDS: usize = 512;
/// Bytes read from the log per drain round (events are at most a few KiB each).
const DRAIN_READ_BYTES: usize = 4 << 20;
/// Largest record accepted: far above any event the API builds (bodies are capped at 64 KiB),
/// and below [`DRAIN_READ_BYTES`] so every record fits in one drain read.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// How often the drainer looks at the spool when nothing woke it.
pub const DRAIN_POLL: Duration = Duration::from_millis(200);
/// Drained spool files kept for audit.
pub const KEEP_DRAINED_FILES: usize = 8;

const LOG: &str = "spool.log";
const CURSOR: &str = "spool.cursor";

struct Files {
    log: File,
    /// Bytes in the log (every one of them fsynced and newline-terminated).
    len: u64,
    /// First byte not yet published.
    cursor: u64,
}

struct Inner {
    dir: PathBuf,
    /// Held for the spool's life: two processes appending to one spool would interleave records.
    _lock: File,
    files: Mutex<Files>,
    publisher: Publisher,
    /// The publisher's connection: the drainer waits while it is down instead of filling the
    /// client's reconnect buffer with publishes that would time out.
    nats: async_nats::Client,
    pending: AtomicU64,
    /// Events left by an earlier run when the spool was opened.
    backlog_at_open: u64,
    appended: AtomicU64,
    published: AtomicU64,
    wake: tokio::sync::Notify,
}

/// A durable local spool of events waiting for NATS. Cheap to clone.
#[derive(Clone)]
pub struct Spool(Arc<Inner>);

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Spool {
        context: format!("{what} {}", path.display()),
        source: Some(e.into()),
    }
}

fn task_failed(what: &str, e: tokio::task::JoinError) -> Error {
    Error::Spool {
        context: format!("the {what} task died"),
        source: Some(e.into()),
    }
}

impl Spool {
    /// Open (or create) the spool in `dir`, cutting off a torn last record; events left by a
    /// previous run are pending and will be drained.
    pub fn open(
        dir: &Path,
        publisher: Publisher,
        nats: async_nats::Client,
    ) -> Result<Spool, Error> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let lock_path = dir.join("spool.lock");
        let lock = File::create(&lock_path).map_err(|e| io("creating", &lock_path, e))?;
        lock.try_lock().map_err(|_| {
            Error::spool(format!(
                "{} is in use by another process; give each API instance its own --spool-dir",
                dir.display()
            ))
        })?;
        let path = dir.join(LOG);
        let mut log = open_log(&path)?;
        let mut bytes = Vec::new();
        log.seek(SeekFrom::Start(0))
            .and_then(|_| log.read_to_end(&mut bytes))
            .map_err(|e| io("reading", &path, e))?;
        let len = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) as u64;
        if len < bytes.len() as u64 {
            tracing::warn!(
                torn_bytes = bytes.len() as u64 - len,
                "spool: cutting a torn record"
            );
            log.set_len(len)
                .and_then(|_| log.sync_all())
                .map_err(|e| io("truncating", &path, e))?;
        }
        let cursor = read_cursor(dir)?.min(len);
        let pending = bytes[cursor as usize..len as usize]
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
        if pending > 0 {
            tracing::warn!(pending, "spool: events from an earlier run wait for NATS");
        }
        Ok(Spool(Arc::new(Inner {
            dir: dir.to_owned(),
            _lock: lock,
            files: Mutex::new(Files { log, len, cursor }),
            publisher,
            nats,
            pending: AtomicU64::new(pending),
            backlog_at_open: pending,
            appended: AtomicU64::new(0),
            published: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        })))
    }

    /// Events spooled and not yet acknowledged by JetStream.
    pub fn pending(&self) -> u64 {
        self.0.pending.load(Ordering::Acquire)
    }

    /// True once the events an earlier run left in the spool are published. Until then the
    /// stream lacks them, and a quota state folded from it would admit past limits.
    pub fn backlog_drained(&self) -> bool {
        self.published_total() >= self.0.backlog_at_open
    }

    /// Events appended by this process.
    pub fn appended_total(&self) -> u64 {
        self.0.appended.load(Ordering::Relaxed)
    }

    /// Spooled events this process published.
    pub fn published_total(&self) -> u64 {
        self.0.published.load(Ordering::Relaxed)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Validate `env`, append it and fsync. When this returns Ok the event survives a crash.
    #[tracing::instrument(skip_all, fields(event_id = %env.id))]
    pub async fn append(&self, env: &Envelope) -> Result<(), Error> {
        env.validate()?;
        let subject = self.0.publisher.settings().subject_for(env);
        let mut line = format!("{subject} {} ", env.id).into_bytes();
        line.extend_from_slice(&env.encode());
        line.push(b'\n');
        if line.len() > MAX_RECORD_BYTES {
            return Err(Error::spool(format!(
                "event of {} bytes exceeds the spool record limit of {MAX_RECORD_BYTES}",
                line.len()
            )));
        }
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = inner.files.lock().expect("spool lock");
            if f.len + line.len() as u64 > MAX_SPOOL_BYTES {
                return Err(Error::spool(format!(
                    "spool is full ({MAX_SPOOL_BYTES} bytes); refusing rather than filling the disk"
                )));
            }
            let path = inner.dir.join(LOG);
            let written = f.log.write_all(&line).and_then(|_| f.log.sync_data());
            if let Err(e) = written {
                // Whatever part was written is cut off again so the log stays line-aligned.
                let len = f.len;
                let _ = f.log.set_len(len);
                return Err(io("appending to", &path, e));
            }
            f.len += line.len() as u64;
            inner.pending.fetch_add(1, Ordering::AcqRel);
            inner.appended.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
        .map_err(|e| task_failed("append", e))??;
        self.0.wake.notify_one();
        Ok(())
    }

    /// Publish spooled events whenever there are some, until `stop` resolves.
    pub async fn drain(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            while self.pending() > 0 && self.connected() {
                match self.drain_round().await {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %crate::error::Chain(&e), pending = self.pending(), "spool: drain failed; retrying");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = self.0.wake.notified() => {}
                _ = tokio::time::sleep(DRAIN_POLL) => {}
            }
        }
    }

    fn connected(&self) -> bool {
        self.0.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Publish one batch from the cursor and move the cursor past what JetStream acknowledged.
    async fn drain_round(&self) -> Result<usize, Error> {
        let (cursor, records) = self.read_batch().await?;
        if records.is_empty() {
            return Ok(0);
        }
        let batch: Vec<_> = records
            .iter()
            .map(|(_, s, id, p)| (s.clone(), id.clone(), p.clone()))
            .collect();
        let acked = self.0.publisher.publish_ordered(batch).await;
        let n = match &acked {
            Ok(n) => *n,
            Err((n, _)) => *n,
        };
        if n > 0 {
            let next = cursor + records[..n].iter().map(|r| r.0).sum::<u64>();
            self.advance(next).await?;
            let before = self.0.pending.fetch_sub(n as u64, Ordering::AcqRel);
            assert!(before >= n as u64, "spool pending count went negative");
            self.0.published.fetch_add(n as u64, Ordering::Relaxed);
        }
        acked.map_err(|(_, e)| e)
    }

    /// Up to [`DRAIN_BATCH_RECORDS`] whole records from the cursor: (bytes, subject, id, payload).
    async fn read_batch(&self) -> Result<(u64, Vec<Record>), Error> {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let f = inner.files.lock().expect("spool lock");
            let want = (f.len - f.cursor).min(DRAIN_READ_BYTES as u64) as usize;
            let mut buf = vec![0u8; want];
            let path = inner.dir.join(LOG);
            f.log
                .read_exact_at(&mut buf, f.cursor)
                .map_err(|e| io("reading", &path, e))?;
            Ok((f.cursor, parse_records(&buf)))
        })
        .await
        .map_err(|e| task_failed("read", e))?
    }

    /// Save the cursor; when everything is published, set the log aside and start a new one.
    async fn advance(&self, next: u64) -> Result<(), Error> {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = inner.files.lock().expect("spool lock");
            assert!(
                next > f.cursor && next <= f.len,
                "spool cursor only moves forward"
            );
            if next < f.len {
                write_cursor(&inner.dir, next)?;
                f.cursor = next;
                return Ok(());
            }
            rotate(&inner.dir, &mut f)
        })
        .await
        .map_err(|e| task_failed("cursor", e))?
    }
}

/// One spooled record: its length in bytes, subject, message id and payload.
type Record = (u64, String, String, bytes::Bytes);

/// Whole records in `buf` (a trailing partial record is left for the next round).
fn parse_records(buf: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut rest = buf;
    while out.len() < DRAIN_BATCH_RECORDS {
        let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
            break;
        };
        let (line, tail) = rest.split_at(nl + 1);
        rest = tail;
        let body = &line[..nl];
        let mut parts = body.splitn(3, |b| *b == b' ');
        let (Some(s), Some(id), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
            // Unreadable: publish nothing for it, but keep the cursor moving past it.
            tracing::error!(record = %String::from_utf8_lossy(body), "spool: malformed record skipped");
            out.push((
                line.len() as u64,
                String::new(),
                String::new(),
                bytes::Bytes::new(),
            ));
            continue;
        };
        out.push((
            line.len() as u64,
            String::from_utf8_lossy(s).into_owned(),
            String::from_utf8_lossy(id).into_owned(),
            bytes::Bytes::copy_from_slice(p),
        ));
    }
    out
}

fn read_cursor(dir: &Path) -> Result<u64, Error> {
    let path = dir.join(CURSOR);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            Error::spool(format!(
                "{} holds `{}`, not an offset",
                path.display(),
                text.trim()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io("reading", &path, e)),
    }
}

fn write_cursor(dir: &Path, offset: u64) -> Result<(), Error> {
    let tmp = dir.join("spool.cursor.tmp");
    let path = dir.join(CURSOR);
    let mut f = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(offset.to_string().as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", &path, e))?;
    sync_dir(dir)
}

/// The log, opened for reading and appending (created when missing).
fn open_log(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| io("opening", path, e))
}

/// Make renames and creations in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))
}

/// Everything is published: keep the log as `drained-<ms>.log`, start an empty one, reset the
/// cursor, and prune old drained files. A crash in between leaves either the full log with an old
/// cursor (republished, deduplicated) or an empty log (cursor clamped to 0 at open).
fn rotate(dir: &Path, f: &mut Files) -> Result<(), Error> {
    let log = dir.join(LOG);
    let kept = dir.join(format!(
        "drained-{}.log",
        chrono::Utc::now().timestamp_millis()
    ));
    std::fs::rename(&log, &kept).map_err(|e| io("renaming", &log, e))?;
    f.log = open_log(&log)?;
    sync_dir(dir)?;
    f.len = 0;
    f.cursor = 0;
    write_cursor(dir, 0)?;
    prune_drained(dir);
    Ok(())
}

/// The drained spool files, oldest first.
pub fn drained_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("drained-") && n.ends_with(".log"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn prune_drained(dir: &Path) {
    let files = drained_files(dir);
    let excess = files.len().saturating_sub(KEEP_DRAINED_FILES);
    for old in &files[..excess] {
        if let Err(e) = std::fs::remove_file(old) {
            tracing::warn!(error = %e, file = %old.display(), "spool: could not prune");
        }
    }
}

/// The event ids recorded in a spool file (for audits and tests).
pub fn ids_in(file: &Path) -> Result<Vec<String>, Error> {
    let bytes = std::fs::read(file).map_err(|e| io("reading", file, e))?;
    Ok(parse_all(&bytes).into_iter().map(|r| r.2).collect())
}

fn parse_all(mut bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    loop {
        let batch = parse_records(bytes);
        if batch.is_empty() {
            return out;
        }
        let used: u64 = batch.iter().map(|r| r.0).sum();
        bytes = &bytes[used as usize..];
        out.extend(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_records_and_leaves_a_partial_one() {
        let buf = b"tally.v1.a id1 {\"x\":1}\ntally.v1.b id2 {\"y\":2}\ntally.v1.c id3 {";
        let recs = parse_records(buf);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].1, "tally.v1.a");
        assert_eq!(recs[1].2, "id2");
        assert_eq!(&recs[1].3[..], b"{\"y\":2}");
        assert_eq!(recs.iter().map(|r| r.0).sum::<u64>(), 46);
    }

    #[test]
    fn payload_may_contain_spaces() {
        let recs = parse_records(b"s id {\"a\": \"b c\"}\n");
        assert_eq!(&recs[0].3[..], b"{\"a\": \"b c\"}");
    }

    #[test]
    fn parse_all_reads_every_record() {
        let mut buf = Vec::new();
        for i in 0..(DRAIN_BATCH_RECORDS * 2 + 3) {
            buf.extend_from_slice(format!("s id{i} {{}}\n").as_bytes());
        }
        let all = parse_all(&buf);
        assert_eq!(all.len(), DRAIN_BATCH_RECORDS * 2 + 3);
        assert_eq!(
            all.last().unwrap().2,
            format!("id{}", DRAIN_BATCH_RECORDS * 2 + 2)
        );
    }

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_cursor(&dir).unwrap(), 0);
        write_cursor(&dir, 4242).unwrap();
        assert_eq!(read_cursor(&dir).unwrap(), 4242);
        std::fs::write(dir.join(CURSOR), "x").unwrap();
        assert!(read_cursor(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

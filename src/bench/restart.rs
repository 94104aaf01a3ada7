//! `tally bench --restart-events N` (issue 5): write a realistic history of N events at full speed
//! through the real pipeline (stream, ledger writer, projections, a live API instance following
//! it), then start a fresh `tally api` as a separate process and measure what an operator waits
//! for after a deploy: time to the first decided admission, the rebuild's rate, the instance's
//! peak RSS, and whether `/v1/quota` for a sample of subjects equals what the live instance said.
//! Then the same without any snapshot (a full rebuild), for comparison.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tally_api::Tokens;

use super::BenchArgs;
use crate::cli::CommonArgs;
use crate::history::{self, HistorySpec};
use crate::stack::{self, Connections, Shutdown};

/// Subjects compared before and after the restart: the hottest keys and as many spread ones.
const SAMPLE_HOT: usize = 200;
/// See [`SAMPLE_HOT`].
const SAMPLE_SPREAD: usize = 200;
/// Longest the fresh instance may take to decide its first admission before the bench gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long after the history is absorbed the bench waits for the snapshot of the head that
/// the quota projection writes once traffic is quiet.
const QUIET_WAIT: Duration = Duration::from_secs(
    tally_projector::runner::QUIET_AFTER.as_secs()
        + tally_projector::quota::QUIET_SNAPSHOT_MIN_GAP.as_secs()
        + 5,
);
/// Longest the pipeline may take to absorb the history.
const ABSORB_TIMEOUT: Duration = Duration::from_secs(7200);

/// One start of a fresh instance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Start {
    /// From spawning the process to its first decided admission (200).
    pub ready_ms: u64,
    /// The snapshot it started from (stream sequence), if any.
    pub snapshot_seq: Option<i64>,
    /// Ledger rows it folded after the snapshot.
    pub rows_folded: u64,
    /// Their rate.
    pub rows_per_s: f64,
    /// Peak resident set of the API process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Whether `/v1/quota` of every sampled subject equals the live instance's.
    pub quota_equal: bool,
    /// The first subject that differed, if one did.
    pub first_difference: Option<String>,
}

/// What the restart measurement found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartResult {
    /// Events in the history.
    pub events: u64,
    /// Keys (active subjects at the leaves; users, teams, customers above them).
    pub keys: usize,
    /// Seconds to write the history (publish + acks).
    pub write_s: f64,
    /// Seconds until the ledger, the projections and the live instance had all of it.
    pub absorb_s: f64,
    /// Subjects compared.
    pub sample_subjects: usize,
    /// From the newest snapshot.
    pub with_snapshot: Start,
    /// From no snapshot at all.
    pub full_rebuild: Option<Start>,
}

/// Write the history, wait for the pipeline, restart, measure.
pub async fn measure(
    args: &BenchArgs,
    common: &CommonArgs,
    conns: &Connections,
    urls: (&str, &str),
) -> anyhow::Result<RestartResult> {
    let spec = HistorySpec::large(args.restart_events);
    let shutdown = Shutdown::default();
    let tokens = Tokens::from_lists("bench-restart-admin", "bench-restart-api");
    let (_, ledger) = stack::spawn_ledger(conns, &shutdown);
    let (workers, mut handles) = stack::spawn_projectors(conns, common, &shutdown);
    handles.push(ledger);
    let (state, tasks) = stack::api_state(conns, common, tokens, workers, &shutdown)?;
    handles.push(tasks);
    let (addr, api) = stack::spawn_api("127.0.0.1:0".parse()?, state, &shutdown).await?;
    handles.push(api);
    let live = format!("http://{addr}");
    let http = reqwest::Client::new();
    let publisher = tally_ledger::Publisher::new(conns.js.clone(), conns.stream.clone());
    eprintln!(
        "bench: writing a history of {} events over {} keys",
        spec.events, spec.keys
    );
    let started = Instant::now();
    let mut shown = 0;
    let stats = history::write(&publisher, &spec, |n| {
        if n >= shown {
            eprintln!(
                "bench:   {n} events ({:.0}/s)",
                n as f64 / started.elapsed().as_secs_f64()
            );
            shown = n + spec.events / 10;
        }
    })
    .await?;
    let write_s = started.elapsed().as_secs_f64();
    absorb(conns, &http, &live).await?;
    let absorb_s = started.elapsed().as_secs_f64() - write_s;
    eprintln!("bench: absorbed in {absorb_s:.1} s after the last publish");
    let sample = sample(&stats.hot_keys, spec.keys);
    let at = (chrono::Utc::now() - chrono::TimeDelta::seconds(30))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let before = quotas(&http, &live, &sample, &at).await?;
    let with_snapshot = fresh_start(common, urls, &http, &sample, &at, &before).await?;
    let full_rebuild = if args.restart_full_rebuild {
        sqlx::query("DELETE FROM quota_snapshots")
            .execute(&conns.pool)
            .await?;
        Some(fresh_start(common, urls, &http, &sample, &at, &before).await?)
    } else {
        None
    };
    shutdown.trigger();
    for h in handles {
        let _ = h.await;
    }
    Ok(RestartResult {
        events: stats.events,
        keys: spec.keys,
        write_s,
        absorb_s,
        sample_subjects: sample.len(),
        with_snapshot,
        full_rebuild,
    })
}

/// Wait until the ledger holds the whole stream, the quota projection has folded it and written a
/// snapshot within one snapshot interval of the head, and the live instance has folded it too.
async fn absorb(conns: &Connections, http: &reqwest::Client, live: &str) -> anyhow::Result<()> {
    let last = tally_ledger::stream::last_sequence(&conns.js, &conns.stream.name).await?;
    let deadline = Instant::now() + ABSORB_TIMEOUT;
    let mut absorbed_at: Option<Instant> = None;
    loop {
        let contiguous = tally_ledger::reader::contiguous_seq(&conns.pool).await?;
        let quota: Option<i64> = sqlx::query_scalar(
            "SELECT last_pos FROM projection_checkpoints WHERE projection = 'quota'",
        )
        .fetch_optional(&conns.pool)
        .await?;
        let snapshot: Option<i64> =
            sqlx::query_scalar("SELECT max(stream_seq) FROM quota_snapshots")
                .fetch_one(&conns.pool)
                .await?;
        let q: Value = http
            .get(format!("{live}/v1/quota?subject=key:k0"))
            .bearer_auth("bench-restart-api")
            .send()
            .await?
            .json()
            .await?;
        let folded = q["as_of"]["stream_seq"].as_u64().unwrap_or(0);
        let quota = quota.unwrap_or(0).max(0) as u64;
        let absorbed = contiguous >= last && quota >= last && folded >= last;
        if absorbed {
            // A deploy after the burst: the quota projection snapshots the head once traffic
            // has been quiet (`QUIET_AFTER`, at most every `QUIET_SNAPSHOT_MIN_GAP`); a restart
            // under load starts from the newest periodic snapshot instead, which is what is
            // left when that does not happen within `QUIET_WAIT`.
            let since = *absorbed_at.get_or_insert_with(Instant::now);
            let at_head = snapshot.is_some_and(|s| s.max(0) as u64 >= last);
            if at_head || (since.elapsed() > QUIET_WAIT && snapshot.is_some()) {
                return Ok(());
            }
        } else {
            absorbed_at = None;
        }
        if Instant::now() > deadline {
            bail!(
                "the pipeline did not absorb the history: ledger {contiguous}, quota {quota}, live {folded} of {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn sample(hot: &[String], keys: usize) -> Vec<String> {
    let mut out: Vec<String> = hot.iter().take(SAMPLE_HOT).cloned().collect();
    let step = (keys / SAMPLE_SPREAD).max(1);
    out.extend((0..keys).step_by(step).map(|k| format!("key:k{k}")));
    out.sort();
    out.dedup();
    out
}

async fn quotas(
    http: &reqwest::Client,
    base: &str,
    subjects: &[String],
    at: &str,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let answers: Vec<anyhow::Result<(String, Value)>> = futures::stream::iter(subjects)
        .map(|s| async move {
            let q: Value = http
                .get(format!("{base}/v1/quota?subject={s}&at={at}"))
                .bearer_auth("bench-restart-api")
                .send()
                .await?
                .json()
                .await?;
            let checks: Vec<Value> = q["checks"]
                .as_array()
                .context("a /v1/quota answer without checks")?
                .iter()
                .map(|c| {
                    json!([
                        c["policy_id"],
                        c["subject"],
                        c["window"],
                        c["limit"],
                        c["used"],
                        c["reserved"]
                    ])
                })
                .collect();
            Ok((
                s.clone(),
                json!({"disabled": q["disabled"], "checks": checks}),
            ))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    answers.into_iter().collect()
}

/// Start `tally api` as a separate process on the bench's stream and database, and measure it.
async fn fresh_start(
    common: &CommonArgs,
    (nats_url, database_url): (&str, &str),
    http: &reqwest::Client,
    sample: &[String],
    at: &str,
    before: &BTreeMap<String, Value>,
) -> anyhow::Result<Start> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("api")
        .env("NATS_URL", nats_url)
        .env("DATABASE_URL", database_url)
        .env("TALLY_STREAM", &common.stream)
        .env("TALLY_PARTITIONS", common.partitions.to_string())
        .env("TALLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("TALLY_API_TOKENS", "bench-restart-api")
        .env("TALLY_ADMIN_TOKENS", "bench-restart-admin")
        .env("TALLY_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting `tally api`")?;
    let pid = child.id().context("the API process has no pid")?;
    let ready_ms = first_admission(http, &base, started).await?;
    let r: Value = http
        .get(format!("{base}/readyz"))
        .send()
        .await?
        .json()
        .await?;
    let startup = &r["checks"]["startup"];
    let after = quotas(http, &base, sample, at).await?;
    let first_difference = after
        .iter()
        .find(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {v} vs {}", before.get(k).cloned().unwrap_or_default()));
    let peak_rss_mib = peak_rss_mib(pid);
    child.kill().await?;
    let start = Start {
        ready_ms,
        snapshot_seq: startup["snapshot"]["stream_seq"].as_i64(),
        rows_folded: startup["rows_folded"].as_u64().unwrap_or(0),
        rows_per_s: startup["rows_per_s"].as_f64().unwrap_or(0.0),
        peak_rss_mib,
        quota_equal: first_difference.is_none() && after.len() == before.len(),
        first_difference,
    };
    eprintln!("bench: fresh instance: {start:?}");
    Ok(start)
}

/// Poll `POST /v1/admit` until an admission is decided (200); ms since `started`.
async fn first_admission(
    http: &reqwest::Client,
    base: &str,
    started: Instant,
) -> anyhow::Result<u64> {
    let mut n = 0u64;
    loop {
        n += 1;
        let r = http
            .post(format!("{base}/v1/admit"))
            .bearer_auth("bench-restart-api")
            .json(&json!({"request_id": format!("restart-probe-{}-{n}", std::process::id()), "subject": "key:restart_probe"}))
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status() == 200) {
            return Ok(started.elapsed().as_millis() as u64);
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("the fresh instance decided no admission within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// VmHWM of a process, MiB (0 when unreadable).
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

//! `tally replay` and `tally audit` (SPEC v2 §8): the ledger is the asset, projections are
//! derived from it. `replay` rebuilds one projection from the first ledger row beside the live
//! one and swaps it in (or, with `--verify`, compares and changes nothing); `audit` recomputes
//! every projection's claimed totals from the ledger alone, in one REPEATABLE READ transaction,
//! and names every difference.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::NaiveDate;
use chrono_tz::Tz;
use clap::Args;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tally_events::quota::QuotaState;
use tally_events::{DailyTotals, Envelope, Subject, Usage, day_of, fold_daily};
use tally_projector::claims::{Claim, DayRange, PoolKey};
use tally_projector::rebuild::{Goal, Outcome, Progress, rebuild};
use tally_projector::registry;
use tally_projector::{Order, Tables};

use crate::cli::CommonArgs;
use crate::stack::projection_context;

/// Ledger rows read per page by the audit's recomputation.
pub const AUDIT_PAGE_ROWS: i64 = 10_000;
/// Differences printed per projection (all are counted; `--json` carries the same bound).
pub const MAX_PRINTED_DIFFERENCES: usize = 50;
/// Plain progress lines (no terminal) at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// `tally replay` settings.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Shared settings (only the database, stream and report zone are used).
    #[command(flatten)]
    pub common: CommonArgs,
    /// The projection to rebuild (a registry name).
    #[arg(long, value_parser = parse_projection)]
    pub projection: &'static str,
    /// Rebuild beside the live tables and compare, changing nothing; exit 1 on any difference.
    #[arg(long)]
    pub verify: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `tally audit` settings.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Shared settings (only the database, stream and report zone are used).
    #[command(flatten)]
    pub common: CommonArgs,
    /// First day audited (UTC for the usage tables, the report's zone for daily_usage).
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last day audited.
    #[arg(long)]
    pub to: Option<NaiveDate>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_projection(text: &str) -> Result<&'static str, String> {
    registry::find(text).map(|e| e.name).ok_or_else(|| {
        format!(
            "unknown projection `{text}`; registered: {}",
            registry::names()
        )
    })
}

/// Connect to Postgres only (replay and audit need no NATS), failing in one line.
pub async fn connect_db(common: &CommonArgs) -> anyhow::Result<PgPool> {
    let url = common
        .database_url
        .clone()
        .context("--database-url / DATABASE_URL is required")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(crate::stack::pg_options(&url)?)
        .await
        .with_context(|| format!("connecting to Postgres at {}", crate::stack::redact(&url)))?;
    let ledger: Option<String> = sqlx::query_scalar("SELECT to_regclass('ledger')::text")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        ledger.is_some(),
        "database {} has no ledger: run `tally migrate` (or `tally up`) first",
        crate::stack::redact(&url)
    );
    Ok(pool)
}

/// Run `tally replay`. Returns the exit code (1: `--verify` found differences).
pub async fn replay(args: ReplayArgs) -> anyhow::Result<i32> {
    let pool = connect_db(&args.common).await?;
    let entry = registry::find(args.projection).context("unknown projection")?;
    let projection = (entry.make)(&projection_context(&pool, &args.common, true));
    let goal = if args.verify {
        Goal::Verify
    } else {
        Goal::Swap
    };
    let bar = ProgressOut::new(args.projection);
    let work = rebuild(&pool, projection, goal, |p: &Progress| bar.show(p));
    // Ctrl-C drops the rebuild: only its rebuild-schema tables are left, dropped by the next.
    let outcome = tokio::select! {
        r = work => r?,
        _ = tokio::signal::ctrl_c() => {
            bar.finish();
            anyhow::bail!("interrupted: the live tables are unchanged");
        }
    };
    bar.finish();
    print_replay(&args, &outcome)?;
    Ok(i32::from(args.verify && outcome.difference_count > 0))
}

fn print_replay(args: &ReplayArgs, o: &Outcome) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(o)?);
        return Ok(());
    }
    let what = if args.verify {
        format!("{} differences from the live tables", o.difference_count)
    } else {
        "swapped in".to_owned()
    };
    println!(
        "replay {}: {} rows in {:.1} s ({:.0} rows/s), checkpoint {}, {what}",
        args.projection,
        o.rows,
        o.rows as f64 / o.rows_per_s.max(1e-9),
        o.rows_per_s,
        o.checkpoint
    );
    for d in o.differences.iter().take(MAX_PRINTED_DIFFERENCES) {
        println!(
            "  DIFFERENCE {} key {}: live {} rebuilt {}",
            d.table,
            d.key,
            d.live.clone().unwrap_or_default(),
            d.rebuilt.clone().unwrap_or_default()
        );
    }
    Ok(())
}

/// A progress bar on a terminal, plain lines every few seconds otherwise.
struct ProgressOut {
    bar: Option<indicatif::ProgressBar>,
    name: &'static str,
    last_line: std::sync::Mutex<Instant>,
}

impl ProgressOut {
    fn new(name: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} rows, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(format!("replay {name}"));
            b
        });
        ProgressOut {
            bar,
            name,
            last_line: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn show(&self, p: &Progress) {
        if let Some(b) = &self.bar {
            b.set_length(p.head.max(p.at).max(0) as u64);
            b.set_position(p.at.max(0) as u64);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = Instant::now();
            eprintln!(
                "replay {}: {} rows, at {} of {}, {:.0} rows/s",
                self.name, p.rows, p.at, p.head, p.rows_per_s
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// One difference the audit found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AuditDifference {
    /// Projection.
    pub projection: String,
    /// Table the claim came from.
    pub table: String,
    /// Key (day, subject, model; or policy, subject, window start).
    pub key: serde_json::Value,
    /// What the projection shows (null: no row).
    pub projection_value: serde_json::Value,
    /// What the ledger says (null: nothing).
    pub ledger_value: serde_json::Value,
}

/// What the audit found for one projection.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProjectionAudit {
    /// Projection.
    pub projection: String,
    /// Its checkpoint (what the recomputation went up to).
    pub checkpoint: Option<i64>,
    /// Keys compared.
    pub compared: u64,
    /// Keys not comparable (a pool whose policy changed shape since it was written).
    pub not_comparable: u64,
    /// Set when the projection could not be audited (not built yet, another version).
    pub skipped: Option<String>,
    /// All differences counted.
    pub difference_count: u64,
    /// The first differences.
    pub differences: Vec<AuditDifference>,
}

/// Run `tally audit`. Returns the exit code (0: everything matches the ledger).
pub async fn audit(args: AuditArgs) -> anyhow::Result<i32> {
    let pool = connect_db(&args.common).await?;
    let range = DayRange {
        from: args.from,
        to: args.to,
    };
    let reports = audit_all(&pool, &args.common, range).await?;
    let bad = reports.iter().any(|r| r.difference_count > 0);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": !bad, "projections": reports}))?
        );
    } else {
        print_audit(&reports);
    }
    Ok(i32::from(bad))
}

fn print_audit(reports: &[ProjectionAudit]) {
    for r in reports {
        if let Some(why) = &r.skipped {
            println!("audit {}: skipped ({why})", r.projection);
            continue;
        }
        println!(
            "audit {}: checkpoint {}, {} keys compared, {} not comparable, {} differences",
            r.projection,
            r.checkpoint.unwrap_or(0),
            r.compared,
            r.not_comparable,
            r.difference_count
        );
        for d in r.differences.iter().take(MAX_PRINTED_DIFFERENCES) {
            println!(
                "  DIFFERENCE {} {} key {}: projection {} ledger {}",
                d.projection, d.table, d.key, d.projection_value, d.ledger_value
            );
        }
    }
    let bad: u64 = reports.iter().map(|r| r.difference_count).sum();
    if bad == 0 {
        println!("audit: every projection matches the ledger");
    } else {
        println!("audit: {bad} differences");
    }
}

/// Audit every registered projection in one REPEATABLE READ, read-only transaction.
pub async fn audit_all(
    pool: &PgPool,
    common: &CommonArgs,
    range: DayRange,
) -> anyhow::Result<Vec<ProjectionAudit>> {
    wait_for_instances(pool, common).await;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let ctx = projection_context(pool, common, false);
    let mut ledger = Recomputed::default();
    // The snapshot covers the lowest sequence: checked first, so the quota fold only advances.
    let snapshot = audit_snapshot(pool, &mut tx, &mut ledger, common).await?;
    let mut out = Vec::new();
    for entry in registry::REGISTRY {
        let p = (entry.make)(&ctx);
        let mut report = ProjectionAudit {
            projection: entry.name.to_owned(),
            ..ProjectionAudit::default()
        };
        let live: Option<(i64, String)> = sqlx::query_as(
            "SELECT last_pos, version FROM projection_checkpoints WHERE projection = $1",
        )
        .bind(entry.name)
        .fetch_optional(&mut *tx)
        .await?;
        match live {
            Some((at, version)) if version == p.version() => report.checkpoint = Some(at),
            Some((_, version)) => {
                report.skipped = Some(format!(
                    "built as version {version:?}, this build makes {:?}",
                    p.version()
                ));
            }
            None => report.skipped = Some("not built".into()),
        }
        if let Some(at) = report.checkpoint {
            let claims = p.claims(&mut tx, Tables::LIVE, range).await?;
            for claim in claims {
                check_claim(
                    &mut tx,
                    &mut ledger,
                    &mut report,
                    (entry.order, at),
                    range,
                    claim,
                )
                .await?;
            }
        }
        out.push(report);
    }
    out.push(snapshot);
    for instance in live_instances(&mut tx, &common.stream).await? {
        out.push(audit_instance(&mut tx, &mut ledger, common, instance).await?);
    }
    tx.commit().await?;
    Ok(out)
}

/// Pools the live quota table lists in calendar, periodic and lifetime windows.
type PoolKeys = Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>)>;

async fn pool_keys(tx: &mut PgConnection) -> anyhow::Result<PoolKeys> {
    Ok(sqlx::query_as(
        "SELECT policy_id, subject, window_start FROM quota_windows \
         WHERE window_key > '-infinity' OR window_start IS NULL ORDER BY 1, 2, 3",
    )
    .fetch_all(&mut *tx)
    .await?)
}

/// A running API instance as registered in `api_instances`.
struct Instance {
    id: uuid::Uuid,
    address: String,
}

async fn live_instances(tx: &mut PgConnection, stream: &str) -> anyhow::Result<Vec<Instance>> {
    let gone = chrono::Duration::from_std(crate::stack::INSTANCE_GONE_AFTER)
        .unwrap_or(chrono::Duration::MAX);
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT instance, address FROM api_instances WHERE stream = $1 AND last_seen > $2 \
         ORDER BY started_at",
    )
    .bind(stream)
    .bind(chrono::Utc::now() - gone)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, address)| Instance { id, address })
        .collect())
}

/// How long the audit waits for the ledger writer to commit what the running instances have
/// already applied, before it takes its snapshot of the database.
const LEDGER_WAIT: Duration = Duration::from_secs(10);

/// Wait (bounded) until the ledger holds every stream sequence each running instance has
/// applied, so that, at rest, the audit's transaction sees what the instances saw.
async fn wait_for_instances(pool: &PgPool, common: &CommonArgs) {
    let token = common
        .admin_tokens
        .split(',')
        .map(str::trim)
        .find(|t| !t.is_empty());
    let (Some(token), Ok(mut conn)) = (token, pool.acquire().await) else {
        return;
    };
    let Ok(instances) = live_instances(&mut conn, &common.stream).await else {
        return;
    };
    let mut highest = 0;
    for i in &instances {
        if let Ok(Some((seq, _))) = read_instance(&i.address, token, &Vec::new()).await {
            highest = highest.max(seq);
        }
    }
    let started = Instant::now();
    while started.elapsed() < LEDGER_WAIT {
        let ledger: Result<i64, _> =
            sqlx::query_scalar("SELECT COALESCE(max(stream_seq), 0) FROM ledger")
                .fetch_one(&mut *conn)
                .await;
        if ledger.map_or(true, |l| l >= highest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Times an instance is asked again when its state moved while it was being read (load).
const INSTANCE_READ_ATTEMPTS: usize = 3;
/// Bound on each call to an instance.
const INSTANCE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One instance's live `used` of every listed pool against the ledger folded up to the stream
/// sequence the instance had applied.
async fn audit_instance(
    tx: &mut PgConnection,
    ledger: &mut Recomputed,
    common: &CommonArgs,
    instance: Instance,
) -> anyhow::Result<ProjectionAudit> {
    let name = format!("instance {} at {}", instance.id, instance.address);
    let mut report = ProjectionAudit {
        projection: name.clone(),
        ..ProjectionAudit::default()
    };
    let Some(token) = common
        .admin_tokens
        .split(',')
        .map(str::trim)
        .find(|t| !t.is_empty())
    else {
        report.skipped = Some("no admin token to ask it with (TALLY_ADMIN_TOKENS)".into());
        return Ok(report);
    };
    let keys = pool_keys(tx).await?;
    let mut read = None;
    for _ in 0..INSTANCE_READ_ATTEMPTS {
        match read_instance(&instance.address, token, &keys).await {
            Ok(Some(r)) => {
                read = Some(r);
                break;
            }
            Ok(None) => continue, // its state moved while being read; again
            Err(e) => {
                record_failure(&mut report, &name, format!("does not answer: {e:#}"));
                return Ok(report);
            }
        }
    }
    let Some((seq, used)) = read else {
        report.skipped = Some(
            "its state kept moving while it was read (under load); audit again at rest".into(),
        );
        return Ok(report);
    };
    let visible: i64 = sqlx::query_scalar("SELECT COALESCE(max(stream_seq), 0) FROM ledger")
        .fetch_one(&mut *tx)
        .await?;
    if seq > visible {
        report.skipped = Some(format!(
            "it has applied stream sequence {seq}, the ledger this audit reads ends at {visible}; audit again"
        ));
        return Ok(report);
    }
    report.checkpoint = Some(seq);
    let ledger = ledger.quota(tx, (Order::StreamSeq, seq)).await?;
    // An instance decides now, so it compacts usage by the wall clock: windows that began more
    // than `--max-backfill` ago are no longer held exactly there (as for the snapshot below).
    let backfill = chrono::Duration::from_std(common.max_backfill).unwrap_or(chrono::Duration::MAX);
    let floor = chrono::Utc::now().checked_sub_signed(backfill);
    for ((policy_id, subject, start), live) in keys.iter().zip(used) {
        if start.is_some_and(|s| floor.is_none_or(|f| s < f)) {
            report.not_comparable += 1;
            continue;
        }
        let recomputed = pool_used(ledger, policy_id, subject, *start);
        let (Some(live), Some(recomputed)) = (live, recomputed) else {
            report.not_comparable += 1;
            continue;
        };
        report.compared += 1;
        if live != recomputed {
            record(
                &mut report,
                AuditDifference {
                    projection: name.clone(),
                    table: "live state".into(),
                    key: json!([policy_id, subject, start]),
                    projection_value: json!(live),
                    ledger_value: json!(recomputed),
                },
            );
        }
    }
    Ok(report)
}

fn record_failure(report: &mut ProjectionAudit, name: &str, why: String) {
    record(
        report,
        AuditDifference {
            projection: name.to_owned(),
            table: "live state".into(),
            key: serde_json::Value::Null,
            projection_value: json!(why),
            ledger_value: serde_json::Value::Null,
        },
    );
}

/// Ask an instance for `used` of every pool, in calls of at most its per-call bound. None when
/// the stream sequence it had applied changed between the first and the last call.
async fn read_instance(
    address: &str,
    token: &str,
    keys: &PoolKeys,
) -> anyhow::Result<Option<(i64, Vec<Option<i64>>)>> {
    let client = reqwest::Client::builder()
        .timeout(INSTANCE_CALL_TIMEOUT)
        .build()?;
    let url = format!("{}/v1/admin/pool-usage", address.trim_end_matches('/'));
    let mut seqs = BTreeSet::new();
    let mut used = Vec::with_capacity(keys.len());
    let chunks: Vec<_> = keys.chunks(tally_api::MAX_POOLS_PER_CALL).collect();
    for chunk in if chunks.is_empty() {
        vec![&[][..]]
    } else {
        chunks
    } {
        let pools: Vec<_> = chunk
            .iter()
            .map(|(p, s, w)| json!({"policy_id": p, "subject": s, "window_start": w}))
            .collect();
        let answer: serde_json::Value = client
            .post(&url)
            .bearer_auth(token)
            .json(&json!({ "pools": pools }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        seqs.insert(answer["as_of"]["stream_seq"].as_i64().unwrap_or(-1));
        let rows = answer["pools"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(
            rows.len() == chunk.len(),
            "answered {} pools of {}",
            rows.len(),
            chunk.len()
        );
        used.extend(rows.iter().map(|r| r["used"].as_i64()));
    }
    Ok((seqs.len() == 1).then(|| (seqs.into_iter().next().unwrap_or(0), used)))
}

/// The newest quota snapshot against the ledger folded up to the sequence it covers: `used` of
/// every pool the live quota table lists, in windows the snapshot still holds exactly (not
/// older than `--max-backfill` before it was taken; compaction may drop what is older).
async fn audit_snapshot(
    pool: &PgPool,
    tx: &mut PgConnection,
    ledger: &mut Recomputed,
    common: &CommonArgs,
) -> anyhow::Result<ProjectionAudit> {
    let mut report = ProjectionAudit {
        projection: "snapshot".into(),
        ..ProjectionAudit::default()
    };
    let loaded = tally_ledger::snapshots::load_newest(pool, &common.stream, u64::MAX).await?;
    let Some((stored, snapshot)) = loaded.snapshot else {
        report.skipped = Some("no snapshot written yet".into());
        return Ok(report);
    };
    report.projection = format!(
        "snapshot {} (stream sequence {})",
        stored.id, stored.stream_seq
    );
    report.checkpoint = Some(stored.stream_seq);
    let keys = pool_keys(tx).await?;
    let ledger = ledger
        .quota(tx, (Order::StreamSeq, stored.stream_seq))
        .await?;
    let backfill = chrono::Duration::from_std(common.max_backfill).unwrap_or(chrono::Duration::MAX);
    let floor = snapshot
        .clock()
        .and_then(|c| c.checked_sub_signed(backfill));
    for (policy_id, subject, start) in keys {
        if start.is_some_and(|s| floor.is_none_or(|f| s < f)) {
            continue;
        }
        let held = pool_used(&snapshot, &policy_id, &subject, start);
        let recomputed = pool_used(ledger, &policy_id, &subject, start);
        let (Some(held), Some(recomputed)) = (held, recomputed) else {
            report.not_comparable += 1;
            continue;
        };
        report.compared += 1;
        if held != recomputed {
            let projection = report.projection.clone();
            record(
                &mut report,
                AuditDifference {
                    projection,
                    table: "quota_snapshots".into(),
                    key: json!([policy_id, subject, start]),
                    projection_value: json!(held),
                    ledger_value: json!(recomputed),
                },
            );
        }
    }
    Ok(report)
}

async fn check_claim(
    tx: &mut PgConnection,
    ledger: &mut Recomputed,
    report: &mut ProjectionAudit,
    position: (Order, i64),
    range: DayRange,
    claim: Claim,
) -> anyhow::Result<()> {
    match claim {
        Claim::UsageByDay { table, tz, rows } => {
            let totals = ledger.daily(tx, position, tz, range).await?;
            compare_usage(report, &table, &rows, totals);
        }
        Claim::PoolUsed { table, rows } => {
            let state = ledger.quota(tx, position).await?;
            compare_pools(report, &table, &rows, state);
        }
    }
    Ok(())
}

/// What the audit recomputed from the ledger, kept between its comparisons: the usage tables'
/// three claims and daily_usage's ask for the same daily totals, and the quota claim, the
/// snapshot and each instance for the quota state at sequences close to one another (a later
/// one continues the fold instead of starting again from the first row).
#[derive(Default)]
struct Recomputed {
    daily: Option<((Order, i64, Tz, DayRange), DailyTotals)>,
    quota: Option<((Order, i64), QuotaState)>,
}

impl Recomputed {
    /// Daily totals (days in `tz`, within `range`) of the ledger rows up to `at`.
    async fn daily<'a>(
        &'a mut self,
        tx: &mut PgConnection,
        (order, at): (Order, i64),
        tz: Tz,
        range: DayRange,
    ) -> anyhow::Result<&'a DailyTotals> {
        let key = (order, at, tz, range);
        if let Some((k, totals)) = self.daily.take()
            && k == key
        {
            return Ok(&self.daily.insert((k, totals)).1);
        }
        let mut totals = DailyTotals::new();
        fold_ledger(tx, order, (0, at), |env| {
            if let tally_events::EventData::UsageSettled(d) = &env.data
                && range.contains(day_of(d.window_at, tz))
            {
                fold_daily(&mut totals, env, tz);
            }
        })
        .await?;
        Ok(&self.daily.insert((key, totals)).1)
    }

    /// The quota state of the ledger rows up to `at`.
    async fn quota<'a>(
        &'a mut self,
        tx: &mut PgConnection,
        (order, at): (Order, i64),
    ) -> anyhow::Result<&'a QuotaState> {
        let (from, mut q) = match self.quota.take() {
            Some(((o, done), q)) if o == order && done <= at => (done, q),
            _ => (0, QuotaState::default()),
        };
        // Closed requests are forgotten as the live state and the quota projection forget
        // them (no total depends on them), so the audit's memory follows the open requests,
        // not the number of requests in the history. Usage is not compacted: the audit compares
        // pools at any window the projections still hold.
        let mut folded = 0u64;
        fold_ledger(tx, order, (from, at), |env| {
            q.apply(env);
            folded += 1;
            if folded.is_multiple_of(crate::whatif::MAINTAIN_EVERY_EVENTS) {
                q.prune();
            }
        })
        .await?;
        Ok(&self.quota.insert(((order, at), q)).1)
    }
}

/// Fold every ledger row after `after` up to `at` (by pos or stream sequence, as the
/// projection counts) in that order, a page at a time, inside the audit's transaction.
pub async fn fold_ledger(
    tx: &mut PgConnection,
    order: Order,
    (after, at): (i64, i64),
    mut f: impl FnMut(&Envelope),
) -> anyhow::Result<u64> {
    let column = match order {
        Order::Pos => "pos",
        Order::StreamSeq => "stream_seq",
    };
    let sql = format!(
        "SELECT {column}, payload::text FROM ledger WHERE {column} > $1 AND {column} <= $2 \
         ORDER BY {column} LIMIT $3"
    );
    let (mut after, mut rows) = (after, 0u64);
    loop {
        let page: Vec<(i64, String)> = sqlx::query_as(&sql)
            .bind(after)
            .bind(at)
            .bind(AUDIT_PAGE_ROWS)
            .fetch_all(&mut *tx)
            .await?;
        let Some((last, _)) = page.last() else {
            return Ok(rows);
        };
        after = *last;
        for (_, text) in &page {
            rows += 1;
            // A row this build cannot decode is left out, as the projections leave it out.
            if let Ok(env) = Envelope::decode(text.as_bytes()) {
                f(&env);
            }
        }
    }
}

fn record(report: &mut ProjectionAudit, d: AuditDifference) {
    report.difference_count += 1;
    if report.differences.len() < MAX_PRINTED_DIFFERENCES {
        report.differences.push(d);
    }
}

fn compare_usage(
    report: &mut ProjectionAudit,
    table: &str,
    claimed: &BTreeMap<tally_events::DayKey, Usage>,
    ledger: &DailyTotals,
) {
    let keys: BTreeSet<_> = claimed.keys().chain(ledger.keys()).collect();
    for key in keys {
        report.compared += 1;
        let (c, l) = (claimed.get(key), ledger.get(key));
        let zero = Usage::default();
        if c.unwrap_or(&zero) != l.unwrap_or(&zero) {
            record(
                report,
                AuditDifference {
                    projection: report.projection.clone(),
                    table: table.to_owned(),
                    key: json!([key.2, key.0, key.1]),
                    projection_value: json!(c),
                    ledger_value: json!(l),
                },
            );
        }
    }
}

fn compare_pools(
    report: &mut ProjectionAudit,
    table: &str,
    claimed: &BTreeMap<PoolKey, i64>,
    state: &QuotaState,
) {
    for ((policy_id, subject, start), used) in claimed {
        let Some(expected) = pool_used(state, policy_id, subject, *start) else {
            report.not_comparable += 1;
            continue;
        };
        report.compared += 1;
        if expected != *used {
            record(
                report,
                AuditDifference {
                    projection: report.projection.clone(),
                    table: table.to_owned(),
                    key: json!([policy_id, subject, start]),
                    projection_value: json!(used),
                    ledger_value: json!(expected),
                },
            );
        }
    }
}

/// `used` of a pool as `state` has it (see [`QuotaState::pool_used`]).
pub fn pool_used(
    state: &QuotaState,
    policy_id: &str,
    subject: &str,
    start: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<i64> {
    state.pool_used(policy_id, &Subject::parse(subject).ok()?, start)
}

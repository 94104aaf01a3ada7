//! `tally bench` (SPEC §11): admit + settle pairs through the real stack (HTTP, JetStream, ledger
//! writer, projectors), and in the same run the machine's raw limits (a trivial HTTP round trip, a
//! raw JetStream publish + ack, a raw batched Postgres insert), so every figure comes with its
//! ratio to what the hardware can do at all.
//!
//! Everything runs against a fresh stream (`BENCH_<id>`) and a fresh database (`tally_bench_<id>`)
//! on the servers `tally up` would use, and both are removed afterwards unless `--keep`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use serde_json::json;
use sqlx::{Connection as _, PgPool};
use tally_api::Tokens;

mod config;
mod restart;

pub use config::{BenchConfig, Shape};

pub use restart::{RestartResult, Start};

use crate::cli::{CommonArgs, parse_duration};
use crate::services::{Services, ServicesMode, ServicesOptions};
use crate::stack::{self, Connections, Shutdown};

/// Upper bound on concurrent clients: each is a task with a keep-alive connection; beyond this
/// the client side, not Tally, is what gets measured on a small machine.
pub const MAX_CLIENTS: usize = 4096;
/// Rows per statement in the raw Postgres baseline, the ledger writer's batch size.
const RAW_PG_BATCH_ROWS: usize = 1000;
/// Payload of the raw JetStream baseline: about an admission event's encoded size.
const RAW_PAYLOAD_BYTES: usize = 420;
/// How often projection lag is sampled while the load runs.
const LAG_SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Bound on waiting for the ledger and projections to absorb the load after it stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the freshness probe settles one request while the load runs.
const FRESHNESS_PROBE_EVERY: Duration = Duration::from_millis(50);
/// How often the probe polls `/v1/quota` until the settlement shows.
const FRESHNESS_POLL: Duration = Duration::from_millis(1);
/// A settlement not visible after this is recorded at this value (and counted as missed).
const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(5);
/// The probe's own subject, with a lifetime cost policy so `/v1/quota` shows its usage.
const PROBE_SUBJECT: &str = "key:bench_freshness_probe";

/// `tally bench` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Shared settings (`--nats-url`, `--database-url`; the stream and HTTP address are the
    /// bench's own).
    #[command(flatten)]
    pub common: CommonArgs,
    /// Concurrent HTTP clients, each doing admit then settle in a loop.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Measured load duration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measuring (connections, caches, JIT-free but not cold).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Duration of each raw baseline.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub baseline_duration: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the bench stream and database for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Where private NATS/Postgres live if none answer (as for `tally up`).
    #[arg(long, default_value = "./.tally")]
    pub data_dir: std::path::PathBuf,
    /// Also measure a restart over a realistic history of this many events (0: skip): write it
    /// at full speed, start a fresh `tally api` process, and report time to its first decided
    /// admission, its rebuild rate, its peak RSS, and whether its quotas equal the live ones.
    #[arg(long, default_value_t = 0)]
    pub restart_events: u64,
    /// With `--restart-events`: also start once with every snapshot deleted (a full rebuild).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub restart_full_rebuild: bool,
    /// Skip the load measurement (baselines and, with `--restart-events`, the restart only).
    #[arg(long)]
    pub skip_load: bool,
    /// `realistic`: the configuration of SPEC v2 §11 (hierarchy, groups, model groups, policies
    /// of every window kind, credits; skewed traffic, streamed settlements); `empty`: 32 keys,
    /// no configuration.
    #[arg(long, value_enum, default_value = "realistic")]
    pub config: BenchConfig,
    /// Keys of the realistic configuration (users, teams, customers: a tenth each level down).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Open loop after the closed one: requests at this share of the measured saturation rate,
    /// latency counted from each request's scheduled send time (no coordinated omission).
    #[arg(long, default_value_t = 0.5)]
    pub open_loop_share: f64,
    /// Duration of the open loop (0: skip it).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub open_loop_duration: Duration,
}

/// Most keys of the realistic configuration (its set-up is one admin write per subject).
pub const MAX_KEYS: usize = 1_000_000;
/// Admin writes of the set-up in flight at once.
const SETUP_CONCURRENCY: usize = 16;
/// Requests of the open loop in flight at once; a request waiting for a slot is late, and its
/// lateness counts in its latency (measured from the schedule).
const OPEN_LOOP_IN_FLIGHT: usize = 4_096;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: u64,
    /// 99th.
    pub p99_us: u64,
    /// 99.9th.
    pub p999_us: u64,
    /// Worst.
    pub max_us: u64,
}

impl Percentiles {
    fn of(mut samples: Vec<u64>) -> Percentiles {
        samples.sort_unstable();
        Percentiles {
            p50_us: nearest_rank(&samples, 0.50),
            p99_us: nearest_rank(&samples, 0.99),
            p999_us: nearest_rank(&samples, 0.999),
            max_us: nearest_rank(&samples, 1.0),
        }
    }
}

/// The nearest-rank `q` quantile of sorted `samples` (the default value when there are none).
fn nearest_rank<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// The raw limits measured in this run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Baselines {
    /// Trivial HTTP round trips per second (same client count, same HTTP stack).
    pub http_requests_per_s: f64,
    /// Its latency.
    pub http_latency: Percentiles,
    /// JetStream publishes acked per second (same concurrency, event-sized payload).
    pub jetstream_publishes_per_s: f64,
    /// Ack latency.
    pub jetstream_ack_latency: Percentiles,
    /// Rows per second inserted in batches of 1000 by one connection (as the ledger writer does).
    pub postgres_rows_per_s: f64,
}

/// What the load achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadResult {
    /// Admit + settle pairs completed per second in the measured window.
    pub pairs_per_s: f64,
    /// HTTP requests per second (two per pair).
    pub http_requests_per_s: f64,
    /// Events published per second (two per pair).
    pub events_per_s: f64,
    /// `POST /v1/admit` latency.
    pub admission_latency: Percentiles,
    /// `POST /v1/settle` latency.
    pub settle_latency: Percentiles,
    /// Non-2xx answers and transport errors during the measured window.
    pub errors: u64,
    /// Time from an event's occurrence to its ledger row (recorded_at − occurred_at).
    pub ledger_lag_ms: LagMs,
    /// Age of the oldest ledger row the usage projection had not folded, sampled every 100 ms.
    pub projection_lag_ms: LagMs,
    /// Freshness (SPEC §10.6): from a settlement's 202 on instance A until `/v1/quota` on a
    /// second instance B (same stream, its own tail) shows it, under the load.
    pub freshness_other_instance_ms: LagMs,
    /// The same on the instance that took the settlement (its state is updated before the 202).
    pub freshness_same_instance_ms: LagMs,
    /// Probe settlements not visible on B within 5 s.
    pub freshness_missed: u64,
    /// After the load stopped: until every event was in the ledger and projected.
    pub drain_ms: u64,
    /// Ledger rows written by the run (warm-up included).
    pub ledger_rows: i64,
    /// Peak resident set of this process (stack and clients together), MiB.
    pub peak_rss_mib: f64,
}

/// Lag percentiles in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LagMs {
    /// Median.
    pub p50: f64,
    /// 99th.
    pub p99: f64,
    /// Worst.
    pub max: f64,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Concurrent clients.
    pub clients: usize,
    /// Measured seconds.
    pub duration_s: f64,
    /// Raw limits.
    pub baselines: Baselines,
    /// The stack under load (absent with `--skip-load`).
    pub load: Option<LoadResult>,
    /// HTTP requests/s as a fraction of the trivial HTTP round trip.
    pub ratio_http: Option<f64>,
    /// Events/s as a fraction of raw JetStream publish + ack.
    pub ratio_jetstream: Option<f64>,
    /// Ledger rows/s (two per pair) as a fraction of the raw batched insert.
    pub ratio_postgres: Option<f64>,
    /// The restart measurement (with `--restart-events`).
    pub restart: Option<RestartResult>,
    /// `tally replay` of every registered projection over the load's ledger (absent with
    /// `--skip-load`).
    pub replay: Vec<ReplayResult>,
    /// `realistic` or `empty`.
    pub config: BenchConfig,
    /// The realistic configuration's shape.
    pub shape: Option<Shape>,
    /// The open loop (absent with `--skip-load` or a zero duration).
    pub open_loop: Option<OpenLoop>,
    /// Ledger bytes per event: table, indexes and TOAST (`pg_total_relation_size`) / rows.
    pub ledger_bytes_per_event: Option<f64>,
    /// Freshness on a second instance (copied from the load).
    pub freshness_other_instance_ms: Option<LagMs>,
    /// Peak RSS of the bench process (copied from the load).
    pub peak_rss_mib: Option<f64>,
    /// `tally replay` rate of the usage projection.
    pub replay_rows_per_s: Option<f64>,
    /// Time to the first decided admission of a restart from the newest snapshot.
    pub restart_ready_ms: Option<u64>,
}

/// Latency at a fixed offered rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpenLoop {
    /// Offered admit + settle pairs per second.
    pub rate_per_s: f64,
    /// Pairs completed.
    pub completed: u64,
    /// Failed requests.
    pub errors: u64,
    /// `POST /v1/admit` latency from its scheduled send time.
    pub admission_latency: Percentiles,
}

/// One projection rebuilt from the first ledger row and swapped in, as `tally replay` does.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayResult {
    /// Projection.
    pub projection: String,
    /// Ledger rows folded.
    pub rows: u64,
    /// Rate.
    pub rows_per_s: f64,
    /// As a fraction of the raw batched Postgres insert of the same run.
    pub ratio_postgres: f64,
}

/// Rebuild every registered projection over the bench's ledger, timed.
async fn measure_replay(
    common: &CommonArgs,
    conns: &Connections,
    raw_rows_per_s: f64,
) -> anyhow::Result<Vec<ReplayResult>> {
    let ctx = stack::projection_context(&conns.pool, common, true);
    let mut out = Vec::new();
    for entry in tally_projector::registry::REGISTRY {
        eprintln!("bench: replay {}", entry.name);
        let p = (entry.make)(&ctx);
        let o = tally_projector::rebuild::rebuild(
            &conns.pool,
            p,
            tally_projector::rebuild::Goal::Swap,
            |_: &tally_projector::rebuild::Progress| {},
        )
        .await?;
        out.push(ReplayResult {
            projection: entry.name.to_owned(),
            rows: o.rows,
            rows_per_s: o.rows_per_s,
            ratio_postgres: o.rows_per_s / raw_rows_per_s.max(1e-9),
        });
    }
    Ok(out)
}

/// Run the benchmark and print the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.clients > MAX_CLIENTS {
        bail!("--clients must be between 1 and {MAX_CLIENTS}");
    }
    if args.duration.is_zero() || args.baseline_duration.is_zero() {
        bail!("--duration and --baseline-duration must be above zero");
    }
    if args.keys == 0 || args.keys > MAX_KEYS {
        bail!("--keys must be between 1 and {MAX_KEYS}");
    }
    if !(args.open_loop_share > 0.0 && args.open_loop_share <= 1.0) {
        bail!("--open-loop-share must be above 0 and at most 1");
    }
    let mut services = Services::ensure(&ServicesOptions {
        mode: ServicesMode::Auto,
        nats_url: args.common.nats_url.clone(),
        database_url: args.common.database_url.clone(),
        data_dir: args.data_dir.clone(),
        install_missing: false,
    })
    .await?;
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let db_name = format!("tally_bench_{id}");
    let db_url = with_database(&services.database_url, &db_name)?;
    create_database(&services.database_url, &db_name).await?;
    let mut common = args.common.clone();
    common.stream = format!("BENCH_{}", id.to_uppercase());
    common.stream_max_age = Duration::from_secs(3600);
    let result = bench_on(&args, &common, &services.nats_url, &db_url).await;
    if !args.keep {
        cleanup(&services, &common, &db_name).await;
    } else {
        eprintln!("kept stream {} and database {db_name}", common.stream);
    }
    services.stop().await?;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn bench_on(
    args: &BenchArgs,
    common: &CommonArgs,
    nats_url: &str,
    db_url: &str,
) -> anyhow::Result<Report> {
    let conns = stack::connect(common, nats_url, db_url).await?;
    eprintln!("bench: raw baselines, {:?} each", args.baseline_duration);
    let baselines = raw_baselines(args, &conns).await?;
    let load = if args.skip_load {
        None
    } else {
        eprintln!(
            "bench: {} clients, {:?} warm-up, {:?} measured",
            args.clients, args.warmup, args.duration
        );
        Some(run_load(args, common, &conns).await?)
    };
    let restart = if args.restart_events > 0 {
        // Its own stream and database, so the load's rows are not part of the history.
        let mut c = common.clone();
        c.stream = format!("{}_R", common.stream);
        let db = format!("{}_r", db_name_of(db_url)?);
        create_database(db_url, &db).await?;
        let url = with_database(db_url, &db)?;
        let rconns = stack::connect(&c, nats_url, &url).await?;
        let r = restart::measure(args, &c, &rconns, (nats_url, &url)).await;
        rconns.pool.close().await;
        if args.keep {
            eprintln!("kept stream {} and database {db}", c.stream);
        } else {
            let _ = rconns.js.delete_stream(&c.stream).await;
            let _ = rconns.js.delete_stream(rconns.stream.dead_letter().0).await;
            drop_database(db_url, &db).await;
        }
        Some(r?)
    } else {
        None
    };
    let replay = match &load {
        Some(_) => measure_replay(common, &conns, baselines.postgres_rows_per_s).await?,
        None => Vec::new(),
    };
    let (load, open_loop) = match load {
        Some((l, o)) => (Some(l), o),
        None => (None, None),
    };
    let ratio = |f: fn(&LoadResult, &Baselines) -> f64| load.as_ref().map(|l| f(l, &baselines));
    let ledger_bytes_per_event = match &load {
        Some(_) => Some(ledger_bytes_per_event(&conns.pool).await?),
        None => None,
    };
    Ok(Report {
        config: args.config,
        shape: (args.config == BenchConfig::Realistic).then(|| Shape::of(args.keys)),
        open_loop,
        ledger_bytes_per_event,
        freshness_other_instance_ms: load.as_ref().map(|l| l.freshness_other_instance_ms),
        peak_rss_mib: load.as_ref().map(|l| l.peak_rss_mib),
        replay_rows_per_s: replay
            .iter()
            .find(|r| r.projection == "usage")
            .map(|r| r.rows_per_s),
        restart_ready_ms: restart.as_ref().map(|r| r.with_snapshot.ready_ms),
        clients: args.clients,
        duration_s: args.duration.as_secs_f64(),
        ratio_http: ratio(|l, b| l.http_requests_per_s / b.http_requests_per_s),
        ratio_jetstream: ratio(|l, b| l.events_per_s / b.jetstream_publishes_per_s),
        ratio_postgres: ratio(|l, b| l.events_per_s / b.postgres_rows_per_s),
        baselines,
        load,
        restart,
        replay,
    })
}

async fn raw_baselines(args: &BenchArgs, conns: &Connections) -> anyhow::Result<Baselines> {
    let (http_requests_per_s, http_latency) = raw_http(args).await?;
    let (jetstream_publishes_per_s, jetstream_ack_latency) = raw_jetstream(args, conns).await?;
    let postgres_rows_per_s = raw_postgres(args, &conns.pool).await?;
    Ok(Baselines {
        http_requests_per_s,
        http_latency,
        jetstream_publishes_per_s,
        jetstream_ack_latency,
        postgres_rows_per_s,
    })
}

/// Run `clients` copies of `op` for `duration`, returning completed ops and their latencies.
async fn closed_loop<F, Fut>(clients: usize, duration: Duration, op: F) -> (u64, Vec<u64>)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let deadline = Instant::now() + duration;
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (op, counter) = (op.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if op(n).await {
                    lat.push(t.elapsed().as_micros() as u64);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all.len() as u64, all)
}

async fn raw_http(args: &BenchArgs) -> anyhow::Result<(f64, Percentiles)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = client(args.clients)?;
    let url = format!("http://{addr}/");
    let (n, lat) = closed_loop(args.clients, args.baseline_duration, move |_| {
        let (http, url) = (http.clone(), url.clone());
        async move { matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) }
    })
    .await;
    server.abort();
    Ok((
        n as f64 / args.baseline_duration.as_secs_f64(),
        Percentiles::of(lat),
    ))
}

async fn raw_jetstream(
    args: &BenchArgs,
    conns: &Connections,
) -> anyhow::Result<(f64, Percentiles)> {
    let name = format!("{}_RAW", conns.stream.name);
    let subject = format!("bench-raw.{}", name.to_lowercase());
    conns
        .js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .context("creating the raw baseline stream")?;
    let js = conns.js.clone();
    let payload = bytes_of(RAW_PAYLOAD_BYTES);
    let (n, lat) = closed_loop(args.clients, args.baseline_duration, move |i| {
        let (js, subject, payload) = (js.clone(), subject.clone(), payload.clone());
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
            match js
                .publish_with_headers(format!("{subject}.{}", i % 16), headers, payload)
                .await
            {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    let _ = conns.js.delete_stream(&name).await;
    Ok((
        n as f64 / args.baseline_duration.as_secs_f64(),
        Percentiles::of(lat),
    ))
}

fn bytes_of(len: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; len])
}

/// The payload the raw insert stores: a `usage.settled` envelope as the gateway sends one (the
/// most common event, 681 bytes), as text, cast to `json` by Postgres as the ledger writer's is.
/// A toy payload would measure a row the ledger never holds.
fn raw_payload() -> String {
    json!({
        "id": "01a2116b-387c-7076-b938-7fa863599f9c", "type": "usage.settled", "schema": 1,
        "occurred_at": "2026-11-25T06:36:09.212152284Z", "request_id": "bf114f4c9-0-1",
        "subject": "key:k0",
        "data": {
            "seq": 0, "chain": ["key:k0", "user:u0", "team:t0", "customer:c0"], "final": true,
            "model": "claude-3-haiku", "model_group": "claude", "success": true,
            "usage": {"requests": 1, "input_tokens": 480, "output_tokens": 120, "cost": 1830, "credits": 1},
            "window_at": "2026-11-25T06:36:09.206569911Z",
            "admission_id": "01a2116b-3876-7049-9a27-6bf6172d5d88",
            "settlement_id": "bf114f4c9-0-1:0", "matched_admission": true,
            "counted_in_key_global": true, "counted_in_user_global": false
        }
    })
    .to_string()
}

/// Batched inserts of ledger-shaped rows (uuid key, timestamps, amounts, json payload) by one
/// connection in one transaction per batch: what the ledger writer does, minus decoding.
async fn raw_postgres(args: &BenchArgs, pool: &PgPool) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE bench_raw (id uuid PRIMARY KEY, occurred_at timestamptz NOT NULL, \
         recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(), subject text NOT NULL, \
         chain text[] NOT NULL, cost bigint NOT NULL, input_tokens bigint NOT NULL, payload json NOT NULL)",
    )
    .execute(pool)
    .await?;
    let payload = raw_payload();
    let deadline = Instant::now() + args.baseline_duration;
    let started = Instant::now();
    let mut rows = 0u64;
    while Instant::now() < deadline {
        let ids: Vec<uuid::Uuid> = (0..RAW_PG_BATCH_ROWS)
            .map(|_| uuid::Uuid::now_v7())
            .collect();
        let payloads = vec![payload.clone(); RAW_PG_BATCH_ROWS];
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO bench_raw (id, occurred_at, subject, chain, cost, input_tokens, payload) \
             SELECT id, now(), 'key:k', ARRAY['key:k'], 1, 2, p::json FROM UNNEST($1::uuid[], $2::text[]) AS t(id, p) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&payloads)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        rows += RAW_PG_BATCH_ROWS as u64;
    }
    sqlx::query("DROP TABLE bench_raw").execute(pool).await?;
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

fn client(clients: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .tcp_nodelay(true)
        .build()?)
}

/// Shared between the load's clients.
struct LoadCtx {
    http: reqwest::Client,
    base: String,
    /// The second API instance the freshness probe reads from.
    observer: String,
    token: String,
    admin_token: String,
    measuring: AtomicBool,
    errors: AtomicU64,
    run: String,
    config: BenchConfig,
    keys: usize,
    /// HTTP requests of measured pairs (a streamed pair makes more than two).
    requests: AtomicU64,
}

/// Write the realistic configuration through the admin API, a level at a time (parents
/// before children), a few writes in flight.
async fn set_up(ctx: &LoadCtx, shape: Shape) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let started = Instant::now();
    let writes = config::admin_writes(shape);
    let level = |path: &str| -> usize {
        [
            "/v1/model-groups/",
            "/v1/subjects/customer:",
            "/v1/subjects/team:",
            "/v1/subjects/user:",
            "/v1/subjects/key:",
            "/v1/policies/",
            "/v1/credits/",
        ]
        .iter()
        .position(|p| path.starts_with(p))
        .unwrap_or(7)
    };
    let n = writes.len();
    for l in 0..=7 {
        let batch: Vec<_> = writes.iter().filter(|(_, p, _)| level(p) == l).collect();
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(batch)
            .map(|(method, path, body)| admin_write(ctx, method, path, body))
            .buffer_unordered(SETUP_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    }
    eprintln!(
        "bench: realistic configuration ({} keys, {} users, {} teams, {} customers): {n} admin writes in {:.1} s",
        shape.keys,
        shape.users,
        shape.teams,
        shape.customers,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Attempts of one set-up write (a 409 from a racing config write is retried).
const SETUP_ATTEMPTS: usize = 20;

async fn admin_write(
    ctx: &LoadCtx,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    for _ in 0..SETUP_ATTEMPTS {
        let r = ctx
            .http
            .request(method.clone(), format!("{}{path}", ctx.base))
            .bearer_auth(&ctx.admin_token)
            .json(body)
            .send()
            .await?;
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        if status != reqwest::StatusCode::CONFLICT {
            bail!("set-up write {path} refused: {status} {}", r.text().await?);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("set-up write {path} kept conflicting")
}

/// One admit + settle pair of the traffic (a streamed one settles in chunks). Returns the
/// admission's latency and the settlement's (all chunks), or None on a failure.
async fn pair(ctx: &LoadCtx, r: config::Request, request_id: &str) -> Option<(Duration, Duration)> {
    let admit = json!({"request_id": request_id, "subject": r.subject, "model": r.model,
        "estimate": {"cost": 2000, "input_tokens": 500}});
    let t = Instant::now();
    let admitted = post(ctx, "/v1/admit", &admit).await;
    let a = t.elapsed();
    if !admitted {
        return None;
    }
    let t = Instant::now();
    let chunks = if r.streamed { config::STREAM_CHUNKS } else { 1 };
    if ctx.measuring.load(Ordering::Relaxed) {
        ctx.requests.fetch_add(1 + chunks, Ordering::Relaxed);
    }
    for seq in 0..chunks {
        let settle = json!({"request_id": request_id, "seq": seq, "final": seq + 1 == chunks,
            "usage": {"input_tokens": 480 / chunks, "output_tokens": 120 / chunks, "cost": 1830 / chunks}});
        if !post(ctx, "/v1/settle", &settle).await {
            return None;
        }
    }
    Some((a, t.elapsed()))
}

/// Requests at `rate` pairs/s for `duration`, each sent at its scheduled time (or as soon as a
/// slot frees), its admission latency counted from the schedule.
async fn open_loop(ctx: Arc<LoadCtx>, rate: f64, duration: Duration) -> OpenLoop {
    let slots = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_IN_FLIGHT));
    let total = (rate * duration.as_secs_f64()).floor().max(1.0) as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut traffic = config::Traffic::new(usize::MAX, ctx.keys, ctx.config);
    for i in 0..total {
        let request = traffic.next();
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate.max(1e-9));
        tokio::time::sleep_until(scheduled).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let rid = format!("o{}-{i}", ctx.run);
            let late = tokio::time::Instant::now().duration_since(scheduled);
            pair(&ctx, request, &rid).await.map(|(a, _)| a + late)
        }));
    }
    let (mut admit_us, mut errors) = (Vec::new(), 0);
    for t in tasks {
        match t.await {
            Ok(Some(a)) => admit_us.push(a.as_micros() as u64),
            _ => errors += 1,
        }
    }
    OpenLoop {
        rate_per_s: rate,
        completed: admit_us.len() as u64,
        errors,
        admission_latency: Percentiles::of(admit_us),
    }
}

/// Ledger bytes per event: table, indexes and TOAST over rows.
async fn ledger_bytes_per_event(pool: &PgPool) -> anyhow::Result<f64> {
    let (bytes, rows): (i64, i64) =
        sqlx::query_as("SELECT pg_total_relation_size('ledger'), (SELECT count(*) FROM ledger)")
            .fetch_one(pool)
            .await?;
    Ok(bytes as f64 / rows.max(1) as f64)
}

async fn run_load(
    args: &BenchArgs,
    common: &CommonArgs,
    conns: &Connections,
) -> anyhow::Result<(LoadResult, Option<OpenLoop>)> {
    let token = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin_token = format!("bench_admin_{}", uuid::Uuid::new_v4().simple());
    let tokens = Tokens::from_lists(&admin_token, &token);
    let shutdown = Shutdown::default();
    let (ledger_stats, ledger) = stack::spawn_ledger(conns, &shutdown);
    let (mut workers, mut handles) = stack::spawn_projectors(conns, common, &shutdown);
    workers.ledger = Some(ledger_stats);
    handles.push(ledger);
    let (state, tasks) = stack::api_state(conns, common, tokens.clone(), workers, &shutdown)?;
    handles.push(tasks);
    let (addr, api) = stack::spawn_api("127.0.0.1:0".parse()?, state, &shutdown).await?;
    handles.push(api);
    // A second instance on the same stream, only read by the freshness probe.
    let (observer, observer_tasks) = stack::api_state(
        conns,
        common,
        tokens,
        tally_api::WorkerStats::default(),
        &shutdown,
    )?;
    handles.push(observer_tasks);
    let (observer_addr, observer_api) =
        stack::spawn_api("127.0.0.1:0".parse()?, observer, &shutdown).await?;
    handles.push(observer_api);
    let ctx = Arc::new(LoadCtx {
        http: client(args.clients)?,
        base: format!("http://{addr}"),
        observer: format!("http://{observer_addr}"),
        token,
        admin_token,
        measuring: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        config: args.config,
        keys: args.keys,
        requests: AtomicU64::new(0),
    });
    wait_ready(&ctx).await?;
    if args.config == BenchConfig::Realistic {
        set_up(&ctx, Shape::of(args.keys)).await?;
    }
    let result = match drive(args, conns, ctx.clone()).await {
        Ok(load) => {
            let open = if args.open_loop_duration.is_zero() {
                None
            } else {
                let rate = load.pairs_per_s * args.open_loop_share;
                eprintln!(
                    "bench: open loop at {rate:.0} pairs/s for {:?}",
                    args.open_loop_duration
                );
                Some(open_loop(ctx.clone(), rate, args.open_loop_duration).await)
            };
            wait_drained(conns).await.map(|_| (load, open))
        }
        Err(e) => Err(e),
    };
    shutdown.trigger();
    for h in handles {
        let _ = h.await;
    }
    result
}

async fn wait_ready(ctx: &LoadCtx) -> anyhow::Result<()> {
    let start = Instant::now();
    for base in [&ctx.base, &ctx.observer] {
        loop {
            let r = ctx.http.get(format!("{base}/readyz")).send().await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the bench stack did not become ready: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let policy = json!({"subject": PROBE_SUBJECT, "metric": "cost", "limit": 1_000_000_000_000i64,
        "window": {"kind": "lifetime"}});
    let r = ctx
        .http
        .put(format!("{}/v1/policies/bench-freshness", ctx.base))
        .bearer_auth(&ctx.admin_token)
        .json(&policy)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("the probe policy was refused: {}", r.text().await?);
    }
    Ok(())
}

/// The probe subject's lifetime cost used, as `/v1/quota` on `base` shows it.
async fn probe_used(ctx: &LoadCtx, base: &str) -> Option<i64> {
    let r = ctx
        .http
        .get(format!("{base}/v1/quota?subject={PROBE_SUBJECT}"))
        .bearer_auth(&ctx.token)
        .send()
        .await
        .ok()?;
    let q: serde_json::Value = r.json().await.ok()?;
    q["checks"][0]["used"].as_i64()
}

/// Until `stop`: every 50 ms settle one unit of direct usage on A, then time how long until
/// `/v1/quota` shows it on A and on B. Returns (same instance µs, other instance µs, missed).
async fn freshness_probe(ctx: Arc<LoadCtx>, stop: Instant) -> (Vec<u64>, Vec<u64>, u64) {
    let (mut same, mut other, mut missed) = (Vec::new(), Vec::new(), 0);
    let mut expected = 0i64;
    while Instant::now() < stop {
        tokio::time::sleep(FRESHNESS_PROBE_EVERY).await;
        expected += 1;
        let body = json!({"request_id": format!("probe-{}-{expected}", ctx.run),
            "subject": PROBE_SUBJECT, "usage": {"cost": 1}});
        if !post(&ctx, "/v1/settle", &body).await {
            expected -= 1;
            continue;
        }
        let settled = Instant::now();
        for (base, out) in [(&ctx.base, &mut same), (&ctx.observer, &mut other)] {
            loop {
                if probe_used(&ctx, base).await.is_some_and(|u| u >= expected) {
                    out.push(settled.elapsed().as_micros() as u64);
                    break;
                }
                if settled.elapsed() > FRESHNESS_TIMEOUT {
                    out.push(FRESHNESS_TIMEOUT.as_micros() as u64);
                    missed += 1;
                    break;
                }
                tokio::time::sleep(FRESHNESS_POLL).await;
            }
        }
    }
    (same, other, missed)
}

/// One client: admit then settle, recording both latencies while measuring.
async fn client_loop(ctx: Arc<LoadCtx>, client: usize, stop: Instant) -> (u64, Vec<u64>, Vec<u64>) {
    let (mut pairs, mut admit_us, mut settle_us) = (0u64, Vec::new(), Vec::new());
    let mut traffic = config::Traffic::new(client, ctx.keys, ctx.config);
    let mut i = 0u64;
    while Instant::now() < stop {
        i += 1;
        let request_id = format!("b{}-{client}-{i}", ctx.run);
        let done = pair(&ctx, traffic.next(), &request_id).await;
        if ctx.measuring.load(Ordering::Relaxed) && Instant::now() < stop {
            match done {
                Some((a, s)) => {
                    pairs += 1;
                    admit_us.push(a.as_micros() as u64);
                    settle_us.push(s.as_micros() as u64);
                }
                None => {
                    ctx.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    (pairs, admit_us, settle_us)
}

async fn post(ctx: &LoadCtx, path: &str, body: &serde_json::Value) -> bool {
    let r = ctx
        .http
        .post(format!("{}{path}", ctx.base))
        .bearer_auth(&ctx.token)
        .json(body)
        .send()
        .await;
    match r {
        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
        Ok(r) => {
            tracing::warn!(status = %r.status(), path, "bench request failed");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, path, "bench request failed");
            false
        }
    }
}

async fn drive(
    args: &BenchArgs,
    conns: &Connections,
    ctx: Arc<LoadCtx>,
) -> anyhow::Result<LoadResult> {
    let stop = Instant::now() + args.warmup + args.duration;
    let tasks: Vec<_> = (0..args.clients)
        .map(|c| tokio::spawn(client_loop(ctx.clone(), c, stop)))
        .collect();
    tokio::time::sleep(args.warmup).await;
    ctx.measuring.store(true, Ordering::Relaxed);
    let measure_start = chrono::Utc::now();
    let probe = tokio::spawn(freshness_probe(ctx.clone(), stop));
    let lag_samples = sample_projection_lag(&conns.pool, stop).await;
    let (same_us, other_us, freshness_missed) = probe.await?;
    let (mut pairs, mut admit_us, mut settle_us) = (0, Vec::new(), Vec::new());
    for t in tasks {
        let (p, a, s) = t.await?;
        pairs += p;
        admit_us.extend(a);
        settle_us.extend(s);
    }
    let measure_end = chrono::Utc::now();
    let drained = Instant::now();
    let ledger_rows = wait_drained(conns).await?;
    let drain_ms = drained.elapsed().as_millis() as u64;
    let secs = args.duration.as_secs_f64();
    let pairs_per_s = pairs as f64 / secs;
    // Every admit and every settle chunk is one HTTP request and one event.
    let requests_per_s = ctx.requests.load(Ordering::Relaxed) as f64 / secs;
    Ok(LoadResult {
        pairs_per_s,
        http_requests_per_s: requests_per_s,
        events_per_s: requests_per_s,
        admission_latency: Percentiles::of(admit_us),
        settle_latency: Percentiles::of(settle_us),
        errors: ctx.errors.load(Ordering::Relaxed),
        ledger_lag_ms: ledger_lag(&conns.pool, measure_start, measure_end).await?,
        projection_lag_ms: lag_of(lag_samples),
        freshness_other_instance_ms: lag_of(other_us.iter().map(|u| *u as f64 / 1e3).collect()),
        freshness_same_instance_ms: lag_of(same_us.iter().map(|u| *u as f64 / 1e3).collect()),
        freshness_missed,
        drain_ms,
        ledger_rows,
        peak_rss_mib: own_peak_rss_mib(),
    })
}

/// Age of the oldest ledger row past the usage projection's checkpoint, every 100 ms until `stop`.
async fn sample_projection_lag(pool: &PgPool, stop: Instant) -> Vec<f64> {
    let mut samples = Vec::new();
    while Instant::now() < stop {
        let lag: Result<Option<f64>, _> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - l.recorded_at)::float8 * 1000 \
             FROM ledger l WHERE l.pos > COALESCE((SELECT last_pos FROM projection_checkpoints \
             WHERE projection = 'usage'), 0) ORDER BY l.pos LIMIT 1",
        )
        .fetch_optional(pool)
        .await
        .map(Option::flatten);
        if let Ok(lag) = lag {
            samples.push(lag.unwrap_or(0.0));
        }
        tokio::time::sleep(LAG_SAMPLE_EVERY).await;
    }
    samples
}

fn lag_of(mut samples: Vec<f64>) -> LagMs {
    samples.sort_by(f64::total_cmp);
    LagMs {
        p50: nearest_rank(&samples, 0.5),
        p99: nearest_rank(&samples, 0.99),
        max: nearest_rank(&samples, 1.0),
    }
}

async fn ledger_lag(
    pool: &PgPool,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<LagMs> {
    let (p50, p99, max): (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag) \
         FROM (SELECT EXTRACT(EPOCH FROM recorded_at - occurred_at)::float8 * 1000 AS lag \
               FROM ledger WHERE occurred_at >= $1 AND occurred_at < $2) t",
    )
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await?;
    Ok(LagMs {
        p50: p50.unwrap_or(0.0),
        p99: p99.unwrap_or(0.0),
        max: max.unwrap_or(0.0),
    })
}

/// Wait until every event on the bench stream is in the ledger (the stream is fresh and holds
/// only this run's events, all distinct) and the usage projection has folded the ledger's end.
async fn wait_drained(conns: &Connections) -> anyhow::Result<i64> {
    let start = Instant::now();
    let expected = {
        let mut stream = conns.js.get_stream(&conns.stream.name).await?;
        i64::try_from(stream.info().await?.state.messages)?
    };
    loop {
        let (rows, max_pos, checkpoint): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT count(*), max(pos), (SELECT last_pos FROM projection_checkpoints \
             WHERE projection = 'usage') FROM ledger",
        )
        .fetch_one(&conns.pool)
        .await?;
        if rows >= expected && max_pos.unwrap_or(0) == checkpoint.unwrap_or(0) {
            return Ok(rows);
        }
        if start.elapsed() > DRAIN_TIMEOUT {
            bail!(
                "ledger/projection did not drain within {DRAIN_TIMEOUT:?}: {rows} of {expected} events in the ledger"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// VmHWM of this process.
fn own_peak_rss_mib() -> f64 {
    restart::peak_rss_mib(std::process::id())
}

/// `url` with its database replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database URL has no scheme")? + 3;
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    Ok(format!("{}/{db}{query}", &base[..host_end]))
}

async fn create_database(server_url: &str, db: &str) -> anyhow::Result<()> {
    let mut admin = sqlx::PgConnection::connect(server_url)
        .await
        .context("connecting to Postgres to create the bench database")?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

/// The database name of a Postgres URL.
fn db_name_of(url: &str) -> anyhow::Result<String> {
    let tail = url
        .rsplit_once('/')
        .context("a database URL names a database")?
        .1;
    Ok(tail.split('?').next().unwrap_or(tail).to_owned())
}

async fn drop_database(server_url: &str, db: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(server_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

async fn cleanup(services: &Services, common: &CommonArgs, db: &str) {
    if let Ok(nats) = async_nats::connect(&services.nats_url).await {
        let js = jetstream::new(nats);
        let settings = tally_ledger::StreamSettings {
            name: common.stream.clone(),
            partitions: common.partitions,
            max_age: common.stream_max_age,
            max_bytes: common.stream_max_bytes,
            replicas: common.stream_replicas,
        };
        let _ = js.delete_stream(&settings.name).await;
        let _ = js.delete_stream(settings.dead_letter().0).await;
    }
    if let Ok(mut admin) = sqlx::PgConnection::connect(&services.database_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

fn print_report(r: &Report) {
    let b = &r.baselines;
    match &r.shape {
        Some(s) => println!(
            "configuration: realistic ({} keys, {} users, {} teams, {} customers)",
            s.keys, s.users, s.teams, s.customers
        ),
        None => println!("configuration: empty (32 keys, no policies)"),
    }
    println!("raw baselines");
    println!(
        "  trivial HTTP round trip   {:>10.0} req/s   {}",
        b.http_requests_per_s,
        pct(&b.http_latency)
    );
    println!(
        "  JetStream publish + ack   {:>10.0} msg/s   {}",
        b.jetstream_publishes_per_s,
        pct(&b.jetstream_ack_latency)
    );
    println!(
        "  Postgres batched insert   {:>10.0} rows/s  (batches of {RAW_PG_BATCH_ROWS}, one connection)",
        b.postgres_rows_per_s
    );
    if let Some(l) = &r.load {
        print_load(r, l);
    }
    if let Some(o) = &r.open_loop {
        println!(
            "  open loop {:>10.0} pairs/s offered, {} done, {} errors; admission from schedule {}",
            o.rate_per_s,
            o.completed,
            o.errors,
            pct(&o.admission_latency)
        );
    }
    if let Some(b) = r.ledger_bytes_per_event {
        println!("  ledger size               {b:>10.0} bytes/event (table, indexes, TOAST)");
    }
    for x in &r.replay {
        println!(
            "  replay {:<18} {:>10.0} rows/s  = {:.1}% of raw Postgres ({} rows)",
            x.projection,
            x.rows_per_s,
            100.0 * x.ratio_postgres,
            x.rows
        );
    }
    if let Some(x) = &r.restart {
        print_restart(x);
    }
}

fn pct(p: &Percentiles) -> String {
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        p.p50_us as f64 / 1e3,
        p.p99_us as f64 / 1e3,
        p.p999_us as f64 / 1e3,
        p.max_us as f64 / 1e3
    )
}

fn print_restart(x: &RestartResult) {
    println!(
        "restart over {} events ({} keys): written in {:.1} s, absorbed {:.1} s later",
        x.events, x.keys, x.write_s, x.absorb_s
    );
    let line = |what: &str, s: &Start| {
        println!(
            "  {what:<26}first admission after {} ms; {} rows folded at {:.0} rows/s after snapshot {:?}; peak RSS {:.0} MiB; quotas of {} subjects equal: {}{}",
            s.ready_ms,
            s.rows_folded,
            s.rows_per_s,
            s.snapshot_seq,
            s.peak_rss_mib,
            x.sample_subjects,
            s.quota_equal,
            s.first_difference
                .as_deref()
                .map(|d| format!(" (first difference {d})"))
                .unwrap_or_default()
        )
    };
    line("from the newest snapshot", &x.with_snapshot);
    if let Some(f) = &x.full_rebuild {
        line("with no snapshot", f);
    }
}

fn print_load(r: &Report, l: &LoadResult) {
    let ratio = |x: Option<f64>| 100.0 * x.unwrap_or(0.0);
    println!(
        "tally, {} clients, {:.0} s measured",
        r.clients, r.duration_s
    );
    println!(
        "  admit + settle pairs      {:>10.0} pairs/s ({} errors)",
        l.pairs_per_s, l.errors
    );
    println!(
        "  HTTP requests             {:>10.0} req/s   = {:.1}% of trivial HTTP",
        l.http_requests_per_s,
        ratio(r.ratio_http)
    );
    println!(
        "  events published          {:>10.0} ev/s    = {:.1}% of raw JetStream",
        l.events_per_s,
        ratio(r.ratio_jetstream)
    );
    println!(
        "  ledger rows               {:>10.0} rows/s  = {:.1}% of raw Postgres",
        l.events_per_s,
        ratio(r.ratio_postgres)
    );
    println!("  admission latency         {}", pct(&l.admission_latency));
    println!("  settle latency            {}", pct(&l.settle_latency));
    println!(
        "  ledger lag                p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        l.ledger_lag_ms.p50, l.ledger_lag_ms.p99, l.ledger_lag_ms.max
    );
    println!(
        "  projection lag            p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        l.projection_lag_ms.p50, l.projection_lag_ms.p99, l.projection_lag_ms.max
    );
    let (fo, fs) = (
        &l.freshness_other_instance_ms,
        &l.freshness_same_instance_ms,
    );
    println!(
        "  freshness, other instance p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} missed)",
        fo.p50, fo.p99, fo.max, l.freshness_missed
    );
    println!(
        "  freshness, same instance  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        fs.p50, fs.p99, fs.max
    );
    println!(
        "  drain after load          {} ms ({} ledger rows in the run)",
        l.drain_ms, l.ledger_rows
    );
    println!(
        "  peak RSS                  {:.0} MiB (stack and load generator in one process)",
        l.peak_rss_mib
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let p = Percentiles::of((1..=1000).collect());
        assert_eq!(
            (p.p50_us, p.p99_us, p.p999_us, p.max_us),
            (500, 990, 999, 1000)
        );
        let empty = Percentiles::of(Vec::new());
        assert_eq!(empty.max_us, 0);
    }

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "b").unwrap(),
            "postgres://u:p@h:5432/b?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "b").unwrap(),
            "postgres://h/b"
        );
    }
}

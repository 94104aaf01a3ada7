//! The `tally` binary: wires the crates into `up`, `api`, `ledger`, `project`, `migrate` and `bench`.

use anyhow::{Context as _, bail};
use clap::Parser;
use tally_api::{Tokens, WorkerStats};
use tokio::task::JoinHandle;

use tally::cli::{Cli, Command, CommonArgs, UpArgs, WorkerArgs};
use tally::stack::{self, Shutdown};
use tally::{bench, services};

/// A pooling allocator: the fold and the admit path allocate many small, short-lived values
/// (docs/benchmarks.md has the profiles before and after).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            // One line with its causes, not a debug dump.
            eprintln!("tally: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<u8> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    // Fail points are compiled only into test builds (feature `failpoints`); a test configures
    // them through this variable.
    let _failpoints = std::env::var_os("FAILPOINTS").map(|_| fail::FailScenario::setup());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Api(c) => api(c).await,
            Command::Ledger(c) => ledger(c).await,
            Command::Project(c) => project(c).await,
            Command::Migrate(c) => migrate(c).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Replay(args) => return tally::audit::replay(args).await.map(exit_code),
            Command::Audit(args) => return tally::audit::audit(args).await.map(exit_code),
            Command::Whatif(args) => return tally::whatif::run(args).await.map(exit_code),
        }
        .map(|()| 0)
    })
}

/// Logs go to stderr, filtered by `TALLY_LOG`, else `RUST_LOG`, else `info` (sqlx and
/// async-nats at `warn`); colours only when stderr is a terminal.
fn init_logs(format: tally::cli::LogFormat) {
    use std::io::IsTerminal as _;
    let filter = ["TALLY_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| tracing_subscriber::EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| "info,sqlx=warn,async_nats=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        tally::cli::LogFormat::Text => builder.init(),
        tally::cli::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn exit_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

fn urls(c: &CommonArgs) -> anyhow::Result<(String, String)> {
    let nats = c
        .nats_url
        .clone()
        .context("--nats-url / NATS_URL is required (or use `tally up`)")?;
    let db = c
        .database_url
        .clone()
        .context("--database-url / DATABASE_URL is required (or use `tally up`)")?;
    Ok((nats, db))
}

async fn migrate(c: CommonArgs) -> anyhow::Result<()> {
    let (nats, db) = urls(&c)?;
    stack::connect(&c, &nats, &db).await?;
    println!("migrations applied; stream {} ready", c.stream);
    Ok(())
}

fn tokens_required(c: &CommonArgs) -> anyhow::Result<Tokens> {
    let mut tokens = Tokens::from_lists(&c.admin_tokens, &c.api_tokens);
    tokens.insecure_no_auth = c.insecure_no_auth;
    if tokens.is_empty() && !c.insecure_no_auth {
        bail!(
            "no tokens: set TALLY_ADMIN_TOKENS / TALLY_API_TOKENS (or --insecure-no-auth for development)"
        );
    }
    Ok(tokens)
}

async fn api(c: CommonArgs) -> anyhow::Result<()> {
    let tokens = tokens_required(&c)?;
    let (nats, db) = urls(&c)?;
    let conns = stack::connect(&c, &nats, &db).await?;
    let shutdown = Shutdown::default();
    let (state, tasks) = stack::api_state(&conns, &c, tokens, WorkerStats::default(), &shutdown)?;
    let (addr, handle) = stack::spawn_api(c.http_addr, state, &shutdown).await?;
    tracing::info!(%addr, "API listening");
    supervise(vec![handle, tasks], shutdown).await
}

async fn ledger(args: WorkerArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let (nats, db) = urls(c)?;
    let conns = stack::connect(c, &nats, &db).await?;
    let shutdown = Shutdown::default();
    let (stats, handle) = stack::spawn_ledger(&conns, &shutdown);
    let workers = WorkerStats {
        ledger: Some(stats),
        ..WorkerStats::default()
    };
    let mut handles = vec![handle];
    handles.extend(metrics_server(args.metrics_addr, workers, &shutdown).await?);
    supervise(handles, shutdown).await
}

async fn project(args: WorkerArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let (nats, db) = urls(c)?;
    let conns = stack::connect(c, &nats, &db).await?;
    let shutdown = Shutdown::default();
    let (workers, mut handles) = stack::spawn_projectors(&conns, c, &shutdown);
    handles.extend(metrics_server(args.metrics_addr, workers, &shutdown).await?);
    supervise(handles, shutdown).await
}

/// `--metrics-addr`: serve the workers' `/metrics` there until shutdown.
async fn metrics_server(
    addr: Option<std::net::SocketAddr>,
    workers: WorkerStats,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<JoinHandle<anyhow::Result<()>>>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let stop = shutdown.wait();
    Ok(Some(tokio::spawn(async move {
        axum::serve(listener, tally_api::worker_metrics::app(workers))
            .with_graceful_shutdown(stop)
            .await
            .map_err(Into::into)
    })))
}

/// Run until a signal or until any task ends (a task ending on its own is a failure: the ledger
/// writer's alarm, a lost listener), then stop the rest and report the first error.
async fn supervise(
    handles: Vec<JoinHandle<anyhow::Result<()>>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut handles = handles;
    let first = tokio::select! {
        _ = stack::os_signal() => None,
        (r, i, _) = futures::future::select_all(handles.iter_mut()) => Some((r, i)),
    };
    shutdown.trigger();
    let mut result = Ok(());
    if let Some((r, i)) = first {
        handles.remove(i);
        result = match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("a worker stopped unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(join.into()),
        };
    }
    for h in handles {
        let _ = h.await;
    }
    result
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let opts = services::ServicesOptions {
        mode: args.services,
        nats_url: c.nats_url.clone(),
        database_url: c.database_url.clone(),
        data_dir: args.data_dir.clone(),
        install_missing: args.install_missing,
    };
    let mut services = services::Services::ensure(&opts).await?;
    for line in &services.origin {
        println!("tally up: {line}");
    }
    let result = up_with(c, &services.nats_url, &services.database_url).await;
    services.stop().await?;
    result
}

async fn up_with(c: &CommonArgs, nats: &str, db: &str) -> anyhow::Result<()> {
    let mut tokens = Tokens::from_lists(&c.admin_tokens, &c.api_tokens);
    tokens.insecure_no_auth = c.insecure_no_auth;
    if tokens.is_empty() && !c.insecure_no_auth {
        tokens.admin = vec![format!("tally_admin_{}", uuid::Uuid::new_v4().simple())];
        tokens.api = vec![format!("tally_api_{}", uuid::Uuid::new_v4().simple())];
    }
    let conns = stack::connect(c, nats, db).await?;
    let shutdown = Shutdown::default();
    let (ledger_stats, ledger) = stack::spawn_ledger(&conns, &shutdown);
    let (mut workers, mut handles) = stack::spawn_projectors(&conns, c, &shutdown);
    workers.ledger = Some(ledger_stats);
    handles.push(ledger);
    let (state, tasks) = stack::api_state(&conns, c, tokens.clone(), workers, &shutdown)?;
    handles.push(tasks);
    let (addr, api) = stack::spawn_api(c.http_addr, state, &shutdown).await?;
    handles.push(api);
    println!("tally up: API http://{addr}");
    println!(
        "tally up: NATS {nats}, Postgres {}, stream {}",
        stack::redact(db),
        conns.stream.name
    );
    println!("tally up: admin token {}", tokens.admin.join(","));
    println!("tally up: api token {}", tokens.api.join(","));
    supervise(handles, shutdown).await
}

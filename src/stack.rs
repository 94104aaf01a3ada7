//! Wiring: connect to NATS and Postgres, prepare the stream and schema, and start the API, the
//! ledger writer and the projectors as tasks of one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tally_api::{ApiConfig, AppState, Tokens, WorkerStats};
use tally_ledger::{LedgerWriter, Publisher, StreamSettings, WriterSettings};
use tally_projector::registry::{self, Context};
use tally_projector::{Projector, QuotaSettings};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::CommonArgs;

/// Postgres connections per process: the writer and projectors hold one each while committing;
/// the rest serve API reads. More would only queue inside Postgres on a 2-core machine.
pub const MAX_DB_CONNECTIONS: u32 = 16;
/// How long a caller waits for a pooled connection before the request fails (503) instead of
/// hanging while Postgres is down.
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on connecting to NATS at start-up.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Statements slower than this are logged (at debug: a 1,000-row batch insert is a page of
/// text, and a slow one is already visible in the batch and lag metrics).
pub const SLOW_STATEMENT: Duration = Duration::from_secs(1);

/// Connection options for `url`, with slow statements logged at debug, not warn.
pub fn pg_options(url: &str) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
    use sqlx::ConnectOptions as _;
    use std::str::FromStr as _;
    Ok(sqlx::postgres::PgConnectOptions::from_str(url)
        .with_context(|| format!("parsing the Postgres URL {}", redact(url)))?
        .log_slow_statements(log::LevelFilter::Debug, SLOW_STATEMENT))
}

/// Live connections and the stream settings.
#[derive(Clone)]
pub struct Connections {
    /// NATS client.
    pub nats: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Postgres pool.
    pub pool: PgPool,
    /// The stream.
    pub stream: StreamSettings,
}

/// Connect, migrate and ensure the stream.
pub async fn connect(
    common: &CommonArgs,
    nats_url: &str,
    database_url: &str,
) -> anyhow::Result<Connections> {
    let servers = nats_servers(nats_url)?;
    let nats = async_nats::ConnectOptions::new()
        .name("tally")
        .connection_timeout(NATS_CONNECT_TIMEOUT)
        .retry_on_initial_connect()
        .connect(servers.as_slice())
        .await
        .with_context(|| format!("connecting to NATS at {nats_url}"))?;
    let nats = tokio::time::timeout(NATS_CONNECT_TIMEOUT * 2, async {
        while nats.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nats
    })
    .await
    .with_context(|| format!("NATS at {nats_url} did not answer"))?;
    let pool = PgPoolOptions::new()
        .max_connections(MAX_DB_CONNECTIONS)
        .acquire_timeout(DB_ACQUIRE_TIMEOUT)
        .connect_with(pg_options(database_url)?)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact(database_url)))?;
    tally_ledger::migrate(&pool).await?;
    let js = jetstream::new(nats.clone());
    let stream = StreamSettings {
        name: common.stream.clone(),
        partitions: common.partitions,
        max_age: common.stream_max_age,
        max_bytes: common.stream_max_bytes,
        replicas: common.stream_replicas,
    };
    tally_ledger::stream::ensure_stream(&js, &stream).await?;
    Ok(Connections {
        nats,
        js,
        pool,
        stream,
    })
}

/// The servers of `NATS_URL`: one URL, or several separated by commas (the nodes of a cluster;
/// the client connects to one and fails over to the others).
pub fn nats_servers(nats_url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    nats_url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .with_context(|| format!("NATS_URL: `{u}` is not a NATS server URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                anyhow::bail!("NATS_URL names no server")
            }
            Ok(v)
        })
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// A broadcast "stop now".
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(watch::channel(false).0)
    }
}

impl Shutdown {
    /// Ask every task to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// A receiver that turns true once [`Shutdown::trigger`] was called.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Resolves once [`Shutdown::trigger`] was called.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// Start the ledger writer.
pub fn spawn_ledger(
    c: &Connections,
    shutdown: &Shutdown,
) -> (
    Arc<tally_ledger::writer::WriterStats>,
    JoinHandle<anyhow::Result<()>>,
) {
    let writer = LedgerWriter::new(
        c.js.clone(),
        c.pool.clone(),
        c.stream.clone(),
        WriterSettings::default(),
    );
    let stats = writer.stats();
    let stop = shutdown.wait();
    (
        stats,
        tokio::spawn(async move { writer.run(stop).await.map_err(Into::into) }),
    )
}

/// The quota projection's settings (snapshots, compaction) from the command line.
pub fn quota_settings(common: &CommonArgs) -> QuotaSettings {
    QuotaSettings {
        stream: common.stream.clone(),
        snapshot_every_events: common.snapshot_every,
        snapshot_interval: common.snapshot_interval,
        max_backfill: common.max_backfill,
        reservation_ttl: common.reservation_ttl,
    }
}

/// What the registry builds projections from (the live instances, or with `rebuilding` the
/// ones that build from the first ledger row).
pub fn projection_context(pool: &PgPool, common: &CommonArgs, rebuilding: bool) -> Context {
    Context {
        pool: pool.clone(),
        quota: quota_settings(common),
        report_tz: common.report_timezone,
        rebuilding,
    }
}

/// Start the projections `--projections` names (each builds its tables first if they are
/// missing or of another version).
pub fn spawn_projectors(
    c: &Connections,
    common: &CommonArgs,
    shutdown: &Shutdown,
) -> (WorkerStats, Vec<JoinHandle<anyhow::Result<()>>>) {
    let live = projection_context(&c.pool, common, false);
    let fresh = projection_context(&c.pool, common, true);
    let mut stats = WorkerStats::default();
    let mut handles = Vec::new();
    for name in &common.projections.0 {
        let Some(entry) = registry::find(name) else {
            continue; // parse_projections only lets registered names through
        };
        let projector = Projector::new(c.pool.clone(), (entry.make)(&live));
        stats
            .projectors
            .push((entry.name, entry.order, projector.stats()));
        let stop = shutdown.wait();
        let ctx = fresh.clone();
        let make = entry.make;
        let fresh: tally_projector::runner::Fresh = Arc::new(move || make(&ctx));
        handles.push(tokio::spawn(async move {
            projector.run(fresh, stop).await.map_err(Into::into)
        }));
    }
    (stats, handles)
}

/// Build the API state and start its supervised background tasks (stream tail, expiries,
/// sweeps, compaction and, with `--fail-open`, the spool drainer). The handle ends with an error
/// as soon as any of them dies. Fails when the spool cannot be opened (unwritable, or in use by
/// another instance).
pub fn api_state(
    c: &Connections,
    common: &CommonArgs,
    tokens: Tokens,
    workers: WorkerStats,
    shutdown: &Shutdown,
) -> anyhow::Result<(AppState, JoinHandle<anyhow::Result<()>>)> {
    let config = ApiConfig {
        reservation_ttl: common.reservation_ttl,
        max_backfill: common.max_backfill,
        max_clock_skew: common.max_clock_skew,
        report_tz: common.report_timezone,
        advertise_url: common.advertise_url.clone(),
        unknown_subjects: common.unknown_subjects.into(),
        server: tally_api::server::ServerLimits {
            header_read_timeout: common.http_header_timeout,
        },
    };
    let publisher = Publisher::new(c.js.clone(), c.stream.clone());
    let spool = if common.fail_open {
        let spool = tally_ledger::Spool::open(&common.spool_dir, publisher.clone(), c.nats.clone())
            .with_context(|| format!("opening the spool in {}", common.spool_dir.display()))?;
        Some(spool)
    } else {
        None
    };
    let state = AppState::new(
        publisher,
        c.nats.clone(),
        c.pool.clone(),
        tokens,
        config,
        workers,
        spool,
    );
    let tasks = tally_api::tasks::spawn(state.clone(), shutdown.subscribe());
    let handle = tokio::spawn(async move { Ok(tasks.await??) });
    Ok((state, handle))
}

/// Bind and serve the API until shutdown.
pub async fn spawn_api(
    addr: SocketAddr,
    state: AppState,
    shutdown: &Shutdown,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let stop = shutdown.wait();
    let limits = state.server_limits();
    let (db, stream, advertise) = state.instance_registration();
    let url = advertise.unwrap_or_else(|| {
        let ip = if bound.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            bound.ip()
        };
        format!("http://{}", SocketAddr::new(ip, bound.port()))
    });
    let instance = uuid::Uuid::new_v4();
    let heartbeat = tokio::spawn(heartbeat(db.clone(), instance, stream, url));
    let handle = tokio::spawn(async move {
        let served = tally_api::serve(listener, tally_api::app(state), limits, stop).await;
        heartbeat.abort();
        let _ = sqlx::query("DELETE FROM api_instances WHERE instance = $1")
            .bind(instance)
            .execute(&db)
            .await;
        served.map_err(Into::into)
    });
    Ok((bound, handle))
}

/// How often a running API instance renews its row in `api_instances`.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// An instance whose row is older than this is taken for gone (by `tally audit`) and removed
/// by the next heartbeat of any instance.
pub const INSTANCE_GONE_AFTER: Duration = Duration::from_secs(30);

/// Register this instance for `tally audit` and keep the row fresh. Postgres being away is not
/// an error here (admissions do not need it): the next beat registers again.
async fn heartbeat(db: PgPool, instance: uuid::Uuid, stream: String, url: String) {
    let started = chrono::Utc::now();
    let gone = chrono::Duration::from_std(INSTANCE_GONE_AFTER).unwrap_or(chrono::Duration::MAX);
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tick.tick().await;
        let now = chrono::Utc::now();
        let beat = sqlx::query(
            "INSERT INTO api_instances (instance, stream, address, started_at, last_seen) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (instance) DO UPDATE SET last_seen = $5",
        )
        .bind(instance)
        .bind(&stream)
        .bind(&url)
        .bind(started)
        .bind(now)
        .execute(&db)
        .await;
        let swept = sqlx::query("DELETE FROM api_instances WHERE last_seen < $1")
            .bind(now - gone)
            .execute(&db)
            .await;
        if let Err(e) = beat.and(swept) {
            tracing::debug!(error = %e, "instance heartbeat failed; retrying");
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn os_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn nats_url_lists_a_cluster() {
        let s = super::nats_servers("nats://a:4222, nats://b:4223,nats://c:4224").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(super::nats_servers("nats://a:4222").unwrap().len(), 1);
        assert!(super::nats_servers(" , ").is_err());
        assert!(super::nats_servers("nats://a:4222,http://[bad").is_err());
    }
}

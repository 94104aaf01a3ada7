//! Tally's HTTP API (SPEC §6): admission, settlement, release, reads, health and metrics.
//!
//! [`app`] builds the router from an [`AppState`]; [`serve`] runs it on a listener. Tests drive
//! the router in-process or over a socket. Errors map to status codes in one place ([`error`]).

mod admin;
pub mod auth;
pub mod body;
pub mod error;
mod handlers;
mod ops;
pub mod table;
pub mod tail;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post, put};
use sqlx::PgPool;
use tally_ledger::Publisher;
use tally_ledger::writer::WriterStats;
use tally_projector::ProjectorStats;

pub use auth::Tokens;
pub use error::ApiError;
use table::RequestTable;

/// Settings of the API (SPEC §9).
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// How long an admission's reservation lives (server clock).
    pub reservation_ttl: Duration,
    /// How far in the past `at` may be.
    pub max_backfill: Duration,
    /// How far in the future `at` may be.
    pub max_clock_skew: Duration,
    /// Whether a leaf nobody configured is admitted or refused.
    pub unknown_subjects: tally_events::quota::UnknownSubjects,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            reservation_ttl: Duration::from_secs(15 * 60),
            max_backfill: Duration::from_secs(35 * 24 * 3600),
            max_clock_skew: Duration::from_secs(5 * 60),
            unknown_subjects: Default::default(),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Admissions decided (admitted).
    pub admitted: AtomicU64,
    /// Admissions refused.
    pub rejected: AtomicU64,
    /// Admissions answered from the idempotency table.
    pub replayed: AtomicU64,
    /// Settlements published.
    pub settlements: AtomicU64,
    /// Settlements recognised as retries and not published again.
    pub settlement_retries: AtomicU64,
    /// Releases published.
    pub releases: AtomicU64,
    /// Reservation expiries published by this instance.
    pub expiries: AtomicU64,
    /// Times the stream tail failed and resumed.
    pub tail_restarts: AtomicU64,
    /// Requests answered 503 because an event could not be published.
    pub unavailable: AtomicU64,
}

/// Optional stats of the workers running in the same process (`tally up`).
#[derive(Clone, Default)]
pub struct WorkerStats {
    /// The ledger writer's.
    pub ledger: Option<Arc<WriterStats>>,
    /// The projectors', by name.
    pub projectors: Vec<(&'static str, Arc<ProjectorStats>)>,
}

struct Inner {
    publisher: Publisher,
    nats: async_nats::Client,
    db: PgPool,
    tokens: Tokens,
    config: ApiConfig,
    requests: RequestTable,
    metrics: Metrics,
    workers: WorkerStats,
    tail_ready: AtomicBool,
    /// The last stream sequence folded into the quota state (everything at or below it is in).
    tail_seq: AtomicU64,
    /// Per config subject, the sequence of this instance's own last write there (applied locally
    /// at once, possibly before the tail reaches it). Guarded by `admin_lock`'s holder.
    own_config_seq: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Admissions whose publish failed after it may have reached the server (the connection
    /// dropped before the ack): a retry of the request re-sends this same event (same id, so the
    /// stream and ledger keep one) instead of deciding afresh and leaving two admissions.
    in_doubt: std::sync::Mutex<
        std::collections::HashMap<String, (std::time::Instant, tally_events::Envelope)>,
    >,
    /// `--fail-open`: where events go while NATS cannot take them.
    spool: Option<tally_ledger::Spool>,
    /// The quota fold: configuration, usage, reservations, credits. A std mutex, never held
    /// across an await: check-and-reserve of an admission happens entirely under it.
    quota: std::sync::Mutex<tally_events::quota::QuotaState>,
    /// Serializes admin writes, so a validation still holds when its event is applied.
    admin_lock: tokio::sync::Mutex<()>,
}

/// Shared state of every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// State over connected NATS and Postgres. Start [`tail::run`] beside it.
    pub fn new(
        publisher: Publisher,
        nats: async_nats::Client,
        db: PgPool,
        tokens: Tokens,
        config: ApiConfig,
        workers: WorkerStats,
        spool: Option<tally_ledger::Spool>,
    ) -> Self {
        let requests = RequestTable::new(config.reservation_ttl);
        AppState(Arc::new(Inner {
            publisher,
            nats,
            db,
            tokens,
            config,
            requests,
            metrics: Metrics::default(),
            workers,
            tail_ready: AtomicBool::new(false),
            tail_seq: AtomicU64::new(0),
            own_config_seq: Default::default(),
            in_doubt: Default::default(),
            spool,
            quota: std::sync::Mutex::new(Default::default()),
            admin_lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn tokens(&self) -> &Tokens {
        &self.0.tokens
    }

    /// The request table.
    pub fn requests(&self) -> &RequestTable {
        &self.0.requests
    }

    /// The quota state (lock briefly; never across an await).
    pub fn quota(&self) -> std::sync::MutexGuard<'_, tally_events::quota::QuotaState> {
        self.0.quota.lock().expect("quota state lock")
    }

    /// The fail-open spool, when `--fail-open` is on.
    pub fn spool(&self) -> Option<&tally_ledger::Spool> {
        self.0.spool.as_ref()
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
}

/// The router: every route with its auth, the body limit and tracing.
pub fn app(state: AppState) -> Router {
    let data_plane = Router::new()
        .route("/v1/admit", post(handlers::admit))
        .route("/v1/settle", post(handlers::settle))
        .route("/v1/release", post(handlers::release))
        .route("/v1/usage", get(handlers::usage))
        .route("/v1/requests/{request_id}", get(handlers::request))
        .route("/v1/quota", get(admin::quota))
        .route_layer(from_fn_with_state(state.clone(), auth::data_plane));
    let admin = Router::new()
        .route(
            "/v1/subjects/{subject}",
            put(admin::put_subject).get(admin::get_subject),
        )
        .route(
            "/v1/model-groups/{name}",
            put(admin::put_model_group).delete(admin::delete_model_group),
        )
        .route("/v1/policies", get(admin::list_policies))
        .route(
            "/v1/policies/{id}",
            put(admin::put_policy).delete(admin::delete_policy),
        )
        .route("/v1/policies/{id}/reset", post(admin::reset_policy))
        .route("/v1/grants", post(admin::post_grant))
        .route(
            "/v1/grants/{id}",
            axum::routing::delete(admin::delete_grant),
        )
        .route("/v1/credits/{subject}", post(admin::post_credits))
        .route_layer(from_fn_with_state(state.clone(), auth::admin));
    let open = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi));
    data_plane
        .merge(admin)
        .merge(open)
        .fallback(ops::not_found)
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .with_state(state)
}

/// Serve `router` on `listener` until `shutdown` resolves (in-flight requests finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

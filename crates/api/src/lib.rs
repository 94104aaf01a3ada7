//! Tally's HTTP API (SPEC §6): admission, settlement, release, reads, health and metrics.
//!
//! [`app`] builds the router from an [`AppState`]; [`serve`] runs it on a listener. Tests drive
//! the router in-process or over a socket. Errors map to status codes in one place ([`error`]).

pub mod access;
mod admin;
/// Most pools one `POST /v1/admin/pool-usage` may ask about.
pub use admin::MAX_POOLS_PER_CALL;
pub mod auth;
pub mod body;
mod doc_rules;
pub mod docs;
mod durable;
pub mod error;
mod handlers;
pub mod metrics;
mod ops;
mod reads;
mod reports;
pub mod server;
pub mod table;
pub mod tail;
pub mod tasks;
pub mod worker_metrics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use sqlx::PgPool;
use tally_ledger::Publisher;
use tally_ledger::writer::WriterStats;
use tally_projector::ProjectorStats;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::Tokens;

/// Every request body type, for fuzzing the decoders (`tests/body_fuzz.rs`).
pub mod bodies {
    pub use crate::admin::{CreditsIn, GrantIn, ModelGroupIn, PolicyIn, ResetIn, SubjectIn};
    pub use crate::handlers::{AdmitIn, ReleaseIn, SettleIn};
}
pub use error::ApiError;
pub use metrics::Metrics;
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
    /// HTTP time limits.
    pub server: server::ServerLimits,
    /// The time zone of the daily-usage report's days (what its projection is built for).
    pub report_tz: chrono_tz::Tz,
    /// The URL other processes reach this instance at (registered for `tally audit`); None:
    /// `http://` + the bound address (loopback when bound to every interface).
    pub advertise_url: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            reservation_ttl: Duration::from_secs(15 * 60),
            max_backfill: Duration::from_secs(35 * 24 * 3600),
            max_clock_skew: Duration::from_secs(5 * 60),
            unknown_subjects: Default::default(),
            server: Default::default(),
            report_tz: chrono_tz::UTC,
            advertise_url: None,
        }
    }
}

/// Optional stats of the workers running in the same process (`tally up`).
#[derive(Clone, Default)]
pub struct WorkerStats {
    /// The ledger writer's.
    pub ledger: Option<Arc<WriterStats>>,
    /// The projectors', by name, with the order their checkpoint counts in.
    pub projectors: Vec<(&'static str, tally_projector::Order, Arc<ProjectorStats>)>,
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
    /// How far the tail trailed the stream's head at its last message, in ms (0 when caught up).
    tail_lag_ms: AtomicU64,
    /// Set when the quota state can no longer be trusted (a panic while it was locked): the
    /// instance stops deciding and reports itself not ready; the supervisor stops the process.
    broken: AtomicBool,
    /// How this instance started (snapshot, fallbacks, rebuild rate) for `/readyz`.
    startup: std::sync::Mutex<tail::Startup>,
    /// The background task that ended, if one did, and why.
    failed_task: std::sync::Mutex<Option<(String, String)>>,
    /// Per config subject, the sequence of this instance's own last write there (applied locally
    /// at once, possibly before the tail reaches it). Guarded by `admin_lock`'s holder.
    own_config_seq: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Admissions whose publish failed after it may have reached the server (the connection
    /// dropped before the ack): a retry of the request re-sends this same event (same id, so the
    /// stream and ledger keep one) instead of deciding afresh and leaving two admissions.
    in_doubt: std::sync::Mutex<
        tally_events::quota::Bounded<String, (std::time::Instant, tally_events::Envelope)>,
    >,
    /// Admissions and settlements this instance published and applied to its own state: its
    /// tail skips them without decoding (they are in the state already). Past the bound the
    /// tail decodes and applies them, which changes nothing (the fold is idempotent).
    own_events: std::sync::Mutex<tally_events::quota::Bounded<uuid::Uuid, ()>>,
    /// `--fail-open`: where events go while NATS cannot take them.
    spool: Option<tally_ledger::Spool>,
    /// The quota fold: configuration, usage, reservations, credits. A std mutex, never held
    /// across an await: check-and-reserve of an admission happens entirely under it.
    quota: std::sync::Mutex<tally_events::quota::QuotaState>,
    /// Serializes admin writes, so a validation still holds when its event is applied.
    admin_lock: tokio::sync::Mutex<()>,
}

/// Most own events remembered for the tail to skip: more than the tail ever trails behind under
/// load (a few seconds of admissions and settlements), a few MiB.
pub const MAX_OWN_EVENTS: usize = 65_536;

/// Shared state of every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// State over connected NATS and Postgres. Start its background work with [`tasks::spawn`].
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
        let mut quota = tally_events::quota::QuotaState::default();
        quota.set_idempotency(
            chrono::Duration::from_std(config.reservation_ttl * 2).unwrap_or(chrono::Duration::MAX),
        );
        let metrics = Metrics::new(&workers, &publisher);
        AppState(Arc::new(Inner {
            publisher,
            nats,
            db,
            tokens,
            config,
            requests,
            metrics,
            workers,
            tail_ready: AtomicBool::new(false),
            tail_seq: AtomicU64::new(0),
            tail_lag_ms: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            startup: Default::default(),
            failed_task: Default::default(),
            own_config_seq: Default::default(),
            in_doubt: std::sync::Mutex::new(tally_events::quota::Bounded::new(
                durable::MAX_IN_DOUBT,
            )),
            own_events: std::sync::Mutex::new(tally_events::quota::Bounded::new(MAX_OWN_EVENTS)),
            spool,
            quota: std::sync::Mutex::new(quota),
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

    /// The quota state (lock briefly; never across an await). The fold does not panic (it is
    /// property-tested with extreme amounts), but if anything ever did while holding the lock,
    /// the state is marked broken instead of every later request panicking on the poisoned lock:
    /// admissions answer 503 and `/readyz` fails until the process is restarted (and rebuilds).
    pub fn quota(&self) -> std::sync::MutexGuard<'_, tally_events::quota::QuotaState> {
        self.0.quota.lock().unwrap_or_else(|poisoned| {
            if !self
                .0
                .broken
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                tracing::error!(
                    "the quota state lock was poisoned by a panic; this instance stops deciding"
                );
            }
            poisoned.into_inner()
        })
    }

    /// How long a request id names one request: twice the reservation TTL.
    pub fn idempotency(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.0.config.reservation_ttl * 2)
            .unwrap_or(chrono::Duration::MAX)
    }

    /// `id` was published (acknowledged) and applied to this instance's state and request table:
    /// its tail need not decode it. Called only after both applies, so a handler cancelled in
    /// between leaves the event for the tail to apply.
    pub(crate) fn applied_locally(&self, id: uuid::Uuid) {
        self.0
            .own_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, ());
    }

    /// Whether the tail may skip the message with event id `id` (and forget it).
    pub(crate) fn take_own(&self, id: &uuid::Uuid) -> bool {
        self.0
            .own_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }

    /// Whether the quota state was marked broken (see [`AppState::quota`]).
    pub fn is_broken(&self) -> bool {
        self.0.broken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Mark the state broken (a supervised task died): stop deciding.
    pub fn mark_broken(&self, why: &str) {
        if !self
            .0
            .broken
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!(why, "this instance stops deciding admissions");
        }
    }

    /// The fail-open spool, when `--fail-open` is on.
    pub fn spool(&self) -> Option<&tally_ledger::Spool> {
        self.0.spool.as_ref()
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Record the background task that ended (for `/readyz`).
    pub fn set_failed_task(&self, task: &str, reason: &str) {
        *self.0.failed_task.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((task.to_owned(), reason.to_owned()));
    }

    /// The background task that ended, if one did, and why.
    pub fn failed_task(&self) -> Option<(String, String)> {
        self.0
            .failed_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What the instance registry (`api_instances`, read by `tally audit`) needs: the
    /// database, the stream and the URL other processes reach this instance at, if configured.
    pub fn instance_registration(&self) -> (PgPool, String, Option<String>) {
        (
            self.0.db.clone(),
            self.0.publisher.settings().name.clone(),
            self.0.config.advertise_url.clone(),
        )
    }

    /// The HTTP limits this API was configured with.
    pub fn server_limits(&self) -> server::ServerLimits {
        self.0.config.server
    }
}

/// The router: every route with its auth, the body limit and tracing. Every route is registered
/// with its handler's OpenAPI description (utoipa-axum), so `/openapi.json` lists exactly what
/// is served.
pub fn app(state: AppState) -> Router {
    let data_plane = OpenApiRouter::new()
        .routes(routes!(handlers::admit))
        .routes(routes!(handlers::settle))
        .routes(routes!(handlers::release))
        .routes(routes!(reads::usage))
        .routes(routes!(reads::request))
        .routes(routes!(reads::quota))
        .routes(routes!(reports::daily_usage))
        .route_layer(from_fn_with_state(state.clone(), auth::data_plane));
    let admin = OpenApiRouter::new()
        .routes(routes!(admin::subjects::list_subjects))
        .routes(routes!(
            admin::subjects::put_subject,
            admin::subjects::get_subject,
            admin::subjects::delete_subject
        ))
        .routes(routes!(
            admin::model_groups::put_model_group,
            admin::model_groups::delete_model_group
        ))
        .routes(routes!(admin::policies::list_policies))
        .routes(routes!(
            admin::policies::put_policy,
            admin::policies::delete_policy
        ))
        .routes(routes!(admin::policies::reset_policy))
        .routes(routes!(admin::grants::post_grant))
        .routes(routes!(admin::grants::delete_grant))
        .routes(routes!(admin::credits::post_credits))
        .routes(routes!(admin::pools::pool_usage))
        .route_layer(from_fn_with_state(state.clone(), auth::admin));
    let open = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
        .routes(routes!(ops::ui));
    let (router, document) = OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .merge(data_plane)
        .merge(admin)
        .merge(open)
        .split_for_parts();
    docs::publish(document);
    router
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(from_fn_with_state(state.clone(), access::access_log))
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(server::limit_content_length))
        .with_state(state)
}

/// Serve `router` on `listener` with `limits` until `shutdown` resolves (in-flight requests
/// finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: server::ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router, limits, shutdown).await
}

//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;

/// A projection further behind the ledger than this many rows makes `/readyz` fail.
pub const MAX_READY_PROJECTION_LAG_ROWS: i64 = 50_000;
/// Bound on each readiness probe's dependency check: a hung dependency must not hang the probe.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = crate::docs::HealthOut)))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when this instance can decide admissions (the quota state caught up, and
/// NATS connected, or `--fail-open` spooling), 503 otherwise. Either way the body says what is
/// wrong: `degraded` lists every dependency not in order (Postgres down or projections lagging do
/// not stop admissions, which run on the in-memory state; the ledger catches up later).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready to decide admissions", body = crate::docs::ReadyOut),
        (status = 503, description = "Not ready; `degraded` says why", body = crate::docs::ReadyOut)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let inner = &state.0;
    let nats_ok = inner.nats.connection_state() == async_nats::connection::State::Connected;
    let pg = tokio::time::timeout(
        READY_CHECK_TIMEOUT,
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&inner.db),
    )
    .await;
    let pg_ok = matches!(pg, Ok(Ok(1)));
    let tail_ok = inner.tail_ready.load(Ordering::Relaxed);
    let broken = state.is_broken();
    let mut lags = serde_json::Map::new();
    let mut lag_ok = true;
    let mut building = false;
    if pg_ok {
        for (name, order, _) in &inner.workers.projectors {
            // No checkpoint yet: the projection is being built (attached or re-versioned);
            // that degrades reads of it, not admissions.
            let lag = tally_projector::runner::lag_rows(&inner.db, name, *order).await;
            let value = match lag {
                Ok(Some(rows)) => {
                    lag_ok &= rows <= MAX_READY_PROJECTION_LAG_ROWS;
                    json!(rows)
                }
                Ok(None) => {
                    building = true;
                    json!("building")
                }
                Err(_) => {
                    lag_ok = false;
                    json!("unknown")
                }
            };
            lags.insert((*name).to_owned(), value);
        }
    }
    let spool = inner.spool.as_ref();
    let spooling = spool.is_some_and(|s| s.pending() > 0);
    let mut degraded = Vec::new();
    for (bad, what) in [
        (broken, "state_broken"),
        (!nats_ok, "nats"),
        (!pg_ok, "postgres"),
        (!tail_ok, "request_tail"),
        (!lag_ok, "projection_lag"),
        (building, "projection_building"),
        (spooling, "spool"),
    ] {
        if bad {
            degraded.push(what);
        }
    }
    let ready = tail_ok && !broken && (nats_ok || spool.is_some());
    let failed = state
        .failed_task()
        .map(|(task, reason)| json!({"task": task, "reason": reason}));
    let body = json!({
        "ready": ready,
        "degraded": degraded,
        "checks": {
            "nats": if nats_ok { "ok" } else { "unreachable" },
            "postgres": if pg_ok { "ok" } else { "unreachable" },
            "request_tail": if tail_ok { "caught_up" } else { "catching_up" },
            "startup": state.startup(),
            "failed_task": failed,
            "projection_lag_rows": lags,
            "fail_open": spool.is_some(),
            "spool_pending_events": spool.map(|s| s.pending()),
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(&state).await;
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// `GET /openapi.json`: generated from the router's handlers (see [`crate::docs`]).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", body = serde_json::Value)))]
pub async fn openapi() -> Response {
    match crate::docs::document() {
        Some(doc) => ([(header::CONTENT_TYPE, "application/json")], doc.to_owned()).into_response(),
        None => ApiError::Internal("the OpenAPI document was not built".into()).into_response(),
    }
}

/// `GET /ui`: the dashboard, one static page embedded in the binary (it reads the API with the
/// token the operator enters, kept in the browser session only).
#[utoipa::path(get, path = "/ui", tag = "operations",
    responses((status = 200, description = "The dashboard (HTML)", body = String, content_type = "text/html")))]
pub async fn ui() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("ui/index.html"),
    )
        .into_response()
}

/// Unknown routes get the standard error body.
pub async fn not_found() -> ApiError {
    ApiError::NotFound {
        what: "route".into(),
        field: None,
    }
}

/// A known route with another method gets the standard error body.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

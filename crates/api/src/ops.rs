//! Operational endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use std::fmt::Write as _;
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
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when this instance can decide admissions (the quota state caught up, and
/// NATS connected, or `--fail-open` spooling), 503 otherwise. Either way the body says what is
/// wrong: `degraded` lists every dependency not in order (Postgres down or projections lagging do
/// not stop admissions, which run on the in-memory state; the ledger catches up later).
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

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let inner = &state.0;
    let m = &inner.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        );
    };
    counter(
        "tally_admissions_admitted_total",
        "Admissions admitted.",
        m.admitted.load(Ordering::Relaxed),
    );
    counter(
        "tally_admissions_rejected_total",
        "Admissions refused.",
        m.rejected.load(Ordering::Relaxed),
    );
    counter(
        "tally_admissions_replayed_total",
        "Admissions answered from the idempotency table.",
        m.replayed.load(Ordering::Relaxed),
    );
    counter(
        "tally_settlements_total",
        "Settlements published.",
        m.settlements.load(Ordering::Relaxed),
    );
    counter(
        "tally_settlement_retries_total",
        "Settlements recognised as retries.",
        m.settlement_retries.load(Ordering::Relaxed),
    );
    counter(
        "tally_releases_total",
        "Releases published.",
        m.releases.load(Ordering::Relaxed),
    );
    counter(
        "tally_reservation_expiries_total",
        "Reservation expiries published by this instance.",
        m.expiries.load(Ordering::Relaxed),
    );
    counter(
        "tally_tail_restarts_total",
        "Times the stream tail failed and resumed after its last folded sequence.",
        m.tail_restarts.load(Ordering::Relaxed),
    );
    counter(
        "tally_unavailable_total",
        "Requests answered 503: an event could not be published.",
        m.unavailable.load(Ordering::Relaxed),
    );
    if let Some(sp) = &inner.spool {
        counter(
            "tally_spool_appended_total",
            "Events spooled to local disk because NATS could not take them (--fail-open).",
            sp.appended_total(),
        );
        counter(
            "tally_spool_published_total",
            "Spooled events published to JetStream.",
            sp.published_total(),
        );
    }
    if let Some(l) = &inner.workers.ledger {
        counter(
            "tally_ledger_rows_appended_total",
            "Ledger rows appended.",
            l.rows_appended.load(Ordering::Relaxed),
        );
        counter(
            "tally_ledger_duplicates_total",
            "Messages already in the ledger.",
            l.duplicates.load(Ordering::Relaxed),
        );
        counter(
            "tally_ledger_rejects_total",
            "Messages dead-lettered.",
            l.rejects.load(Ordering::Relaxed),
        );
        counter(
            "tally_ledger_batches_total",
            "Ledger batches committed.",
            l.batches.load(Ordering::Relaxed),
        );
    }
    let mut gauge = |name: &str, help: &str, label: Option<&str>, v: i64| {
        let l = label
            .map(|p| format!("{{projection=\"{p}\"}}"))
            .unwrap_or_default();
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{l} {v}\n"
        );
    };
    gauge(
        "tally_requests_tracked",
        "Requests in the in-memory table.",
        None,
        inner.requests.len() as i64,
    );
    if let Some(sp) = &inner.spool {
        gauge(
            "tally_spool_pending_events",
            "Spooled events waiting for NATS.",
            None,
            sp.pending() as i64,
        );
    }
    if let Some(l) = &inner.workers.ledger {
        gauge(
            "tally_ledger_checkpoint",
            "Last committed stream sequence.",
            None,
            l.checkpoint.load(Ordering::Relaxed) as i64,
        );
    }
    // One family, one HELP and TYPE, a sample per projection (a HELP per sample is invalid
    // exposition format: promtool refuses a second HELP line for a name).
    if !inner.workers.projectors.is_empty() {
        let name = "tally_projection_checkpoint";
        let _ = write!(
            out,
            "# HELP {name} Projection checkpoint (ledger pos, stream sequence for quota).\n# TYPE {name} gauge\n"
        );
        for (projection, _, p) in &inner.workers.projectors {
            let v = p.checkpoint.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{projection=\"{projection}\"}} {v}");
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// `GET /openapi.json`: the routes this build serves.
pub async fn openapi() -> Json<serde_json::Value> {
    Json(serde_json::from_str(include_str!("openapi.json")).expect("openapi.json is valid JSON"))
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

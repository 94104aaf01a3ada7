//! `/metrics` of a process that runs workers but no API (`tally ledger`, `tally project` with
//! `--metrics-addr`): the ledger writer's and projectors' batch histograms, counters and
//! checkpoints, in the same families as an API instance shows for workers it runs
//! ([`crate::metrics::WorkerFamilies`]), plus each projector's checkpoint and rows.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{IntCounterVec, IntGaugeVec, Registry, TextEncoder};

use crate::WorkerStats;
use crate::metrics::{WorkerFamilies, counter_vec, int_gauge_vec, sync_counter};

struct Families {
    registry: Registry,
    workers: WorkerFamilies,
    projection_checkpoint: IntGaugeVec,
    projection_rows: IntCounterVec,
    /// One scrape at a time (interleaved scrapes would overshoot the synced counters).
    scrape_lock: std::sync::Mutex<()>,
}

impl Families {
    fn new(workers: WorkerStats) -> Self {
        let r = Registry::new();
        Families {
            workers: WorkerFamilies::new(&r, workers),
            projection_checkpoint: int_gauge_vec(
                &r,
                "tally_projection_checkpoint",
                "Projection checkpoint (ledger pos, stream sequence for quota).",
                &["projection"],
            ),
            projection_rows: counter_vec(
                &r,
                "tally_projection_rows_total",
                "Ledger rows a projector of this process moved past.",
                &["projection"],
            ),
            registry: r,
            scrape_lock: std::sync::Mutex::new(()),
        }
    }

    fn render(&self) -> String {
        let _one_at_a_time = self.scrape_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.workers.sync();
        for (name, _, p) in &self.workers.workers().projectors {
            self.projection_checkpoint
                .with_label_values(&[name])
                .set(p.checkpoint.load(Ordering::Relaxed));
            sync_counter(
                &self.projection_rows.with_label_values(&[name]),
                p.events.load(Ordering::Relaxed),
            );
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

/// A router serving `GET /metrics` and `GET /healthz` for the workers in `workers`.
pub fn app(workers: WorkerStats) -> Router {
    let families = Arc::new(Families::new(workers));
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let f = families.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        f.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})).into_response() }),
        )
}

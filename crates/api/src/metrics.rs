//! `/metrics`: what an operator graphs, through the `prometheus` crate (one registry per API
//! instance, classic text exposition, valid for `promtool check metrics`).
//!
//! Recorded as things happen: admissions, settlements and JetStream publish+ack latencies
//! (histograms in seconds; the publisher's is shared by every publish of this process), HTTP requests by route and status, refusals by reason, and the
//! latencies of the ledger writer's and projectors' batches when they run in this process.
//! Read at each scrape (each read bounded by [`SCRAPE_READ_TIMEOUT`]): ledger and projection lag
//! in events and seconds, the ledger consumer's pending and redelivered messages, the newest
//! snapshot's age, the spool.

use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::AppState;

/// Bound on each dependency read of a scrape: a hung NATS or Postgres must not hang `/metrics`
/// (the gauge keeps its previous value and the failure is counted).
pub const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What a scrape reads, each counted apart when it fails.
const SCRAPE_SOURCES: [&str; 4] = ["projections", "ledger_lag", "consumer", "snapshot"];

/// Every metric of an API instance.
pub struct Metrics {
    registry: Registry,
    /// Admissions admitted.
    pub admitted: IntCounter,
    /// Admissions refused (by reason: [`Metrics::refused`]).
    pub rejected: IntCounter,
    /// Admissions answered from the idempotency table.
    pub replayed: IntCounter,
    /// Settlements published.
    pub settlements: IntCounter,
    /// Settlements recognised as retries and not published again.
    pub settlement_retries: IntCounter,
    /// Releases published.
    pub releases: IntCounter,
    /// Reservation expiries published by this instance.
    pub expiries: IntCounter,
    /// Times the stream tail failed and resumed.
    pub tail_restarts: IntCounter,
    /// Requests answered 503 because an event could not be published.
    pub unavailable: IntCounter,
    /// `POST /v1/admit`, from the parsed body to the answer.
    pub admission_seconds: Histogram,
    /// `POST /v1/settle`, from the parsed body to the answer.
    pub settlement_seconds: Histogram,
    labelled: Labelled,
    scraped: Scraped,
    workers: WorkerFamilies,
    /// One scrape at a time: two interleaved scrapes would each raise the synced counters by
    /// the same difference and overshoot their sources.
    scrape_lock: tokio::sync::Mutex<()>,
}

/// Families with labels, recorded as requests are answered.
struct Labelled {
    rejections: IntCounterVec,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
}

impl Labelled {
    fn new(r: &Registry) -> Self {
        let l = Labelled {
            rejections: counter_vec(
                r,
                "tally_admission_rejections_total",
                "Admissions refused or not decided, by reason.",
                &["reason"],
            ),
            http_requests: counter_vec(
                r,
                "tally_http_requests_total",
                "HTTP requests by method, route (the matched pattern) and status.",
                &["method", "route", "status"],
            ),
            http_seconds: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tally_http_request_seconds",
                        "HTTP request latency by route, in seconds.",
                    )
                    .buckets(tally_ledger::metrics::LATENCY_BUCKETS_SECONDS.to_vec()),
                    &["route"],
                )
                .expect("constant metric name"),
            ),
        };
        // Every reason at 0 from the start: a series that appears only at its first increment
        // hides that first increment from `rate()`.
        for reason in [
            tally_events::Reason::LimitExceeded,
            tally_events::Reason::SubjectDisabled,
            tally_events::Reason::CreditsExhausted,
            tally_events::Reason::Unavailable,
            tally_events::Reason::UnknownSubject,
        ] {
            l.rejections.with_label_values(&[reason.as_str()]);
        }
        l
    }
}

/// Values read at each scrape.
struct Scraped {
    requests_tracked: IntGauge,
    tail_lag_seconds: Gauge,
    ledger_lag_events: IntGauge,
    ledger_lag_seconds: Gauge,
    projection_lag_events: IntGaugeVec,
    projection_lag_seconds: GaugeVec,
    projection_checkpoint: IntGaugeVec,
    consumer_pending: IntGauge,
    consumer_ack_pending: IntGauge,
    consumer_redelivered: IntGauge,
    snapshot_age_seconds: Gauge,
    spool_pending: IntGauge,
    synced: Synced,
}

/// Counters kept as atomics elsewhere (spool, ledger writer, readers), raised to their values at
/// each scrape; and the scrape's own failures.
struct Synced {
    spool_appended: IntCounter,
    spool_published: IntCounter,
    undecodable_rows: IntCounter,
    scrape_errors: IntCounterVec,
}

/// Register `metric` in `registry`. Names are constants of this build and each is registered
/// once, so registration cannot fail at run time.
pub(crate) fn reg<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are constants, each registered once");
    metric
}

pub(crate) fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(
        r,
        IntCounter::new(name, help).expect("constant metric name"),
    )
}

pub(crate) fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("constant metric name"),
    )
}

pub(crate) fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help).expect("constant metric name"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    reg(r, Gauge::new(name, help).expect("constant metric name"))
}

pub(crate) fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("constant metric name"),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    reg(
        r,
        GaugeVec::new(Opts::new(name, help), labels).expect("constant metric name"),
    )
}

fn seconds(r: &Registry, name: &str, help: &str) -> Histogram {
    reg(r, tally_ledger::metrics::seconds_histogram(name, help, &[]))
}

impl Metrics {
    /// Every family registered, with the workers' histograms when they run in this process.
    pub(crate) fn new(workers: &crate::WorkerStats, publisher: &tally_ledger::Publisher) -> Self {
        let r = Registry::new();
        let m = Metrics {
            admitted: counter(
                &r,
                "tally_admissions_admitted_total",
                "Admissions admitted.",
            ),
            rejected: counter(&r, "tally_admissions_rejected_total", "Admissions refused."),
            replayed: counter(
                &r,
                "tally_admissions_replayed_total",
                "Admissions answered from the idempotency table.",
            ),
            settlements: counter(&r, "tally_settlements_total", "Settlements published."),
            settlement_retries: counter(
                &r,
                "tally_settlement_retries_total",
                "Settlements recognised as retries.",
            ),
            releases: counter(&r, "tally_releases_total", "Releases published."),
            expiries: counter(
                &r,
                "tally_reservation_expiries_total",
                "Reservation expiries published by this instance.",
            ),
            tail_restarts: counter(
                &r,
                "tally_tail_restarts_total",
                "Times the stream tail failed and resumed after its last folded sequence.",
            ),
            unavailable: counter(
                &r,
                "tally_unavailable_total",
                "Requests answered 503: an event could not be published.",
            ),
            admission_seconds: seconds(
                &r,
                "tally_admission_seconds",
                "POST /v1/admit: decision, reservation, publish and ack, in seconds.",
            ),
            settlement_seconds: seconds(
                &r,
                "tally_settlement_seconds",
                "POST /v1/settle: matching, publish and ack, in seconds.",
            ),
            labelled: Labelled::new(&r),
            scraped: Scraped::new(&r),
            workers: WorkerFamilies::new(&r, workers.clone()),
            scrape_lock: tokio::sync::Mutex::new(()),
            registry: r,
        };
        reg(&m.registry, publisher.publish_seconds().clone());
        m
    }

    /// Count a refused (or undecided) admission under `reason`.
    pub fn refused(&self, reason: &str) {
        self.labelled.rejections.with_label_values(&[reason]).inc();
    }

    /// Count one HTTP request.
    pub fn http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        self.labelled
            .http_requests
            .with_label_values(&[method, route, status.as_str()])
            .inc();
        self.labelled
            .http_seconds
            .with_label_values(&[route])
            .observe(seconds);
    }
}

impl Scraped {
    fn new(r: &Registry) -> Self {
        let by_projection = |name, help| int_gauge_vec(r, name, help, &["projection"]);
        let seconds_by_projection = |name, help| gauge_vec(r, name, help, &["projection"]);
        Scraped {
            requests_tracked: int_gauge(
                r,
                "tally_requests_tracked",
                "Requests in the in-memory table.",
            ),
            tail_lag_seconds: gauge(
                r,
                "tally_tail_lag_seconds",
                "How far this instance's quota state trailed the stream at its last message.",
            ),
            ledger_lag_events: int_gauge(
                r,
                "tally_ledger_lag_events",
                "Stream messages not yet in the ledger (stream head minus the writer's watermark).",
            ),
            ledger_lag_seconds: gauge(
                r,
                "tally_ledger_lag_seconds",
                "Age of the oldest stream message not yet in the ledger (0 when caught up).",
            ),
            projection_lag_events: by_projection(
                "tally_projection_lag_events",
                "Ledger rows a projection has not folded yet.",
            ),
            projection_lag_seconds: seconds_by_projection(
                "tally_projection_lag_seconds",
                "Age of the oldest ledger row a projection has not folded (0 when caught up).",
            ),
            projection_checkpoint: by_projection(
                "tally_projection_checkpoint",
                "Projection checkpoint (ledger pos, stream sequence for quota).",
            ),
            consumer_pending: int_gauge(
                r,
                "tally_ledger_consumer_pending_messages",
                "Messages the ledger writer's JetStream consumer has not been delivered yet.",
            ),
            consumer_ack_pending: int_gauge(
                r,
                "tally_ledger_consumer_ack_pending_messages",
                "Messages delivered to the ledger writer and not acknowledged yet.",
            ),
            consumer_redelivered: int_gauge(
                r,
                "tally_ledger_consumer_redelivered_messages",
                "Messages redelivered to the ledger writer and not acknowledged yet.",
            ),
            snapshot_age_seconds: gauge(
                r,
                "tally_snapshot_age_seconds",
                "Age of the newest quota snapshot of this stream (-1: none yet).",
            ),
            spool_pending: int_gauge(
                r,
                "tally_spool_pending_events",
                "Spooled events waiting for NATS (--fail-open).",
            ),
            synced: Synced::new(r),
        }
    }
}

impl Synced {
    fn new(r: &Registry) -> Self {
        let s = Synced {
            spool_appended: counter(
                r,
                "tally_spool_appended_total",
                "Events spooled to local disk because NATS could not take them (--fail-open).",
            ),
            spool_published: counter(
                r,
                "tally_spool_published_total",
                "Spooled events published to JetStream.",
            ),
            undecodable_rows: counter(
                r,
                "tally_ledger_undecodable_rows_total",
                "Ledger rows readers in this process skipped because they did not decode.",
            ),
            scrape_errors: counter_vec(
                r,
                "tally_metrics_scrape_errors_total",
                "Reads of a scrape that failed or timed out, by source.",
                &["source"],
            ),
        };
        // Every source at 0 from the start (see `Labelled::new`).
        for source in SCRAPE_SOURCES {
            s.scrape_errors.with_label_values(&[source]);
        }
        s
    }
}

/// The families of the workers running in this process: their batch histograms and the ledger
/// writer's counters (atomics of the writer, raised to them at each scrape). Shared by an API
/// instance's `/metrics` and a worker process's (`crate::worker_metrics`).
pub(crate) struct WorkerFamilies {
    workers: crate::WorkerStats,
    ledger_rows: IntCounter,
    ledger_duplicates: IntCounter,
    ledger_rejects: IntCounter,
    ledger_batches: IntCounter,
    ledger_resubscribes: IntCounter,
    ledger_checkpoint: IntGauge,
}

impl WorkerFamilies {
    pub(crate) fn new(r: &Registry, workers: crate::WorkerStats) -> Self {
        if let Some(l) = &workers.ledger {
            reg(r, l.batch_commit_seconds.clone());
        }
        for (_, _, p) in &workers.projectors {
            reg(r, p.batch_seconds.clone());
        }
        let w = "(writer in this process)";
        WorkerFamilies {
            ledger_rows: counter(
                r,
                "tally_ledger_rows_appended_total",
                &format!("Ledger rows appended {w}."),
            ),
            ledger_duplicates: counter(
                r,
                "tally_ledger_duplicates_total",
                &format!("Messages already in the ledger {w}."),
            ),
            ledger_rejects: counter(
                r,
                "tally_ledger_rejects_total",
                &format!("Messages dead-lettered {w}."),
            ),
            ledger_batches: counter(
                r,
                "tally_ledger_batches_total",
                &format!("Ledger batches committed {w}."),
            ),
            ledger_resubscribes: counter(
                r,
                "tally_ledger_resubscribes_total",
                &format!("Pull subscriptions replaced after falling silent {w}."),
            ),
            ledger_checkpoint: int_gauge(
                r,
                "tally_ledger_checkpoint",
                &format!("Last committed stream sequence {w}."),
            ),
            workers,
        }
    }

    /// The workers, for families a caller adds (projection checkpoints of a worker process).
    pub(crate) fn workers(&self) -> &crate::WorkerStats {
        &self.workers
    }

    /// Raise the ledger writer's counters to its atomics.
    pub(crate) fn sync(&self) {
        let Some(l) = &self.workers.ledger else {
            return;
        };
        sync_counter(&self.ledger_rows, l.rows_appended.load(Ordering::Relaxed));
        sync_counter(
            &self.ledger_duplicates,
            l.duplicates.load(Ordering::Relaxed),
        );
        sync_counter(&self.ledger_rejects, l.rejects.load(Ordering::Relaxed));
        sync_counter(&self.ledger_batches, l.batches.load(Ordering::Relaxed));
        sync_counter(
            &self.ledger_resubscribes,
            l.resubscribes.load(Ordering::Relaxed),
        );
        self.ledger_checkpoint
            .set(i64::try_from(l.checkpoint.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }
}

/// Raise `c` to `total` (a counter kept as an atomic elsewhere, which only grows).
pub(crate) fn sync_counter(c: &IntCounter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

/// Read what is read at scrape time, then render every family.
pub async fn render(state: &AppState) -> String {
    let inner = &state.0;
    let _one_at_a_time = inner.metrics.scrape_lock.lock().await;
    let s = &inner.metrics.scraped;
    s.requests_tracked.set(inner.requests.len() as i64);
    s.tail_lag_seconds
        .set(inner.tail_lag_ms.load(Ordering::Relaxed) as f64 / 1e3);
    sync_counter(
        &s.synced.undecodable_rows,
        tally_ledger::reader::undecodable_rows(),
    );
    if let Some(sp) = &inner.spool {
        s.spool_pending.set(sp.pending() as i64);
        sync_counter(&s.synced.spool_appended, sp.appended_total());
        sync_counter(&s.synced.spool_published, sp.published_total());
    }
    inner.metrics.workers.sync();
    let failed = |source: &str| s.synced.scrape_errors.with_label_values(&[source]).inc();
    if bounded(read_projections(state)).await.is_none() {
        failed("projections");
    }
    if bounded(read_ledger_lag(state)).await.is_none() {
        failed("ledger_lag");
    }
    if bounded(read_consumer(state)).await.is_none() {
        failed("consumer");
    }
    if bounded(read_snapshot_age(state)).await.is_none() {
        failed("snapshot");
    }
    TextEncoder::new()
        .encode_to_string(&inner.metrics.registry.gather())
        .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
}

/// `read` within [`SCRAPE_READ_TIMEOUT`]; None when it failed or timed out.
async fn bounded<F: Future<Output = Option<()>>>(read: F) -> Option<()> {
    tokio::time::timeout(SCRAPE_READ_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

async fn read_projections(state: &AppState) -> Option<()> {
    let s = &state.0.metrics.scraped;
    let mut ok = true;
    for e in tally_projector::registry::REGISTRY {
        match tally_projector::runner::lag(&state.0.db, e.name, e.order).await {
            Ok(Some(lag)) => {
                s.projection_lag_events
                    .with_label_values(&[e.name])
                    .set(lag.rows);
                s.projection_lag_seconds
                    .with_label_values(&[e.name])
                    .set(lag.seconds);
                s.projection_checkpoint
                    .with_label_values(&[e.name])
                    .set(lag.checkpoint);
            }
            Ok(None) => {} // not built (yet) in this deployment
            Err(_) => ok = false,
        }
    }
    ok.then_some(())
}

async fn read_ledger_lag(state: &AppState) -> Option<()> {
    let s = &state.0.metrics.scraped;
    let written = tally_ledger::reader::contiguous_seq(&state.0.db)
        .await
        .ok()?;
    let js = state.0.publisher.jetstream();
    let stream = js
        .get_stream(&state.0.publisher.settings().name)
        .await
        .ok()?;
    let head = stream.cached_info().state.last_sequence;
    let behind = head.saturating_sub(written);
    s.ledger_lag_events
        .set(i64::try_from(behind).unwrap_or(i64::MAX));
    let age = if behind == 0 {
        0.0
    } else {
        // The oldest message not in the ledger (it may be gone by retention: then unknown).
        let m = stream
            .get_raw_message(written.saturating_add(1))
            .await
            .ok()?;
        let published = m.time.unix_timestamp_nanos() as f64 / 1e9;
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0) as f64 / 1e9;
        (now - published).max(0.0)
    };
    s.ledger_lag_seconds.set(age);
    Some(())
}

async fn read_consumer(state: &AppState) -> Option<()> {
    let s = &state.0.metrics.scraped;
    let js = state.0.publisher.jetstream();
    let stream = js
        .get_stream_no_info(&state.0.publisher.settings().name)
        .await
        .ok()?;
    let consumer = tally_ledger::WriterSettings::default().consumer;
    let info = stream.consumer_info(&consumer).await.ok()?;
    s.consumer_pending
        .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
    s.consumer_ack_pending
        .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
    s.consumer_redelivered
        .set(i64::try_from(info.num_redelivered).unwrap_or(i64::MAX));
    Some(())
}

async fn read_snapshot_age(state: &AppState) -> Option<()> {
    let age: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM clock_timestamp() - max(taken_at))::float8 \
         FROM quota_snapshots WHERE stream = $1",
    )
    .bind(&state.0.publisher.settings().name)
    .fetch_one(&state.0.db)
    .await
    .ok()?;
    state
        .0
        .metrics
        .scraped
        .snapshot_age_seconds
        .set(age.map_or(-1.0, |a| a.max(0.0)));
    Some(())
}

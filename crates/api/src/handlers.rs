//! Data-plane handlers: admit, settle, release, usage and request reads.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tally_events::*;

use crate::AppState;
use crate::body::{JsonBody, Params};
use crate::error::ApiError;

/// `estimate` / `usage` objects of the API: every amount optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmountsIn {
    requests: Option<i64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cost: Option<i64>,
    credits: Option<i64>,
}

impl AmountsIn {
    fn into_usage(self, default_requests: i64, field: &str) -> Result<Usage, ApiError> {
        let u = Usage {
            requests: self.requests.unwrap_or(default_requests),
            input_tokens: self.input_tokens.unwrap_or(0),
            output_tokens: self.output_tokens.unwrap_or(0),
            cost: self.cost.unwrap_or(0),
            credits: self.credits.unwrap_or(0),
        };
        u.validate(field)?;
        Ok(u)
    }
}

/// `POST /v1/admit` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitIn {
    request_id: String,
    subject: String,
    model: Option<String>,
    #[serde(default)]
    estimate: AmountsIn,
    at: Option<DateTime<Utc>>,
}

fn subject_field(field: &str, text: &str) -> Result<Subject, ApiError> {
    Subject::parse(text).map_err(|m| ApiError::invalid(field, m))
}

fn name_field(field: &str, value: Option<&str>) -> Result<(), ApiError> {
    value
        .map_or(Ok(()), |v| validate_name(field, v))
        .map_err(Into::into)
}

impl AppState {
    /// The event time of a request: `at` (bounded by backfill and skew) or now.
    pub(crate) fn event_time(&self, at: Option<DateTime<Utc>>) -> Result<DateTime<Utc>, ApiError> {
        let now = Utc::now();
        let Some(at) = at else { return Ok(now) };
        let cfg = &self.0.config;
        let backfill =
            chrono::Duration::from_std(cfg.max_backfill).unwrap_or(chrono::Duration::MAX);
        let skew = chrono::Duration::from_std(cfg.max_clock_skew).unwrap_or(chrono::Duration::MAX);
        if at < now - backfill {
            return Err(ApiError::invalid(
                "at",
                format!(
                    "is further in the past than --max-backfill ({:?})",
                    cfg.max_backfill
                ),
            ));
        }
        if at > now + skew {
            return Err(ApiError::invalid(
                "at",
                format!(
                    "is further in the future than --max-clock-skew ({:?})",
                    cfg.max_clock_skew
                ),
            ));
        }
        Ok(at)
    }

    /// Make `env` durable before the caller answers: published to JetStream with its ack, or,
    /// with `--fail-open`, fsynced to the local spool while NATS cannot take it (and while older
    /// spooled events still wait, so order holds). Fail-closed otherwise.
    pub(crate) async fn publish(&self, env: &Envelope) -> Result<(), ApiError> {
        let connected = self.0.nats.connection_state() == async_nats::connection::State::Connected;
        if let Some(spool) = &self.0.spool {
            if connected && spool.pending() == 0 {
                match self.publish_while_connected(env).await {
                    Ok(_) => return Ok(()),
                    Err(tally_ledger::Error::InvalidEvent(e)) => return Err(e.into()),
                    // The ack may still have been lost after the server stored it; the spooled
                    // copy then carries the same id and is deduplicated.
                    Err(e) => tracing::warn!(error = %e, "publish failed; spooling"),
                }
            }
            return spool.append(env).await.map_err(|e| {
                self.metrics().unavailable.fetch_add(1, Ordering::Relaxed);
                ApiError::from(e)
            });
        }
        self.publish_direct(env).await
    }

    /// Publish and await the ack, never spooling: fail-closed. Admin writes always take this
    /// path, since a configuration change held in one instance's spool would leave the instances
    /// deciding under different rules for the whole outage.
    pub(crate) async fn publish_direct(&self, env: &Envelope) -> Result<(), ApiError> {
        let connected = self.0.nats.connection_state() == async_nats::connection::State::Connected;
        // While the connection is down the client would buffer the message and send it after
        // reconnecting, possibly after we answered 503: refuse at once instead, so an event we
        // reported as not recorded does not appear later.
        if !connected {
            self.metrics().unavailable.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Unavailable("NATS is disconnected".into()));
        }
        self.publish_while_connected(env).await.map_err(|e| {
            self.metrics().unavailable.fetch_add(1, Ordering::Relaxed);
            ApiError::from(e)
        })
    }

    /// Publish and await the ack, but stop waiting as soon as the connection drops: the client
    /// would otherwise hold the caller for the whole ack timeout. The message may still reach the
    /// stream after the reconnect; the answer then says 503 for an event that landed, and a retry
    /// with the same request id returns what was recorded (a spooled copy has the same id and is
    /// deduplicated).
    async fn publish_while_connected(&self, env: &Envelope) -> Result<(), tally_ledger::Error> {
        let nats = &self.0.nats;
        let dropped = async {
            loop {
                tokio::time::sleep(CONNECTION_POLL).await;
                if nats.connection_state() != async_nats::connection::State::Connected {
                    return;
                }
            }
        };
        tokio::select! {
            r = self.0.publisher.publish(env) => r.map(drop),
            _ = dropped => Err(tally_ledger::Error::Publish(
                "NATS disconnected before the ack arrived".into(),
            )),
        }
    }

    fn slot(&self, request_id: &str) -> Result<crate::table::Slot, ApiError> {
        self.requests()
            .slot(request_id)
            .ok_or_else(|| ApiError::Unavailable("request table full".into()))
    }
}

/// How often a publish awaiting its ack checks the connection: bounds how long a request waits
/// after NATS went away (instead of the whole ack timeout).
pub const CONNECTION_POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn admission_body(view: &RequestView, replayed: bool) -> serde_json::Value {
    let a = view.admission.as_ref().expect("admission present");
    json!({
        "admitted": a.admitted,
        "request_id": view.request_id,
        "admission_id": a.admission_id,
        "reason": a.reason,
        "retry_after_seconds": a.retry_after_seconds,
        "counted_in_key_global": a.counted_in_key_global,
        "counted_in_user_global": a.counted_in_user_global,
        "replayed": replayed,
        "checks": a.checks,
    })
}

/// `POST /v1/admit`: decide against the live quota state, reserve under the same lock, publish
/// the decision and await the ack, then answer. Idempotent by `request_id`.
#[tracing::instrument(skip_all, fields(request_id = %body.request_id))]
pub async fn admit(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<AdmitIn>,
) -> Result<Response, ApiError> {
    validate_name("request_id", &body.request_id)?;
    let leaf = subject_field("subject", &body.subject)?;
    name_field("model", body.model.as_deref())?;
    let credits = body.estimate.credits;
    let estimate = body.estimate.into_usage(1, "estimate")?;
    let at = state.event_time(body.at)?;
    if !state.0.tail_ready.load(Ordering::Relaxed) {
        // Deciding on a state still being rebuilt would admit past limits.
        return Err(ApiError::Unavailable("quota state is still loading".into()));
    }
    let slot = state.slot(&body.request_id)?;
    let mut view = slot.lock().await;
    if view.admission.is_some() {
        state.metrics().replayed.fetch_add(1, Ordering::Relaxed);
        return Ok(Json(admission_body(&view, true)).into_response());
    }
    if let Some(env) = state.take_in_doubt(&body.request_id) {
        return state.resend_in_doubt(env, &mut view).await;
    }
    let (env, alerts) = {
        let mut q = state.quota();
        let d = q.decide_with(
            &tally_events::quota::AdmitRequest {
                leaf: &leaf,
                model: body.model.as_deref(),
                estimate,
                credits,
                at,
            },
            state.0.config.unknown_subjects,
        );
        let env = Envelope::with_id(at, Some(body.request_id.clone()), Some(leaf), |id| {
            EventData::AdmissionDecided(AdmissionDecided {
                admission_id: id,
                admitted: d.admitted,
                reason: d.reason,
                retry_after_seconds: d.retry_after_seconds,
                model: body.model,
                model_group: d.model_group,
                chain: d.chain,
                estimate: d.estimate,
                counted_in_key_global: d.counted_in_key_global,
                counted_in_user_global: d.counted_in_user_global,
                checks: d.checks,
                received_at: Utc::now(),
            })
        });
        q.apply(&env);
        (env, d.alerts)
    };
    if let Err(e) = state.publish(&env).await {
        state.quota().forget(&body.request_id);
        if matches!(e, ApiError::Unavailable(_)) {
            state.keep_in_doubt(env);
        }
        return Err(unavailable_admission(e, &body.request_id));
    }
    view.apply(&env);
    let admitted = view.admission.as_ref().is_some_and(|a| a.admitted);
    let counter = if admitted {
        &state.metrics().admitted
    } else {
        &state.metrics().rejected
    };
    counter.fetch_add(1, Ordering::Relaxed);
    state.publish_alerts(alerts, at).await;
    Ok(Json(admission_body(&view, false)).into_response())
}

/// Most admissions kept in doubt at once: an outage with many clients retrying; beyond it a
/// retry decides afresh (the earlier behaviour) rather than letting memory grow without bound.
pub const MAX_IN_DOUBT: usize = 100_000;

impl AppState {
    /// Remember an admission whose publish failed: it may still land (see `in_doubt`).
    fn keep_in_doubt(&self, env: Envelope) {
        let Some(rid) = env.request_id.clone() else {
            return;
        };
        let mut m = self.0.in_doubt.lock().expect("in-doubt lock");
        if m.len() < MAX_IN_DOUBT {
            m.insert(rid, (std::time::Instant::now(), env));
        }
    }

    fn take_in_doubt(&self, request_id: &str) -> Option<Envelope> {
        let mut m = self.0.in_doubt.lock().expect("in-doubt lock");
        m.remove(request_id).map(|(_, env)| env)
    }

    /// Drop in-doubt admissions older than `horizon` (their reservations would have expired).
    pub fn sweep_in_doubt(&self, horizon: std::time::Duration) {
        let mut m = self.0.in_doubt.lock().expect("in-doubt lock");
        m.retain(|_, (at, _)| at.elapsed() < horizon);
    }

    /// A retry of an admission whose first publish was in doubt: publish the same event again
    /// (deduplicated if the first copy landed) and answer with its decision.
    async fn resend_in_doubt(
        &self,
        env: Envelope,
        view: &mut RequestView,
    ) -> Result<Response, ApiError> {
        let rid = env.request_id.clone().unwrap_or_default();
        self.quota().apply(&env);
        if let Err(e) = self.publish(&env).await {
            self.quota().forget(&rid);
            if matches!(e, ApiError::Unavailable(_)) {
                self.keep_in_doubt(env);
            }
            return Err(unavailable_admission(e, &rid));
        }
        view.apply(&env);
        self.metrics().replayed.fetch_add(1, Ordering::Relaxed);
        Ok(Json(admission_body(view, true)).into_response())
    }

    /// Publish `threshold.crossed` for each first crossing. The event id is derived from the
    /// pool and window, so instances that race on the same crossing publish one event (JetStream
    /// de-duplicates on the id, the ledger on its key). Best effort: a failure is logged, the
    /// admission stands.
    async fn publish_alerts(&self, alerts: Vec<ThresholdCrossed>, at: DateTime<Utc>) {
        for a in alerts {
            let key = format!(
                "{}|{}|{:?}",
                a.policy_id,
                a.subject,
                a.window.map(|w| w.start)
            );
            let mut env = Envelope::new(
                EventData::ThresholdCrossed(a.clone()),
                at,
                None,
                Some(a.subject.clone()),
            );
            env.id = derived_id(&key);
            match self.publish(&env).await {
                Ok(()) => self.quota().apply(&env),
                Err(e) => {
                    tracing::warn!(error = %e, policy_id = %a.policy_id, "threshold alert not published")
                }
            }
        }
    }
}

/// A stable event id for a fact several instances may publish at once (an alert, an expiry):
/// UUID v8 from two FNV-1a hashes of `key`, so JetStream and the ledger keep one copy.
pub(crate) fn derived_id(key: &str) -> uuid::Uuid {
    let h = |seed: u64| {
        key.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&h(0xcbf2_9ce4_8422_2325).to_be_bytes());
    bytes[8..].copy_from_slice(&h(0x8422_2325_cbf2_9ce4).to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// SPEC §4.5: an admission that could not be recorded answers `503 {"reason":"unavailable"}`.
fn unavailable_admission(e: ApiError, request_id: &str) -> ApiError {
    match e {
        ApiError::Unavailable(detail) => {
            tracing::warn!(%detail, request_id, "admission not recorded");
            ApiError::Unavailable(detail)
        }
        other => other,
    }
}

/// `POST /v1/settle` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleIn {
    request_id: String,
    #[serde(default)]
    usage: AmountsIn,
    success: Option<bool>,
    #[serde(rename = "final")]
    is_final: Option<bool>,
    seq: Option<u32>,
    settlement_id: Option<String>,
    subject: Option<String>,
    model: Option<String>,
    at: Option<DateTime<Utc>>,
}

/// `POST /v1/settle`: replaces the reservation with actual usage (or adds a streaming chunk), or
/// records direct usage when the request was never admitted.
#[tracing::instrument(skip_all, fields(request_id = %body.request_id))]
pub async fn settle(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<SettleIn>,
) -> Result<Response, ApiError> {
    validate_name("request_id", &body.request_id)?;
    let subject = body
        .subject
        .as_deref()
        .map(|s| subject_field("subject", s))
        .transpose()?;
    name_field("model", body.model.as_deref())?;
    name_field("settlement_id", body.settlement_id.as_deref())?;
    let (success, is_final, seq) = (
        body.success.unwrap_or(true),
        body.is_final.unwrap_or(true),
        body.seq.unwrap_or(0),
    );
    // The request itself is counted once, on the successful final settlement.
    let credits_given = body.usage.credits.is_some();
    let mut usage = body
        .usage
        .into_usage(i64::from(success && is_final), "usage")?;
    let at = state.event_time(body.at)?;
    let settlement_id = body
        .settlement_id
        .unwrap_or_else(|| format!("{}:{seq}", body.request_id));
    let slot = state.slot(&body.request_id)?;
    let mut view = slot.lock().await;
    let matched = view.admission.is_some();
    if view.has_settlement(&settlement_id) {
        state
            .metrics()
            .settlement_retries
            .fetch_add(1, Ordering::Relaxed);
        return Ok(settle_accepted(&settlement_id, &body.request_id, matched));
    }
    // A successful final settlement that does not name credits spends what the admission
    // reserved (less what earlier chunks spent): the reservation becomes the charge.
    if let (Some(a), false, true) = (&view.admission, credits_given, success && is_final) {
        usage.credits = (a.estimate.credits - view.settled.credits).max(0);
    }
    let subject = subject.map(|s| {
        let resolved = state.quota().resolve(&s, body.model.as_deref());
        (s, resolved)
    });
    let data = settlement_data(
        &view,
        subject,
        body.model,
        settlement_id.clone(),
        usage,
        (success, is_final, seq),
        at,
    )?;
    let leaf = data.chain[0].clone();
    let env = Envelope::new(
        EventData::UsageSettled(data),
        at,
        Some(body.request_id.clone()),
        Some(leaf),
    );
    state.publish(&env).await?;
    state.quota().apply(&env);
    view.apply(&env);
    state.metrics().settlements.fetch_add(1, Ordering::Relaxed);
    Ok(settle_accepted(&settlement_id, &body.request_id, matched))
}

fn settle_accepted(settlement_id: &str, request_id: &str, matched: bool) -> Response {
    let body = json!({"settlement_id": settlement_id, "request_id": request_id, "matched_admission": matched});
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

fn settlement_data(
    view: &RequestView,
    subject: Option<(Subject, tally_events::quota::Resolved)>,
    model: Option<String>,
    settlement_id: String,
    usage: Usage,
    (success, is_final, seq): (bool, bool, u32),
    at: DateTime<Utc>,
) -> Result<UsageSettled, ApiError> {
    let mut data = UsageSettled {
        settlement_id,
        usage,
        success,
        is_final,
        seq,
        matched_admission: false,
        admission_id: None,
        model,
        model_group: None,
        chain: Vec::new(),
        counted_in_key_global: true,
        counted_in_user_global: true,
        window_at: at,
    };
    match (&view.admission, subject) {
        (Some(a), s) => {
            if s.is_some_and(|(s, _)| Some(&s) != a.chain.first()) {
                return Err(ApiError::invalid(
                    "subject",
                    "does not match the admitted request's subject",
                ));
            }
            data.matched_admission = true;
            data.admission_id = Some(a.admission_id);
            data.model = a.model.clone();
            data.model_group = a.model_group.clone();
            data.chain = a.chain.clone();
            data.counted_in_key_global = a.counted_in_key_global;
            data.counted_in_user_global = a.counted_in_user_global;
            data.window_at = view.admitted_at.expect("admitted_at set with admission");
        }
        (None, Some((_, direct))) => {
            // Direct usage: chain, model group and flags as of its own time (SPEC §5).
            data.chain = direct.chain;
            data.model_group = direct.model_group;
            data.counted_in_key_global = direct.counted_in_key_global;
            data.counted_in_user_global = direct.counted_in_user_global;
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "subject",
                "is required for usage without an admission (direct usage)",
            ));
        }
    }
    Ok(data)
}

/// `POST /v1/release` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseIn {
    request_id: String,
}

/// `POST /v1/release`: refund the reservation of an admitted, unsettled request. Idempotent.
#[tracing::instrument(skip_all, fields(request_id = %body.request_id))]
pub async fn release(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<ReleaseIn>,
) -> Result<Response, ApiError> {
    validate_name("request_id", &body.request_id)?;
    let not_found = || ApiError::NotFound {
        what: "admission".into(),
        field: Some("request_id".into()),
    };
    let slot = state
        .requests()
        .get(&body.request_id)
        .ok_or_else(not_found)?;
    let mut view = slot.lock().await;
    let Some(admission) = &view.admission else {
        return Err(not_found());
    };
    let accepted = |released: bool| {
        (
            StatusCode::ACCEPTED,
            Json(json!({"request_id": body.request_id, "released": released})),
        )
            .into_response()
    };
    if view.is_closed() {
        return Ok(accepted(view.state == RequestState::Released));
    }
    let data = EventData::ReservationReleased(ReservationEnded {
        admission_id: admission.admission_id,
    });
    let env = Envelope::new(
        data,
        Utc::now(),
        Some(body.request_id.clone()),
        view.subject.clone(),
    );
    state.publish(&env).await?;
    state.quota().apply(&env);
    view.apply(&env);
    state.metrics().releases.fetch_add(1, Ordering::Relaxed);
    Ok(accepted(true))
}

/// `GET /v1/usage?subject=&from=&to=&granularity=&model=`: settled usage per bucket.
pub async fn usage(State(state): State<AppState>, params: Params) -> Result<Response, ApiError> {
    let params = params.only(&["subject", "from", "to", "granularity", "model"])?;
    let subject = subject_field("subject", params.required("subject")?)?;
    name_field("model", params.get("model"))?;
    let granularity = match params.get("granularity").unwrap_or("hour") {
        "minute" => tally_projector::Granularity::Minute,
        "hour" => tally_projector::Granularity::Hour,
        "day" => tally_projector::Granularity::Day,
        _ => {
            return Err(ApiError::invalid(
                "granularity",
                "must be minute, hour or day",
            ));
        }
    };
    let to = params.time("to")?.unwrap_or_else(Utc::now);
    let from = params
        .time("from")?
        .unwrap_or(to - chrono::Duration::days(1));
    let series = tally_projector::usage_series(
        &state.0.db,
        subject.as_str(),
        params.get("model"),
        from,
        to,
        granularity,
    )
    .await?;
    Ok(Json(series).into_response())
}

/// `GET /v1/requests/{request_id}`: the admission, its checks, its settlements and its state.
/// Answered from the live table, or from the ledger once the request has left it.
pub async fn request(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
) -> Result<Response, ApiError> {
    validate_name("request_id", &request_id)?;
    if let Some(slot) = state.requests().get(&request_id) {
        let view = slot.lock().await.clone();
        if view.admission.is_some() || !view.settlements.is_empty() {
            return Ok(Json(view).into_response());
        }
    }
    let payloads: Vec<(serde_json::Value,)> =
        sqlx::query_as("SELECT payload FROM ledger WHERE request_id = $1 ORDER BY pos")
            .bind(&request_id)
            .fetch_all(&state.0.db)
            .await?;
    if payloads.is_empty() {
        return Err(ApiError::NotFound {
            what: format!("request `{request_id}`"),
            field: Some("request_id".into()),
        });
    }
    let mut view = RequestView::new(&request_id);
    for (p,) in payloads {
        let env = Envelope::decode(&serde_json::to_vec(&p).expect("json re-encodes"))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        view.apply(&env);
    }
    Ok(Json(view).into_response())
}

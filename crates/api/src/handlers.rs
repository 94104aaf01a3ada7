//! Data-plane writes: admit, settle, release. Each decides on the live quota state, makes its
//! event durable (`durable.rs`) and only then answers. A request this instance does not hold in
//! memory (it was admitted before a restart, or long ago) is recalled from the ledger, so
//! idempotency and late settlements work whatever the request's age (SPEC v2 §5).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_events::quota::{AdmitRequest, Resolved};
use tally_events::rules::MAX_CHECKS;
use tally_events::*;

use crate::AppState;
use crate::body::JsonBody;
use crate::durable::unavailable_admission;
use crate::error::ApiError;

/// `estimate` / `usage` objects of the API: every amount optional, non-negative minor units.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AmountsIn {
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    requests: Option<i64>,
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    input_tokens: Option<i64>,
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    output_tokens: Option<i64>,
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    cost: Option<i64>,
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdmitIn {
    #[schema(min_length = 1, max_length = 256)]
    request_id: String,
    /// The leaf subject, `kind:id`.
    #[schema(pattern = "^[a-z_]{1,32}:[A-Za-z0-9._:@-]{1,128}$")]
    subject: String,
    model: Option<String>,
    #[serde(default)]
    estimate: AmountsIn,
    at: Option<DateTime<Utc>>,
}

pub(crate) fn subject_field(field: &str, text: &str) -> Result<Subject, ApiError> {
    Subject::parse(text).map_err(|m| ApiError::invalid(field, m))
}

pub(crate) fn name_field(field: &str, value: Option<&str>) -> Result<(), ApiError> {
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
        if now
            .checked_sub_signed(backfill)
            .is_some_and(|floor| at < floor)
        {
            return Err(ApiError::invalid(
                "at",
                format!(
                    "is further in the past than --max-backfill ({:?})",
                    cfg.max_backfill
                ),
            ));
        }
        if now.checked_add_signed(skew).is_some_and(|ceil| at > ceil) {
            return Err(ApiError::invalid(
                "at",
                format!(
                    "is further in the future than --max-clock-skew ({:?})",
                    cfg.max_clock_skew
                ),
            ));
        }
        tally_events::rules::validate_instant("at", at)?;
        Ok(at)
    }

    fn slot(&self, request_id: &str) -> Result<crate::table::Slot, ApiError> {
        self.requests()
            .slot(request_id)
            .ok_or_else(|| ApiError::Unavailable("request table full".into()))
    }

    /// Fold the request's ledger rows into `view` (a request admitted before a restart, or one
    /// that left memory long ago). Postgres unreachable is a 503: deciding without knowing
    /// whether the request was admitted could count it twice or as direct usage.
    async fn recall(&self, request_id: &str, view: &mut RequestView) -> Result<(), ApiError> {
        let events = tally_ledger::reader::request_events(&self.0.db, request_id).await?;
        for env in &events {
            view.apply(env);
        }
        Ok(())
    }

    /// `as_of` of an answer (SPEC v2 §6): the last stream event this instance folded and how far
    /// it trailed the stream's head.
    pub(crate) fn as_of(&self) -> AsOf {
        AsOf {
            stream_seq: self.0.tail_seq.load(Ordering::Acquire),
            lag_ms: self.0.tail_lag_ms.load(Ordering::Relaxed),
        }
    }

    fn ready_to_decide(&self) -> Result<(), ApiError> {
        if self.is_broken() {
            return Err(ApiError::Unavailable(
                "the quota state is broken; restart the instance".into(),
            ));
        }
        if !self.0.tail_ready.load(Ordering::Relaxed) {
            // Deciding on a state still being rebuilt would admit past limits.
            return Err(ApiError::Unavailable("quota state is still loading".into()));
        }
        Ok(())
    }
}

/// `as_of` of an answer: the stream sequence this instance has folded and its lag.
#[derive(Serialize)]
pub(crate) struct AsOf {
    stream_seq: u64,
    lag_ms: u64,
}

/// `POST /v1/admit`'s answer (`docs::AdmitOut`), serialized straight from the admission: built as
/// a `serde_json::Value`, its checks were a fifth of the admit handler's time under load.
#[derive(Serialize)]
struct AdmitOut<'a> {
    admitted: bool,
    request_id: &'a str,
    admission_id: uuid::Uuid,
    reason: Option<Reason>,
    retry_after_seconds: Option<i64>,
    counted_in_key_global: bool,
    counted_in_user_global: bool,
    replayed: bool,
    checks: &'a [Check],
    as_of: AsOf,
}

fn admission_body(state: &AppState, view: &RequestView, replayed: bool) -> Response {
    let Some(a) = view.admission.as_ref() else {
        return ApiError::Internal("admission missing from its view".into()).into_response();
    };
    Json(AdmitOut {
        admitted: a.admitted,
        request_id: &view.request_id,
        admission_id: a.admission_id,
        reason: a.reason,
        retry_after_seconds: a.retry_after_seconds,
        counted_in_key_global: a.counted_in_key_global,
        counted_in_user_global: a.counted_in_user_global,
        replayed,
        checks: &a.checks,
        as_of: state.as_of(),
    })
    .into_response()
}

/// `POST /v1/admit`: decide against the live quota state, reserve under the same lock, publish
/// the decision and await the ack, then answer. Idempotent by `request_id`.
#[utoipa::path(post, path = "/v1/admit", tag = "data plane", request_body = AdmitIn,
    security(("bearer" = [])),
    responses((status = 200, description = "Decided (admitted or refused)", body = crate::docs::AdmitOut),
        (status = 409, description = "The configuration applies more checks than allowed", body = crate::docs::ErrorBody),
        crate::docs::DataPlaneErrors))]
#[tracing::instrument(skip_all, fields(request_id = %body.request_id))]
pub async fn admit(state: State<AppState>, JsonBody(body): JsonBody<AdmitIn>) -> Response {
    let info = crate::access::AccessInfo {
        subject: Some(body.subject.clone()),
        request_id: Some(body.request_id.clone()),
    };
    let seconds = state.metrics().admission_seconds.clone();
    timed(seconds, info, async {
        admit_inner(state, JsonBody(body)).await.into_response()
    })
    .await
}

/// Answer with `inner`'s response, its duration observed in `seconds` and tagged with `info` for
/// the access log.
async fn timed(
    seconds: prometheus::Histogram,
    info: crate::access::AccessInfo,
    inner: impl std::future::Future<Output = Response>,
) -> Response {
    let started = std::time::Instant::now();
    let response = inner.await;
    seconds.observe(started.elapsed().as_secs_f64());
    info.tag(response)
}

async fn admit_inner(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<AdmitIn>,
) -> Result<Response, ApiError> {
    validate_name("request_id", &body.request_id)?;
    let leaf = subject_field("subject", &body.subject)?;
    name_field("model", body.model.as_deref())?;
    let credits = body.estimate.credits;
    let estimate = body.estimate.into_usage(1, "estimate")?;
    let at = state.event_time(body.at)?;
    state.ready_to_decide()?;
    let slot = state.slot(&body.request_id)?;
    let mut view = slot.lock().await;
    let now = Utc::now();
    if view.admission.is_none() && state.quota().is_admitted(&body.request_id, now) {
        state.recall(&body.request_id, &mut view).await?;
    }
    if let Some(a) = &view.admission {
        let window = a.received_at.checked_add_signed(state.idempotency());
        if window.is_some_and(|end| now < end) {
            state.metrics().replayed.inc();
            return Ok(admission_body(&state, &view, true));
        }
        // Past its idempotency window the id names a new request (SPEC §4.6).
        *view = RequestView::new(body.request_id.clone()).with_idempotency(state.idempotency());
    }
    if let Some(env) = state.take_in_doubt(&body.request_id) {
        return state.resend_in_doubt(env, &mut view).await;
    }
    let (env, alerts) = {
        let mut q = state.quota();
        let req = AdmitRequest {
            leaf: &leaf,
            model: body.model.as_deref(),
            estimate,
            credits,
            at,
        };
        let d = q.decide_with(&req, state.0.config.unknown_subjects);
        if d.checks.len() > MAX_CHECKS {
            return Err(ApiError::Conflict {
                field: Some("subject".into()),
                message: format!(
                    "the configuration applies {} checks to this request, more than {MAX_CHECKS}",
                    d.checks.len()
                ),
            });
        }
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
        state
            .metrics()
            .refused(tally_events::Reason::Unavailable.as_str());
        return Err(unavailable_admission(e, &body.request_id));
    }
    view.apply(&env);
    state.applied_locally(env.id);
    let admitted = view.admission.as_ref().is_some_and(|a| a.admitted);
    if admitted {
        state.metrics().admitted.inc();
    } else {
        state.metrics().rejected.inc();
        let reason = view.admission.as_ref().and_then(|a| a.reason);
        state
            .metrics()
            .refused(reason.map_or("unknown", |r| r.as_str()));
    }
    state.publish_alerts(alerts, at).await;
    Ok(admission_body(&state, &view, false))
}

impl AppState {
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
        self.metrics().replayed.inc();
        Ok(admission_body(self, view, true))
    }
}

/// `POST /v1/settle` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
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
/// records direct usage when the request was never admitted. A request admitted long ago is
/// matched through the ledger and counted in its admission's windows with its frozen flags.
#[utoipa::path(post, path = "/v1/settle", tag = "data plane", request_body = SettleIn,
    security(("bearer" = [])),
    responses((status = 202, description = "Recorded (or recognised as a retry)", body = crate::docs::SettleOut),
        (status = 409, description = "Too many settlements for one request", body = crate::docs::ErrorBody),
        crate::docs::DataPlaneErrors))]
#[tracing::instrument(skip_all, fields(request_id = %body.request_id))]
pub async fn settle(state: State<AppState>, JsonBody(body): JsonBody<SettleIn>) -> Response {
    let info = crate::access::AccessInfo {
        subject: body.subject.clone(),
        request_id: Some(body.request_id.clone()),
    };
    let seconds = state.metrics().settlement_seconds.clone();
    timed(seconds, info, async {
        settle_inner(state, JsonBody(body)).await.into_response()
    })
    .await
}

async fn settle_inner(
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
    if view.admission.is_none() {
        state.recall(&body.request_id, &mut view).await?;
    }
    let matched = view.admission.is_some();
    if view.has_settlement(&settlement_id) {
        state.metrics().settlement_retries.inc();
        return Ok(settle_accepted(&settlement_id, &body.request_id, matched));
    }
    if view.settlements.len() >= MAX_SETTLEMENTS_PER_REQUEST {
        return Err(ApiError::Conflict {
            field: Some("request_id".into()),
            message: format!(
                "the request already has {MAX_SETTLEMENTS_PER_REQUEST} settlements, the most one request may have"
            ),
        });
    }
    // A successful final settlement that does not name credits spends what the admission
    // reserved (less what earlier chunks spent): the reservation becomes the charge.
    if let (Some(a), false, true) = (&view.admission, credits_given, success && is_final) {
        usage.credits = a
            .estimate
            .credits
            .saturating_sub(view.settled.credits)
            .max(0);
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
    let resolved = Resolved {
        chain: data.chain.clone(),
        model_group: data.model_group.clone(),
        counted_in_key_global: data.counted_in_key_global,
        counted_in_user_global: data.counted_in_user_global,
    };
    let window_at = data.window_at;
    let leaf = data.chain[0].clone();
    let env = Envelope::new(
        EventData::UsageSettled(data),
        at,
        Some(body.request_id.clone()),
        Some(leaf),
    );
    state.publish(&env).await?;
    let alerts = {
        let mut q = state.quota();
        q.apply(&env);
        q.alerts_due(&resolved, window_at)
    };
    view.apply(&env);
    state.applied_locally(env.id);
    state.metrics().settlements.inc();
    state.publish_alerts(alerts, at).await;
    Ok(settle_accepted(&settlement_id, &body.request_id, matched))
}

/// `POST /v1/settle`'s answer (`docs::SettleOut`).
#[derive(Serialize)]
struct SettleOut<'a> {
    settlement_id: &'a str,
    request_id: &'a str,
    matched_admission: bool,
}

fn settle_accepted(settlement_id: &str, request_id: &str, matched: bool) -> Response {
    let body = SettleOut {
        settlement_id,
        request_id,
        matched_admission: matched,
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

fn settlement_data(
    view: &RequestView,
    subject: Option<(Subject, Resolved)>,
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
            // The settlement's model is recorded for reports; pools and flags are the
            // admission's (SPEC §5).
            data.model = data.model.or_else(|| a.model.clone());
            data.model_group = a.model_group.clone();
            data.chain = a.chain.clone();
            data.counted_in_key_global = a.counted_in_key_global;
            data.counted_in_user_global = a.counted_in_user_global;
            data.window_at = view.admitted_at.unwrap_or(at);
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseIn {
    request_id: String,
}

/// `POST /v1/release`: refund the reservation of an admitted, unsettled request. Idempotent: a
/// release of a request already settled, released or expired changes nothing (202).
#[utoipa::path(post, path = "/v1/release", tag = "data plane", request_body = ReleaseIn,
    security(("bearer" = [])),
    responses((status = 202, description = "Released (or nothing to release)", body = crate::docs::ReleaseOut),
        (status = 404, description = "No admission of this request id", body = crate::docs::ErrorBody),
        crate::docs::DataPlaneErrors))]
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
    let slot = state.slot(&body.request_id)?;
    let mut view = slot.lock().await;
    if view.admission.is_none() {
        state.recall(&body.request_id, &mut view).await?;
    }
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
    state.metrics().releases.inc();
    Ok(accepted(true))
}

//! Data-plane reads: usage series (a projection), one request, and what an admission would see.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;
use tally_events::quota::AdmitRequest;
use tally_events::*;

use crate::AppState;
use crate::body::{Params, PathParam};
use crate::error::ApiError;
use crate::handlers::{name_field, subject_field};

/// `GET /v1/usage?subject=&from=&to=&granularity=&model=`: settled usage per bucket.
#[utoipa::path(get, path = "/v1/usage", tag = "data plane", security(("bearer" = [])),
    params(("subject" = String, Query, description = "A chain subject, e.g. `key:k1`"),
        ("from" = Option<String>, Query, description = "RFC 3339; default `to` minus one day"),
        ("to" = Option<String>, Query, description = "RFC 3339; default now"),
        ("granularity" = Option<String>, Query, description = "`minute`, `hour` (default) or `day`"),
        ("model" = Option<String>, Query, description = "Only this model")),
    responses((status = 200, description = "Settled usage per bucket", body = serde_json::Value), crate::docs::DataPlaneErrors))]
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
    let from = match params.time("from")? {
        Some(f) => f,
        None => to
            .checked_sub_signed(chrono::Duration::days(1))
            .ok_or_else(|| ApiError::invalid("to", "is too early"))?,
    };
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
#[utoipa::path(get, path = "/v1/requests/{request_id}", tag = "data plane", security(("bearer" = [])),
    params(("request_id" = String, Path, description = "The gateway's request id")),
    responses((status = 200, description = "The admission, its checks, its settlements and its state", body = serde_json::Value),
        (status = 404, description = "No such request", body = crate::docs::ErrorBody), crate::docs::DataPlaneErrors))]
pub async fn request(
    State(state): State<AppState>,
    PathParam(request_id): PathParam,
) -> Result<Response, ApiError> {
    validate_name("request_id", &request_id)?;
    let live = match state.requests().get(&request_id) {
        Some(slot) => Some(slot.lock().await.clone()),
        None => None,
    };
    // A view without its admission may be a request that left the table and came back with a
    // later event only (the table drops idle requests at its bound): the ledger has it whole.
    if let Some(view) = &live
        && view.admission.is_some()
    {
        return Ok(Json(view).into_response());
    }
    let events = tally_ledger::reader::request_events(&state.0.db, &request_id).await?;
    if events.is_empty() {
        if let Some(view) = live.filter(|v| !v.settlements.is_empty()) {
            return Ok(Json(view).into_response()); // direct usage the ledger has not caught up on
        }
        return Err(ApiError::NotFound {
            what: format!("request `{request_id}`"),
            field: Some("request_id".into()),
        });
    }
    let mut view = RequestView::new(&request_id).with_idempotency(state.idempotency());
    for env in &events {
        view.apply(env);
    }
    Ok(Json(view).into_response())
}

/// `GET /v1/quota?subject=&model=&at=`: what an admission of one request at `at` would see.
#[utoipa::path(get, path = "/v1/quota", tag = "data plane", security(("bearer" = [])),
    params(("subject" = String, Query, description = "The leaf subject"),
        ("model" = Option<String>, Query, description = "The model (selects model-group policies)"),
        ("at" = Option<String>, Query, description = "RFC 3339; default now")),
    responses((status = 200, description = "Usage and remaining quota per pool", body = crate::docs::QuotaOut), crate::docs::DataPlaneErrors))]
pub async fn quota(State(state): State<AppState>, params: Params) -> Result<Response, ApiError> {
    let params = params.only(&["subject", "model", "at"])?;
    let subject = subject_field("subject", params.required("subject")?)?;
    let model = params.get("model");
    name_field("model", model)?;
    let at = state.event_time(params.time("at")?)?;
    let q = state.quota();
    let d = q.decide(&AdmitRequest {
        leaf: &subject,
        model,
        estimate: Usage {
            requests: 1,
            ..Usage::default()
        },
        credits: Some(0),
        at,
    });
    drop(q);
    Ok(Json(json!({
        "subject": subject,
        "at": at,
        "chain": d.chain,
        "model_group": d.model_group,
        "disabled": d.disabled,
        "counted_in_key_global": d.counted_in_key_global,
        "counted_in_user_global": d.counted_in_user_global,
        "checks": d.checks,
        "as_of": state.as_of(),
    }))
    .into_response())
}

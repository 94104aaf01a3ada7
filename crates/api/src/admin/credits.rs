//! `POST /v1/credits/{subject}` (SPEC v2 §6): set, increment, decrement, clear; idempotent by
//! `id`; at an event time `at`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tally_events::quota::CreditAnswer;
use tally_events::rules::{validate_chain_subject, validate_credits, validate_id};
use tally_events::*;

use super::{double_option, subject_param};
use crate::AppState;
use crate::body::{JsonBody, PathParam};
use crate::error::ApiError;

/// `POST /v1/credits/{subject}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsIn {
    id: Option<String>,
    /// `set`, `increment`, `decrement` or `clear`.
    #[schema(value_type = String, pattern = "^(set|increment|decrement|clear)$")]
    op: CreditOp,
    amount: Option<i64>,
    #[serde(default, deserialize_with = "double_option")]
    /// The refill schedule; absent keeps it, `null` removes it.
    #[schema(value_type = Option<Object>)]
    refill: Option<Option<Refill>>,
    at: Option<DateTime<Utc>>,
}

fn answer_body(a: &CreditAnswer) -> Response {
    Json(json!({"subject": a.subject, "remaining": a.remaining, "refill": a.refill}))
        .into_response()
}

/// `POST /v1/credits/{subject}`: `refill` absent keeps the schedule, `null` removes it; the same
/// `id` again returns the first answer and changes nothing.
#[utoipa::path(post, path = "/v1/credits/{subject}", tag = "admin", request_body = CreditsIn,
    security(("bearer" = [])), params(("subject" = String, Path, description = "A chain subject")),
    responses((status = 200, description = "The balance after the change", body = crate::docs::CreditsOut), crate::docs::AdminErrors))]
pub async fn post_credits(
    State(state): State<AppState>,
    PathParam(subject): PathParam,
    JsonBody(body): JsonBody<CreditsIn>,
) -> Result<Response, ApiError> {
    let subject = subject_param("subject", &subject)?;
    validate_chain_subject("subject", &subject)?;
    if let Some(id) = &body.id {
        validate_id("id", id)?;
    }
    let amount = match (body.op, body.amount) {
        (_, Some(a)) => a,
        (CreditOp::Clear, None) => 0,
        (_, None) => return Err(ApiError::invalid("amount", "is required for this op")),
    };
    let at = state.event_time(body.at)?;
    let admin = state.admin_guard().await;
    if let Some(first) = body
        .id
        .as_deref()
        .and_then(|id| state.quota().credit_write(id).cloned())
    {
        return Ok(answer_body(&first));
    }
    let current = state.quota().account(&subject).and_then(|a| a.refill);
    let refill = match body.op {
        CreditOp::Clear => body.refill.flatten(),
        _ => body.refill.unwrap_or(current),
    };
    let data = CreditsAdjusted {
        id: body.id.clone(),
        op: body.op,
        amount,
        refill,
    };
    validate_credits("", &data)?;
    let env = Envelope::new(
        EventData::CreditsAdjusted(data),
        at,
        None,
        Some(subject.clone()),
    );
    state.write_config(&admin, env).await?;
    let q = state.quota();
    let answer = match body.id.as_deref().and_then(|id| q.credit_write(id)) {
        Some(a) => a.clone(),
        None => CreditAnswer {
            remaining: q.account(&subject).map(|a| a.remaining_at(at)),
            refill: q.account(&subject).and_then(|a| a.refill),
            subject,
        },
    };
    Ok(answer_body(&answer))
}

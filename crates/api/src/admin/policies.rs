//! `PUT`, `DELETE /v1/policies/{id}`, `GET /v1/policies`, `POST /v1/policies/{id}/reset`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tally_events::quota::{MAX_POLICIES_PER_SUBJECT, QuotaState};
use tally_events::rules::{validate_id, validate_policy};
use tally_events::window::minute_floor;
use tally_events::*;

use super::subject_param;
use crate::AppState;
use crate::body::{JsonBody, Params, PathParam};
use crate::error::ApiError;

/// `PUT /v1/policies/{id}` body: the whole policy (absent optional fields take their defaults).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyIn {
    subject: String,
    model_group: Option<String>,
    /// `requests`, `input_tokens`, `output_tokens`, `tokens`, `cost` or `credits`.
    #[schema(value_type = String)]
    metric: Metric,
    /// Required, an integer > 0: a policy without a limit would enforce nothing.
    // An `Option` only so that a missing limit gets that message rather than serde's.
    #[schema(value_type = i64, required = true)]
    limit: Option<i64>,
    /// `{"kind": "rolling"|"calendar"|"periodic"|"lifetime", …}` (SPEC §3).
    #[schema(value_type = Object)]
    window: Window,
    /// `strict` or `graceful`.
    #[schema(value_type = Option<String>)]
    boundary: Option<Boundary>,
    /// `reject`, `disable` or `alert`.
    #[schema(value_type = Option<String>)]
    on_exhausted: Option<OnExhausted>,
    enabled: Option<bool>,
}

/// A periodic window without an anchor gets one fixed now (SPEC v2 §3): the stored policy's
/// anchor when it already is periodic (a later `PUT` keeps it), else the current minute.
fn fix_anchor(window: Window, stored: Option<&Window>) -> Window {
    match window {
        Window::Periodic {
            every,
            anchor: None,
        } => {
            let kept = match stored {
                Some(Window::Periodic { anchor, .. }) => *anchor,
                _ => None,
            };
            Window::Periodic {
                every,
                anchor: Some(kept.unwrap_or_else(|| minute_floor(Utc::now()))),
            }
        }
        w => w,
    }
}

/// `PUT /v1/policies/{id}`: a policy without a positive integer limit is a 400, never a bypass.
#[utoipa::path(put, path = "/v1/policies/{id}", tag = "admin", request_body = PolicyIn,
    security(("bearer" = [])), params(("id" = String, Path, description = "The policy's id")),
    responses((status = 200, description = "The policy as stored", body = serde_json::Value), crate::docs::AdminErrors))]
pub async fn put_policy(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    JsonBody(body): JsonBody<PolicyIn>,
) -> Result<Response, ApiError> {
    validate_id("id", &id)?;
    let subject = subject_param("subject", &body.subject)?;
    let Some(limit) = body.limit else {
        return Err(ApiError::invalid(
            "limit",
            "is required: a policy without a limit would enforce nothing",
        ));
    };
    let admin = state.admin_guard().await;
    let stored = state
        .quota()
        .config
        .policy(&id)
        .map(|p| p.data.window.clone());
    let data = PolicyUpserted {
        policy_id: id.clone(),
        subject,
        model_group: body.model_group,
        metric: body.metric,
        limit,
        window: fix_anchor(body.window, stored.as_ref()),
        boundary: body.boundary.unwrap_or_default(),
        on_exhausted: body.on_exhausted.unwrap_or_default(),
        enabled: body.enabled.unwrap_or(true),
    };
    validate_policy("", &data)?;
    check_against_config(&state.quota(), &data)?;
    let env = Envelope::new(
        EventData::PolicyUpserted(data.clone()),
        Utc::now(),
        None,
        Some(data.subject.clone()),
    );
    state.write_config(&admin, env).await?;
    Ok(Json(policy_body(&state, &id)).into_response())
}

/// The rules that need the stored configuration: the model group exists, the subject has room.
fn check_against_config(q: &QuotaState, data: &PolicyUpserted) -> Result<(), ApiError> {
    if let Some(g) = &data.model_group
        && q.config.model_group(g).is_none()
    {
        return Err(ApiError::invalid(
            "model_group",
            format!("model group `{g}` does not exist"),
        ));
    }
    let others = q
        .config
        .policies_of(&data.subject)
        .filter(|p| p.data.policy_id != data.policy_id)
        .count();
    if others >= MAX_POLICIES_PER_SUBJECT {
        return Err(ApiError::Conflict {
            field: Some("subject".into()),
            message: format!(
                "`{}` already has {MAX_POLICIES_PER_SUBJECT} policies, the most one subject may have",
                data.subject
            ),
        });
    }
    Ok(())
}

fn policy_body(state: &AppState, id: &str) -> serde_json::Value {
    let q = state.quota();
    match q.config.policy(id) {
        Some(p) => {
            let mut v = serde_json::to_value(&p.data).unwrap_or_default();
            v["id"] = json!(id);
            v["created_at"] = json!(p.created_at);
            v
        }
        None => serde_json::Value::Null,
    }
}

/// `GET /v1/policies?subject=`.
#[utoipa::path(get, path = "/v1/policies", tag = "admin",
    security(("bearer" = [])), params(("subject" = Option<String>, Query, description = "Only this subject's")),
    responses((status = 200, description = "Policies", body = crate::docs::PolicyListOut), crate::docs::AdminErrors))]
pub async fn list_policies(
    State(state): State<AppState>,
    params: Params,
) -> Result<Response, ApiError> {
    let params = params.only(&["subject"])?;
    let subject = params
        .get("subject")
        .map(|s| subject_param("subject", s))
        .transpose()?;
    let ids: Vec<String> = {
        let q = state.quota();
        q.config
            .policies()
            .filter(|p| subject.as_ref().is_none_or(|s| &p.data.subject == s))
            .map(|p| p.data.policy_id.clone())
            .collect()
    };
    let policies: Vec<_> = ids.iter().map(|id| policy_body(&state, id)).collect();
    Ok(Json(json!({"policies": policies})).into_response())
}

/// `DELETE /v1/policies/{id}`.
#[utoipa::path(delete, path = "/v1/policies/{id}", tag = "admin",
    security(("bearer" = [])), params(("id" = String, Path, description = "The policy's id")),
    responses((status = 204, description = "Deleted"), crate::docs::AdminErrors))]
pub async fn delete_policy(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    super::grants::remove_by_id(
        &state,
        "policy",
        id,
        |q, id| q.config.policy(id).map(|p| p.data.subject.clone()),
        EventData::PolicyDeleted,
    )
    .await
}

/// `POST /v1/policies/{id}/reset` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetIn {
    subject: String,
    at: Option<DateTime<Utc>>,
}

/// `POST /v1/policies/{id}/reset`: usage recorded before the reset no longer counts in the
/// pool's window containing `at`; it lifts that policy's disable (never an operator's).
#[utoipa::path(post, path = "/v1/policies/{id}/reset", tag = "admin", request_body = ResetIn,
    security(("bearer" = [])), params(("id" = String, Path, description = "The policy's id")),
    responses((status = 200, description = "The window restarts now", body = crate::docs::ResetOut), crate::docs::AdminErrors))]
pub async fn reset_policy(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    JsonBody(body): JsonBody<ResetIn>,
) -> Result<Response, ApiError> {
    validate_id("id", &id)?;
    let subject = subject_param("subject", &body.subject)?;
    let at = state.event_time(body.at)?;
    let admin = state.admin_guard().await;
    if state.quota().config.policy(&id).is_none() {
        return Err(ApiError::NotFound {
            what: format!("policy `{id}`"),
            field: Some("id".into()),
        });
    }
    let data = WindowReset {
        policy_id: id.clone(),
        subject: subject.clone(),
        at,
    };
    let env = Envelope::new(
        EventData::WindowReset(data),
        at,
        None,
        Some(subject.clone()),
    );
    state.write_config(&admin, env).await?;
    Ok(Json(json!({"policy_id": id, "subject": subject, "reset_at": at})).into_response())
}

/// 204 for a removal.
pub(super) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

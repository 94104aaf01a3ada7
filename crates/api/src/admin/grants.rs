//! `POST /v1/grants`, `DELETE /v1/grants/{id}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tally_events::quota::QuotaState;
use tally_events::rules::{validate_grant, validate_id};
use tally_events::*;

use super::subject_param;
use crate::AppState;
use crate::body::{JsonBody, PathParam};
use crate::error::ApiError;

/// `POST /v1/grants` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantIn {
    id: Option<String>,
    subject: String,
    model_group: Option<String>,
    /// `requests`, `input_tokens`, `output_tokens`, `tokens`, `cost` or `credits`.
    #[schema(value_type = String)]
    metric: Metric,
    amount: i64,
    window_kind: Option<String>,
    starts_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
}

/// `POST /v1/grants`: a temporary raise of matching limits, active on `[starts_at, expires_at)`.
#[utoipa::path(post, path = "/v1/grants", tag = "admin", request_body = GrantIn,
    security(("bearer" = [])),
    responses((status = 201, description = "The grant", body = serde_json::Value), crate::docs::AdminErrors))]
pub async fn post_grant(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<GrantIn>,
) -> Result<Response, ApiError> {
    let id = body
        .id
        .unwrap_or_else(|| format!("grant_{}", uuid::Uuid::now_v7().simple()));
    validate_id("id", &id)?;
    let data = GrantIssued {
        grant_id: id.clone(),
        subject: subject_param("subject", &body.subject)?,
        model_group: body.model_group,
        metric: body.metric,
        amount: body.amount,
        window_kind: body.window_kind,
        starts_at: body.starts_at.unwrap_or_else(Utc::now),
        expires_at: body.expires_at,
    };
    validate_grant("", &data)?;
    let admin = state.admin_guard().await;
    {
        let q = state.quota();
        if let Some(g) = &data.model_group
            && q.config.model_group(g).is_none()
        {
            return Err(ApiError::invalid(
                "model_group",
                format!("model group `{g}` does not exist"),
            ));
        }
        if q.config.grant(&id).is_some() {
            return Err(ApiError::Conflict {
                field: Some("id".into()),
                message: format!("grant `{id}` exists"),
            });
        }
    }
    let env = Envelope::new(
        EventData::GrantIssued(data.clone()),
        Utc::now(),
        None,
        Some(data.subject.clone()),
    );
    state.write_config(&admin, env).await?;
    Ok((StatusCode::CREATED, Json(data)).into_response())
}

/// `DELETE /v1/grants/{id}`.
#[utoipa::path(delete, path = "/v1/grants/{id}", tag = "admin",
    security(("bearer" = [])), params(("id" = String, Path, description = "The grant's id")),
    responses((status = 204, description = "Revoked"), crate::docs::AdminErrors))]
pub async fn delete_grant(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    remove_by_id(
        &state,
        "grant",
        id,
        |q, id| q.config.grant(id).map(|g| g.subject.clone()),
        EventData::GrantRevoked,
    )
    .await
}

/// Delete a policy or revoke a grant: 404 naming `id` when it names none, else `event` on the
/// subject it belonged to. The lookup happens under the admin lock, like every validation.
pub(super) async fn remove_by_id(
    state: &AppState,
    what: &str,
    id: String,
    subject_of: impl FnOnce(&QuotaState, &str) -> Option<Subject>,
    event: fn(IdOnly) -> EventData,
) -> Result<Response, ApiError> {
    validate_id("id", &id)?;
    let admin = state.admin_guard().await;
    let subject = subject_of(&state.quota(), &id);
    let Some(subject) = subject else {
        return Err(ApiError::NotFound {
            what: format!("{what} `{id}`"),
            field: Some("id".into()),
        });
    };
    let env = Envelope::new(event(IdOnly { id }), Utc::now(), None, Some(subject));
    state.write_config(&admin, env).await?;
    Ok(super::policies::no_content())
}

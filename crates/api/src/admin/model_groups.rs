//! `PUT` and `DELETE /v1/model-groups/{name}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use tally_events::rules::{validate_id, validate_model_group};
use tally_events::*;

use crate::AppState;
use crate::body::{JsonBody, PathParam};
use crate::error::ApiError;

/// `PUT /v1/model-groups/{name}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelGroupIn {
    models: Vec<String>,
}

/// `PUT /v1/model-groups/{name}`: 409 if a model already belongs to another group.
#[utoipa::path(put, path = "/v1/model-groups/{name}", tag = "admin", request_body = ModelGroupIn,
    security(("bearer" = [])), params(("name" = String, Path, description = "The group's name")),
    responses((status = 200, description = "The group", body = crate::docs::ModelGroupOut), crate::docs::AdminErrors))]
pub async fn put_model_group(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    JsonBody(body): JsonBody<ModelGroupIn>,
) -> Result<Response, ApiError> {
    validate_model_group("", &name, &body.models)?;
    let admin = state.admin_guard().await;
    if let Some((model, other)) = state.quota().config.model_conflict(&name, &body.models) {
        return Err(ApiError::Conflict {
            field: Some("models".into()),
            message: format!("model `{model}` already belongs to model group `{other}`"),
        });
    }
    let mut models = body.models;
    models.sort();
    models.dedup();
    let data = ModelGroupChanged {
        name: name.clone(),
        models: models.clone(),
    };
    let env = Envelope::new(EventData::ModelGroupUpserted(data), Utc::now(), None, None);
    state.write_config(&admin, env).await?;
    Ok(Json(json!({"name": name, "models": models})).into_response())
}

/// `DELETE /v1/model-groups/{name}`: refused with 409 while a policy or grant names the group.
#[utoipa::path(delete, path = "/v1/model-groups/{name}", tag = "admin",
    security(("bearer" = [])), params(("name" = String, Path, description = "The group's name")),
    responses((status = 204, description = "Deleted"), crate::docs::AdminErrors))]
pub async fn delete_model_group(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<Response, ApiError> {
    validate_id("name", &name)?;
    let admin = state.admin_guard().await;
    let user = {
        let q = state.quota();
        if q.config.model_group(&name).is_none() {
            return Err(ApiError::NotFound {
                what: format!("model group `{name}`"),
                field: Some("name".into()),
            });
        }
        q.config.model_group_user(&name)
    };
    if let Some(user) = user {
        return Err(ApiError::Conflict {
            field: Some("name".into()),
            message: format!("model group `{name}` is still named by {user}"),
        });
    }
    let data = ModelGroupChanged {
        name,
        models: Vec::new(),
    };
    let env = Envelope::new(EventData::ModelGroupDeleted(data), Utc::now(), None, None);
    state.write_config(&admin, env).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

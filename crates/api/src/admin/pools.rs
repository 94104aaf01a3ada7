//! `POST /v1/admin/pool-usage`: this instance's live `used` of named pools, for `tally audit`
//! (SPEC v2 §8: the audit compares the ledger with every running instance's state).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AppState;
use crate::body::JsonBody;
use crate::error::ApiError;

/// Most pools per call: 500 keys of bounded names stay well under the 64 KiB body limit.
pub const MAX_POOLS_PER_CALL: usize = 500;

/// One pool in one window.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolIn {
    /// Policy id.
    pub policy_id: String,
    /// Pool subject.
    pub subject: String,
    /// Window start (null: a lifetime window).
    pub window_start: Option<DateTime<Utc>>,
}

/// The request body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolUsageIn {
    /// The pools asked about.
    pub pools: Vec<PoolIn>,
}

/// `POST /v1/admin/pool-usage` `{"pools":[{"policy_id","subject","window_start"}]}` →
/// `{"instance_stream_seq", "pools":[{..., "used": n|null}]}` (null: the policy is gone or its
/// window no longer starts there).
#[utoipa::path(post, path = "/v1/admin/pool-usage", tag = "admin", request_body = PoolUsageIn,
    security(("bearer" = [])),
    responses((status = 200, description = "This instance's live view of each pool", body = crate::docs::PoolUsageOut), crate::docs::AdminErrors))]
pub async fn pool_usage(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<PoolUsageIn>,
) -> Result<Response, ApiError> {
    if body.pools.len() > MAX_POOLS_PER_CALL {
        return Err(ApiError::invalid(
            "pools",
            format!("at most {MAX_POOLS_PER_CALL} pools per call"),
        ));
    }
    let mut subjects = Vec::with_capacity(body.pools.len());
    for (i, p) in body.pools.iter().enumerate() {
        let s = super::subject_param(&format!("pools[{i}].subject"), &p.subject)?;
        tally_events::validate_name(&format!("pools[{i}].policy_id"), &p.policy_id)?;
        subjects.push(s);
    }
    let as_of = state.as_of();
    let q = state.quota();
    let pools: Vec<serde_json::Value> = body
        .pools
        .iter()
        .zip(&subjects)
        .map(|(p, s)| {
            json!({
                "policy_id": p.policy_id,
                "subject": p.subject,
                "window_start": p.window_start,
                "used": q.pool_used(&p.policy_id, s, p.window_start),
            })
        })
        .collect();
    drop(q);
    Ok(Json(json!({"as_of": as_of, "pools": pools})).into_response())
}

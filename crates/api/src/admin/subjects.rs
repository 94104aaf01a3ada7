//! `PUT`, `GET` and `DELETE /v1/subjects/{subject}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use tally_events::rules::{validate_chain_subject, validate_subject_upsert};
use tally_events::*;

use super::{double_option, subject_param};
use crate::AppState;
use crate::body::{JsonBody, PathParam};
use crate::error::ApiError;

/// `PUT /v1/subjects/{subject}` body: absent keeps the stored value, `null` clears it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubjectIn {
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    parent: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Vec<String>>)]
    groups: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<bool>)]
    disabled: Option<Option<bool>>,
}

fn chain_subject(text: &str) -> Result<Subject, ApiError> {
    let s = subject_param("subject", text)?;
    validate_chain_subject("subject", &s)?;
    Ok(s)
}

/// `PUT /v1/subjects/{subject}`: upsert. A parent that would make a cycle or a chain deeper than
/// 16 is a 409 naming `parent` (SPEC v2 §4); a `group:` parent is a 400.
#[utoipa::path(put, path = "/v1/subjects/{subject}", tag = "admin", request_body = SubjectIn,
    security(("bearer" = [])), params(("subject" = String, Path, description = "e.g. `key:k1`, `user:alice`")),
    responses((status = 200, description = "The subject as configured", body = crate::docs::SubjectOut), crate::docs::AdminErrors))]
pub async fn put_subject(
    State(state): State<AppState>,
    PathParam(subject): PathParam,
    JsonBody(body): JsonBody<SubjectIn>,
) -> Result<Response, ApiError> {
    let subject = chain_subject(&subject)?;
    let admin = state.admin_guard().await;
    let current = state
        .quota()
        .config
        .subject(&subject)
        .cloned()
        .unwrap_or_default();
    let parent = match body.parent {
        None => current.parent,
        Some(None) => None,
        Some(Some(p)) => Some(subject_param("parent", &p)?),
    };
    let data = SubjectUpserted {
        parent,
        groups: body
            .groups
            .map_or(current.groups, Option::unwrap_or_default),
        disabled: body
            .disabled
            .map_or(current.disabled, |d| d.unwrap_or(false)),
    };
    validate_subject_upsert("", &subject, &data)?;
    if let Some(p) = &data.parent
        && let Some(conflict) = state.quota().config.parent_conflict(&subject, p)
    {
        return Err(ApiError::Conflict {
            field: Some("parent".into()),
            message: format!("`{p}` as parent of `{subject}` {conflict}"),
        });
    }
    let env = Envelope::new(
        EventData::SubjectUpserted(data),
        Utc::now(),
        None,
        Some(subject.clone()),
    );
    state.write_config(&admin, env).await?;
    Ok(Json(subject_body(&state, &subject)).into_response())
}

fn subject_body(state: &AppState, subject: &Subject) -> serde_json::Value {
    let q = state.quota();
    let conf = q.config.subject(subject).cloned().unwrap_or_default();
    let chain = q.config.chain(subject);
    let credits = q
        .account(subject)
        .map(|a| json!({"remaining": a.remaining_at(Utc::now()), "refill": a.refill}));
    json!({"subject": subject, "parent": conf.parent, "groups": conf.groups,
        "disabled": conf.disabled, "chain": chain, "credits": credits})
}

/// `GET /v1/subjects/{subject}`.
#[utoipa::path(get, path = "/v1/subjects/{subject}", tag = "admin",
    security(("bearer" = [])), params(("subject" = String, Path, description = "e.g. `key:k1`")),
    responses((status = 200, description = "The subject as configured", body = crate::docs::SubjectOut), crate::docs::AdminErrors))]
pub async fn get_subject(
    State(state): State<AppState>,
    PathParam(subject): PathParam,
) -> Result<Response, ApiError> {
    let subject = subject_param("subject", &subject)?;
    if state.quota().config.subject(&subject).is_none() {
        return Err(ApiError::NotFound {
            what: format!("subject `{subject}`"),
            field: Some("subject".into()),
        });
    }
    Ok(Json(subject_body(&state, &subject)).into_response())
}

/// `DELETE /v1/subjects/{subject}`: retire a subject with its policies, grants and credit
/// balance (one event; its usage stays in the ledger). Refused with 409 while another subject
/// names it as parent.
#[utoipa::path(delete, path = "/v1/subjects/{subject}", tag = "admin",
    security(("bearer" = [])), params(("subject" = String, Path, description = "e.g. `key:k1`")),
    responses((status = 204, description = "Deleted"), crate::docs::AdminErrors))]
pub async fn delete_subject(
    State(state): State<AppState>,
    PathParam(subject): PathParam,
) -> Result<Response, ApiError> {
    let subject = chain_subject(&subject)?;
    let admin = state.admin_guard().await;
    let child = {
        let q = state.quota();
        if !q.is_known(&subject) {
            return Err(ApiError::NotFound {
                what: format!("subject `{subject}`"),
                field: Some("subject".into()),
            });
        }
        q.config.children(&subject).next().cloned()
    };
    if let Some(child) = child {
        return Err(ApiError::Conflict {
            field: Some("subject".into()),
            message: format!("`{child}` names `{subject}` as its parent; move or delete it first"),
        });
    }
    let env = Envelope::new(
        EventData::SubjectDeleted(SubjectDeleted {}),
        Utc::now(),
        None,
        Some(subject),
    );
    state.write_config(&admin, env).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Most subjects one `GET /v1/subjects` page returns (and its default): bounds the answer.
pub const MAX_SUBJECTS_PER_PAGE: usize = 1000;

/// `GET /v1/subjects?after=&limit=`: configured subjects in name order, a page at a time
/// (`next_after` names the next page's `after`; null on the last page). For the dashboard's tree.
#[utoipa::path(get, path = "/v1/subjects", tag = "admin", security(("bearer" = [])),
    params(("after" = Option<String>, Query, description = "Start after this subject (`next_after` of the previous page)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Subjects per page (default and at most 1000)")),
    responses((status = 200, description = "A page of subjects", body = crate::docs::SubjectListOut),
        crate::docs::AdminErrors))]
pub async fn list_subjects(
    State(state): State<AppState>,
    params: crate::body::Params,
) -> Result<Response, ApiError> {
    let params = params.only(&["after", "limit"])?;
    let limit = match params.get("limit") {
        None => MAX_SUBJECTS_PER_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_SUBJECTS_PER_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::invalid("limit", format!("must be 1..={MAX_SUBJECTS_PER_PAGE}"))
            })?,
    };
    let after = params.get("after").unwrap_or("");
    // Under the quota lock (admissions wait): one pass keeping the `limit + 1` smallest names
    // in a bounded heap, copies made only of those, no sort of every subject.
    let mut page = {
        let q = state.quota();
        let mut heap = std::collections::BinaryHeap::with_capacity(limit + 1);
        for (s, _) in q.config.subjects() {
            if s.as_str() <= after {
                continue;
            }
            if heap.len() <= limit {
                heap.push(s);
            } else if heap.peek().is_some_and(|top| s < *top) {
                heap.pop();
                heap.push(s);
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .filter_map(|s| Some((s, q.config.subject(s)?)))
            .map(|(s, c)| json!({"subject": s, "parent": c.parent, "disabled": c.disabled}))
            .collect::<Vec<_>>()
    };
    let more = page.len() > limit;
    page.truncate(limit);
    let next_after = more
        .then(|| {
            page.last()
                .and_then(|v| v["subject"].as_str().map(str::to_owned))
        })
        .flatten();
    let subjects = page;
    Ok(Json(json!({"subjects": subjects, "next_after": next_after})).into_response())
}

//! Admin handlers (SPEC §6): subjects, model groups, policies, resets, grants and credits. Every
//! write is validated against the live configuration, published as an event (awaiting the ack)
//! and applied to this instance's quota state before the answer, so the next admission here sees
//! it at once and other instances within their tail lag.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::json;
use tally_events::quota::{MAX_GROUPS_PER_SUBJECT, MAX_MODELS_PER_GROUP};
use tally_events::window::WindowSpec;
use tally_events::*;

use crate::AppState;
use crate::body::{JsonBody, Params};
use crate::error::ApiError;

/// Longest policy or grant id.
pub const MAX_ID_LEN: usize = 128;

/// Distinguish an absent field (keep) from an explicit `null` (clear): the trap Bifrost's
/// reviewers found in "clear" semantics.
fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn subject_param(field: &str, text: &str) -> Result<Subject, ApiError> {
    Subject::parse(text).map_err(|m| ApiError::invalid(field, m))
}

fn id_param(field: &str, id: &str) -> Result<(), ApiError> {
    validate_name(field, id)?;
    if id.len() > MAX_ID_LEN {
        return Err(ApiError::invalid(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    Ok(())
}

fn group_name(field: &str, g: &str) -> Result<(), ApiError> {
    let ok = !g.is_empty()
        && g.len() <= tally_events::MAX_SUBJECT_ID_LEN
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "must be 1..=128 of [A-Za-z0-9._:@-]",
        ))
    }
}

impl AppState {
    /// Publish a configuration event and apply it here. Serialized by the admin lock so the
    /// validation a handler did still holds when the event is applied. Never spooled, even with
    /// `--fail-open`: every instance must see a configuration change.
    ///
    /// Instances validate against their own folded state, so two of them could each accept half
    /// of a conflict (the same model into two groups, the two halves of a cycle). The write is
    /// therefore conditional: it goes ahead only if this instance has folded the last event on
    /// its config subject, and JetStream refuses it if another lands there in between
    /// (`Nats-Expected-Last-Subject-Sequence`). Either way the loser gets a 409 and writes nothing.
    async fn write_config(&self, env: Envelope) -> Result<(), ApiError> {
        let publisher = &self.0.publisher;
        let subject = publisher.settings().subject_for(&env);
        if self.0.nats.connection_state() != async_nats::connection::State::Connected {
            return Err(ApiError::Unavailable("NATS is disconnected".into()));
        }
        let last = publisher.last_sequence_on(&subject).await?;
        let own = self.own_config_seq().get(&subject).copied();
        let folded = last <= self.0.tail_seq.load(Ordering::Acquire) || own == Some(last);
        if !folded {
            return Err(ApiError::Conflict {
                field: None,
                message: crate::error::CONCURRENT_CONFIG_WRITE.into(),
            });
        }
        let seq = publisher.publish_if_last(&env, last).await?;
        self.own_config_seq().insert(subject, seq);
        self.quota().apply(&env);
        Ok(())
    }

    fn own_config_seq(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.0.own_config_seq.lock().expect("config sequence lock")
    }
}

/// `PUT /v1/subjects/{subject}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectIn {
    #[serde(default, deserialize_with = "double_option")]
    parent: Option<Option<String>>,
    groups: Option<Vec<String>>,
    disabled: Option<bool>,
}

/// `PUT /v1/subjects/{subject}`: upsert; absent fields keep their value, `"parent": null` clears.
pub async fn put_subject(
    State(state): State<AppState>,
    Path(subject): Path<String>,
    JsonBody(body): JsonBody<SubjectIn>,
) -> Result<Response, ApiError> {
    let subject = subject_param("subject", &subject)?;
    if subject.kind() == "group" {
        return Err(ApiError::invalid(
            "subject",
            "groups are labels on subjects, not subjects",
        ));
    }
    let _admin = state.0.admin_lock.lock().await;
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
    if let Some(p) = &parent
        && (p == &subject || state.quota().config.would_cycle(&subject, p))
    {
        return Err(ApiError::Conflict {
            field: Some("parent".into()),
            message: format!("`{p}` as parent of `{subject}` would make a cycle"),
        });
    }
    let groups = body.groups.unwrap_or(current.groups);
    if groups.len() > MAX_GROUPS_PER_SUBJECT {
        return Err(ApiError::invalid(
            "groups",
            format!("at most {MAX_GROUPS_PER_SUBJECT}"),
        ));
    }
    for (i, g) in groups.iter().enumerate() {
        group_name(&format!("groups[{i}]"), g)?;
    }
    let data = SubjectUpserted {
        parent,
        groups,
        disabled: body.disabled.unwrap_or(current.disabled),
    };
    let env = Envelope::new(
        EventData::SubjectUpserted(data.clone()),
        Utc::now(),
        None,
        Some(subject.clone()),
    );
    state.write_config(env).await?;
    Ok(Json(subject_body(&state, &subject)).into_response())
}

fn subject_body(state: &AppState, subject: &Subject) -> serde_json::Value {
    let q = state.quota();
    let conf = q.config.subject(subject).cloned().unwrap_or_default();
    let chain = q.config.chain(subject);
    let credits = q
        .account(subject)
        .map(|a| json!({"remaining": a.balance_at(Utc::now()) - a.reserved, "refill": a.refill}));
    json!({"subject": subject, "parent": conf.parent, "groups": conf.groups,
        "disabled": conf.disabled, "chain": chain, "credits": credits})
}

/// `GET /v1/subjects/{subject}`.
pub async fn get_subject(
    State(state): State<AppState>,
    Path(subject): Path<String>,
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

/// `PUT /v1/model-groups/{name}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelGroupIn {
    models: Vec<String>,
}

/// `PUT /v1/model-groups/{name}`: 409 if a model already belongs to another group.
pub async fn put_model_group(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ModelGroupIn>,
) -> Result<Response, ApiError> {
    id_param("name", &name)?;
    if body.models.is_empty() || body.models.len() > MAX_MODELS_PER_GROUP {
        return Err(ApiError::invalid(
            "models",
            format!("must list 1..={MAX_MODELS_PER_GROUP} models"),
        ));
    }
    for (i, m) in body.models.iter().enumerate() {
        validate_name(&format!("models[{i}]"), m)?;
    }
    let _admin = state.0.admin_lock.lock().await;
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
    state.write_config(env).await?;
    Ok(Json(json!({"name": name, "models": models})).into_response())
}

/// `DELETE /v1/model-groups/{name}`.
pub async fn delete_model_group(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    id_param("name", &name)?;
    let _admin = state.0.admin_lock.lock().await;
    if state.quota().config.model_group(&name).is_none() {
        return Err(ApiError::NotFound {
            what: format!("model group `{name}`"),
            field: Some("name".into()),
        });
    }
    let data = ModelGroupChanged {
        name,
        models: Vec::new(),
    };
    let env = Envelope::new(EventData::ModelGroupDeleted(data), Utc::now(), None, None);
    state.write_config(env).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /v1/policies/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyIn {
    subject: String,
    model_group: Option<String>,
    metric: Metric,
    limit: Option<i64>,
    window: Window,
    boundary: Option<Boundary>,
    on_exhausted: Option<OnExhausted>,
    enabled: Option<bool>,
}

/// `PUT /v1/policies/{id}`: a policy without a positive integer limit is a 400, never a bypass.
pub async fn put_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PolicyIn>,
) -> Result<Response, ApiError> {
    id_param("id", &id)?;
    let subject = subject_param("subject", &body.subject)?;
    let limit = match body.limit {
        Some(l) if l > 0 && l <= MAX_AMOUNT => l,
        Some(_) => {
            return Err(ApiError::invalid(
                "limit",
                format!("must be an integer in 1..={MAX_AMOUNT}"),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "limit",
                "is required: a policy without a limit would enforce nothing",
            ));
        }
    };
    WindowSpec::compile(&body.window, Utc::now())?;
    let _admin = state.0.admin_lock.lock().await;
    if let Some(g) = &body.model_group
        && state.quota().config.model_group(g).is_none()
    {
        return Err(ApiError::invalid(
            "model_group",
            format!("model group `{g}` does not exist"),
        ));
    }
    let data = PolicyUpserted {
        policy_id: id.clone(),
        subject,
        model_group: body.model_group,
        metric: body.metric,
        limit,
        window: body.window,
        boundary: body.boundary.unwrap_or_default(),
        on_exhausted: body.on_exhausted.unwrap_or_default(),
        enabled: body.enabled.unwrap_or(true),
    };
    let env = Envelope::new(
        EventData::PolicyUpserted(data.clone()),
        Utc::now(),
        None,
        Some(data.subject.clone()),
    );
    state.write_config(env).await?;
    Ok(Json(policy_body(&state, &id)).into_response())
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
pub async fn delete_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    remove_by_id(
        &state,
        "policy",
        id,
        |q, id| q.config.policy(id).map(|p| p.data.subject.clone()),
        EventData::PolicyDeleted,
    )
    .await
}

/// Delete a policy or revoke a grant: 404 naming `id` when it names none, else `event` on the
/// subject it belonged to. The lookup happens under the admin lock, like every validation.
async fn remove_by_id(
    state: &AppState,
    what: &str,
    id: String,
    subject_of: impl FnOnce(&tally_events::quota::QuotaState, &str) -> Option<Subject>,
    event: fn(IdOnly) -> EventData,
) -> Result<Response, ApiError> {
    id_param("id", &id)?;
    let _admin = state.0.admin_lock.lock().await;
    let subject = subject_of(&state.quota(), &id);
    let Some(subject) = subject else {
        return Err(ApiError::NotFound {
            what: format!("{what} `{id}`"),
            field: Some("id".into()),
        });
    };
    let env = Envelope::new(event(IdOnly { id }), Utc::now(), None, Some(subject));
    state.write_config(env).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/policies/{id}/reset` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetIn {
    subject: String,
    at: Option<DateTime<Utc>>,
}

/// `POST /v1/policies/{id}/reset`: start the pool's window afresh at `at` and lift a disable.
pub async fn reset_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ResetIn>,
) -> Result<Response, ApiError> {
    id_param("id", &id)?;
    let subject = subject_param("subject", &body.subject)?;
    let at = state.event_time(body.at)?;
    let _admin = state.0.admin_lock.lock().await;
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
    state.write_config(env).await?;
    Ok(Json(json!({"policy_id": id, "subject": subject, "reset_at": at})).into_response())
}

/// `POST /v1/grants` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantIn {
    id: Option<String>,
    subject: String,
    model_group: Option<String>,
    metric: Metric,
    amount: i64,
    window_kind: Option<String>,
    starts_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
}

/// `POST /v1/grants`: a temporary raise of matching limits.
pub async fn post_grant(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<GrantIn>,
) -> Result<Response, ApiError> {
    let id = body
        .id
        .unwrap_or_else(|| format!("grant_{}", uuid::Uuid::now_v7().simple()));
    id_param("id", &id)?;
    let subject = subject_param("subject", &body.subject)?;
    if body.amount <= 0 || body.amount > MAX_AMOUNT {
        return Err(ApiError::invalid(
            "amount",
            format!("must be an integer in 1..={MAX_AMOUNT}"),
        ));
    }
    if let Some(k) = &body.window_kind
        && !["rolling", "calendar", "periodic", "lifetime"].contains(&k.as_str())
    {
        return Err(ApiError::invalid(
            "window_kind",
            "must be rolling, calendar, periodic or lifetime",
        ));
    }
    let starts_at = body.starts_at.unwrap_or_else(Utc::now);
    if body.expires_at <= starts_at {
        return Err(ApiError::invalid("expires_at", "must be after starts_at"));
    }
    let _admin = state.0.admin_lock.lock().await;
    if state.quota().config.grant(&id).is_some() {
        return Err(ApiError::Conflict {
            field: Some("id".into()),
            message: format!("grant `{id}` exists"),
        });
    }
    let data = GrantIssued {
        grant_id: id.clone(),
        subject: subject.clone(),
        model_group: body.model_group,
        metric: body.metric,
        amount: body.amount,
        window_kind: body.window_kind,
        starts_at,
        expires_at: body.expires_at,
    };
    let env = Envelope::new(
        EventData::GrantIssued(data.clone()),
        Utc::now(),
        None,
        Some(subject),
    );
    state.write_config(env).await?;
    Ok((StatusCode::CREATED, Json(data)).into_response())
}

/// `DELETE /v1/grants/{id}`.
pub async fn delete_grant(
    State(state): State<AppState>,
    Path(id): Path<String>,
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

/// `POST /v1/credits/{subject}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsIn {
    op: CreditOp,
    amount: i64,
    #[serde(default, deserialize_with = "double_option")]
    refill: Option<Option<Refill>>,
    at: Option<DateTime<Utc>>,
}

/// `POST /v1/credits/{subject}`: set (a barrier), increment or decrement; `refill` absent keeps
/// the schedule, `null` removes it.
pub async fn post_credits(
    State(state): State<AppState>,
    Path(subject): Path<String>,
    JsonBody(body): JsonBody<CreditsIn>,
) -> Result<Response, ApiError> {
    let subject = subject_param("subject", &subject)?;
    if body.amount < 0 || body.amount > MAX_AMOUNT {
        return Err(ApiError::invalid(
            "amount",
            format!("must be an integer in 0..={MAX_AMOUNT}"),
        ));
    }
    if let Some(Some(r)) = &body.refill {
        validate_refill(r)?;
    }
    let at = state.event_time(body.at)?;
    let _admin = state.0.admin_lock.lock().await;
    let current = state.quota().account(&subject).and_then(|a| a.refill);
    let refill = body.refill.unwrap_or(current);
    let data = CreditsAdjusted {
        op: body.op,
        amount: body.amount,
        refill,
    };
    let env = Envelope::new(
        EventData::CreditsAdjusted(data),
        at,
        None,
        Some(subject.clone()),
    );
    state.write_config(env).await?;
    let q = state.quota();
    let a = q
        .account(&subject)
        .expect("account exists after an adjustment");
    let remaining = a.balance_at(at) - a.reserved;
    Ok(
        Json(json!({"subject": subject, "remaining": remaining, "refill": a.refill}))
            .into_response(),
    )
}

fn validate_refill(r: &Refill) -> Result<(), ApiError> {
    if r.amount < 0 || r.amount > MAX_AMOUNT {
        return Err(ApiError::invalid(
            "refill.amount",
            format!("must be an integer in 0..={MAX_AMOUNT}"),
        ));
    }
    match (r.interval, r.day) {
        (RefillInterval::Daily, Some(_)) => {
            Err(ApiError::invalid("refill.day", "only for monthly refills"))
        }
        (RefillInterval::Monthly, Some(d)) if !(1..=31).contains(&d) => Err(ApiError::invalid(
            "refill.day",
            "must be 1..=31 (clamped to the month's last day)",
        )),
        _ => Ok(()),
    }
}

/// `GET /v1/quota?subject=&model=&at=`: what an admission of one request at `at` would see.
pub async fn quota(State(state): State<AppState>, params: Params) -> Result<Response, ApiError> {
    let params = params.only(&["subject", "model", "at"])?;
    let subject = subject_param("subject", params.required("subject")?)?;
    let model = params.get("model");
    if let Some(m) = model {
        validate_name("model", m)?;
    }
    let at = state.event_time(params.time("at")?)?;
    let q = state.quota();
    let d = q.decide(&tally_events::quota::AdmitRequest {
        leaf: &subject,
        model,
        estimate: Usage {
            requests: 1,
            ..Usage::default()
        },
        credits: Some(0),
        at,
    });
    Ok(Json(json!({
        "subject": subject,
        "at": at,
        "chain": d.chain,
        "model_group": d.model_group,
        "disabled": d.disabled,
        "counted_in_key_global": d.counted_in_key_global,
        "counted_in_user_global": d.counted_in_user_global,
        "checks": d.checks,
    }))
    .into_response())
}

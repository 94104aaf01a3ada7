//! The rows the `quota` projection writes for one batch: what the batch touched, computed from
//! the fold under its lock, then written in a handful of statements (pool windows and balances
//! in one `UNNEST` each: a batch touches thousands of them).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tally_events::quota::QuotaState;
use tally_events::{Envelope, EventData, Subject};

use crate::Error;
use crate::tables::Tables;

/// What a batch touched.
#[derive(Default)]
pub(crate) struct Touched {
    subjects: BTreeSet<Subject>,
    model_groups: BTreeSet<String>,
    policies: BTreeSet<String>,
    grants: BTreeSet<String>,
    credits: BTreeSet<Subject>,
    /// Subjects retired (`subject.deleted`): their policies, grants and balance go.
    retired: BTreeSet<Subject>,
    /// (leaf, model, window time): pools to recompute.
    pub(crate) requests: Vec<(Subject, Option<String>, DateTime<Utc>)>,
}

impl Touched {
    pub(crate) fn note(&mut self, env: &Envelope) {
        let subject = env.subject.clone();
        match &env.data {
            EventData::SubjectUpserted(_) => self.subjects.extend(subject),
            EventData::SubjectDeleted(_) => {
                self.subjects.extend(subject.clone());
                self.retired.extend(subject);
            }
            EventData::ModelGroupUpserted(d) | EventData::ModelGroupDeleted(d) => {
                self.model_groups.insert(d.name.clone());
            }
            EventData::PolicyUpserted(d) => {
                self.policies.insert(d.policy_id.clone());
            }
            EventData::PolicyDeleted(d) => {
                self.policies.insert(d.id.clone());
            }
            EventData::GrantIssued(d) => {
                self.grants.insert(d.grant_id.clone());
            }
            EventData::GrantRevoked(d) => {
                self.grants.insert(d.id.clone());
            }
            EventData::CreditsAdjusted(_) => self.credits.extend(subject),
            EventData::WindowReset(r) => self.requests.push((r.subject.clone(), None, r.at)),
            EventData::AdmissionDecided(a) => self.request(&a.chain, &a.model, env.occurred_at),
            EventData::UsageSettled(d) => self.request(&d.chain, &d.model, d.window_at),
            _ => {}
        }
    }

    fn request(&mut self, chain: &[Subject], model: &Option<String>, at: DateTime<Utc>) {
        self.credits.extend(chain.iter().cloned());
        if let Some(leaf) = chain.first() {
            self.requests.push((leaf.clone(), model.clone(), at));
        }
    }
}

/// One pool in one window.
pub(crate) struct WindowRow {
    policy_id: String,
    subject: String,
    window_key: Option<DateTime<Utc>>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    metric: &'static str,
    limit: i64,
    used: i64,
    on_exhausted: &'static str,
    /// Event time of the first event in the batch that found the window exhausted.
    exhausted_at: Option<DateTime<Utc>>,
}

type WindowKey = (String, String, Option<DateTime<Utc>>);

/// Latest totals per pool and window in a batch, keeping the first exhaustion time.
#[derive(Default)]
pub(crate) struct WindowRows(BTreeMap<WindowKey, WindowRow>);

impl WindowRows {
    pub(crate) fn merge(&mut self, rows: Vec<WindowRow>) {
        for mut row in rows {
            let key = (row.policy_id.clone(), row.subject.clone(), row.window_key);
            if let Some(old) = self.0.get(&key) {
                row.exhausted_at = row.exhausted_at.and(old.exhausted_at.or(row.exhausted_at));
            }
            self.0.insert(key, row);
        }
    }
}

/// Every pool an admission of (leaf, model) at t would check, with its totals at t.
pub(crate) fn window_rows(
    state: &QuotaState,
    (leaf, model, at): &(Subject, Option<String>, DateTime<Utc>),
) -> Vec<WindowRow> {
    state
        .pool_totals(leaf, model.as_deref(), *at)
        .into_iter()
        .map(|t| WindowRow {
            policy_id: t.policy.data.policy_id.clone(),
            subject: t.pool.to_string(),
            window_key: t.window.filter(|_| t.policy.windowed()).map(|w| w.start),
            start: t.window.map(|w| w.start),
            end: t.window.map(|w| w.end),
            metric: t.policy.data.metric.as_str(),
            limit: t.limit,
            used: t.used,
            on_exhausted: t.policy.data.on_exhausted.as_str(),
            exhausted_at: (t.used >= t.limit).then_some(*at),
        })
        .collect()
}

/// A credit balance row: subject, balance, refill schedule, last refill.
type CreditRow = (
    String,
    i64,
    Option<serde_json::Value>,
    Option<DateTime<Utc>>,
);

/// Rows to write, computed under the lock and written after it.
#[derive(Default)]
pub(crate) struct Rows {
    subjects: Vec<(String, Option<String>, Vec<String>, bool)>,
    absent_subjects: Vec<String>,
    retired: Vec<String>,
    model_groups: Vec<(String, Option<Vec<String>>)>,
    policies: Vec<(String, Option<serde_json::Value>)>,
    grants: Vec<(String, Option<serde_json::Value>)>,
    credits: Vec<CreditRow>,
    pub(crate) windows: Vec<WindowRow>,
}

impl Rows {
    pub(crate) fn of(state: &QuotaState, t: &Touched, windows: WindowRows) -> Rows {
        let mut rows = Rows {
            retired: t.retired.iter().map(|s| s.to_string()).collect(),
            windows: windows.0.into_values().collect(),
            ..Rows::default()
        };
        for s in &t.subjects {
            match state.config.subject(s) {
                Some(c) => rows.subjects.push((
                    s.to_string(),
                    c.parent.as_ref().map(|p| p.to_string()),
                    c.groups.clone(),
                    c.disabled,
                )),
                None => rows.absent_subjects.push(s.to_string()),
            }
        }
        for g in &t.model_groups {
            let models = state.config.model_group(g).map(<[String]>::to_vec);
            rows.model_groups.push((g.clone(), models));
        }
        for id in &t.policies {
            let p = state.config.policy(id).map(|p| {
                let mut v = serde_json::to_value(&p.data).unwrap_or_default();
                v["created_at"] = serde_json::json!(p.created_at);
                v
            });
            rows.policies.push((id.clone(), p));
        }
        for id in &t.grants {
            let g = state
                .config
                .grant(id)
                .and_then(|g| serde_json::to_value(g).ok());
            rows.grants.push((id.clone(), g));
        }
        for s in &t.credits {
            if let Some(a) = state.account(s) {
                let refill = a.refill.and_then(|r| serde_json::to_value(r).ok());
                rows.credits
                    .push((s.to_string(), a.balance, refill, a.last_refill));
            }
        }
        rows
    }

    pub(crate) async fn write(self, tx: &mut PgConnection, t: Tables) -> Result<(), Error> {
        let now = Utc::now();
        self.write_config(tx, t, now).await?;
        write_credits(tx, t, &self.credits, now).await?;
        write_windows(tx, t, &self.windows).await
    }

    async fn write_config(
        &self,
        tx: &mut PgConnection,
        t: Tables,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        for (s, parent, groups, disabled) in &self.subjects {
            sqlx::query(&format!(
                "INSERT INTO {} (subject, parent, groups, disabled, updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (subject) DO UPDATE SET parent = $2, groups = $3, disabled = $4, updated_at = $5",
                t.name("cfg_subjects")
            ))
            .bind(s).bind(parent).bind(groups).bind(disabled).bind(now)
            .execute(&mut *tx).await?;
        }
        let absent: Vec<&String> = self.absent_subjects.iter().collect();
        delete_where(tx, &t.name("cfg_subjects"), "subject", &absent).await?;
        let retired: Vec<&String> = self.retired.iter().collect();
        for table in ["cfg_policies", "cfg_grants", "credit_balances"] {
            delete_where(tx, &t.name(table), "subject", &retired).await?;
        }
        for (name, models) in &self.model_groups {
            match models {
                Some(m) => {
                    sqlx::query(&format!(
                        "INSERT INTO {} (name, models, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET models = $2, updated_at = $3",
                        t.name("cfg_model_groups")
                    ))
                    .bind(name)
                    .bind(m)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                }
                None => delete_where(tx, &t.name("cfg_model_groups"), "name", &[name]).await?,
            };
        }
        for (id, p) in &self.policies {
            write_policy(tx, t, id, p.as_ref(), now).await?;
        }
        for (id, g) in &self.grants {
            write_grant(tx, t, id, g.as_ref()).await?;
        }
        Ok(())
    }
}

async fn delete_where(
    tx: &mut PgConnection,
    table: &str,
    column: &str,
    keys: &[&String],
) -> Result<sqlx::postgres::PgQueryResult, Error> {
    Ok(
        sqlx::query(&format!("DELETE FROM {table} WHERE {column} = ANY($1)"))
            .bind(keys)
            .execute(&mut *tx)
            .await?,
    )
}

async fn write_policy(
    tx: &mut PgConnection,
    t: Tables,
    id: &str,
    p: Option<&serde_json::Value>,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let table = t.name("cfg_policies");
    let Some(p) = p else {
        delete_where(tx, &table, "policy_id", &[&id.to_owned()]).await?;
        return Ok(());
    };
    sqlx::query(&format!(
        "INSERT INTO {table} (policy_id, subject, model_group, metric, \"limit\", \"window\", boundary, \
           on_exhausted, enabled, created_at, updated_at) \
         SELECT $1, p->>'subject', p->>'model_group', p->>'metric', (p->>'limit')::bigint, p->'window', \
           p->>'boundary', p->>'on_exhausted', (p->>'enabled')::boolean, (p->>'created_at')::timestamptz, $3 \
         FROM (SELECT $2::jsonb AS p) t \
         ON CONFLICT (policy_id) DO UPDATE SET subject = EXCLUDED.subject, model_group = EXCLUDED.model_group, \
           metric = EXCLUDED.metric, \"limit\" = EXCLUDED.\"limit\", \"window\" = EXCLUDED.\"window\", \
           boundary = EXCLUDED.boundary, on_exhausted = EXCLUDED.on_exhausted, enabled = EXCLUDED.enabled, \
           updated_at = EXCLUDED.updated_at"
    ))
    .bind(id).bind(p).bind(now)
    .execute(&mut *tx).await?;
    Ok(())
}

async fn write_grant(
    tx: &mut PgConnection,
    t: Tables,
    id: &str,
    g: Option<&serde_json::Value>,
) -> Result<(), Error> {
    let table = t.name("cfg_grants");
    let Some(g) = g else {
        delete_where(tx, &table, "grant_id", &[&id.to_owned()]).await?;
        return Ok(());
    };
    sqlx::query(&format!(
        "INSERT INTO {table} (grant_id, subject, model_group, metric, amount, window_kind, starts_at, expires_at) \
         SELECT $1, g->>'subject', g->>'model_group', g->>'metric', (g->>'amount')::bigint, g->>'window_kind', \
           (g->>'starts_at')::timestamptz, (g->>'expires_at')::timestamptz \
         FROM (SELECT $2::jsonb AS g) t ON CONFLICT (grant_id) DO NOTHING"
    ))
    .bind(id).bind(g)
    .execute(&mut *tx).await?;
    Ok(())
}

async fn write_credits(
    tx: &mut PgConnection,
    t: Tables,
    credits: &[CreditRow],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    if credits.is_empty() {
        return Ok(());
    }
    let subjects: Vec<&str> = credits.iter().map(|c| c.0.as_str()).collect();
    let balances: Vec<i64> = credits.iter().map(|c| c.1).collect();
    let refills: Vec<Option<serde_json::Value>> = credits.iter().map(|c| c.2.clone()).collect();
    let last: Vec<Option<DateTime<Utc>>> = credits.iter().map(|c| c.3).collect();
    sqlx::query(&format!(
        "INSERT INTO {} (subject, balance, refill, last_refill, updated_at) \
         SELECT s, b, r, l, $5 FROM UNNEST($1::text[], $2::int8[], $3::jsonb[], $4::timestamptz[]) AS u(s, b, r, l) \
         ON CONFLICT (subject) DO UPDATE SET balance = EXCLUDED.balance, refill = EXCLUDED.refill, \
           last_refill = EXCLUDED.last_refill, updated_at = EXCLUDED.updated_at",
        t.name("credit_balances")
    ))
    .bind(subjects).bind(balances).bind(refills).bind(last).bind(now)
    .execute(&mut *tx).await?;
    Ok(())
}

async fn write_windows(tx: &mut PgConnection, t: Tables, w: &[WindowRow]) -> Result<(), Error> {
    if w.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&WindowRow) -> Option<DateTime<Utc>>| w.iter().map(f).collect::<Vec<_>>();
    let text = |f: fn(&WindowRow) -> &str| w.iter().map(f).collect::<Vec<_>>();
    let num = |f: fn(&WindowRow) -> i64| w.iter().map(f).collect::<Vec<_>>();
    let table = t.name("quota_windows");
    sqlx::query(&format!(
        "INSERT INTO {table} AS q (policy_id, subject, window_key, window_start, window_end, metric, \"limit\", used, \
           on_exhausted, exhausted_at, updated_at) \
         SELECT p, s, COALESCE(k, '-infinity'::timestamptz), st, en, m, l, u, o, x, clock_timestamp() \
         FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[], $6::text[], \
           $7::int8[], $8::int8[], $9::text[], $10::timestamptz[]) AS v(p, s, k, st, en, m, l, u, o, x) \
         ON CONFLICT (policy_id, subject, window_key) DO UPDATE SET window_start = EXCLUDED.window_start, \
           window_end = EXCLUDED.window_end, \"limit\" = EXCLUDED.\"limit\", used = EXCLUDED.used, \
           on_exhausted = EXCLUDED.on_exhausted, \
           exhausted_at = CASE WHEN EXCLUDED.exhausted_at IS NOT NULL THEN COALESCE(q.exhausted_at, EXCLUDED.exhausted_at) END, \
           updated_at = clock_timestamp()"
    ))
    .bind(text(|r| &r.policy_id))
    .bind(text(|r| &r.subject))
    .bind(col(|r| r.window_key))
    .bind(col(|r| r.start))
    .bind(col(|r| r.end))
    .bind(text(|r| r.metric))
    .bind(num(|r| r.limit))
    .bind(num(|r| r.used))
    .bind(text(|r| r.on_exhausted))
    .bind(col(|r| r.exhausted_at))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

//! The rows the `quota` projection writes for one batch: what the batch touched, computed from
//! the fold under its lock, then written in a handful of statements (pool windows and balances
//! in one `UNNEST` each: a batch touches thousands of them).

use std::collections::btree_map::Entry;
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
        for s in chain {
            if !self.credits.contains(s) {
                self.credits.insert(s.clone());
            }
        }
        if let Some(leaf) = chain.first() {
            self.requests.push((leaf.clone(), model.clone(), at));
        }
    }
}

/// One pool in one window (its policy, subject and window key are its key in [`WindowRows`]).
pub(crate) struct WindowRow {
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    metric: &'static str,
    limit: i64,
    used: i64,
    on_exhausted: &'static str,
    /// Event time of the first event in the batch that found the window exhausted.
    exhausted_at: Option<DateTime<Utc>>,
}

/// Policy id, pool subject, window start (None for rolling and lifetime windows).
type WindowKey = (String, String, Option<DateTime<Utc>>);

/// Latest totals per pool and window in a batch, keeping the first exhaustion time: by policy,
/// then pool, then window start, so that a pool the batch has seen already is found with
/// borrowed names (a tuple key cost two string copies per pool of every folded request).
#[derive(Default)]
pub(crate) struct WindowRows(BTreeMap<String, BTreeMap<String, PoolWindows>>);

/// One pool's windows in a batch, by window start.
type PoolWindows = BTreeMap<Option<DateTime<Utc>>, WindowRow>;

impl WindowRows {
    /// Every pool an admission of (leaf, model) at t would check, with its totals at t, merged
    /// in: called right after the event that touched them, so the first event that exhausts a
    /// window is the one recorded, not the batch's last.
    pub(crate) fn add(
        &mut self,
        state: &QuotaState,
        (leaf, model, at): &(Subject, Option<String>, DateTime<Utc>),
    ) {
        for t in state.pool_totals(leaf, model.as_deref(), *at) {
            let p = &t.policy.data;
            let mut row = WindowRow {
                start: t.window.map(|w| w.start),
                end: t.window.map(|w| w.end),
                metric: p.metric.as_str(),
                limit: t.limit,
                used: t.used,
                on_exhausted: p.on_exhausted.as_str(),
                exhausted_at: (t.used >= t.limit).then_some(*at),
            };
            let start = t.window.filter(|_| t.policy.windowed()).map(|w| w.start);
            // The names are copied only when the batch first sees the policy or the pool.
            let pools = match self.0.get_mut(p.policy_id.as_str()) {
                Some(pools) => pools,
                None => self.0.entry(p.policy_id.clone()).or_default(),
            };
            let windows = match pools.get_mut(t.pool.as_str()) {
                Some(windows) => windows,
                None => pools.entry(t.pool.to_string()).or_default(),
            };
            match windows.entry(start) {
                Entry::Vacant(v) => {
                    v.insert(row);
                }
                Entry::Occupied(mut o) => {
                    let first = o.get().exhausted_at;
                    row.exhausted_at = row.exhausted_at.and(first.or(row.exhausted_at));
                    o.insert(row);
                }
            }
        }
    }

    /// The rows in key order (policy, pool, window start).
    fn into_rows(self) -> Vec<(WindowKey, WindowRow)> {
        let mut out = Vec::new();
        for (policy, pools) in self.0 {
            for (pool, windows) in pools {
                for (start, row) in windows {
                    out.push(((policy.clone(), pool.clone(), start), row));
                }
            }
        }
        out
    }
}

/// A credit balance row: subject, balance, refill schedule, last refill.
type CreditRow = (
    String,
    i64,
    Option<serde_json::Value>,
    Option<DateTime<Utc>>,
);

/// A subject row: name, parent, groups, disabled.
type SubjectRow = (String, Option<String>, Vec<String>, bool);

/// Rows to write, computed under the lock and written after it.
#[derive(Default)]
pub(crate) struct Rows {
    subjects: Vec<SubjectRow>,
    absent_subjects: Vec<String>,
    retired: Vec<String>,
    model_groups: Vec<(String, Option<Vec<String>>)>,
    policies: Vec<(String, Option<serde_json::Value>)>,
    grants: Vec<(String, Option<serde_json::Value>)>,
    credits: Vec<CreditRow>,
    pub(crate) windows: Vec<(WindowKey, WindowRow)>,
}

impl Rows {
    pub(crate) fn of(state: &QuotaState, t: &Touched, windows: WindowRows) -> Rows {
        let mut rows = Rows {
            retired: t.retired.iter().map(|s| s.to_string()).collect(),
            windows: windows.into_rows(),
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
        write_subjects(tx, t, &self.subjects, now).await?;
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
                    .await?;
                }
                None => delete_where(tx, &t.name("cfg_model_groups"), "name", &[name]).await?,
            }
        }
        write_policies(tx, t, &self.policies, now).await?;
        write_grants(tx, t, &self.grants).await
    }
}

/// Every touched subject in one statement (a batch of configuration can hold thousands: a
/// replay's first pages are the whole configuration). Groups travel as JSON arrays: `UNNEST`
/// cannot take an array of arrays of different lengths.
async fn write_subjects(
    tx: &mut PgConnection,
    t: Tables,
    subjects: &[SubjectRow],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    if subjects.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = subjects.iter().map(|s| s.0.as_str()).collect();
    let parents: Vec<Option<&str>> = subjects.iter().map(|s| s.1.as_deref()).collect();
    let groups: Vec<serde_json::Value> = subjects.iter().map(|s| s.2.clone().into()).collect();
    let disabled: Vec<bool> = subjects.iter().map(|s| s.3).collect();
    sqlx::query(&format!(
        "INSERT INTO {} (subject, parent, groups, disabled, updated_at) \
         SELECT s, p, ARRAY(SELECT jsonb_array_elements_text(g)), d, $5 \
         FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::bool[]) AS u(s, p, g, d) \
         ON CONFLICT (subject) DO UPDATE SET parent = EXCLUDED.parent, groups = EXCLUDED.groups, \
           disabled = EXCLUDED.disabled, updated_at = EXCLUDED.updated_at",
        t.name("cfg_subjects")
    ))
    .bind(names)
    .bind(parents)
    .bind(groups)
    .bind(disabled)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Delete the rows whose `column` is one of `keys` (nothing to send when there are none: most
/// batches retire nothing).
async fn delete_where(
    tx: &mut PgConnection,
    table: &str,
    column: &str,
    keys: &[&String],
) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!("DELETE FROM {table} WHERE {column} = ANY($1)"))
        .bind(keys)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Touched policies or grants by id, split into the ids gone (deleted) and the ids and JSON
/// bodies of the live ones.
fn split_touched(
    touched: &[(String, Option<serde_json::Value>)],
) -> (Vec<&String>, Vec<&str>, Vec<&serde_json::Value>) {
    let mut gone = Vec::new();
    let (mut ids, mut bodies) = (Vec::new(), Vec::new());
    for (id, body) in touched {
        match body {
            Some(b) => {
                ids.push(id.as_str());
                bodies.push(b);
            }
            None => gone.push(id),
        }
    }
    (gone, ids, bodies)
}

/// Touched policies: the live ones upserted in one statement, the deleted ones deleted in one.
async fn write_policies(
    tx: &mut PgConnection,
    t: Tables,
    policies: &[(String, Option<serde_json::Value>)],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let table = t.name("cfg_policies");
    let (gone, ids, bodies) = split_touched(policies);
    delete_where(tx, &table, "policy_id", &gone).await?;
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {table} (policy_id, subject, model_group, metric, \"limit\", \"window\", boundary, \
           on_exhausted, enabled, created_at, updated_at) \
         SELECT i, p->>'subject', p->>'model_group', p->>'metric', (p->>'limit')::bigint, p->'window', \
           p->>'boundary', p->>'on_exhausted', (p->>'enabled')::boolean, (p->>'created_at')::timestamptz, $3 \
         FROM UNNEST($1::text[], $2::jsonb[]) AS u(i, p) \
         ON CONFLICT (policy_id) DO UPDATE SET subject = EXCLUDED.subject, model_group = EXCLUDED.model_group, \
           metric = EXCLUDED.metric, \"limit\" = EXCLUDED.\"limit\", \"window\" = EXCLUDED.\"window\", \
           boundary = EXCLUDED.boundary, on_exhausted = EXCLUDED.on_exhausted, enabled = EXCLUDED.enabled, \
           updated_at = EXCLUDED.updated_at"
    ))
    .bind(ids).bind(bodies).bind(now)
    .execute(&mut *tx).await?;
    Ok(())
}

/// Touched grants: issued ones inserted in one statement (a grant never changes), revoked ones
/// deleted in one.
async fn write_grants(
    tx: &mut PgConnection,
    t: Tables,
    grants: &[(String, Option<serde_json::Value>)],
) -> Result<(), Error> {
    let table = t.name("cfg_grants");
    let (gone, ids, bodies) = split_touched(grants);
    delete_where(tx, &table, "grant_id", &gone).await?;
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {table} (grant_id, subject, model_group, metric, amount, window_kind, starts_at, expires_at) \
         SELECT i, g->>'subject', g->>'model_group', g->>'metric', (g->>'amount')::bigint, g->>'window_kind', \
           (g->>'starts_at')::timestamptz, (g->>'expires_at')::timestamptz \
         FROM UNNEST($1::text[], $2::jsonb[]) AS u(i, g) ON CONFLICT (grant_id) DO NOTHING"
    ))
    .bind(ids).bind(bodies)
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

async fn write_windows(
    tx: &mut PgConnection,
    t: Tables,
    w: &[(WindowKey, WindowRow)],
) -> Result<(), Error> {
    if w.is_empty() {
        return Ok(());
    }
    type Row = (WindowKey, WindowRow);
    let col = |f: fn(&Row) -> Option<DateTime<Utc>>| w.iter().map(f).collect::<Vec<_>>();
    let text = |f: fn(&Row) -> &str| w.iter().map(f).collect::<Vec<_>>();
    let num = |f: fn(&Row) -> i64| w.iter().map(f).collect::<Vec<_>>();
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
    .bind(text(|(k, _)| &k.0))
    .bind(text(|(k, _)| &k.1))
    .bind(col(|(k, _)| k.2))
    .bind(col(|(_, r)| r.start))
    .bind(col(|(_, r)| r.end))
    .bind(text(|(_, r)| r.metric))
    .bind(num(|(_, r)| r.limit))
    .bind(num(|(_, r)| r.used))
    .bind(text(|(_, r)| r.on_exhausted))
    .bind(col(|(_, r)| r.exhausted_at))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

//! The `quota` projection: configuration tables (subjects, model groups, policies, grants, credit
//! balances) and per-window totals and exhaustion states of every pool a request touched, folded
//! by the same [`QuotaState`] the API decides with, so the tables and the live decisions agree.

use std::collections::BTreeSet;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tally_events::quota::{AdmitRequest, CREDITS_CHECK, QuotaState};
use tally_events::{Envelope, EventData, Subject, Usage};

use crate::Error;
use crate::runner::{ApplyFuture, Projection, decode_rows};

/// Ledger rows read per round trip while rebuilding the in-memory state.
const REBUILD_PAGE_ROWS: i64 = 10_000;

/// The quota projection (name `quota`).
#[derive(Default)]
pub struct QuotaProjection {
    /// The fold, and the ledger position it reflects (None while a batch is in flight or after
    /// a failed one: the next batch rebuilds).
    state: Mutex<(Option<i64>, QuotaState)>,
}

/// What a batch touched.
#[derive(Default)]
struct Touched {
    subjects: BTreeSet<Subject>,
    model_groups: BTreeSet<String>,
    policies: BTreeSet<String>,
    grants: BTreeSet<String>,
    credits: BTreeSet<Subject>,
    /// (leaf, model, window time): pools to recompute.
    requests: Vec<(Subject, Option<String>, DateTime<Utc>)>,
}

impl Touched {
    fn note(&mut self, env: &Envelope) {
        let subject = env.subject.clone();
        match &env.data {
            EventData::SubjectUpserted(_) => self.subjects.extend(subject),
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
            EventData::AdmissionDecided(a) => {
                self.credits.extend(a.chain.iter().cloned());
                if let Some(leaf) = a.chain.first() {
                    self.requests
                        .push((leaf.clone(), a.model.clone(), env.occurred_at));
                }
            }
            EventData::UsageSettled(d) => {
                self.credits.extend(d.chain.iter().cloned());
                if let Some(leaf) = d.chain.first() {
                    self.requests
                        .push((leaf.clone(), d.model.clone(), d.window_at));
                }
            }
            _ => {}
        }
    }
}

impl Projection for QuotaProjection {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn prepare<'a>(&'a self, tx: &'a mut PgConnection, from: i64) -> ApplyFuture<'a> {
        Box::pin(async move {
            if self.state.lock().expect("quota projection lock").0 == Some(from) {
                return Ok(());
            }
            let rebuilt = rebuild(tx, from).await?;
            *self.state.lock().expect("quota projection lock") = (None, rebuilt);
            Ok(())
        })
    }

    fn apply<'a>(&'a self, tx: &'a mut PgConnection, events: &'a [Envelope]) -> ApplyFuture<'a> {
        Box::pin(async move {
            let mut touched = Touched::default();
            let rows = {
                let mut guard = self.state.lock().expect("quota projection lock");
                guard.0 = None;
                let mut windows = WindowRows::default();
                for env in events {
                    guard.1.apply(env);
                    let before = touched.requests.len();
                    touched.note(env);
                    // Pools are computed right after the event that touched them, so the first
                    // event that exhausts a window is the one recorded, not the batch's last.
                    for r in &touched.requests[before..] {
                        windows.merge(window_rows(&guard.1, std::slice::from_ref(r)));
                    }
                }
                let mut rows = Rows::of(&guard.1, &touched);
                rows.windows = windows.0.into_values().collect();
                rows
            };
            rows.write(tx).await
        })
    }

    fn committed(&self, to: i64) {
        self.state.lock().expect("quota projection lock").0 = Some(to);
    }
}

/// The state as of ledger position `upto`, folded from the first row.
async fn rebuild(tx: &mut PgConnection, upto: i64) -> Result<QuotaState, Error> {
    let mut state = QuotaState::default();
    let mut after = 0i64;
    while after < upto {
        let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
            "SELECT pos, payload FROM ledger WHERE pos > $1 AND pos <= $2 ORDER BY pos LIMIT $3",
        )
        .bind(after)
        .bind(upto)
        .bind(REBUILD_PAGE_ROWS)
        .fetch_all(&mut *tx)
        .await?;
        let Some(&(last, _)) = rows.last() else { break };
        for env in decode_rows(&rows)? {
            state.apply(&env);
        }
        after = last;
    }
    Ok(state)
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
struct Rows {
    subjects: Vec<(String, Option<String>, Vec<String>, bool)>,
    absent_subjects: Vec<String>,
    model_groups: Vec<(String, Option<Vec<String>>)>,
    policies: Vec<(String, Option<serde_json::Value>)>,
    grants: Vec<(String, Option<serde_json::Value>)>,
    credits: Vec<CreditRow>,
    windows: Vec<WindowRow>,
}

struct WindowRow {
    policy_id: String,
    subject: String,
    window_key: Option<DateTime<Utc>>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    metric: String,
    limit: i64,
    used: i64,
    on_exhausted: String,
    /// Event time of the first event in the batch that found the window exhausted.
    exhausted_at: Option<DateTime<Utc>>,
}

type WindowKey = (String, String, Option<DateTime<Utc>>);

/// Latest totals per pool and window in a batch, keeping the first exhaustion time.
#[derive(Default)]
struct WindowRows(std::collections::BTreeMap<WindowKey, WindowRow>);

impl WindowRows {
    fn merge(&mut self, rows: Vec<WindowRow>) {
        for mut row in rows {
            let key = (row.policy_id.clone(), row.subject.clone(), row.window_key);
            if let Some(old) = self.0.get(&key) {
                row.exhausted_at = row.exhausted_at.and(old.exhausted_at.or(row.exhausted_at));
            }
            self.0.insert(key, row);
        }
    }
}

fn text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Rows {
    fn of(state: &QuotaState, t: &Touched) -> Rows {
        let mut rows = Rows::default();
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
}

/// Every pool an admission of (leaf, model) at t would check, with its totals at t.
fn window_rows(
    state: &QuotaState,
    requests: &[(Subject, Option<String>, DateTime<Utc>)],
) -> Vec<WindowRow> {
    let mut out = Vec::new();
    for (leaf, model, at) in requests {
        let d = state.decide(&AdmitRequest {
            leaf,
            model: model.as_deref(),
            estimate: Usage::default(),
            credits: Some(0),
            at: *at,
        });
        for c in d.checks.iter().filter(|c| c.policy_id != CREDITS_CHECK) {
            let Some(p) = state.config.policy(&c.policy_id) else {
                continue;
            };
            let windowed = matches!(p.spec.kind(), "calendar" | "periodic");
            out.push(WindowRow {
                policy_id: c.policy_id.clone(),
                subject: c.subject.to_string(),
                window_key: if windowed {
                    c.window.map(|w| w.start)
                } else {
                    None
                },
                start: c.window.map(|w| w.start),
                end: c.window.map(|w| w.end),
                metric: text(&c.metric),
                limit: c.limit,
                used: c.used,
                on_exhausted: text(&p.data.on_exhausted),
                exhausted_at: (c.used >= c.limit).then_some(*at),
            });
        }
    }
    out
}

impl Rows {
    async fn write(self, tx: &mut PgConnection) -> Result<(), Error> {
        let now = Utc::now();
        for (s, parent, groups, disabled) in self.subjects {
            sqlx::query(
                "INSERT INTO cfg_subjects (subject, parent, groups, disabled, updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (subject) DO UPDATE SET parent = $2, groups = $3, disabled = $4, updated_at = $5",
            )
            .bind(s).bind(parent).bind(groups).bind(disabled).bind(now)
            .execute(&mut *tx).await?;
        }
        for s in self.absent_subjects {
            sqlx::query("DELETE FROM cfg_subjects WHERE subject = $1")
                .bind(s)
                .execute(&mut *tx)
                .await?;
        }
        for (name, models) in self.model_groups {
            match models {
                Some(m) => sqlx::query(
                    "INSERT INTO cfg_model_groups (name, models, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET models = $2, updated_at = $3",
                )
                .bind(name)
                .bind(m)
                .bind(now),
                None => sqlx::query("DELETE FROM cfg_model_groups WHERE name = $1").bind(name),
            }
            .execute(&mut *tx)
            .await?;
        }
        for (id, p) in self.policies {
            write_policy(tx, &id, p, now).await?;
        }
        for (id, g) in self.grants {
            write_grant(tx, &id, g).await?;
        }
        for (s, balance, refill, last) in self.credits {
            sqlx::query(
                "INSERT INTO credit_balances (subject, balance, refill, last_refill, updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (subject) DO UPDATE SET balance = $2, refill = $3, last_refill = $4, updated_at = $5",
            )
            .bind(s).bind(balance).bind(refill).bind(last).bind(now)
            .execute(&mut *tx).await?;
        }
        for w in self.windows {
            write_window(tx, w).await?;
        }
        Ok(())
    }
}

async fn write_policy(
    tx: &mut PgConnection,
    id: &str,
    p: Option<serde_json::Value>,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let Some(p) = p else {
        sqlx::query("DELETE FROM cfg_policies WHERE policy_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO cfg_policies (policy_id, subject, model_group, metric, \"limit\", \"window\", boundary, \
           on_exhausted, enabled, created_at, updated_at) \
         SELECT $1, p->>'subject', p->>'model_group', p->>'metric', (p->>'limit')::bigint, p->'window', \
           p->>'boundary', p->>'on_exhausted', (p->>'enabled')::boolean, (p->>'created_at')::timestamptz, $3 \
         FROM (SELECT $2::jsonb AS p) t \
         ON CONFLICT (policy_id) DO UPDATE SET subject = EXCLUDED.subject, model_group = EXCLUDED.model_group, \
           metric = EXCLUDED.metric, \"limit\" = EXCLUDED.\"limit\", \"window\" = EXCLUDED.\"window\", \
           boundary = EXCLUDED.boundary, on_exhausted = EXCLUDED.on_exhausted, enabled = EXCLUDED.enabled, \
           updated_at = EXCLUDED.updated_at",
    )
    .bind(id).bind(p).bind(now)
    .execute(&mut *tx).await?;
    Ok(())
}

async fn write_grant(
    tx: &mut PgConnection,
    id: &str,
    g: Option<serde_json::Value>,
) -> Result<(), Error> {
    let Some(g) = g else {
        sqlx::query("DELETE FROM cfg_grants WHERE grant_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO cfg_grants (grant_id, subject, model_group, metric, amount, window_kind, starts_at, expires_at) \
         SELECT $1, g->>'subject', g->>'model_group', g->>'metric', (g->>'amount')::bigint, g->>'window_kind', \
           (g->>'starts_at')::timestamptz, (g->>'expires_at')::timestamptz \
         FROM (SELECT $2::jsonb AS g) t ON CONFLICT (grant_id) DO NOTHING",
    )
    .bind(id).bind(g)
    .execute(&mut *tx).await?;
    Ok(())
}

async fn write_window(tx: &mut PgConnection, w: WindowRow) -> Result<(), Error> {
    let exhausted = w.exhausted_at.is_some();
    sqlx::query(
        "INSERT INTO quota_windows (policy_id, subject, window_key, window_start, window_end, metric, \"limit\", used, \
           on_exhausted, exhausted_at, updated_at) \
         VALUES ($1, $2, COALESCE($3, '-infinity'::timestamptz), $4, $5, $6, $7, $8, $9, CASE WHEN $10 THEN $11 END, clock_timestamp()) \
         ON CONFLICT (policy_id, subject, window_key) DO UPDATE SET window_start = $4, window_end = $5, \
           \"limit\" = $7, used = $8, on_exhausted = $9, \
           exhausted_at = CASE WHEN $10 THEN COALESCE(quota_windows.exhausted_at, $11) END, \
           updated_at = clock_timestamp()",
    )
    .bind(w.policy_id).bind(w.subject).bind(w.window_key).bind(w.start).bind(w.end)
    .bind(w.metric).bind(w.limit).bind(w.used).bind(w.on_exhausted).bind(exhausted).bind(w.exhausted_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

//! `tally whatif` (SPEC v2 §8): fold the ledger in stream order with candidate policies added
//! (or, with `--replace`, in place of the policies of the same id) and decide every admission
//! that really was admitted again with the same decision code the API uses. A request a
//! candidate refuses holds and uses nothing from then on in the counterfactual. Per pool subject
//! and candidate policy: how many admissions would have been refused, how much settled usage
//! they would have blocked, and the first refusal. Reads only; writes nothing anywhere.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::{Deserialize, Serialize};
use tally_events::quota::{AdmitRequest, CREDITS_CHECK, QuotaState};
use tally_events::{
    Boundary, Envelope, EventData, Metric, OnExhausted, Outcome, PolicyUpserted, Subject, Usage,
    Window,
};

use crate::audit::{connect_db, fold_ledger};
use crate::cli::CommonArgs;

/// Most candidate policies in one file: each is checked for every admission.
pub const MAX_CANDIDATES: usize = 100;
/// Largest candidate file read.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// `tally whatif` settings.
#[derive(Debug, Clone, Args)]
pub struct WhatifArgs {
    /// Shared settings (only the database and the reservation TTL are used).
    #[command(flatten)]
    pub common: CommonArgs,
    /// JSON file: an array of policies, each `{"id", ...the body of PUT /v1/policies/{id}}`.
    #[arg(long)]
    pub policies: PathBuf,
    /// Only admissions at or after this time (RFC 3339) are decided again.
    #[arg(long)]
    pub from: Option<DateTime<Utc>>,
    /// Only admissions before this time.
    #[arg(long)]
    pub to: Option<DateTime<Utc>>,
    /// A candidate whose id the ledger also defines replaces that policy for all of history
    /// (without it, such a candidate is an error).
    #[arg(long)]
    pub replace: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One candidate, as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Candidate {
    id: String,
    subject: Subject,
    #[serde(default)]
    model_group: Option<String>,
    metric: Metric,
    limit: i64,
    window: Window,
    #[serde(default)]
    boundary: Option<Boundary>,
    #[serde(default)]
    on_exhausted: Option<OnExhausted>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// What one candidate would have done to one pool subject.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Impact {
    /// Admissions it would have refused.
    pub refused: u64,
    /// Settled usage of those requests (what would not have been consumed).
    pub blocked_usage: Usage,
    /// The first refusal's event time.
    pub first_refused_at: Option<DateTime<Utc>>,
}

/// The what-if's result: per (pool subject, candidate policy id).
#[derive(Clone, Debug, Default, Serialize)]
pub struct WhatifReport {
    /// Ledger rows folded.
    pub rows: u64,
    /// Admissions decided again (admitted in reality, within the range).
    pub admissions_decided: u64,
    /// Impacts, ordered by subject then policy.
    pub impacts: Vec<ImpactRow>,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct ImpactRow {
    /// The pool subject the candidate's check was on.
    pub subject: String,
    /// The candidate's id.
    pub policy_id: String,
    /// What it would have done.
    #[serde(flatten)]
    pub impact: Impact,
}

/// Parse the candidate file into validated `policy.upserted` data, naming the bad field.
pub fn read_candidates(path: &PathBuf) -> anyhow::Result<Vec<PolicyUpserted>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= MAX_POLICY_FILE_BYTES,
        "{} is larger than {MAX_POLICY_FILE_BYTES} bytes",
        path.display()
    );
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_slice(&text);
    let list: Vec<Candidate> = serde_path_to_error::deserialize(de)
        .map_err(|e| anyhow::anyhow!("{}: at `{}`: {}", path.display(), e.path(), e.inner()))?;
    anyhow::ensure!(!list.is_empty(), "{}: no policies", path.display());
    anyhow::ensure!(
        list.len() <= MAX_CANDIDATES,
        "{}: {} policies, at most {MAX_CANDIDATES}",
        path.display(),
        list.len()
    );
    let mut out: Vec<PolicyUpserted> = Vec::new();
    for (i, c) in list.into_iter().enumerate() {
        let data = PolicyUpserted {
            policy_id: c.id,
            subject: c.subject,
            model_group: c.model_group,
            metric: c.metric,
            limit: c.limit,
            window: c.window,
            boundary: c.boundary.unwrap_or_default(),
            on_exhausted: c.on_exhausted.unwrap_or_default(),
            enabled: c.enabled.unwrap_or(true),
        };
        anyhow::ensure!(
            !out.iter().any(|p| p.policy_id == data.policy_id),
            "{}: [{i}].id `{}` appears twice",
            path.display(),
            data.policy_id
        );
        // The same validators as PUT /v1/policies, naming the field as written in the file.
        tally_events::rules::validate_id(&format!("[{i}].id"), &data.policy_id)
            .and_then(|()| tally_events::rules::validate_policy(&format!("[{i}]"), &data).map(drop))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        out.push(data);
    }
    Ok(out)
}

/// Run `tally whatif`.
pub async fn run(args: WhatifArgs) -> anyhow::Result<i32> {
    let candidates = read_candidates(&args.policies)?;
    let pool = connect_db(&args.common).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(stream_seq), 0) FROM ledger")
        .fetch_one(&mut *tx)
        .await?;
    let idempotency = chrono::Duration::from_std(args.common.reservation_ttl * 2)
        .unwrap_or(chrono::Duration::MAX);
    let mut w = Counterfactual::new(candidates, args.replace, (args.from, args.to), idempotency);
    let mut failure = None;
    let rows = fold_ledger(
        &mut tx,
        tally_projector::Order::StreamSeq,
        (0, head),
        |env| {
            if failure.is_none()
                && let Err(e) = w.apply(env)
            {
                failure = Some(e);
            }
        },
    )
    .await?;
    tx.commit().await?;
    if let Some(e) = failure {
        return Err(e);
    }
    let report = w.report(rows);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
}

fn print_report(r: &WhatifReport) {
    println!(
        "whatif: {} ledger rows, {} admissions decided again",
        r.rows, r.admissions_decided
    );
    if r.impacts.is_empty() {
        println!("whatif: no admission would have been refused");
    }
    for i in &r.impacts {
        let u = &i.impact.blocked_usage;
        println!(
            "  {} {}: {} refused (first at {}), blocked requests {} input_tokens {} output_tokens {} cost {} credits {}",
            i.subject,
            i.policy_id,
            i.impact.refused,
            i.impact
                .first_refused_at
                .map_or("-".to_owned(), |t| t.to_rfc3339()),
            u.requests,
            u.input_tokens,
            u.output_tokens,
            u.cost,
            u.credits
        );
    }
}

/// The counterfactual fold (pure: no IO).
pub struct Counterfactual {
    state: QuotaState,
    candidates: Vec<PolicyUpserted>,
    replace: bool,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    started: bool,
    /// Requests a candidate refused → the (subject, policy) charged with them.
    refused: HashMap<String, (String, String)>,
    impacts: BTreeMap<(String, String), Impact>,
    decided: u64,
}

impl Counterfactual {
    /// A counterfactual with `candidates`.
    pub fn new(
        candidates: Vec<PolicyUpserted>,
        replace: bool,
        range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        idempotency: chrono::Duration,
    ) -> Self {
        let mut state = QuotaState::default();
        state.set_idempotency(idempotency);
        Counterfactual {
            state,
            candidates,
            replace,
            range,
            started: false,
            refused: HashMap::new(),
            impacts: BTreeMap::new(),
            decided: 0,
        }
    }

    fn is_candidate(&self, id: &str) -> bool {
        self.candidates.iter().any(|c| c.policy_id == id)
    }

    /// Fold one ledger event.
    pub fn apply(&mut self, env: &Envelope) -> anyhow::Result<()> {
        if !self.started {
            // The candidates exist from the first event on (their periodic anchor is then).
            self.started = true;
            for c in self.candidates.clone() {
                let e = Envelope::new(EventData::PolicyUpserted(c), env.occurred_at, None, None);
                self.state.apply(&e);
            }
        }
        let rid = env.request_id.clone().unwrap_or_default();
        match &env.data {
            EventData::PolicyUpserted(p) if self.is_candidate(&p.policy_id) => {
                return self.clash(&p.policy_id);
            }
            EventData::PolicyDeleted(d) if self.is_candidate(&d.id) => return self.clash(&d.id),
            // Decided again (counted in `decided`); left out when a candidate refuses it.
            EventData::AdmissionDecided(a)
                if a.admitted && self.in_range(env.occurred_at) && self.decide_again(env, a) =>
            {
                return Ok(());
            }
            EventData::UsageSettled(s) => {
                if let Some(key) = self.refused.get(&rid) {
                    let impact = self.impacts.entry(key.clone()).or_default();
                    impact.blocked_usage = impact.blocked_usage.plus(&s.usage);
                    return Ok(());
                }
            }
            EventData::ReservationReleased(_) | EventData::ReservationExpired(_)
                if self.refused.contains_key(&rid) =>
            {
                return Ok(());
            }
            _ => {}
        }
        self.state.apply(env);
        Ok(())
    }

    fn clash(&self, id: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.replace,
            "candidate policy `{id}` is also defined in the ledger; pass --replace to replace it"
        );
        Ok(())
    }

    fn in_range(&self, t: DateTime<Utc>) -> bool {
        self.range.0.is_none_or(|f| t >= f) && self.range.1.is_none_or(|e| t < e)
    }

    /// Decide an admission again; true when a candidate refuses it (it is then left out).
    fn decide_again(&mut self, env: &Envelope, a: &tally_events::AdmissionDecided) -> bool {
        let Some(leaf) = a.chain.first() else {
            return false;
        };
        self.decided += 1;
        let d = self.state.decide(&AdmitRequest {
            leaf,
            model: a.model.as_deref(),
            estimate: a.estimate,
            credits: Some(a.estimate.credits),
            at: env.occurred_at,
        });
        let refusing = d.checks.iter().find(|c| {
            c.outcome == Outcome::Fail
                && c.policy_id != CREDITS_CHECK
                && self.is_candidate(&c.policy_id)
        });
        let Some(check) = refusing else {
            return false;
        };
        let key = (check.subject.to_string(), check.policy_id.clone());
        let impact = self.impacts.entry(key.clone()).or_default();
        impact.refused += 1;
        impact.first_refused_at.get_or_insert(env.occurred_at);
        if let Some(rid) = &env.request_id {
            self.refused.insert(rid.clone(), key);
        }
        true
    }

    /// The report so far.
    pub fn report(self, rows: u64) -> WhatifReport {
        WhatifReport {
            rows,
            admissions_decided: self.decided,
            impacts: self
                .impacts
                .into_iter()
                .map(|((subject, policy_id), impact)| ImpactRow {
                    subject,
                    policy_id,
                    impact,
                })
                .collect(),
        }
    }
}

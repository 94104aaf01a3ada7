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
use tally_events::quota::{
    AdmitRequest, CREDITS_CHECK, MAX_OPEN_REQUESTS, QuotaState, oldest_first,
};
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
/// Events folded between two rounds of forgetting what a live instance would have forgotten
/// (closed requests, compacted usage): the counterfactual's memory follows the active pools and
/// open requests, as the live state's does, not the length of the history it replays.
pub const MAINTAIN_EVERY_EVENTS: u64 = 10_000;
/// Subjects whose usage is compacted in one round (a round of the whole state every few).
const COMPACT_SUBJECTS_PER_ROUND: usize = 20_000;
/// Most refused requests remembered at once, as many as the live state keeps open requests:
/// past it, the closed ones seen longest ago are forgotten first.
pub const MAX_REFUSED_REQUESTS: usize = MAX_OPEN_REQUESTS;

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
    let backfill =
        chrono::Duration::from_std(args.common.max_backfill).unwrap_or(chrono::Duration::MAX);
    let range = (args.from, args.to);
    let mut w = Counterfactual::new(candidates, args.replace, range, idempotency, backfill);
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
    /// Admissions a candidate refused (by admission id: a request id reused later names a new
    /// request) → the (subject, policy) charged with their usage.
    refused: HashMap<uuid::Uuid, Refused>,
    impacts: BTreeMap<(String, String), Impact>,
    decided: u64,
    /// How far before the stream's clock an admission may be decided (`--max-backfill`): the
    /// usage compaction keeps every window exact from there on.
    backfill: chrono::Duration,
    folded: u64,
}

/// A request whose admission a candidate refused.
struct Refused {
    /// The (pool subject, candidate policy) charged with its usage.
    key: (String, String),
    /// Its final settlement or release arrived (later copies of its settlements are still its).
    closed: bool,
    /// Event time of its last event.
    seen_at: DateTime<Utc>,
}

impl Counterfactual {
    /// A counterfactual with `candidates`.
    pub fn new(
        candidates: Vec<PolicyUpserted>,
        replace: bool,
        range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        idempotency: chrono::Duration,
        backfill: chrono::Duration,
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
            backfill,
            folded: 0,
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
        self.folded += 1;
        if self.folded.is_multiple_of(MAINTAIN_EVERY_EVENTS) {
            self.maintain();
        }
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
                if let Some(r) = s.admission_id.and_then(|id| self.refused.get_mut(&id)) {
                    r.closed |= s.is_final;
                    r.seen_at = r.seen_at.max(env.occurred_at);
                    let impact = self.impacts.entry(r.key.clone()).or_default();
                    impact.blocked_usage = impact.blocked_usage.plus(&s.usage);
                    return Ok(());
                }
            }
            EventData::ReservationReleased(e) | EventData::ReservationExpired(e) => {
                if let Some(r) = self.refused.get_mut(&e.admission_id) {
                    r.closed = true;
                    r.seen_at = r.seen_at.max(env.occurred_at);
                    return Ok(());
                }
            }
            _ => {}
        }
        self.state.apply(env);
        Ok(())
    }

    /// Forget what a live instance would have forgotten by the stream's clock: closed requests
    /// past the idempotency window, usage older than any window still needs at minute (or hour)
    /// resolution, and refused requests closed as long ago.
    fn maintain(&mut self) {
        self.state.prune();
        let Some(clock) = self.state.clock() else {
            return;
        };
        self.state
            .compact_as_of(clock, self.backfill, COMPACT_SUBJECTS_PER_ROUND);
        let horizon = clock
            .checked_sub_signed(self.state.idempotency())
            .unwrap_or(clock);
        self.refused
            .retain(|_, r| !r.closed || r.seen_at >= horizon);
        if self.refused.len() > MAX_REFUSED_REQUESTS {
            let excess = self.refused.len() - MAX_REFUSED_REQUESTS;
            let closed = self.refused.iter().filter(|(_, r)| r.closed);
            for id in oldest_first(closed.map(|(id, r)| (r.seen_at, id)), excess) {
                self.refused.remove(&id);
            }
        }
    }

    /// Refused requests remembered now (for tests of the bound).
    pub fn refused_remembered(&self) -> usize {
        self.refused.len()
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
        let refused = Refused {
            key,
            closed: false,
            seen_at: env.occurred_at,
        };
        self.refused.insert(a.admission_id, refused);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tally_events::{AdmissionDecided, CalendarUnit, ReservationEnded, SubjectUpserted};
    use tally_events::{UsageSettled, quota::DEFAULT_IDEMPOTENCY_MINUTES};

    fn t0() -> DateTime<Utc> {
        "2026-11-20T10:00:00Z".parse().unwrap()
    }

    fn k0() -> Subject {
        Subject::parse("key:k0").unwrap()
    }

    fn candidate(limit: i64) -> PolicyUpserted {
        PolicyUpserted {
            policy_id: "k0-daily".into(),
            subject: k0(),
            model_group: None,
            metric: Metric::Requests,
            limit,
            window: Window::Calendar {
                unit: CalendarUnit::Day,
                timezone: None,
                reset_at: None,
                week_start: None,
            },
            boundary: Boundary::default(),
            on_exhausted: OnExhausted::default(),
            enabled: true,
        }
    }

    fn counterfactual(limit: i64) -> Counterfactual {
        let idempotency = chrono::Duration::minutes(DEFAULT_IDEMPOTENCY_MINUTES);
        let backfill = chrono::Duration::days(35);
        let mut w = Counterfactual::new(
            vec![candidate(limit)],
            false,
            (None, None),
            idempotency,
            backfill,
        );
        let subject = SubjectUpserted {
            parent: None,
            groups: vec![],
            disabled: false,
        };
        let e = Envelope::new(EventData::SubjectUpserted(subject), t0(), None, Some(k0()));
        w.apply(&e).unwrap();
        w
    }

    /// An admitted request: its admission, one settlement of `cost` (final when `end` is None)
    /// and, with `end`, the event that ends it instead.
    fn request(rid: &str, at: DateTime<Utc>, cost: i64, end: Option<bool>) -> Vec<Envelope> {
        let usage = |requests, cost| Usage {
            requests,
            cost,
            ..Usage::default()
        };
        let mut adm = Envelope::new(
            EventData::SubjectDeleted(Default::default()),
            at,
            Some(rid.into()),
            Some(k0()),
        );
        adm.data = EventData::AdmissionDecided(AdmissionDecided {
            admission_id: adm.id,
            admitted: true,
            reason: None,
            retry_after_seconds: None,
            model: None,
            model_group: None,
            chain: vec![k0()],
            estimate: usage(1, 0),
            counted_in_key_global: true,
            counted_in_user_global: true,
            checks: vec![],
            received_at: at,
        });
        let settled = EventData::UsageSettled(UsageSettled {
            settlement_id: format!("{rid}:0"),
            usage: usage(1, cost),
            success: true,
            is_final: end.is_none(),
            seq: 0,
            matched_admission: true,
            admission_id: Some(adm.id),
            model: None,
            model_group: None,
            chain: vec![k0()],
            counted_in_key_global: true,
            counted_in_user_global: true,
            window_at: at,
        });
        let later = at + chrono::Duration::seconds(1);
        let mut out = vec![
            adm.clone(),
            Envelope::new(settled, later, Some(rid.into()), Some(k0())),
        ];
        if let Some(released) = end {
            let ended = ReservationEnded {
                admission_id: adm.id,
            };
            let data = if released {
                EventData::ReservationReleased(ended)
            } else {
                EventData::ReservationExpired(ended)
            };
            out.push(Envelope::new(data, later, Some(rid.into()), Some(k0())));
        }
        out
    }

    /// A request id reused after its idempotency window names a new request (SPEC §4.6): the
    /// candidate refused the first, not the second, and only the first one's usage is blocked.
    #[test]
    fn a_reused_request_id_is_a_new_request() {
        let mut w = counterfactual(1);
        let day = chrono::Duration::days(1);
        let minute = chrono::Duration::minutes(1);
        let events = [
            request("r0", t0(), 5, None),
            request("r1", t0() + minute, 100, None),
            request("r1", t0() + day, 7, None),
        ];
        for e in events.iter().flatten() {
            w.apply(e).unwrap();
        }
        let r = w.report(0);
        assert_eq!(r.admissions_decided, 3);
        assert_eq!(r.impacts.len(), 1);
        assert_eq!(r.impacts[0].impact.refused, 1);
        assert_eq!(r.impacts[0].impact.blocked_usage.cost, 100);
        assert_eq!(r.impacts[0].impact.first_refused_at, Some(t0() + minute));
    }

    /// Over a long history every admission refused and ended (settled for good, released or
    /// expired), the requests remembered stay those of the last idempotency window, and their
    /// late settlements are still blocked.
    #[test]
    fn refused_requests_are_forgotten_once_ended() {
        let mut w = counterfactual(0);
        let n = 30_000u32;
        for i in 0..n {
            let at = t0() + chrono::Duration::seconds(2 * i64::from(i));
            let end = [None, Some(true), Some(false)][i as usize % 3];
            for e in request(&format!("r{i}"), at, 1, end) {
                w.apply(&e).unwrap();
            }
        }
        let window_requests = (DEFAULT_IDEMPOTENCY_MINUTES * 60 / 2) as usize;
        let remembered = w.refused_remembered();
        // Up to one maintenance interval of requests (< 5,000 here) arrives after the last round.
        assert!(remembered <= window_requests + 5_000, "{remembered}");
        assert!(remembered < n as usize / 3, "{remembered}");
        let r = w.report(0);
        assert_eq!(r.impacts[0].impact.refused, u64::from(n));
        assert_eq!(r.impacts[0].impact.blocked_usage.cost, i64::from(n));
    }
}

//! A realistic history, written at full speed (issue 5): a hierarchy (keys → users → teams →
//! customers, users in groups), two model groups, policies of every window kind on every chain,
//! credits on the customers, and traffic over the keys with a skew (a few hot keys): admissions
//! decided by the same pure core the API uses, settled in one piece or streamed in chunks,
//! released, or direct usage, spread over the past `days`. Events go through the real pipeline:
//! published to the stream (pipelined, acks awaited in order), appended by the ledger writer,
//! folded by the projections.
//!
//! Used by `tally bench --restart` and by the restart tests.

use chrono::{DateTime, Duration, Utc};
use tally_events::quota::{AdmitRequest, QuotaState};
use tally_events::*;
use tally_ledger::Publisher;

/// Events published per pipelined round: enough to keep the connection busy, bounded memory.
pub const PUBLISH_ROUND: usize = 2_000;

/// The shape of a history.
#[derive(Clone, Debug)]
pub struct HistorySpec {
    /// About this many events (configuration included).
    pub events: u64,
    /// Keys (the leaves traffic names).
    pub keys: usize,
    /// Users (keys are spread over them).
    pub users: usize,
    /// Teams.
    pub teams: usize,
    /// Customers.
    pub customers: usize,
    /// Traffic spreads over this many days before now.
    pub days: i64,
    /// Seed of the generator (same seed, same history).
    pub seed: u64,
}

impl HistorySpec {
    /// A history of `events` events over 100,000 keys (the bench's restart figures).
    pub fn large(events: u64) -> Self {
        HistorySpec {
            events,
            keys: 100_000,
            users: 10_000,
            teams: 1_000,
            customers: 100,
            days: 180,
            seed: 7,
        }
    }
}

/// What was written.
#[derive(Clone, Debug, Default)]
pub struct HistoryStats {
    /// Events published.
    pub events: u64,
    /// Admissions (of which refused).
    pub admissions: u64,
    /// Refused admissions.
    pub refused: u64,
    /// Settlements (chunks included).
    pub settlements: u64,
    /// The keys traffic named, busiest first (a sample for comparisons).
    pub hot_keys: Vec<String>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A skewed index in `0..n`: about half the draws go to the first 1 %.
    fn skewed(&mut self, n: u64) -> u64 {
        if self.below(2) == 0 {
            self.below((n / 100).max(1))
        } else {
            self.below(n)
        }
    }
}

fn subject(s: &str) -> Subject {
    Subject::parse(s).unwrap_or_else(|_| Subject::parse("key:invalid").expect("valid"))
}

/// The generator: a local fold of everything it publishes, to decide admissions as the API would.
struct Writer<'a> {
    /// Where events go; None folds them only (see [`fold`]).
    publisher: Option<&'a Publisher>,
    /// Request ids carry the seed: two histories on one stream never share one.
    seed: u64,
    q: QuotaState,
    pending: Vec<Envelope>,
    stats: HistoryStats,
}

impl Writer<'_> {
    /// Fold and queue `env`, its id stamped with its event time ([`stamped`]); returns the id.
    async fn emit(&mut self, env: Envelope) -> anyhow::Result<uuid::Uuid> {
        let env = stamped(env);
        let id = env.id;
        self.q.apply(&env);
        self.pending.push(env);
        self.stats.events += 1;
        if self.pending.len() >= PUBLISH_ROUND {
            self.flush().await?;
        }
        Ok(id)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let Some(publisher) = self.publisher else {
            self.pending.clear();
            return Ok(());
        };
        let records = self
            .pending
            .drain(..)
            .map(|e| {
                let subject = publisher.settings().subject_for(&e);
                (subject, e.id.to_string(), bytes::Bytes::from(e.encode()))
            })
            .collect::<Vec<_>>();
        let n = records.len();
        match publisher.publish_ordered(records).await {
            Ok(done) if done == n => Ok(()),
            Ok(done) => anyhow::bail!("{done} of {n} events acknowledged"),
            Err((done, e)) => anyhow::bail!("{done} of {n} events acknowledged: {e}"),
        }
    }

    async fn config(&mut self, spec: &HistorySpec, t0: DateTime<Utc>) -> anyhow::Result<()> {
        let up = |parent: Option<String>, groups: Vec<String>| {
            EventData::SubjectUpserted(SubjectUpserted {
                parent: parent.map(|p| subject(&p)),
                groups,
                disabled: false,
            })
        };
        for c in 0..spec.teams {
            let e = Envelope::new(
                up(Some(format!("customer:c{}", c % spec.customers)), vec![]),
                t0,
                None,
                Some(subject(&format!("team:t{c}"))),
            );
            self.emit(e).await?;
        }
        for u in 0..spec.users {
            let groups = vec![["free", "pro", "team"][u % 3].to_owned()];
            let e = Envelope::new(
                up(Some(format!("team:t{}", u % spec.teams)), groups),
                t0,
                None,
                Some(subject(&format!("user:u{u}"))),
            );
            self.emit(e).await?;
        }
        for k in 0..spec.keys {
            let e = Envelope::new(
                up(Some(format!("user:u{}", k % spec.users)), vec![]),
                t0,
                None,
                Some(subject(&format!("key:k{k}"))),
            );
            self.emit(e).await?;
        }
        for (name, models) in [
            ("gpt", ["gpt-4o", "gpt-4o-mini"]),
            ("claude", ["claude-3", "claude-3-haiku"]),
        ] {
            let data = ModelGroupChanged {
                name: name.into(),
                models: models.iter().map(|m| m.to_string()).collect(),
            };
            self.emit(Envelope::new(
                EventData::ModelGroupUpserted(data),
                t0,
                None,
                None,
            ))
            .await?;
        }
        for (id, s, mg, metric, limit, window) in policies(t0, requests_limit(spec)) {
            let data = PolicyUpserted {
                policy_id: id.into(),
                subject: subject(s),
                model_group: mg.map(Into::into),
                metric,
                limit,
                window,
                boundary: Boundary::Strict,
                on_exhausted: OnExhausted::Reject,
                enabled: true,
            };
            self.emit(Envelope::new(
                EventData::PolicyUpserted(data),
                t0,
                None,
                Some(subject(s)),
            ))
            .await?;
        }
        for c in 0..spec.customers {
            let data = CreditsAdjusted {
                id: None,
                op: CreditOp::Set,
                amount: 1_000_000_000,
                refill: Some(Refill {
                    amount: 1_000_000_000,
                    interval: RefillInterval::Monthly,
                    day: Some(1),
                }),
            };
            self.emit(Envelope::new(
                EventData::CreditsAdjusted(data),
                t0,
                None,
                Some(subject(&format!("customer:c{c}"))),
            ))
            .await?;
        }
        Ok(())
    }
}

/// The per-capita request limit of a 5-hour periodic window: three times an average user's
/// requests in one, so the hot keys' users are refused now and then and the rest never.
fn requests_limit(spec: &HistorySpec) -> i64 {
    let requests = spec.events as f64 / 2.2;
    let windows = (spec.days * 24 / 5).max(1) as f64;
    ((requests / spec.users.max(1) as f64 / windows) * 3.0)
        .ceil()
        .max(2.0) as i64
}

/// A policy as the generator writes it.
type PolicyRow = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Metric,
    i64,
    Window,
);

/// Policies on every chain: per-capita group templates (rolling 5 h tokens, a calendar day of cost
/// in Shanghai, periodic 5 h requests, lifetime cost), a model-group template (billing
/// isolation), team months. Limits are high enough that most traffic passes and some is refused.
fn policies(t0: DateTime<Utc>, requests_limit: i64) -> Vec<PolicyRow> {
    let day = Window::Calendar {
        unit: CalendarUnit::Day,
        timezone: Some("Asia/Shanghai".into()),
        reset_at: Some("04:00".into()),
        week_start: None,
    };
    let month = Window::Calendar {
        unit: CalendarUnit::Month,
        timezone: Some("UTC".into()),
        reset_at: None,
        week_start: None,
    };
    let rolling = Window::Rolling {
        duration: "5h".into(),
    };
    let periodic = Window::Periodic {
        every: "5h".into(),
        anchor: Some(window::minute_floor(t0)),
    };
    vec![
        (
            "free-rolling",
            "group:free",
            None,
            Metric::Tokens,
            200_000,
            rolling.clone(),
        ),
        (
            "pro-rolling",
            "group:pro",
            None,
            Metric::Tokens,
            2_000_000,
            rolling.clone(),
        ),
        (
            "team-rolling",
            "group:team",
            None,
            Metric::Tokens,
            5_000_000,
            rolling,
        ),
        (
            "free-daily",
            "group:free",
            None,
            Metric::Cost,
            2_000_000,
            day.clone(),
        ),
        (
            "pro-daily",
            "group:pro",
            None,
            Metric::Cost,
            50_000_000,
            day,
        ),
        (
            "pro-claude",
            "group:pro",
            Some("claude"),
            Metric::Cost,
            20_000_000,
            month.clone(),
        ),
        (
            "teams-monthly",
            "group:team",
            None,
            Metric::Cost,
            500_000_000,
            month,
        ),
        (
            "free-requests",
            "group:free",
            None,
            Metric::Requests,
            requests_limit,
            periodic.clone(),
        ),
        (
            "pro-requests",
            "group:pro",
            None,
            Metric::Requests,
            requests_limit * 2,
            periodic,
        ),
        (
            "free-lifetime",
            "group:free",
            None,
            Metric::Cost,
            5_000_000_000,
            Window::Lifetime {},
        ),
    ]
}

const MODELS: [&str; 5] = [
    "gpt-4o",
    "gpt-4o-mini",
    "claude-3",
    "claude-3-haiku",
    "llama-3",
];

/// Write `spec`'s history to the stream behind `publisher`, calling `progress` every round.
pub async fn write(
    publisher: &Publisher,
    spec: &HistorySpec,
    progress: impl FnMut(u64),
) -> anyhow::Result<HistoryStats> {
    Ok(generate(Some(publisher), spec, progress).await?.1)
}

/// Generate `spec`'s history without publishing it: the quota state it folds to (as the
/// generator keeps it: never compacted) and what it would have written. For measuring the
/// state's size over a history (`examples/state_memory.rs`).
pub async fn fold(
    spec: &HistorySpec,
    progress: impl FnMut(u64),
) -> anyhow::Result<(QuotaState, HistoryStats)> {
    generate(None, spec, progress).await
}

/// `env` as the API would have written it at its event time: its id (a UUID v7) stamped with
/// that time, and an admission's `admission_id` with it. The API stamps ids with its own clock
/// and takes events at most `--max-backfill` before it, so a fold's stream clock (the newest id
/// time) follows the history; ids stamped at generation time would make the whole history look
/// backfilled by up to `days`, which no deployment can write.
fn stamped(mut env: Envelope) -> Envelope {
    let t = env.occurred_at;
    let secs = u64::try_from(t.timestamp()).unwrap_or(0);
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, t.timestamp_subsec_nanos());
    env.id = uuid::Uuid::new_v7(ts);
    if let EventData::AdmissionDecided(a) = &mut env.data {
        a.admission_id = env.id;
    }
    env
}

async fn generate(
    publisher: Option<&Publisher>,
    spec: &HistorySpec,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<(QuotaState, HistoryStats)> {
    let now = Utc::now();
    let t0 = now - Duration::days(spec.days);
    let mut w = Writer {
        publisher,
        seed: spec.seed,
        q: QuotaState::default(),
        pending: Vec::new(),
        stats: HistoryStats::default(),
    };
    w.config(spec, t0).await?;
    let mut rng = Rng(spec.seed.max(1));
    let mut hits = vec![0u32; spec.keys];
    let span_ms = (now - t0).num_milliseconds().max(1) as u64;
    let mut n = 0u64;
    while w.stats.events < spec.events {
        n += 1;
        // Requests in time order, spread evenly over the span, the newest a few minutes old.
        let at = t0
            + Duration::milliseconds(
                (span_ms.saturating_mul(n) / (spec.events / 2 + 1))
                    .min(span_ms.saturating_sub(300_000)) as i64,
            );
        let k = rng.skewed(spec.keys as u64) as usize;
        hits[k] += 1;
        request(&mut w, &mut rng, n, k, at).await?;
        if n.is_multiple_of(PUBLISH_ROUND as u64) {
            progress(w.stats.events);
        }
    }
    w.flush().await?;
    progress(w.stats.events);
    let mut order: Vec<usize> = (0..spec.keys).collect();
    order.sort_by_key(|k| std::cmp::Reverse(hits[*k]));
    w.stats.hot_keys = order
        .iter()
        .take(200)
        .map(|k| format!("key:k{k}"))
        .collect();
    Ok((w.q, w.stats))
}

async fn request(
    w: &mut Writer<'_>,
    rng: &mut Rng,
    n: u64,
    key: usize,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let leaf = subject(&format!("key:k{key}"));
    let model = MODELS[rng.below(MODELS.len() as u64) as usize];
    let rid = format!("h{}-{n}", w.seed);
    let (input, output) = (100 + rng.below(4000) as i64, 20 + rng.below(800) as i64);
    let usage = Usage {
        requests: 1,
        input_tokens: input,
        output_tokens: output,
        cost: (input + 3 * output) * 2,
        credits: 1,
    };
    if rng.below(20) == 0 {
        return direct(w, &rid, &leaf, model, usage, at).await;
    }
    let estimate = Usage {
        requests: 1,
        input_tokens: input,
        output_tokens: 1000,
        cost: (input + 3000) * 2,
        credits: 1,
    };
    let d = w.q.decide(&AdmitRequest {
        leaf: &leaf,
        model: Some(model),
        estimate,
        credits: Some(1),
        at,
    });
    let env = Envelope::with_id(at, Some(rid.clone()), Some(leaf.clone()), |id| {
        EventData::AdmissionDecided(AdmissionDecided {
            admission_id: id,
            admitted: d.admitted,
            reason: d.reason,
            retry_after_seconds: d.retry_after_seconds,
            model: Some(model.into()),
            model_group: d.model_group.clone(),
            chain: d.chain.clone(),
            estimate: d.estimate,
            counted_in_key_global: d.counted_in_key_global,
            counted_in_user_global: d.counted_in_user_global,
            checks: d.checks.clone(),
            received_at: at,
        })
    });
    w.stats.admissions += 1;
    let admission_id = w.emit(env).await?;
    if !d.admitted {
        w.stats.refused += 1;
        return Ok(());
    }
    let settle = |sid: String, u: Usage, is_final: bool, seq: u32| UsageSettled {
        settlement_id: sid,
        usage: u,
        success: true,
        is_final,
        seq,
        matched_admission: true,
        admission_id: Some(admission_id),
        model: Some(model.into()),
        model_group: d.model_group.clone(),
        chain: d.chain.clone(),
        counted_in_key_global: d.counted_in_key_global,
        counted_in_user_global: d.counted_in_user_global,
        window_at: at,
    };
    match rng.below(20) {
        0 => {
            let data = EventData::ReservationReleased(ReservationEnded { admission_id });
            w.emit(Envelope::new(data, at, Some(rid), Some(leaf)))
                .await
                .map(drop)
        }
        1 | 2 => {
            // Streaming: three chunks of output tokens, the request counted by the last.
            for seq in 0..3u32 {
                let chunk = Usage {
                    requests: i64::from(seq == 2),
                    output_tokens: output / 3,
                    cost: output * 2,
                    input_tokens: if seq == 0 { input } else { 0 },
                    credits: i64::from(seq == 2),
                };
                let data = settle(format!("{rid}:{seq}"), chunk, seq == 2, seq);
                w.stats.settlements += 1;
                let t = at + Duration::seconds(i64::from(seq));
                w.emit(Envelope::new(
                    EventData::UsageSettled(data),
                    t,
                    Some(rid.clone()),
                    Some(leaf.clone()),
                ))
                .await?;
            }
            Ok(())
        }
        _ => {
            w.stats.settlements += 1;
            let data = settle(format!("{rid}:0"), usage, true, 0);
            w.emit(Envelope::new(
                EventData::UsageSettled(data),
                at + Duration::seconds(2),
                Some(rid),
                Some(leaf),
            ))
            .await
            .map(drop)
        }
    }
}

async fn direct(
    w: &mut Writer<'_>,
    rid: &str,
    leaf: &Subject,
    model: &str,
    usage: Usage,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let r = w.q.resolve(leaf, Some(model));
    let data = UsageSettled {
        settlement_id: format!("{rid}:0"),
        usage,
        success: true,
        is_final: true,
        seq: 0,
        matched_admission: false,
        admission_id: None,
        model: Some(model.into()),
        model_group: r.model_group,
        chain: r.chain,
        counted_in_key_global: r.counted_in_key_global,
        counted_in_user_global: r.counted_in_user_global,
        window_at: at,
    };
    w.stats.settlements += 1;
    w.emit(Envelope::new(
        EventData::UsageSettled(data),
        at,
        Some(rid.to_owned()),
        Some(leaf.clone()),
    ))
    .await
    .map(drop)
}

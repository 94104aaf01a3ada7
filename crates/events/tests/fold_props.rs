//! Properties of the quota fold under arbitrary sequences of valid events with extreme amounts
//! (SPEC v2 §4, §10.10): folding never panics, no total or check goes negative, and a pool at its
//! limit refuses. The events are built the way the API builds them (decide, then record the
//! decision), so the fold sees what production sees; proptest shrinks a failure to a short list
//! of readable operations.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use tally_events::quota::{AdmitRequest, QuotaState};
use tally_events::*;

const LEAVES: [&str; 3] = ["key:k0", "key:k1", "user:u1"];
const SUBJECTS: [&str; 6] = [
    "key:k0",
    "key:k1",
    "user:u0",
    "user:u1",
    "team:t0",
    "customer:c0",
];
const POLICY_SUBJECTS: [&str; 5] = ["key:k0", "user:u0", "team:t0", "group:g0", "customer:c0"];
const MODELS: [&str; 3] = ["m0", "m1", "m2"];

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
}

fn subj(s: &str) -> Subject {
    Subject::parse(s).unwrap()
}

/// One operation, as an operator or a gateway would send it.
#[derive(Clone, Debug)]
enum Op {
    Parent {
        child: usize,
        parent: Option<usize>,
        group: bool,
    },
    Policy {
        id: u8,
        subject: usize,
        metric: usize,
        limit: i64,
        window: usize,
        mode: usize,
        mg: bool,
    },
    DeletePolicy {
        id: u8,
    },
    ModelGroup {
        models: usize,
    },
    Grant {
        id: u8,
        subject: usize,
        metric: usize,
        amount: i64,
    },
    Credits {
        subject: usize,
        op: usize,
        amount: i64,
    },
    Reset {
        id: u8,
        subject: usize,
    },
    Admit {
        leaf: usize,
        model: usize,
        estimate: [i64; 5],
    },
    Settle {
        request: usize,
        usage: [i64; 5],
        is_final: bool,
    },
    Direct {
        leaf: usize,
        usage: [i64; 5],
    },
    Release {
        request: usize,
    },
    Tick {
        minutes: u16,
    },
    /// `times` direct settlements of the per-request maximum on every metric: 9,224 of them pass
    /// `i64::MAX`, so sequences with a flood or two reach saturation.
    Flood {
        leaf: usize,
        times: u16,
    },
    /// A new decision for an earlier request's id (a gateway reusing ids, or a racing instance).
    Readmit {
        request: usize,
        estimate: [i64; 5],
    },
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(1),
        Just(MAX_AMOUNT),
        Just(MAX_AMOUNT - 1),
        0..1000i64,
        0..=MAX_AMOUNT,
    ]
}

fn amounts() -> impl Strategy<Value = [i64; 5]> {
    [amount(), amount(), amount(), amount(), amount()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            0..SUBJECTS.len(),
            proptest::option::of(0..SUBJECTS.len()),
            any::<bool>()
        )
            .prop_map(|(child, parent, group)| Op::Parent {
                child,
                parent,
                group
            }),
        8 => (
            0..6u8,
            0..POLICY_SUBJECTS.len(),
            0..6usize,
            1..=MAX_AMOUNT,
            0..4usize,
            0..4usize,
            any::<bool>()
        )
            .prop_map(
                |(id, subject, metric, limit, window, mode, mg)| Op::Policy {
                    id,
                    subject,
                    metric,
                    limit,
                    window,
                    mode,
                    mg
                }
            ),
        8 => (1..1000i64, 0..POLICY_SUBJECTS.len(), 0..6usize, 0..6u8).prop_map(
            |(limit, subject, metric, id)| Op::Policy {
                id,
                subject,
                metric,
                limit,
                window: 0,
                mode: 0,
                mg: false
            }
        ),
        8 => (0..6u8).prop_map(|id| Op::DeletePolicy { id }),
        8 => (0..3usize).prop_map(|models| Op::ModelGroup { models }),
        8 => (0..4u8, 0..POLICY_SUBJECTS.len(), 0..6usize, 1..=MAX_AMOUNT).prop_map(
            |(id, subject, metric, amount)| Op::Grant {
                id,
                subject,
                metric,
                amount
            }
        ),
        8 => (0..SUBJECTS.len(), 0..4usize, amount()).prop_map(|(subject, op, amount)| Op::Credits {
            subject,
            op,
            amount
        }),
        8 => (0..6u8, 0..SUBJECTS.len()).prop_map(|(id, subject)| Op::Reset { id, subject }),
        8 => (0..LEAVES.len(), 0..MODELS.len(), amounts()).prop_map(|(leaf, model, estimate)| {
            Op::Admit {
                leaf,
                model,
                estimate,
            }
        }),
        8 => (0..64usize, amounts(), any::<bool>()).prop_map(|(request, usage, is_final)| Op::Settle {
            request,
            usage,
            is_final
        }),
        8 => (0..LEAVES.len(), amounts()).prop_map(|(leaf, usage)| Op::Direct { leaf, usage }),
        8 => (0..64usize).prop_map(|request| Op::Release { request }),
        8 => (0..3000u16).prop_map(|minutes| Op::Tick { minutes }),
        1 => (0..LEAVES.len(), 1000..10_000u16).prop_map(|(leaf, times)| Op::Flood { leaf, times }),
        4 => (0..64usize, amounts()).prop_map(|(request, estimate)| Op::Readmit { request, estimate }),
    ]
}

const METRICS: [Metric; 6] = [
    Metric::Requests,
    Metric::InputTokens,
    Metric::OutputTokens,
    Metric::Tokens,
    Metric::Cost,
    Metric::Credits,
];

fn window(i: usize) -> Window {
    match i {
        0 => Window::Rolling {
            duration: "5h".into(),
        },
        1 => Window::Calendar {
            unit: CalendarUnit::Day,
            timezone: Some("Asia/Kolkata".into()),
            reset_at: Some("04:30".into()),
            week_start: None,
        },
        2 => Window::Periodic {
            every: "90m".into(),
            anchor: Some(base() + Duration::minutes(17)),
        },
        _ => Window::Lifetime {},
    }
}

fn usage(amounts: [i64; 5]) -> Usage {
    Usage::from_amounts(amounts)
}

/// The driver: the state, the clock, and the requests admitted so far.
struct World {
    q: QuotaState,
    /// The same fold, pruned after every event: forgetting must never change a decision.
    pruned: QuotaState,
    now: DateTime<Utc>,
    admitted: Vec<(String, AdmissionDecided, DateTime<Utc>)>,
    n: u64,
}

impl World {
    fn record(&mut self, data: EventData, rid: Option<String>, subject: Option<Subject>) {
        let env = Envelope::new(data, self.now, rid, subject);
        env.validate().expect("the driver builds valid events");
        self.apply(&env);
    }

    /// Fold into the state and into its twin that forgets as early as it may.
    fn apply(&mut self, env: &Envelope) {
        self.q.apply(env);
        self.pruned.apply(env);
        self.pruned.prune();
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Parent {
                child,
                parent,
                group,
            } => {
                let groups = if *group {
                    vec!["g0".to_owned()]
                } else {
                    vec![]
                };
                let parent = parent
                    .map(|p| subj(SUBJECTS[p]))
                    .filter(|p| p.as_str() != SUBJECTS[*child]);
                let data = SubjectUpserted {
                    parent,
                    groups,
                    disabled: false,
                };
                self.record(
                    EventData::SubjectUpserted(data),
                    None,
                    Some(subj(SUBJECTS[*child])),
                );
            }
            Op::Policy {
                id,
                subject,
                metric,
                limit,
                window: w,
                mode,
                mg,
            } => {
                let data = PolicyUpserted {
                    policy_id: format!("p{id}"),
                    subject: subj(POLICY_SUBJECTS[*subject]),
                    model_group: mg.then(|| "g".to_owned()),
                    metric: METRICS[*metric],
                    limit: *limit,
                    window: window(*w),
                    boundary: if mode % 2 == 0 {
                        Boundary::Strict
                    } else {
                        Boundary::Graceful
                    },
                    on_exhausted: [
                        OnExhausted::Reject,
                        OnExhausted::Disable,
                        OnExhausted::Alert,
                        OnExhausted::Reject,
                    ][*mode],
                    enabled: true,
                };
                self.record(EventData::PolicyUpserted(data), None, None);
            }
            Op::DeletePolicy { id } => self.record(
                EventData::PolicyDeleted(IdOnly {
                    id: format!("p{id}"),
                }),
                None,
                None,
            ),
            Op::ModelGroup { models } => {
                let data = ModelGroupChanged {
                    name: "g".into(),
                    models: MODELS[..=*models].iter().map(|m| m.to_string()).collect(),
                };
                self.record(EventData::ModelGroupUpserted(data), None, None);
            }
            Op::Grant {
                id,
                subject,
                metric,
                amount,
            } => {
                let data = GrantIssued {
                    grant_id: format!("g{id}"),
                    subject: subj(POLICY_SUBJECTS[*subject]),
                    model_group: None,
                    metric: METRICS[*metric],
                    amount: *amount,
                    window_kind: None,
                    starts_at: self.now,
                    expires_at: self.now + Duration::hours(3),
                };
                self.record(EventData::GrantIssued(data), None, None);
            }
            Op::Credits {
                subject,
                op,
                amount,
            } => {
                let op = [
                    CreditOp::Set,
                    CreditOp::Increment,
                    CreditOp::Decrement,
                    CreditOp::Clear,
                ][*op];
                let refill = (op == CreditOp::Set).then_some(Refill {
                    amount: 5,
                    interval: RefillInterval::Daily,
                    day: None,
                });
                let data = CreditsAdjusted {
                    id: None,
                    op,
                    amount: *amount,
                    refill,
                };
                self.record(
                    EventData::CreditsAdjusted(data),
                    None,
                    Some(subj(SUBJECTS[*subject])),
                );
            }
            Op::Reset { id, subject } => {
                let data = WindowReset {
                    policy_id: format!("p{id}"),
                    subject: subj(SUBJECTS[*subject]),
                    at: self.now,
                };
                self.record(EventData::WindowReset(data), None, None);
            }
            Op::Admit {
                leaf,
                model,
                estimate,
            } => self.admit(*leaf, *model, usage(*estimate)),
            Op::Settle {
                request,
                usage: u,
                is_final,
            } => self.settle(*request, usage(*u), *is_final),
            Op::Direct { leaf, usage: u } => self.direct(*leaf, usage(*u)),
            Op::Release { request } => {
                if let Some((rid, a, _)) = self.admitted.get(*request).cloned() {
                    let data = ReservationEnded {
                        admission_id: a.admission_id,
                    };
                    self.record(
                        EventData::ReservationReleased(data),
                        Some(rid),
                        a.chain.first().cloned(),
                    );
                }
            }
            Op::Tick { minutes } => self.now += Duration::minutes(i64::from(*minutes)),
            Op::Readmit { request, estimate } => {
                if let Some((rid, a, _)) = self.admitted.get(*request).cloned() {
                    let leaf = LEAVES
                        .iter()
                        .position(|l| Some(*l) == a.chain.first().map(|s| s.as_str()));
                    self.admit_as(Some(rid), leaf.unwrap_or(0), 0, usage(*estimate));
                }
            }
            Op::Flood { leaf, times } => {
                for _ in 0..*times {
                    self.direct(*leaf, usage([MAX_AMOUNT; 5]));
                }
            }
        }
    }

    fn admit(&mut self, leaf: usize, model: usize, estimate: Usage) {
        self.admit_as(None, leaf, model, estimate)
    }

    fn admit_as(&mut self, rid: Option<String>, leaf: usize, model: usize, estimate: Usage) {
        let leaf = subj(LEAVES[leaf]);
        let credits = (estimate.credits > 0).then_some(estimate.credits);
        let req = AdmitRequest {
            leaf: &leaf,
            model: Some(MODELS[model]),
            estimate,
            credits,
            at: self.now,
        };
        let d = self.q.decide(&req);
        check_decision(&d);
        self.n += 1;
        let rid = rid.unwrap_or_else(|| format!("r{}", self.n));
        let env = Envelope::with_id(self.now, Some(rid.clone()), Some(leaf.clone()), |id| {
            EventData::AdmissionDecided(AdmissionDecided {
                admission_id: id,
                admitted: d.admitted,
                reason: d.reason,
                retry_after_seconds: d.retry_after_seconds,
                model: Some(MODELS[model].into()),
                model_group: d.model_group.clone(),
                chain: d.chain.clone(),
                estimate: d.estimate,
                counted_in_key_global: d.counted_in_key_global,
                counted_in_user_global: d.counted_in_user_global,
                checks: d.checks.clone(),
                received_at: self.now,
            })
        });
        env.validate().expect("admission events are valid");
        self.apply(&env);
        if let EventData::AdmissionDecided(a) = env.data {
            self.admitted.push((rid, a, self.now));
        }
    }

    fn settle(&mut self, request: usize, u: Usage, is_final: bool) {
        let Some((rid, a, at)) = self.admitted.get(request).cloned() else {
            return;
        };
        self.n += 1;
        let data = UsageSettled {
            settlement_id: format!("s{}", self.n),
            usage: u,
            success: true,
            is_final,
            seq: 0,
            matched_admission: true,
            admission_id: Some(a.admission_id),
            model: a.model.clone(),
            model_group: a.model_group.clone(),
            chain: a.chain.clone(),
            counted_in_key_global: a.counted_in_key_global,
            counted_in_user_global: a.counted_in_user_global,
            window_at: at,
        };
        self.record(
            EventData::UsageSettled(data),
            Some(rid),
            a.chain.first().cloned(),
        );
    }

    fn direct(&mut self, leaf: usize, u: Usage) {
        let leaf = subj(LEAVES[leaf]);
        let r = self.q.resolve(&leaf, None);
        self.n += 1;
        let data = UsageSettled {
            settlement_id: "direct".into(),
            usage: u,
            success: true,
            is_final: true,
            seq: 0,
            matched_admission: false,
            admission_id: None,
            model: None,
            model_group: r.model_group,
            chain: r.chain,
            counted_in_key_global: r.counted_in_key_global,
            counted_in_user_global: r.counted_in_user_global,
            window_at: self.now,
        };
        self.record(
            EventData::UsageSettled(data),
            Some(format!("d{}", self.n)),
            Some(leaf),
        );
    }
}

/// Nothing negative, `remaining` is what SPEC v2 §4 says, and a failing check refuses.
fn check_decision(d: &tally_events::quota::Decision) {
    for c in &d.checks {
        assert!(
            c.used >= 0 && c.reserved >= 0 && c.remaining >= 0,
            "negative: {c:?}"
        );
        assert!(c.limit >= 0, "limit: {c:?}");
        assert_eq!(
            c.remaining,
            c.limit
                .saturating_sub(c.used.saturating_add(c.reserved))
                .max(0)
        );
    }
    if d.checks.iter().any(|c| c.outcome == Outcome::Fail) {
        assert!(!d.admitted, "a failing check refuses: {d:?}");
    }
}

fn world() -> World {
    World {
        q: QuotaState::default(),
        pruned: QuotaState::default(),
        now: base(),
        admitted: Vec::new(),
        n: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_fold_never_panics_nor_goes_negative(ops in proptest::collection::vec(op(), 1..80)) {
        let mut w = world();
        for op in &ops {
            w.run(op);
            prop_assert_eq!(w.q.reserved_total(), w.pruned.reserved_total(), "pruning changed reservations after {:?}", op);
        }
        prop_assert!(w.q.reserved_total() >= 0);
        prop_assert_eq!(w.q.reserved_total(), w.pruned.reserved_total(), "pruning changed reservations");
        // Every pool every leaf would check is non-negative, and saturated or full pools refuse.
        for leaf in LEAVES {
            let leaf = subj(leaf);
            for model in MODELS {
                let one = Usage { requests: 1, input_tokens: 1, output_tokens: 1, cost: 1, credits: 1 };
                let ask = AdmitRequest { leaf: &leaf, model: Some(model), estimate: one, credits: Some(1), at: w.now };
                let d = w.q.decide(&ask);
                check_decision(&d);
                prop_assert_eq!(&d.checks, &w.pruned.decide(&ask).checks, "pruning changed a decision");
                // The projection's cheap totals are the decision's numbers, pool for pool.
                let totals: Vec<_> = w.q.pool_totals(&leaf, Some(model), w.now).into_iter()
                    .map(|t| (t.policy.data.policy_id.clone(), t.pool, t.window, t.limit, t.used)).collect();
                let checks: Vec<_> = d.checks.iter().filter(|c| c.policy_id != "credits")
                    .map(|c| (c.policy_id.clone(), c.subject.clone(), c.window, c.limit, c.used)).collect();
                prop_assert_eq!(totals, checks, "pool totals differ from the decision");
                for c in d.checks.iter().filter(|c| c.policy_id != "credits") {
                    let p = w.q.config.policy(&c.policy_id).expect("a check names a live policy");
                    let full = c.used.saturating_add(c.reserved) >= c.limit;
                    if full && p.data.on_exhausted != OnExhausted::Alert {
                        prop_assert_eq!(c.outcome, Outcome::Fail, "a full pool refuses: {:?}", c);
                        prop_assert!(!d.admitted);
                    }
                }
            }
        }
    }
}

/// `PROPTEST_CASES` overrides (CI runs more than a developer's default).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The case the issue reports: 9,224 direct settlements of `cost: 10^15` pass `i64::MAX`. The
/// fold saturates, the pool reads exhausted, and a tokens limit is not bypassed by a wrapped sum.
#[test]
fn saturated_totals_refuse_and_never_wrap() {
    let mut w = world();
    w.run(&Op::Policy {
        id: 0,
        subject: 0,
        metric: 4,
        limit: MAX_AMOUNT,
        window: 3,
        mode: 0,
        mg: false,
    });
    w.run(&Op::Policy {
        id: 1,
        subject: 0,
        metric: 3,
        limit: MAX_AMOUNT,
        window: 3,
        mode: 0,
        mg: false,
    });
    for _ in 0..9_300 {
        w.direct(0, usage([MAX_AMOUNT; 5]));
    }
    let leaf = subj("key:k0");
    let d = w.q.decide(&AdmitRequest {
        leaf: &leaf,
        model: None,
        estimate: usage([0, 1, 0, 1, 0]),
        credits: None,
        at: w.now,
    });
    assert!(!d.admitted, "{d:?}");
    for c in &d.checks {
        assert_eq!(c.used, i64::MAX, "saturated, not wrapped: {c:?}");
        assert_eq!(c.outcome, Outcome::Fail);
    }
    let other = subj("key:k1");
    let d = w.q.decide(&AdmitRequest {
        leaf: &other,
        model: None,
        estimate: usage([1, 1, 1, 1, 0]),
        credits: None,
        at: w.now,
    });
    assert!(d.admitted, "other subjects are untouched");
}

//! The admission decision (SPEC §4): resolve the chain and model group, decide the counted
//! flags, collect the checks (own and per-member group policies, max-merged by shape), and decide
//! each against its pool. Pure: the same state and request give the same decision, live or in a
//! replay.

use chrono::{DateTime, Utc};

use super::config::PolicyConf;
use super::state::{CREDITS_CHECK, QuotaState};
use crate::envelope::ThresholdCrossed;
use crate::model::{Boundary, Check, Metric, OnExhausted, Outcome, Reason, Subject, Usage, Window};

/// What is asked.
#[derive(Clone, Debug)]
pub struct AdmitRequest<'a> {
    /// Leaf subject.
    pub leaf: &'a Subject,
    /// Model named by the request.
    pub model: Option<&'a str>,
    /// Estimate; `credits` is filled in from `credits` below.
    pub estimate: Usage,
    /// Credits to reserve when a credit balance applies (SPEC: default 1).
    pub credits: Option<i64>,
    /// Event time.
    pub at: DateTime<Utc>,
}

/// What to do with a subject nobody configured (`--unknown-subjects`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownSubjects {
    /// No policies apply, so it is admitted (the default).
    #[default]
    Admit,
    /// Refused with `unknown_subject`.
    Reject,
}

/// The decision, with everything the admission event freezes.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Whether the request may go ahead.
    pub admitted: bool,
    /// Why not.
    pub reason: Option<Reason>,
    /// Seconds until a retry could pass, when known.
    pub retry_after_seconds: Option<i64>,
    /// The model's group.
    pub model_group: Option<String>,
    /// Leaf first.
    pub chain: Vec<Subject>,
    /// Frozen flags.
    pub counted_in_key_global: bool,
    /// Frozen flags.
    pub counted_in_user_global: bool,
    /// The estimate reserved (credits resolved).
    pub estimate: Usage,
    /// Every check, in chain order.
    pub checks: Vec<Check>,
    /// Alerts to publish (first crossing of an `alert` policy in this window).
    pub alerts: Vec<ThresholdCrossed>,
    /// Whether a chain subject is disabled.
    pub disabled: bool,
}

/// One policy applied to one pool.
struct Candidate<'a> {
    policy: &'a PolicyConf,
    pool: Subject,
}

fn group_subjects(state: &QuotaState, s: &Subject) -> Vec<Subject> {
    state
        .config
        .subject(s)
        .map(|c| {
            c.groups
                .iter()
                .filter_map(|g| Subject::parse(&format!("group:{g}")).ok())
                .collect()
        })
        .unwrap_or_default()
}

type Shape<'a> = (Metric, Option<&'a str>, &'a Window);

fn shape(p: &PolicyConf) -> Shape<'_> {
    (p.data.metric, p.data.model_group.as_deref(), &p.data.window)
}

/// The policies that apply to chain subject `s` for this request, max-merged by shape.
fn candidates_for<'a>(
    state: &'a QuotaState,
    s: &Subject,
    model_group: Option<&str>,
    skip_global_spend: bool,
) -> Vec<Candidate<'a>> {
    let applies = |p: &&PolicyConf| {
        let d = &p.data;
        d.enabled
            && (d.model_group.is_none() || d.model_group.as_deref() == model_group)
            && !(skip_global_spend && d.model_group.is_none() && d.metric.is_spend())
    };
    let own = state.config.policies_of(s).filter(applies);
    let groups = group_subjects(state, s);
    let via_groups = groups
        .iter()
        .flat_map(|g| state.config.policies_of(g).filter(applies));
    let mut merged: Vec<&PolicyConf> = Vec::new();
    for p in own.chain(via_groups) {
        match merged.iter_mut().find(|m| shape(m) == shape(p)) {
            Some(m) if p.data.limit > m.data.limit => *m = p,
            Some(_) => {}
            None => merged.push(p),
        }
    }
    merged
        .into_iter()
        .map(|policy| Candidate {
            policy,
            pool: s.clone(),
        })
        .collect()
}

/// Whether `s` is disabled at `t`: by an operator, or by an exhausted `disable` policy (own or
/// group, any model group) in its current window. Returns the time it recovers, if known.
fn disabled_until(
    state: &QuotaState,
    s: &Subject,
    t: DateTime<Utc>,
) -> Option<Option<DateTime<Utc>>> {
    if state.config.subject(s).is_some_and(|c| c.disabled) {
        return Some(None);
    }
    let groups = group_subjects(state, s);
    let policies = state
        .config
        .policies_of(s)
        .chain(groups.iter().flat_map(|g| state.config.policies_of(g)));
    for p in policies {
        if !p.data.enabled || p.data.on_exhausted != OnExhausted::Disable {
            continue;
        }
        let limit = p
            .data
            .limit
            .saturating_add(state.config.grant_total(p, s, t));
        if state.used(p, s, t) >= limit {
            return Some(recovery(state, p, s, t, limit, 0));
        }
    }
    None
}

/// When enough usage leaves the window for `used + reserved + need ≤ limit`: the window's end
/// for calendar and periodic windows, the minute enough old usage ages out for rolling ones.
fn recovery(
    state: &QuotaState,
    p: &PolicyConf,
    pool: &Subject,
    t: DateTime<Utc>,
    limit: i64,
    need: i64,
) -> Option<DateTime<Utc>> {
    match p.spec.kind() {
        "calendar" | "periodic" => p.spec.next_reset(t),
        "rolling" => {
            let b = p.spec.bounds(t)?;
            let length = b.end - b.start;
            let mut excess = state.used(p, pool, t) + state.reserved(p, pool, t) + need - limit;
            if need > limit {
                return None;
            }
            for (minute, amount) in state.minute_amounts(p, pool, b.start, b.end) {
                excess -= amount;
                if excess < 0 || (need == 0 && excess <= 0) {
                    return Some(minute + length);
                }
            }
            None
        }
        _ => None,
    }
}

fn seconds_until(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    let ms = (to - from).num_milliseconds().max(0);
    (ms + 999) / 1000
}

/// A request's chain, model group and counted flags (SPEC §4.1 and §4.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Leaf first.
    pub chain: Vec<Subject>,
    /// The model's group.
    pub model_group: Option<String>,
    /// Counted in the key axis' global spend policies.
    pub counted_in_key_global: bool,
    /// Counted in the user axis' global spend policies.
    pub counted_in_user_global: bool,
}

impl QuotaState {
    /// Resolve the chain, model group and counted flags of a request on `leaf` for `model`.
    pub fn resolve(&self, leaf: &Subject, model: Option<&str>) -> Resolved {
        let chain = self.config.chain(leaf);
        let model_group = model
            .and_then(|m| self.config.model_group_of(m))
            .map(str::to_owned);
        let key_axis = chain.first().filter(|s| s.kind() == "key");
        let user_axis = chain.iter().find(|s| s.kind() == "user");
        let isolated = |axis: Option<&Subject>| match (axis, &model_group) {
            (Some(a), Some(g)) => self.config.isolates(a, g),
            _ => false,
        };
        Resolved {
            counted_in_key_global: !isolated(key_axis),
            counted_in_user_global: !isolated(user_axis),
            chain,
            model_group,
        }
    }

    /// Decide an admission.
    pub fn decide(&self, req: &AdmitRequest<'_>) -> Decision {
        self.decide_with(req, UnknownSubjects::Admit)
    }

    /// Whether anyone configured `s`: an upserted subject, a policy on it, or a credit balance.
    pub fn is_known(&self, s: &Subject) -> bool {
        self.config.subject(s).is_some()
            || self.config.policies_of(s).next().is_some()
            || self.credits.contains_key(s)
    }

    /// [`Self::decide`], refusing a leaf nobody configured when `unknown` says so (SPEC §4.7):
    /// such a request is refused with `unknown_subject`, reserves nothing, and is still recorded.
    pub fn decide_with(&self, req: &AdmitRequest<'_>, unknown: UnknownSubjects) -> Decision {
        if unknown == UnknownSubjects::Reject && !self.is_known(req.leaf) {
            return Decision {
                admitted: false,
                reason: Some(Reason::UnknownSubject),
                retry_after_seconds: None,
                model_group: self.resolve(req.leaf, req.model).model_group,
                chain: vec![req.leaf.clone()],
                counted_in_key_global: true,
                counted_in_user_global: true,
                estimate: req.estimate,
                checks: Vec::new(),
                alerts: Vec::new(),
                disabled: false,
            };
        }
        self.decide_admitted(req)
    }

    fn decide_admitted(&self, req: &AdmitRequest<'_>) -> Decision {
        let r = self.resolve(req.leaf, req.model);
        let (chain, model_group) = (r.chain, r.model_group);
        let key_axis = chain.first().filter(|s| s.kind() == "key").cloned();
        let user_axis = chain.iter().find(|s| s.kind() == "user").cloned();
        let (key_iso, user_iso) = (!r.counted_in_key_global, !r.counted_in_user_global);
        let mut d = Decision {
            admitted: true,
            reason: None,
            retry_after_seconds: None,
            model_group: model_group.clone(),
            chain: chain.clone(),
            counted_in_key_global: !key_iso,
            counted_in_user_global: !user_iso,
            estimate: req.estimate,
            checks: Vec::new(),
            alerts: Vec::new(),
            disabled: false,
        };
        let mut seen: Vec<(String, Subject)> = Vec::new();
        for s in &chain {
            let skip = (key_iso && key_axis.as_ref() == Some(s))
                || (user_iso && user_axis.as_ref() == Some(s));
            for c in candidates_for(self, s, model_group.as_deref(), skip) {
                let id = (c.policy.data.policy_id.clone(), c.pool.clone());
                if seen.contains(&id) {
                    continue;
                }
                seen.push(id);
                self.decide_check(&c, req, &mut d);
            }
        }
        self.decide_credits(req, &mut d);
        self.decide_disabled(req, &mut d);
        d
    }

    fn decide_check(&self, c: &Candidate<'_>, req: &AdmitRequest<'_>, d: &mut Decision) {
        let p = &c.policy.data;
        let t = req.at;
        let limit = p
            .limit
            .saturating_add(self.config.grant_total(c.policy, &c.pool, t));
        let used = self.used(c.policy, &c.pool, t);
        let reserved = self.reserved(c.policy, &c.pool, t);
        let need = p.metric.of(&d.estimate);
        let after = used.saturating_add(reserved).saturating_add(need);
        let within = match p.boundary {
            Boundary::Strict => after <= limit,
            Boundary::Graceful => used + reserved < limit,
        };
        let window = c.policy.spec.bounds(t);
        let outcome = match (p.on_exhausted, within, after > limit) {
            (OnExhausted::Alert, _, true) => Outcome::SoftExceeded,
            (_, true, true) => Outcome::SoftExceeded,
            (_, true, false) | (OnExhausted::Alert, _, _) => Outcome::Pass,
            (_, false, _) => Outcome::Fail,
        };
        if p.on_exhausted == OnExhausted::Alert
            && after > limit
            && !self.alerted(&p.policy_id, &c.pool, window.map(|w| w.start))
        {
            d.alerts.push(ThresholdCrossed {
                policy_id: p.policy_id.clone(),
                subject: c.pool.clone(),
                window,
                limit,
                used: after,
            });
        }
        if outcome == Outcome::Fail {
            let retry =
                recovery(self, c.policy, &c.pool, t, limit, need).map(|r| seconds_until(t, r));
            self.fail(d, Reason::LimitExceeded, retry);
        }
        d.checks.push(Check {
            policy_id: p.policy_id.clone(),
            subject: c.pool.clone(),
            metric: p.metric,
            window,
            limit,
            used,
            reserved,
            remaining: (limit - used - reserved).max(0),
            outcome,
        });
    }

    /// Record a failing check: the first failure names the reason; the retry hint is the
    /// latest of all failing checks', and unknown if any of them cannot say.
    fn fail(&self, d: &mut Decision, reason: Reason, retry: Option<i64>) {
        let first = d.admitted;
        d.admitted = false;
        d.reason.get_or_insert(reason);
        d.retry_after_seconds = match (first, d.retry_after_seconds, retry) {
            (true, _, r) => r,
            (false, Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }

    fn decide_credits(&self, req: &AdmitRequest<'_>, d: &mut Decision) {
        let Some(pool) = self.credit_pool(&d.chain) else {
            d.estimate.credits = req.credits.unwrap_or(0);
            return;
        };
        let account = self.account(&pool).expect("credit pool has an account");
        let need = req.credits.unwrap_or(1);
        d.estimate.credits = need;
        let balance = account.balance_at(req.at);
        let remaining = balance - account.reserved;
        let pass = remaining >= need;
        if !pass {
            let retry = account
                .next_refill(req.at)
                .map(|r| seconds_until(req.at, r));
            self.fail(d, Reason::CreditsExhausted, retry);
        }
        d.checks.push(Check {
            policy_id: CREDITS_CHECK.into(),
            subject: pool,
            metric: Metric::Credits,
            window: None,
            limit: balance,
            used: 0,
            reserved: account.reserved,
            remaining: remaining.max(0),
            outcome: if pass { Outcome::Pass } else { Outcome::Fail },
        });
    }

    fn decide_disabled(&self, req: &AdmitRequest<'_>, d: &mut Decision) {
        let mut until: Option<Option<DateTime<Utc>>> = None;
        for s in &d.chain {
            if let Some(u) = disabled_until(self, s, req.at) {
                until = Some(match (until.flatten(), u) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (_, None) => None,
                    (None, b) if until.is_none() => b,
                    (a, _) => a,
                });
            }
        }
        if let Some(u) = until {
            d.disabled = true;
            d.admitted = false;
            d.reason = Some(Reason::SubjectDisabled);
            d.retry_after_seconds = u.map(|u| seconds_until(req.at, u));
        }
        if !d.admitted {
            d.alerts.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, EventData, SubjectUpserted};

    fn ask(leaf: &Subject) -> AdmitRequest<'_> {
        AdmitRequest {
            leaf,
            model: None,
            estimate: Usage {
                requests: 1,
                ..Usage::default()
            },
            credits: None,
            at: chrono::Utc::now(),
        }
    }

    #[test]
    fn unknown_subjects_are_refused_only_when_asked() {
        let mut q = QuotaState::default();
        let key = Subject::parse("key:k1").unwrap();
        let d = q.decide_with(&ask(&key), UnknownSubjects::Admit);
        assert!(d.admitted, "admitted by default: no policies apply");
        let d = q.decide_with(&ask(&key), UnknownSubjects::Reject);
        assert_eq!(
            (d.admitted, d.reason),
            (false, Some(Reason::UnknownSubject))
        );
        assert!(d.checks.is_empty());
        let upsert = Envelope::new(
            EventData::SubjectUpserted(SubjectUpserted {
                parent: None,
                groups: vec![],
                disabled: false,
            }),
            chrono::Utc::now(),
            None,
            Some(key.clone()),
        );
        q.apply(&upsert);
        assert!(q.is_known(&key));
        let d = q.decide_with(&ask(&key), UnknownSubjects::Reject);
        assert!(d.admitted, "configured: decided as usual");
        let other = Subject::parse("key:k2").unwrap();
        assert!(!q.is_known(&other));
    }
}

//! The admission decision (SPEC §4): resolve the chain and model group, decide the counted
//! flags, collect the checks (own and per-member group policies, max-merged by shape), and decide
//! each against its pool. Pure: the same state and request give the same decision, live or in a
//! replay.

use chrono::{DateTime, Utc};

use super::config::PolicyConf;
use super::state::{CREDITS_CHECK, QuotaState};
use crate::envelope::ThresholdCrossed;
use crate::model::{
    Boundary, Check, Metric, OnExhausted, Outcome, Reason, Subject, Usage, WindowBounds,
};
use crate::window::WindowSpec;

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

/// One pool a request is checked against, with its totals at the request's time: what the quota
/// projection writes per request. The same numbers as the decision's check for that pool, without
/// what only a decision needs (reservations, retry times, credits, alerts).
#[derive(Clone, Debug, PartialEq)]
pub struct PoolTotals<'a> {
    /// The policy (after max-merging by shape).
    pub policy: &'a PolicyConf,
    /// Pool subject.
    pub pool: Subject,
    /// The window containing the time; `None` for lifetime windows.
    pub window: Option<WindowBounds>,
    /// Limit including grants.
    pub limit: i64,
    /// Settled usage in the window.
    pub used: i64,
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
    /// Alerts to publish (an `alert` policy found exhausted in this window, not alerted yet).
    pub alerts: Vec<ThresholdCrossed>,
    /// Whether a chain subject is disabled.
    pub disabled: bool,
}

/// One policy applied to one pool.
struct Candidate<'a> {
    policy: &'a PolicyConf,
    pool: Subject,
}

fn same_shape(a: &PolicyConf, b: &PolicyConf) -> bool {
    let (a, b) = (&a.data, &b.data);
    a.metric == b.metric && a.model_group == b.model_group && a.window == b.window
}

/// The larger limit; ties go to the smaller policy id.
fn larger<'a>(a: &'a PolicyConf, b: &'a PolicyConf) -> &'a PolicyConf {
    match a.data.limit.cmp(&b.data.limit) {
        std::cmp::Ordering::Greater => a,
        std::cmp::Ordering::Less => b,
        std::cmp::Ordering::Equal if a.data.policy_id <= b.data.policy_id => a,
        std::cmp::Ordering::Equal => b,
    }
}

/// The policies that apply to chain subject `s` among those `applies` accepts, max-merged as
/// SPEC v2 §4 "Decision details" says: disabled policies are left out first; `alert` policies
/// never merge; S's own policies are each a check; the group templates of one shape merge into
/// their largest, which then competes with S's largest own policy of that shape (the larger limit
/// wins, a tie goes to S's own) or stands alone when S has none. A loser is not a check at all.
fn merged<'a>(
    state: &'a QuotaState,
    s: &Subject,
    applies: &dyn Fn(&PolicyConf) -> bool,
) -> Vec<&'a PolicyConf> {
    let cfg = &state.config;
    let ok = |p: &&PolicyConf| p.data.enabled && applies(p);
    let alert = |p: &&PolicyConf| p.data.on_exhausted == OnExhausted::Alert;
    let mut own: Vec<&PolicyConf> = cfg.policies_of(s).filter(ok).collect();
    let groups = cfg.group_subjects(s);
    let templates: Vec<&PolicyConf> = groups
        .iter()
        .flat_map(|g| cfg.policies_of(g).filter(ok))
        .collect();
    let mut alerts: Vec<&PolicyConf> = own
        .iter()
        .chain(&templates)
        .copied()
        .filter(alert)
        .collect();
    own.retain(|p| !alert(p));
    let mut best: Vec<&PolicyConf> = Vec::new();
    for t in templates.into_iter().filter(|p| !alert(p)) {
        match best.iter_mut().find(|b| same_shape(b, t)) {
            Some(b) => *b = larger(b, t),
            None => best.push(t),
        }
    }
    for t in best {
        let rival = (0..own.len())
            .filter(|&i| same_shape(own[i], t))
            .reduce(|a, b| {
                if std::ptr::eq(larger(own[a], own[b]), own[a]) {
                    a
                } else {
                    b
                }
            });
        match rival {
            Some(i) if t.data.limit > own[i].data.limit => own[i] = t,
            Some(_) => {}
            None => own.push(t),
        }
    }
    own.append(&mut alerts);
    own
}

/// The checks of chain subject `s` for this request (model group and billing isolation).
fn candidates_for<'a>(
    state: &'a QuotaState,
    s: &Subject,
    model_group: Option<&str>,
    skip_global_spend: bool,
) -> Vec<Candidate<'a>> {
    let applies = |p: &PolicyConf| {
        let d = &p.data;
        (d.model_group.is_none() || d.model_group.as_deref() == model_group)
            && !(skip_global_spend && d.model_group.is_none() && d.metric.is_spend())
    };
    merged(state, s, &applies)
        .into_iter()
        .map(|policy| Candidate {
            policy,
            pool: s.clone(),
        })
        .collect()
}

/// Whether `s` is disabled at `t`: by an operator, or by an exhausted `disable` policy (own or
/// group, any model group) that won its merge. Returns the time it recovers, if known.
fn disabled_until(
    state: &QuotaState,
    s: &Subject,
    t: DateTime<Utc>,
) -> Option<Option<DateTime<Utc>>> {
    if state.config.subject(s).is_some_and(|c| c.disabled) {
        return Some(None);
    }
    let all = |_: &PolicyConf| true;
    merged(state, s, &all)
        .into_iter()
        .filter(|p| p.data.on_exhausted == OnExhausted::Disable)
        .find_map(|p| {
            let limit = state.limit_of(p, s, t);
            (state.used(p, s, t) >= limit)
                .then(|| recovery(state, p, s, t, limit.saturating_sub(1), false))
        })
}

/// The earliest time, with no new usage, at which the pool's `used` (plus its reservations then,
/// when `with_reserved`) is at most `slack`: the window's end for calendar and periodic windows,
/// the minute enough old usage ages out for rolling ones, never for lifetime windows.
fn recovery(
    state: &QuotaState,
    p: &PolicyConf,
    pool: &Subject,
    t: DateTime<Utc>,
    slack: i64,
    with_reserved: bool,
) -> Option<DateTime<Utc>> {
    let reserved_at = |at| {
        if with_reserved {
            state.reserved(p, pool, at)
        } else {
            0
        }
    };
    match p.spec {
        WindowSpec::Calendar { .. } | WindowSpec::Periodic { .. } => {
            let end = p.spec.next_reset(t)?;
            let held = state.used(p, pool, end).saturating_add(reserved_at(end));
            (held <= slack).then_some(end)
        }
        WindowSpec::Rolling { .. } => {
            let allowed = slack.saturating_sub(reserved_at(t));
            if allowed < 0 {
                return None;
            }
            let b = p.spec.bounds(t)?;
            let length = b.end - b.start;
            let mut used = state.used(p, pool, t);
            for (minute, amount) in state.minute_amounts(p, pool, b.start, b.end) {
                used = used.saturating_sub(amount);
                if used <= allowed {
                    return minute.checked_add_signed(length);
                }
            }
            None
        }
        WindowSpec::Lifetime => None,
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

    /// A policy's limit for `pool` at `t`: its own plus the grants active then.
    pub fn limit_of(&self, p: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        p.data
            .limit
            .saturating_add(self.config.grant_total(p, pool, t))
    }

    /// Decide an admission.
    pub fn decide(&self, req: &AdmitRequest<'_>) -> Decision {
        self.decide_with(req, UnknownSubjects::Admit)
    }

    /// Every pool an admission of `leaf` and `model` at `t` would check (credits aside), in
    /// [`Self::decide`]'s order, with its limit, used and window: a decision's checks at a
    /// fraction of the cost (a replay computes these after every request it folds).
    pub fn pool_totals(
        &self,
        leaf: &Subject,
        model: Option<&str>,
        t: DateTime<Utc>,
    ) -> Vec<PoolTotals<'_>> {
        let r = self.resolve(leaf, model);
        let candidates = self.candidates(&r);
        let mut out = Vec::with_capacity(candidates.len());
        for c in candidates {
            let window = c.policy.spec.bounds(t);
            out.push(PoolTotals {
                window,
                limit: self.limit_of(c.policy, &c.pool, t),
                used: self.used_in(c.policy, &c.pool, window),
                policy: c.policy,
                pool: c.pool,
            });
        }
        out
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

    /// Every check of a request of `r` (chain, model group, flags), in chain order, each pool
    /// once whatever the path to it.
    fn candidates<'a>(&'a self, r: &Resolved) -> Vec<Candidate<'a>> {
        let key_axis = r.chain.first().filter(|s| s.kind() == "key");
        let user_axis = r.chain.iter().find(|s| s.kind() == "user");
        let mut seen: Vec<(&str, &Subject)> = Vec::new();
        let mut out = Vec::new();
        for s in &r.chain {
            let skip = (!r.counted_in_key_global && key_axis == Some(s))
                || (!r.counted_in_user_global && user_axis == Some(s));
            for c in candidates_for(self, s, r.model_group.as_deref(), skip) {
                let id = (c.policy.data.policy_id.as_str(), s);
                if !seen.contains(&id) {
                    seen.push(id);
                    out.push(c);
                }
            }
        }
        out
    }

    fn decide_admitted(&self, req: &AdmitRequest<'_>) -> Decision {
        let r = self.resolve(req.leaf, req.model);
        let candidates = self.candidates(&r);
        let mut d = Decision {
            admitted: true,
            reason: None,
            retry_after_seconds: None,
            model_group: r.model_group.clone(),
            chain: r.chain.clone(),
            counted_in_key_global: r.counted_in_key_global,
            counted_in_user_global: r.counted_in_user_global,
            estimate: req.estimate,
            checks: Vec::with_capacity(candidates.len() + 1),
            alerts: Vec::new(),
            disabled: false,
        };
        for c in &candidates {
            self.decide_check(c, req, &mut d);
        }
        self.decide_credits(req, &mut d);
        self.decide_disabled(req, &mut d);
        d
    }

    /// Alerts due for a request's pools at `t` after its usage settled: every `alert` check
    /// whose pool is exhausted (settled used ≥ limit) and was not alerted in this window.
    pub fn alerts_due(&self, r: &Resolved, t: DateTime<Utc>) -> Vec<ThresholdCrossed> {
        self.candidates(r)
            .iter()
            .filter(|c| c.policy.data.on_exhausted == OnExhausted::Alert)
            .filter_map(|c| self.alert_of(c, t))
            .collect()
    }

    fn alert_of(&self, c: &Candidate<'_>, t: DateTime<Utc>) -> Option<ThresholdCrossed> {
        let p = &c.policy.data;
        let limit = self.limit_of(c.policy, &c.pool, t);
        let used = self.used(c.policy, &c.pool, t);
        let window = c.policy.spec.bounds(t);
        let start = window.filter(|_| c.policy.windowed()).map(|w| w.start);
        (used >= limit && !self.alerted(&p.policy_id, &c.pool, start)).then(|| ThresholdCrossed {
            policy_id: p.policy_id.clone(),
            subject: c.pool.clone(),
            window,
            limit,
            used,
        })
    }

    fn decide_check(&self, c: &Candidate<'_>, req: &AdmitRequest<'_>, d: &mut Decision) {
        let p = &c.policy.data;
        let t = req.at;
        let window = c.policy.spec.bounds(t);
        let limit = self.limit_of(c.policy, &c.pool, t);
        let used = self.used_in(c.policy, &c.pool, window);
        let reserved = self.reserved(c.policy, &c.pool, t);
        let need = p.metric.of(&d.estimate);
        let held = used.saturating_add(reserved);
        let after = held.saturating_add(need);
        let within = match p.boundary {
            Boundary::Strict => after <= limit,
            Boundary::Graceful => held < limit,
        };
        let outcome = match (p.on_exhausted, within, after > limit) {
            (OnExhausted::Alert, _, true) | (_, true, true) => Outcome::SoftExceeded,
            (OnExhausted::Alert, _, false) | (_, true, false) => Outcome::Pass,
            (_, false, _) => Outcome::Fail,
        };
        if p.on_exhausted == OnExhausted::Alert
            && let Some(a) = self.alert_of(c, t)
        {
            d.alerts.push(a);
        }
        if outcome == Outcome::Fail {
            let retry = self
                .retry_at(c, t, limit, need)
                .map(|r| seconds_until(t, r));
            fail(d, Reason::LimitExceeded, retry);
        }
        d.checks.push(Check {
            policy_id: p.policy_id.clone(),
            subject: c.pool.clone(),
            metric: p.metric,
            window,
            limit,
            used,
            reserved,
            remaining: limit.saturating_sub(held).max(0),
            outcome,
        });
    }

    /// The earliest time at which this failing check would pass (SPEC v2 §4): usage ageing out
    /// or the window ending, or a grant starting that raises the limit enough, whichever first.
    fn retry_at(
        &self,
        c: &Candidate<'_>,
        t: DateTime<Utc>,
        limit: i64,
        need: i64,
    ) -> Option<DateTime<Utc>> {
        // Passes iff used + reserved ≤ slack (strict: the estimate fits; graceful: below the limit).
        let slack = |limit: i64| match c.policy.data.boundary {
            Boundary::Strict => limit.saturating_sub(need),
            Boundary::Graceful => limit.saturating_sub(1),
        };
        if slack(limit) < 0 {
            return None; // the estimate alone exceeds the limit: no time helps
        }
        let by_window = recovery(self, c.policy, &c.pool, t, slack(limit), true);
        let mut starts: Vec<DateTime<Utc>> = self
            .config
            .grants_for(c.policy, &c.pool)
            .map(|g| g.starts_at)
            .filter(|s| *s > t && by_window.is_none_or(|w| *s < w))
            .collect();
        starts.sort_unstable();
        let by_grant = starts.into_iter().find(|s| {
            let held = self
                .used(c.policy, &c.pool, *s)
                .saturating_add(self.reserved(c.policy, &c.pool, *s));
            held <= slack(self.limit_of(c.policy, &c.pool, *s))
        });
        by_grant.or(by_window)
    }

    fn decide_credits(&self, req: &AdmitRequest<'_>, d: &mut Decision) {
        let Some((pool, account)) = self
            .credit_pool(&d.chain)
            .and_then(|p| self.account(&p).map(|a| (p, a)))
        else {
            d.estimate.credits = req.credits.unwrap_or(0);
            return;
        };
        let need = req.credits.unwrap_or(1);
        d.estimate.credits = need;
        let balance = account.balance_at(req.at);
        let remaining = balance.saturating_sub(account.reserved);
        let pass = remaining >= need;
        if !pass {
            let retry = account
                .next_refill(req.at)
                .filter(|_| account.refill.is_some_and(|r| r.amount >= need))
                .map(|r| seconds_until(req.at, r));
            fail(d, Reason::CreditsExhausted, retry);
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
        let (mut any, mut unknown) = (false, false);
        let mut latest: Option<DateTime<Utc>> = None;
        for s in &d.chain {
            match disabled_until(self, s, req.at) {
                None => {}
                Some(None) => (any, unknown) = (true, true),
                Some(Some(u)) => {
                    any = true;
                    latest = Some(latest.map_or(u, |l| l.max(u)));
                }
            }
        }
        if any {
            d.disabled = true;
            d.admitted = false;
            d.reason = Some(Reason::SubjectDisabled);
            d.retry_after_seconds = if unknown {
                None
            } else {
                latest.map(|u| seconds_until(req.at, u))
            };
        }
        if !d.admitted {
            d.alerts.clear();
        }
    }
}

/// Record a failing check: the first failure names the reason; the retry hint is the latest of
/// all failing checks', and unknown if any of them cannot say.
fn fail(d: &mut Decision, reason: Reason, retry: Option<i64>) {
    let first = d.admitted;
    d.admitted = false;
    d.reason.get_or_insert(reason);
    d.retry_after_seconds = match (first, d.retry_after_seconds, retry) {
        (true, _, r) => r,
        (false, Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    };
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

//! The quota state: configuration, settled usage per subject slice, outstanding reservations per
//! pool, manual resets, credit balances and alerts already sent — all one fold over the events in
//! stream order. The API keeps one in memory (fed by its own writes and the stream tail); a
//! replay of the ledger through the same `apply` gives the same state.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::buckets::{Buckets, epoch_minute, minute_instant};
use super::config::{Config, PolicyConf};
use super::credits::Account;
use crate::envelope::{AdmissionDecided, Envelope, EventData, UsageSettled};
use crate::model::{Check, Metric, Subject, Usage};

/// The `policy_id` of the credits check in an admission's checks.
pub const CREDITS_CHECK: &str = "credits";
/// Most requests with open state (reservations, settlement ids). Beyond it, the oldest are
/// forgotten first (their reservations would have expired anyway).
pub const MAX_OPEN_REQUESTS: usize = 4_000_000;

/// A usage slice of one subject: the request's model group and frozen counted flags.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SliceKey {
    /// Model group, "" for none.
    pub model_group: String,
    /// Counted in the key axis' global policies.
    pub key_global: bool,
    /// Counted in the user axis' global policies.
    pub user_global: bool,
}

/// Where a reservation is held: a policy's pool in one window (None: rolling and lifetime).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Policy.
    pub policy_id: String,
    /// Pool subject (chain subject, or the member for a group policy).
    pub subject: Subject,
    /// Window start for calendar and periodic windows.
    pub window_start: Option<DateTime<Utc>>,
}

/// A manual reset of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reset {
    /// Start of the window it applies to (None for lifetime and rolling).
    pub window_start: Option<DateTime<Utc>>,
    /// Usage of the window when it was reset (no longer counted).
    pub offset: i64,
    /// Epoch minute of the reset: rolling windows count only later minutes.
    pub minute: i64,
}

/// What one request holds.
#[derive(Clone, Debug, Default)]
struct Open {
    admission_id: Option<Uuid>,
    /// Leaf subject of the admission.
    leaf: Option<Subject>,
    /// Server time the admission was received: the reservation TTL counts from it.
    received_at: Option<DateTime<Utc>>,
    pools: Vec<(PoolKey, Metric)>,
    credit_pool: Option<Subject>,
    estimate: Usage,
    settled: Usage,
    settlement_ids: HashSet<String>,
    closed: bool,
    seen_at: DateTime<Utc>,
}

impl Open {
    /// The part of the estimate still held: the estimate less what was settled, while open.
    fn held(&self, m: Metric) -> i64 {
        if self.closed {
            return 0;
        }
        (m.of(&self.estimate) - m.of(&self.settled)).max(0)
    }
}

/// The whole fold.
#[derive(Clone, Debug, Default)]
pub struct QuotaState {
    /// Configuration.
    pub config: Config,
    usage: HashMap<Subject, HashMap<SliceKey, Buckets>>,
    reserved: HashMap<PoolKey, i64>,
    open: HashMap<String, Open>,
    resets: HashMap<(String, Subject), Reset>,
    pub(super) credits: HashMap<Subject, Account>,
    alerted: HashSet<(String, Subject, Option<DateTime<Utc>>)>,
    applied: HashSet<Uuid>,
}

impl QuotaState {
    /// Fold one event. Idempotent: a request event already applied (the API applies its own
    /// writes at once and sees them again on the stream) and a configuration event id already
    /// seen change nothing.
    pub fn apply(&mut self, env: &Envelope) {
        match &env.data {
            EventData::AdmissionDecided(d) => self.apply_admission(env, d),
            EventData::UsageSettled(d) => self.apply_settlement(env, d),
            EventData::ReservationReleased(_) | EventData::ReservationExpired(_) => {
                if let Some(rid) = &env.request_id {
                    self.close(rid);
                }
            }
            _ => {
                if !self.applied.insert(env.id) {
                    return;
                }
                self.apply_config(env);
            }
        }
    }

    fn apply_config(&mut self, env: &Envelope) {
        match &env.data {
            EventData::WindowReset(r) => self.apply_reset(&r.policy_id, &r.subject, r.at),
            EventData::CreditsAdjusted(c) => {
                if let Some(s) = &env.subject {
                    let account = self.credits.entry(s.clone()).or_default();
                    account.adjust(c, env.occurred_at);
                }
            }
            EventData::ThresholdCrossed(t) => {
                let start = t.window.map(|w| w.start);
                self.alerted
                    .insert((t.policy_id.clone(), t.subject.clone(), start));
            }
            _ => self.config.apply(env),
        }
    }

    fn apply_admission(&mut self, env: &Envelope, d: &AdmissionDecided) {
        let Some(rid) = env.request_id.clone() else {
            return;
        };
        let open = self.open.entry(rid.clone()).or_default();
        if open.admission_id.is_some() {
            return;
        }
        open.admission_id = Some(d.admission_id);
        open.leaf = d.chain.first().cloned();
        open.received_at = Some(d.received_at);
        // Server time, not `at`: a backfilled admission is as fresh as any other.
        open.seen_at = d.received_at;
        if !d.admitted {
            open.closed = true;
            return;
        }
        open.estimate = d.estimate;
        let mut pools = Vec::new();
        let mut credit_pool = None;
        for c in &d.checks {
            if c.policy_id == CREDITS_CHECK {
                credit_pool = Some(c.subject.clone());
            } else {
                pools.push((self.pool_key(c), c.metric));
            }
        }
        let open = self.open.get_mut(&rid).expect("just inserted");
        open.pools = pools;
        open.credit_pool = credit_pool;
        let before = Open {
            closed: true,
            ..open.clone()
        };
        let after = open.clone();
        self.shift_reserved(&before, &after);
    }

    fn pool_key(&self, c: &Check) -> PoolKey {
        let windowed = self
            .config
            .policy(&c.policy_id)
            .is_some_and(|p| matches!(p.spec.kind(), "calendar" | "periodic"));
        PoolKey {
            policy_id: c.policy_id.clone(),
            subject: c.subject.clone(),
            window_start: if windowed {
                c.window.map(|w| w.start)
            } else {
                None
            },
        }
    }

    /// Move pool reservations from what `before` held to what `after` holds.
    fn shift_reserved(&mut self, before: &Open, after: &Open) {
        for (key, metric) in &after.pools {
            let delta = after.held(*metric) - before.held(*metric);
            if delta != 0 {
                let slot = self.reserved.entry(key.clone()).or_insert(0);
                *slot += delta;
                debug_assert!(*slot >= 0, "reserved never goes negative");
                if *slot <= 0 {
                    self.reserved.remove(key);
                }
            }
        }
        if let Some(pool) = &after.credit_pool {
            let delta = after.held(Metric::Credits) - before.held(Metric::Credits);
            if let Some(acc) = self.credits.get_mut(pool) {
                acc.reserved = (acc.reserved + delta).max(0);
            }
        }
    }

    fn apply_settlement(&mut self, env: &Envelope, d: &UsageSettled) {
        let Some(rid) = env.request_id.clone() else {
            return;
        };
        let open = self.open.entry(rid.clone()).or_default();
        if !open.settlement_ids.insert(d.settlement_id.clone()) {
            return;
        }
        if open.seen_at < env.occurred_at {
            open.seen_at = env.occurred_at;
        }
        let before = open.clone();
        open.settled = open.settled.plus(&d.usage);
        if d.is_final {
            open.closed = true;
        }
        let after = open.clone();
        self.shift_reserved(&before, &after);
        self.add_usage(d);
        let pool = after
            .credit_pool
            .clone()
            .or_else(|| self.credit_pool(&d.chain));
        if let Some(pool) = pool
            && d.usage.credits != 0
            && let Some(acc) = self.credits.get_mut(&pool)
        {
            acc.charge(d.usage.credits, d.window_at);
        }
    }

    fn add_usage(&mut self, d: &UsageSettled) {
        if d.usage.is_zero() {
            return;
        }
        let key = SliceKey {
            model_group: d.model_group.clone().unwrap_or_default(),
            key_global: d.counted_in_key_global,
            user_global: d.counted_in_user_global,
        };
        let m = epoch_minute(d.window_at);
        for s in &d.chain {
            self.usage
                .entry(s.clone())
                .or_default()
                .entry(key.clone())
                .or_default()
                .add(m, &d.usage);
        }
    }

    fn close(&mut self, rid: &str) {
        let Some(open) = self.open.get_mut(rid) else {
            return;
        };
        let before = open.clone();
        open.closed = true;
        let after = open.clone();
        self.shift_reserved(&before, &after);
    }

    fn apply_reset(&mut self, policy_id: &str, subject: &Subject, at: DateTime<Utc>) {
        let Some(policy) = self.config.policy(policy_id).cloned() else {
            return;
        };
        let bounds = policy.spec.bounds(at);
        let windowed = matches!(policy.spec.kind(), "calendar" | "periodic");
        let window_start = if windowed {
            bounds.map(|b| b.start)
        } else {
            None
        };
        let raw = self.raw_used(&policy, subject, at);
        self.resets.insert(
            (policy_id.to_owned(), subject.clone()),
            Reset {
                window_start,
                offset: raw,
                minute: epoch_minute(at),
            },
        );
    }

    /// Settled usage of `policy`'s pool for `pool` in the window containing `t`, before resets.
    fn raw_used(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        let (from, to) = match policy.spec.bounds(t) {
            Some(b) => (epoch_minute(b.start), epoch_minute(b.end)),
            None => (i64::MIN, i64::MAX),
        };
        self.sum_slices(policy, pool, from, to)
    }

    fn sum_slices(&self, policy: &PolicyConf, pool: &Subject, from: i64, to: i64) -> i64 {
        let Some(slices) = self.usage.get(pool) else {
            return 0;
        };
        let p = &policy.data;
        slices
            .iter()
            .filter(|(k, _)| slice_counts(k, p.model_group.as_deref(), p.metric, pool))
            .map(|(_, b)| {
                let u = if from == i64::MIN {
                    b.total()
                } else {
                    b.sum(from, to)
                };
                p.metric.of(&u)
            })
            .sum()
    }

    /// Settled usage of the pool in the window containing `t`, after a manual reset.
    pub fn used(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        let reset = self
            .resets
            .get(&(policy.data.policy_id.clone(), pool.clone()));
        let bounds = policy.spec.bounds(t);
        match (reset, policy.spec.kind()) {
            (Some(r), "rolling") => {
                let b = bounds.expect("rolling windows have bounds");
                let from = epoch_minute(b.start).max(r.minute + 1);
                self.sum_slices(policy, pool, from, epoch_minute(b.end))
            }
            (Some(r), _) if r.window_start == bounds.map(|b| b.start) => {
                (self.raw_used(policy, pool, t) - r.offset).max(0)
            }
            _ => self.raw_used(policy, pool, t),
        }
    }

    /// Outstanding reservations of the pool in the window containing `t`.
    pub fn reserved(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        let windowed = matches!(policy.spec.kind(), "calendar" | "periodic");
        let key = PoolKey {
            policy_id: policy.data.policy_id.clone(),
            subject: pool.clone(),
            window_start: if windowed {
                policy.spec.bounds(t).map(|b| b.start)
            } else {
                None
            },
        };
        self.reserved.get(&key).copied().unwrap_or(0)
    }

    /// Minute buckets of the pool in `[from, to)` with this policy's metric, oldest first.
    pub fn minute_amounts(
        &self,
        policy: &PolicyConf,
        pool: &Subject,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Vec<(DateTime<Utc>, i64)> {
        let mut by_minute: std::collections::BTreeMap<i64, i64> = Default::default();
        let p = &policy.data;
        if let Some(slices) = self.usage.get(pool) {
            for (k, b) in slices {
                if slice_counts(k, p.model_group.as_deref(), p.metric, pool) {
                    for (m, u) in b.minutes_in(epoch_minute(from), epoch_minute(to)) {
                        *by_minute.entry(m).or_insert(0) += p.metric.of(u);
                    }
                }
            }
        }
        by_minute
            .into_iter()
            .map(|(m, v)| (minute_instant(m), v))
            .collect()
    }

    /// Whether an alert was already sent for this pool and window.
    pub fn alerted(&self, policy_id: &str, pool: &Subject, start: Option<DateTime<Utc>>) -> bool {
        self.alerted
            .contains(&(policy_id.to_owned(), pool.clone(), start))
    }

    /// The chain subject nearest the root that has a credit balance (SPEC §4: one pool only).
    pub fn credit_pool(&self, chain: &[Subject]) -> Option<Subject> {
        chain
            .iter()
            .rev()
            .find(|s| self.credits.contains_key(*s))
            .cloned()
    }

    /// A subject's credit account.
    pub fn account(&self, s: &Subject) -> Option<&Account> {
        self.credits.get(s)
    }

    /// Whether the request was admitted already (idempotency).
    pub fn is_admitted(&self, request_id: &str) -> bool {
        self.open
            .get(request_id)
            .is_some_and(|o| o.admission_id.is_some())
    }

    /// Undo this instance's own admission whose event could not be published.
    pub fn forget(&mut self, request_id: &str) {
        self.close(request_id);
        self.open.remove(request_id);
    }

    /// Forget closed requests last seen before `horizon` and
    /// configuration event ids (kept only to drop the echo of our own writes).
    pub fn prune(&mut self, horizon: DateTime<Utc>) {
        let stale: Vec<String> = self
            .open
            .iter()
            // An admitted, open request is only ever closed by an event (expiry, release,
            // settlement), so every instance agrees on when its reservation ended.
            .filter(|(_, o)| o.seen_at < horizon && (o.closed || o.admission_id.is_none()))
            .map(|(k, _)| k.clone())
            .collect();
        for rid in stale {
            self.close(&rid);
            self.open.remove(&rid);
        }
        if self.applied.len() > 100_000 {
            self.applied.clear();
        }
    }

    /// Admitted requests still holding a reservation whose TTL, counted on the server's clock
    /// from when the admission was received, has run out by `now`: (request id, admission id,
    /// leaf subject).
    pub fn expired(
        &self,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Vec<(String, Uuid, Option<Subject>)> {
        self.open
            .iter()
            .filter(|(_, o)| !o.closed && o.received_at.is_some_and(|r| r + ttl <= now))
            .filter_map(|(rid, o)| o.admission_id.map(|a| (rid.clone(), a, o.leaf.clone())))
            .collect()
    }

    /// Outstanding reservations in every pool (for tests and metrics): sum over pools.
    pub fn reserved_total(&self) -> i64 {
        self.reserved.values().sum()
    }

    /// Requests with open state.
    pub fn open_requests(&self) -> usize {
        self.open.len()
    }
}

/// Whether usage in slice `k` counts for a policy scoped to `model_group` on `metric`, for pool
/// subject `pool` (SPEC §4.3): a model-group policy counts only its group; a `requests` policy
/// counts everything; a global spend policy of a key (user) counts only requests counted in the
/// key (user) axis' global policies; other subjects' global policies count everything.
fn slice_counts(k: &SliceKey, model_group: Option<&str>, metric: Metric, pool: &Subject) -> bool {
    if let Some(g) = model_group {
        return k.model_group == g;
    }
    if !metric.is_spend() {
        return true;
    }
    match pool.kind() {
        "key" => k.key_global,
        "user" => k.user_global,
        _ => true,
    }
}

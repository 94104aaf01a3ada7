//! The quota state: configuration, settled usage per subject slice, outstanding reservations per
//! pool, manual resets, credit balances and alerts already sent — all one fold over the events in
//! stream order. The API keeps one in memory (fed by its own writes and the stream tail); a
//! replay of the ledger through the same `apply` gives the same state.
//!
//! Arithmetic never panics and never wraps (SPEC v2 §4): every total saturates at `i64::MAX`, so
//! a pool pushed to saturation reads as exhausted and the fold goes on.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::bounded::Bounded;
use super::buckets::{Buckets, Horizons, minute_instant};
use super::config::{Config, PolicyConf};
use super::credits::Account;
use super::sharded::{SHARDS, Sharded};
use crate::envelope::{AdmissionDecided, CreditsAdjusted, Envelope, EventData, UsageSettled};
use crate::model::{Check, CreditOp, Metric, Refill, Subject, Usage, Window, WindowBounds};
use crate::request::MAX_SETTLEMENTS_PER_REQUEST;
use crate::window::{WindowSpec, epoch_minute};

/// The `policy_id` of the credits check in an admission's checks.
pub const CREDITS_CHECK: &str = "credits";
/// Most requests with open state (reservations, settlement ids). Past it, the closed requests
/// seen longest ago are forgotten first (a retry of one of them would then be decided afresh);
/// admitted requests still holding a reservation are never forgotten: their expiry releases it.
pub const MAX_OPEN_REQUESTS: usize = 4_000_000;
/// Configuration event ids remembered to recognise the echo of this instance's own writes on
/// the stream (it arrives within the tail's lag, seconds at most).
pub const MAX_APPLIED_IDS: usize = 100_000;
/// Alerts remembered (one per pool and window): older ones are for windows long past.
pub const MAX_ALERTED: usize = 1_000_000;
/// Credit write ids remembered with their first answer (SPEC v2 §6 idempotent credits writes).
pub const MAX_CREDIT_WRITE_IDS: usize = 1_000_000;
/// How long a request id names the same request (SPEC §4.6, §5): twice the default reservation
/// TTL. Within it a second decision for the id is a duplicate; after it, a new request.
pub const DEFAULT_IDEMPOTENCY_MINUTES: i64 = 30;

/// A usage slice of one subject: the request's model group and frozen counted flags.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SliceKey {
    /// Model group, "" for none.
    pub model_group: String,
    /// Counted in the key axis' global policies.
    pub key_global: bool,
    /// Counted in the user axis' global policies.
    pub user_global: bool,
}

/// The usage slices of one subject (one per model group and counted flags: a handful), as a
/// list: a hash map per subject cost ~400 bytes of table for one to three entries (issue 5's
/// memory target), and a short scan is as fast as hashing the key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slices(Vec<(SliceKey, Buckets)>);

impl Slices {
    /// The buckets of the slice `(model group, key_global, user_global)`, created empty when
    /// missing: its key is built (the model group copied) only then, into a list grown by
    /// exactly one so that a quiet subject holds no spare room.
    pub fn entry(
        &mut self,
        (model_group, key_global, user_global): (&str, bool, bool),
    ) -> &mut Buckets {
        let i = match self.0.iter().position(|(k, _)| {
            k.model_group == model_group
                && k.key_global == key_global
                && k.user_global == user_global
        }) {
            Some(i) => i,
            None => {
                self.0.reserve_exact(1);
                let key = SliceKey {
                    model_group: model_group.to_owned(),
                    key_global,
                    user_global,
                };
                self.0.push((key, Buckets::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    /// Every slice.
    pub fn iter(&self) -> impl Iterator<Item = (&SliceKey, &Buckets)> {
        self.0.iter().map(|(k, b)| (k, b))
    }

    /// Every slice's buckets.
    pub fn values(&self) -> impl Iterator<Item = &Buckets> {
        self.0.iter().map(|(_, b)| b)
    }

    /// Every slice's buckets, to change.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Buckets> {
        self.0.iter_mut().map(|(_, b)| b)
    }
}

/// Where a reservation is held: a policy's pool in one window (None: rolling and lifetime).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PoolKey {
    /// Policy.
    pub policy_id: String,
    /// Pool subject (chain subject, or the member for a group policy).
    pub subject: Subject,
    /// Window start for calendar and periodic windows.
    pub window_start: Option<DateTime<Utc>>,
}

/// A manual reset of a pool (SPEC v2 §6): usage recorded before it (stream order) no longer
/// counts in the window it was made in; usage recorded after it counts in full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// The policy's metric, model group and window when the reset was made: once any of them
    /// changes, the reset is void.
    #[serde(with = "super::snapshot::as_json")]
    pub shape: (Metric, Option<String>, Window),
    /// Start of the window it applies to (calendar and periodic; None for lifetime, rolling).
    pub window_start: Option<DateTime<Utc>>,
    /// Calendar, periodic and lifetime: the window's usage when it was reset.
    pub offset: i64,
    /// Rolling: the amounts recorded before the reset in each minute from the reset window's
    /// start on, as running totals `(epoch minute, total up to and including it)`, so the part
    /// of any later window they cover is two binary searches.
    pub captured: Vec<(i64, i64)>,
}

impl Reset {
    /// Captured amounts in epoch minutes `[from, to)`.
    fn captured_in(&self, from: i64, to: i64) -> i64 {
        let upto = |m: i64| {
            let i = self.captured.partition_point(|(cm, _)| *cm < m);
            if i == 0 { 0 } else { self.captured[i - 1].1 }
        };
        upto(to).saturating_sub(upto(from)).max(0)
    }

    /// Captured amount of one minute.
    fn captured_at(&self, m: i64) -> i64 {
        self.captured_in(m, m.saturating_add(1))
    }
}

/// The first answer of a credit write, returned again for the same `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditAnswer {
    /// The subject written.
    pub subject: Subject,
    /// Remaining after the write (None once cleared).
    pub remaining: Option<i64>,
    /// Refill schedule after the write.
    pub refill: Option<Refill>,
}

/// What one request holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Open {
    admission_id: Option<Uuid>,
    /// Leaf subject of the admission.
    leaf: Option<Subject>,
    /// Server time the admission was received: the reservation TTL counts from it.
    received_at: Option<DateTime<Utc>>,
    pools: Vec<(PoolKey, Metric)>,
    credit_pool: Option<Subject>,
    /// The credit balance's epoch when the request was admitted.
    credit_epoch: u64,
    estimate: Usage,
    settled: Usage,
    settlement_ids: HashSet<String>,
    closed: bool,
    seen_at: DateTime<Utc>,
}

/// What a request holds, per metric in [`Metric::ALL`] order.
type Held = [i64; 6];

impl Open {
    /// The part of the estimate still held: the estimate less what was settled, while open.
    fn held(&self, m: Metric) -> i64 {
        if self.closed {
            return 0;
        }
        m.of(&self.estimate)
            .saturating_sub(m.of(&self.settled))
            .max(0)
    }

    /// Whether the request may be forgotten once seen long enough ago: closed, or never
    /// admitted here (an admitted, open request is only ever closed by an event).
    fn forgettable(&self) -> bool {
        self.closed || self.admission_id.is_none()
    }

    /// [`Open::held`] of every metric.
    fn held_all(&self) -> Held {
        Metric::ALL.map(|m| self.held(m))
    }
}

/// Move pool reservations of `open` from what it held (`before`) to what it holds now.
fn shift_reserved(
    reserved: &mut HashMap<PoolKey, i64>,
    credits: &mut HashMap<Subject, Account>,
    open: &Open,
    before: Held,
) {
    let after = open.held_all();
    if after == before {
        return;
    }
    for (key, metric) in &open.pools {
        let delta = after[metric.index()].saturating_sub(before[metric.index()]);
        if delta == 0 {
            continue;
        }
        // The key is copied only when the pool holds nothing yet (`entry` would copy it for
        // every release and settlement too).
        match reserved.get_mut(key) {
            Some(slot) => {
                *slot = slot.saturating_add(delta).max(0);
                if *slot == 0 {
                    reserved.remove(key);
                }
            }
            None if delta > 0 => {
                reserved.insert(key.clone(), delta);
            }
            None => {}
        }
    }
    if let Some(pool) = &open.credit_pool {
        let c = Metric::Credits.index();
        let delta = after[c].saturating_sub(before[c]);
        if let Some(acc) = credits.get_mut(pool)
            && acc.epoch == open.credit_epoch
        {
            acc.reserved = acc.reserved.saturating_add(delta).max(0);
        }
    }
}

/// A hash table never gives back the room a burst made it grow to; one that is less than a
/// 1/`SHRINK_SLACK` full is shrunk to twice what it holds, so memory follows the requests in
/// flight, not the busiest moment since the start (the shrink rehashes, hence the slack).
pub const SHRINK_SLACK: usize = 4;
/// Tables of up to this many slots are never shrunk (not worth a rehash).
const SHRINK_MIN_CAPACITY: usize = 4096;
/// The same for one shard of the request map (a 64th of the requests: a smaller table is worth
/// shrinking, 64 of them add up).
const SHRINK_MIN_SHARD_CAPACITY: usize = 1024;

/// Forget the closed requests of `shard` seen longest ago until it holds `keep` (or no closed
/// one is left).
fn forget_oldest_closed(shard: &mut HashMap<String, Open>, keep: usize) {
    let excess = shard.len().saturating_sub(keep);
    for rid in oldest_closed(shard.iter(), excess) {
        shard.remove(&rid);
    }
}

/// The ids of the `n` closed requests among `requests` seen longest ago (fewer if fewer are
/// closed).
fn oldest_closed<'a>(
    requests: impl Iterator<Item = (&'a String, &'a Open)>,
    n: usize,
) -> Vec<String> {
    let closed = requests.filter(|(_, o)| o.forgettable());
    oldest_first(closed.map(|(k, o)| (o.seen_at, k)), n)
}

/// The keys of the `n` entries seen longest ago among `entries` (`(seen at, key)`; ties by key),
/// fewer if there are fewer: what a bounded table of requests forgets first.
pub fn oldest_first<'a, K: Ord + Clone + 'a>(
    entries: impl Iterator<Item = (DateTime<Utc>, &'a K)>,
    n: usize,
) -> Vec<K> {
    let mut all: Vec<(DateTime<Utc>, &K)> = entries.collect();
    if n < all.len() {
        all.select_nth_unstable(n);
    }
    all.into_iter().take(n).map(|(_, k)| k.clone()).collect()
}

fn shrink_when_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, min_capacity: usize) {
    if map.capacity() > min_capacity && map.len().saturating_mul(SHRINK_SLACK) < map.capacity() {
        map.shrink_to(map.len().saturating_mul(2));
    }
}

/// The whole fold.
#[derive(Clone, Debug)]
pub struct QuotaState {
    /// Configuration.
    pub config: Config,
    pub(super) usage: HashMap<Subject, Slices>,
    pub(super) reserved: HashMap<PoolKey, i64>,
    pub(super) open: Sharded<String, Open>,
    pub(super) resets: HashMap<(String, Subject), Reset>,
    pub(super) credits: HashMap<Subject, Account>,
    pub(super) credit_epochs: u64,
    pub(super) credit_writes: Bounded<String, CreditAnswer>,
    pub(super) alerted: Bounded<(String, Subject, Option<DateTime<Utc>>), ()>,
    pub(super) applied: Bounded<Uuid, ()>,
    /// Subjects still to compact in the current round (see [`QuotaState::compact`]).
    pub(super) compact_queue: Vec<Subject>,
    /// The next shard of the request map [`QuotaState::prune_next_shards`] forgets in.
    pub(super) prune_cursor: usize,
    /// The stream's clock: the latest server time among the events folded (admissions' receipt,
    /// UUID v7 event ids). Forgetting requests runs on it, not on the wall clock, so a replay
    /// forgets exactly what the live instance forgot.
    pub(super) clock: Option<DateTime<Utc>>,
    /// How long a request id names one request (see [`DEFAULT_IDEMPOTENCY_MINUTES`]).
    pub(super) idempotency: chrono::Duration,
}

impl Default for QuotaState {
    fn default() -> Self {
        QuotaState {
            config: Config::default(),
            usage: HashMap::new(),
            reserved: HashMap::new(),
            open: Sharded::default(),
            resets: HashMap::new(),
            credits: HashMap::new(),
            credit_epochs: 0,
            credit_writes: Bounded::new(MAX_CREDIT_WRITE_IDS),
            alerted: Bounded::new(MAX_ALERTED),
            applied: Bounded::new(MAX_APPLIED_IDS),
            compact_queue: Vec::new(),
            prune_cursor: 0,
            clock: None,
            idempotency: chrono::Duration::minutes(DEFAULT_IDEMPOTENCY_MINUTES),
        }
    }
}

/// The server time of a UUID v7 event id.
fn id_time(id: &Uuid) -> Option<DateTime<Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

/// A settlement's identity within its request: its admission and its settlement id.
fn settlement_key(d: &UsageSettled) -> String {
    match d.admission_id {
        Some(a) => format!("{a}/{}", d.settlement_id),
        None => format!("-/{}", d.settlement_id),
    }
}

impl QuotaState {
    /// Fold one event. Idempotent: a request event already applied (the API applies its own
    /// writes at once and sees them again on the stream) and a configuration event id already
    /// seen change nothing.
    pub fn apply(&mut self, env: &Envelope) {
        self.tick(env);
        match &env.data {
            EventData::AdmissionDecided(d) => self.apply_admission(env, d),
            EventData::UsageSettled(d) => self.apply_settlement(env, d),
            EventData::ReservationReleased(e) | EventData::ReservationExpired(e) => {
                if let Some(rid) = &env.request_id
                    && self.open.get(rid).and_then(|o| o.admission_id) == Some(e.admission_id)
                {
                    self.close(rid);
                }
            }
            _ => {
                if self.applied.insert(env.id, ()) {
                    self.apply_config(env);
                }
            }
        }
    }

    /// Move the stream clock to the event's server time.
    fn tick(&mut self, env: &Envelope) {
        let t = match &env.data {
            EventData::AdmissionDecided(d) => Some(d.received_at),
            _ => id_time(&env.id),
        };
        if let Some(t) = t
            && self.clock.is_none_or(|c| t > c)
        {
            self.clock = Some(t);
        }
    }

    /// Set how long a request id names one request (twice the reservation TTL).
    pub fn set_idempotency(&mut self, d: chrono::Duration) {
        self.idempotency = d;
    }

    /// How long a request id names one request.
    pub fn idempotency(&self) -> chrono::Duration {
        self.idempotency
    }

    /// The stream clock: the latest server time folded.
    pub fn clock(&self) -> Option<DateTime<Utc>> {
        self.clock
    }

    fn apply_config(&mut self, env: &Envelope) {
        match &env.data {
            EventData::WindowReset(r) => self.apply_reset(&r.policy_id, &r.subject, r.at),
            EventData::CreditsAdjusted(c) => {
                if let Some(s) = &env.subject {
                    self.apply_credits(s, c, env.occurred_at, id_time(&env.id));
                }
            }
            EventData::ThresholdCrossed(t) => {
                let start = t.window.map(|w| w.start);
                self.alerted
                    .insert((t.policy_id.clone(), t.subject.clone(), start), ());
            }
            EventData::SubjectDeleted(_) => {
                if let Some(s) = env.subject.clone() {
                    let owned: Vec<String> = self
                        .config
                        .policies_of(&s)
                        .map(|p| p.data.policy_id.clone())
                        .collect();
                    self.config.apply(env);
                    self.resets
                        .retain(|(id, pool), _| pool != &s && !owned.contains(id));
                    self.credits.remove(&s);
                }
            }
            _ => {
                self.config.apply(env);
                self.void_stale_resets();
            }
        }
    }

    /// A reset is void once its policy is deleted or its metric, model group or window changes.
    fn void_stale_resets(&mut self) {
        let config = &self.config;
        self.resets.retain(|(id, _), r| {
            config.policy(id).is_some_and(|p| {
                let d = &p.data;
                (d.metric, d.model_group.as_ref(), &d.window)
                    == (r.shape.0, r.shape.1.as_ref(), &r.shape.2)
            })
        });
    }

    fn apply_credits(
        &mut self,
        s: &Subject,
        c: &CreditsAdjusted,
        at: DateTime<Utc>,
        barrier_at: Option<DateTime<Utc>>,
    ) {
        if let Some(id) = &c.id
            && self.credit_writes.contains(id)
        {
            return;
        }
        let answer = if c.op == CreditOp::Clear {
            self.credits.remove(s);
            CreditAnswer {
                subject: s.clone(),
                remaining: None,
                refill: None,
            }
        } else {
            let fresh = !self.credits.contains_key(s);
            if fresh || c.op == CreditOp::Set {
                self.credit_epochs += 1;
            }
            let epoch = self.credit_epochs;
            let account = self.credits.entry(s.clone()).or_default();
            if fresh || c.op == CreditOp::Set {
                // The barrier: reservations and charges of earlier requests stay in the old epoch.
                account.epoch = epoch;
                account.reserved = 0;
                account.barrier_at = barrier_at;
            }
            account.adjust(c, at);
            CreditAnswer {
                subject: s.clone(),
                remaining: Some(account.remaining_at(at)),
                refill: account.refill,
            }
        };
        if let Some(id) = &c.id {
            self.credit_writes.insert(id.clone(), answer);
        }
    }

    /// The first answer of the credit write `id`, if it was applied.
    pub fn credit_write(&self, id: &str) -> Option<&CreditAnswer> {
        self.credit_writes.get(&id.to_owned())
    }

    fn apply_admission(&mut self, env: &Envelope, d: &AdmissionDecided) {
        let Some(rid) = env.request_id.clone() else {
            return;
        };
        if let Some(o) = self.open.get(&rid)
            && o.admission_id.is_some()
        {
            // The same decision again, or a racing one while the id still names its request:
            // nothing changes. A closed request whose idempotency window has passed (what
            // `is_admitted` and `prune` go by) is forgotten: the id names a new request.
            let window_over = o
                .received_at
                .and_then(|r| r.checked_add_signed(self.idempotency))
                .is_some_and(|end| self.clock.is_some_and(|c| end <= c));
            if o.admission_id == Some(d.admission_id) || !o.closed || !window_over {
                return;
            }
            self.open.remove(&rid);
        }
        let mut pools = Vec::new();
        let mut credit_pool = None;
        if d.admitted {
            for c in &d.checks {
                if c.policy_id == CREDITS_CHECK {
                    credit_pool = Some(c.subject.clone());
                } else {
                    pools.push((self.pool_key(c), c.metric));
                }
            }
        }
        let credit_epoch = credit_pool
            .as_ref()
            .and_then(|p| self.credits.get(p))
            .map_or(0, |a| a.epoch);
        let open = self.open.entry(rid).or_default();
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
        open.pools = pools;
        open.credit_pool = credit_pool;
        open.credit_epoch = credit_epoch;
        shift_reserved(&mut self.reserved, &mut self.credits, open, [0; 6]);
    }

    fn pool_key(&self, c: &Check) -> PoolKey {
        let windowed = self
            .config
            .policy(&c.policy_id)
            .is_some_and(PolicyConf::windowed);
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

    fn apply_settlement(&mut self, env: &Envelope, d: &UsageSettled) {
        let Some(rid) = env.request_id.clone() else {
            return;
        };
        let open = self.open.entry(rid).or_default();
        let key = settlement_key(d);
        if open.settlement_ids.contains(&key) {
            return;
        }
        // Past the bound a settlement still counts (the usage happened) but its id is not kept;
        // the API refuses more settlements per request than this, so only a hand-made event
        // gets here.
        if open.settlement_ids.len() < MAX_SETTLEMENTS_PER_REQUEST {
            open.settlement_ids.insert(key);
        }
        if open.seen_at < env.occurred_at {
            open.seen_at = env.occurred_at;
        }
        // A settlement of another decision for the id (an earlier request of the same id, or a
        // racing instance's admission that lost) counts, but holds and releases nothing here.
        let ours = d.admission_id == open.admission_id;
        // A request that is closed (refused, released, expired or settled for good) may be
        // pruned at any time; what a later settlement of it does must not depend on whether it
        // was, so such a settlement is charged from the event alone, like one for a request
        // this state never saw.
        let from_event = !ours || open.closed;
        let before = open.held_all();
        if ours {
            open.settled = open.settled.plus(&d.usage);
            if d.is_final {
                open.closed = true;
            }
        }
        shift_reserved(&mut self.reserved, &mut self.credits, open, before);
        // The credit pool and epoch the charge goes to: the admission's when it is ours.
        let owner = match (from_event, &open.credit_pool) {
            (true, _) => Some((None, None)),
            (false, Some(p)) => Some((Some(p.clone()), Some(open.credit_epoch))),
            (false, None) => None,
        };
        self.add_usage(d);
        if d.usage.credits != 0
            && let Some(owner) = owner
        {
            self.charge_credits(owner, d);
        }
    }

    /// Charge settled credits to the admission's credit pool in the admission's epoch, or, from
    /// the event alone, to the chain's credit pool now, unless that balance was set (a barrier)
    /// after the admission was decided.
    fn charge_credits(&mut self, owner: (Option<Subject>, Option<u64>), d: &UsageSettled) {
        let (pool, epoch) = match owner {
            (Some(p), epoch) => (Some(p), epoch),
            (None, _) => (self.credit_pool(&d.chain), None),
        };
        let decided_at = d.admission_id.as_ref().and_then(id_time);
        if let Some(pool) = pool
            && let Some(acc) = self.credits.get_mut(&pool)
            && epoch.is_none_or(|e| e == acc.epoch)
            && (epoch.is_some() || acc.admits_charge_of(decided_at))
        {
            acc.charge(d.usage.credits, d.window_at);
        }
    }

    fn add_usage(&mut self, d: &UsageSettled) {
        if d.usage.is_zero() {
            return;
        }
        let key = (
            d.model_group.as_deref().unwrap_or_default(),
            d.counted_in_key_global,
            d.counted_in_user_global,
        );
        let m = epoch_minute(d.window_at);
        for s in &d.chain {
            // The subject is copied only the first time it sees usage.
            let slices = match self.usage.get_mut(s) {
                Some(slices) => slices,
                None => self.usage.entry(s.clone()).or_default(),
            };
            slices.entry(key).add(m, &d.usage);
        }
    }

    fn close(&mut self, rid: &str) {
        let Some(open) = self.open.get_mut(rid) else {
            return;
        };
        let before = open.held_all();
        open.closed = true;
        shift_reserved(&mut self.reserved, &mut self.credits, open, before);
    }

    fn apply_reset(&mut self, policy_id: &str, subject: &Subject, at: DateTime<Utc>) {
        let Some(policy) = self.config.policy(policy_id).cloned() else {
            return;
        };
        let d = &policy.data;
        let shape = (d.metric, d.model_group.clone(), d.window.clone());
        let bounds = policy.spec.bounds(at);
        let reset = match policy.spec {
            WindowSpec::Rolling { .. } => {
                let from = bounds.map_or(i64::MIN, |b| epoch_minute(b.start));
                let mut total = 0i64;
                let captured = self
                    .minute_amounts_raw(&policy, subject, from, i64::MAX)
                    .into_iter()
                    .map(|(m, v)| {
                        total = total.saturating_add(v);
                        (m, total)
                    })
                    .collect();
                Reset {
                    shape,
                    window_start: None,
                    offset: 0,
                    captured,
                }
            }
            _ => Reset {
                shape,
                window_start: if policy.windowed() {
                    bounds.map(|b| b.start)
                } else {
                    None
                },
                offset: self.raw_used(&policy, subject, at),
                captured: Vec::new(),
            },
        };
        self.resets
            .insert((policy_id.to_owned(), subject.clone()), reset);
    }

    /// Settled usage of `policy`'s pool for `pool` in the window containing `t`, before resets.
    fn raw_used(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        self.raw_used_in(policy, pool, policy.spec.bounds(t))
    }

    /// [`Self::raw_used`] in `bounds` (`policy.spec.bounds(t)`, None for a lifetime window).
    fn raw_used_in(
        &self,
        policy: &PolicyConf,
        pool: &Subject,
        bounds: Option<WindowBounds>,
    ) -> i64 {
        let (from, to) = match bounds {
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
            .fold(0i64, i64::saturating_add)
    }

    /// Settled usage of the pool in the window containing `t`, after a manual reset.
    pub fn used(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        self.used_in(policy, pool, policy.spec.bounds(t))
    }

    /// [`Self::used`] in `bounds`, the window containing the time (`policy.spec.bounds(t)`):
    /// for callers that have computed it already (calendar bounds cost time-zone conversions).
    pub fn used_in(
        &self,
        policy: &PolicyConf,
        pool: &Subject,
        bounds: Option<WindowBounds>,
    ) -> i64 {
        let raw = self.raw_used_in(policy, pool, bounds);
        let Some(r) = self.reset_of(policy, pool) else {
            return raw;
        };
        let dropped = match policy.spec {
            WindowSpec::Rolling { .. } => bounds.map_or(0, |b| {
                r.captured_in(epoch_minute(b.start), epoch_minute(b.end))
            }),
            _ if r.window_start == bounds.filter(|_| policy.windowed()).map(|b| b.start) => {
                r.offset
            }
            _ => 0,
        };
        raw.saturating_sub(dropped).max(0)
    }

    fn reset_of(&self, policy: &PolicyConf, pool: &Subject) -> Option<&Reset> {
        // Resets are rare operator actions; the key is owned, so asking costs two copies (on
        // every check of every decision): not asked when there is none.
        if self.resets.is_empty() {
            return None;
        }
        self.resets
            .get(&(policy.data.policy_id.clone(), pool.clone()))
    }

    /// Settled `used` of pool `pool` of policy `policy_id` in the window that starts at `start`
    /// (None: a lifetime window, as of the stream clock). None when the policy is gone, or its
    /// window no longer starts there (it changed shape): the question has no answer. What the
    /// audit asks the ledger's fold, a snapshot and every API instance alike.
    pub fn pool_used(
        &self,
        policy_id: &str,
        pool: &Subject,
        start: Option<DateTime<Utc>>,
    ) -> Option<i64> {
        let policy = self.config.policy(policy_id)?;
        let t = match start {
            Some(s) => {
                let bounds = policy.spec.bounds(s)?;
                (policy.windowed() && bounds.start == s).then_some(s)?
            }
            None if policy.windowed() => return None,
            None => self.clock?,
        };
        Some(self.used(policy, pool, t))
    }

    /// Outstanding reservations of the pool in the window containing `t`.
    pub fn reserved(&self, policy: &PolicyConf, pool: &Subject, t: DateTime<Utc>) -> i64 {
        let key = PoolKey {
            policy_id: policy.data.policy_id.clone(),
            subject: pool.clone(),
            window_start: if policy.windowed() {
                policy.spec.bounds(t).map(|b| b.start)
            } else {
                None
            },
        };
        self.reserved.get(&key).copied().unwrap_or(0)
    }

    fn minute_amounts_raw(
        &self,
        policy: &PolicyConf,
        pool: &Subject,
        from: i64,
        to: i64,
    ) -> Vec<(i64, i64)> {
        let mut by_minute: std::collections::BTreeMap<i64, i64> = Default::default();
        let p = &policy.data;
        if let Some(slices) = self.usage.get(pool) {
            for (k, b) in slices.iter() {
                if slice_counts(k, p.model_group.as_deref(), p.metric, pool) {
                    for (m, u) in b.minutes_in(from, to) {
                        let slot = by_minute.entry(m).or_insert(0);
                        *slot = slot.saturating_add(p.metric.of(&u));
                    }
                }
            }
        }
        by_minute.into_iter().collect()
    }

    /// Minute buckets of the pool in `[from, to)` with this policy's metric, oldest first, less
    /// what a reset dropped (for "when does enough usage age out").
    pub fn minute_amounts(
        &self,
        policy: &PolicyConf,
        pool: &Subject,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Vec<(DateTime<Utc>, i64)> {
        let reset = self.reset_of(policy, pool);
        self.minute_amounts_raw(policy, pool, epoch_minute(from), epoch_minute(to))
            .into_iter()
            .map(|(m, v)| {
                let dropped = reset.map_or(0, |r| r.captured_at(m));
                (minute_instant(m), v.saturating_sub(dropped).max(0))
            })
            .filter(|(_, v)| *v > 0)
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

    /// Whether the request id was decided less than the idempotency window before `now`: a
    /// new admission for it is then a retry of that decision.
    pub fn is_admitted(&self, request_id: &str, now: DateTime<Utc>) -> bool {
        self.open.get(request_id).is_some_and(|o| {
            o.admission_id.is_some()
                && o.received_at
                    .and_then(|r| r.checked_add_signed(self.idempotency))
                    .is_some_and(|end| now < end)
        })
    }

    /// How many settlement ids of the request are remembered.
    pub fn settlements_of(&self, request_id: &str) -> usize {
        self.open
            .get(request_id)
            .map_or(0, |o| o.settlement_ids.len())
    }

    /// Undo this instance's own admission whose event could not be published.
    pub fn forget(&mut self, request_id: &str) {
        self.close(request_id);
        self.open.remove(request_id);
    }

    /// Forget closed requests last seen more than the idempotency window before the stream
    /// clock, and past [`MAX_OPEN_REQUESTS`] the closed ones seen longest ago. Returns how many
    /// were forgotten.
    pub fn prune(&mut self) -> usize {
        self.prune_to(MAX_OPEN_REQUESTS)
    }

    /// [`Self::prune`] with a bound of `cap` requests in all (tests use a small one): besides
    /// each shard's own bound, the closed requests seen longest ago over all shards go first.
    pub fn prune_to(&mut self, cap: usize) -> usize {
        let before = self.open.len();
        for i in 0..SHARDS {
            self.prune_shard(i);
        }
        if self.open.len() > cap {
            for rid in oldest_closed(self.open.iter(), self.open.len() - cap) {
                self.open.remove(&rid);
            }
        }
        shrink_when_sparse(&mut self.reserved, SHRINK_MIN_CAPACITY);
        before - self.open.len()
    }

    /// [`Self::prune`] in one shard of the request map (see [`super::shard_index`]): forget by
    /// time, and past the shard's share of [`MAX_OPEN_REQUESTS`] the closed requests seen longest
    /// ago, down to 7/8 of the share (so a flood pays for the sort once per eighth, not per
    /// call). A caller holding this state behind a lock prunes shard by shard and lets go between
    /// them, so no admission waits for a scan of every request. Returns how many were forgotten.
    pub fn prune_shard(&mut self, i: usize) -> usize {
        self.prune_shard_within(i, MAX_OPEN_REQUESTS / SHARDS)
    }

    /// [`Self::prune_shard`] with a share of `share` requests (tests use a small one).
    pub fn prune_shard_within(&mut self, i: usize, share: usize) -> usize {
        let horizon = self
            .clock
            .and_then(|c| c.checked_sub_signed(self.idempotency));
        let shard = self.open.shard_mut(i);
        let before = shard.len();
        if let Some(horizon) = horizon {
            // An admitted, open request is only ever closed by an event (expiry, release,
            // settlement), so every instance agrees on when its reservation ended.
            shard.retain(|_, o| !(o.seen_at < horizon && o.forgettable()));
        }
        if shard.len() > share {
            forget_oldest_closed(shard, share / 8 * 7);
        }
        shrink_when_sparse(shard, SHRINK_MIN_SHARD_CAPACITY);
        before - shard.len()
    }

    /// [`Self::prune`] spread over calls: the next `shards` shards of the request map (round
    /// robin). A projection following the stream calls it after every batch: a whole pass every
    /// few batches instead of every request of the idempotency window scanned each time.
    /// Returns how many were forgotten.
    pub fn prune_next_shards(&mut self, shards: usize) -> usize {
        let mut forgotten = 0;
        for _ in 0..shards.min(SHARDS) {
            forgotten += self.prune_shard(self.prune_cursor);
            self.prune_cursor = (self.prune_cursor + 1) % SHARDS;
        }
        forgotten
    }

    /// Admitted requests in shard `i` of the request map still holding a reservation whose TTL,
    /// counted on the server's clock from when the admission was received, has run out by `now`:
    /// (request id, admission id, leaf subject). Shard by shard (see [`Self::prune_shard`]), so
    /// the caller can let go of the lock between shards.
    pub fn expired_in_shard(
        &self,
        i: usize,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Vec<(String, Uuid, Option<Subject>)> {
        self.open
            .shard(i)
            .iter()
            .filter(|(_, o)| {
                !o.closed
                    && o.received_at
                        .is_some_and(|r| r.checked_add_signed(ttl).is_none_or(|e| e <= now))
            })
            .filter_map(|(rid, o)| o.admission_id.map(|a| (rid.clone(), a, o.leaf.clone())))
            .collect()
    }

    /// Outstanding reservations in every pool (for tests and metrics): sum over pools.
    pub fn reserved_total(&self) -> i64 {
        self.reserved
            .values()
            .fold(0i64, |a, v| a.saturating_add(*v))
    }

    /// Requests with open state.
    pub fn open_requests(&self) -> usize {
        self.open.len()
    }

    /// Usage entries held over all subjects and slices (for memory accounting).
    pub fn usage_entries(&self) -> usize {
        self.usage
            .values()
            .flat_map(Slices::values)
            .map(Buckets::len)
            .sum()
    }

    /// Compact the usage of up to `max_subjects` subjects to `h` (round-robin over calls, so the
    /// state lock is held briefly however many subjects there are), and forget resets that can no
    /// longer apply to any window from `min_time` on. Returns how many subjects were compacted.
    pub fn compact(&mut self, h: &Horizons, min_time: DateTime<Utc>, max_subjects: usize) -> usize {
        if self.compact_queue.is_empty() {
            self.compact_queue = self.usage.keys().cloned().collect();
            self.prune_resets(min_time);
        }
        let take = self.compact_queue.len().min(max_subjects);
        let batch: Vec<Subject> = self
            .compact_queue
            .split_off(self.compact_queue.len() - take);
        for s in &batch {
            if let Some(slices) = self.usage.get_mut(s) {
                slices.values_mut().for_each(|b| b.compact(h));
            }
        }
        batch.len()
    }

    /// [`Self::compact`] to the horizons ([`super::horizons`]) that keep every window of every
    /// policy exact when evaluated between `at − backfill` and `at`, forgetting resets older
    /// than `at − backfill`. Returns how many subjects were compacted.
    pub fn compact_as_of(
        &mut self,
        at: DateTime<Utc>,
        backfill: chrono::Duration,
        max_subjects: usize,
    ) -> usize {
        let h = super::horizons(&self.config, at, backfill);
        let floor = at.checked_sub_signed(backfill).unwrap_or(at);
        self.compact(&h, floor, max_subjects)
    }

    /// Drop resets whose window ended before `min_time` (calendar, periodic) or whose captured
    /// minutes all left every rolling window evaluated from `min_time` on.
    fn prune_resets(&mut self, min_time: DateTime<Utc>) {
        let min = epoch_minute(min_time);
        let config = &self.config;
        self.resets.retain(|(id, _), r| {
            let Some(p) = config.policy(id) else {
                return false;
            };
            match &p.spec {
                WindowSpec::Rolling { minutes } => r
                    .captured
                    .last()
                    .is_some_and(|(m, _)| m.saturating_add(*minutes) > min),
                WindowSpec::Lifetime => true,
                spec => r
                    .window_start
                    .is_none_or(|s| spec.bounds(s).is_some_and(|b| epoch_minute(b.end) > min)),
            }
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::ReservationEnded;
    use crate::model::Check;

    fn admission(rid: &str, at: DateTime<Utc>) -> Envelope {
        let leaf = Subject::parse("key:k").unwrap();
        Envelope::with_id(at, Some(rid.into()), Some(leaf.clone()), |id| {
            EventData::AdmissionDecided(AdmissionDecided {
                admission_id: id,
                admitted: true,
                reason: None,
                retry_after_seconds: None,
                model: None,
                model_group: None,
                chain: vec![leaf],
                estimate: Usage::default(),
                counted_in_key_global: true,
                counted_in_user_global: true,
                checks: Vec::<Check>::new(),
                received_at: at,
            })
        })
    }

    fn release(rid: &str, a: &Envelope) -> Envelope {
        Envelope::new(
            EventData::ReservationReleased(ReservationEnded { admission_id: a.id }),
            a.occurred_at,
            Some(rid.into()),
            None,
        )
    }

    #[test]
    fn forgetting_keeps_open_reservations_and_respects_the_cap() {
        // Event ids are UUID v7 stamped now, like real events: the stream clock is near now.
        let t0 = Utc::now() - chrono::Duration::minutes(10);
        let mut q = QuotaState::default();
        for i in 0..10 {
            let a = admission(&format!("closed{i}"), t0 + chrono::Duration::seconds(i));
            q.apply(&a);
            q.apply(&release(&format!("closed{i}"), &a));
        }
        q.apply(&admission("open", t0));
        assert_eq!(
            q.prune_to(6),
            5,
            "past the cap the oldest closed requests go first"
        );
        assert!(
            q.is_admitted("open", t0),
            "an open reservation is never forgotten"
        );
        assert!(!q.is_admitted("closed0", t0) && q.is_admitted("closed9", t0));
        assert_eq!(
            q.prune(),
            0,
            "within the window nothing is forgotten by time"
        );
        // The stream clock moving past the window forgets the rest, never the open one.
        q.apply(&admission("later", t0 + chrono::Duration::hours(2)));
        assert_eq!(q.prune(), 5);
        assert_eq!(q.open_requests(), 2);
    }

    /// A state with `n` requests `r0`.. admitted at `at(i)` and released.
    fn closed_requests(n: usize, at: impl Fn(usize) -> DateTime<Utc>) -> QuotaState {
        let mut q = QuotaState::default();
        for i in 0..n {
            let rid = format!("r{i}");
            let a = admission(&rid, at(i));
            q.apply(&a);
            q.apply(&release(&rid, &a));
        }
        q
    }

    #[test]
    fn pruning_shard_by_shard_forgets_what_one_pass_forgets() {
        let t0 = Utc::now() - chrono::Duration::hours(5);
        let n = 4_000;
        let mut q = closed_requests(n, |_| t0);
        q.apply(&admission("later", t0 + chrono::Duration::hours(2)));
        let first = q.prune_next_shards(4);
        assert!(
            first > 0 && first < n / 2,
            "a call forgets about a 16th: {first}"
        );
        let rest: usize = (1..SHARDS / 4).map(|_| q.prune_next_shards(4)).sum();
        assert_eq!(
            first + rest,
            n,
            "a round robin of every shard forgets them all"
        );
        assert_eq!(q.open_requests(), 1);
        assert!(q.is_admitted("later", t0 + chrono::Duration::hours(2)));
        assert_eq!(q.prune_next_shards(SHARDS), 0);
    }

    #[test]
    fn a_shard_past_its_share_forgets_its_oldest_closed_requests_down_to_seven_eighths() {
        let t0 = Utc::now() - chrono::Duration::minutes(10);
        let mut q = closed_requests(64 * 40, |i| t0 + chrono::Duration::milliseconds(i as i64));
        for i in 0..64 {
            q.apply(&admission(&format!("open{i}"), t0));
        }
        let before = q.open_requests();
        let forgotten: usize = (0..SHARDS).map(|i| q.prune_shard_within(i, 32)).sum();
        assert_eq!(q.open_requests(), before - forgotten);
        for i in 0..SHARDS {
            let shard = q.open.shard(i);
            let open = shard.values().filter(|o| !o.forgettable()).count();
            assert!(
                shard.len() <= 32 || shard.len() == open,
                "shard {i}: {}",
                shard.len()
            );
            let oldest_kept = shard
                .values()
                .filter(|o| o.forgettable())
                .map(|o| o.seen_at)
                .min();
            let newest_gone = (0..64 * 40)
                .map(|n| (n, format!("r{n}")))
                .filter(|(_, r)| crate::quota::shard_index(&q.open.pick, r.as_str()) == i)
                .filter(|(_, r)| !shard.contains_key(r))
                .map(|(n, _)| t0 + chrono::Duration::milliseconds(n))
                .max();
            if let (Some(kept), Some(gone)) = (oldest_kept, newest_gone) {
                assert!(gone < kept, "shard {i}: the oldest closed go first");
            }
        }
        for i in 0..64 {
            assert!(
                q.is_admitted(&format!("open{i}"), t0),
                "open requests are never forgotten"
            );
        }
        assert!(forgotten > 0);
    }

    #[test]
    fn a_table_emptied_by_pruning_gives_its_room_back() {
        let t0 = Utc::now() - chrono::Duration::hours(5);
        for (n, shrinks) in [(3_000, false), (150_000, true)] {
            let mut q = closed_requests(n, |_| t0);
            let grown = q.open.capacity();
            assert!(grown >= n);
            q.apply(&admission("later", t0 + chrono::Duration::hours(2)));
            assert_eq!(q.prune(), n);
            if shrinks {
                assert!(q.open.capacity() < 16, "{grown} -> {}", q.open.capacity());
            } else {
                // (capacity() counts deleted slots as used, so it reads lower than the table.)
                assert!(
                    q.open.capacity() > 1_000,
                    "shards of up to 1024 slots are kept"
                );
            }
            assert!(q.is_admitted("later", t0 + chrono::Duration::hours(2)));
        }
    }
}

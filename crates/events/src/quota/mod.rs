//! Quota semantics (SPEC §3–§5) as pure code: the configuration fold, usage buckets, pools and
//! reservations, credits, and the admission decision. The API holds a [`QuotaState`] in memory;
//! replaying the ledger through [`QuotaState::apply`] rebuilds the same state.

mod bounded;
mod buckets;
mod compact;
mod config;
mod credits;
mod decide;
mod sharded;
mod snapshot;
mod state;

pub use bounded::Bounded;
pub use buckets::{Buckets, DAY, HOUR, Horizons, SPARSE_MAX, epoch_minute, minute_instant};
pub use compact::{Grain, HOUR_FLOOR_MINUTES, MINUTE_FLOOR_MINUTES, horizons, reach_and_grain};
pub use config::{
    Config, MAX_CHAIN_DEPTH, MAX_GROUPS_PER_SUBJECT, MAX_MODELS_PER_GROUP,
    MAX_POLICIES_PER_SUBJECT, ParentConflict, PolicyConf, SubjectConf,
};
pub use credits::{Account, last_refill_at, next_refill_after};
pub use decide::{AdmitRequest, Decision, PoolTotals, Resolved, UnknownSubjects};
pub use sharded::{SHARDS, Sharded, shard_index};
pub use snapshot::{SNAPSHOT_FORMAT, SnapshotMeta};
pub use state::{
    CREDITS_CHECK, CreditAnswer, DEFAULT_IDEMPOTENCY_MINUTES, MAX_ALERTED, MAX_APPLIED_IDS,
    MAX_CREDIT_WRITE_IDS, MAX_OPEN_REQUESTS, PoolKey, QuotaState, Reset, SliceKey, oldest_first,
};

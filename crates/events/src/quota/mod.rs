//! Quota semantics (SPEC §3–§5) as pure code: the configuration fold, usage buckets, pools and
//! reservations, credits, and the admission decision. The API holds a [`QuotaState`] in memory;
//! replaying the ledger through [`QuotaState::apply`] rebuilds the same state.

mod buckets;
mod config;
mod credits;
mod decide;
mod state;

pub use buckets::{Buckets, epoch_minute, minute_instant};
pub use config::{
    Config, MAX_CHAIN_DEPTH, MAX_GROUPS_PER_SUBJECT, MAX_MODELS_PER_GROUP, PolicyConf, SubjectConf,
};
pub use credits::{Account, last_refill_at, next_refill_after};
pub use decide::{AdmitRequest, Decision, Resolved, UnknownSubjects};
pub use state::{CREDITS_CHECK, MAX_OPEN_REQUESTS, PoolKey, QuotaState, Reset, SliceKey};

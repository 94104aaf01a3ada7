//! Tally's pure core: the event envelope and every event type of SPEC §2, subject names,
//! amounts, the partition function, and the request fold shared by the API and projections.
//!
//! Nothing in this crate does IO. Everything that changes a number is an [`Envelope`] whose
//! `data` is one of the [`EventData`] variants; decoding rejects unknown types, unknown fields,
//! newer schema versions and invalid values with an [`Error`] that names the field.

mod envelope;
mod error;
mod ledger_facts;
mod model;
mod partition;
pub mod quota;
mod request;
pub mod rules;
mod usage;
mod validate;
pub mod window;
mod wire;

pub use envelope::*;
pub use error::{Error, SnapshotError};
pub use ledger_facts::LedgerFacts;
pub use model::*;
pub use partition::{DEFAULT_PARTITIONS, MAX_PARTITIONS, partition_of};
pub use request::{MAX_SETTLEMENTS_PER_REQUEST, RequestState, RequestView, Settlement};
pub use usage::{
    DailyTotals, DayKey, UsageKey, UsageTotals, day_of, fold_daily, fold_usage, minute_of,
};
pub use window::epoch_minute;

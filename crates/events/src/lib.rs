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
mod usage;
mod validate;
pub mod window;

pub use envelope::*;
pub use error::Error;
pub use ledger_facts::LedgerFacts;
pub use model::*;
pub use partition::{DEFAULT_PARTITIONS, MAX_PARTITIONS, partition_of};
pub use request::{RequestState, RequestView, Settlement};
pub use usage::{UsageKey, UsageTotals, fold_usage, minute_of};
pub use validate::validate_window;

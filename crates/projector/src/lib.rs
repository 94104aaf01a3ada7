//! Projections: pure folds over ledger rows, materialized in Postgres.
//!
//! A projection is a name, a pure fold (in `tally-events`) and the SQL that applies the folded
//! batch. The [`runner`] tails the ledger in commit order (`ledger.pos`) and writes each batch's
//! rows together with the projection's checkpoint in one transaction, so a projection can be
//! dropped and rebuilt, or a new one added, without touching the others.

pub mod claims;
pub mod daily_usage;
pub mod error;
pub mod quota;
mod quota_rows;
pub mod rebuild;
pub mod registry;
pub mod runner;
pub mod tables;
pub mod usage;

pub use error::Error;
pub use quota::{QuotaProjection, QuotaSettings};
pub use runner::{Order, Projection, Projector, ProjectorStats};
pub use tables::Tables;
pub use usage::{Granularity, UsageProjection, UsageSeries, usage_series};

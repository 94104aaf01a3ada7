//! What a projection claims about the ledger, for `tally audit` (SPEC v2 §8): the totals it
//! shows, in a shape the audit can recompute from the ledger independently.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use chrono::NaiveDate;
use chrono_tz::Tz;
use tally_events::Usage;

use crate::Error;

pub use tally_events::DayKey;

/// A pool in one window: policy, pool subject, window start (None for lifetime windows).
pub type PoolKey = (String, String, Option<chrono::DateTime<chrono::Utc>>);

/// Inclusive range of days the audit looks at (None: all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayRange {
    /// First day.
    pub from: Option<NaiveDate>,
    /// Last day.
    pub to: Option<NaiveDate>,
}

impl DayRange {
    /// Whether `d` is in the range.
    pub fn contains(&self, d: NaiveDate) -> bool {
        self.from.is_none_or(|f| d >= f) && self.to.is_none_or(|t| d <= t)
    }
}

/// One claim of one table.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// Settled usage per chain subject × model × day, days in `tz`, by the event's window time.
    UsageByDay {
        /// The table the claim was read from.
        table: String,
        /// The time zone of its days.
        tz: Tz,
        /// Totals.
        rows: BTreeMap<DayKey, Usage>,
    },
    /// Settled `used` of pools in calendar, periodic and lifetime windows.
    PoolUsed {
        /// The table the claim was read from.
        table: String,
        /// Totals.
        rows: BTreeMap<PoolKey, i64>,
    },
}

/// Boxed future of [`crate::Projection::claims`].
pub type ClaimsFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Claim>, Error>> + Send + 'a>>;

//! The columns a ledger row derives from its event: one pure mapping, used by the ledger writer.

use chrono::{DateTime, Utc};

use crate::envelope::{Envelope, EventData};
use crate::model::Usage;

/// What the ledger stores beside the raw payload (SPEC §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerFacts {
    /// The time that decides windows: the admission's time for a request's usage.
    pub window_at: DateTime<Utc>,
    /// Leaf first, root last; just the subject for configuration events.
    pub chain: Vec<String>,
    /// Model, when the event concerns one.
    pub model: Option<String>,
    /// Model group, when the event concerns one.
    pub model_group: Option<String>,
    /// Amounts: the estimate of an admission, the usage of a settlement, the credits of an
    /// adjustment, zero otherwise. The event type says which.
    pub amounts: Usage,
    /// Frozen at admission and copied to every row of the request.
    pub counted_in_key_global: bool,
    /// Frozen at admission and copied to every row of the request.
    pub counted_in_user_global: bool,
    /// The admission the event belongs to (an admission's own id; a settlement's, release's or
    /// expiry's admission). Part of a settlement's identity.
    pub admission_id: Option<uuid::Uuid>,
}

impl LedgerFacts {
    /// Derive the row's columns from a validated event.
    pub fn of(env: &Envelope) -> LedgerFacts {
        let mut facts = LedgerFacts {
            window_at: env.occurred_at,
            chain: env.subject.iter().map(|s| s.as_str().to_owned()).collect(),
            model: None,
            model_group: None,
            amounts: Usage::default(),
            counted_in_key_global: true,
            counted_in_user_global: true,
            admission_id: None,
        };
        match &env.data {
            EventData::AdmissionDecided(d) => {
                facts.chain = d.chain.iter().map(|s| s.as_str().to_owned()).collect();
                facts.model = d.model.clone();
                facts.model_group = d.model_group.clone();
                facts.amounts = d.estimate;
                facts.counted_in_key_global = d.counted_in_key_global;
                facts.counted_in_user_global = d.counted_in_user_global;
                facts.admission_id = Some(d.admission_id);
            }
            EventData::ReservationReleased(d) | EventData::ReservationExpired(d) => {
                facts.admission_id = Some(d.admission_id);
            }
            EventData::UsageSettled(d) => {
                facts.window_at = d.window_at;
                facts.chain = d.chain.iter().map(|s| s.as_str().to_owned()).collect();
                facts.model = d.model.clone();
                facts.model_group = d.model_group.clone();
                facts.amounts = d.usage;
                facts.counted_in_key_global = d.counted_in_key_global;
                facts.counted_in_user_global = d.counted_in_user_global;
                facts.admission_id = d.admission_id;
            }
            EventData::CreditsAdjusted(d) => facts.amounts.credits = d.amount,
            _ => {}
        }
        facts
    }
}

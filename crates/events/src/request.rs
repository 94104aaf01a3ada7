//! The request fold: what one request's events add up to. Used by the API's in-memory request
//! table (live) and by `GET /v1/requests/{id}` over ledger rows (replay), so both agree.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::envelope::{AdmissionDecided, Envelope, EventData};
use crate::model::{Subject, Usage};

/// Lifecycle of a request (SPEC §6 `GET /v1/requests/{id}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Only settlements without admission so far (direct usage), not final.
    Open,
    /// Admitted and holding its reservation.
    Reserved,
    /// Refused at admission.
    Rejected,
    /// A final settlement arrived.
    Settled,
    /// Released (refund) before a final settlement.
    Released,
    /// The reservation expired before a final settlement.
    Expired,
}

/// One counted settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Settlement {
    /// Event id.
    pub event_id: Uuid,
    /// The admission it settles (None for direct usage).
    pub admission_id: Option<Uuid>,
    /// Dedupe key.
    pub settlement_id: String,
    /// Chunk sequence.
    pub seq: u32,
    /// Usage added.
    pub usage: Usage,
    /// Whether it closed the request.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Success flag.
    pub success: bool,
    /// Event time.
    pub occurred_at: DateTime<Utc>,
}

/// Everything known about one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestView {
    /// The request id.
    pub request_id: String,
    /// Leaf subject.
    pub subject: Option<Subject>,
    /// Event time of the admission (decides windows).
    pub admitted_at: Option<DateTime<Utc>>,
    /// The admission event's data.
    pub admission: Option<AdmissionDecided>,
    /// Counted settlements, in stream order, each settlement id once.
    pub settlements: Vec<Settlement>,
    /// Sum of the settlements' usage.
    pub settled: Usage,
    /// Lifecycle state.
    pub state: RequestState,
    /// How long the request id names this request (a later decision is a new request).
    #[serde(skip)]
    pub idempotency: chrono::Duration,
}

/// Most settlements one request may carry: a long stream settles in chunks, but a request with
/// more than this many chunks is a client bug we refuse rather than store without bound.
pub const MAX_SETTLEMENTS_PER_REQUEST: usize = 4096;

impl RequestView {
    /// An empty view.
    pub fn new(request_id: impl Into<String>) -> Self {
        RequestView {
            request_id: request_id.into(),
            subject: None,
            admitted_at: None,
            admission: None,
            settlements: Vec::new(),
            settled: Usage::default(),
            state: RequestState::Open,
            idempotency: chrono::Duration::minutes(crate::quota::DEFAULT_IDEMPOTENCY_MINUTES),
        }
    }

    /// The same view with another idempotency window (twice the reservation TTL).
    pub fn with_idempotency(mut self, d: chrono::Duration) -> Self {
        self.idempotency = d;
        self
    }

    /// Whether a settlement with this id was already counted for the current decision (the
    /// identity of a settlement is its admission and its settlement id).
    pub fn has_settlement(&self, settlement_id: &str) -> bool {
        let current = self.admission.as_ref().map(|a| a.admission_id);
        self.settlements
            .iter()
            .any(|s| s.settlement_id == settlement_id && s.admission_id == current)
    }

    /// Whether the request is finished (no more reservation held).
    pub fn is_closed(&self) -> bool {
        !matches!(self.state, RequestState::Open | RequestState::Reserved)
    }

    /// Fold one event of this request into the view. Idempotent: an event seen twice (same
    /// admission, same settlement id) changes nothing.
    pub fn apply(&mut self, env: &Envelope) {
        match &env.data {
            EventData::AdmissionDecided(d) => {
                if let Some(first) = &self.admission {
                    // The first decision stands within the idempotency window; past it the id
                    // names a new request (the same rule as the quota fold).
                    let fresh = first
                        .received_at
                        .checked_add_signed(self.idempotency)
                        .is_some_and(|end| d.received_at >= end);
                    if first.admission_id == d.admission_id || !fresh {
                        return;
                    }
                    *self = RequestView::new(self.request_id.clone())
                        .with_idempotency(self.idempotency);
                }
                self.subject = env.subject.clone();
                self.admitted_at = Some(env.occurred_at);
                self.admission = Some(d.clone());
                if self.state == RequestState::Open {
                    self.state = if d.admitted {
                        RequestState::Reserved
                    } else {
                        RequestState::Rejected
                    };
                }
            }
            EventData::UsageSettled(d) => self.apply_settlement(env, d),
            EventData::ReservationReleased(_) if !self.is_closed() => {
                self.state = RequestState::Released
            }
            EventData::ReservationExpired(_) if self.state == RequestState::Reserved => {
                self.state = RequestState::Expired
            }
            _ => {}
        }
    }

    fn apply_settlement(&mut self, env: &Envelope, d: &crate::envelope::UsageSettled) {
        let current = self.admission.as_ref().map(|a| a.admission_id);
        if d.admission_id.is_some() && current.is_some() && d.admission_id != current {
            return; // another decision of the same id: not this request's
        }
        let seen = self
            .settlements
            .iter()
            .any(|s| s.settlement_id == d.settlement_id && s.admission_id == d.admission_id);
        if seen || self.settlements.len() >= MAX_SETTLEMENTS_PER_REQUEST {
            return;
        }
        if self.subject.is_none() {
            self.subject = env.subject.clone();
        }
        self.settled = self.settled.plus(&d.usage);
        self.settlements.push(Settlement {
            event_id: env.id,
            admission_id: d.admission_id,
            settlement_id: d.settlement_id.clone(),
            seq: d.seq,
            usage: d.usage,
            is_final: d.is_final,
            success: d.success,
            occurred_at: env.occurred_at,
        });
        if d.is_final {
            let refund = !d.success && self.settled.is_zero();
            self.state = if refund {
                RequestState::Released
            } else {
                RequestState::Settled
            };
        }
    }
}

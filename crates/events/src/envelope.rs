//! The envelope (SPEC §2), every event type, and strict decoding.

use chrono::{DateTime, Utc};
use serde::de::DeserializeSeed;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Error;
use crate::model::*;
use crate::wire::DataSeed;

/// Newest schema version this build writes and reads. Readers upgrade older versions.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest encoded event we accept: an admission with [`crate::rules::MAX_CHECKS`] checks fits
/// (about 300 bytes each), and the bound keeps one poisoned message from exhausting memory in
/// every consumer. Below the stream's message limit.
pub const MAX_EVENT_BYTES: usize = 512 * 1024;

/// Every event type of SPEC §2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `admission.decided`
    AdmissionDecided,
    /// `usage.settled`
    UsageSettled,
    /// `reservation.released`
    ReservationReleased,
    /// `reservation.expired`
    ReservationExpired,
    /// `subject.upserted`
    SubjectUpserted,
    /// `subject.deleted` (SPEC v2 §6: a retired subject takes its policies, grants and credit
    /// balance with it, in one event)
    SubjectDeleted,
    /// `model_group.upserted`
    ModelGroupUpserted,
    /// `model_group.deleted`
    ModelGroupDeleted,
    /// `policy.upserted`
    PolicyUpserted,
    /// `policy.deleted`
    PolicyDeleted,
    /// `window.reset`
    WindowReset,
    /// `grant.issued`
    GrantIssued,
    /// `grant.revoked`
    GrantRevoked,
    /// `credits.adjusted`
    CreditsAdjusted,
    /// `threshold.crossed`
    ThresholdCrossed,
}

const ALL_TYPES: [(EventType, &str); 15] = [
    (EventType::AdmissionDecided, "admission.decided"),
    (EventType::UsageSettled, "usage.settled"),
    (EventType::ReservationReleased, "reservation.released"),
    (EventType::ReservationExpired, "reservation.expired"),
    (EventType::SubjectUpserted, "subject.upserted"),
    (EventType::SubjectDeleted, "subject.deleted"),
    (EventType::ModelGroupUpserted, "model_group.upserted"),
    (EventType::ModelGroupDeleted, "model_group.deleted"),
    (EventType::PolicyUpserted, "policy.upserted"),
    (EventType::PolicyDeleted, "policy.deleted"),
    (EventType::WindowReset, "window.reset"),
    (EventType::GrantIssued, "grant.issued"),
    (EventType::GrantRevoked, "grant.revoked"),
    (EventType::CreditsAdjusted, "credits.adjusted"),
    (EventType::ThresholdCrossed, "threshold.crossed"),
];

impl EventType {
    /// The wire name, e.g. `admission.decided`.
    pub fn as_str(self) -> &'static str {
        ALL_TYPES
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, s)| *s)
            .expect("every type is listed")
    }

    /// Parse a wire name.
    pub fn parse(name: &str) -> Option<EventType> {
        ALL_TYPES.iter().find(|(_, s)| *s == name).map(|(t, _)| *t)
    }

    /// Request-path events go to partitioned usage subjects; the rest are configuration.
    pub fn is_usage(self) -> bool {
        matches!(
            self,
            EventType::AdmissionDecided
                | EventType::UsageSettled
                | EventType::ReservationReleased
                | EventType::ReservationExpired
                | EventType::ThresholdCrossed
        )
    }

    /// Every type, in a fixed order.
    pub fn all() -> impl Iterator<Item = EventType> {
        ALL_TYPES.iter().map(|(t, _)| *t)
    }
}

/// `admission.decided`: the decision, the checks and the frozen counted flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionDecided {
    /// Id of this admission (the event id).
    pub admission_id: Uuid,
    /// Whether the request may go ahead.
    pub admitted: bool,
    /// Why not, when not.
    pub reason: Option<Reason>,
    /// Seconds until a retry could pass, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<i64>,
    /// Model named by the request.
    pub model: Option<String>,
    /// The model's model group at admission time.
    pub model_group: Option<String>,
    /// Leaf first, root last.
    pub chain: Vec<Subject>,
    /// Reserved amounts.
    pub estimate: Usage,
    /// Counted in the key's global (non-model-group) spend policies.
    pub counted_in_key_global: bool,
    /// Counted in the user's global spend policies.
    pub counted_in_user_global: bool,
    /// Every check decided.
    pub checks: Vec<Check>,
    /// Server clock when the admission was received: the reservation TTL counts from here.
    pub received_at: DateTime<Utc>,
}

/// `usage.settled`: actual usage of a request (or direct usage without admission).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSettled {
    /// Dedupe key of this settlement within the request.
    pub settlement_id: String,
    /// Actual usage this settlement adds.
    pub usage: Usage,
    /// False with zero usage means a refund.
    pub success: bool,
    /// False for a streaming chunk.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Client sequence number of the chunk.
    pub seq: u32,
    /// Whether an admission was found for the request.
    pub matched_admission: bool,
    /// The matched admission.
    pub admission_id: Option<Uuid>,
    /// Model.
    pub model: Option<String>,
    /// Model group.
    pub model_group: Option<String>,
    /// Leaf first, root last.
    pub chain: Vec<Subject>,
    /// Copied from the admission (or computed now for direct usage).
    pub counted_in_key_global: bool,
    /// Copied from the admission (or computed now for direct usage).
    pub counted_in_user_global: bool,
    /// The time that decides the windows: the admission's, or this event's for direct usage.
    pub window_at: DateTime<Utc>,
}

/// `reservation.released` / `reservation.expired`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationEnded {
    /// The admission whose reservation ends.
    pub admission_id: Uuid,
}

/// `subject.upserted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectUpserted {
    /// Parent in the chain.
    pub parent: Option<Subject>,
    /// Group labels.
    pub groups: Vec<String>,
    /// Disabled by an operator.
    pub disabled: bool,
}

/// `subject.deleted`: the envelope's `subject` is retired. No fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectDeleted {}

/// `model_group.upserted` / `model_group.deleted` (`models` empty on delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelGroupChanged {
    /// Group name.
    pub name: String,
    /// Member models.
    #[serde(default)]
    pub models: Vec<String>,
}

/// `policy.upserted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpserted {
    /// Policy id.
    pub policy_id: String,
    /// Subject or `group:<name>`.
    pub subject: Subject,
    /// Model group scope.
    pub model_group: Option<String>,
    /// Metric.
    pub metric: Metric,
    /// Limit, > 0.
    pub limit: i64,
    /// Window.
    pub window: Window,
    /// Boundary mode.
    pub boundary: Boundary,
    /// Exhaustion action.
    pub on_exhausted: OnExhausted,
    /// Whether it applies.
    pub enabled: bool,
}

/// `policy.deleted` / `grant.revoked`: an id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdOnly {
    /// The policy or grant id.
    pub id: String,
}

/// `window.reset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowReset {
    /// Policy.
    pub policy_id: String,
    /// Pool subject.
    pub subject: Subject,
    /// Reset instant: usage at or before it no longer counts in its window.
    pub at: DateTime<Utc>,
}

/// `grant.issued`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantIssued {
    /// Grant id.
    pub grant_id: String,
    /// Subject.
    pub subject: Subject,
    /// Model group scope.
    pub model_group: Option<String>,
    /// Metric raised.
    pub metric: Metric,
    /// Amount added to matching limits.
    pub amount: i64,
    /// Only policies with this window kind, when set.
    pub window_kind: Option<String>,
    /// Start.
    pub starts_at: DateTime<Utc>,
    /// End (exclusive).
    pub expires_at: DateTime<Utc>,
}

/// `credits.adjusted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsAdjusted {
    /// The client's idempotency key: a second write with the same id changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Operation.
    pub op: CreditOp,
    /// Amount, >= 0.
    pub amount: i64,
    /// Refill schedule (replaces the previous one).
    pub refill: Option<Refill>,
}

/// `threshold.crossed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdCrossed {
    /// Policy.
    pub policy_id: String,
    /// Pool subject.
    pub subject: Subject,
    /// Window crossed in.
    pub window: Option<WindowBounds>,
    /// Limit.
    pub limit: i64,
    /// Usage when crossed.
    pub used: i64,
}

/// The typed `data` of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventData {
    /// `admission.decided`
    AdmissionDecided(AdmissionDecided),
    /// `usage.settled`
    UsageSettled(UsageSettled),
    /// `reservation.released`
    ReservationReleased(ReservationEnded),
    /// `reservation.expired`
    ReservationExpired(ReservationEnded),
    /// `subject.upserted`
    SubjectUpserted(SubjectUpserted),
    /// `subject.deleted`
    SubjectDeleted(SubjectDeleted),
    /// `model_group.upserted`
    ModelGroupUpserted(ModelGroupChanged),
    /// `model_group.deleted`
    ModelGroupDeleted(ModelGroupChanged),
    /// `policy.upserted`
    PolicyUpserted(PolicyUpserted),
    /// `policy.deleted`
    PolicyDeleted(IdOnly),
    /// `window.reset`
    WindowReset(WindowReset),
    /// `grant.issued`
    GrantIssued(GrantIssued),
    /// `grant.revoked`
    GrantRevoked(IdOnly),
    /// `credits.adjusted`
    CreditsAdjusted(CreditsAdjusted),
    /// `threshold.crossed`
    ThresholdCrossed(ThresholdCrossed),
}

/// An event: envelope fields plus typed data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// UUID v7; also the `Nats-Msg-Id`.
    pub id: Uuid,
    /// Schema version the event was written with.
    pub schema: u32,
    /// Event time: the time windows are evaluated at.
    pub occurred_at: DateTime<Utc>,
    /// The request the event concerns.
    pub request_id: Option<String>,
    /// The leaf subject, when there is one.
    pub subject: Option<Subject>,
    /// Typed payload.
    pub data: EventData,
}

/// The envelope as written: borrowed from the [`Envelope`], `data` serialized from its struct.
#[derive(Serialize)]
struct RawOut<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: &'static str,
    schema: u32,
    occurred_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a Subject>,
    data: &'a EventData,
}

fn malformed(e: serde_path_to_error::Error<serde_json::Error>, prefix: &str) -> Error {
    let path = e.path().to_string();
    let field = match (prefix, path.as_str()) {
        (_, ".") | (_, "") | (_, "?") => None,
        ("", p) => Some(p.to_owned()),
        (pre, p) => Some(format!("{pre}.{p}")),
    };
    Error::Malformed {
        field,
        message: e.into_inner().to_string(),
    }
}

/// The envelope as read: everything but `data`, which is kept as its raw JSON text (a validated
/// slice of the input, no allocation) until the type is known, whatever order the keys come in
/// (rows written while the ledger kept `jsonb` have `data` before `type`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIn<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: String,
    schema: u32,
    occurred_at: DateTime<Utc>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    subject: Option<Subject>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

impl EventData {
    /// The event type of this payload.
    pub fn event_type(&self) -> EventType {
        use EventData as D;
        match self {
            D::AdmissionDecided(_) => EventType::AdmissionDecided,
            D::UsageSettled(_) => EventType::UsageSettled,
            D::ReservationReleased(_) => EventType::ReservationReleased,
            D::ReservationExpired(_) => EventType::ReservationExpired,
            D::SubjectUpserted(_) => EventType::SubjectUpserted,
            D::SubjectDeleted(_) => EventType::SubjectDeleted,
            D::ModelGroupUpserted(_) => EventType::ModelGroupUpserted,
            D::ModelGroupDeleted(_) => EventType::ModelGroupDeleted,
            D::PolicyUpserted(_) => EventType::PolicyUpserted,
            D::PolicyDeleted(_) => EventType::PolicyDeleted,
            D::WindowReset(_) => EventType::WindowReset,
            D::GrantIssued(_) => EventType::GrantIssued,
            D::GrantRevoked(_) => EventType::GrantRevoked,
            D::CreditsAdjusted(_) => EventType::CreditsAdjusted,
            D::ThresholdCrossed(_) => EventType::ThresholdCrossed,
        }
    }

    /// The typed data of type `t` from its JSON text; a failure names the field under `data`.
    fn decode(t: EventType, v: &str) -> Result<EventData, Error> {
        // Fast path: almost every event decodes, and tracking the path of every value costs a
        // tenth of a replay's CPU; the path of a failure is worked out by decoding again.
        if let Ok(d) = DataSeed(t).deserialize(&mut serde_json::Deserializer::from_str(v)) {
            return Ok(d);
        }
        let mut track = serde_path_to_error::Track::new();
        let mut de = serde_json::Deserializer::from_str(v);
        DataSeed(t)
            .deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
            .map_err(|e| malformed(serde_path_to_error::Error::new(track.path(), e), "data"))
    }
}

/// An event's data serialized straight from its typed struct: no `serde_json::Value` between
/// (building one cost a tree of maps and strings per published event, on the admit path). Keys
/// come in each struct's field order; readers accept any order.
impl Serialize for EventData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use EventData as D;
        match self {
            D::AdmissionDecided(d) => d.serialize(s),
            D::UsageSettled(d) => d.serialize(s),
            D::ReservationReleased(d) | D::ReservationExpired(d) => d.serialize(s),
            D::SubjectUpserted(d) => d.serialize(s),
            D::SubjectDeleted(d) => d.serialize(s),
            D::ModelGroupUpserted(d) | D::ModelGroupDeleted(d) => d.serialize(s),
            D::PolicyUpserted(d) => d.serialize(s),
            D::PolicyDeleted(d) | D::GrantRevoked(d) => d.serialize(s),
            D::WindowReset(d) => d.serialize(s),
            D::GrantIssued(d) => d.serialize(s),
            D::CreditsAdjusted(d) => d.serialize(s),
            D::ThresholdCrossed(d) => d.serialize(s),
        }
    }
}

impl Envelope {
    /// A new event with a fresh UUID v7 id and the current schema.
    pub fn new(
        data: EventData,
        occurred_at: DateTime<Utc>,
        request_id: Option<String>,
        subject: Option<Subject>,
    ) -> Self {
        Envelope {
            id: Uuid::now_v7(),
            schema: SCHEMA_VERSION,
            occurred_at,
            request_id,
            subject,
            data,
        }
    }

    /// A new event whose data needs the event id (an admission's `admission_id` is its event id).
    pub fn with_id(
        occurred_at: DateTime<Utc>,
        request_id: Option<String>,
        subject: Option<Subject>,
        make: impl FnOnce(Uuid) -> EventData,
    ) -> Self {
        let id = Uuid::now_v7();
        Envelope {
            id,
            schema: SCHEMA_VERSION,
            occurred_at,
            request_id,
            subject,
            data: make(id),
        }
    }

    /// The event's type.
    pub fn event_type(&self) -> EventType {
        self.data.event_type()
    }

    /// JSON bytes of the envelope.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawOut {
            id: self.id,
            event_type: self.event_type().as_str(),
            schema: self.schema,
            occurred_at: self.occurred_at,
            request_id: self.request_id.as_deref(),
            subject: self.subject.as_ref(),
            data: &self.data,
        };
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        serde_json::to_writer(&mut out, &raw).expect("envelope always serializes");
        out
    }

    /// Room for the encoded envelope, so encoding allocates once instead of growing from 128
    /// bytes by doubling: the envelope and the data of most events fit in 768 bytes (a
    /// settlement is ~620), and an admission adds ~250 per check.
    fn encoded_len_hint(&self) -> usize {
        const BASE_BYTES: usize = 768;
        const CHECK_BYTES: usize = 256;
        let checks = match &self.data {
            EventData::AdmissionDecided(d) => d.checks.len(),
            _ => 0,
        };
        BASE_BYTES + checks.min(crate::rules::MAX_CHECKS) * CHECK_BYTES
    }

    /// Decode and validate: unknown types, unknown fields, unsupported schemas, bad values and
    /// oversized payloads are errors.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, Error> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(Error::invalid(
                "",
                format!("event of {} bytes exceeds {MAX_EVENT_BYTES}", bytes.len()),
            ));
        }
        // Fast path: one scan, no path tracking (see `wire`); anything it does not accept is
        // decoded again by the general reader, whose error names the field.
        let env = match crate::wire::one_pass(bytes) {
            Some(env) => env,
            None => Self::decode_general(bytes)?,
        };
        env.validate()?;
        Ok(env)
    }

    /// The general reader: `data` kept as raw text until the type is known, then typed; a
    /// failure names the field (with the path of the value that failed).
    pub(crate) fn decode_general(bytes: &[u8]) -> Result<Envelope, Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let raw: RawIn<'_> =
            serde_path_to_error::deserialize(&mut de).map_err(|e| malformed(e, ""))?;
        de.end().map_err(|e| Error::Malformed {
            field: None,
            message: e.to_string(),
        })?;
        if raw.schema == 0 || raw.schema > SCHEMA_VERSION {
            return Err(Error::UnsupportedSchema(raw.schema));
        }
        let t = EventType::parse(&raw.event_type)
            .ok_or_else(|| Error::UnknownType(raw.event_type.clone()))?;
        Ok(Envelope {
            id: raw.id,
            schema: raw.schema,
            occurred_at: raw.occurred_at,
            request_id: raw.request_id,
            subject: raw.subject,
            data: EventData::decode(t, raw.data.get())?,
        })
    }
}

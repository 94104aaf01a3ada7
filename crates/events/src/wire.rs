//! Reading an envelope's JSON in one pass.
//!
//! An event's `data` can only be typed once its `type` is known. The general reader
//! (`Envelope::decode`'s slow path) keeps `data` as raw text and parses it a second time; every
//! event Tally publishes has `type` before `data`, so this reader types `data` as it reaches it
//! and scans each payload once (the extra scan was ~7 % of decoding an admission, and every
//! event is decoded by each API instance, the ledger writer and every projection). It falls back
//! to raw text when `data` does come first (ledger rows written while the ledger kept `jsonb`).
//!
//! It never reports errors: on anything it does not accept, the caller decodes again with the
//! slow path, which names the failing field. So it must accept nothing the slow path rejects.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::envelope::{Envelope, EventData, EventType, SCHEMA_VERSION};
use crate::model::Subject;

/// The typed data of one event type, deserialized from whatever deserializer holds it.
pub(crate) struct DataSeed(pub(crate) EventType);

impl<'de> DeserializeSeed<'de> for DataSeed {
    type Value = EventData;

    fn deserialize<De: de::Deserializer<'de>>(self, d: De) -> Result<EventData, De::Error> {
        use EventData as D;
        use EventType as T;
        Ok(match self.0 {
            T::AdmissionDecided => D::AdmissionDecided(Deserialize::deserialize(d)?),
            T::UsageSettled => D::UsageSettled(Deserialize::deserialize(d)?),
            T::ReservationReleased => D::ReservationReleased(Deserialize::deserialize(d)?),
            T::ReservationExpired => D::ReservationExpired(Deserialize::deserialize(d)?),
            T::SubjectUpserted => D::SubjectUpserted(Deserialize::deserialize(d)?),
            T::SubjectDeleted => D::SubjectDeleted(Deserialize::deserialize(d)?),
            T::ModelGroupUpserted => D::ModelGroupUpserted(Deserialize::deserialize(d)?),
            T::ModelGroupDeleted => D::ModelGroupDeleted(Deserialize::deserialize(d)?),
            T::PolicyUpserted => D::PolicyUpserted(Deserialize::deserialize(d)?),
            T::PolicyDeleted => D::PolicyDeleted(Deserialize::deserialize(d)?),
            T::WindowReset => D::WindowReset(Deserialize::deserialize(d)?),
            T::GrantIssued => D::GrantIssued(Deserialize::deserialize(d)?),
            T::GrantRevoked => D::GrantRevoked(Deserialize::deserialize(d)?),
            T::CreditsAdjusted => D::CreditsAdjusted(Deserialize::deserialize(d)?),
            T::ThresholdCrossed => D::ThresholdCrossed(Deserialize::deserialize(d)?),
        })
    }
}

/// The envelope's keys; any other is refused (as the slow path's `deny_unknown_fields`).
enum Key {
    Id,
    Type,
    Schema,
    OccurredAt,
    RequestId,
    Subject,
    Data,
}

const KEYS: &[&str] = &[
    "id",
    "type",
    "schema",
    "occurred_at",
    "request_id",
    "subject",
    "data",
];

impl<'de> Deserialize<'de> for Key {
    fn deserialize<De: de::Deserializer<'de>>(d: De) -> Result<Key, De::Error> {
        d.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an envelope key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "id" => Key::Id,
            "type" => Key::Type,
            "schema" => Key::Schema,
            "occurred_at" => Key::OccurredAt,
            "request_id" => Key::RequestId,
            "subject" => Key::Subject,
            "data" => Key::Data,
            other => return Err(E::unknown_field(other, KEYS)),
        })
    }
}

/// The envelope's fields as they arrive; each at most once.
#[derive(Default)]
struct Fields<'de> {
    id: Option<Uuid>,
    event_type: Option<EventType>,
    schema: Option<u32>,
    occurred_at: Option<DateTime<Utc>>,
    request_id: Option<Option<String>>,
    subject: Option<Option<Subject>>,
    data: Option<EventData>,
    raw_data: Option<&'de RawValue>,
}

fn put<T, E: de::Error>(slot: &mut Option<T>, value: T, key: &'static str) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(key));
    }
    *slot = Some(value);
    Ok(())
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event envelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Id => put(&mut f.id, map.next_value()?, "id")?,
                Key::Type => {
                    let name: &str = map.next_value()?;
                    let t = EventType::parse(name)
                        .ok_or_else(|| de::Error::custom("unknown event type"))?;
                    put(&mut f.event_type, t, "type")?;
                }
                Key::Schema => put(&mut f.schema, map.next_value()?, "schema")?,
                Key::OccurredAt => put(&mut f.occurred_at, map.next_value()?, "occurred_at")?,
                Key::RequestId => put(&mut f.request_id, map.next_value()?, "request_id")?,
                Key::Subject => put(&mut f.subject, map.next_value()?, "subject")?,
                Key::Data => {
                    if f.data.is_some() || f.raw_data.is_some() {
                        return Err(de::Error::duplicate_field("data"));
                    }
                    match f.event_type {
                        Some(t) => f.data = Some(map.next_value_seed(DataSeed(t))?),
                        None => f.raw_data = Some(map.next_value()?),
                    }
                }
            }
        }
        assemble(f)
    }
}

fn assemble<E: de::Error>(f: Fields<'_>) -> Result<Envelope, E> {
    let t = f.event_type.ok_or_else(|| E::missing_field("type"))?;
    let schema = f.schema.ok_or_else(|| E::missing_field("schema"))?;
    if schema == 0 || schema > SCHEMA_VERSION {
        return Err(E::custom("unsupported schema"));
    }
    let data = match (f.data, f.raw_data) {
        (Some(data), _) => data,
        (None, Some(raw)) => DataSeed(t)
            .deserialize(&mut serde_json::Deserializer::from_str(raw.get()))
            .map_err(E::custom)?,
        (None, None) => return Err(E::missing_field("data")),
    };
    Ok(Envelope {
        id: f.id.ok_or_else(|| E::missing_field("id"))?,
        schema,
        occurred_at: f
            .occurred_at
            .ok_or_else(|| E::missing_field("occurred_at"))?,
        request_id: f.request_id.flatten(),
        subject: f.subject.flatten(),
        data,
    })
}

/// The envelope in `bytes` (not yet validated), or `None` if anything about it is off: the
/// caller then decodes with the slow path for the error.
pub(crate) fn one_pass(bytes: &[u8]) -> Option<Envelope> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let env = de::Deserializer::deserialize_map(&mut de, EnvelopeVisitor).ok()?;
    de.end().ok()?;
    Some(env)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::{KEYS, one_pass};
    use crate::Envelope;

    const T: &str = "2026-11-22T10:00:00.123456Z";
    const ID: &str = "0192f0c4-8a3b-7c2d-9e1f-123456789abc";
    /// The key order of rows written while the ledger kept `jsonb` (`data` first).
    const JSONB_ORDER: &[&str] = &[
        "data",
        "id",
        "type",
        "schema",
        "subject",
        "request_id",
        "occurred_at",
    ];

    fn docs() -> Vec<Value> {
        vec![
            json!({"id": ID, "type": "admission.decided", "schema": 1, "occurred_at": T, "request_id": "r", "subject": "key:k",
                "data": {"admission_id": ID, "admitted": true, "reason": null, "model": "m", "model_group": null, "chain": ["key:k", "user:u"],
                    "estimate": {"requests": 1, "cost": 5}, "counted_in_key_global": true, "counted_in_user_global": true,
                    "checks": [{"policy_id": "p", "subject": "key:k", "metric": "cost", "window": {"start": T, "end": T}, "limit": 9, "used": 1, "reserved": 0, "remaining": 8, "outcome": "pass"}],
                    "received_at": T}}),
            json!({"id": ID, "type": "usage.settled", "schema": 1, "occurred_at": T, "request_id": "r", "subject": "key:k",
                "data": {"settlement_id": "s", "usage": {"cost": 1_000_000_000_000_000i64}, "success": true, "final": false, "seq": 3,
                    "matched_admission": false, "admission_id": null, "model": null, "model_group": null, "chain": ["key:k"],
                    "counted_in_key_global": true, "counted_in_user_global": false, "window_at": T}}),
            json!({"id": ID, "type": "credits.adjusted", "schema": 1, "occurred_at": T, "subject": "user:u", "request_id": null,
                "data": {"id": "w", "op": "set", "amount": 7, "refill": {"amount": 3, "interval": "monthly", "day": 31}}}),
        ]
    }

    /// The envelope's keys in `order` (by name), each once; `data` first is the ledger's old
    /// jsonb rendering.
    fn text_in_order(doc: &Value, order: &[&str]) -> String {
        let obj = doc.as_object().unwrap();
        let parts: Vec<String> = order
            .iter()
            .filter_map(|k| obj.get(*k).map(|v| format!("{}:{}", json!(k), v)))
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    /// What the one-pass reader accepts, the general reader accepts as the same envelope.
    fn agrees(bytes: &[u8]) {
        if let Some(fast) = one_pass(bytes) {
            assert_eq!(
                Envelope::decode_general(bytes).ok(),
                Some(fast),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn reads_every_key_order_as_the_general_reader_does() {
        for doc in docs() {
            for order in [KEYS, JSONB_ORDER] {
                let text = text_in_order(&doc, order);
                let fast = one_pass(text.as_bytes()).expect("a valid event reads in one pass");
                agrees(text.as_bytes());
                assert_eq!(
                    fast.encode(),
                    Envelope::decode(&fast.encode()).unwrap().encode()
                );
            }
        }
    }

    #[test]
    fn leaves_everything_off_to_the_general_reader() {
        let doc = text_in_order(&docs()[1], KEYS);
        let bad = [
            doc.replace("\"schema\":1", "\"schema\":0"),
            doc.replace("\"schema\":1", "\"schema\":2"),
            doc.replace("usage.settled", "usage.spent"),
            doc.replace("\"id\":", "\"ids\":"),
            doc.replace("\"type\":\"usage.settled\",", ""),
            doc.replace("\"seq\":3", "\"seq\":-3"),
            doc.replace("{\"id\"", "{\"schema\":1,\"id\""),
            doc.replace("\"data\":{", "\"data\":{},\"data\":{"),
            format!("{doc} x"),
            format!("[{doc}]"),
        ];
        for text in &bad {
            assert!(one_pass(text.as_bytes()).is_none(), "{text}");
            let general = Envelope::decode(text.as_bytes());
            assert!(general.is_err(), "{text}");
        }
        // An escaped type name is valid JSON the one-pass reader cannot borrow: the general
        // reader reads it.
        let escaped = doc.replace("usage.settled", "usage\\u002esettled");
        assert!(one_pass(escaped.as_bytes()).is_none());
        assert_eq!(
            Envelope::decode(escaped.as_bytes()).ok(),
            one_pass(doc.as_bytes())
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn mutated_events_read_alike(doc in 0usize..3, at in any::<prop::sample::Index>(), byte in any::<u8>(), data_first in any::<bool>()) {
            let order = if data_first { JSONB_ORDER } else { KEYS };
            let mut bytes = text_in_order(&docs()[doc], order).into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            agrees(&bytes);
        }
    }
}

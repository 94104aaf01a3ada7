//! Snapshots of the quota state (SPEC v2 §7, ADR 0005): everything admissions are decided on —
//! configuration, usage buckets, reservations, open requests, resets, credits, alert and
//! idempotency bookkeeping — as one versioned, checksummed byte string tagged with the stream
//! sequence it covers.
//!
//! Layout: `TALLYSNP` (8 bytes), format version (u32 LE), stream sequence (u64 LE), taken at
//! (i64 LE, Unix ms), body length (u64 LE), CRC-32 of the body (u32 LE), then the body in postcard
//! (serde's compact binary form). A reader refuses a wrong magic, a format it does not know, a
//! length that does not match and a checksum that does not match, before decoding anything.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::bounded::Bounded;
use super::config::{Config, PolicyConf, SubjectConf};
use super::credits::Account;
use super::state::{
    CreditAnswer, MAX_ALERTED, MAX_APPLIED_IDS, MAX_CREDIT_WRITE_IDS, Open, PoolKey, QuotaState,
    Reset, Slices,
};
use crate::envelope::{GrantIssued, PolicyUpserted};
use crate::error::{Error, SnapshotError};
use crate::model::Subject;
use crate::window::WindowSpec;

/// The format this build writes and reads. Bump on any change to the body's types.
pub const SNAPSHOT_FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"TALLYSNP";
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8 + 4;

/// What a snapshot's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Format version.
    pub format: u32,
    /// The last stream sequence folded into it.
    pub stream_seq: u64,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
    /// CRC-32 of the body.
    pub checksum: u32,
}

/// Values whose serde form needs a self-describing format (a `Window` is tagged by `kind`)
/// travel as embedded JSON text inside the binary body.
pub(super) mod as_json {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serialize `v` as a JSON string.
    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(v).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    /// Deserialize from a JSON string.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

#[derive(Serialize, Deserialize)]
struct PolicyBody {
    #[serde(with = "as_json")]
    data: PolicyUpserted,
    created_at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct ConfigBody {
    subjects: Vec<(Subject, SubjectConf)>,
    model_groups: Vec<(String, Vec<String>)>,
    policies: Vec<PolicyBody>,
    policies_of: Vec<(Subject, Vec<String>)>,
    grants: Vec<(Subject, GrantIssued)>,
}

type Alert = (String, Subject, Option<DateTime<Utc>>);

/// Usage per subject and slice, as the state holds it.
type UsageMap = HashMap<Subject, Slices>;

/// The snapshot body. `U` is the usage, by far its largest part: encoded straight from the
/// state's map (`&UsageMap`) and decoded straight into one (`UsageMap`), never copied into an
/// intermediate list (which doubled the memory of a snapshot's load and write). Postcard writes
/// a map as its length and its key/value pairs, the same bytes as the list of pairs format 1
/// was first written with, so snapshots written either way read alike. `R` is the requests:
/// encoded from references to the state's entries (`(&String, &Open)`), decoded as owned pairs;
/// the same bytes either way. (Copying every request for the encoding cloned each one's
/// settlement-id set: 100,000 requests held a worker thread ~40 ms, admissions waiting behind it.)
/// `P` is the pools' reservations, likewise `(&PoolKey, &i64)` out and `(PoolKey, i64)` in.
#[derive(Serialize, Deserialize)]
struct Body<U, R, P> {
    config: ConfigBody,
    usage: U,
    reserved: Vec<P>,
    open: Vec<R>,
    resets: Vec<(String, Subject, Reset)>,
    credits: Vec<(Subject, Account)>,
    credit_epochs: u64,
    credit_writes: Vec<(String, CreditAnswer)>,
    alerted: Vec<Alert>,
    applied: Vec<Uuid>,
    clock: Option<DateTime<Utc>>,
}

impl Config {
    fn to_body(&self) -> ConfigBody {
        ConfigBody {
            subjects: self
                .subjects
                .iter()
                .map(|(s, c)| (s.clone(), c.clone()))
                .collect(),
            model_groups: self
                .model_groups
                .iter()
                .map(|(n, m)| (n.clone(), m.clone()))
                .collect(),
            policies: self
                .policies
                .values()
                .map(|p| PolicyBody {
                    data: p.data.clone(),
                    created_at: p.created_at,
                })
                .collect(),
            policies_of: self
                .policies_of
                .iter()
                .map(|(s, ids)| (s.clone(), ids.clone()))
                .collect(),
            grants: self.grants.values().cloned().collect(),
        }
    }

    fn from_body(b: ConfigBody) -> Result<Config, Error> {
        let mut c = Config::default();
        // Sized once: growing by doubling held two tables at the peak of a starting instance.
        c.subjects.reserve(b.subjects.len());
        for (s, conf) in b.subjects {
            if let Some(p) = &conf.parent {
                c.children.entry(p.clone()).or_default().insert(s.clone());
            }
            c.subjects.insert(s, conf);
        }
        for (name, models) in b.model_groups {
            for m in &models {
                c.group_of_model.insert(m.clone(), name.clone());
            }
            c.model_groups.insert(name, models);
        }
        for PolicyBody { data, created_at } in b.policies {
            let spec = WindowSpec::compile(&data.window, created_at).map_err(|e| {
                SnapshotError::Policy {
                    policy_id: data.policy_id.clone(),
                    source: Box::new(e),
                }
            })?;
            let id = data.policy_id.clone();
            c.policies.insert(
                id,
                PolicyConf {
                    data,
                    spec,
                    created_at,
                },
            );
        }
        c.policies_of = b.policies_of.into_iter().collect();
        for (s, g) in b.grants {
            c.insert_grant(s, g);
        }
        Ok(c)
    }
}

impl QuotaState {
    /// Encode the whole state as a snapshot covering the stream up to `stream_seq`.
    pub fn encode_snapshot(&self, stream_seq: u64, taken_at: DateTime<Utc>) -> Vec<u8> {
        let body = Body {
            config: self.config.to_body(),
            usage: &self.usage,
            reserved: self.reserved.iter().collect(),
            open: self.open.iter().collect(),
            resets: self
                .resets
                .iter()
                .map(|((id, s), r)| (id.clone(), s.clone(), r.clone()))
                .collect(),
            credits: self
                .credits
                .iter()
                .map(|(s, a)| (s.clone(), a.clone()))
                .collect(),
            credit_epochs: self.credit_epochs,
            credit_writes: self
                .credit_writes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            alerted: self.alerted.iter().map(|(k, _)| k.clone()).collect(),
            applied: self.applied.iter().map(|(k, _)| *k).collect(),
            clock: self.clock,
        };
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
        out.extend_from_slice(&stream_seq.to_le_bytes());
        out.extend_from_slice(&taken_at.timestamp_millis().to_le_bytes());
        out.extend_from_slice(&[0; 12]); // length and checksum, filled in below
        // The body is written after the header in the same buffer (no second copy of it).
        // Serializing plain in-memory data to a Vec cannot fail.
        let mut out = postcard::to_extend(&body, out).unwrap_or_default();
        if out.len() < HEADER_LEN {
            return out; // unreachable; a short snapshot fails its own check when read
        }
        let len = (out.len() - HEADER_LEN) as u64;
        let checksum = crc32fast::hash(&out[HEADER_LEN..]);
        out[28..36].copy_from_slice(&len.to_le_bytes());
        out[36..40].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Read a snapshot's header, checking magic, format, length and checksum.
    pub fn snapshot_meta(bytes: &[u8]) -> Result<SnapshotMeta, Error> {
        if bytes.len() < HEADER_LEN {
            return Err(SnapshotError::Truncated(bytes.len()).into());
        }
        if &bytes[..8] != MAGIC {
            return Err(SnapshotError::Magic.into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        let format = u32_at(8);
        if format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format(format).into());
        }
        let stream_seq = u64_at(12);
        let taken_at = DateTime::from_timestamp_millis(u64_at(20) as i64).unwrap_or_default();
        let len = u64_at(28);
        let checksum = u32_at(36);
        let body = &bytes[HEADER_LEN..];
        if body.len() as u64 != len {
            return Err(SnapshotError::Truncated(bytes.len()).into());
        }
        let found = crc32fast::hash(body);
        if found != checksum {
            return Err(SnapshotError::Checksum {
                expected: checksum,
                found,
            }
            .into());
        }
        Ok(SnapshotMeta {
            format,
            stream_seq,
            taken_at,
            checksum,
        })
    }

    /// Decode a snapshot into a state. Never panics: any damage is an error.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(SnapshotMeta, QuotaState), Error> {
        let meta = Self::snapshot_meta(bytes)?;
        let body: Body<UsageMap, (String, Open), (PoolKey, i64)> =
            postcard::from_bytes(&bytes[HEADER_LEN..]).map_err(SnapshotError::Body)?;
        let state = QuotaState {
            config: Config::from_body(body.config)?,
            usage: body.usage,
            reserved: body.reserved.into_iter().collect(),
            open: body.open.into_iter().collect(),
            resets: body
                .resets
                .into_iter()
                .map(|(id, s, r)| ((id, s), r))
                .collect(),
            credits: body.credits.into_iter().collect(),
            credit_epochs: body.credit_epochs,
            credit_writes: Bounded::from_entries(MAX_CREDIT_WRITE_IDS, body.credit_writes),
            alerted: Bounded::from_entries(MAX_ALERTED, body.alerted.into_iter().map(|a| (a, ()))),
            applied: Bounded::from_entries(
                MAX_APPLIED_IDS,
                body.applied.into_iter().map(|a| (a, ())),
            ),
            compact_queue: Vec::new(),
            prune_cursor: 0,
            clock: body.clock,
            idempotency: chrono::Duration::minutes(super::state::DEFAULT_IDEMPOTENCY_MINUTES),
        };
        Ok((meta, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, EventData, SubjectUpserted};

    fn sample() -> QuotaState {
        let mut q = QuotaState::default();
        let s = Subject::parse("key:k").unwrap();
        q.apply(&Envelope::new(
            EventData::SubjectUpserted(SubjectUpserted {
                parent: Some(Subject::parse("user:u").unwrap()),
                groups: vec!["g".into()],
                disabled: false,
            }),
            Utc::now(),
            None,
            Some(s),
        ));
        q
    }

    #[test]
    fn round_trip_and_damage() {
        let q = sample();
        let bytes = q.encode_snapshot(42, Utc::now());
        let (meta, back) = QuotaState::decode_snapshot(&bytes).unwrap();
        assert_eq!(meta.stream_seq, 42);
        let k = Subject::parse("key:k").unwrap();
        assert_eq!(back.config.chain(&k).len(), 2);
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0x55;
        assert!(matches!(
            QuotaState::decode_snapshot(&flipped),
            Err(Error::Snapshot(SnapshotError::Checksum { .. }))
        ));
        assert!(matches!(
            QuotaState::decode_snapshot(&bytes[..bytes.len() - 3]),
            Err(Error::Snapshot(SnapshotError::Truncated(_)))
        ));
        let mut future = bytes.clone();
        future[8] = 9;
        assert!(matches!(
            QuotaState::decode_snapshot(&future),
            Err(Error::Snapshot(SnapshotError::Format(9)))
        ));
        assert!(matches!(
            QuotaState::decode_snapshot(b"not a snapshot at all, no, not at all, nothing like one"),
            Err(Error::Snapshot(SnapshotError::Magic))
        ));
    }

    #[test]
    fn a_list_of_pairs_and_a_map_are_the_same_bytes() {
        // Format 1 was first written with usage as a list of (subject, list of pairs); it is
        // now written from and read into maps. Postcard encodes both alike.
        let list: Vec<(String, Vec<(u32, i64)>)> = vec![
            ("key:a".into(), vec![(1, 10), (2, 20)]),
            ("key:b".into(), vec![]),
        ];
        let bytes = postcard::to_allocvec(&list).unwrap();
        let map: HashMap<String, HashMap<u32, i64>> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(map["key:a"][&2], 20);
        assert!(map["key:b"].is_empty());
        let one: HashMap<String, HashMap<u32, i64>> =
            [("key:a".to_owned(), [(1, 10)].into())].into();
        let back: Vec<(String, Vec<(u32, i64)>)> =
            postcard::from_bytes(&postcard::to_allocvec(&one).unwrap()).unwrap();
        assert_eq!(back, vec![("key:a".to_owned(), vec![(1, 10)])]);
    }

    #[test]
    fn a_damaged_body_with_a_valid_checksum_is_an_error_not_a_panic() {
        let bytes = sample().encode_snapshot(1, Utc::now());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = HEADER_LEN + (x as usize) % (b.len() - HEADER_LEN);
                b[i] = (x >> 32) as u8;
            }
            let crc = crc32fast::hash(&b[HEADER_LEN..]);
            b[36..40].copy_from_slice(&crc.to_le_bytes());
            let _ = QuotaState::decode_snapshot(&b);
        }
    }
}

//! Request extraction: JSON bodies (bounded, strict, errors naming the field), path segments and
//! query strings, every rejection an [`ApiError`] with the JSON error body.
//!
//! Strict means stricter than serde's defaults, which accept a JSON array in place of a struct
//! (fields by position) and silently keep the last of two equal keys. A body is parsed once into
//! a `serde_json::Value` that refuses duplicate keys (naming the key's path), must be an object,
//! and is then deserialized through [`Strict`], which refuses an array wherever a struct is
//! expected, at any depth.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Largest request body (SPEC §6): larger bodies get 413, from `Content-Length` before any byte
/// of the body is read, or while reading a body sent without one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a client may take to send a body once its headers arrived: a client trickling a
/// body must not hold a connection and a task for ever.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A JSON body deserialized strictly into `T` (which should `deny_unknown_fields`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let read = Bytes::from_request(req, state);
        let bytes = tokio::time::timeout(BODY_READ_TIMEOUT, read)
            .await
            .map_err(|_| ApiError::Timeout)?
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: MAX_BODY_BYTES,
                    }
                } else {
                    ApiError::Invalid {
                        field: None,
                        message: format!("could not read body: {rejection}"),
                    }
                }
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Deserialize `bytes` strictly, turning every error into a 400 that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Invalid {
            field: None,
            message: "a JSON object body is required".into(),
        });
    }
    let value = parse_value(bytes)?;
    if !value.is_object() {
        return Err(ApiError::Invalid {
            field: None,
            message: "the body must be a JSON object".into(),
        });
    }
    serde_path_to_error::deserialize(Strict(&value)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().0;
        ApiError::Invalid {
            field: field_of(&path, &message),
            message,
        }
    })
}

/// Parse into a `Value`, refusing duplicate keys (naming the duplicate's path).
fn parse_value(bytes: &[u8]) -> Result<Value, ApiError> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = Unique {
        path: &mut Vec::new(),
        duplicate: &duplicate,
    };
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| match duplicate.into_inner() {
        Some(path) => ApiError::Invalid {
            message: format!("duplicate key `{path}`"),
            field: Some(path),
        },
        None => ApiError::Invalid {
            field: None,
            message: format!("malformed JSON: {}", clean_message(&e)),
        },
    })
}

struct Unique<'a> {
    path: &'a mut Vec<String>,
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Unique {
            path: &mut *self.path,
            duplicate: self.duplicate,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            self.path.push(k.clone());
            if out.contains_key(&k) {
                *self.duplicate.borrow_mut() = Some(self.path.join("."));
                return Err(de::Error::custom(format!("duplicate key `{k}`")));
            }
            let v = map.next_value_seed(Unique {
                path: &mut *self.path,
                duplicate: self.duplicate,
            })?;
            self.path.pop();
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The message of a strict deserialization error.
#[derive(Debug)]
pub struct StrictError(String);

impl std::fmt::Display for StrictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StrictError {}

impl de::Error for StrictError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        StrictError(msg.to_string())
    }
}

/// A `Value` as a deserializer that accepts only objects where a struct is expected.
#[derive(Clone, Copy)]
pub struct Strict<'a>(pub &'a Value);

impl<'de> Deserializer<'de> for Strict<'de> {
    type Error = StrictError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64().and_then(integral)) {
                (Some(u), _, _) => v.visit_u64(u),
                (None, Some(i), _) => v.visit_i64(i),
                (None, None, Some(i)) => v.visit_i64(i),
                _ => v.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => v.visit_borrowed_str(s),
            Value::Array(a) => v.visit_seq(StrictSeq(a.iter())),
            Value::Object(m) => v.visit_map(StrictMap {
                iter: m.iter(),
                value: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, StrictError> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(v),
            other => Err(de::Error::invalid_type(unexpected(other), &"a JSON object")),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, StrictError> {
        match self.0 {
            Value::String(s) => v.visit_enum(s.as_str().into_deserializer()),
            other => Err(de::Error::invalid_type(unexpected(other), &"a string")),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, StrictError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        v.visit_unit()
    }

    /// A name (a tagged enum's tag, a field): a string only. serde's identifiers also take a
    /// variant's index, so `{"kind": 0}` would otherwise be the first window kind.
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, StrictError> {
        match self.0 {
            Value::String(s) => v.visit_borrowed_str(s),
            other => Err(de::Error::invalid_type(unexpected(other), &"a name")),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map
    }
}

/// Largest magnitude below which every integer is exactly an `f64`.
const EXACT_F64_INTEGER: f64 = 9_007_199_254_740_992.0; // 2^53

/// `2.0` or `1e3` is an integer, as JSON Schema counts them (a number with no fraction): amounts
/// written so are taken. Only where the `f64` is exact; `1.5` stays a float (and a 400).
fn integral(f: f64) -> Option<i64> {
    (f.fract() == 0.0 && f.abs() <= EXACT_F64_INTEGER).then_some(f as i64)
}

fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("a number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

struct StrictSeq<'a>(std::slice::Iter<'a, Value>);

impl<'de> SeqAccess<'de> for StrictSeq<'de> {
    type Error = StrictError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, StrictError> {
        self.0
            .next()
            .map(|v| seed.deserialize(Strict(v)))
            .transpose()
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct StrictMap<'a> {
    iter: serde_json::map::Iter<'a>,
    value: Option<&'a Value>,
}

impl<'de> MapAccess<'de> for StrictMap<'de> {
    type Error = StrictError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, StrictError> {
        let Some((k, v)) = self.iter.next() else {
            return Ok(None);
        };
        self.value = Some(v);
        seed.deserialize(de::value::BorrowedStrDeserializer::new(k))
            .map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, StrictError> {
        let v = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("value without a key"))?;
        seed.deserialize(Strict(v))
    }
}

/// serde reports a missing field at its parent's path, naming it in the message.
fn field_of(path: &str, message: &str) -> Option<String> {
    let parent = if path == "." || path.is_empty() || path == "?" {
        None
    } else {
        Some(path.to_owned())
    };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (parent, missing) {
        (Some(p), Some(m)) => Some(format!("{p}.{m}")),
        (None, Some(m)) => Some(m.to_owned()),
        (p, None) => p,
    }
}

fn clean_message(e: &serde_json::Error) -> String {
    // Drop serde's " at line L column C": the field path is more useful than a position.
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) if e.line() > 0 => text[..i].to_owned(),
        _ => text,
    }
}

/// One path segment, decoded as UTF-8; a rejection names the segment.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParam(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let field = match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => Some(key.clone()),
                    ErrorKind::ParseErrorAtKey { key, .. } => Some(key.clone()),
                    _ => None,
                };
                Err(ApiError::Invalid {
                    field,
                    message: e.body_text(),
                })
            }
            Err(e) => Err(ApiError::Invalid {
                field: None,
                message: e.body_text(),
            }),
        }
    }
}

/// Query parameters as a map, rejecting any name not in `allowed` (a typo must not be ignored).
pub struct Params(pub HashMap<String, String>);

impl Params {
    /// Reject unknown parameter names.
    pub fn only(self, allowed: &[&str]) -> Result<Self, ApiError> {
        if let Some(k) = self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                k.clone(),
                format!("unknown query parameter; expected one of {allowed:?}"),
            ));
        }
        Ok(self)
    }

    /// A parameter's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A required parameter.
    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name)
            .ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    /// An optional RFC 3339 time, within the years Tally computes windows for.
    pub fn time(&self, name: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let t = chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| t.to_utc())
            .map_err(|e| ApiError::invalid(name, format!("must be an RFC 3339 time: {e}")))?;
        tally_events::rules::validate_instant(name, t)?;
        Ok(Some(t))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::Invalid {
                field: None,
                message: format!("bad query string: {}", e.body_text()),
            })?;
        Ok(Params(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        cost: i64,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        id: String,
        estimate: Inner,
        note: Option<String>,
    }

    fn field(json: &str) -> Option<String> {
        match parse_json::<Outer>(json.as_bytes()) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn names_the_field() {
        assert_eq!(field(r#"{"estimate":{"cost":1}}"#).as_deref(), Some("id"));
        assert_eq!(
            field(r#"{"id":"a","estimate":{}}"#).as_deref(),
            Some("estimate.cost")
        );
        assert_eq!(
            field(r#"{"id":"a","estimate":{"cost":"x"}}"#).as_deref(),
            Some("estimate.cost")
        );
        assert_eq!(
            field(r#"{"id":"a","estimate":{"cost":1},"x":1}"#).as_deref(),
            Some("x")
        );
        assert_eq!(
            field(r#"{"id":"a","estimate":{"cost":1.5}}"#).as_deref(),
            Some("estimate.cost")
        );
        assert_eq!(
            field(r#"{"id":7,"estimate":{"cost":1}}"#).as_deref(),
            Some("id")
        );
        assert_eq!(
            field(r#"{"id":"a","estimate":{"cost":1e300}}"#).as_deref(),
            Some("estimate.cost")
        );
    }

    /// JSON Schema counts `2.0` as an integer: so does the API, where the `f64` is exact.
    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        let cost = |json: &str| parse_json::<Inner>(json.as_bytes()).map(|i| i.cost);
        assert_eq!(cost(r#"{"cost":2.0}"#).ok(), Some(2));
        assert_eq!(cost(r#"{"cost":1e3}"#).ok(), Some(1000));
        assert_eq!(cost(r#"{"cost":-0.0}"#).ok(), Some(0));
        assert_eq!(cost(r#"{"cost":9007199254740992.0}"#).ok(), Some(1 << 53));
        for bad in [r#"{"cost":2.5}"#, r#"{"cost":1e19}"#, r#"{"cost":-1e300}"#] {
            assert!(cost(bad).is_err(), "{bad}");
        }
    }

    /// A tagged enum's tag is a name: serde would take a variant's index (`"kind": 0` as the
    /// first window kind) from a number.
    #[test]
    fn a_tag_is_a_name_never_an_index() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            window: tally_events::Window,
        }
        let parse = |json: &str| parse_json::<Body>(json.as_bytes());
        assert!(parse(r#"{"window":{"kind":"rolling","duration":"5h"}}"#).is_ok());
        assert!(parse(r#"{"window":{"kind":"lifetime"}}"#).is_ok());
        for bad in [
            r#"{"window":{"kind":0,"duration":"5h"}}"#,
            r#"{"window":{"kind":3}}"#,
            r#"{"window":{"kind":true}}"#,
            r#"{"window":{"kind":null}}"#,
            r#"{"window":{"kind":["lifetime"]}}"#,
        ] {
            match parse(bad) {
                Err(ApiError::Invalid { field, .. }) => {
                    assert_eq!(field.as_deref(), Some("window.kind"), "{bad}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn arrays_and_duplicates_are_refused() {
        assert_eq!(field(r#"["a",{"cost":1}]"#), None, "top-level array");
        assert_eq!(
            field(r#"{"id":"a","estimate":[1]}"#).as_deref(),
            Some("estimate"),
            "array in place of a nested object"
        );
        assert_eq!(
            field(r#"{"id":"a","id":"b","estimate":{"cost":1}}"#).as_deref(),
            Some("id")
        );
        assert_eq!(
            field(r#"{"id":"a","estimate":{"cost":1,"cost":2}}"#).as_deref(),
            Some("estimate.cost")
        );
        let ok: Outer = parse_json(br#" {"id":"a","estimate":{"cost":1},"note":null} "#).unwrap();
        assert_eq!(ok.estimate.cost, 1);
    }
}

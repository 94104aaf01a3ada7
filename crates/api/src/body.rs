//! Request extraction: JSON bodies (bounded, strict, errors naming the field) and query strings.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body (SPEC §6): larger bodies get 413 before any parsing.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body deserialized strictly into `T` (which should `deny_unknown_fields`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
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

/// Deserialize `bytes`, turning serde's error into a 400 that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::Invalid {
            field: None,
            message: "a JSON object body is required".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::Invalid {
            field: field_of(&path, &inner.to_string()),
            message: clean_message(&inner),
        }
    })?;
    de.end().map_err(|e| ApiError::Invalid {
        field: None,
        message: format!("trailing characters: {e}"),
    })?;
    Ok(value)
}

/// serde reports a missing field at its parent's path, naming it in the message.
fn field_of(path: &str, message: &str) -> Option<String> {
    let parent = if path == "." || path.is_empty() {
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

    /// An optional RFC 3339 time.
    pub fn time(&self, name: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        self.get(name)
            .map(|v| {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| t.to_utc())
                    .map_err(|e| ApiError::invalid(name, format!("must be an RFC 3339 time: {e}")))
            })
            .transpose()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::Invalid {
                field: None,
                message: format!("bad query string: {e}"),
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
    }
}

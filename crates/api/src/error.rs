//! The API's one error type and its mapping to HTTP status codes (the only place that does it).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use tally_ledger::error::{Cause, Chain};

/// "Dependency unavailable" warnings: during an outage (NATS away, the state still loading)
/// every request fails alike, at whatever rate clients send; the access log already has a line
/// per request, so the warning is written at most once per second, with how many it stands for.
static UNAVAILABLE_WARNINGS: EverySecond = EverySecond::new();

/// A log line allowed at most once per second; the calls in between are counted.
pub(crate) struct EverySecond {
    /// The second of the last line written.
    last_s: AtomicU64,
    /// Calls since then that wrote nothing.
    suppressed: AtomicU64,
}

impl EverySecond {
    pub(crate) const fn new() -> Self {
        EverySecond {
            last_s: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// At `now_s`: Some(calls suppressed since the last line) when a line is due, else None.
    pub(crate) fn due(&self, now_s: u64) -> Option<u64> {
        let last = self.last_s.load(Ordering::Relaxed);
        let won = now_s > last
            && self
                .last_s
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if won {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Every way a request can fail. Database and NATS details are logged, never returned.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; `field` names what is wrong.
    #[error("{message}")]
    Invalid {
        /// Path of the offending field (`estimate.cost`), when known.
        field: Option<String>,
        /// Human-readable reason.
        message: String,
    },
    /// 401: no or unknown bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403: the token may not use this endpoint.
    #[error("this token may not use this endpoint")]
    Forbidden,
    /// 404: the named thing does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked up.
        what: String,
        /// The field that named it.
        field: Option<String>,
    },
    /// 409: the write conflicts with existing state.
    #[error("{message}")]
    Conflict {
        /// Offending field.
        field: Option<String>,
        /// Why.
        message: String,
    },
    /// 405: the route exists, the method does not.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 408: the client did not send its body in time.
    #[error("the request body did not arrive in time")]
    Timeout,
    /// 413: body over the limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// 503: a dependency is unreachable; the write did not happen. The cause is logged.
    #[error("unavailable")]
    Unavailable(#[source] Cause),
    /// 503 with `Retry-After`: what was asked is read from a projection still being built.
    #[error("the `{0}` projection is being built from the ledger; retry shortly")]
    Building(&'static str),
    /// 500: a bug or an unexpected dependency failure; the cause is logged.
    #[error("internal error")]
    Internal(#[source] Cause),
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// Status code and error code of this error.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Timeout => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Building(_) => (StatusCode::SERVICE_UNAVAILABLE, "building"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { field, .. }
            | ApiError::NotFound { field, .. }
            | ApiError::Conflict { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> serde_json::Value {
        let (_, code) = self.status();
        let message = match self {
            ApiError::Unavailable(_) => {
                "a dependency is unavailable; the request was not acknowledged: retry with the same request_id".to_owned()
            }
            other => other.to_string(),
        };
        let mut body = json!({"error": {"code": code, "message": message, "field": self.field()}});
        if matches!(self, ApiError::Unavailable(_)) {
            // SPEC §4.5: an admission that could not be recorded answers {"reason":"unavailable"}.
            body["reason"] = json!("unavailable");
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status();
        match &self {
            ApiError::Internal(cause) => {
                tracing::error!(detail = %Chain(cause.as_ref()), "internal error");
            }
            ApiError::Unavailable(cause) => {
                let now_s = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if let Some(suppressed) = UNAVAILABLE_WARNINGS.due(now_s) {
                    let detail = Chain(cause.as_ref());
                    tracing::warn!(%detail, suppressed, "dependency unavailable");
                }
            }
            _ => {}
        }
        let mut response = (status, Json(self.body())).into_response();
        if matches!(self, ApiError::Building(_)) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(BUILDING_RETRY_AFTER_SECONDS),
            );
        }
        if matches!(self, ApiError::Unauthorized) {
            // RFC 6750 §3: a 401 names the scheme it wants.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<tally_events::Error> for ApiError {
    fn from(e: tally_events::Error) -> Self {
        ApiError::Invalid {
            field: e.field().map(str::to_owned),
            message: e.to_string(),
        }
    }
}

impl From<tally_ledger::Error> for ApiError {
    fn from(e: tally_ledger::Error) -> Self {
        match e {
            tally_ledger::Error::InvalidEvent(e) => e.into(),
            e @ (tally_ledger::Error::Publish { .. }
            | tally_ledger::Error::JetStream { .. }
            | tally_ledger::Error::Spool { .. }) => ApiError::Unavailable(Box::new(e)),
            tally_ledger::Error::ConcurrentWrite { .. } => ApiError::Conflict {
                field: None,
                message: CONCURRENT_CONFIG_WRITE.into(),
            },
            tally_ledger::Error::Database(e) => e.into(),
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

/// `Retry-After` of a read from a projection still being built.
pub const BUILDING_RETRY_AFTER_SECONDS: u16 = 5;

/// The 409 message of an admin write that raced another instance's.
pub const CONCURRENT_CONFIG_WRITE: &str = "the configuration changed on another instance while this \
     write was being validated; nothing was written, retry";

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable(Box::new(e))
            }
            _ => ApiError::Internal(Box::new(e)),
        }
    }
}

impl From<tally_projector::Error> for ApiError {
    fn from(e: tally_projector::Error) -> Self {
        match e {
            tally_projector::Error::InvalidQuery { field, message } => {
                ApiError::invalid(field, message)
            }
            tally_projector::Error::Database(e) => e.into(),
            tally_projector::Error::Building(what) => ApiError::Building(what),
            tally_projector::Error::Busy(message) => ApiError::Conflict {
                field: None,
                message,
            },
            other => ApiError::Internal(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EverySecond;

    #[test]
    fn one_line_per_second_counting_the_rest() {
        let w = EverySecond::new();
        assert_eq!(w.due(100), Some(0));
        for _ in 0..999 {
            assert_eq!(w.due(100), None);
        }
        assert_eq!(
            w.due(101),
            Some(999),
            "the next second's line counts the suppressed"
        );
        assert_eq!(w.due(101), None);
        assert_eq!(w.due(99), None, "a clock stepping back writes nothing");
        assert_eq!(w.due(105), Some(2));
    }
}

//! The access log: one `info` line per request (target `tally::access`) with method, route (the
//! matched pattern, never the raw path of an unknown URL), status, latency and, when known, the
//! subject and request id. Never a token or a body.

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Query, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// What a handler knows about whom a request was for (from its body), handed to the access log
/// through the response's extensions.
#[derive(Clone, Debug, Default)]
pub struct AccessInfo {
    /// The subject named by the request.
    pub subject: Option<String>,
    /// Its request id.
    pub request_id: Option<String>,
}

impl AccessInfo {
    /// Attach to `response` for the access log.
    pub fn tag(self, mut response: Response) -> Response {
        response.extensions_mut().insert(self);
        response
    }
}

/// Longest subject or request id logged (a hostile client must not bloat the log).
const MAX_LOGGED_CHARS: usize = 200;

fn bounded(text: &str) -> String {
    text.chars().take(MAX_LOGGED_CHARS).collect()
}

/// Middleware writing the access log line after the response is made, and counting the request
/// in `/metrics` (by route pattern and status: bounded label values).
pub async fn access_log(
    State(state): State<crate::AppState>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let from_query = Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(q)| q.get("subject").cloned());
    let from_path = route
        .ends_with("{subject}")
        .then(|| req.uri().path().rsplit('/').next().map(str::to_owned))
        .flatten();
    let response = next.run(req).await;
    let info = response
        .extensions()
        .get::<AccessInfo>()
        .cloned()
        .unwrap_or_default();
    let subject = info.subject.or(from_query).or(from_path);
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics()
        .http(method.as_str(), &route, response.status().as_u16(), seconds);
    tracing::info!(
        target: "tally::access",
        method = %method,
        route = %route,
        status = response.status().as_u16(),
        latency_ms = seconds * 1e3,
        subject = subject.as_deref().map(bounded).as_deref().unwrap_or("-"),
        request_id = info.request_id.as_deref().map(bounded).as_deref().unwrap_or("-"),
        "request"
    );
    response
}

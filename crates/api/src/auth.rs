//! Bearer-token authentication: admin tokens may call everything, API tokens the data plane and
//! reads (SPEC §6).

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;
use crate::error::ApiError;

/// Longest token accepted; also bounds the comparison work per request.
pub const MAX_TOKEN_LEN: usize = 512;

/// What a request must present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Admission, settlement and reads: admin or API token.
    DataPlane,
    /// Configuration writes: admin token only.
    Admin,
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    /// May call every endpoint.
    pub admin: Vec<String>,
    /// May call the data plane and reads.
    pub api: Vec<String>,
    /// No authentication at all (`--insecure-no-auth`).
    pub insecure_no_auth: bool,
}

impl Tokens {
    /// Parse comma-separated lists, dropping empty entries.
    pub fn from_lists(admin: &str, api: &str) -> Tokens {
        let split = |s: &str| {
            s.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Tokens {
            admin: split(admin),
            api: split(api),
            insecure_no_auth: false,
        }
    }

    /// True when no token at all is configured.
    pub fn is_empty(&self) -> bool {
        self.admin.is_empty() && self.api.is_empty()
    }

    /// Decide whether `presented` may call an endpoint needing `access`.
    pub fn check(&self, presented: Option<&str>, access: Access) -> Result<(), ApiError> {
        if self.insecure_no_auth {
            return Ok(());
        }
        let token = presented
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
            .ok_or(ApiError::Unauthorized)?;
        let any = |list: &[String]| {
            list.iter().fold(false, |found, t| {
                found | constant_time_eq(t.as_bytes(), token.as_bytes())
            })
        };
        if any(&self.admin) {
            return Ok(());
        }
        match (any(&self.api), access) {
            (true, Access::DataPlane) => Ok(()),
            (true, Access::Admin) => Err(ApiError::Forbidden),
            (false, _) => Err(ApiError::Unauthorized),
        }
    }
}

/// Compare without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is matched
/// case-insensitively (RFC 9110 §11.1).
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware for data-plane routes.
pub async fn data_plane(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    state.tokens().check(bearer(&req), Access::DataPlane)?;
    Ok(next.run(req).await)
}

/// Middleware for admin routes.
pub async fn admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    state.tokens().check(bearer(&req), Access::Admin)?;
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grant_what_they_should() {
        let t = Tokens::from_lists("adm1, adm2", "api1");
        assert!(t.check(Some("adm2"), Access::Admin).is_ok());
        assert!(t.check(Some("api1"), Access::DataPlane).is_ok());
        assert!(matches!(
            t.check(Some("api1"), Access::Admin),
            Err(ApiError::Forbidden)
        ));
        assert!(matches!(
            t.check(Some("nope"), Access::DataPlane),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            t.check(None, Access::DataPlane),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            t.check(Some(""), Access::DataPlane),
            Err(ApiError::Unauthorized)
        ));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }
}

//! Bearer-token authentication: when `server.api_token` is set, every route except `/healthz` needs
//! `Authorization: Bearer <token>`.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::ApiState;
use crate::offload::Secret;

/// Middleware refusing requests without the configured token.
pub(crate) async fn require_bearer_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.settings().api_token.as_ref().map(Secret::expose) else {
        return next.run(request).await;
    };
    match bearer_token(request.headers()) {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => next.run(request).await,
        Some(_) => {
            tracing::debug!(path = request.uri().path(), "request with a wrong bearer token refused");
            ApiError::unauthorized("incorrect API key provided").into_response()
        }
        None => ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <token>` (the token in server.api_token)",
        )
        .into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Compares without an early exit, so response times do not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        difference |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer abc"));
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
    }
}

//! The local HTTP API: OpenAI-compatible chat completions (JSON and server-sent events), the model
//! list, health, status and Prometheus metrics. Handlers only parse, admit and format; answering is
//! the [`ChatBackend`](crate::chat::ChatBackend)'s job. `docs/api.md` is the user documentation.
//!
//! Layout: `state` (what handlers share), `auth` (bearer token), `chat_request` (parsing and
//! validation), `chat_completions` (the endpoint), `chat_stream` (its SSE form), `chat_response`
//! (the JSON shapes), `disconnect_guard` (cancel on client disconnect), `error` (OpenAI-style
//! errors), `events` (log line + metric per event), `metrics`, `models`, `health`, `status`.

mod auth;
mod chat_completions;
mod chat_request;
mod chat_response;
mod chat_stream;
mod disconnect_guard;
mod error;
mod events;
mod health;
mod metrics;
mod models;
mod state;
mod status;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use chat_request::{ParsedChatRequest, parse_chat_request};
pub use chat_response::TandemInfo;
pub use chat_stream::PENDING_ROUTE;
pub use error::ApiError;
pub use metrics::ApiMetrics;
pub use state::{ApiSettings, ApiState};

/// Response header naming the route that answered: `local`, `cloud`, `local_fallback`, or
/// `pending` on streaming responses.
pub const ROUTE_HEADER: &str = "x-tandem-route";

/// The API's routes over `state`.
pub fn router(state: ApiState) -> Router {
    let max_body_bytes = state.settings().max_body_bytes;
    let authenticated = Router::new()
        .route(
            "/v1/chat/completions",
            post(chat_completions::chat_completions).layer(DefaultBodyLimit::max(max_body_bytes)),
        )
        .route("/v1/models", get(models::list_models))
        .route("/v1/status", get(status::status))
        .route("/metrics", get(metrics::scrape))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_bearer_token));
    Router::new()
        .route("/healthz", get(health::healthz))
        .merge(authenticated)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

//! `POST /v1/chat/completions`: checks the request (content type, size, JSON, parameters), admits
//! it into the bounded queue, and answers it as one JSON object or, with `stream: true`, as
//! server-sent events (see `chat_stream`).

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinError;

use super::ROUTE_HEADER;
use super::chat_request::{ParsedChatRequest, parse_chat_request};
use super::chat_response::{ChatCompletion, CompletionMeta};
use super::chat_stream::stream_answer;
use super::disconnect_guard::DisconnectGuard;
use super::error::ApiError;
use super::events::{ChatAnswered, ChatFailed, QueueFull};
use super::state::ApiState;
use crate::chat::{ChatError, ChatOutcome};
use crate::engine::CancelToken;

/// What a client is told to wait after a 429 for a full queue, seconds.
const QUEUE_FULL_RETRY_AFTER_SECS: u64 = 1;

/// The handler.
pub(crate) async fn chat_completions(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let parsed = match read_request(&state, &headers, body) {
        Ok(parsed) => parsed,
        Err(error) => {
            ChatFailed { id: None, error: &error, stream: false, elapsed: started.elapsed() }
                .emit(state.metrics());
            return error.into_response();
        }
    };
    let Some(permit) = state.admit() else {
        let max_queue = state.settings().max_queue;
        QueueFull { max_queue }.emit(state.metrics());
        return ApiError::queue_full(max_queue, QUEUE_FULL_RETRY_AFTER_SECS).into_response();
    };
    let meta = CompletionMeta::new(state.backend().model_info().id);
    let ParsedChatRequest { chat, stream, include_usage, .. } = parsed;
    if stream {
        return stream_answer(state, meta, chat, include_usage, permit, started).await;
    }

    let cancel = CancelToken::default();
    let mut guard = DisconnectGuard::new(state.clone(), meta.id.clone(), cancel.clone(), false, started);
    let task = state.spawn_chat(chat, None, cancel, permit);
    let result = match tokio::time::timeout(state.settings().request_timeout, task).await {
        Ok(joined) => {
            guard.disarm();
            backend_result(&state, joined)
        }
        Err(_elapsed) => {
            guard.cancel_now();
            Err(ApiError::timeout(state.settings().request_timeout.as_secs()))
        }
    };
    match result {
        Ok(outcome) => {
            ChatAnswered { id: &meta.id, outcome: &outcome, stream: false, elapsed: started.elapsed() }
                .emit(state.metrics());
            let mut response = Json(ChatCompletion::new(&meta, &outcome)).into_response();
            response.headers_mut().insert(ROUTE_HEADER, HeaderValue::from_static(outcome.route.as_str()));
            response
        }
        Err(error) => {
            ChatFailed { id: Some(&meta.id), error: &error, stream: false, elapsed: started.elapsed() }
                .emit(state.metrics());
            error.into_response()
        }
    }
}

/// Everything checked before the request is admitted.
fn read_request(
    state: &ApiState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<ParsedChatRequest, ApiError> {
    if state.shutdown().is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    check_content_type(headers)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.settings().max_body_bytes)
        } else {
            ApiError::unreadable_body(rejection.body_text())
        }
    })?;
    parse_chat_request(&body, &state.settings().generation)
}

/// `application/json`, optionally with parameters (`; charset=utf-8`), or any `+json` type.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(None));
    };
    let text = value.to_str().map_err(|_| ApiError::unsupported_media_type(Some("<not ASCII>")))?;
    let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(Some(text)))
    }
}

/// The backend task's result as an answer or an API error.
pub(crate) fn backend_result(
    state: &ApiState,
    joined: Result<Result<ChatOutcome, ChatError>, JoinError>,
) -> Result<ChatOutcome, ApiError> {
    match joined {
        Ok(Ok(outcome)) => Ok(outcome),
        // A generation cancelled while the client is still connected was cancelled by the shutdown.
        Ok(Err(ChatError::Cancelled)) if state.shutdown().is_shutting_down() => {
            Err(ApiError::shutting_down())
        }
        Ok(Err(error)) => Err(ApiError::from(error)),
        Err(join_error) => {
            tracing::error!(error = %join_error, "the chat backend panicked");
            Err(ApiError::internal("the chat backend failed unexpectedly"))
        }
    }
}

//! `ApiError`: every error the API returns, as an HTTP status plus an OpenAI-style body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::chat::ChatError;

/// The status nginx uses for "the client closed the connection"; only ever seen in metrics and logs.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<String>,
    retry_after_secs: Option<u64>,
}

/// The JSON body of an error.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, message: message.into(), param: None, retry_after_secs: None }
    }

    fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 400: a parameter has a wrong value.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_value", message)
            .with_param(param)
    }

    /// 400: a parameter has the wrong JSON type.
    pub fn invalid_type(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_type", message).with_param(param)
    }

    /// 400: a required parameter is missing.
    pub fn missing_parameter(param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_required_parameter",
            format!("missing required parameter: `{param}`"),
        )
        .with_param(param)
    }

    /// 400: a parameter this API does not know.
    pub fn unknown_parameter(param: impl Into<String>) -> Self {
        let param = param.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "unknown_parameter",
            format!("unrecognized request argument supplied: `{param}`"),
        )
        .with_param(param)
    }

    /// 400: the body is not JSON.
    pub fn invalid_json(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not valid JSON: {detail}"),
        )
    }

    /// 400: the body is not UTF-8.
    pub fn invalid_utf8() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_utf8",
            "the request body is not valid UTF-8",
        )
    }

    /// 400: the body could not be read for another reason.
    pub fn unreadable_body(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_body",
            format!("could not read the request body: {detail}"),
        )
    }

    /// 401: no or a wrong bearer token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message)
    }

    /// 404: no such route.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!("unknown URL: {path}; see GET /v1/models and POST /v1/chat/completions"),
        )
    }

    /// 405: the route exists, the method does not.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// 413: the body exceeds `server.max_body_bytes`.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {limit} bytes (server.max_body_bytes)"),
        )
    }

    /// 415: the body is not declared as JSON.
    pub fn unsupported_media_type(found: Option<&str>) -> Self {
        let found = found.map_or("no Content-Type".to_string(), |t| format!("Content-Type `{t}`"));
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            format!("expected `Content-Type: application/json`, got {found}"),
        )
    }

    /// 429: too many requests are admitted already.
    pub fn queue_full(max_queue: usize, retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            format!(
                "{max_queue} requests are already admitted (server.max_queue); retry in {retry_after_secs} s"
            ),
        );
        error.retry_after_secs = Some(retry_after_secs);
        error
    }

    /// 503: the daemon is stopping.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "shutting_down",
            "tandemd is shutting down; retry on another instance or after it restarts",
        )
    }

    /// 504: `server.request_timeout_secs` passed.
    pub fn timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "request_timeout",
            format!("the request took longer than {secs} s (server.request_timeout_secs) and was cancelled"),
        )
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `code` field.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The `message` field.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> Self {
        match error {
            ChatError::Invalid(message) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
            }
            ChatError::Busy { retry_after_secs } => {
                let mut busy = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "busy",
                    ChatError::Busy { retry_after_secs }.to_string(),
                );
                busy.retry_after_secs = Some(retry_after_secs);
                busy
            }
            ChatError::Cancelled => Self::new(
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST),
                "cancelled",
                "cancelled",
                "the request was cancelled",
            ),
            ChatError::ShuttingDown => Self::shutting_down(),
            ChatError::Internal(message) => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

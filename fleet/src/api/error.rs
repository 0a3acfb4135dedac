//! API errors: a status and `{"error": "…"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::registry::RegistryError;
use crate::rollout::RolloutError;
use crate::scheduler::SchedulerError;
use crate::store::StoreError;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(
        "missing or wrong credentials: a device sends HTTP Basic with its id and the password the \
         devices file lists for it (or the operator's bearer token)"
    )]
    DeviceUnauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the gateway is not running on this fleet")]
    NoGateway,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Internal(String),
    #[error("database error: {0}")]
    Store(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized | ApiError::DeviceUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NoGateway | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(message) => {
                tracing::error!(%message, "API request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Store(error) => {
                tracing::error!(%error, "API request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let challenge = match &self {
            ApiError::Unauthorized => Some("Bearer"),
            ApiError::DeviceUnauthorized => Some("Basic realm=\"tandem-fleet\", charset=\"UTF-8\""),
            _ => None,
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if let Some(challenge) = challenge {
            response.headers_mut().insert("www-authenticate", challenge.parse().expect("a valid header"));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Refused(_) | RegistryError::Invalid(_) => {
                ApiError::Unprocessable(error.to_string())
            }
            // A stored file that no longer matches its manifest stays that way until an operator
            // repairs it: 409 tells devices not to retry (they report the update failed at once,
            // so the rollout halts), where a 5xx would have them retry for minutes.
            RegistryError::Conflict { .. } | RegistryError::Tampered { .. } => {
                ApiError::Conflict(error.to_string())
            }
            RegistryError::Store(error) => ApiError::Store(error),
            RegistryError::Keys(_) | RegistryError::Io { .. } | RegistryError::Storage(_) => {
                ApiError::Internal(error.to_string())
            }
        }
    }
}

impl From<RolloutError> for ApiError {
    fn from(error: RolloutError) -> Self {
        match error {
            RolloutError::NotFound(_) => ApiError::NotFound(error.to_string()),
            RolloutError::Invalid(message) => ApiError::BadRequest(message),
            RolloutError::Conflict(message) => ApiError::Conflict(message),
            RolloutError::Store(error) => ApiError::Store(error),
        }
    }
}

impl From<SchedulerError> for ApiError {
    fn from(error: SchedulerError) -> Self {
        match error {
            SchedulerError::UnknownTemplate(_) | SchedulerError::RunConfig(_) => {
                ApiError::BadRequest(error.to_string())
            }
            SchedulerError::Busy(_) => ApiError::Conflict(error.to_string()),
            SchedulerError::NotFound(_) => ApiError::NotFound(error.to_string()),
            SchedulerError::Store(error) => ApiError::Store(error),
        }
    }
}

//! Offload: asking the cloud LLM for help, over HTTPS (any OpenAI-compatible endpoint) or MQTT
//! (through the fleet's gateway), with timeouts, bounded retries with an idempotency key, a circuit
//! breaker per transport, and failover between transports.

mod circuit_breaker;
mod client;
mod config;
mod https;
mod mqtt;
mod secret;

use std::time::Duration;

use futures::future::BoxFuture;
use tandem_core::protocol::{OffloadRequest, Transport};

pub use circuit_breaker::{Admission, CircuitBreaker};
pub use client::CloudClient;
pub use config::{CircuitBreakerConfig, HttpsCloudConfig, OffloadConfig, SecretSource};
pub use https::{CaFileError, HttpsOffload, HttpsSetupError, completions_url, read_ca_file};
pub(crate) use https::{error_chain, http_client};
pub use mqtt::MqttOffload;
pub use secret::{Secret, SecretError, read_secret, read_secret_with};

/// The cloud's answer to one offload.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudAnswer {
    /// The answer text.
    pub content: String,
    /// The model that answered, as the cloud names it.
    pub model: String,
    /// Prompt tokens the cloud counted.
    pub prompt_tokens: u32,
    /// Completion tokens the cloud counted.
    pub completion_tokens: u32,
    /// How the answer travelled.
    pub transport: Transport,
    /// Time from sending to the full answer.
    pub latency: Duration,
}

/// Why an offload failed. Every variant ends in a local fallback answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OffloadError {
    #[error("no cloud transport is configured")]
    NotConfigured,
    #[error("the cloud did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the {transport:?} circuit breaker is open after repeated failures; retrying after {retry_after:?}"
    )]
    CircuitOpen { transport: Transport, retry_after: Duration },
    #[error("the cloud endpoint could not be reached: {0}")]
    Unreachable(String),
    #[error("the cloud answered HTTP {status}: {body}")]
    HttpStatus { status: u16, body: String },
    #[error("the cloud's answer is not a valid chat completion: {0}")]
    InvalidResponse(String),
    #[error("the fleet gateway refused the request: {0}")]
    Refused(String),
}

impl OffloadError {
    /// Short class for telemetry and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            OffloadError::NotConfigured => "not_configured",
            OffloadError::Timeout(_) => "timeout",
            OffloadError::CircuitOpen { .. } => "circuit_open",
            OffloadError::Unreachable(_) => "unreachable",
            OffloadError::HttpStatus { .. } => "http_status",
            OffloadError::InvalidResponse(_) => "invalid_response",
            OffloadError::Refused(_) => "refused",
        }
    }

    /// Whether another attempt (same transport) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            OffloadError::Timeout(_) | OffloadError::Unreachable(_) => true,
            OffloadError::HttpStatus { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// One way of reaching the cloud. Implementations must honour `timeout` and send
/// `request.request_id` as the idempotency key, so a retried request is answered once.
pub trait OffloadTransport: Send + Sync {
    /// Which transport this is.
    fn kind(&self) -> Transport;
    /// Sends one attempt of `request` and waits at most `timeout` for the answer.
    fn ask<'a>(
        &'a self,
        request: &'a OffloadRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CloudAnswer, OffloadError>>;
}

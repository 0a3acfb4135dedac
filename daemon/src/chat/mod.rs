//! The contract between the local API and what answers a chat request (the router): requests,
//! outcomes and errors in the daemon's own terms, independent of HTTP.

use futures::future::BoxFuture;
use tandem_core::budget::BudgetSnapshot;
use tandem_core::protocol::{ChatMessage, Route};
use tokio::sync::mpsc;

use crate::engine::CancelToken;

/// A chat request after the API validated it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation; the last message is the user's query.
    pub messages: Vec<ChatMessage>,
    /// Most completion tokens; the configured default when unset.
    pub max_tokens: Option<u32>,
    /// Sampling temperature; greedy when unset or 0.
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// Why the answer ended, OpenAI style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishKind {
    /// A natural end or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishKind {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishKind::Stop => "stop",
            FinishKind::Length => "length",
        }
    }
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOutcome {
    /// Which path produced the answer.
    pub route: Route,
    /// The answer text.
    pub content: String,
    /// Why it ended.
    pub finish: FinishKind,
    /// Prompt tokens on the device.
    pub prompt_tokens: u32,
    /// Completion tokens (device tokens, plus the cloud's when it answered).
    pub completion_tokens: u32,
    /// Probability the model gave to asking for help at the decision point.
    pub help_probability: Option<f32>,
    /// The cloud model that answered, when it did.
    pub cloud_model: Option<String>,
    /// Why a help request ended on the device (`budget_ratio`, `timeout`, …), when it did.
    pub fallback_reason: Option<String>,
    /// Time spent generating on the device, ms.
    pub local_ms: u64,
    /// Time spent waiting for the cloud, ms.
    pub cloud_ms: u64,
    /// The telemetry event recorded for this request; it is in the spool when the outcome returns.
    pub event_id: Option<uuid::Uuid>,
}

/// A request that could not be answered at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    /// The request is invalid (HTTP 400), e.g. a prompt longer than the model's context.
    #[error("{0}")]
    Invalid(String),
    /// The device is overloaded (HTTP 429); retry after this many seconds.
    #[error("too many requests are waiting; retry in {retry_after_secs} s")]
    Busy { retry_after_secs: u64 },
    /// The client went away and the generation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The daemon is shutting down (HTTP 503).
    #[error("tandemd is shutting down")]
    ShuttingDown,
    /// Something broke inside (HTTP 500).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What `GET /v1/models` and `/v1/status` report about the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Model id clients send in requests (the bundle name).
    pub id: String,
    /// Bundle version.
    pub version: String,
    /// Execution provider in use.
    pub provider: String,
    /// ONNX Runtime version.
    pub ort_version: String,
    /// Longest prompt plus completion.
    pub context_length: Option<usize>,
}

/// Live state for `/v1/status` and `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    /// The cloud budget now.
    pub budget: BudgetSnapshot,
    /// Telemetry events waiting in the spool.
    pub spool_events: u64,
    /// Telemetry events dropped because the spool was full, since start.
    pub spool_dropped: u64,
    /// Whether offloading is configured.
    pub offload_enabled: bool,
    /// The updater's state, when `[updater]` is enabled.
    pub update: Option<crate::updater::UpdateSnapshot>,
}

/// Answers chat requests (implemented by the router; faked in API tests).
pub trait ChatBackend: Send + Sync {
    /// The loaded model.
    fn model_info(&self) -> ModelInfo;
    /// Live state.
    fn status(&self) -> BackendStatus;
    /// Answers `request`. When `deltas` is given, text is sent there as it becomes final (the
    /// stream ends before the future resolves). `cancel` is triggered when the client goes away.
    fn chat(
        &self,
        request: ChatRequest,
        deltas: Option<mpsc::Sender<String>>,
        cancel: CancelToken,
    ) -> BoxFuture<'_, Result<ChatOutcome, ChatError>>;
}

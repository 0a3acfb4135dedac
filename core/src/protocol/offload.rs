//! Offload over MQTT: a device asks the fleet's gateway to answer a query with the cloud LLM.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One chat message, OpenAI style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Device → gateway, on the device's `offload/request` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OffloadRequest {
    /// Protocol version ([`super::PROTOCOL_VERSION`]).
    pub v: u32,
    /// Correlation id and idempotency key: retries of the same query reuse it (UUIDv7).
    pub request_id: Uuid,
    /// The asking device.
    pub device_id: String,
    /// Version of the model that asked.
    pub model_version: String,
    /// The original query (as the paper: the user's messages, not the local attempt).
    pub messages: Vec<ChatMessage>,
    /// Largest completion the device accepts.
    pub max_tokens: u32,
    /// Sampling temperature for the cloud model, when the caller set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The device's own attempt, sent only where the operator enabled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_attempt: Option<String>,
    /// Unix time in ms after which the device no longer waits for the answer.
    pub deadline_ms: u64,
}

/// Gateway → device, on the device's `offload/response` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OffloadResponse {
    /// Protocol version.
    pub v: u32,
    /// The `request_id` of the request this answers.
    pub request_id: Uuid,
    /// What happened.
    pub outcome: OffloadOutcome,
}

/// The result of an offload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OffloadOutcome {
    /// The cloud answered.
    Answer {
        /// The cloud's answer.
        content: String,
        /// The cloud model that answered.
        model: String,
        /// Prompt tokens the cloud counted.
        prompt_tokens: u32,
        /// Completion tokens the cloud counted.
        completion_tokens: u32,
    },
    /// The gateway refused (its own budget caps); the device answers locally.
    Refused {
        /// Human-readable reason.
        reason: String,
    },
    /// The cloud could not be reached or failed.
    Error {
        /// Human-readable description.
        message: String,
        /// Whether retrying the same request may succeed.
        retryable: bool,
    },
}

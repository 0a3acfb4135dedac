//! Telemetry: one event per query, sent in batches on the device's `telemetry` topic.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which path produced the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// The device answered.
    Local,
    /// The device asked for help and the cloud answered.
    Cloud,
    /// The device asked for help, the cloud could not be used (budget or failure), and the device
    /// answered with the help marker forbidden.
    LocalFallback,
}

impl Route {
    /// The name used in headers, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Cloud => "cloud",
            Route::LocalFallback => "local_fallback",
        }
    }
}

/// How a cloud call travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Straight to an OpenAI-compatible endpoint.
    Https,
    /// Through the fleet's MQTT gateway.
    Mqtt,
}

/// Prompt and completion token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCounts {
    /// Tokens of the prompt.
    pub prompt: u32,
    /// Tokens generated.
    pub completion: u32,
}

/// The budget as the device saw it when the query was settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetState {
    /// Cloud share of settled queries in the budget window.
    pub cloud_share: f64,
    /// Cloud calls that would still have been granted.
    pub calls_available: u64,
}

/// One query, as the fleet stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryEvent {
    /// Unique id (UUIDv7, so ids sort by time); receivers drop duplicates by it.
    pub id: Uuid,
    /// The device.
    pub device_id: String,
    /// Version of the model that answered locally.
    pub model_version: String,
    /// Unix time in ms when the query arrived.
    pub at_ms: u64,
    /// Which path produced the answer.
    pub route: Route,
    /// Whether the model asked for help.
    pub help_requested: bool,
    /// Probability the model gave to asking for help at the decision point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help_probability: Option<f32>,
    /// Tokens the device processed.
    pub local_tokens: TokenCounts,
    /// Time the device spent generating, ms.
    pub local_latency_ms: u32,
    /// Tokens the cloud processed (zero when not called).
    pub cloud_tokens: TokenCounts,
    /// Time spent waiting for the cloud, ms (zero when not called).
    pub cloud_latency_ms: u32,
    /// How the cloud was reached, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The budget when the query was settled.
    pub budget: BudgetState,
    /// Class of the error that forced a fallback (`budget_ratio`, `timeout`, `circuit_open`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// The user's prompt, only where the operator opted in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The device's answer, only where the operator opted in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_answer: Option<String>,
    /// The cloud's answer, only where the operator opted in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_answer: Option<String>,
}

/// What one telemetry message carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryBatch {
    /// Protocol version.
    pub v: u32,
    /// The sending device (must match the topic).
    pub device_id: String,
    /// The events, oldest first.
    pub events: Vec<TelemetryEvent>,
}

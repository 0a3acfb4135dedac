//! Telemetry payloads for tests.

use tandem_core::protocol::{
    PROTOCOL_VERSION, Route, TelemetryBatch, TelemetryBudget, TelemetryEvent, TokenCounts, Transport,
};
use uuid::Uuid;

/// One event of `device` at `at_ms`.
pub fn event(
    device: &str,
    model: &str,
    at_ms: u64,
    route: Route,
    local_ms: u32,
    cloud_ms: u32,
) -> TelemetryEvent {
    let cloud = route == Route::Cloud;
    TelemetryEvent {
        id: Uuid::now_v7(),
        device_id: device.into(),
        model_version: model.into(),
        at_ms,
        route,
        help_requested: route != Route::Local,
        help_probability: Some(if route == Route::Local { 0.1 } else { 0.9 }),
        local_tokens: TokenCounts { prompt: 10, completion: 20 },
        local_latency_ms: local_ms,
        cloud_tokens: if cloud { TokenCounts { prompt: 10, completion: 30 } } else { TokenCounts::default() },
        cloud_latency_ms: cloud_ms,
        transport: cloud.then_some(Transport::Mqtt),
        budget: TelemetryBudget { cloud_share: 0.2, calls_available: 1 },
        error_class: None,
        prompt: None,
        local_answer: None,
        cloud_answer: None,
    }
}

/// The JSON of a batch of `events` of `device`.
pub fn payload(device: &str, events: &[TelemetryEvent]) -> Vec<u8> {
    serde_json::to_vec(&TelemetryBatch {
        v: PROTOCOL_VERSION,
        device_id: device.into(),
        events: events.to_vec(),
    })
    .unwrap()
}

/// Now, in Unix ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

//! The wire protocol between devices and the fleet: MQTT topics and the JSON payloads on them.
//! `docs/protocol.md` documents these types; its JSON Schemas are generated from them
//! ([`json_schemas`]) and a test keeps the document current.

mod assignment;
mod offload;
pub mod openai;
mod status;
mod telemetry;
mod topics;

pub use assignment::{ModelAssignment, UpdateReport, UpdateState};
pub use offload::{ChatMessage, OffloadOutcome, OffloadRequest, OffloadResponse};
pub use status::DeviceStatus;
pub use telemetry::{
    BudgetState as TelemetryBudget, Route, TelemetryBatch, TelemetryEvent, TokenCounts, Transport,
};
pub use topics::{DeviceTopics, TOPIC_ROOT, TopicKind, parse_device_topic};

/// Version of every payload defined here; receivers refuse other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// JSON Schemas of every payload, by type name, in document order.
pub fn json_schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(T)).expect("schemas serialise")
    }
    vec![
        ("OffloadRequest", schema::<OffloadRequest>()),
        ("OffloadResponse", schema::<OffloadResponse>()),
        ("TelemetryBatch", schema::<TelemetryBatch>()),
        ("DeviceStatus", schema::<DeviceStatus>()),
        ("ModelAssignment", schema::<ModelAssignment>()),
    ]
}

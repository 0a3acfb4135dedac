//! Checking one telemetry message against the protocol before anything is stored: the payload must
//! be a v1 `TelemetryBatch` of the device named by the topic; each event must belong to that device,
//! carry a UUIDv7 id and plausible numbers. Bad messages are refused whole; bad events inside a good
//! message are refused one by one. Nothing here panics on any input.

use tandem_core::protocol::{PROTOCOL_VERSION, TelemetryBatch, TelemetryEvent};

/// Why a whole message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMessage {
    /// Larger than `ingest.max_message_bytes`.
    Oversized,
    /// Not JSON at all.
    Malformed,
    /// JSON, but not a `TelemetryBatch` (missing, unknown or mistyped fields).
    Schema,
    /// Another protocol version.
    Version,
    /// The batch names another device than its topic.
    DeviceMismatch,
}

/// Why one event inside a good message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEvent {
    /// The event names another device than its topic.
    Device,
    /// The id is not a UUIDv7.
    Id,
    /// A number is out of range (probability or share outside [0, 1], time beyond 2^63 ms).
    Value,
    /// Empty or overlong model version.
    ModelVersion,
}

impl BadMessage {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            BadMessage::Oversized => "oversized",
            BadMessage::Malformed => "malformed",
            BadMessage::Schema => "schema",
            BadMessage::Version => "version",
            BadMessage::DeviceMismatch => "device_mismatch",
        }
    }
}

impl BadEvent {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            BadEvent::Device => "event_device_mismatch",
            BadEvent::Id => "event_id_not_uuid_v7",
            BadEvent::Value => "event_value_out_of_range",
            BadEvent::ModelVersion => "event_model_version",
        }
    }
}

/// A message that passed: its good events and the reasons its bad ones were dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidBatch {
    pub events: Vec<TelemetryEvent>,
    pub rejected: Vec<BadEvent>,
}

/// Validates the payload of a message published on `device`'s telemetry topic.
pub fn validate_telemetry(device: &str, payload: &[u8], max_bytes: usize) -> Result<ValidBatch, BadMessage> {
    if payload.len() > max_bytes {
        return Err(BadMessage::Oversized);
    }
    let batch: TelemetryBatch = serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => BadMessage::Schema,
        _ => BadMessage::Malformed,
    })?;
    if batch.v != PROTOCOL_VERSION {
        return Err(BadMessage::Version);
    }
    if batch.device_id != device {
        return Err(BadMessage::DeviceMismatch);
    }
    let mut valid = ValidBatch { events: Vec::with_capacity(batch.events.len()), rejected: Vec::new() };
    for event in batch.events {
        match check_event(device, &event) {
            Ok(()) => valid.events.push(event),
            Err(reason) => valid.rejected.push(reason),
        }
    }
    Ok(valid)
}

fn check_event(device: &str, event: &TelemetryEvent) -> Result<(), BadEvent> {
    if event.device_id != device {
        return Err(BadEvent::Device);
    }
    if event.id.get_version_num() != 7 {
        return Err(BadEvent::Id);
    }
    if event.model_version.is_empty() || event.model_version.len() > 256 {
        return Err(BadEvent::ModelVersion);
    }
    let unit = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
    let probability_ok = event.help_probability.is_none_or(|p| unit(f64::from(p)));
    if !probability_ok || !unit(event.budget.cloud_share) || i64::try_from(event.at_ms).is_err() {
        return Err(BadEvent::Value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tandem_core::protocol::{Route, TelemetryBudget, TokenCounts};
    use uuid::Uuid;

    use super::*;

    fn event(device: &str) -> TelemetryEvent {
        TelemetryEvent {
            id: Uuid::now_v7(),
            device_id: device.into(),
            model_version: "m@1".into(),
            at_ms: 1,
            route: Route::Local,
            help_requested: false,
            help_probability: Some(0.1),
            local_tokens: TokenCounts::default(),
            local_latency_ms: 1,
            cloud_tokens: TokenCounts::default(),
            cloud_latency_ms: 0,
            transport: None,
            budget: TelemetryBudget::default(),
            error_class: None,
            prompt: None,
            local_answer: None,
            cloud_answer: None,
        }
    }

    fn payload(device: &str, events: Vec<TelemetryEvent>) -> Vec<u8> {
        serde_json::to_vec(&TelemetryBatch { v: PROTOCOL_VERSION, device_id: device.into(), events }).unwrap()
    }

    #[test]
    fn a_good_batch_passes_whole() {
        let events = vec![event("d"), event("d")];
        let valid = validate_telemetry("d", &payload("d", events.clone()), 1 << 20).unwrap();
        assert_eq!(valid, ValidBatch { events, rejected: vec![] });
    }

    #[test]
    fn bad_messages_are_refused_with_their_reason() {
        let good = payload("d", vec![event("d")]);
        assert_eq!(validate_telemetry("d", &good, 10), Err(BadMessage::Oversized));
        assert_eq!(validate_telemetry("d", b"{\"v\":1,", 1 << 20), Err(BadMessage::Malformed));
        assert_eq!(validate_telemetry("d", b"\xff\xfe", 1 << 20), Err(BadMessage::Malformed));
        let unknown_field = json!({"v": 1, "device_id": "d", "events": [], "extra": 1}).to_string();
        assert_eq!(validate_telemetry("d", unknown_field.as_bytes(), 1 << 20), Err(BadMessage::Schema));
        let wrong_type = json!({"v": 1, "device_id": "d", "events": "none"}).to_string();
        assert_eq!(validate_telemetry("d", wrong_type.as_bytes(), 1 << 20), Err(BadMessage::Schema));
        let v2 = json!({"v": 2, "device_id": "d", "events": []}).to_string();
        assert_eq!(validate_telemetry("d", v2.as_bytes(), 1 << 20), Err(BadMessage::Version));
        assert_eq!(validate_telemetry("other", &good, 1 << 20), Err(BadMessage::DeviceMismatch));
    }

    #[test]
    fn bad_events_are_dropped_one_by_one() {
        let foreign = event("x");
        let mut v4 = event("d");
        v4.id = Uuid::from_u128(0x1234_5678_1234_4234_8234_1234_5678_9abc);
        let mut probability = event("d");
        probability.help_probability = Some(2.0);
        let mut share = event("d");
        share.budget.cloud_share = 1.5;
        let mut late = event("d");
        late.at_ms = u64::MAX;
        let mut model = event("d");
        model.model_version.clear();
        let good = event("d");
        let batch = vec![foreign, v4, good.clone(), probability, share, late, model];
        let valid = validate_telemetry("d", &payload("d", batch), 1 << 20).unwrap();
        assert_eq!(valid.events, vec![good]);
        assert_eq!(
            valid.rejected,
            vec![
                BadEvent::Device,
                BadEvent::Id,
                BadEvent::Value,
                BadEvent::Value,
                BadEvent::Value,
                BadEvent::ModelVersion
            ]
        );
    }
}

//! `GET /v1/status`: the loaded model, the execution provider, the budget, the telemetry spool,
//! the admission queue and the model updater, as one JSON object.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::state::ApiState;
use crate::updater::{UpdateOutcome, UpdateSnapshot};

pub(crate) async fn status(State(state): State<ApiState>) -> Json<Value> {
    let model = state.backend().model_info();
    let live = state.backend().status();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device_id": state.settings().device_id,
        "uptime_secs": state.uptime().as_secs(),
        "model": {
            "id": model.id,
            "version": model.version,
            "provider": model.provider,
            "ort_version": model.ort_version,
            "context_length": model.context_length,
        },
        "provider": model.provider,
        "offload_enabled": live.offload_enabled,
        "budget": live.budget,
        "spool": { "events": live.spool_events, "dropped": live.spool_dropped },
        "queue": { "depth": state.queue_depth(), "max": state.settings().max_queue },
        "update": live.update.as_ref().map_or_else(|| json!({ "enabled": false }), update),
    }))
}

fn update(snapshot: &UpdateSnapshot) -> Value {
    let report = snapshot.report.as_ref();
    let outcomes: serde_json::Map<String, Value> =
        UpdateOutcome::ALL.iter().map(|o| (o.as_str().to_string(), json!(snapshot.count(*o)))).collect();
    json!({
        "enabled": true,
        "model_version": snapshot.model_version,
        "slot": snapshot.slot,
        "on_probation": snapshot.on_probation,
        "state": report.map(|r| r.state),
        "version": report.map(|r| r.version.clone()),
        "detail": report.and_then(|r| r.detail.clone()),
        "at_ms": report.map(|r| r.at_ms),
        "outcomes": outcomes,
    })
}

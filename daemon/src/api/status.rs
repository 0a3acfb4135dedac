//! `GET /v1/status`: the loaded model, the execution provider, the budget, the telemetry spool and
//! the admission queue, as one JSON object.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::state::ApiState;

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
    }))
}

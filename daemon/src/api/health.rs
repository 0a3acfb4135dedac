//! `GET /healthz`: 200 while serving, 503 once shutdown began; never needs a token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::state::ApiState;

pub(crate) async fn healthz(State(state): State<ApiState>) -> (StatusCode, Json<Value>) {
    if state.shutdown().is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "shutting_down" })))
    } else {
        (StatusCode::OK, Json(json!({ "status": "ok" })))
    }
}

//! `GET /v1/models`: the one model this daemon serves, in OpenAI's list format.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::state::ApiState;

pub(crate) async fn list_models(State(state): State<ApiState>) -> Json<Value> {
    let model = state.backend().model_info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": model.id,
            "object": "model",
            "created": state.started_unix(),
            "owned_by": "tandem",
        }],
    }))
}

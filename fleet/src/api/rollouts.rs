//! Rollouts over HTTP, and the device-facing assignment route.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::ApiState;
use super::device_auth::{self, Caller};
use super::error::ApiError;
use crate::rollout::{NewRollout, Rollouts};

fn rollouts(state: &ApiState) -> Result<&Rollouts, ApiError> {
    state
        .rollouts
        .as_deref()
        .ok_or_else(|| ApiError::NotFound("rollouts need a [registry]; this fleet has none".into()))
}

pub async fn create(
    State(state): State<ApiState>,
    Json(request): Json<NewRollout>,
) -> Result<Response, ApiError> {
    let record = rollouts(&state)?.create(request).await?;
    Ok((StatusCode::CREATED, Json(serde_json::to_value(record).expect("records serialise"))).into_response())
}

pub async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    rollouts(&state)?;
    Ok(Json(json!({ "rollouts": state.store.list_rollouts().await? })))
}

/// The rollout with every device it reached.
pub async fn show(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    rollouts(&state)?;
    let record =
        state.store.rollout(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no rollout {id}")))?;
    let devices: Vec<Value> = state
        .store
        .rollout_devices(&id)
        .await?
        .into_iter()
        .map(|(device, assigned_at_ms, rolled_back_ms)| {
            json!({ "id": device, "assigned_at_ms": assigned_at_ms, "rolled_back_ms": rolled_back_ms })
        })
        .collect();
    let mut body = serde_json::to_value(record).expect("records serialise");
    body["devices"] = Value::Array(devices);
    Ok(Json(body))
}

pub async fn pause(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let record = rollouts(&state)?.pause(&id).await?;
    Ok(Json(serde_json::to_value(record).expect("records serialise")))
}

pub async fn resume(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let record = rollouts(&state)?.resume(&id).await?;
    Ok(Json(serde_json::to_value(record).expect("records serialise")))
}

pub async fn abort(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let record = rollouts(&state)?.abort(&id).await?;
    Ok(Json(serde_json::to_value(record).expect("records serialise")))
}

/// `GET /v1/devices/{id}/assignment`: the `ModelAssignment` retained on the device's topic, for
/// devices that poll. A device reads only its own (403 for another's); the operator reads any.
pub async fn assignment(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Caller::Device(device) = device_auth::caller(&state, &headers)?
        && device != id
    {
        return Err(ApiError::Forbidden(format!(
            "device {device} may read only its own assignment, not {id}'s"
        )));
    }
    let row = state
        .store
        .assignment(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no assignment for device {id}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], row.payload).into_response())
}

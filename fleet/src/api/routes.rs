//! The handlers.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::ApiState;
use super::error::ApiError;
use super::openapi::OPENAPI_JSON;
use super::query::{EventParams, StatsParams};
use super::{dashboard, jobs, models, rollouts};
use crate::metrics::OPENMETRICS_CONTENT_TYPE;

/// The `/v1/` routes devices call with their own credentials rather than the operator's token (see
/// `device_auth`): bundle downloads and a device's own assignment. The OpenAPI test checks the
/// document marks exactly the other `/v1/` routes as needing the token.
#[cfg(test)]
pub const DEVICE_PATHS: [&str; 2] = ["/v1/registry/{name}/{version}/{file}", "/v1/devices/{id}/assignment"];

/// Routes outside the operator's token (the two device routes check their caller themselves).
pub fn open() -> Router<ApiState> {
    Router::new()
        .route("/v1/registry/{name}/{version}/{file}", get(models::file))
        .route("/v1/devices/{id}/assignment", get(rollouts::assignment))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(dashboard::page))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::style))
}

/// Routes behind the bearer token.
pub fn v1() -> Router<ApiState> {
    Router::new()
        .route("/v1/devices", get(devices))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(events))
        .route("/v1/budget", get(budget))
        .route("/v1/dashboard", get(dashboard::data))
        .route("/v1/models", get(models::list).post(models::register))
        .route("/v1/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/v1/rollouts/{id}", get(rollouts::show))
        .route("/v1/rollouts/{id}/pause", post(rollouts::pause))
        .route("/v1/rollouts/{id}/resume", post(rollouts::resume))
        .route("/v1/rollouts/{id}/abort", post(rollouts::abort))
        .route("/v1/jobs", get(jobs::list).post(jobs::create))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/datasets/export", get(jobs::export))
}

async fn health(State(state): State<ApiState>) -> Response {
    let database = state.store.ping().await;
    let mqtt = state.mqtt_ready.load(Ordering::Relaxed);
    let status = if database && mqtt { "ok" } else { "degraded" };
    let code =
        if database { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({ "status": status, "database": database, "mqtt": mqtt }))).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], state.metrics.encode()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn devices(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let devices = state.store.list_devices().await?;
    Ok(Json(json!({ "devices": devices })))
}

async fn stats(
    State(state): State<ApiState>,
    Query(params): Query<StatsParams>,
) -> Result<Json<Value>, ApiError> {
    let report = state.store.stats(&params.query()?).await?;
    Ok(Json(serde_json::to_value(report).expect("reports serialise")))
}

async fn events(
    State(state): State<ApiState>,
    Query(params): Query<EventParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = params.limit.unwrap_or(100).clamp(1, state.max_page);
    let page = state.store.list_events(&params.filter(), params.after, limit).await?;
    Ok(Json(serde_json::to_value(page).expect("pages serialise")))
}

async fn budget(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let budgets = state.budgets.as_ref().ok_or(ApiError::NoGateway)?;
    let (device_fraction, fleet_fraction) = budgets.fractions();
    let report = budgets.report();
    Ok(Json(json!({
        "device_cloud_fraction": device_fraction,
        "fleet_cloud_fraction": fleet_fraction,
        "fleet": report.fleet,
        "devices": report.devices.into_iter().map(|(device, snapshot)| json!({"device": device, "budget": snapshot})).collect::<Vec<_>>(),
    })))
}

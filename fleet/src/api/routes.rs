//! The handlers.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::ApiState;
use super::dashboard;
use super::error::ApiError;
use super::openapi::OPENAPI_JSON;
use super::query::{EventParams, StatsParams};
use crate::metrics::OPENMETRICS_CONTENT_TYPE;

/// Routes anyone may call.
pub fn open() -> Router<ApiState> {
    Router::new()
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

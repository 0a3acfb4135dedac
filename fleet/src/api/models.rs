//! The model registry over HTTP: registering a bundle folder on the fleet host, listing what is
//! registered, and serving bundle files to devices with range requests.

use std::path::PathBuf;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::{ApiState, device_auth};
use crate::registry::Registry;
use crate::registry::range::{RangeAnswer, parse_range};

/// `POST /v1/models`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// A bundle folder on the fleet host (as `tandem-train sign` left it).
    path: PathBuf,
}

fn registry(state: &ApiState) -> Result<&Registry, ApiError> {
    state
        .registry
        .as_deref()
        .ok_or_else(|| ApiError::NotFound("this fleet has no [registry] configured".into()))
}

pub async fn register(
    State(state): State<ApiState>,
    Json(request): Json<RegisterRequest>,
) -> Result<Response, ApiError> {
    let registered = registry(&state)?.register(&state.store, &request.path).await?;
    let code = if registered.created { StatusCode::CREATED } else { StatusCode::OK };
    let mut body = serde_json::to_value(&registered.model).expect("records serialise");
    body["created"] = json!(registered.created);
    Ok((code, Json(body)).into_response())
}

pub async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    registry(&state)?;
    Ok(Json(json!({ "models": state.store.list_models().await? })))
}

/// `GET /v1/registry/{name}/{version}/{file}`: one file of a registered bundle, whole or one byte
/// range (`Range: bytes=N-`), read from the registry's store. Any device with its credentials (or
/// the operator) may download (`device_auth`).
pub async fn file(
    State(state): State<ApiState>,
    Path((name, version, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    device_auth::caller(&state, &headers)?;
    let not_found = || ApiError::NotFound(format!("no file {file} in a registered bundle {name} {version}"));
    let registry = registry(&state)?;
    let model = state.store.model(&name, &version).await?.ok_or_else(not_found)?;
    let served =
        registry.served_file(&name, &version, &file, &model.manifest_sha256).await?.ok_or_else(not_found)?;
    let len = served.len;
    let range = parse_range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), len);
    let (status, start, end) = match range {
        RangeAnswer::Whole => (StatusCode::OK, 0, len),
        RangeAnswer::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        RangeAnswer::Unsatisfiable => {
            let mut response =
                ApiError::BadRequest(format!("the range is outside the file's {len} bytes")).into_response();
            *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            response.headers_mut().insert(header::CONTENT_RANGE, value(&format!("bytes */{len}")));
            return Ok(response);
        }
    };
    let wanted = (status == StatusCode::PARTIAL_CONTENT).then_some(start..end);
    let stream = registry.read(&name, &version, &file, &served, wanted).await?;
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, value(&(end - start).to_string()));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    // A registered version never changes; caches may keep it, but only for this device.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
    headers.insert(header::ETAG, value(&format!("\"{}-{file}\"", model.manifest_sha256)));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(header::CONTENT_RANGE, value(&format!("bytes {start}-{}/{len}", end - 1)));
    }
    Ok(response)
}

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("ASCII header values")
}

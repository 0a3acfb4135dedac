//! Retraining jobs over HTTP, and the dataset export for operators.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::ApiError;
use crate::scheduler::dataset::{DatasetBuilder, DatasetExportError, PAGE, read_all_task_data};
use crate::scheduler::rules::Trigger;
use crate::scheduler::{Scheduler, runner};
use crate::store::Store;

fn scheduler(state: &ApiState) -> Result<&std::sync::Arc<Scheduler>, ApiError> {
    state
        .scheduler
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("this fleet has no [scheduler] configured".into()))
}

/// `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// A job template of `[scheduler]`.
    template: String,
    /// Dotted keys of the run configuration to set, on top of the template's overrides.
    #[serde(default)]
    overrides: BTreeMap<String, toml::Value>,
}

pub async fn create(
    State(state): State<ApiState>,
    Json(request): Json<NewJob>,
) -> Result<Response, ApiError> {
    let trigger = Trigger { kind: "on_demand", detail: "requested over the API".into() };
    let record = scheduler(&state)?.submit(&request.template, &request.overrides, trigger).await?;
    Ok((StatusCode::CREATED, Json(serde_json::to_value(record).expect("records serialise"))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    limit: Option<u32>,
}

pub async fn list(
    State(state): State<ApiState>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    scheduler(&state)?;
    let limit = params.limit.unwrap_or(100).clamp(1, state.max_page);
    Ok(Json(json!({ "jobs": state.store.list_jobs(limit).await? })))
}

/// The job with the tail of its log.
pub async fn show(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let lines = scheduler(&state)?.log_tail_lines();
    let record = state.store.job(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let log = std::path::PathBuf::from(&record.log_path);
    let tail = tokio::task::spawn_blocking(move || runner::log_tail(&log, lines))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut body = serde_json::to_value(record).expect("records serialise");
    body["log_tail"] = tail.into();
    Ok(Json(body))
}

pub async fn cancel(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let record = scheduler(&state)?.cancel(&id).await?;
    Ok(Json(serde_json::to_value(record).expect("records serialise")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// Only events at or after this Unix ms (device clock).
    #[serde(default)]
    since: i64,
    /// Start with this job template's task data.
    #[serde(default)]
    template: Option<String>,
}

/// `GET /v1/datasets/export`: the trainer's JSONL, streamed page by page from the database:
/// the template's task data when one is named, then every opted-in prompt since `since`, each
/// prompt once and none of the template's held-out data.
pub async fn export(
    State(state): State<ApiState>,
    Query(params): Query<ExportParams>,
) -> Result<Response, ApiError> {
    let (builder, head) = match &params.template {
        None => (DatasetBuilder::default(), String::new()),
        Some(name) => {
            let template = scheduler(&state)?
                .template(name)
                .ok_or_else(|| ApiError::BadRequest(format!("no job template `{name}` in [scheduler]")))?;
            let paths =
                crate::scheduler::task_data(template).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            let held_out = template.held_out.clone();
            let read = tokio::task::spawn_blocking(move || {
                Ok::<_, DatasetExportError>((read_all_task_data(&held_out)?, read_all_task_data(&paths)?))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("reading the task data: {e}")))?;
            let (held_out, records) = read.map_err(|e| ApiError::Internal(e.to_string()))?;
            let mut builder = DatasetBuilder::new(&held_out);
            let head = builder.task_records(&records);
            (builder, head)
        }
    };
    struct Cursor {
        store: Store,
        since: i64,
        after: Option<String>,
        builder: DatasetBuilder,
        head: Option<String>,
        done: bool,
    }
    let cursor = Cursor {
        store: state.store.clone(),
        since: params.since,
        after: None,
        builder,
        head: Some(head),
        done: false,
    };
    let stream = futures::stream::unfold(cursor, |mut cursor| async move {
        if let Some(head) = cursor.head.take() {
            return Some((Ok::<_, std::io::Error>(Bytes::from(head)), cursor));
        }
        if cursor.done {
            return None;
        }
        let page = match cursor.store.collected_prompts(cursor.since, cursor.after.as_deref(), PAGE).await {
            Ok(page) => page,
            Err(error) => {
                cursor.done = true;
                return Some((Err(std::io::Error::other(error.to_string())), cursor));
            }
        };
        let chunk = cursor.builder.collected(&page);
        match page.last() {
            Some(last) if page.len() == PAGE as usize => cursor.after = Some(last.id.clone()),
            _ => cursor.done = true,
        }
        Some((Ok(Bytes::from(chunk)), cursor))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

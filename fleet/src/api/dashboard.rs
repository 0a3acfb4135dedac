//! The dashboard: one static page (HTML, CSS and a script that draws SVG charts itself, nothing
//! fetched from elsewhere) and the one endpoint it reads, `/v1/dashboard`. The page takes the API
//! token from its URL fragment (`/#token=…`), which browsers never send to the server.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::ApiState;
use super::error::ApiError;
use super::query::{DashboardParams, parse_duration_ms};
use crate::store::{GroupBy, StatsQuery, now_ms};

const PAGE: &str = include_str!("../../assets/index.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

pub async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

pub async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// Everything the page draws: the call ratio per model version over time, the totals, both latency
/// distributions, the devices with their own numbers and update state, the newest rollouts, and
/// the gateway's fleet budget.
pub async fn data(
    State(state): State<ApiState>,
    Query(params): Query<DashboardParams>,
) -> Result<Json<Value>, ApiError> {
    let window = params.window.as_deref().map(parse_duration_ms).transpose()?.unwrap_or(86_400_000);
    let to = now_ms() + 1;
    let from = to - window;
    let bucket = match params.bucket.as_deref() {
        Some(bucket) => parse_duration_ms(bucket)?,
        None => nice_bucket(window / 60),
    };
    // Aligned to the bucket, so the first point is a whole bucket too.
    let from = from.div_euclid(bucket) * bucket;
    let query = |group_by, bucket_ms| StatsQuery {
        from_ms: from,
        to_ms: to,
        bucket_ms,
        group_by,
        device: None,
        model_version: None,
        group: None,
    };
    let (overall, distributions) = state.store.stats_with_distributions(&query(GroupBy::None, None)).await?;
    let by_model = state.store.stats(&query(GroupBy::ModelVersion, Some(bucket))).await?;
    let by_device = state.store.stats(&query(GroupBy::Device, None)).await?;
    let devices = state.store.list_devices().await?;
    let rollouts = recent_rollouts(&state.store).await?;

    let mut series: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for row in &by_model.rows {
        series.entry(row.key.clone()).or_default().push(json!({
            "t": row.bucket_start_ms,
            "queries": row.queries,
            "cloud": row.cloud,
            "call_ratio": row.call_ratio,
            "help_ratio": row.help_ratio,
        }));
    }
    let per_device: BTreeMap<&str, _> = by_device.rows.iter().map(|r| (r.key.as_str(), r)).collect();
    let devices: Vec<Value> = devices
        .iter()
        .map(|d| {
            let numbers = per_device.get(d.id.as_str());
            json!({
                "id": d.id,
                "group": d.group,
                "model_version": d.model_version,
                "reported_version": d.reported_version,
                "update": d.update,
                "status": d.status,
                "last_seen_ms": d.last_seen_ms,
                "queries": numbers.map_or(0, |r| r.queries),
                "call_ratio": numbers.map(|r| r.call_ratio),
                "local_p50_ms": numbers.and_then(|r| r.local_latency_ms).map(|p| p.p50),
            })
        })
        .collect();
    let histogram =
        |h: &crate::store::LatencyHistogram| h.buckets().map(|(q, n)| json!([q, n])).collect::<Vec<_>>();
    Ok(Json(json!({
        "now_ms": to - 1,
        "from_ms": from,
        "to_ms": to,
        "bucket_ms": bucket,
        "budget_fraction": state.budget_fraction,
        "totals": overall.totals,
        "series": series.into_iter().map(|(model, points)| json!({"model_version": model, "points": points})).collect::<Vec<_>>(),
        "latency": {
            "local": { "percentiles": overall.totals.local_latency_ms, "histogram": histogram(&distributions.local) },
            "cloud": { "percentiles": overall.totals.cloud_latency_ms, "histogram": histogram(&distributions.cloud) },
        },
        "devices": devices,
        "rollouts": rollouts,
        "gateway": state.budgets.as_ref().map(|b| b.report().fleet),
    })))
}

/// Rollouts shown at most.
const RECENT_ROLLOUTS: usize = 5;

/// The newest rollouts: what they roll out, where they are, how many devices they reached.
async fn recent_rollouts(store: &crate::store::Store) -> Result<Vec<Value>, ApiError> {
    let mut shown = Vec::new();
    for rollout in store.list_rollouts().await?.into_iter().take(RECENT_ROLLOUTS) {
        let reached = store.rollout_devices(&rollout.id).await?;
        let rolled_back = reached.iter().filter(|(_, _, back)| back.is_some()).count();
        let stage = rollout.plan.stages.get(rollout.stage);
        shown.push(json!({
            "id": rollout.id,
            "model": rollout.model_name,
            "version": rollout.version,
            "rollback_version": rollout.rollback_version,
            "status": rollout.status.as_str(),
            "stage": rollout.stage + 1,
            "stages": rollout.plan.stages.len(),
            "stage_percent": stage.map(|s| s.percent),
            "group": rollout.plan.group,
            "reached": reached.len(),
            "rolled_back": rolled_back,
            "reason": rollout.reason,
            "waiting": rollout.waiting,
            "created_ms": rollout.created_ms,
            "updated_ms": rollout.updated_ms,
        }));
    }
    Ok(shown)
}

/// The smallest of 1 s, 5 s, 15 s, 1 min, 5 min, 15 min, 1 h, 6 h, 1 d at least `ms`.
fn nice_bucket(ms: i64) -> i64 {
    const STEPS: [i64; 9] =
        [1_000, 5_000, 15_000, 60_000, 300_000, 900_000, 3_600_000, 21_600_000, 86_400_000];
    STEPS.into_iter().find(|s| *s >= ms).unwrap_or(86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_round() {
        assert_eq!(nice_bucket(10), 1_000);
        assert_eq!(nice_bucket(86_400_000 / 60), 3_600_000);
        assert_eq!(nice_bucket(3_600_000 / 60), 60_000);
    }
}

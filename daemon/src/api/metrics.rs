//! Prometheus metrics of the local API. Counters and histograms are bumped by the events in
//! `events`; the budget, spool, queue and model (version, updates) metrics are read from the
//! backend at scrape time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::state::ApiState;
use crate::chat::ChatBackend;
use crate::updater::UpdateOutcome;

/// The OpenMetrics text format `prometheus-client` writes (Prometheus reads it).
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Route label of requests that produced no answer.
pub const NO_ROUTE: &str = "none";

/// `tandem_requests_total` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `local`, `cloud`, `local_fallback`, or `none` for requests that got no answer.
    pub route: &'static str,
    /// HTTP status sent (499: the client went away).
    pub status: u16,
}

/// `tandem_request_duration_seconds` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// `tandem_tokens_total` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `prompt` or `completion`.
    pub kind: &'static str,
    pub route: &'static str,
}

/// `tandem_model_info` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    version: String,
    /// `a`, `b`, or `configured` for the configured model directory.
    slot: String,
}

/// `tandem_model_updates_total` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    /// `activated`, `failed` or `rolled_back`.
    outcome: &'static str,
}

type DurationFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The metrics the API's events update.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: DurationFamily,
    tokens: Family<TokenLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    // 50 ms … ~100 s: a cached local answer up to a long cloud round trip on a slow link.
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

impl ApiMetrics {
    fn new() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            tokens: Family::default(),
        }
    }

    /// Counts one chat request that ended with `status`.
    pub fn count_request(&self, route: &'static str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
    }

    /// Records an answered request's duration and tokens.
    pub fn observe_answer(&self, route: &'static str, elapsed: Duration, prompt: u32, completion: u32) {
        self.duration.get_or_create(&RouteLabels { route }).observe(elapsed.as_secs_f64());
        self.tokens.get_or_create(&TokenLabels { kind: "prompt", route }).inc_by(u64::from(prompt));
        self.tokens.get_or_create(&TokenLabels { kind: "completion", route }).inc_by(u64::from(completion));
    }
}

/// The registry and the metrics in it.
pub(crate) fn build_registry(
    backend: Arc<dyn ChatBackend>,
    queue: Arc<Semaphore>,
    max_queue: usize,
) -> (Registry, ApiMetrics) {
    let metrics = ApiMetrics::new();
    let mut registry = Registry::default();
    registry.register(
        "tandem_requests",
        "Chat completion requests by answering route and HTTP status",
        metrics.requests.clone(),
    );
    registry.register(
        "tandem_request_duration_seconds",
        "Time from receiving a chat request to its complete answer, by route",
        metrics.duration.clone(),
    );
    registry.register(
        "tandem_tokens",
        "Tokens of answered chat requests, by kind (prompt, completion) and route",
        metrics.tokens.clone(),
    );
    registry.register_collector(Box::new(LiveState { backend: BackendRef(backend), queue, max_queue }));
    (registry, metrics)
}

/// Reads gauges from the backend and the admission queue at scrape time, so they are never stale.
#[derive(Debug)]
struct LiveState {
    backend: BackendRef,
    queue: Arc<Semaphore>,
    max_queue: usize,
}

struct BackendRef(Arc<dyn ChatBackend>);

impl fmt::Debug for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChatBackend")
    }
}

impl Collector for LiveState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let status = self.backend.0.status();
        let depth = self.max_queue.saturating_sub(self.queue.available_permits());
        let ratios = [
            (
                "tandem_budget_cloud_share",
                "Cloud share of settled queries in the budget window",
                status.budget.cloud_share,
            ),
            ("tandem_budget_cloud_fraction", "Configured largest cloud share", status.budget.cloud_fraction),
        ];
        for (name, help, value) in ratios {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counts = [
            (
                "tandem_queue_depth",
                "Chat requests admitted now (running or waiting for the model)",
                depth as u64,
            ),
            (
                "tandem_budget_calls_available",
                "Cloud calls the budget would still grant now",
                status.budget.calls_available,
            ),
            ("tandem_spool_events", "Telemetry events waiting in the disk spool", status.spool_events),
        ];
        for (name, help, value) in counts {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let dropped = ConstCounter::new(status.spool_dropped);
        dropped.encode(encoder.encode_descriptor(
            "tandem_spool_dropped",
            "Telemetry events dropped because the spool was full, since start",
            None,
            dropped.metric_type(),
        )?)?;

        let model = self.backend.0.model_info();
        let update = status.update.unwrap_or_default();
        let labels = ModelLabels {
            model: model.id,
            version: model.version,
            slot: update.slot.clone().unwrap_or_else(|| "configured".into()),
        };
        let info = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "tandem_model_info",
            "The model served now (always 1), by name, version and slot",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&labels)?)?;
        let probation = ConstGauge::new(i64::from(update.on_probation));
        probation.encode(encoder.encode_descriptor(
            "tandem_model_on_probation",
            "1 while the model served is on probation after an update",
            None,
            probation.metric_type(),
        )?)?;
        let mut updates = encoder.encode_descriptor(
            "tandem_model_updates",
            "Model updates since start, by outcome (activated, failed, rolled_back)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for outcome in UpdateOutcome::ALL {
            let labels = UpdateLabels { outcome: outcome.as_str() };
            ConstCounter::new(update.count(outcome)).encode(updates.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `GET /metrics`.
pub(crate) async fn scrape(State(state): State<ApiState>) -> Response {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, state.registry()) {
        return ApiError::internal(format!("could not encode metrics: {error}")).into_response();
    }
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response()
}

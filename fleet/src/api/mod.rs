//! The operator API (axum): devices, statistics, raw events, the gateway's budgets, the model
//! registry, rollouts and retraining jobs under `/v1/` (bearer token), plus `/healthz`, `/metrics` (Prometheus),
//! `/openapi.json` and the dashboard. Devices use two `/v1/` routes with their own credentials
//! instead of the operator's token: bundle downloads and their own assignment (see
//! `routes::DEVICE_PATHS` and `device_auth`). Served over plain HTTP, or HTTPS with `[api.tls]` (see
//! `tls`).

mod dashboard;
mod device_auth;
mod error;
mod jobs;
mod models;
mod openapi;
mod query;
mod rollouts;
mod routes;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tandemd::offload::Secret;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use openapi::OPENAPI_JSON;

use crate::devices_file::DeviceDirectory;
use crate::gateway::BudgetBook;
use crate::metrics::FleetMetrics;
use crate::registry::Registry;
use crate::rollout::Rollouts;
use crate::scheduler::Scheduler;
use crate::store::Store;
use error::ApiError;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub metrics: Arc<FleetMetrics>,
    /// The gateway's budgets, when the gateway runs.
    pub budgets: Option<Arc<BudgetBook>>,
    /// The cloud fraction the dashboard draws as the budget band.
    pub budget_fraction: f64,
    /// Largest page of `/v1/events`.
    pub max_page: u32,
    /// Whether the MQTT side is up (the embedded broker listens, or the external one is connected).
    pub mqtt_ready: Arc<std::sync::atomic::AtomicBool>,
    /// The model registry, when configured.
    pub registry: Option<Arc<Registry>>,
    /// The rollout service (with the registry).
    pub rollouts: Option<Arc<Rollouts>>,
    /// The retraining scheduler, when configured.
    pub scheduler: Option<Arc<Scheduler>>,
    /// The devices file, whose credentials let devices download bundles and read their assignment.
    devices: Option<DeviceDirectory>,
    token: Option<Arc<Secret>>,
}

impl ApiState {
    pub fn new(
        store: Store,
        metrics: Arc<FleetMetrics>,
        budgets: Option<Arc<BudgetBook>>,
        budget_fraction: f64,
        max_page: u32,
        token: Option<Secret>,
    ) -> Self {
        Self {
            store,
            metrics,
            budgets,
            budget_fraction,
            max_page,
            mqtt_ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            registry: None,
            rollouts: None,
            scheduler: None,
            devices: None,
            token: token.map(Arc::new),
        }
    }

    /// The same state with the registry and the rollout service.
    pub fn with_registry(mut self, registry: Arc<Registry>, rollouts: Arc<Rollouts>) -> Self {
        self.registry = Some(registry);
        self.rollouts = Some(rollouts);
        self
    }

    /// The same state with the devices file (device routes then need a device's credentials).
    pub fn with_devices(mut self, devices: DeviceDirectory) -> Self {
        self.devices = Some(devices);
        self
    }

    /// The same state with the retraining scheduler.
    pub fn with_scheduler(mut self, scheduler: Arc<Scheduler>) -> Self {
        self.scheduler = Some(scheduler);
        self
    }
}

/// The application.
pub fn router(state: ApiState) -> Router {
    let v1 = routes::v1().layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    routes::open().merge(v1).with_state(state)
}

/// Serves the API on `listener` until `shutdown`: over HTTPS with `tls`, else plain HTTP.
/// Requests already running finish after `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (app, stop) = (router(state), shutdown.cancelled_owned());
    match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(stop).await,
        Some(acceptor) => {
            axum::serve(tls::TlsListener::new(listener, acceptor)?, app).with_graceful_shutdown(stop).await
        }
    }
}

/// Binds the API's address.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// `Authorization: Bearer TOKEN` on every `/v1/` route when a token is configured.
async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

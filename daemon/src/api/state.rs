//! `ApiState`: what every handler shares — the backend, the admission queue, the metrics and the
//! shutdown handle — and `ApiSettings`, the part of the configuration the API uses.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::metrics::{ApiMetrics, build_registry};
use crate::chat::{ChatBackend, ChatError, ChatOutcome, ChatRequest};
use crate::config::{DaemonConfig, GenerationDefaults};
use crate::engine::CancelToken;
use crate::offload::{Secret, SecretError, read_secret};
use crate::ops::Shutdown;

/// The API's settings, secrets already read.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Bearer token required on every route except `/healthz`; `None`: no authentication.
    pub api_token: Option<Secret>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Most chat requests admitted at once.
    pub max_queue: usize,
    /// Longest a chat request may take.
    pub request_timeout: Duration,
    /// Defaults for parameters a request leaves out.
    pub generation: GenerationDefaults,
    /// Shown by `/v1/status`.
    pub device_id: String,
}

impl ApiSettings {
    /// The settings in `config`, reading `server.api_token` once.
    pub fn from_config(config: &DaemonConfig) -> Result<Self, SecretError> {
        let server = &config.server;
        Ok(Self {
            api_token: server.api_token.as_ref().map(read_secret).transpose()?,
            max_body_bytes: server.max_body_bytes,
            max_queue: server.max_queue,
            request_timeout: Duration::from_secs(server.request_timeout_secs),
            generation: config.generation.clone(),
            device_id: config.device_id.clone(),
        })
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn ChatBackend>,
    settings: ApiSettings,
    queue: Arc<Semaphore>,
    registry: Registry,
    metrics: ApiMetrics,
    shutdown: Shutdown,
    started: Instant,
    started_unix: u64,
}

impl fmt::Debug for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiState").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

impl ApiState {
    /// State serving `backend` with `settings`; `shutdown` tells when to stop taking requests.
    pub fn new(backend: Arc<dyn ChatBackend>, settings: ApiSettings, shutdown: Shutdown) -> Self {
        let queue = Arc::new(Semaphore::new(settings.max_queue));
        let (registry, metrics) =
            build_registry(Arc::clone(&backend), Arc::clone(&queue), settings.max_queue);
        let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            inner: Arc::new(Inner {
                backend,
                settings,
                queue,
                registry,
                metrics,
                shutdown,
                started: Instant::now(),
                started_unix,
            }),
        }
    }

    pub(crate) fn backend(&self) -> &dyn ChatBackend {
        self.inner.backend.as_ref()
    }

    pub(crate) fn settings(&self) -> &ApiSettings {
        &self.inner.settings
    }

    pub(crate) fn metrics(&self) -> &ApiMetrics {
        &self.inner.metrics
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    pub(crate) fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    pub(crate) fn started_unix(&self) -> u64 {
        self.inner.started_unix
    }

    /// Chat requests admitted now.
    pub fn queue_depth(&self) -> usize {
        self.inner.settings.max_queue.saturating_sub(self.inner.queue.available_permits())
    }

    /// Admits one more chat request, or `None` when `max_queue` are admitted already.
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.inner.queue).try_acquire_owned().ok()
    }

    /// Runs `request` on the backend in its own task, so that the backend's future always runs to
    /// completion (it settles the budget and writes telemetry even for cancelled requests). The
    /// admission permit is held until the backend returns; when the drain time after SIGTERM is
    /// over, `cancel` is triggered.
    pub(crate) fn spawn_chat(
        &self,
        request: ChatRequest,
        deltas: Option<tokio::sync::mpsc::Sender<String>>,
        cancel: CancelToken,
        permit: OwnedSemaphorePermit,
    ) -> JoinHandle<Result<ChatOutcome, ChatError>> {
        let backend = Arc::clone(&self.inner.backend);
        let shutdown = self.inner.shutdown.clone();
        let in_flight = shutdown.track();
        tokio::spawn(async move {
            let _permit = permit;
            let _in_flight = in_flight;
            let mut chat = backend.chat(request, deltas, cancel.clone());
            tokio::select! {
                outcome = &mut chat => outcome,
                () = shutdown.aborted() => {
                    cancel.cancel();
                    chat.await
                }
            }
        })
    }
}

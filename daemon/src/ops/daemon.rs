//! `Daemon`: a validated configuration built into a listening socket, a backend and the API
//! (`build`), then served until SIGTERM/SIGINT and stopped cleanly (`run`): stop accepting, let
//! running requests finish within `server.shutdown_drain_secs`, cancel what is left, then run the
//! backend's shutdown hook.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::backend_factory::{BuildBackendError, BuiltBackend, ShutdownHook, build_backend};
use super::shutdown::Shutdown;
use super::systemd::{notify_ready, notify_stopping, spawn_watchdog};
use crate::api::{self, ApiSettings, ApiState};
use crate::chat::ModelInfo;
use crate::config::DaemonConfig;
use crate::offload::SecretError;

/// After the drain time, how long cancelled requests get to end before connections are dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Longest the backend's shutdown hook may take.
const SHUTDOWN_HOOK_TIMEOUT: Duration = Duration::from_secs(15);

/// The daemon could not be built or stopped serving unexpectedly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "cannot listen on {addr}: {source} (is another tandemd running? change server.listen or --listen)"
    )]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot read server.api_token")]
    ApiToken(#[source] SecretError),
    #[error(transparent)]
    Backend(#[from] BuildBackendError),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(io::Error),
    #[error("the HTTP server stopped: {0}")]
    Serve(io::Error),
}

/// A built daemon, ready to [`run`](Daemon::run).
pub struct Daemon {
    listener: TcpListener,
    api: ApiState,
    shutdown: Shutdown,
    on_shutdown: Option<ShutdownHook>,
    model: ModelInfo,
    drain: Duration,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("listener", &self.listener)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Builds what a validated `config` describes: reads the API token, binds `server.listen` (before
    /// the slow model load, so a taken port fails fast), and starts the backend.
    pub async fn build(config: DaemonConfig) -> Result<Self, DaemonError> {
        let settings = ApiSettings::from_config(&config).map_err(DaemonError::ApiToken)?;
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind { addr, source })?;
        let shutdown = Shutdown::new();
        let backend = build_backend(&config, &shutdown).await?;
        Ok(Self::with_backend(&config, settings, listener, backend, shutdown))
    }

    /// A daemon serving an already built `backend` on `listener` (for tests and embedders).
    pub fn with_backend(
        config: &DaemonConfig,
        settings: ApiSettings,
        listener: TcpListener,
        backend: BuiltBackend,
        shutdown: Shutdown,
    ) -> Self {
        let model = backend.chat.model_info();
        let api = ApiState::new(backend.chat, settings, shutdown.clone());
        Self {
            listener,
            api,
            shutdown,
            on_shutdown: backend.on_shutdown,
            model,
            drain: Duration::from_secs(config.server.shutdown_drain_secs),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The handle that stops the daemon; [`Shutdown::begin`] has the effect of SIGTERM.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Serves until SIGTERM/SIGINT (or [`Shutdown::begin`]), then stops cleanly.
    pub async fn run(self) -> Result<(), DaemonError> {
        let Self { listener, api, shutdown, on_shutdown, model, drain } = self;
        let mut signals = Signals::install().map_err(DaemonError::Signals)?;
        let addr = listener.local_addr().map_err(DaemonError::Serve)?;
        let graceful = {
            let shutdown = shutdown.clone();
            async move { shutdown.begun().await }
        };
        let app = api::router(api);
        let mut server =
            tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(graceful).await });

        tracing::info!(%addr, model = model.id, version = model.version, provider = model.provider, "tandemd is serving");
        notify_ready(&format!("serving model {} ({}) on {addr}", model.id, model.provider));
        let watchdog = {
            let shutdown = shutdown.clone();
            spawn_watchdog(async move { shutdown.begun().await })
        };

        let mut server_result = None;
        tokio::select! {
            name = signals.next() => tracing::info!(signal = name, "shutting down"),
            () = shutdown.begun() => tracing::info!("shutting down"),
            result = &mut server => server_result = Some(result),
        }
        shutdown.begin();
        if server_result.is_none() {
            let in_flight = shutdown.in_flight();
            notify_stopping(&format!("draining {in_flight} request(s)"));
            tracing::info!(
                in_flight,
                drain_secs = drain.as_secs(),
                "no longer accepting; letting requests finish"
            );
            tokio::select! {
                result = &mut server => server_result = Some(result),
                () = tokio::time::sleep(drain) => {
                    tracing::warn!(in_flight = shutdown.in_flight(), "drain time is over; cancelling requests");
                }
                name = signals.next() => {
                    tracing::warn!(signal = name, in_flight = shutdown.in_flight(), "second signal; cancelling requests");
                }
            }
            if server_result.is_none() {
                shutdown.abort();
                match tokio::time::timeout(CANCEL_GRACE, &mut server).await {
                    Ok(result) => server_result = Some(result),
                    Err(_) => server.abort(),
                }
            }
        }
        // Backend work outlives its connection when the client left; give it a moment to settle.
        if tokio::time::timeout(CANCEL_GRACE, shutdown.idle()).await.is_err() {
            tracing::warn!(in_flight = shutdown.in_flight(), "requests still running at exit");
        }
        if let Some(watchdog) = watchdog {
            watchdog.abort();
        }
        if let Some(hook) = on_shutdown
            && tokio::time::timeout(SHUTDOWN_HOOK_TIMEOUT, hook()).await.is_err()
        {
            tracing::warn!(
                timeout_secs = SHUTDOWN_HOOK_TIMEOUT.as_secs(),
                "the backend's shutdown hook timed out"
            );
        }
        tracing::info!("tandemd stopped");
        match server_result {
            Some(Ok(Err(error))) => Err(DaemonError::Serve(error)),
            Some(Err(join_error)) if join_error.is_panic() => {
                Err(DaemonError::Serve(io::Error::other("the HTTP server panicked")))
            }
            _ => Ok(()),
        }
    }
}

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C).
struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> io::Result<Self> {
        Ok(Self { terminate: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

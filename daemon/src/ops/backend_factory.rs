//! Building the [`ChatBackend`] that answers chat requests (the router over the engine, offload
//! and telemetry) from the configuration, plus the hook that runs at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tandem_core::protocol::{OffloadRequest, TelemetryEvent, Transport};
use tokio_util::sync::CancellationToken;

use super::Shutdown;
use crate::bundle_trust::{check_before_loading, load_trusted_keys};
use crate::chat::ChatBackend;
use crate::config::DaemonConfig;
use crate::mqtt::MqttLink;
use crate::offload::{
    CloudAnswer, CloudClient, HttpsOffload, MqttOffload, OffloadError, OffloadTransport, read_ca_file,
};
use crate::router::{BudgetStore, CloudOffload, EventSink, LiveModel, Router, RouterSettings, ServingModel};
use crate::telemetry::{
    HttpsTelemetryPublisher, MqttTelemetryPublisher, TelemetryHandle, TelemetryPublisher, TelemetryShipper,
    TelemetrySpool, TelemetryTransport,
};
use crate::updater::fleet_link::{self, ASSIGNMENT_QUEUE};
use crate::updater::{LiveUpdater, SlotView, Slots, StartupModel, UpdateTracker};

/// Runs once after the API stopped and in-flight requests ended (e.g. flushes the telemetry spool).
pub type ShutdownHook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// A started backend.
pub struct BuiltBackend {
    /// Answers chat requests.
    pub chat: Arc<dyn ChatBackend>,
    /// Run at shutdown, after the last request.
    pub on_shutdown: Option<ShutdownHook>,
}

impl std::fmt::Debug for BuiltBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltBackend")
            .field("on_shutdown", &self.on_shutdown.is_some())
            .finish_non_exhaustive()
    }
}

impl BuiltBackend {
    /// A backend without a shutdown hook.
    pub fn new(chat: Arc<dyn ChatBackend>) -> Self {
        Self { chat, on_shutdown: None }
    }

    /// Runs `hook` at shutdown.
    pub fn with_shutdown_hook<F>(mut self, hook: F) -> Self
    where
        F: FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    {
        self.on_shutdown = Some(Box::new(hook));
        self
    }
}

/// The backend could not be started.
#[derive(Debug, thiserror::Error)]
#[error("could not start the chat backend")]
pub struct BuildBackendError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl BuildBackendError {
    /// Wraps the cause (its chain is kept, so `main` still recognises user errors in it).
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(cause.into())
    }
}

/// Builds the backend for a validated `config`: the engine on its thread, the persisted budget,
/// the offload client with its transports, the telemetry spool and shipper, and the router over
/// them, and with `[updater] enabled` the task that follows model assignments. Background tasks
/// stop when `shutdown` begins; the returned hook flushes telemetry.
pub async fn build_backend(
    config: &DaemonConfig,
    shutdown: &Shutdown,
) -> Result<BuiltBackend, BuildBackendError> {
    let engine_config = config.engine.clone();
    let trusted_keys = config.trusted_bundle_keys.clone();
    let state_dir = config.state_dir.clone();
    let configured = config.model_dir.clone();
    // The bundle is verified (every file hashed) before the engine reads any of it: an installed
    // slot when choosing it, the configured directory by the trust check.
    let (model, slot, slots) = tokio::task::spawn_blocking(move || {
        let keys = load_trusted_keys(&trusted_keys).map_err(BuildBackendError::new)?;
        let startup =
            StartupModel::choose(&state_dir, configured.as_deref(), &keys).map_err(BuildBackendError::new)?;
        if startup.slot.is_none() {
            check_before_loading(&startup.model_dir, &trusted_keys).map_err(BuildBackendError::new)?;
        }
        let model = ServingModel::load(&startup.model_dir, &engine_config).map_err(BuildBackendError::new)?;
        let slot = startup.slot.clone();
        let slots = startup.loaded();
        Ok::<_, BuildBackendError>((model, slot, slots))
    })
    .await
    .map_err(BuildBackendError::new)??;
    let model = Arc::new(LiveModel::new(model));
    let budget = Arc::new(
        BudgetStore::open(&config.state_dir, config.budget.clone()).map_err(BuildBackendError::new)?,
    );

    let link = match &config.mqtt {
        Some(mqtt) => Some(MqttLink::connect(mqtt, &config.device_id).map_err(BuildBackendError::new)?),
        None => None,
    };
    let cloud = build_cloud(config, link.as_ref())?;
    let (telemetry, shipper) = build_telemetry(config, link.as_ref())?;

    let settings = RouterSettings {
        device_id: config.device_id.clone(),
        default_max_tokens: config.generation.max_tokens,
        default_temperature: config.generation.temperature,
        help_bias: config.router.help_bias,
        send_local_attempt: config.cloud.send_local_attempt,
        offload_deadline_ms: config.cloud.deadline_ms,
        telemetry_text: config.telemetry.include_text,
        include_local_attempt: config.router.include_local_attempt_in_answer,
    };
    let mut router = Router::new(
        settings,
        Arc::clone(&model),
        budget.clone(),
        cloud,
        telemetry.map(|t| Arc::new(t) as Arc<dyn EventSink>),
    );
    if config.updater.enabled {
        let tracker = start_updater(config, shutdown, model, slot, slots, link.as_ref())?;
        router = router.with_update_tracker(tracker);
    }
    let router = Arc::new(router);
    let flush_timeout = Duration::from_millis(config.telemetry.flush_interval_ms.max(1000) * 5);
    Ok(BuiltBackend::new(router).with_shutdown_hook(move || {
        async move {
            if let Err(e) = budget.save_now() {
                tracing::error!(error = %e, "could not save the budget state at shutdown");
            }
            if let Some(shipper) = shipper {
                match shipper.shutdown(flush_timeout).await {
                    Ok(left) if left > 0 => tracing::warn!(left, "telemetry events stay in the spool for the next start"),
                    Ok(_) => tracing::info!("telemetry spool flushed"),
                    Err(e) => tracing::warn!(error = %e, "telemetry flush at shutdown failed; events stay in the spool"),
                }
            }
            if let Some(link) = link {
                link.shutdown().await;
            }
        }
        .boxed()
    }))
}

/// Starts following model assignments (MQTT and/or polling) and publishing the update state.
fn start_updater(
    config: &DaemonConfig,
    shutdown: &Shutdown,
    model: Arc<LiveModel>,
    slot: Option<SlotView>,
    slots: Option<Slots>,
    link: Option<&MqttLink>,
) -> Result<Arc<UpdateTracker>, BuildBackendError> {
    let updater = &config.updater;
    let on_probation = slots.as_ref().is_some_and(|s| s.probation().is_some());
    let tracker = Arc::new(UpdateTracker::new(
        model.current().version(),
        slot.map(|view| view.slot.to_string()),
        on_probation,
    ));
    let stop = CancellationToken::new();
    {
        let (shutdown, stop) = (shutdown.clone(), stop.clone());
        tokio::spawn(async move {
            shutdown.begun().await;
            stop.cancel();
        });
    }
    let (assignments, received) = tokio::sync::mpsc::channel(ASSIGNMENT_QUEUE);
    if let Some(link) = link {
        fleet_link::publish_status(link.clone(), Arc::clone(&tracker), stop.clone());
        if updater.mqtt {
            fleet_link::follow_mqtt(link.clone(), assignments.clone(), stop.clone());
        }
    }
    // Polls and downloads carry the device's own credentials (its broker password) or the poll token.
    let credentials =
        fleet_link::fleet_credentials(&config.device_id, config.mqtt.as_ref(), updater.poll_token.as_ref())
            .map_err(BuildBackendError::new)?;
    // A private CA the fleet's HTTPS certificate chains to, for polls and downloads alike.
    let extra_ca = match &updater.ca_file {
        Some(path) => {
            read_ca_file(path).map_err(|e| BuildBackendError::new(format!("updater.ca_file: {e}")))?
        }
        None => Vec::new(),
    };
    if let Some(url) = &updater.poll_url {
        fleet_link::follow_polls(
            url,
            &config.device_id,
            credentials.clone(),
            &extra_ca,
            Duration::from_secs(updater.poll_interval_secs),
            assignments,
            stop.clone(),
        )
        .map_err(BuildBackendError::new)?;
    }
    let trusted = load_trusted_keys(&config.trusted_bundle_keys).map_err(BuildBackendError::new)?;
    if slots.is_none() {
        tracing::warn!(
            "another process holds the model slot store; the updater opens it when an assignment arrives"
        );
    }
    LiveUpdater {
        config: updater.clone(),
        engine: config.engine.clone(),
        state_dir: config.state_dir.clone(),
        trusted,
        configured_model: config.model_dir.clone(),
        slots,
        model,
        tracker: Arc::clone(&tracker),
        credentials,
        extra_ca,
    }
    .spawn(received, stop);
    tracing::info!(mqtt = link.is_some() && updater.mqtt, poll_url = ?updater.poll_url, "following model assignments");
    Ok(tracker)
}

fn build_cloud(
    config: &DaemonConfig,
    link: Option<&MqttLink>,
) -> Result<Option<Arc<dyn CloudOffload>>, BuildBackendError> {
    if !config.cloud.is_enabled() {
        return Ok(None);
    }
    let mut transports: Vec<Arc<dyn OffloadTransport>> = Vec::new();
    for kind in config.cloud.transport_order() {
        match kind {
            Transport::Https => {
                let https = config.cloud.https.as_ref().expect("transport_order lists configured transports");
                transports.push(Arc::new(HttpsOffload::new(https).map_err(BuildBackendError::new)?));
            }
            Transport::Mqtt => {
                let link =
                    link.ok_or_else(|| BuildBackendError::new("cloud.mqtt = true needs an [mqtt] section"))?;
                transports.push(Arc::new(MqttOffload::new(link.clone())));
            }
        }
    }
    Ok(Some(Arc::new(CloudClient::new(&config.cloud, transports))))
}

fn build_telemetry(
    config: &DaemonConfig,
    link: Option<&MqttLink>,
) -> Result<(Option<TelemetryHandle>, Option<TelemetryShipper>), BuildBackendError> {
    let publisher: Option<Arc<dyn TelemetryPublisher>> = match &config.telemetry.transport {
        TelemetryTransport::None => None,
        TelemetryTransport::Mqtt => {
            let link =
                link.ok_or_else(|| BuildBackendError::new("telemetry over MQTT needs an [mqtt] section"))?;
            Some(Arc::new(MqttTelemetryPublisher::new(link.clone())))
        }
        TelemetryTransport::Https { url } => Some(Arc::new(
            HttpsTelemetryPublisher::new(url, Duration::from_secs(10)).map_err(BuildBackendError::new)?,
        )),
    };
    let dir = config.telemetry.spool_dir.clone().unwrap_or_else(|| config.state_dir.join("telemetry"));
    let spool = TelemetrySpool::open(&dir, &config.telemetry).map_err(BuildBackendError::new)?;
    let shipper = TelemetryShipper::start(spool, publisher, config.device_id.clone(), &config.telemetry)
        .map_err(BuildBackendError::new)?;
    Ok((Some(shipper.handle()), Some(shipper)))
}

impl CloudOffload for CloudClient {
    fn ask(&self, request: OffloadRequest) -> BoxFuture<'_, Result<CloudAnswer, OffloadError>> {
        Box::pin(CloudClient::ask(self, request))
    }
}

impl EventSink for TelemetryHandle {
    fn record(&self, event: TelemetryEvent) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let id = event.id;
            if let Err(e) = self.append(event).await {
                tracing::error!(event_id = %id, error = %e, "telemetry event could not be stored");
            }
        })
    }

    fn depth(&self) -> (u64, u64) {
        let stats = self.stats();
        (stats.spool.events, stats.spool.dropped)
    }
}

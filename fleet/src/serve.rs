//! `tandem-fleet serve`: builds every part from a validated configuration and runs them until
//! shutdown. Order matters: the store first (nothing runs without it), then the path to devices
//! (the embedded broker's router or the external broker's client), the gateway that answers
//! through it, ingest (feeding the gateway's budgets), the handlers, and only then the listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::broker::{BrokerError, EmbeddedBroker, Router};
use crate::config::{FleetConfig, MqttMode};
use crate::device_link::DeviceLink;
use crate::device_messages::DeviceMessages;
use crate::devices_file::{DeviceDirectory, Devices, DevicesFileError};
use crate::external::{ExternalBroker, ExternalError};
use crate::gateway::{Gateway, GatewayError};
use crate::ingest::{Ingest, StoredEvents};
use crate::metrics::FleetMetrics;
use crate::registry::{Registry, RegistryError};
use crate::rollout::Rollouts;
use crate::scheduler::Scheduler;
use crate::store::{Store, StoreError, now_ms};

/// How often the devices file is checked for changes.
const DEVICES_FILE_POLL: Duration = Duration::from_secs(2);
const DAY_MS: i64 = 86_400_000;

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Devices(#[from] DevicesFileError),
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    External(#[from] ExternalError),
    #[error("{0}")]
    Gateway(#[from] GatewayError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("api.token: {0}")]
    Token(#[from] tandemd::offload::SecretError),
    #[error("cannot listen on {address} (api.listen): {source}")]
    Api { address: SocketAddr, source: std::io::Error },
    #[error("api.tls: {0}")]
    ApiTls(#[source] crate::tls::TlsError),
}

/// A running fleet.
#[derive(Debug)]
pub struct RunningFleet {
    /// Where the API and dashboard listen.
    pub api_address: SocketAddr,
    /// The embedded broker's plain and TLS listeners.
    pub mqtt_address: Option<SocketAddr>,
    pub mqtts_address: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    store: Store,
}

impl RunningFleet {
    /// Stops everything and waits (at most a few seconds) for the parts to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.store.close().await;
    }

    /// Fires when the fleet is asked to stop.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Starts the fleet described by `config` (already validated).
pub async fn start(config: FleetConfig) -> Result<RunningFleet, ServeError> {
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let store = Store::open(&config.store).await?;
    let metrics = FleetMetrics::new();
    tracing::info!(backend = ?store.backend(), "store ready");
    let registry = config
        .registry
        .as_ref()
        .map(|registry| Registry::open(registry, config.registry_s3.as_ref()))
        .transpose()?
        .map(Arc::new);
    if let Some(registry) = &registry {
        registry.clear_staging()?;
    }

    let devices = match &config.devices_file {
        Some(path) => {
            let devices = Devices::load(path)?;
            store.sync_device_groups(&devices.groups()).await?;
            let directory = DeviceDirectory::new(devices);
            let (watcher, store, path) = (directory.clone(), store.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let sync = move |devices: Arc<Devices>| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        if let Err(error) = store.sync_device_groups(&devices.groups()).await {
                            tracing::error!(%error, "cannot record the device groups");
                        }
                    });
                };
                watcher.watch(path, DEVICES_FILE_POLL, sync).await;
            }));
            Some(directory)
        }
        None => None,
    };

    let router = Arc::new(Router::default());
    let external = match config.mqtt.mode {
        MqttMode::External => {
            let external_config =
                config.mqtt.external.as_ref().expect("validated: external needs its section");
            Some(ExternalBroker::new(external_config)?)
        }
        MqttMode::Embedded => None,
    };
    let link: Arc<dyn DeviceLink> = match &external {
        Some(external) => Arc::new(external.link()),
        None => router.clone(),
    };

    let gateway = if config.gateway.upstream.is_empty() {
        None
    } else {
        let (gateway, gateway_tasks) =
            Gateway::start(&config.gateway, link.clone(), store.clone(), metrics.clone(), shutdown.clone())
                .await?;
        tasks.extend(gateway_tasks);
        Some(gateway)
    };
    let budgets = gateway.as_ref().map(Gateway::budgets);
    let listener: Arc<dyn StoredEvents> = match &budgets {
        Some(budgets) => budgets.clone(),
        None => Arc::new(()),
    };
    let (ingest, ingest_task) =
        Ingest::start(store.clone(), &config.ingest, metrics.clone(), listener, shutdown.clone());
    tasks.push(ingest_task);
    let messages = Arc::new(DeviceMessages::new(ingest, gateway, link.clone(), metrics.clone()));

    let token = config.api.token.as_ref().map(tandemd::offload::read_secret).transpose()?;
    let mut api_state = ApiState::new(
        store.clone(),
        metrics.clone(),
        budgets,
        config.gateway.device_budget.cloud_fraction,
        config.api.max_page,
        token,
    );
    if let Some(devices) = &devices {
        api_state = api_state.with_devices(devices.clone());
    }
    let mqtt_ready = api_state.mqtt_ready.clone();

    let (mut mqtt_address, mut mqtts_address) = (None, None);
    match external {
        Some(external) => {
            let (messages, shutdown, ready) = (messages.clone(), shutdown.clone(), mqtt_ready.clone());
            tasks.push(tokio::spawn(async move { external.run(messages, ready, shutdown).await }));
        }
        None => {
            let broker = EmbeddedBroker::start(
                &config.mqtt.embedded,
                devices,
                router,
                messages,
                metrics.clone(),
                shutdown.clone(),
            )
            .await?;
            mqtt_address = broker.address;
            mqtts_address = broker.tls_address;
            tasks.extend(broker.tasks);
            mqtt_ready.store(true, Ordering::Relaxed);
            tracing::info!(mqtt = ?mqtt_address, mqtts = ?mqtts_address, "embedded broker listening");
        }
    }

    if config.retention.raw_days > 0 {
        tasks.push(tokio::spawn(retention(store.clone(), config.retention.clone(), shutdown.clone())));
    }

    let tls = config.api.tls.as_ref().map(api::tls::acceptor).transpose().map_err(ServeError::ApiTls)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let address = config.api.listen;
    let listener = api::bind(address).await.map_err(|source| ServeError::Api { address, source })?;
    let api_address = listener.local_addr().map_err(|source| ServeError::Api { address, source })?;
    let mut scheduler_parts = (registry.clone(), None);
    if let Some(registry) = registry {
        let public_url = match config.registry.as_ref().and_then(|r| r.public_url.clone()) {
            Some(url) => url,
            None => {
                if api_address.ip().is_unspecified() || api_address.ip().is_loopback() {
                    tracing::warn!(
                        %api_address,
                        "registry.public_url is not set: assignments point devices at {scheme}://{api_address}, \
                         which they cannot reach unless they run on this host; set registry.public_url"
                    );
                }
                format!("{scheme}://{api_address}")
            }
        };
        let rollouts = Arc::new(Rollouts::new(store.clone(), link, &public_url, metrics.clone()));
        // The embedded broker forgot its retained messages when it stopped, and an external one
        // may have too (without persistence); publishing the same retained message again is
        // harmless, as devices ignore an assignment they already run.
        let count = rollouts.republish().await?;
        tracing::info!(assignments = count, "device assignments published again");
        let interval = Duration::from_millis(config.rollouts.evaluate_interval_ms);
        tasks.push(tokio::spawn(rollouts.clone().run(interval, shutdown.clone())));
        scheduler_parts.1 = Some(rollouts.clone());
        api_state = api_state.with_registry(registry, rollouts);
    }
    if let Some(scheduler_config) = &config.scheduler {
        let (registry, rollouts) = scheduler_parts;
        let interval = Duration::from_secs(scheduler_config.evaluate_interval_secs);
        let scheduler =
            Scheduler::start(store.clone(), scheduler_config.clone(), registry, rollouts, shutdown.clone())
                .await?;
        tasks.push(tokio::spawn(scheduler.clone().run(interval)));
        api_state = api_state.with_scheduler(scheduler);
    }
    let api_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(error) = api::serve(listener, tls, api_state, api_shutdown).await {
            tracing::error!(%error, "the API stopped");
        }
    }));
    tracing::info!(api = %format!("{scheme}://{api_address}"), "operator API listening");
    Ok(RunningFleet { api_address, mqtt_address, mqtts_address, shutdown, tasks, store })
}

/// Rolls up and deletes old raw events, and deletes old roll-ups, every `interval_secs`.
async fn retention(store: Store, config: crate::config::RetentionConfig, shutdown: CancellationToken) {
    loop {
        let raw_cutoff = now_ms() - i64::from(config.raw_days) * DAY_MS;
        let dedup_cutoff = raw_cutoff - i64::from(config.dedup_days) * DAY_MS;
        let rollup_cutoff =
            (config.rollup_days > 0).then(|| now_ms() - i64::from(config.rollup_days) * DAY_MS);
        match store.apply_retention(raw_cutoff, dedup_cutoff, rollup_cutoff).await {
            Ok(report) if report.events_rolled_up > 0 || report.rollups_deleted > 0 => {
                tracing::info!(
                    rolled_up = report.events_rolled_up,
                    rollups_deleted = report.rollups_deleted,
                    "retention applied"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "retention failed; retrying at the next interval"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(config.interval_secs.max(1))) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

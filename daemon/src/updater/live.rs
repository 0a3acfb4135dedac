//! Updates while serving: the task that acts on the fleet's [`ModelAssignment`]s. For an assigned
//! version other than the one served it stages the bundle ([`Updater::stage`]: download, verify),
//! loads it in a second engine session while the current model keeps answering, probes it, makes
//! its slot active ([`Slots::activate`], on probation) and swaps the router's model
//! ([`LiveModel::swap`]): requests already running finish on the old model, whose engine thread ends
//! with the last of them. A failed probe leaves the slot inactive and the old model serving.
//!
//! While the served slot is on probation, the same probe runs every `health_probe_interval_secs`;
//! passing probes commit it, failing ones revert to the previous slot (loaded and swapped in the
//! same way). The task owns the slot store for the daemon's life.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use tandem_core::bundle::signature::VerifyingKey;
use tandem_core::protocol::{ModelAssignment, UpdateState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::UpdaterConfig;
use super::download::{DownloadError, DownloadOptions};
use super::fleet_link::FleetCredentials;
use super::report::{UpdateOutcome, UpdateTracker};
use super::slots::{ProbationOutcome, SlotView, Slots, SlotsError};
use super::stage::{Assignment, StageError, StageEvent, Staged, Updater};
use crate::engine::EngineConfig;
use crate::router::{LiveModel, ServingModel};

/// What the task needs; see [`LiveUpdater::spawn`].
#[derive(Debug)]
pub struct LiveUpdater {
    /// The `[updater]` section.
    pub config: UpdaterConfig,
    /// How to load a model.
    pub engine: EngineConfig,
    /// The daemon's state directory (the slot store is under it).
    pub state_dir: PathBuf,
    /// Keys a bundle must be signed by (empty: any bundle whose files match its manifest).
    pub trusted: Vec<VerifyingKey>,
    /// The configured model directory, served when no slot is active.
    pub configured_model: Option<PathBuf>,
    /// The store opened at startup, when the daemon got its lock.
    pub slots: Option<Slots>,
    /// The model the router serves.
    pub model: Arc<LiveModel>,
    /// Where progress and outcomes are reported.
    pub tracker: Arc<UpdateTracker>,
    /// Sent with bundle downloads (the fleet serves bundles only to its devices).
    pub credentials: Option<FleetCredentials>,
    /// CA certificates trusted for downloads on top of the system roots (`updater.ca_file`).
    pub extra_ca: Vec<reqwest::Certificate>,
}

/// Why an assignment did not end with the new model serving.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// Worth trying again later (a download failed, the store is locked).
    #[error("{0}")]
    Transient(String),
    /// Final for this assignment.
    #[error("{0}")]
    Final(String),
}

impl From<StageError> for Refusal {
    fn from(error: StageError) -> Self {
        let text = error.to_string();
        match error {
            StageError::Download(
                DownloadError::GaveUp { .. } | DownloadError::Status { .. } | DownloadError::Io { .. },
            )
            | StageError::Slots(SlotsError::Busy { .. } | SlotsError::Io { .. }) => Refusal::Transient(text),
            _ => Refusal::Final(text),
        }
    }
}

impl From<SlotsError> for Refusal {
    fn from(error: SlotsError) -> Self {
        Refusal::from(StageError::Slots(error))
    }
}

struct Task {
    parts: LiveUpdater,
    updater: Option<Updater>,
    /// The manifest digest of the latest assignment that reached a final outcome.
    settled: Option<String>,
    /// The latest assignment, kept for a retry after a transient failure.
    retry: Option<ModelAssignment>,
}

impl LiveUpdater {
    /// Runs the task until `stop`; assignments arrive on `assignments`.
    pub fn spawn(self, assignments: mpsc::Receiver<ModelAssignment>, stop: CancellationToken) {
        let mut task = Task { parts: self, updater: None, settled: None, retry: None };
        tokio::spawn(async move { task.run(assignments, stop).await });
    }
}

impl Task {
    async fn run(&mut self, mut assignments: mpsc::Receiver<ModelAssignment>, stop: CancellationToken) {
        if let Some(slots) = self.parts.slots.take() {
            self.updater = self.new_updater(slots);
        }
        let health_interval = Duration::from_secs(self.parts.config.health_probe_interval_secs.max(1));
        let retry_interval = Duration::from_secs(self.parts.config.poll_interval_secs.max(1));
        let mut health =
            tokio::time::interval_at(tokio::time::Instant::now() + health_interval, health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry =
            tokio::time::interval_at(tokio::time::Instant::now() + retry_interval, retry_interval);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                assignment = assignments.recv() => match assignment {
                    Some(assignment) => {
                        self.follow(assignment).await;
                        // A retry waits a whole interval from the failure: a tick that fell due
                        // during a long attempt would retry at once, and the `failed` report would
                        // be replaced before the fleet ever saw it.
                        retry.reset();
                    }
                    None => return,
                },
                _ = health.tick() => self.health_probe().await,
                _ = retry.tick(), if self.retry.is_some() => {
                    if let Some(assignment) = self.retry.take() {
                        self.follow(assignment).await;
                        retry.reset();
                    }
                }
            }
        }
    }

    fn new_updater(&self, slots: Slots) -> Option<Updater> {
        let options = DownloadOptions {
            bandwidth_limit: self.parts.config.bandwidth_limit,
            credentials: self.parts.credentials.clone(),
            extra_ca: self.parts.extra_ca.clone(),
            ..DownloadOptions::default()
        };
        match Updater::new(slots, options) {
            Ok(updater) => Some(updater),
            Err(error) => {
                tracing::error!(%error, "the updater cannot download; assignments are ignored");
                None
            }
        }
    }

    /// The updater, opening the store now if startup could not (another process held it).
    fn updater(&mut self) -> Result<&mut Updater, Refusal> {
        if self.updater.is_none() {
            let slots = Slots::open(&self.parts.state_dir, self.parts.trusted.clone())?;
            self.updater = self.new_updater(slots);
        }
        self.updater.as_mut().ok_or_else(|| Refusal::Final("the updater cannot download".into()))
    }

    async fn follow(&mut self, assignment: ModelAssignment) {
        // The fleet's latest assignment replaces one kept for a retry, also when it needs no update
        // (a rollback to the version served must not be followed by a retry of the abandoned one).
        self.retry = None;
        let served = self.parts.model.current().version();
        if self.settled.as_deref() == Some(assignment.manifest_sha256.as_str()) {
            return;
        }
        if assignment.version == served
            && self.served_sha().is_none_or(|sha| sha == assignment.manifest_sha256)
        {
            self.settled = Some(assignment.manifest_sha256.clone());
            return;
        }
        tracing::info!(
            version = assignment.version, bundle = assignment.bundle_name, served,
            rollout = ?assignment.rollout_id, "new model assignment"
        );
        match self.update(&assignment).await {
            Ok(()) => self.settled = Some(assignment.manifest_sha256.clone()),
            Err(Refusal::Final(detail)) => {
                tracing::error!(version = assignment.version, %detail, "model update failed; the previous model keeps serving");
                self.parts.tracker.finish(&assignment.version, UpdateOutcome::Failed, Some(detail));
                self.settled = Some(assignment.manifest_sha256.clone());
            }
            Err(Refusal::Transient(detail)) => {
                tracing::warn!(version = assignment.version, %detail, "model update interrupted; retrying later");
                self.parts.tracker.finish(&assignment.version, UpdateOutcome::Failed, Some(detail));
                self.retry = Some(assignment);
            }
        }
    }

    /// The manifest digest of the slot served, when a slot is served.
    fn served_sha(&self) -> Option<String> {
        self.updater.as_ref()?.slots().current().map(|view| view.bundle.manifest_sha256)
    }

    async fn update(&mut self, assignment: &ModelAssignment) -> Result<(), Refusal> {
        let tracker = Arc::clone(&self.parts.tracker);
        let version = assignment.version.clone();
        let url = Url::parse(&assignment.url).map_err(|e| {
            Refusal::Final(format!("the assignment's URL {:?} is not a URL: {e}", assignment.url))
        })?;
        let request = Assignment {
            url,
            version: Some(assignment.version.clone()),
            manifest_sha256: Some(assignment.manifest_sha256.to_ascii_lowercase()),
            retry_rejected: false,
        };
        tracker.report(&version, UpdateState::Downloading, None);
        let reported = Mutex::new(UpdateState::Downloading);
        let on_event = |event: &StageEvent| {
            let state = match event {
                StageEvent::Verifying { .. } => UpdateState::Verifying,
                _ => UpdateState::Downloading,
            };
            let mut last = reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last != state {
                *last = state;
                tracker.report(&version, state, None);
            }
        };
        let staged = match self.updater()?.stage(&request, &on_event).await? {
            Staged::Ready(staged) => staged,
            Staged::AlreadyActive(view) => return self.serve_slot(view, &version).await,
        };

        tracker.report(&version, UpdateState::Probing, None);
        let candidate = self.load_and_probe(staged.dir().to_path_buf()).await?;
        let Some(updater) = self.updater.as_mut() else {
            return Err(Refusal::Final("the slot store was closed".into()));
        };
        let slots = updater.slots_mut();
        let view = slots.activate(&staged, self.parts.config.probation)?;
        // The swap counts as a start of the slot; if the process dies before it is recorded
        // healthy, the next start counts it as a crash.
        if let ProbationOutcome::RolledBack(rollback) = slots.record_start()? {
            return Err(Refusal::Final(format!("probation refused the new slot: {}", rollback.reason)));
        }
        let on_probation = slots.probation().is_some();
        let model = &self.parts.model;
        let old =
            tracker.activated(&version, Some(view.slot.to_string()), on_probation, || model.swap(candidate));
        slots.record_healthy()?;
        tracing::info!(
            version, slot = %view.slot, previous = old.version(), requests_on_previous = Arc::strong_count(&old) - 1,
            "the new model serves; requests already running finish on the previous one"
        );
        drop(old);
        Ok(())
    }

    /// The active slot holds the assigned bundle but another model is served: load and swap it.
    async fn serve_slot(&mut self, view: SlotView, version: &str) -> Result<(), Refusal> {
        let candidate = if self.parts.model.current().version() != view.bundle.version {
            self.parts.tracker.report(version, UpdateState::Probing, None);
            Some(self.load_and_probe(view.dir.clone()).await?)
        } else {
            None
        };
        let on_probation = self.updater()?.slots().probation().is_some();
        let model = &self.parts.model;
        let swap = || candidate.map(|candidate| model.swap(candidate));
        drop(self.parts.tracker.activated(version, Some(view.slot.to_string()), on_probation, swap));
        Ok(())
    }

    /// Loads `dir` in a second engine session and runs the probe on it.
    async fn load_and_probe(&self, dir: PathBuf) -> Result<ServingModel, Refusal> {
        let engine = self.parts.engine.clone();
        let shown = dir.display().to_string();
        let candidate = tokio::task::spawn_blocking(move || ServingModel::load(&dir, &engine))
            .await
            .map_err(|e| Refusal::Final(format!("loading the new model panicked: {e}")))?
            .map_err(|e| Refusal::Final(format!("probe failed: {e}")))?;
        let tokens =
            self.probe(&candidate).await.map_err(|e| Refusal::Final(format!("probe failed: {e}")))?;
        tracing::info!(dir = shown, tokens, "the new model answered its probe");
        Ok(candidate)
    }

    async fn probe(&self, model: &ServingModel) -> Result<usize, crate::router::ServingModelError> {
        let config = &self.parts.config;
        model
            .probe(
                &config.probe_prompt,
                config.probe_max_tokens as usize,
                Duration::from_secs(config.probe_timeout_secs.max(1)),
            )
            .await
    }

    /// A health probe of the served slot while it is on probation.
    async fn health_probe(&mut self) {
        let on_probation = self.updater.as_ref().is_some_and(|u| u.slots().probation().is_some());
        if !on_probation {
            return;
        }
        let current = self.parts.model.current();
        let passed = match self.probe(&current).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, version = current.version(), "health probe of the model on probation failed");
                false
            }
        };
        drop(current);
        let Some(updater) = self.updater.as_mut() else { return };
        match updater.slots_mut().record_probe(passed) {
            Ok(ProbationOutcome::Committed) => self.parts.tracker.committed(),
            Ok(ProbationOutcome::RolledBack(rollback)) => {
                let target = updater.slots().current();
                let detail = rollback.reason.to_string();
                self.revert_to(target).await;
                self.parts.tracker.finish(&rollback.from.version, UpdateOutcome::RolledBack, Some(detail));
            }
            Ok(ProbationOutcome::Continue | ProbationOutcome::NotOnProbation) => {}
            Err(error) => tracing::error!(%error, "cannot record the health probe"),
        }
    }

    /// Serves `target` (the configured model when `None`) after a rollback.
    async fn revert_to(&mut self, target: Option<SlotView>) {
        let dir = match (&target, &self.parts.configured_model) {
            (Some(view), _) => view.dir.clone(),
            (None, Some(configured)) => configured.clone(),
            (None, None) => {
                tracing::error!(
                    "rolled back, but no model directory is configured; the reverted model keeps serving until restart"
                );
                return;
            }
        };
        let engine = self.parts.engine.clone();
        let loaded = tokio::task::spawn_blocking(move || ServingModel::load(&dir, &engine)).await;
        match loaded {
            Ok(Ok(model)) => {
                let version = model.version();
                drop(self.parts.model.swap(model));
                self.parts.tracker.serving(version, target.map(|v| v.slot.to_string()), false);
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot load the model rolled back to; it serves from the next start")
            }
            Err(error) => tracing::error!(%error, "loading the model rolled back to panicked"),
        }
    }
}

//! The rollout service: creates, pauses, resumes and aborts rollouts for the API, and evaluates
//! running ones periodically. Each evaluation reads the rollout's record and observations from the
//! database, asks [`super::decide::evaluate`] what to do, records the step in one transaction, and
//! then publishes the assignments (retained) on the devices' `assignment` topics. Everything the
//! rollout knows is in the database, so a fleet killed at any point resumes where it was; the
//! assignments are published again at every start, because the embedded broker keeps retained
//! messages in memory only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tandem_core::protocol::{ModelAssignment, PROTOCOL_VERSION, TopicKind};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::decide::{Progress, RolloutStatus, Transition, evaluate};
use super::plan::{HealthGates, RolloutPlan, RolloutStage};
use crate::device_link::DeviceLink;
use crate::metrics::FleetMetrics;
use crate::store::{AssignmentRow, ModelRecord, RolloutChange, RolloutRecord, Store, StoreError, now_ms};

/// Why a rollout request failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("no rollout {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// `POST /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRollout {
    /// The registered bundle's name.
    pub model: String,
    /// Its version to roll out.
    pub version: String,
    /// Stages, canary first, the last at 100 %.
    pub stages: Vec<RolloutStage>,
    /// Health gates.
    #[serde(default)]
    pub gates: HealthGates,
    /// Only devices of this group.
    #[serde(default)]
    pub group: Option<String>,
    /// The registered version devices get back on a halt or abort; default: the newest version of
    /// the model registered before this one.
    #[serde(default)]
    pub rollback_version: Option<String>,
    /// Replace the running or paused rollouts whose devices overlap this one's.
    #[serde(default)]
    pub supersede: bool,
}

/// The rollout service.
pub struct Rollouts {
    store: Store,
    link: Arc<dyn DeviceLink>,
    /// `PUBLIC_URL/v1/registry`.
    registry_url: String,
    /// One change at a time in this process (the API and the periodic evaluation).
    changing: Mutex<()>,
    wake: Notify,
    metrics: Arc<FleetMetrics>,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").field("registry_url", &self.registry_url).finish_non_exhaustive()
    }
}

impl Rollouts {
    /// The service; `public_url` is the fleet's API as devices reach it.
    pub fn new(
        store: Store,
        link: Arc<dyn DeviceLink>,
        public_url: &str,
        metrics: Arc<FleetMetrics>,
    ) -> Self {
        Self {
            store,
            link,
            registry_url: format!("{}/v1/registry", public_url.trim_end_matches('/')),
            changing: Mutex::new(()),
            wake: Notify::new(),
            metrics,
        }
    }

    /// Evaluates running rollouts every `interval` (and when woken) until `shutdown`.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.evaluate_all().await {
                tracing::error!(%error, "cannot evaluate the rollouts; retrying at the next interval");
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Publishes every recorded assignment again (retained).
    pub async fn republish(&self) -> Result<usize, StoreError> {
        let assignments = self.store.all_assignments().await?;
        for row in &assignments {
            self.publish(row);
        }
        Ok(assignments.len())
    }

    /// Starts a rollout and makes its first step.
    pub async fn create(&self, request: NewRollout) -> Result<RolloutRecord, RolloutError> {
        let plan = RolloutPlan { stages: request.stages, gates: request.gates, group: request.group };
        plan.validate().map_err(RolloutError::Invalid)?;
        let target = self.store.model(&request.model, &request.version).await?.ok_or_else(|| {
            RolloutError::Invalid(format!("{} version {} is not registered", request.model, request.version))
        })?;
        let rollback = match &request.rollback_version {
            Some(version) if *version == request.version => {
                return Err(RolloutError::Invalid("rollback_version is the version being rolled out".into()));
            }
            Some(version) => self.store.model(&request.model, version).await?.ok_or_else(|| {
                RolloutError::Invalid(format!(
                    "rollback_version {version} of {} is not registered",
                    request.model
                ))
            })?,
            None => self
                .store
                .list_models()
                .await?
                .into_iter()
                .rfind(|m| {
                    m.name == target.name
                        && m.version != target.version
                        && m.registered_at_ms <= target.registered_at_ms
                })
                .ok_or_else(|| {
                    RolloutError::Invalid(format!(
                        "no earlier version of {} is registered to roll back to: register one, or give \
                         rollback_version",
                        target.name
                    ))
                })?,
        };

        let one_change = self.changing.lock().await;
        let overlapping: Vec<RolloutRecord> = self
            .store
            .active_rollouts()
            .await?
            .into_iter()
            .filter(|r| r.plan.group.is_none() || plan.group.is_none() || r.plan.group == plan.group)
            .collect();
        if !overlapping.is_empty() && !request.supersede {
            let running: Vec<String> = overlapping
                .iter()
                .map(|r| format!("{} ({} {}, {})", r.id, r.model_name, r.version, r.status.as_str()))
                .collect();
            return Err(RolloutError::Conflict(format!(
                "rollout(s) {} already own these devices: pause or abort them, or pass \"supersede\": true",
                running.join(", ")
            )));
        }
        let now = now_ms();
        let record = RolloutRecord {
            id: uuid::Uuid::now_v7().to_string(),
            model_name: target.name.clone(),
            version: target.version.clone(),
            rollback_version: rollback.version.clone(),
            plan,
            status: RolloutStatus::Running,
            stage: 0,
            stage_started_ms: now,
            reason: None,
            waiting: None,
            superseded_by: None,
            created_ms: now,
            updated_ms: now,
        };
        let superseded: Vec<String> = overlapping.iter().map(|r| r.id.clone()).collect();
        self.store.insert_rollout(&record, &superseded).await?;
        drop(one_change);
        tracing::info!(
            rollout = %record.id,
            model = %record.model_name,
            version = %record.version,
            rollback_version = %record.rollback_version,
            superseded = ?superseded,
            "rollout started"
        );
        self.metrics.rollout_transition("started");
        self.step(&record.id).await?;
        Ok(self.store.rollout(&record.id).await?.unwrap_or(record))
    }

    /// Stops assigning; what was assigned stays.
    pub async fn pause(&self, id: &str) -> Result<RolloutRecord, RolloutError> {
        let record = self.change_status(id, RolloutStatus::Running, RolloutStatus::Paused, None).await?;
        self.metrics.rollout_transition("paused");
        Ok(record)
    }

    /// Continues a paused rollout; the current stage's soak starts again.
    pub async fn resume(&self, id: &str) -> Result<RolloutRecord, RolloutError> {
        let record = self.change_status(id, RolloutStatus::Paused, RolloutStatus::Running, None).await?;
        self.metrics.rollout_transition("resumed");
        self.wake.notify_one();
        Ok(record)
    }

    /// Stops the rollout and gives every device it reached the rollback version.
    pub async fn abort(&self, id: &str) -> Result<RolloutRecord, RolloutError> {
        let _one_change = self.changing.lock().await;
        let record = self.store.rollout(id).await?.ok_or_else(|| RolloutError::NotFound(id.into()))?;
        if !record.status.is_active() {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} is {}; only a running or paused rollout can be aborted",
                record.status.as_str()
            )));
        }
        let reached: Vec<String> = self
            .store
            .rollout_devices(id)
            .await?
            .into_iter()
            .filter(|(_, _, rolled_back)| rolled_back.is_none())
            .map(|(device, _, _)| device)
            .collect();
        let now = now_ms();
        let rolled_back = self.assignments(&record, &record.rollback_version, &reached, now).await?;
        let change = RolloutChange {
            expect_status: record.status,
            status: RolloutStatus::Aborted,
            stage: record.stage,
            stage_started_ms: record.stage_started_ms,
            reason: Some("aborted by the operator".into()),
            waiting: None,
            reached: Vec::new(),
            rolled_back,
            at_ms: now,
        };
        self.record(&record, &change).await?;
        self.metrics.rollout_transition("aborted");
        Ok(self.store.rollout(id).await?.unwrap_or(record))
    }

    /// Makes one step of every running rollout, then gives devices that appeared after a rollout
    /// completed the version it rolled out.
    pub async fn evaluate_all(&self) -> Result<(), RolloutError> {
        for rollout in self.store.active_rollouts().await? {
            if rollout.status == RolloutStatus::Running {
                self.step(&rollout.id).await?;
            }
        }
        self.assign_latecomers().await
    }

    /// Devices never assigned anything, outside every running or paused rollout, get the version
    /// of the newest completed rollout that covers them (its group, or every device), recorded as
    /// reached by it; without such a rollout they keep what they run.
    async fn assign_latecomers(&self) -> Result<(), RolloutError> {
        let _one_change = self.changing.lock().await;
        let unassigned = self.store.unassigned_devices().await?;
        if unassigned.is_empty() {
            return Ok(());
        }
        let rollouts = self.store.list_rollouts().await?;
        let covers = |rollout: &RolloutRecord, group: &Option<String>| {
            rollout.plan.group.is_none() || rollout.plan.group == *group
        };
        let mut by_rollout: Vec<(&RolloutRecord, Vec<String>)> = Vec::new();
        for (device, group) in unassigned {
            let owned_by_active = rollouts.iter().any(|r| {
                matches!(r.status, RolloutStatus::Running | RolloutStatus::Paused) && covers(r, &group)
            });
            // Newest first: the first completed one covering the device is the fleet's version for it.
            let latest = rollouts.iter().find(|r| r.status == RolloutStatus::Completed && covers(r, &group));
            if let (false, Some(rollout)) = (owned_by_active, latest) {
                match by_rollout.iter_mut().find(|(r, _)| r.id == rollout.id) {
                    Some((_, devices)) => devices.push(device),
                    None => by_rollout.push((rollout, vec![device])),
                }
            }
        }
        for (record, devices) in by_rollout {
            let now = now_ms();
            let change = RolloutChange {
                expect_status: RolloutStatus::Completed,
                status: RolloutStatus::Completed,
                stage: record.stage,
                stage_started_ms: record.stage_started_ms,
                reason: record.reason.clone(),
                waiting: record.waiting.clone(),
                reached: self.assignments(record, &record.version, &devices, now).await?,
                rolled_back: Vec::new(),
                at_ms: now,
            };
            tracing::info!(
                rollout = %record.id,
                version = %record.version,
                devices = ?devices,
                "devices that appeared after the rollout completed get its version"
            );
            self.record(record, &change).await?;
        }
        Ok(())
    }

    async fn change_status(
        &self,
        id: &str,
        from: RolloutStatus,
        to: RolloutStatus,
        reason: Option<String>,
    ) -> Result<RolloutRecord, RolloutError> {
        let _one_change = self.changing.lock().await;
        let record = self.store.rollout(id).await?.ok_or_else(|| RolloutError::NotFound(id.into()))?;
        if record.status != from {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} is {}, not {}",
                record.status.as_str(),
                from.as_str()
            )));
        }
        let now = now_ms();
        let change = RolloutChange {
            expect_status: from,
            status: to,
            stage: record.stage,
            stage_started_ms: if to == RolloutStatus::Running { now } else { record.stage_started_ms },
            reason: reason.or(record.reason.clone()),
            waiting: None,
            reached: Vec::new(),
            rolled_back: Vec::new(),
            at_ms: now,
        };
        self.record(&record, &change).await?;
        Ok(self.store.rollout(id).await?.unwrap_or(record))
    }

    /// One evaluation of rollout `id`.
    async fn step(&self, id: &str) -> Result<(), RolloutError> {
        let _one_change = self.changing.lock().await;
        let Some(record) = self.store.rollout(id).await? else { return Ok(()) };
        if record.status != RolloutStatus::Running {
            return Ok(());
        }
        let (devices, health) = self.store.rollout_observations(&record).await?;
        let now = now_ms();
        let progress = Progress {
            status: record.status,
            stage: record.stage,
            stage_started_ms: record.stage_started_ms,
        };
        let step = evaluate(&record.id, &record.version, &record.plan, &progress, &devices, &health, now);
        let mut change = RolloutChange {
            expect_status: RolloutStatus::Running,
            status: RolloutStatus::Running,
            stage: record.stage,
            stage_started_ms: record.stage_started_ms,
            reason: record.reason.clone(),
            waiting: step.waiting.clone(),
            reached: self.assignments(&record, &record.version, &step.assign, now).await?,
            rolled_back: Vec::new(),
            at_ms: now,
        };
        match &step.transition {
            None => {}
            Some(Transition::Advance { stage }) => {
                change.stage = *stage;
                change.stage_started_ms = now;
                tracing::info!(rollout = %record.id, stage = stage + 1, devices = step.assign.len(), "rollout stage started");
                self.metrics.rollout_transition("stage_advanced");
            }
            Some(Transition::Complete) => {
                change.status = RolloutStatus::Completed;
                tracing::info!(rollout = %record.id, version = %record.version, "rollout completed");
                self.metrics.rollout_transition("completed");
            }
            Some(Transition::Halt { reason, roll_back }) => {
                change.status = RolloutStatus::Halted;
                change.reason = Some(reason.clone());
                change.rolled_back =
                    self.assignments(&record, &record.rollback_version, roll_back, now).await?;
                tracing::warn!(
                    rollout = %record.id,
                    %reason,
                    rolled_back = roll_back.len(),
                    rollback_version = %record.rollback_version,
                    "rollout halted and rolled back"
                );
                self.metrics.rollout_transition("halted");
            }
        }
        if step.transition.is_none() && step.assign.is_empty() && change.waiting == record.waiting {
            return Ok(());
        }
        self.record(&record, &change).await
    }

    /// Records `change` and publishes its assignments.
    async fn record(&self, record: &RolloutRecord, change: &RolloutChange) -> Result<(), RolloutError> {
        if !self.store.apply_rollout_change(&record.id, change).await? {
            return Err(RolloutError::Conflict(format!(
                "rollout {} changed meanwhile; try again",
                record.id
            )));
        }
        for row in change.reached.iter().chain(&change.rolled_back) {
            self.publish(row);
        }
        let reached_kind =
            if change.expect_status == RolloutStatus::Completed { "late_device" } else { "new" };
        self.metrics.rollout_assigned(reached_kind, change.reached.len());
        self.metrics.rollout_assigned("rollback", change.rolled_back.len());
        Ok(())
    }

    /// Assignments of `version` of the rollout's model to `devices`.
    async fn assignments(
        &self,
        record: &RolloutRecord,
        version: &str,
        devices: &[String],
        now: i64,
    ) -> Result<Vec<AssignmentRow>, RolloutError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let model: ModelRecord = self.store.model(&record.model_name, version).await?.ok_or_else(|| {
            RolloutError::Store(StoreError::Corrupt(format!(
                "rollout {} names {} version {version}, which is not registered",
                record.id, record.model_name
            )))
        })?;
        let assignment = ModelAssignment {
            v: PROTOCOL_VERSION,
            rollout_id: Some(record.id.clone()),
            bundle_name: model.name.clone(),
            version: model.version.clone(),
            manifest_sha256: model.manifest_sha256.clone(),
            url: format!("{}/{}/{}/", self.registry_url, model.name, model.version),
            assigned_at_ms: u64::try_from(now).unwrap_or(0),
        };
        let payload = String::from_utf8(assignment.to_payload()).expect("JSON is UTF-8");
        Ok(devices
            .iter()
            .map(|device| AssignmentRow {
                device_id: device.clone(),
                rollout_id: Some(record.id.clone()),
                bundle_name: model.name.clone(),
                version: model.version.clone(),
                assigned_at_ms: now,
                payload: payload.clone(),
            })
            .collect())
    }

    fn publish(&self, row: &AssignmentRow) {
        self.link.publish(
            &row.device_id,
            TopicKind::Assignment,
            Bytes::from(row.payload.clone().into_bytes()),
            true,
            None,
        );
    }
}

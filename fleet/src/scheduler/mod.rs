//! The retraining scheduler: jobs that export a dataset from the fleet's telemetry, run the
//! trainer (on this host or through a command template), and register the signed bundle they
//! produce. Jobs start on demand (API, CLI), on a schedule, or when a rule over telemetry fires
//! (`rules`, pure); `dataset` writes the trainer's JSONL; `runner` runs the commands; `job`
//! prepares a job's folder and run configuration. Everything a job is lives in its database
//! record, so a fleet that dies with jobs running marks them failed when it starts again.

pub mod dataset;
mod job;
pub mod rules;
pub mod runner;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{JobTemplate, SchedulerConfig};
use crate::registry::Registry;
use crate::rollout::{NewRollout, Rollouts};
use crate::store::{JobOutputs, JobRecord, JobState, Store, StoreError, now_ms};
pub use job::{PreparedJob, RunConfigError, task_data};
use rules::{Observations, Trigger};
use runner::{RunOutcome, Runner};

/// The reason recorded for jobs that were active when the fleet stopped.
pub const FLEET_RESTARTED: &str = "fleet restarted";

/// Why a job could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("no job template `{0}` in [scheduler]")]
    UnknownTemplate(String),
    #[error("a job of template `{0}` is already queued or running")]
    Busy(String),
    #[error("no job {0}")]
    NotFound(String),
    #[error("{0}")]
    RunConfig(#[from] RunConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The scheduler service.
pub struct Scheduler {
    store: Store,
    config: SchedulerConfig,
    registry: Option<Arc<Registry>>,
    rollouts: Option<Arc<Rollouts>>,
    runner: Runner,
    /// Cancellation of each job this process runs.
    active: Mutex<HashMap<String, CancellationToken>>,
    /// Fires when the fleet stops: running commands are killed, their records left as they are.
    shutdown: CancellationToken,
}

impl Scheduler {
    /// The service; marks the jobs a previous fleet left active as failed ([`FLEET_RESTARTED`]).
    pub async fn start(
        store: Store,
        config: SchedulerConfig,
        registry: Option<Arc<Registry>>,
        rollouts: Option<Arc<Rollouts>>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let failed = store.fail_active_jobs(FLEET_RESTARTED, now_ms()).await?;
        if failed > 0 {
            tracing::warn!(jobs = failed, "jobs that were active when the fleet stopped are marked failed");
        }
        if let Err(error) = std::fs::create_dir_all(&config.work_dir) {
            tracing::error!(%error, dir = %config.work_dir.display(), "cannot create scheduler.work_dir");
        }
        let runner = Runner { kind: config.runner, command_template: config.command_template.clone() };
        Ok(Arc::new(Self {
            store,
            config,
            registry,
            rollouts,
            runner,
            active: Mutex::new(HashMap::new()),
            shutdown,
        }))
    }

    /// Lines of log the API shows.
    pub fn log_tail_lines(&self) -> usize {
        self.config.log_tail_lines
    }

    /// The template `name`.
    pub fn template(&self, name: &str) -> Option<&JobTemplate> {
        self.config.template(name)
    }

    /// Records a job of `template` and starts it; refused while one of the template is active.
    pub async fn submit(
        self: &Arc<Self>,
        template: &str,
        overrides: &BTreeMap<String, toml::Value>,
        trigger: Trigger,
    ) -> Result<JobRecord, SchedulerError> {
        let template =
            self.config.template(template).ok_or_else(|| SchedulerError::UnknownTemplate(template.into()))?;
        let version = match &template.model {
            Some(model) => {
                let registered = self.store.list_models().await?;
                Some(job::next_version(
                    model,
                    registered.iter().map(|m| (m.name.as_str(), m.version.as_str())),
                ))
            }
            None => None,
        };
        let prepared = job::prepare(&self.config.work_dir, template, overrides, &trigger, version)?;
        if !self.store.insert_job(&prepared.record).await? {
            let _ = std::fs::remove_dir_all(&prepared.work_dir);
            return Err(SchedulerError::Busy(template.name.clone()));
        }
        let record = prepared.record.clone();
        tracing::info!(job = %record.id, template = %record.template, trigger = %record.trigger, detail = %record.trigger_detail, "job queued");
        let stop = self.shutdown.child_token();
        self.active.lock().expect("not poisoned").insert(record.id.clone(), stop.clone());
        let this = self.clone();
        let template = template.clone();
        tokio::spawn(async move {
            let id = prepared.record.id.clone();
            this.execute(prepared, &template, &stop).await;
            this.active.lock().expect("not poisoned").remove(&id);
        });
        Ok(record)
    }

    /// Cancels an active job: recorded as `cancelled` at once, its command killed.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, SchedulerError> {
        let job = self.store.job(id).await?.ok_or_else(|| SchedulerError::NotFound(id.into()))?;
        if !job.state.is_final() {
            self.store
                .finish_job(
                    id,
                    JobState::Cancelled,
                    Some("cancelled by the operator"),
                    &JobOutputs::default(),
                    now_ms(),
                )
                .await?;
            if let Some(stop) = self.active.lock().expect("not poisoned").get(id) {
                stop.cancel();
            }
            tracing::info!(job = %id, "job cancelled");
        }
        self.store.job(id).await?.ok_or_else(|| SchedulerError::NotFound(id.into()))
    }

    /// Evaluates every template's triggers every `interval` until shutdown.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            for template in &self.config.template {
                if let Err(error) = self.evaluate(template).await {
                    tracing::error!(template = %template.name, %error, "cannot evaluate the job triggers");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn evaluate(self: &Arc<Self>, template: &JobTemplate) -> Result<(), SchedulerError> {
        if template.every_hours.is_none() && template.call_ratio.is_none() && template.new_prompts.is_none() {
            return Ok(());
        }
        let now = now_ms();
        let last = self.store.latest_job(&template.name).await?;
        let last_job_ms = last.as_ref().map(|j| j.created_ms);
        let traffic = match &template.call_ratio {
            Some(rule) => {
                let since = rules::call_ratio_since(rule.period_secs, now, last_job_ms);
                self.store.version_traffic(since).await?
            }
            None => Vec::new(),
        };
        let new_prompts = match &template.new_prompts {
            Some(_) => self.store.count_prompts_received_since(last_job_ms.unwrap_or(0)).await?,
            None => 0,
        };
        let seen = Observations {
            now_ms: now,
            last_job_ms,
            job_active: last.as_ref().is_some_and(|j| !j.state.is_final()),
            traffic,
            new_prompts,
        };
        if let Some(trigger) = rules::evaluate(template, &seen) {
            match self.submit(&template.name, &BTreeMap::new(), trigger).await {
                Ok(_) | Err(SchedulerError::Busy(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Exports the dataset, runs the commands, registers the bundle, records the ending.
    async fn execute(&self, prepared: PreparedJob, template: &JobTemplate, stop: &CancellationToken) {
        let id = prepared.record.id.clone();
        let log = prepared.log_path.clone();
        let ending = self.run_job(&prepared, template, stop).await;
        let (state, reason, outputs) = match ending {
            Ok(outputs) => (JobState::Succeeded, None, outputs),
            Err(JobFailure::Stopped) => {
                // Cancelled (recorded by `cancel`), or the fleet is stopping: the next start marks
                // the job failed.
                return;
            }
            Err(JobFailure::Failed(reason)) => (JobState::Failed, Some(reason), JobOutputs::default()),
        };
        runner::append(&log, &format!("# job {}: {}\n", state.as_str(), reason.as_deref().unwrap_or("done")));
        match self.store.finish_job(&id, state, reason.as_deref(), &outputs, now_ms()).await {
            Ok(true) => {
                tracing::info!(job = %id, state = state.as_str(), reason = reason.as_deref().unwrap_or(""), "job finished")
            }
            Ok(false) => {}
            Err(error) => tracing::error!(job = %id, %error, "cannot record the end of the job"),
        }
    }

    async fn run_job(
        &self,
        prepared: &PreparedJob,
        template: &JobTemplate,
        stop: &CancellationToken,
    ) -> Result<JobOutputs, JobFailure> {
        let id = &prepared.record.id;
        let since = if template.collected_days == 0 {
            0
        } else {
            now_ms() - i64::from(template.collected_days) * 86_400_000
        };
        let counts = dataset::export_to_file(
            &self.store,
            &prepared.task_data,
            &template.held_out,
            since,
            &prepared.dataset_path,
        )
        .await
        .map_err(|e| JobFailure::Failed(format!("cannot export the dataset: {e}")))?;
        runner::append(&prepared.log_path, &format!("# dataset: {counts}\n"));
        let rows = i64::try_from(counts.lines()).unwrap_or(i64::MAX);
        let started = self.store.start_job(id, now_ms(), rows).await;
        match started {
            Ok(true) => {}
            Ok(false) => return Err(JobFailure::Stopped),
            Err(error) => return Err(JobFailure::Failed(format!("cannot record the start: {error}"))),
        }
        let values = prepared.placeholders();
        let values: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match self.runner.run(&prepared.commands, &values, &prepared.work_dir, &prepared.log_path, stop).await
        {
            RunOutcome::Succeeded => {}
            RunOutcome::Stopped => return Err(JobFailure::Stopped),
            RunOutcome::Failed(reason) => return Err(JobFailure::Failed(reason)),
        }
        let mut outputs = JobOutputs::default();
        let Some(registry) = self.registry.as_ref().filter(|_| self.config.register) else {
            return Ok(outputs);
        };
        let registered = registry.register(&self.store, &prepared.bundle_path).await.map_err(|e| {
            JobFailure::Failed(format!("cannot register {}: {e}", prepared.bundle_path.display()))
        })?;
        let model = registered.model;
        runner::append(
            &prepared.log_path,
            &format!("# registered {} version {}\n", model.name, model.version),
        );
        outputs.model_name = Some(model.name.clone());
        outputs.model_version = Some(model.version.clone());
        outputs.evaluation = Some(model.evaluation.clone());
        if self.config.rollout
            && let Some(rollouts) = &self.rollouts
        {
            let mut plan = self.config.rollout_plan.clone().unwrap_or_else(
                || serde_json::json!({"stages": [{"percent": 10, "soak_secs": 600}, {"percent": 100}]}),
            );
            plan["model"] = model.name.clone().into();
            plan["version"] = model.version.clone().into();
            let request: NewRollout = serde_json::from_value(plan)
                .map_err(|e| JobFailure::Failed(format!("scheduler.rollout_plan: {e}")))?;
            let rollout = rollouts
                .create(request)
                .await
                .map_err(|e| JobFailure::Failed(format!("cannot start the rollout: {e}")))?;
            runner::append(&prepared.log_path, &format!("# rollout {} started\n", rollout.id));
            outputs.rollout_id = Some(rollout.id);
        }
        Ok(outputs)
    }
}

enum JobFailure {
    Stopped,
    Failed(String),
}

//! The scheduler's records: retraining jobs, and the telemetry aggregates its rules read.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};

/// A job's state. `queued` and `running` are active; the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => return Err(StoreError::Corrupt(format!("jobs.state `{other}`"))),
        })
    }

    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// A retraining job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: String,
    /// The job template of `[scheduler]` it runs.
    pub template: String,
    /// `on_demand`, `schedule`, `call_ratio` or `new_prompts`.
    pub trigger: String,
    /// Why it was triggered, in words.
    pub trigger_detail: String,
    pub state: JobState,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Unix ms.
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// The run configuration it used (TOML, after its overrides).
    pub run_config: String,
    /// Its folder: run configuration, dataset, log, the run and the bundle.
    pub work_dir: String,
    pub log_path: String,
    /// Lines of the exported dataset.
    pub dataset_rows: Option<i64>,
    /// The bundle it registered.
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    /// The rollout created for it, when `scheduler.rollout` is on.
    pub rollout_id: Option<String>,
    /// The bundle manifest's evaluation results.
    pub evaluation: Option<serde_json::Value>,
}

const JOB_COLUMNS: &str = "id, template, trigger_kind, trigger_detail, state, reason, created_ms, started_ms, \
     finished_ms, run_config, work_dir, log_path, dataset_rows, model_name, model_version, rollout_id, evaluation";

fn job_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let state: String = row.try_get("state")?;
    let evaluation: Option<String> = row.try_get("evaluation")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        template: row.try_get("template")?,
        trigger: row.try_get("trigger_kind")?,
        trigger_detail: row.try_get("trigger_detail")?,
        state: JobState::parse(&state)?,
        reason: row.try_get("reason")?,
        created_ms: row.try_get("created_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        run_config: row.try_get("run_config")?,
        work_dir: row.try_get("work_dir")?,
        log_path: row.try_get("log_path")?,
        dataset_rows: row.try_get("dataset_rows")?,
        model_name: row.try_get("model_name")?,
        model_version: row.try_get("model_version")?,
        rollout_id: row.try_get("rollout_id")?,
        evaluation: evaluation
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("jobs.evaluation: {e}")))?,
    })
}

/// What a finished job produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOutputs {
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    pub rollout_id: Option<String>,
    pub evaluation: Option<serde_json::Value>,
}

/// One model version's traffic in a period.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionTraffic {
    pub model_version: String,
    pub queries: i64,
    pub cloud: i64,
}

/// An opted-in prompt and the cloud's answer to it, when it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedPrompt {
    /// The event's id (the page key).
    pub id: String,
    pub prompt: String,
    pub cloud_answer: Option<String>,
}

impl Store {
    /// Records a new job (queued); false when a job of its template is already queued or running.
    /// The check and the insert are one statement, so two triggers cannot both start one.
    pub async fn insert_job(&self, job: &JobRecord) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
             $15, $16, $17 WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE template = $18 AND state IN ('queued', 'running'))"
        );
        let done = sqlx::query(&sql)
            .bind(job.id.clone())
            .bind(job.template.clone())
            .bind(job.trigger.clone())
            .bind(job.trigger_detail.clone())
            .bind(job.state.as_str())
            .bind(job.reason.clone())
            .bind(job.created_ms)
            .bind(job.started_ms)
            .bind(job.finished_ms)
            .bind(job.run_config.clone())
            .bind(job.work_dir.clone())
            .bind(job.log_path.clone())
            .bind(job.dataset_rows)
            .bind(job.model_name.clone())
            .bind(job.model_version.clone())
            .bind(job.rollout_id.clone())
            .bind(job.evaluation.as_ref().map(ToString::to_string))
            .bind(job.template.clone())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The job `id`.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs, newest first, at most `limit`.
    pub async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_ms DESC, id DESC LIMIT $1");
        let rows = sqlx::query(&sql).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The newest job of `template`, whatever its state.
    pub async fn latest_job(&self, template: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE template = $1 ORDER BY created_ms DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql).bind(template.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Queued → running; false when the job is no longer queued (cancelled meanwhile).
    pub async fn start_job(&self, id: &str, at_ms: i64, dataset_rows: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'running', started_ms = $1, dataset_rows = $2 \
             WHERE id = $3 AND state = 'queued'",
        )
        .bind(at_ms)
        .bind(dataset_rows)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends an active job in `state` (final) with its reason and outputs; false when it had ended
    /// already (a cancel won the race, say), which then keeps its first ending.
    pub async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        reason: Option<&str>,
        outputs: &JobOutputs,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        debug_assert!(state.is_final());
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, reason = $2, finished_ms = $3, model_name = $4, model_version = $5, \
             rollout_id = $6, evaluation = $7 WHERE id = $8 AND state IN ('queued', 'running')",
        )
        .bind(state.as_str())
        .bind(reason.map(str::to_string))
        .bind(at_ms)
        .bind(outputs.model_name.clone())
        .bind(outputs.model_version.clone())
        .bind(outputs.rollout_id.clone())
        .bind(outputs.evaluation.as_ref().map(ToString::to_string))
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks every active job failed with `reason` (at start: their processes died with the
    /// fleet that ran them); returns how many.
    pub async fn fail_active_jobs(&self, reason: &str, at_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'failed', reason = $1, finished_ms = $2 WHERE state IN ('queued', 'running')",
        )
        .bind(reason.to_string())
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Queries and cloud calls per model version among raw events at or after `since_ms` (device
    /// clock).
    pub async fn version_traffic(&self, since_ms: i64) -> Result<Vec<VersionTraffic>, StoreError> {
        let rows = sqlx::query(
            "SELECT model_version, CAST(COUNT(*) AS BIGINT) AS queries, \
             CAST(SUM(CASE WHEN route = 'cloud' THEN 1 ELSE 0 END) AS BIGINT) AS cloud \
             FROM events WHERE at_ms >= $1 GROUP BY model_version ORDER BY model_version",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(VersionTraffic {
                    model_version: row.try_get("model_version")?,
                    queries: row.try_get("queries")?,
                    cloud: row.try_get("cloud")?,
                })
            })
            .collect()
    }

    /// Events with a recorded prompt that the fleet received after `since_ms` (its clock).
    pub async fn count_prompts_received_since(&self, since_ms: i64) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM events WHERE prompt IS NOT NULL AND received_ms > $1",
        )
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Opted-in prompts of events at or after `since_ms` (device clock), in id order after the
    /// id `after`, at most `limit`.
    pub async fn collected_prompts(
        &self,
        since_ms: i64,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CollectedPrompt>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, prompt, cloud_answer FROM events WHERE prompt IS NOT NULL AND at_ms >= $1 AND id > $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(since_ms)
        .bind(after.unwrap_or("").to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(CollectedPrompt {
                    id: row.try_get("id")?,
                    prompt: row.try_get("prompt")?,
                    cloud_answer: row.try_get("cloud_answer")?,
                })
            })
            .collect()
    }
}

//! Rollouts, the devices each one reached, and every device's current assignment. A rollout's
//! step (its new status or stage, the assignments it makes and the devices it rolls back) is
//! written in one transaction, so a fleet killed at any point resumes from a consistent record.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;
use tandem_core::protocol::UpdateState;

use super::devices::update_row;
use super::latency::LatencyHistogram;
use super::{Store, StoreError};
use crate::rollout::{DeviceObservation, ObservedReport, RolloutPlan, RolloutStatus, VersionHealth};

/// A rollout as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutRecord {
    pub id: String,
    pub model_name: String,
    /// The version being rolled out.
    pub version: String,
    /// The version devices get back when the rollout halts or is aborted.
    pub rollback_version: String,
    pub plan: RolloutPlan,
    pub status: RolloutStatus,
    /// Index of the current stage.
    pub stage: usize,
    /// Unix ms when the current stage started (or the rollout was resumed).
    pub stage_started_ms: i64,
    /// Why it halted, was aborted or superseded.
    pub reason: Option<String>,
    /// Why it is not advancing yet.
    pub waiting: Option<String>,
    /// The rollout that replaced it.
    pub superseded_by: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A device's assignment as recorded; `payload` is the `ModelAssignment` JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentRow {
    pub device_id: String,
    pub rollout_id: Option<String>,
    pub bundle_name: String,
    pub version: String,
    pub assigned_at_ms: i64,
    pub payload: String,
}

/// One rollout step to record.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutChange {
    /// The status the rollout must still have for the change to apply (another instance or an
    /// operator may have changed it meanwhile).
    pub expect_status: RolloutStatus,
    pub status: RolloutStatus,
    pub stage: usize,
    pub stage_started_ms: i64,
    pub reason: Option<String>,
    pub waiting: Option<String>,
    /// New assignments of the rollout's version: these devices join the rollout.
    pub reached: Vec<AssignmentRow>,
    /// Assignments of the rollback version to devices the rollout reached.
    pub rolled_back: Vec<AssignmentRow>,
    pub at_ms: i64,
}

const ROLLOUT_COLUMNS: &str = "id, model_name, version, rollback_version, plan, status, stage, stage_started_ms, \
     reason, waiting, superseded_by, created_ms, updated_ms";

fn rollout_from_row(row: &AnyRow) -> Result<RolloutRecord, StoreError> {
    let plan: String = row.try_get("plan")?;
    let status: String = row.try_get("status")?;
    let stage: i64 = row.try_get("stage")?;
    Ok(RolloutRecord {
        id: row.try_get("id")?,
        model_name: row.try_get("model_name")?,
        version: row.try_get("version")?,
        rollback_version: row.try_get("rollback_version")?,
        plan: serde_json::from_str(&plan).map_err(|e| StoreError::Corrupt(format!("rollouts.plan: {e}")))?,
        status: RolloutStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("rollouts.status `{status}`")))?,
        stage: usize::try_from(stage).map_err(|_| StoreError::Corrupt(format!("rollouts.stage {stage}")))?,
        stage_started_ms: row.try_get("stage_started_ms")?,
        reason: row.try_get("reason")?,
        waiting: row.try_get("waiting")?,
        superseded_by: row.try_get("superseded_by")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

async fn write_assignments(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    rows: &[AssignmentRow],
) -> Result<(), StoreError> {
    for row in rows {
        sqlx::query(
            "INSERT INTO device_assignments (device_id, rollout_id, bundle_name, version, assigned_at_ms, payload) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device_id) DO UPDATE SET \
             rollout_id = excluded.rollout_id, bundle_name = excluded.bundle_name, version = excluded.version, \
             assigned_at_ms = excluded.assigned_at_ms, payload = excluded.payload",
        )
        .bind(row.device_id.clone())
        .bind(row.rollout_id.clone())
        .bind(row.bundle_name.clone())
        .bind(row.version.clone())
        .bind(row.assigned_at_ms)
        .bind(row.payload.clone())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Store {
    /// Records a new rollout; every id in `supersedes` (active rollouts of the same model) becomes
    /// `superseded` by it, in the same transaction.
    pub async fn insert_rollout(
        &self,
        rollout: &RolloutRecord,
        supersedes: &[String],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for old in supersedes {
            sqlx::query(
                "UPDATE rollouts SET status = 'superseded', superseded_by = $1, reason = $2, waiting = NULL, \
                 updated_ms = $3 WHERE id = $4 AND status IN ('running', 'paused')",
            )
            .bind(rollout.id.clone())
            .bind(format!("superseded by rollout {} of version {}", rollout.id, rollout.version))
            .bind(rollout.created_ms)
            .bind(old.clone())
            .execute(&mut *tx)
            .await?;
        }
        let sql = format!(
            "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        sqlx::query(&sql)
            .bind(rollout.id.clone())
            .bind(rollout.model_name.clone())
            .bind(rollout.version.clone())
            .bind(rollout.rollback_version.clone())
            .bind(serde_json::to_string(&rollout.plan).expect("plans serialise"))
            .bind(rollout.status.as_str())
            .bind(rollout.stage as i64)
            .bind(rollout.stage_started_ms)
            .bind(rollout.reason.clone())
            .bind(rollout.waiting.clone())
            .bind(rollout.superseded_by.clone())
            .bind(rollout.created_ms)
            .bind(rollout.updated_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The rollout `id`.
    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1");
        let row = sqlx::query(&sql).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(rollout_from_row).transpose()
    }

    /// Every rollout, newest first.
    pub async fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_ms DESC, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// Running and paused rollouts, oldest first.
    pub async fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let sql = format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE status IN ('running', 'paused') ORDER BY created_ms, id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// Records one step of rollout `id`; false (nothing written) when its status is no longer
    /// `change.expect_status`.
    pub async fn apply_rollout_change(&self, id: &str, change: &RolloutChange) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE rollouts SET status = $1, stage = $2, stage_started_ms = $3, reason = $4, waiting = $5, \
             updated_ms = $6 WHERE id = $7 AND status = $8",
        )
        .bind(change.status.as_str())
        .bind(change.stage as i64)
        .bind(change.stage_started_ms)
        .bind(change.reason.clone())
        .bind(change.waiting.clone())
        .bind(change.at_ms)
        .bind(id.to_string())
        .bind(change.expect_status.as_str())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        for row in &change.reached {
            sqlx::query(
                "INSERT INTO rollout_devices (rollout_id, device_id, assigned_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (rollout_id, device_id) DO UPDATE SET assigned_at_ms = excluded.assigned_at_ms, \
                 rolled_back_ms = NULL",
            )
            .bind(id.to_string())
            .bind(row.device_id.clone())
            .bind(row.assigned_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        for row in &change.rolled_back {
            sqlx::query(
                "UPDATE rollout_devices SET rolled_back_ms = $1 WHERE rollout_id = $2 AND device_id = $3",
            )
            .bind(change.at_ms)
            .bind(id.to_string())
            .bind(row.device_id.clone())
            .execute(&mut *tx)
            .await?;
        }
        write_assignments(&mut tx, &change.reached).await?;
        write_assignments(&mut tx, &change.rolled_back).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Devices that were never assigned a model, with their group: they appeared after the
    /// rollouts that would have reached them.
    pub async fn unassigned_devices(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT d.id, d.device_group FROM devices d WHERE NOT EXISTS \
             (SELECT 1 FROM device_assignments a WHERE a.device_id = d.id) ORDER BY d.id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The devices rollout `id` reached: `(device, assigned_at_ms, rolled_back_ms)`, by device.
    pub async fn rollout_devices(&self, id: &str) -> Result<Vec<(String, i64, Option<i64>)>, StoreError> {
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT device_id, assigned_at_ms, rolled_back_ms FROM rollout_devices WHERE rollout_id = $1 \
             ORDER BY device_id",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The assignment `payload` of `device`, if it has one.
    pub async fn assignment(&self, device: &str) -> Result<Option<AssignmentRow>, StoreError> {
        let row = sqlx::query(
            "SELECT device_id, rollout_id, bundle_name, version, assigned_at_ms, payload FROM device_assignments \
             WHERE device_id = $1",
        )
        .bind(device.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(assignment_from_row).transpose()
    }

    /// Every device's assignment.
    pub async fn all_assignments(&self) -> Result<Vec<AssignmentRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT device_id, rollout_id, bundle_name, version, assigned_at_ms, payload FROM device_assignments \
             ORDER BY device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(assignment_from_row).collect()
    }

    /// What the rollout state machine needs about `rollout`: every targeted device (those of its
    /// group, and any it reached that left the group) and the new version's telemetry from the
    /// devices it reached since their assignment.
    pub async fn rollout_observations(
        &self,
        rollout: &RolloutRecord,
    ) -> Result<(Vec<DeviceObservation>, VersionHealth), StoreError> {
        const DEVICE_COLUMNS: &str = "d.id, d.update_version, d.update_state, d.update_detail, d.update_received_ms, \
             r.assigned_at_ms, r.rolled_back_ms";
        let joined = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d LEFT JOIN rollout_devices r \
             ON r.device_id = d.id AND r.rollout_id = $1"
        );
        let rows = match &rollout.plan.group {
            Some(group) => {
                let sql =
                    format!("{joined} WHERE d.device_group = $2 OR r.device_id IS NOT NULL ORDER BY d.id");
                sqlx::query(&sql).bind(rollout.id.clone()).bind(group.clone()).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!("{joined} ORDER BY d.id");
                sqlx::query(&sql).bind(rollout.id.clone()).fetch_all(&self.pool).await?
            }
        };

        let per_device: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT e.device_id, COUNT(*) AS n, \
             CAST(SUM(CASE WHEN e.error_class IS NOT NULL AND e.error_class <> 'budget_ratio' THEN 1 ELSE 0 END) AS BIGINT) AS errors, \
             CAST(SUM(CASE WHEN e.route = 'cloud' THEN 1 ELSE 0 END) AS BIGINT) AS cloud \
             FROM events e JOIN rollout_devices r ON r.device_id = e.device_id \
             WHERE r.rollout_id = $1 AND r.rolled_back_ms IS NULL AND e.model_version = $2 \
             AND e.received_ms >= r.assigned_at_ms GROUP BY e.device_id",
        )
        .bind(rollout.id.clone())
        .bind(rollout.version.clone())
        .fetch_all(&self.pool)
        .await?;
        let latencies: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT e.local_latency_q, COUNT(*) AS n FROM events e JOIN rollout_devices r ON r.device_id = e.device_id \
             WHERE r.rollout_id = $1 AND r.rolled_back_ms IS NULL AND e.model_version = $2 \
             AND e.received_ms >= r.assigned_at_ms GROUP BY e.local_latency_q",
        )
        .bind(rollout.id.clone())
        .bind(rollout.version.clone())
        .fetch_all(&self.pool)
        .await?;

        let mut health = VersionHealth::default();
        let mut events_of: HashMap<String, u64> = HashMap::new();
        for (device, n, errors, cloud) in per_device {
            let n = u64::try_from(n).unwrap_or(0);
            events_of.insert(device, n);
            health.events += n;
            health.errors += u64::try_from(errors).unwrap_or(0);
            health.cloud += u64::try_from(cloud).unwrap_or(0);
        }
        let mut histogram = LatencyHistogram::default();
        for (q, n) in latencies {
            histogram.add(q, u64::try_from(n).unwrap_or(0));
        }
        health.p50_local_ms = histogram.percentile(50.0);

        let mut devices = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let assigned_at_ms: Option<i64> = row.try_get("assigned_at_ms")?;
            let rolled_back_ms: Option<i64> = row.try_get("rolled_back_ms")?;
            let report = match update_row(row)? {
                Some(update) => Some(ObservedReport {
                    state: serde_json::from_value::<UpdateState>(serde_json::Value::String(
                        update.state.clone(),
                    ))
                    .map_err(|e| {
                        StoreError::Corrupt(format!("devices.update_state `{}`: {e}", update.state))
                    })?,
                    version: update.version,
                    detail: update.detail,
                    received_ms: update.received_ms,
                }),
                None => None,
            };
            let events = events_of.get(&id).copied().unwrap_or(0);
            devices.push(DeviceObservation {
                // A device the rollout already rolled back is not reached any more.
                assigned_at_ms: assigned_at_ms.filter(|_| rolled_back_ms.is_none()),
                id,
                report,
                events,
            });
        }
        Ok((devices, health))
    }
}

fn assignment_from_row(row: &AnyRow) -> Result<AssignmentRow, StoreError> {
    Ok(AssignmentRow {
        device_id: row.try_get("device_id")?,
        rollout_id: row.try_get("rollout_id")?,
        bundle_name: row.try_get("bundle_name")?,
        version: row.try_get("version")?,
        assigned_at_ms: row.try_get("assigned_at_ms")?,
        payload: row.try_get("payload")?,
    })
}

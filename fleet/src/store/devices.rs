//! Devices: their group (from the operator's devices file), the model version of their latest
//! event, their online status (from their retained status message and last will), and when the
//! fleet last heard from them.

use serde::Serialize;
use sqlx::Row;
use tandem_core::protocol::UpdateReport;

use super::{Store, StoreError};

/// One device as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    pub id: String,
    /// Group from the devices file.
    pub group: Option<String>,
    /// Model version of its latest event.
    pub model_version: Option<String>,
    /// `online`, `offline` or `unknown` (never sent a status).
    pub status: String,
    /// Unix ms of its latest status message.
    pub status_at_ms: Option<i64>,
    /// Unix ms when the fleet first heard from it.
    pub first_seen_ms: Option<i64>,
    /// Unix ms when the fleet last heard from it.
    pub last_seen_ms: Option<i64>,
    /// The model version its latest status message says it serves.
    pub reported_version: Option<String>,
    /// Its updater's latest report.
    pub update: Option<DeviceUpdateRow>,
}

/// A device's latest update report as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceUpdateRow {
    pub version: String,
    /// `downloading`, `verifying`, `probing`, `active`, `failed` or `rolled_back`.
    pub state: String,
    pub detail: Option<String>,
    /// Unix ms (fleet clock) when the status carrying it arrived.
    pub received_ms: i64,
}

/// A status message of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatusUpdate {
    pub device_id: String,
    pub online: bool,
    pub at_ms: i64,
    /// The version it says it serves (absent in last wills).
    pub model_version: Option<String>,
    /// Its updater's report, if the message carries one.
    pub update: Option<UpdateReport>,
}

impl DeviceStatusUpdate {
    /// A status with neither a model version nor an update report (a last will, an old device).
    pub fn presence(device_id: impl Into<String>, online: bool, at_ms: i64) -> Self {
        Self { device_id: device_id.into(), online, at_ms, model_version: None, update: None }
    }
}

/// Writes status messages inside `tx`.
pub(crate) async fn write_statuses(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    updates: &[DeviceStatusUpdate],
) -> Result<(), StoreError> {
    for update in updates {
        let status = if update.online { "online" } else { "offline" };
        let report = update.update.as_ref();
        let state = report.map(|r| serde_json::to_value(r.state).expect("states serialise"));
        sqlx::query(
            "INSERT INTO devices (id, status, status_at_ms, first_seen_ms, last_seen_ms, reported_version, \
             update_version, update_state, update_detail, update_received_ms) \
             VALUES ($1, $2, $3, $3, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET \
             status = CASE WHEN devices.status_at_ms IS NULL OR excluded.status_at_ms >= devices.status_at_ms \
                 THEN excluded.status ELSE devices.status END, \
             status_at_ms = CASE WHEN devices.status_at_ms IS NULL OR excluded.status_at_ms >= devices.status_at_ms \
                 THEN excluded.status_at_ms ELSE devices.status_at_ms END, \
             first_seen_ms = COALESCE(devices.first_seen_ms, excluded.first_seen_ms), \
             last_seen_ms = CASE WHEN devices.last_seen_ms IS NULL OR excluded.last_seen_ms > devices.last_seen_ms \
                 THEN excluded.last_seen_ms ELSE devices.last_seen_ms END, \
             reported_version = COALESCE(excluded.reported_version, devices.reported_version), \
             update_version = CASE WHEN excluded.update_received_ms IS NULL THEN devices.update_version \
                 ELSE excluded.update_version END, \
             update_state = CASE WHEN excluded.update_received_ms IS NULL THEN devices.update_state \
                 ELSE excluded.update_state END, \
             update_detail = CASE WHEN excluded.update_received_ms IS NULL THEN devices.update_detail \
                 ELSE excluded.update_detail END, \
             update_received_ms = COALESCE(excluded.update_received_ms, devices.update_received_ms)",
        )
        .bind(update.device_id.clone())
        .bind(status)
        .bind(update.at_ms)
        .bind(update.model_version.clone())
        .bind(report.map(|r| r.version.clone()))
        .bind(state.and_then(|s| s.as_str().map(str::to_string)))
        .bind(report.and_then(|r| r.detail.clone()))
        .bind(report.map(|_| update.at_ms))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Store {
    /// Records status messages; an older message never overwrites a newer one.
    pub async fn update_device_status(&self, updates: &[DeviceStatusUpdate]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        write_statuses(&mut tx, updates).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets every listed device's group (creating devices not seen yet) and clears the group of
    /// devices no longer listed.
    pub async fn sync_device_groups(&self, devices: &[(String, Option<String>)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE devices SET device_group = NULL WHERE device_group IS NOT NULL")
            .execute(&mut *tx)
            .await?;
        for (id, group) in devices {
            sqlx::query(
                "INSERT INTO devices (id, device_group) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET device_group = excluded.device_group",
            )
            .bind(id.clone())
            .bind(group.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every device, by id.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, device_group, model_version, status, status_at_ms, first_seen_ms, last_seen_ms, \
             reported_version, update_version, update_state, update_detail, update_received_ms \
             FROM devices ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeviceRow {
                    id: row.try_get("id")?,
                    group: row.try_get("device_group")?,
                    model_version: row.try_get("model_version")?,
                    status: row.try_get("status")?,
                    status_at_ms: row.try_get("status_at_ms")?,
                    first_seen_ms: row.try_get("first_seen_ms")?,
                    last_seen_ms: row.try_get("last_seen_ms")?,
                    reported_version: row.try_get("reported_version")?,
                    update: update_row(row)?,
                })
            })
            .collect()
    }
}

/// The update report columns of a `devices` row, when it has one.
pub(crate) fn update_row(row: &sqlx::any::AnyRow) -> Result<Option<DeviceUpdateRow>, StoreError> {
    let version: Option<String> = row.try_get("update_version")?;
    let state: Option<String> = row.try_get("update_state")?;
    let received_ms: Option<i64> = row.try_get("update_received_ms")?;
    Ok(match (version, state, received_ms) {
        (Some(version), Some(state), Some(received_ms)) => {
            Some(DeviceUpdateRow { version, state, detail: row.try_get("update_detail")?, received_ms })
        }
        _ => None,
    })
}

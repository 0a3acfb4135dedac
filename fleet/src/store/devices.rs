//! Devices: their group (from the operator's devices file), the model version of their latest
//! event, their online status (from their retained status message and last will), and when the
//! fleet last heard from them.

use serde::Serialize;
use sqlx::Row;

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
}

/// A status message of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatusUpdate {
    pub device_id: String,
    pub online: bool,
    pub at_ms: i64,
}

/// Writes status messages inside `tx`.
pub(crate) async fn write_statuses(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    updates: &[DeviceStatusUpdate],
) -> Result<(), StoreError> {
    for update in updates {
        let status = if update.online { "online" } else { "offline" };
        sqlx::query(
            "INSERT INTO devices (id, status, status_at_ms, first_seen_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET \
             status = CASE WHEN devices.status_at_ms IS NULL OR excluded.status_at_ms >= devices.status_at_ms \
                 THEN excluded.status ELSE devices.status END, \
             status_at_ms = CASE WHEN devices.status_at_ms IS NULL OR excluded.status_at_ms >= devices.status_at_ms \
                 THEN excluded.status_at_ms ELSE devices.status_at_ms END, \
             first_seen_ms = COALESCE(devices.first_seen_ms, excluded.first_seen_ms), \
             last_seen_ms = CASE WHEN devices.last_seen_ms IS NULL OR excluded.last_seen_ms > devices.last_seen_ms \
                 THEN excluded.last_seen_ms ELSE devices.last_seen_ms END",
        )
        .bind(update.device_id.clone())
        .bind(status)
        .bind(update.at_ms)
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
            "SELECT id, device_group, model_version, status, status_at_ms, first_seen_ms, last_seen_ms \
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
                })
            })
            .collect()
    }
}

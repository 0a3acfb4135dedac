//! Retention: raw events older than the horizon are first added to the hourly roll-ups and then
//! deleted, one hour at a time, each hour in its own transaction, so the totals never change
//! (nothing is counted twice or lost) and no transaction grows with the backlog. The ids of deleted
//! events are kept for a while longer (`rolled_up_events`), so that a late copy of one (a device
//! that never saw its PUBACK) is still dropped as a duplicate.

use super::stats::{HOUR_MS, WATERMARK};
use super::{Backend, Store, StoreError};

/// What one retention run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Raw events rolled up and deleted.
    pub events_rolled_up: u64,
    /// Hourly roll-up rows deleted for being older than their own horizon.
    pub rollups_deleted: u64,
}

const ROLL_UP_SUMS: &str = "INSERT INTO rollup_hourly (hour_ms, device_id, model_version, queries, local_n, \
    cloud_n, fallback_n, help_n, error_n, local_prompt_tokens, local_completion_tokens, cloud_prompt_tokens, \
    cloud_completion_tokens, budget_share_sum) \
    SELECT (at_ms / 3600000) * 3600000, device_id, model_version, COUNT(*), \
    CAST(SUM(CASE WHEN route = 'local' THEN 1 ELSE 0 END) AS BIGINT), \
    CAST(SUM(CASE WHEN route = 'cloud' THEN 1 ELSE 0 END) AS BIGINT), \
    CAST(SUM(CASE WHEN route = 'local_fallback' THEN 1 ELSE 0 END) AS BIGINT), \
    CAST(SUM(CASE WHEN help_requested THEN 1 ELSE 0 END) AS BIGINT), \
    CAST(SUM(CASE WHEN error_class IS NULL THEN 0 ELSE 1 END) AS BIGINT), \
    CAST(SUM(local_prompt_tokens) AS BIGINT), CAST(SUM(local_completion_tokens) AS BIGINT), \
    CAST(SUM(cloud_prompt_tokens) AS BIGINT), CAST(SUM(cloud_completion_tokens) AS BIGINT), \
    CAST(SUM(budget_cloud_share) AS DOUBLE PRECISION) \
    FROM events WHERE at_ms >= $1 AND at_ms < $2 \
    GROUP BY (at_ms / 3600000) * 3600000, device_id, model_version \
    ON CONFLICT (hour_ms, device_id, model_version) DO UPDATE SET \
    queries = rollup_hourly.queries + excluded.queries, \
    local_n = rollup_hourly.local_n + excluded.local_n, \
    cloud_n = rollup_hourly.cloud_n + excluded.cloud_n, \
    fallback_n = rollup_hourly.fallback_n + excluded.fallback_n, \
    help_n = rollup_hourly.help_n + excluded.help_n, \
    error_n = rollup_hourly.error_n + excluded.error_n, \
    local_prompt_tokens = rollup_hourly.local_prompt_tokens + excluded.local_prompt_tokens, \
    local_completion_tokens = rollup_hourly.local_completion_tokens + excluded.local_completion_tokens, \
    cloud_prompt_tokens = rollup_hourly.cloud_prompt_tokens + excluded.cloud_prompt_tokens, \
    cloud_completion_tokens = rollup_hourly.cloud_completion_tokens + excluded.cloud_completion_tokens, \
    budget_share_sum = rollup_hourly.budget_share_sum + excluded.budget_share_sum";

const REMEMBER_IDS: &str = "INSERT INTO rolled_up_events (id, hour_ms) \
    SELECT id, (at_ms / 3600000) * 3600000 FROM events WHERE at_ms >= $1 AND at_ms < $2 \
    ON CONFLICT (id) DO NOTHING";

fn roll_up_latency(kind: &str, column: &str, condition: &str) -> String {
    format!(
        "INSERT INTO rollup_latency_hourly (hour_ms, device_id, model_version, kind, latency_q, n) \
         SELECT (at_ms / 3600000) * 3600000, device_id, model_version, '{kind}', {column}, COUNT(*) \
         FROM events WHERE at_ms >= $1 AND at_ms < $2{condition} \
         GROUP BY (at_ms / 3600000) * 3600000, device_id, model_version, {column} \
         ON CONFLICT (hour_ms, device_id, model_version, kind, latency_q) DO UPDATE SET \
         n = rollup_latency_hourly.n + excluded.n"
    )
}

impl Store {
    /// Rolls up and deletes raw events with `at_ms` before `raw_cutoff_ms` (rounded down to the
    /// hour), forgets the ids of rolled-up events of hours before `dedup_cutoff_ms`, then deletes
    /// roll-ups before `rollup_cutoff_ms` when given.
    pub async fn apply_retention(
        &self,
        raw_cutoff_ms: i64,
        dedup_cutoff_ms: i64,
        rollup_cutoff_ms: Option<i64>,
    ) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        let cutoff = raw_cutoff_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let local = roll_up_latency("local", "local_latency_q", "");
        let cloud = roll_up_latency("cloud", "cloud_latency_q", " AND route = 'cloud'");
        loop {
            let oldest: (Option<i64>,) = sqlx::query_as("SELECT MIN(at_ms) FROM events WHERE at_ms < $1")
                .bind(cutoff)
                .fetch_one(&self.pool)
                .await?;
            let Some(oldest) = oldest.0 else { break };
            let hour = oldest.div_euclid(HOUR_MS) * HOUR_MS;
            let end = (hour + HOUR_MS).min(cutoff);
            let mut tx = self.pool.begin().await?;
            if self.backend == Backend::Postgres {
                // Every statement below must see the same rows: an event committed meanwhile is
                // neither rolled up nor deleted (it waits for the next run).
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
            }
            for sql in [ROLL_UP_SUMS, local.as_str(), cloud.as_str(), REMEMBER_IDS] {
                sqlx::query(sql).bind(hour).bind(end).execute(&mut *tx).await?;
            }
            let deleted = sqlx::query("DELETE FROM events WHERE at_ms >= $1 AND at_ms < $2")
                .bind(hour)
                .bind(end)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            report.events_rolled_up += deleted.rows_affected();
        }
        sqlx::query("DELETE FROM rolled_up_events WHERE hour_ms < $1")
            .bind(dedup_cutoff_ms.div_euclid(HOUR_MS) * HOUR_MS)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO fleet_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET \
             value = CASE WHEN excluded.value > fleet_meta.value THEN excluded.value ELSE fleet_meta.value END",
        )
        .bind(WATERMARK)
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        if let Some(rollup_cutoff) = rollup_cutoff_ms {
            let mut tx = self.pool.begin().await?;
            let deleted = sqlx::query("DELETE FROM rollup_hourly WHERE hour_ms < $1")
                .bind(rollup_cutoff)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM rollup_latency_hourly WHERE hour_ms < $1")
                .bind(rollup_cutoff)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            report.rollups_deleted = deleted.rows_affected();
        }
        Ok(report)
    }
}

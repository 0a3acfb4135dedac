//! Aggregates for the operator API and the dashboard: call ratio, help ratio, tokens, budget share
//! and latency percentiles, per time bucket and per device, model version or device group.
//!
//! Raw events answer for the time they are kept; older periods come from the hourly roll-ups (at
//! hour resolution). Raw events older than the roll-up watermark (late arrivals not rolled up yet)
//! are counted from the raw table, so nothing is counted twice or missed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::events::Bind;
use super::latency::{LatencyHistogram, Percentiles};
use super::{Store, StoreError};

pub(crate) const HOUR_MS: i64 = 3_600_000;
pub(crate) const WATERMARK: &str = "rollup_watermark_ms";

/// What rows are grouped by besides the time bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// One row per bucket (key `all`).
    #[default]
    None,
    Device,
    ModelVersion,
    /// The device's group from the devices file (`""` for devices without one).
    Group,
}

/// A statistics query.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsQuery {
    /// Events with `at_ms` in `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Bucket width (aligned to the Unix epoch); `None`: one bucket for the whole range.
    pub bucket_ms: Option<i64>,
    pub group_by: GroupBy,
    pub device: Option<String>,
    pub model_version: Option<String>,
    pub group: Option<String>,
}

/// One bucket of one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRow {
    /// Start of the bucket (Unix ms); `from_ms` of the query when not bucketed.
    pub bucket_start_ms: i64,
    /// The device, model version or group; `all` when not grouped.
    pub key: String,
    /// Queries answered.
    pub queries: i64,
    pub local: i64,
    pub cloud: i64,
    pub local_fallback: i64,
    /// Queries where the model asked for help.
    pub help_requested: i64,
    /// Queries with an error class (a failed or refused offload).
    pub errors: i64,
    /// Cloud answers / queries: what the budget constrains.
    pub call_ratio: f64,
    /// Help requests / queries.
    pub help_ratio: f64,
    pub local_prompt_tokens: i64,
    pub local_completion_tokens: i64,
    pub cloud_prompt_tokens: i64,
    pub cloud_completion_tokens: i64,
    /// Mean cloud share of the budget window as the devices reported it.
    pub budget_share_avg: f64,
    /// Local generation latency over all queries, ms.
    pub local_latency_ms: Option<Percentiles>,
    /// Cloud latency over queries the cloud answered, ms.
    pub cloud_latency_ms: Option<Percentiles>,
}

/// The answer to a [`StatsQuery`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsReport {
    pub from_ms: i64,
    pub to_ms: i64,
    pub bucket_ms: Option<i64>,
    pub group_by: GroupBy,
    /// By bucket, then key.
    pub rows: Vec<StatsRow>,
    /// Everything in the range together.
    pub totals: StatsRow,
}

/// Sums for one (bucket, key).
#[derive(Debug, Clone, Default)]
struct Accumulator {
    counts: [i64; 10],
    share_sum: f64,
    local: LatencyHistogram,
    cloud: LatencyHistogram,
}

impl Accumulator {
    fn merge(&mut self, other: &Accumulator) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.share_sum += other.share_sum;
        self.local.merge(&other.local);
        self.cloud.merge(&other.cloud);
    }

    fn row(&self, bucket_start_ms: i64, key: String) -> StatsRow {
        let [queries, local, cloud, local_fallback, help, errors, lp, lc, cp, cc] = self.counts;
        let ratio = |n: i64| if queries == 0 { 0.0 } else { n as f64 / queries as f64 };
        StatsRow {
            bucket_start_ms,
            key,
            queries,
            local,
            cloud,
            local_fallback,
            help_requested: help,
            errors,
            call_ratio: ratio(cloud),
            help_ratio: ratio(help),
            local_prompt_tokens: lp,
            local_completion_tokens: lc,
            cloud_prompt_tokens: cp,
            cloud_completion_tokens: cc,
            budget_share_avg: if queries == 0 { 0.0 } else { self.share_sum / queries as f64 },
            local_latency_ms: self.local.percentiles(),
            cloud_latency_ms: self.cloud.percentiles(),
        }
    }
}

/// The SQL that differs between the raw table and the roll-ups.
struct Source {
    table: &'static str,
    time: &'static str,
    sums: &'static str,
    local_histogram: &'static str,
    cloud_histogram: &'static str,
}

const RAW: Source = Source {
    table: "events t",
    time: "t.at_ms",
    sums: "COUNT(*) AS c0, \
        CAST(SUM(CASE WHEN t.route = 'local' THEN 1 ELSE 0 END) AS BIGINT) AS c1, \
        CAST(SUM(CASE WHEN t.route = 'cloud' THEN 1 ELSE 0 END) AS BIGINT) AS c2, \
        CAST(SUM(CASE WHEN t.route = 'local_fallback' THEN 1 ELSE 0 END) AS BIGINT) AS c3, \
        CAST(SUM(CASE WHEN t.help_requested THEN 1 ELSE 0 END) AS BIGINT) AS c4, \
        CAST(SUM(CASE WHEN t.error_class IS NULL THEN 0 ELSE 1 END) AS BIGINT) AS c5, \
        CAST(SUM(t.local_prompt_tokens) AS BIGINT) AS c6, \
        CAST(SUM(t.local_completion_tokens) AS BIGINT) AS c7, \
        CAST(SUM(t.cloud_prompt_tokens) AS BIGINT) AS c8, \
        CAST(SUM(t.cloud_completion_tokens) AS BIGINT) AS c9, \
        CAST(SUM(t.budget_cloud_share) AS DOUBLE PRECISION) AS share_sum",
    local_histogram: "t.local_latency_q AS q, COUNT(*) AS n",
    cloud_histogram: "t.cloud_latency_q AS q, COUNT(*) AS n",
};

const ROLLUP: Source = Source {
    table: "rollup_hourly t",
    time: "t.hour_ms",
    sums: "CAST(SUM(t.queries) AS BIGINT) AS c0, CAST(SUM(t.local_n) AS BIGINT) AS c1, \
        CAST(SUM(t.cloud_n) AS BIGINT) AS c2, CAST(SUM(t.fallback_n) AS BIGINT) AS c3, \
        CAST(SUM(t.help_n) AS BIGINT) AS c4, CAST(SUM(t.error_n) AS BIGINT) AS c5, \
        CAST(SUM(t.local_prompt_tokens) AS BIGINT) AS c6, \
        CAST(SUM(t.local_completion_tokens) AS BIGINT) AS c7, \
        CAST(SUM(t.cloud_prompt_tokens) AS BIGINT) AS c8, \
        CAST(SUM(t.cloud_completion_tokens) AS BIGINT) AS c9, \
        CAST(SUM(t.budget_share_sum) AS DOUBLE PRECISION) AS share_sum",
    local_histogram: "t.latency_q AS q, CAST(SUM(t.n) AS BIGINT) AS n",
    cloud_histogram: "t.latency_q AS q, CAST(SUM(t.n) AS BIGINT) AS n",
};

const ROLLUP_LATENCY_TABLE: &str = "rollup_latency_hourly t";

type Key = (i64, String);

/// The latency distributions of everything a query covered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyDistributions {
    pub local: LatencyHistogram,
    pub cloud: LatencyHistogram,
}

impl Store {
    /// Runs `query`.
    pub async fn stats(&self, query: &StatsQuery) -> Result<StatsReport, StoreError> {
        Ok(self.stats_with_distributions(query).await?.0)
    }

    /// Runs `query`, and also returns the latency histograms of its totals.
    pub async fn stats_with_distributions(
        &self,
        query: &StatsQuery,
    ) -> Result<(StatsReport, LatencyDistributions), StoreError> {
        let bucket = query.bucket_ms.filter(|b| *b > 0).unwrap_or(i64::MAX);
        let watermark = self.rollup_watermark().await?;
        let mut groups: BTreeMap<Key, Accumulator> = BTreeMap::new();

        self.accumulate(&RAW, None, query, bucket, query.from_ms, query.to_ms, &mut groups).await?;
        if query.from_ms < watermark {
            let from = query.from_ms.div_euclid(HOUR_MS) * HOUR_MS;
            let to = query.to_ms.min(watermark);
            self.accumulate(&ROLLUP, Some(ROLLUP_LATENCY_TABLE), query, bucket, from, to, &mut groups)
                .await?;
        }

        let mut totals = Accumulator::default();
        let rows = groups
            .into_iter()
            .map(|((bucket_start, key), acc)| {
                totals.merge(&acc);
                let start = if query.bucket_ms.is_some() { bucket_start } else { query.from_ms };
                acc.row(start, key)
            })
            .collect();
        let report = StatsReport {
            from_ms: query.from_ms,
            to_ms: query.to_ms,
            bucket_ms: query.bucket_ms,
            group_by: query.group_by,
            rows,
            totals: totals.row(query.from_ms, "all".into()),
        };
        Ok((report, LatencyDistributions { local: totals.local, cloud: totals.cloud }))
    }

    /// The time before which raw events have been rolled up (0: never).
    pub async fn rollup_watermark(&self) -> Result<i64, StoreError> {
        let value: Option<(i64,)> = sqlx::query_as("SELECT value FROM fleet_meta WHERE name = $1")
            .bind(WATERMARK)
            .fetch_optional(&self.pool)
            .await?;
        Ok(value.map_or(0, |(v,)| v))
    }

    #[allow(clippy::too_many_arguments)]
    async fn accumulate(
        &self,
        source: &Source,
        latency_table: Option<&str>,
        query: &StatsQuery,
        bucket: i64,
        from: i64,
        to: i64,
        groups: &mut BTreeMap<Key, Accumulator>,
    ) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        let (filter, binds) = filter_sql(query, source.time, from, to);
        let key = key_sql(query.group_by);
        let head = format!("({time} / $1) * $1 AS b, {key} AS k", time = source.time);

        let sums = format!(
            "SELECT {head}, {sums} FROM {table} LEFT JOIN devices d ON d.id = t.device_id \
             WHERE {filter} GROUP BY b, k",
            sums = source.sums,
            table = source.table
        );
        for row in bind_all(sqlx::query(&sums), bucket, &binds).fetch_all(&self.pool).await? {
            let acc = groups.entry((row.try_get("b")?, row.try_get("k")?)).or_default();
            for (i, count) in acc.counts.iter_mut().enumerate() {
                *count += row.try_get::<Option<i64>, _>(format!("c{i}").as_str())?.unwrap_or(0);
            }
            acc.share_sum += row.try_get::<Option<f64>, _>("share_sum")?.unwrap_or(0.0);
        }

        for (cloud, columns) in [(false, source.local_histogram), (true, source.cloud_histogram)] {
            let (table, kind_filter) = match (latency_table, cloud) {
                (None, false) => (source.table, String::new()),
                (None, true) => (source.table, " AND t.route = 'cloud'".to_string()),
                (Some(table), false) => (table, " AND t.kind = 'local'".to_string()),
                (Some(table), true) => (table, " AND t.kind = 'cloud'".to_string()),
            };
            let histogram = format!(
                "SELECT {head}, {columns} FROM {table} LEFT JOIN devices d ON d.id = t.device_id \
                 WHERE {filter}{kind_filter} GROUP BY b, k, q"
            );
            for row in bind_all(sqlx::query(&histogram), bucket, &binds).fetch_all(&self.pool).await? {
                let acc = groups.entry((row.try_get("b")?, row.try_get("k")?)).or_default();
                let (q, n): (i64, i64) = (row.try_get("q")?, row.try_get("n")?);
                let histogram = if cloud { &mut acc.cloud } else { &mut acc.local };
                histogram.add(q, u64::try_from(n).unwrap_or(0));
            }
        }
        Ok(())
    }
}

fn key_sql(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::None => "CAST('all' AS TEXT)",
        GroupBy::Device => "t.device_id",
        GroupBy::ModelVersion => "t.model_version",
        GroupBy::Group => "COALESCE(d.device_group, '')",
    }
}

/// The WHERE clause (placeholders from `$2`; `$1` is the bucket width) and its values.
fn filter_sql(query: &StatsQuery, time: &str, from: i64, to: i64) -> (String, Vec<Bind>) {
    let mut sql = format!("{time} >= $2 AND {time} < $3");
    let mut binds = vec![Bind::Number(from), Bind::Number(to)];
    for (column, value) in [
        ("t.device_id", &query.device),
        ("t.model_version", &query.model_version),
        ("d.device_group", &query.group),
    ] {
        if let Some(value) = value {
            binds.push(Bind::Text(value.clone()));
            sql.push_str(&format!(" AND {column} = ${}", binds.len() + 1));
        }
    }
    (sql, binds)
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    bucket: i64,
    binds: &[Bind],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query = query.bind(bucket);
    for bind in binds {
        query = match bind {
            Bind::Text(text) => query.bind(text.clone()),
            Bind::Number(number) => query.bind(*number),
        };
    }
    query
}

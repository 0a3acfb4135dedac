//! The telemetry store: SQLite (WAL, the default) or PostgreSQL, chosen by URL, behind one set of
//! portable SQL statements run through `sqlx::Any`. Schema changes are migrations embedded at build
//! time (`fleet/migrations/{sqlite,postgres}`); no database is needed to compile.
//!
//! Every statement here is written once for both backends: `$N` placeholders, `ON CONFLICT`,
//! `RETURNING`, `CASE` instead of `max()`/`GREATEST`, and `CAST(SUM(…) AS BIGINT)` so PostgreSQL
//! returns integers rather than `NUMERIC`.

mod devices;
mod events;
mod jobs;
mod latency;
mod migrations;
mod models;
mod retention;
mod rollouts;
mod stats;

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use devices::{DeviceRow, DeviceStatusUpdate, DeviceUpdateRow};
pub use events::{EventFilter, EventPage, InsertOutcome, StoredEvent};
pub use jobs::{CollectedPrompt, JobOutputs, JobRecord, JobState, VersionTraffic};
pub use latency::{LatencyHistogram, Percentiles, quantize_latency};
pub use models::ModelRecord;
pub use retention::RetentionReport;
pub use rollouts::{AssignmentRow, RolloutChange, RolloutRecord};
pub use stats::{GroupBy, LatencyDistributions, StatsQuery, StatsReport, StatsRow};

use crate::config::StoreConfig;
use migrations::EmbeddedMigrations;

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot read the database password: {0}")]
    Password(#[from] tandemd::offload::SecretError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
}

/// The store; cheap to clone (connection pools).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// The one connection telemetry batches are written on (see [`Store::open`]).
    writer: AnyPool,
    backend: Backend,
}

/// Set once on the SQLite connection that writes telemetry batches. A multi-row INSERT keeps a
/// statement journal (to undo the statement alone on an error), which SQLite spills to a temporary
/// file past 64 KiB: in memory instead. A batch dirties a page of the device index per device: a
/// 64 MiB cache keeps them until the commit (the default 2 MiB spills them to the WAL
/// mid-transaction, writing pages twice). And the WAL grows to 64 MiB before a checkpoint copies it
/// into the database, so that pages changed by consecutive batches are copied once
/// (docs/benchmarks.md, tandem-fleet, has the bytes written per event).
const SQLITE_WRITER_PRAGMAS: [&str; 3] =
    ["PRAGMA temp_store = MEMORY", "PRAGMA cache_size = -65536", "PRAGMA wal_autocheckpoint = 16384"];

impl Store {
    /// Connects (creating a missing SQLite file) and applies pending migrations.
    ///
    /// Telemetry batches are written on a connection of their own, always the same one: a pool
    /// hands out its idle connections in turn, and on SQLite every connection other than the
    /// last writer finds its page cache stale, so each batch read its pages back and refilled
    /// (and re-allocated) a 64 MiB cache, on each of the pool's connections in turn.
    pub async fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = connection_url(config)?;
        let options: AnyConnectOptions =
            url.parse().map_err(|source| StoreError::Connect { url: redact(&config.url), source })?;
        let connect = |pool_options: AnyPoolOptions| {
            let options = options.clone();
            async move {
                pool_options
                    .connect_with(options)
                    .await
                    .map_err(|source| StoreError::Connect { url: redact(&config.url), source })
            }
        };
        let pool = connect(pool_options(backend, config.max_connections, &[])).await?;
        EmbeddedMigrations(backend).migrator().await?.run(&pool).await?;
        let writer = connect(pool_options(backend, 1, &SQLITE_WRITER_PRAGMAS)).await?;
        Ok(Self { pool, writer, backend })
    }

    /// The database in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A persisted gateway budget state by scope (`fleet`, or `device:ID`).
    pub async fn budget_states(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT scope, state FROM gateway_budget").fetch_all(&self.pool).await?;
        Ok(rows)
    }

    /// Saves gateway budget states (JSON), replacing earlier ones of the same scope.
    pub async fn save_budget_states(&self, states: &[(String, String)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (scope, state) in states {
            sqlx::query(
                "INSERT INTO gateway_budget (scope, state) VALUES ($1, $2) \
                 ON CONFLICT (scope) DO UPDATE SET state = excluded.state",
            )
            .bind(scope)
            .bind(state)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// A pool of at most `max_connections`; on SQLite each connection is set up for WAL, durable
/// commits and waiting for locks, then given `pragmas`.
fn pool_options(backend: Backend, max_connections: u32, pragmas: &'static [&'static str]) -> AnyPoolOptions {
    let options =
        AnyPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(30));
    if backend != Backend::Sqlite {
        return options;
    }
    options.after_connect(move |conn, _meta| {
        Box::pin(async move {
            // WAL: readers never block the ingest writer. FULL: a commit survives power loss,
            // which is what acknowledging a device's message after it promises.
            conn.execute("PRAGMA journal_mode = WAL").await?;
            conn.execute("PRAGMA synchronous = FULL").await?;
            conn.execute("PRAGMA busy_timeout = 10000").await?;
            for pragma in pragmas {
                conn.execute(*pragma).await?;
            }
            Ok(())
        })
    })
}

/// The URL to connect with (password and SQLite create mode added) and its backend.
fn connection_url(config: &StoreConfig) -> Result<(String, Backend), StoreError> {
    let url = config.url.trim();
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let url = if rest.contains('?') { url.to_string() } else { format!("{url}?mode=rwc") };
        return Ok((url, Backend::Sqlite));
    }
    let url = match &config.password {
        Some(source) => {
            let password = tandemd::offload::read_secret(source)?;
            with_password(url, password.expose())
        }
        None => url.to_string(),
    };
    Ok((url, Backend::Postgres))
}

/// `postgres://user@host/db` with `:password` (percent-encoded) after the user.
fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or(user);
            format!("{scheme}://{user}:{encoded}@{host}")
        }
        None => url.to_string(),
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        _ => url.to_string(),
    }
}

/// Placeholders for `rows` rows of `columns` values: `($1, $2, …), (…)` for PostgreSQL, and
/// anonymous `(?, ?, …)` for SQLite, whose parser looks every `$N` up in a list and so takes time
/// quadratic in the number of parameters (3 s for a 23 000-value statement).
pub(crate) fn values_placeholders(backend: Backend, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// `items` in chunks for multi-row statements, so that a writer uses few distinct statements:
/// chunks of `max` rows, then the rest in chunks of a power of two, largest first (at most
/// `log2(max) + 2` sizes in all). A statement is prepared once per connection and size and kept
/// in sqlx's statement cache; with a chunk of every size from 1 to `max`, batches of varying sizes
/// prepared a new statement of thousands of parameters for nearly every transaction, and the
/// cache held up to a hundred of them.
pub(crate) fn statement_chunks<T>(mut items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let max = max.max(1);
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let size = if items.len() >= max { max } else { 1 << items.len().ilog2() };
        let (chunk, rest) = items.split_at(size);
        items = rest;
        Some(chunk)
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_chunks_cover_every_item_in_order_with_few_sizes() {
        let items: Vec<usize> = (0..1234).collect();
        let chunks: Vec<&[usize]> = statement_chunks(&items, 500).collect();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [500, 500, 128, 64, 32, 8, 2]);
        assert_eq!(chunks.concat(), items);
        let mut every_size = std::collections::BTreeSet::new();
        for n in 0..=2000 {
            let items = vec![0u8; n];
            every_size.extend(statement_chunks(&items, 500).map(<[u8]>::len));
        }
        assert_eq!(every_size.len(), 10, "500 and the powers of two below it: {every_size:?}");
        assert_eq!(statement_chunks::<u8>(&[], 500).count(), 0);
    }

    #[test]
    fn placeholders_number_every_value() {
        assert_eq!(values_placeholders(Backend::Postgres, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values_placeholders(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
    }

    #[test]
    fn the_password_is_encoded_into_the_url_and_never_shown() {
        assert_eq!(
            with_password("postgres://fleet@db:5432/t", "p@ss/w"),
            "postgres://fleet:p%40ss%2Fw@db:5432/t"
        );
        assert_eq!(redact("postgres://fleet:secret@db/t"), "postgres://fleet@db/t");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}

//! Raw events: written in batches inside one transaction, duplicates (same event id) skipped by the
//! primary key, and read back with filters and keyset paging.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;
use tandem_core::protocol::{Route, TelemetryBudget, TelemetryEvent, TokenCounts, Transport};
use uuid::Uuid;

use super::devices::{DeviceStatusUpdate, write_statuses};
use super::latency::quantize_latency;
use super::{Store, StoreError, statement_chunks, values_placeholders};

const EVENT_COLUMNS: &str = "id, device_id, model_version, at_ms, received_ms, route, help_requested, \
     help_probability, local_prompt_tokens, local_completion_tokens, local_latency_ms, local_latency_q, \
     cloud_prompt_tokens, cloud_completion_tokens, cloud_latency_ms, cloud_latency_q, transport, \
     budget_cloud_share, budget_calls_available, error_class, prompt, local_answer, cloud_answer";
const EVENT_COLUMN_COUNT: usize = 23;
/// Rows per INSERT statement (11 500 parameters, under SQLite's and PostgreSQL's limits); larger
/// statements are not faster.
const ROWS_PER_STATEMENT: usize = 500;
/// What a batch write did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InsertOutcome {
    /// Ids of the events that were new; the others were already stored.
    pub inserted: HashSet<Uuid>,
}

/// An event as stored, with when the fleet received it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    #[serde(flatten)]
    pub event: TelemetryEvent,
    /// Unix time in ms when the fleet stored it.
    pub received_ms: i64,
}

/// Which events to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub device: Option<String>,
    pub model_version: Option<String>,
    pub route: Option<Route>,
    /// `at_ms` at or after this.
    pub from_ms: Option<i64>,
    /// `at_ms` before this.
    pub to_ms: Option<i64>,
}

/// One page of events, oldest id first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<Uuid>,
}

fn route_name(route: Route) -> &'static str {
    route.as_str()
}

fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Https => "https",
        Transport::Mqtt => "mqtt",
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Store {
    /// Writes `events` (already validated) and updates their devices, all in one transaction.
    /// Events whose id is already stored (or was rolled up) are skipped.
    pub async fn insert_events(
        &self,
        events: &[TelemetryEvent],
        received_ms: i64,
    ) -> Result<InsertOutcome, StoreError> {
        self.write_batch(events, &[], received_ms).await
    }

    /// Writes `events` (as [`Store::insert_events`]) and device status messages in one transaction.
    pub async fn write_batch(
        &self,
        events: &[TelemetryEvent],
        statuses: &[DeviceStatusUpdate],
        received_ms: i64,
    ) -> Result<InsertOutcome, StoreError> {
        if events.is_empty() && statuses.is_empty() {
            return Ok(InsertOutcome::default());
        }
        // One row per id: PostgreSQL refuses to touch a row twice in one statement.
        let mut seen = HashSet::with_capacity(events.len());
        let mut unique: Vec<&TelemetryEvent> = events.iter().filter(|e| seen.insert(e.id)).collect();
        // Events older than the roll-up watermark may be copies of events already rolled up.
        let watermark = self.rollup_watermark().await?;
        let late: Vec<String> =
            unique.iter().filter(|e| to_i64(e.at_ms) < watermark).map(|e| e.id.to_string()).collect();
        if !late.is_empty() {
            let rolled_up = self.rolled_up_among(&late).await?;
            unique.retain(|e| !rolled_up.contains(&e.id.to_string()));
        }
        // Almost always every event is new: write without RETURNING (which hands every row back
        // one at a time) and compare the counts. When some ids were stored already, that
        // transaction is rolled back and the batch written again with RETURNING, to learn which.
        if let Some(outcome) = self.write_transaction(&unique, statuses, received_ms, false).await? {
            return Ok(outcome);
        }
        let outcome = self.write_transaction(&unique, statuses, received_ms, true).await?;
        Ok(outcome.expect("with RETURNING every write is complete"))
    }

    /// One transaction of [`Store::write_batch`]. Without `returning`, `None` (and nothing
    /// written) when any event was already stored.
    async fn write_transaction(
        &self,
        unique: &[&TelemetryEvent],
        statuses: &[DeviceStatusUpdate],
        received_ms: i64,
        returning: bool,
    ) -> Result<Option<InsertOutcome>, StoreError> {
        let mut outcome = InsertOutcome::default();
        let mut tx = self.writer.begin().await?;
        for chunk in statement_chunks(unique, ROWS_PER_STATEMENT) {
            let written = self.insert_rows(&mut tx, chunk, received_ms, returning).await?;
            if !returning && written.len() < chunk.len() {
                tx.rollback().await?;
                return Ok(None);
            }
            outcome.inserted.extend(written);
        }
        // Each device: seen now, running the model of its latest event.
        let mut latest: HashMap<&str, (&str, u64)> = HashMap::new();
        for e in unique {
            let entry = latest.entry(&e.device_id).or_insert((&e.model_version, e.at_ms));
            if e.at_ms >= entry.1 {
                *entry = (&e.model_version, e.at_ms);
            }
        }
        let devices: Vec<_> = latest.into_iter().collect();
        for chunk in statement_chunks(&devices, ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO devices (id, model_version, model_at_ms, first_seen_ms, last_seen_ms) VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET \
                 model_version = CASE WHEN excluded.model_at_ms >= devices.model_at_ms \
                     THEN excluded.model_version ELSE devices.model_version END, \
                 model_at_ms = CASE WHEN excluded.model_at_ms >= devices.model_at_ms \
                     THEN excluded.model_at_ms ELSE devices.model_at_ms END, \
                 first_seen_ms = COALESCE(devices.first_seen_ms, excluded.first_seen_ms), \
                 last_seen_ms = excluded.last_seen_ms",
                values_placeholders(self.backend, chunk.len(), 5)
            );
            let mut query = sqlx::query(&sql);
            for (device, (model, at_ms)) in chunk {
                query =
                    query.bind(*device).bind(*model).bind(to_i64(*at_ms)).bind(received_ms).bind(received_ms);
            }
            query.execute(&mut *tx).await?;
        }
        write_statuses(&mut tx, statuses).await?;
        tx.commit().await?;
        Ok(Some(outcome))
    }

    /// Inserts `chunk` (distinct ids), skipping ids already stored. With `returning`, the ids of
    /// the rows inserted; without, the chunk's ids when all were inserted, and an empty list
    /// otherwise.
    async fn insert_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        chunk: &[&TelemetryEvent],
        received_ms: i64,
        returning: bool,
    ) -> Result<Vec<Uuid>, StoreError> {
        let sql = format!(
            "INSERT INTO events ({EVENT_COLUMNS}) VALUES {} ON CONFLICT (id) DO NOTHING{}",
            values_placeholders(self.backend, chunk.len(), EVENT_COLUMN_COUNT),
            if returning { " RETURNING id" } else { "" }
        );
        // Every id as text in one buffer, bound by reference: one allocation per statement.
        let mut ids = String::with_capacity(chunk.len() * uuid::fmt::Hyphenated::LENGTH);
        for e in chunk {
            ids.push_str(e.id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        }
        let mut query = sqlx::query(&sql);
        for (i, e) in chunk.iter().enumerate() {
            let id = &ids[i * uuid::fmt::Hyphenated::LENGTH..(i + 1) * uuid::fmt::Hyphenated::LENGTH];
            query = query
                .bind(id)
                .bind(e.device_id.as_str())
                .bind(e.model_version.as_str())
                .bind(to_i64(e.at_ms))
                .bind(received_ms)
                .bind(route_name(e.route))
                .bind(e.help_requested)
                .bind(e.help_probability.map(f64::from))
                .bind(i64::from(e.local_tokens.prompt))
                .bind(i64::from(e.local_tokens.completion))
                .bind(i64::from(e.local_latency_ms))
                .bind(quantize_latency(e.local_latency_ms))
                .bind(i64::from(e.cloud_tokens.prompt))
                .bind(i64::from(e.cloud_tokens.completion))
                .bind(i64::from(e.cloud_latency_ms))
                .bind(quantize_latency(e.cloud_latency_ms))
                .bind(e.transport.map(transport_name))
                .bind(e.budget.cloud_share)
                .bind(to_i64(e.budget.calls_available))
                .bind(e.error_class.as_deref())
                .bind(e.prompt.as_deref())
                .bind(e.local_answer.as_deref())
                .bind(e.cloud_answer.as_deref());
        }
        if !returning {
            let written = query.execute(&mut **tx).await?.rows_affected();
            return Ok(if written == chunk.len() as u64 {
                chunk.iter().map(|e| e.id).collect()
            } else {
                Vec::new()
            });
        }
        let mut inserted = Vec::new();
        for row in query.fetch_all(&mut **tx).await? {
            let id: String = row.try_get(0)?;
            inserted
                .push(Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(format!("event id {id}: {e}")))?);
        }
        Ok(inserted)
    }

    /// Events matching `filter` with an id after `after`, oldest id first, at most `limit`.
    pub async fn list_events(
        &self,
        filter: &EventFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<EventPage, StoreError> {
        let mut sql = String::from(
            "SELECT id, device_id, model_version, at_ms, received_ms, route, \
             CASE WHEN help_requested THEN 1 ELSE 0 END AS help, help_probability, \
             local_prompt_tokens, local_completion_tokens, local_latency_ms, cloud_prompt_tokens, \
             cloud_completion_tokens, cloud_latency_ms, transport, budget_cloud_share, \
             budget_calls_available, error_class, prompt, local_answer, cloud_answer FROM events WHERE 1 = 1",
        );
        let mut n = 0;
        let mut condition = |sql: &mut String, column: &str, op: &str| {
            n += 1;
            sql.push_str(&format!(" AND {column} {op} ${n}"));
            n
        };
        // Binds are collected in placeholder order: texts and numbers interleave.
        let mut binds: Vec<Bind> = Vec::new();
        if let Some(device) = &filter.device {
            condition(&mut sql, "device_id", "=");
            binds.push(Bind::Text(device.clone()));
        }
        if let Some(model) = &filter.model_version {
            condition(&mut sql, "model_version", "=");
            binds.push(Bind::Text(model.clone()));
        }
        if let Some(route) = filter.route {
            condition(&mut sql, "route", "=");
            binds.push(Bind::Text(route_name(route).into()));
        }
        if let Some(from) = filter.from_ms {
            condition(&mut sql, "at_ms", ">=");
            binds.push(Bind::Number(from));
        }
        if let Some(to) = filter.to_ms {
            condition(&mut sql, "at_ms", "<");
            binds.push(Bind::Number(to));
        }
        if let Some(after) = after {
            condition(&mut sql, "id", ">");
            binds.push(Bind::Text(after.to_string()));
        }
        let limit = limit.max(1);
        sql.push_str(&format!(" ORDER BY id LIMIT {}", u64::from(limit) + 1));
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = match bind {
                Bind::Text(text) => query.bind(text),
                Bind::Number(number) => query.bind(number),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut events = rows.iter().map(stored_event).collect::<Result<Vec<_>, _>>()?;
        let next_after = if events.len() > limit as usize {
            events.truncate(limit as usize);
            events.last().map(|e| e.event.id)
        } else {
            None
        };
        Ok(EventPage { events, next_after })
    }

    /// Which of `ids` belong to events already rolled up.
    async fn rolled_up_among(&self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut found = HashSet::new();
        for chunk in statement_chunks(ids, ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT id FROM rolled_up_events WHERE id IN {}",
                values_placeholders(self.backend, 1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.clone());
            }
            for row in query.fetch_all(&self.pool).await? {
                found.insert(row.try_get::<String, _>(0)?);
            }
        }
        Ok(found)
    }

    /// Number of stored raw events.
    pub async fn count_events(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events").fetch_one(&self.pool).await?;
        Ok(n)
    }
}

/// A value bound to a numbered placeholder.
pub(crate) enum Bind {
    Text(String),
    Number(i64),
}

fn stored_event(row: &AnyRow) -> Result<StoredEvent, StoreError> {
    let corrupt = |what: &str, value: &str| StoreError::Corrupt(format!("{what} `{value}`"));
    let id: String = row.try_get("id")?;
    let route: String = row.try_get("route")?;
    let transport: Option<String> = row.try_get("transport")?;
    let u32_of = |name: &str| -> Result<u32, StoreError> {
        let value: i64 = row.try_get(name)?;
        u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{name} = {value}")))
    };
    let help: i64 = row.try_get("help")?;
    let event = TelemetryEvent {
        id: Uuid::parse_str(&id).map_err(|_| corrupt("event id", &id))?,
        device_id: row.try_get("device_id")?,
        model_version: row.try_get("model_version")?,
        at_ms: u64::try_from(row.try_get::<i64, _>("at_ms")?).unwrap_or(0),
        route: match route.as_str() {
            "local" => Route::Local,
            "cloud" => Route::Cloud,
            "local_fallback" => Route::LocalFallback,
            other => return Err(corrupt("route", other)),
        },
        help_requested: help != 0,
        help_probability: row.try_get::<Option<f64>, _>("help_probability")?.map(|p| p as f32),
        local_tokens: TokenCounts {
            prompt: u32_of("local_prompt_tokens")?,
            completion: u32_of("local_completion_tokens")?,
        },
        local_latency_ms: u32_of("local_latency_ms")?,
        cloud_tokens: TokenCounts {
            prompt: u32_of("cloud_prompt_tokens")?,
            completion: u32_of("cloud_completion_tokens")?,
        },
        cloud_latency_ms: u32_of("cloud_latency_ms")?,
        transport: match transport.as_deref() {
            None => None,
            Some("https") => Some(Transport::Https),
            Some("mqtt") => Some(Transport::Mqtt),
            Some(other) => return Err(corrupt("transport", other)),
        },
        budget: TelemetryBudget {
            cloud_share: row.try_get("budget_cloud_share")?,
            calls_available: u64::try_from(row.try_get::<i64, _>("budget_calls_available")?).unwrap_or(0),
        },
        error_class: row.try_get("error_class")?,
        prompt: row.try_get("prompt")?,
        local_answer: row.try_get("local_answer")?,
        cloud_answer: row.try_get("cloud_answer")?,
    };
    Ok(StoredEvent { event, received_ms: row.try_get("received_ms")? })
}

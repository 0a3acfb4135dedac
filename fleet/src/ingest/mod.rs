//! Telemetry ingest: validate each message where it arrives, queue it (bounded: a full queue
//! pushes back on the broker connections), write queued messages in batches inside one
//! transaction, and only then acknowledge them to MQTT. A crash before the commit loses nothing
//! the devices were told is safe: they (or the external broker) send it again, and the primary
//! key drops what was already stored.

mod validate;

use std::sync::Arc;
use std::time::Duration;

use tandem_core::protocol::TelemetryEvent;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use validate::{BadEvent, BadMessage, ValidBatch, validate_telemetry};

use crate::config::IngestConfig;
use crate::metrics::{FleetMetrics, ResultLabels};
use crate::store::{DeviceStatusUpdate, Store, now_ms};

/// How a message ended, told to whoever must acknowledge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Its events are committed (or were already stored).
    Stored,
    /// It can never be stored; acknowledged so that it is not sent again.
    Rejected(BadMessage),
}

/// Called once per message when it is committed or refused; not called when the fleet stops
/// before the commit (the message is then delivered again).
pub type Acknowledge = Box<dyn FnOnce(Delivery) + Send>;

/// Told about events that were new to the store (after their commit).
pub trait StoredEvents: Send + Sync {
    fn stored(&self, events: &[TelemetryEvent]);
}

/// Nobody listens.
impl StoredEvents for () {
    fn stored(&self, _events: &[TelemetryEvent]) {}
}

/// One message waiting for the writer: a telemetry batch's events, or a device status.
struct Queued {
    events: Vec<TelemetryEvent>,
    status: Option<DeviceStatusUpdate>,
    ack: Option<Acknowledge>,
}

/// The ingest entry point; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<Queued>,
    metrics: Arc<FleetMetrics>,
    max_message_bytes: usize,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("max_message_bytes", &self.max_message_bytes).finish_non_exhaustive()
    }
}

impl Ingest {
    /// Starts the writer task. It ends when every `Ingest` clone is dropped and the queue is
    /// written, or when `shutdown` fires (a batch not yet committed is then left unacknowledged).
    pub fn start(
        store: Store,
        config: &IngestConfig,
        metrics: Arc<FleetMetrics>,
        listener: Arc<dyn StoredEvents>,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let (queue, queued) = mpsc::channel(config.queue_messages);
        let writer = Writer {
            store,
            queued,
            metrics: metrics.clone(),
            listener,
            shutdown,
            max_batch_events: config.max_batch_events,
            max_delay: Duration::from_millis(config.max_batch_delay_ms),
        };
        let task = tokio::spawn(writer.run());
        (Self { queue, metrics, max_message_bytes: config.max_message_bytes }, task)
    }

    /// Takes in one message published on `device`'s telemetry topic. Bad messages are counted,
    /// logged and acknowledged at once; good ones wait for room in the queue (back-pressure).
    pub async fn submit(&self, device: &str, payload: &[u8], ack: Option<Acknowledge>) {
        let valid = match validate_telemetry(device, payload, self.max_message_bytes) {
            Ok(valid) => valid,
            Err(bad) => {
                tracing::warn!(
                    device,
                    bytes = payload.len(),
                    reason = bad.reason(),
                    "refusing a telemetry message"
                );
                self.metrics.bad(bad.reason());
                self.metrics.ingest_messages.get_or_create(&ResultLabels { result: "rejected" }).inc();
                if let Some(ack) = ack {
                    ack(Delivery::Rejected(bad));
                }
                return;
            }
        };
        for bad in &valid.rejected {
            tracing::warn!(device, reason = bad.reason(), "dropping a telemetry event");
            self.metrics.bad(bad.reason());
        }
        if !valid.rejected.is_empty() {
            self.metrics
                .ingest_events
                .get_or_create(&ResultLabels { result: "rejected" })
                .inc_by(valid.rejected.len() as u64);
        }
        self.enqueue(Queued { events: valid.events, status: None, ack }).await;
    }

    /// Takes in a device's status message (already checked). It is written by the same writer as
    /// the telemetry, in the same transactions: SQLite has one writer at a time.
    pub async fn submit_status(&self, status: DeviceStatusUpdate, ack: Option<Acknowledge>) {
        self.enqueue(Queued { events: Vec::new(), status: Some(status), ack }).await;
    }

    async fn enqueue(&self, queued: Queued) {
        self.metrics.ingest_queue_depth.inc();
        if self.queue.send(queued).await.is_err() {
            // The writer stopped (shutdown): the message stays unacknowledged and comes again.
            self.metrics.ingest_queue_depth.dec();
        }
    }
}

struct Writer {
    store: Store,
    queued: mpsc::Receiver<Queued>,
    metrics: Arc<FleetMetrics>,
    listener: Arc<dyn StoredEvents>,
    shutdown: CancellationToken,
    max_batch_events: usize,
    max_delay: Duration,
}

impl Writer {
    async fn run(mut self) {
        let mut batch: Vec<Queued> = Vec::new();
        loop {
            let first = tokio::select! {
                message = self.queued.recv() => message,
                () = self.shutdown.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut events = first.events.len();
            batch.push(first);
            let deadline = Instant::now() + self.max_delay;
            while events < self.max_batch_events {
                let next = match self.queued.try_recv() {
                    Ok(next) => Some(next),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        tokio::time::timeout_at(deadline, self.queued.recv()).await.ok().flatten()
                    }
                };
                let Some(next) = next else { break };
                events += next.events.len();
                batch.push(next);
            }
            self.metrics.ingest_queue_depth.dec_by(batch.len() as i64);
            if !self.write(&mut batch).await {
                break;
            }
        }
    }

    /// Writes and acknowledges `batch` (emptying it); retries a failed write until it succeeds.
    /// Returns false when shutdown interrupted the retries (nothing is acknowledged then).
    async fn write(&self, batch: &mut Vec<Queued>) -> bool {
        let mut events = Vec::with_capacity(batch.iter().map(|q| q.events.len()).sum());
        let mut statuses = Vec::new();
        let mut acks = Vec::with_capacity(batch.len());
        for queued in batch.drain(..) {
            events.extend(queued.events);
            statuses.extend(queued.status);
            acks.push(queued.ack);
        }
        let mut backoff = Duration::from_millis(100);
        let outcome = loop {
            let started = std::time::Instant::now();
            match self.store.write_batch(&events, &statuses, now_ms()).await {
                Ok(outcome) => {
                    self.metrics.db_write_seconds.observe(started.elapsed().as_secs_f64());
                    break outcome;
                }
                Err(error) => {
                    self.metrics.db_write_errors.inc();
                    tracing::error!(%error, events = events.len(), retry_in = ?backoff, "cannot write telemetry; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let now = now_ms();
        let total = events.len();
        let telemetry_messages = acks.len() - statuses.len();
        let new: Vec<TelemetryEvent> =
            events.into_iter().filter(|e| outcome.inserted.contains(&e.id)).collect();
        for event in &new {
            let lag_ms = now.saturating_sub(i64::try_from(event.at_ms).unwrap_or(i64::MAX)).max(0);
            self.metrics.ingest_lag_seconds.observe(lag_ms as f64 / 1000.0);
        }
        self.metrics.ingest_events.get_or_create(&ResultLabels { result: "stored" }).inc_by(new.len() as u64);
        self.metrics
            .ingest_events
            .get_or_create(&ResultLabels { result: "duplicate" })
            .inc_by((total - new.len()) as u64);
        self.metrics
            .ingest_messages
            .get_or_create(&ResultLabels { result: "stored" })
            .inc_by(telemetry_messages as u64);
        // Listeners first: once a device holds its PUBACK, the gateway already counts its answers.
        if !new.is_empty() {
            self.listener.stored(&new);
        }
        for ack in acks.into_iter().flatten() {
            ack(Delivery::Stored);
        }
        true
    }
}

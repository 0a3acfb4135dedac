//! `TelemetryShipper`: moves events from the request path into the spool and from the spool to
//! the fleet.
//!
//! A dedicated writer thread owns appends (so `record` never blocks the async runtime on disk
//! I/O, and `fsync = "interval"` gets its periodic fsync). A tokio task ships: every
//! `flush_interval_ms`, or as soon as `batch_max_events` are waiting, it peeks a batch, publishes
//! it, and acknowledges it in the spool only after the fleet acknowledged it. A failed publish
//! keeps the batch and retries with capped exponential backoff; nothing is dropped for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tandem_core::protocol::{PROTOCOL_VERSION, TelemetryBatch, TelemetryEvent};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spool::{SpoolError, SpoolStats, TelemetrySpool};
use super::{FsyncPolicy, PublishError, TelemetryConfig, TelemetryPublisher};

/// Events waiting for the writer thread before `record` refuses more.
const WRITER_QUEUE: usize = 4096;
/// Longest wait for one publisher acknowledgement (publishers have their own, shorter, timeouts).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// First pause after a failed publish (or the flush interval, when longer); doubled per failure.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Largest pause between publish attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a flush (or an awaited append) did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("publishing telemetry failed: {0}")]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("telemetry flush timed out with {pending} events still in the spool")]
    Timeout { pending: u64 },
    #[error("the telemetry writer queue is full ({WRITER_QUEUE} events); the disk is too slow")]
    QueueFull,
    #[error("the telemetry writer thread has stopped")]
    WriterStopped,
    #[error("a telemetry spool operation panicked")]
    SpoolPanicked,
}

/// Counters for `/metrics` and the status endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TelemetryStats {
    /// The spool: events waiting, bytes on disk, events dropped because it was full.
    pub spool: SpoolStats,
    /// Events that never reached the spool (disk full, writer queue full, unencodable), each
    /// logged.
    pub failed_records: u64,
    /// Events the fleet acknowledged since start.
    pub shipped: u64,
}

enum WriterCommand {
    Append {
        event: Box<TelemetryEvent>,
        reply: Option<oneshot::Sender<Result<(), SpoolError>>>,
    },
    /// Answered once every command sent before it is done.
    Barrier(oneshot::Sender<()>),
}

/// State shared by the handles, the writer thread and the shipping task.
struct Core {
    spool: Mutex<TelemetrySpool>,
    wake: Notify,
    batch_max: usize,
    events: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    failed_records: AtomicU64,
    shipped: AtomicU64,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, TelemetrySpool> {
        // Spool methods keep their state consistent at every return; a panic in one leaves
        // nothing half-updated that later calls would trip over.
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_stats(&self, spool: &TelemetrySpool) {
        let stats = spool.stats();
        self.events.store(stats.events, Ordering::Relaxed);
        self.bytes.store(stats.bytes, Ordering::Relaxed);
        self.dropped.store(stats.dropped, Ordering::Relaxed);
    }

    /// Runs `f` on the spool on a blocking thread.
    async fn with_spool<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut TelemetrySpool) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, FlushError> {
        let core = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut spool = core.lock();
            let result = f(&mut spool);
            core.publish_stats(&spool);
            result
        })
        .await
        .map_err(|_| FlushError::SpoolPanicked)?
        .map_err(FlushError::from)
    }
}

/// What shipping needs besides the spool.
struct Shipping {
    publisher: Option<Arc<dyn TelemetryPublisher>>,
    device_id: String,
    /// One shipment at a time: a peek and its ack must not interleave with another's.
    ship_lock: tokio::sync::Mutex<()>,
}

/// Records events and flushes the spool; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct TelemetryHandle {
    core: Arc<Core>,
    shipping: Arc<Shipping>,
    writer: SyncSender<WriterCommand>,
}

impl std::fmt::Debug for TelemetryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryHandle").field("stats", &self.stats()).finish()
    }
}

impl TelemetryHandle {
    /// Queues `event` for the spool and returns at once. A failure to store it (queue full, disk
    /// full) is logged and counted in `failed_records`.
    pub fn record(&self, event: TelemetryEvent) {
        let id = event.id;
        if let Err(error) =
            self.writer.try_send(WriterCommand::Append { event: Box::new(event), reply: None })
        {
            self.core.failed_records.fetch_add(1, Ordering::Relaxed);
            let reason = match error {
                TrySendError::Full(_) => "writer queue full",
                TrySendError::Disconnected(_) => "writer stopped",
            };
            tracing::warn!(event_id = %id, reason, "telemetry event not recorded");
        }
    }

    /// Stores `event` in the spool and waits until it is there (durable per the fsync policy).
    pub async fn append(&self, event: TelemetryEvent) -> Result<(), FlushError> {
        let (reply, answer) = oneshot::channel();
        self.writer.try_send(WriterCommand::Append { event: Box::new(event), reply: Some(reply) }).map_err(
            |e| match e {
                TrySendError::Full(_) => FlushError::QueueFull,
                TrySendError::Disconnected(_) => FlushError::WriterStopped,
            },
        )?;
        answer.await.map_err(|_| FlushError::WriterStopped)?.map_err(FlushError::from)
    }

    /// Ships everything pending now, once: waits for queued events to reach the spool, then sends
    /// batches until the spool is empty. Stops at the first publish error or after `timeout`;
    /// what was not shipped stays in the spool. Returns the number of events shipped. Without a
    /// publisher (`transport = "none"`) events stay in the spool and this returns 0.
    pub async fn flush(&self, timeout: Duration) -> Result<u64, FlushError> {
        let work = async {
            let (reached, barrier) = oneshot::channel();
            let writer = self.writer.clone();
            // `send` waits for room in the queue; off the runtime.
            tokio::task::spawn_blocking(move || writer.send(WriterCommand::Barrier(reached)))
                .await
                .map_err(|_| FlushError::WriterStopped)?
                .map_err(|_| FlushError::WriterStopped)?;
            barrier.await.map_err(|_| FlushError::WriterStopped)?;
            ship_pending(&self.core, &self.shipping).await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| FlushError::Timeout { pending: self.core.events.load(Ordering::Relaxed) })?
    }

    /// Current counters; never waits for disk I/O.
    pub fn stats(&self) -> TelemetryStats {
        let core = &self.core;
        TelemetryStats {
            spool: SpoolStats {
                events: core.events.load(Ordering::Relaxed),
                bytes: core.bytes.load(Ordering::Relaxed),
                dropped: core.dropped.load(Ordering::Relaxed),
            },
            failed_records: core.failed_records.load(Ordering::Relaxed),
            shipped: core.shipped.load(Ordering::Relaxed),
        }
    }
}

/// The running writer thread and shipping task.
pub struct TelemetryShipper {
    handle: TelemetryHandle,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TelemetryShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryShipper").field("handle", &self.handle).finish()
    }
}

impl TelemetryShipper {
    /// Starts the writer thread and the shipping task (inside a tokio runtime). `publisher` is
    /// `None` for `transport = "none"`: events are kept in the spool. `config` gives the batch
    /// size, flush interval and fsync interval. The writer thread ends when the last handle is
    /// dropped.
    pub fn start(
        spool: TelemetrySpool,
        publisher: Option<Arc<dyn TelemetryPublisher>>,
        device_id: impl Into<String>,
        config: &TelemetryConfig,
    ) -> std::io::Result<Self> {
        let core = Arc::new(Core {
            spool: Mutex::new(spool),
            wake: Notify::new(),
            batch_max: config.batch_max_events.max(1),
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed_records: AtomicU64::new(0),
            shipped: AtomicU64::new(0),
        });
        core.publish_stats(&core.lock());
        let (writer, commands) = mpsc::sync_channel(WRITER_QUEUE);
        let sync_every = (config.fsync == FsyncPolicy::Interval)
            .then(|| Duration::from_millis(config.fsync_interval_ms.max(1)));
        let writer_core = Arc::clone(&core);
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || run_writer(&writer_core, &commands, sync_every))?;
        let shipping = Arc::new(Shipping {
            publisher,
            device_id: device_id.into(),
            ship_lock: tokio::sync::Mutex::new(()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_shipper(
            Arc::clone(&core),
            Arc::clone(&shipping),
            Duration::from_millis(config.flush_interval_ms.max(1)),
            stop.clone(),
        ));
        Ok(Self { handle: TelemetryHandle { core, shipping, writer }, stop, task })
    }

    /// A handle for recording events.
    pub fn handle(&self) -> TelemetryHandle {
        self.handle.clone()
    }

    /// Stops the shipping task after one last flush bounded by `timeout`; returns what that flush
    /// returned. Events recorded afterwards still reach the spool and are shipped after the next
    /// start.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<u64, FlushError> {
        let deadline = Instant::now() + timeout;
        self.stop.cancel();
        let result = self.handle.flush(timeout).await;
        // A publish still in flight in the task is abandoned at the deadline; it acknowledged
        // nothing, so its events stay in the spool.
        match tokio::time::timeout_at(deadline, &mut self.task).await {
            Ok(Err(e)) if e.is_panic() => tracing::error!("telemetry shipping task panicked"),
            Ok(_) => {}
            Err(_) => self.task.abort(),
        }
        result
    }
}

fn run_writer(core: &Core, commands: &mpsc::Receiver<WriterCommand>, sync_every: Option<Duration>) {
    loop {
        let command = match sync_every {
            Some(interval) => match commands.recv_timeout(interval) {
                Ok(command) => command,
                Err(RecvTimeoutError::Timeout) => {
                    let mut spool = core.lock();
                    if spool.sync_due()
                        && let Err(e) = spool.sync()
                    {
                        tracing::warn!(error = %e, "telemetry spool fsync failed");
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match commands.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
        };
        match command {
            WriterCommand::Append { event, reply } => {
                let (result, waiting) = {
                    let mut spool = core.lock();
                    let result = spool.append(&event);
                    core.publish_stats(&spool);
                    (result, spool.stats().events)
                };
                if waiting >= core.batch_max as u64 {
                    core.wake.notify_one();
                }
                match reply {
                    Some(reply) => {
                        let _ = reply.send(result);
                    }
                    None => {
                        if let Err(e) = result {
                            core.failed_records.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(event_id = %event.id, error = %e, "telemetry event not recorded");
                        }
                    }
                }
            }
            WriterCommand::Barrier(reached) => {
                let _ = reached.send(());
            }
        }
    }
    if let Err(e) = core.lock().sync() {
        tracing::warn!(error = %e, "telemetry spool: final fsync failed");
    }
}

async fn run_shipper(core: Arc<Core>, shipping: Arc<Shipping>, interval: Duration, stop: CancellationToken) {
    if shipping.publisher.is_none() {
        return;
    }
    let mut backoff: Option<Duration> = None;
    loop {
        let pause = backoff.unwrap_or(interval);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
            () = core.wake.notified(), if backoff.is_none() => {}
        }
        match ship_pending(&core, &shipping).await {
            Ok(_) => backoff = None,
            Err(error) => {
                let next = backoff.map_or(interval.max(MIN_BACKOFF), |b| (b * 2).min(MAX_BACKOFF));
                tracing::warn!(
                    %error,
                    pending = core.events.load(Ordering::Relaxed),
                    retry_in = ?next,
                    "telemetry not delivered; kept in the spool"
                );
                backoff = Some(next);
            }
        }
    }
}

/// Sends batches until the spool is empty or a publish fails; returns the events shipped.
async fn ship_pending(core: &Arc<Core>, shipping: &Shipping) -> Result<u64, FlushError> {
    let Some(publisher) = &shipping.publisher else { return Ok(0) };
    let _one_at_a_time = shipping.ship_lock.lock().await;
    let batch_max = core.batch_max;
    let mut shipped = 0;
    loop {
        let events = core.with_spool(move |spool| spool.peek(batch_max)).await?;
        if events.is_empty() {
            return Ok(shipped);
        }
        let count = events.len();
        let batch = TelemetryBatch { v: PROTOCOL_VERSION, device_id: shipping.device_id.clone(), events };
        let started = Instant::now();
        tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(&batch))
            .await
            .map_err(|_| PublishError::Timeout(PUBLISH_TIMEOUT))??;
        core.with_spool(move |spool| spool.ack(count)).await?;
        core.shipped.fetch_add(count as u64, Ordering::Relaxed);
        shipped += count as u64;
        tracing::debug!(events = count, took = ?started.elapsed(), "telemetry batch acknowledged");
    }
}

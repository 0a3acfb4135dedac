//! The load generator: N simulated devices, each with its own MQTT 3.1.1 connection, publishing
//! telemetry batches (and optionally offload requests) at a given total rate. Each device keeps
//! what the broker has not acknowledged and sends it again after a reconnect, as `tandemd`'s spool
//! does, so "acknowledged" means the same here as on a real device; the ids of acknowledged events
//! can be written to a file so tests can check every one of them reached the database.
//! With [`LoadOptions::follow`], devices also act on their model assignments like `tandemd`'s
//! updater (`update`): download and verify the bundle, report `downloading` → `verifying` →
//! `active` in their status, then send telemetry from the new version.
//! Also `sink`: a plain subscriber that only counts, to measure the broker's own ceiling.

mod device;
mod sink;
mod update;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use sink::{SinkOptions, SinkReport, run_sink};
pub use update::FollowOptions;

use crate::store::{LatencyHistogram, Percentiles, quantize_latency};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `host:port` of the broker.
    pub broker: String,
    /// Simulated devices.
    pub devices: usize,
    /// Device ids are `PREFIX0`, `PREFIX1`, …
    pub device_prefix: String,
    /// Password every device logs in with (user name = device id); none: no credentials.
    pub password: Option<String>,
    /// Telemetry events per second over all devices; 0: as fast as the broker acknowledges.
    pub rate: f64,
    /// Events per telemetry message.
    pub batch: usize,
    /// How long to publish.
    pub duration: Duration,
    /// After publishing stops, how long to wait for outstanding acknowledgements (reconnecting
    /// as needed).
    pub drain: Duration,
    /// Unacknowledged messages per device, at most.
    pub max_in_flight: usize,
    /// Offload requests per second over all devices (0: none).
    pub offload_rate: f64,
    /// Model version in the events (and, when following assignments, the version each device
    /// serves until it installs another).
    pub model_version: String,
    /// Act on model assignments; `None`: ignore them.
    pub follow: Option<FollowOptions>,
    /// Append the id of every acknowledged event to this file, one per line.
    pub acked_ids: Option<PathBuf>,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub devices: usize,
    pub batch: usize,
    pub seconds: f64,
    pub messages_sent: u64,
    pub messages_acked: u64,
    pub events_acked: u64,
    /// Events acknowledged per second of publishing.
    pub events_per_second: f64,
    /// Messages not acknowledged when the run ended.
    pub messages_unacked: u64,
    /// Publish → PUBACK, ms.
    pub ack_latency_ms: Option<Percentiles>,
    pub reconnects: u64,
    pub offload_sent: u64,
    pub offload_answered: u64,
    /// Offload request → response, ms.
    pub offload_latency_ms: Option<Percentiles>,
    /// What the devices did with their assignments (when following them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updates: Option<UpdatesReport>,
}

/// Assignments received and installed by the simulated devices.
#[derive(Debug, Clone, Serialize)]
pub struct UpdatesReport {
    /// Assignments that started an install (a retained one for the version already served does
    /// not).
    pub assignments: u64,
    /// Bundles downloaded and verified.
    pub downloads: u64,
    /// Bytes received (manifests and files).
    pub bytes_downloaded: u64,
    /// Transfers that broke and were resumed with a range request.
    pub download_resumes: u64,
    /// Installs reported `failed`.
    pub failures: u64,
    /// Waiting for a download slot excluded: first byte requested → last file hashed, ms.
    pub download_ms: Option<Percentiles>,
    /// Devices by the version they served at the end.
    pub serving: BTreeMap<String, u64>,
}

/// Counters shared by the simulated devices.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_sent: AtomicU64,
    pub messages_acked: AtomicU64,
    pub events_acked: AtomicU64,
    pub messages_unacked: AtomicU64,
    pub reconnects: AtomicU64,
    pub offload_sent: AtomicU64,
    pub offload_answered: AtomicU64,
    pub ack_latency: std::sync::Mutex<LatencyHistogram>,
    pub offload_latency: std::sync::Mutex<LatencyHistogram>,
    pub assignments: AtomicU64,
    pub downloads: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub download_resumes: AtomicU64,
    pub update_failures: AtomicU64,
    pub download_latency: std::sync::Mutex<LatencyHistogram>,
}

impl Counters {
    pub fn observe(histogram: &std::sync::Mutex<LatencyHistogram>, elapsed: Duration) {
        let ms = u32::try_from(elapsed.as_millis()).unwrap_or(u32::MAX);
        histogram.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(quantize_latency(ms), 1);
    }
}

/// Runs the simulation to its end.
pub async fn run_load(options: LoadOptions) -> std::io::Result<LoadReport> {
    run_load_until(options, CancellationToken::new()).await
}

/// Runs the simulation until its duration ends or `stop` is cancelled, whichever comes first,
/// then drains as usual.
pub async fn run_load_until(options: LoadOptions, stop: CancellationToken) -> std::io::Result<LoadReport> {
    let counters = Arc::new(Counters::default());
    let installer = match &options.follow {
        Some(follow) => Some(Arc::new(update::Installer::new(
            follow.clone(),
            options.password.clone(),
            counters.clone(),
        )?)),
        None => None,
    };
    let (acked_tx, acked_rx) = mpsc::unbounded_channel::<Vec<Uuid>>();
    let writer = match &options.acked_ids {
        Some(path) => {
            let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
            Some(tokio::spawn(write_ids(file, acked_rx)))
        }
        None => {
            drop(acked_rx);
            None
        }
    };
    let started = Instant::now();
    let stopped_at = tokio::spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            Instant::now()
        }
    });
    let publish_until = started + options.duration;
    let give_up_at = publish_until + options.drain;
    let devices: Vec<_> = (0..options.devices)
        .map(|i| {
            let device = device::SimulatedDevice {
                id: format!("{}{i}", options.device_prefix),
                options: options.clone(),
                counters: counters.clone(),
                acked: options.acked_ids.as_ref().map(|_| acked_tx.clone()),
                installer: installer.clone(),
                stop: stop.clone(),
                // Spread the connections and the first publishes over one interval.
                start_delay: Duration::from_secs_f64(i as f64 / options.devices.max(1) as f64),
                publish_until,
                give_up_at,
            };
            tokio::spawn(device.run())
        })
        .collect();
    drop(acked_tx);
    let mut serving: BTreeMap<String, u64> = BTreeMap::new();
    for device in devices {
        if let Ok(version) = device.await {
            *serving.entry(version).or_default() += 1;
        }
    }
    let published_for = if stopped_at.is_finished() {
        stopped_at.await.map_or(options.duration, |at| (at - started).min(options.duration))
    } else {
        stopped_at.abort();
        options.duration
    };
    if let Some(writer) = writer {
        writer.await.map_err(std::io::Error::other)??;
    }
    let seconds = published_for.as_secs_f64();
    let events_acked = counters.events_acked.load(Ordering::Relaxed);
    let percentiles = |h: &std::sync::Mutex<LatencyHistogram>| {
        h.lock().unwrap_or_else(std::sync::PoisonError::into_inner).percentiles()
    };
    Ok(LoadReport {
        devices: options.devices,
        batch: options.batch,
        seconds,
        messages_sent: counters.messages_sent.load(Ordering::Relaxed),
        messages_acked: counters.messages_acked.load(Ordering::Relaxed),
        events_acked,
        events_per_second: events_acked as f64 / seconds.max(1e-9),
        messages_unacked: counters.messages_unacked.load(Ordering::Relaxed),
        ack_latency_ms: percentiles(&counters.ack_latency),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        offload_sent: counters.offload_sent.load(Ordering::Relaxed),
        offload_answered: counters.offload_answered.load(Ordering::Relaxed),
        offload_latency_ms: percentiles(&counters.offload_latency),
        updates: options.follow.as_ref().map(|_| UpdatesReport {
            assignments: counters.assignments.load(Ordering::Relaxed),
            downloads: counters.downloads.load(Ordering::Relaxed),
            bytes_downloaded: counters.bytes_downloaded.load(Ordering::Relaxed),
            download_resumes: counters.download_resumes.load(Ordering::Relaxed),
            failures: counters.update_failures.load(Ordering::Relaxed),
            download_ms: percentiles(&counters.download_latency),
            serving,
        }),
    })
}

async fn write_ids(
    mut file: tokio::fs::File,
    mut ids: mpsc::UnboundedReceiver<Vec<Uuid>>,
) -> std::io::Result<()> {
    let mut text = String::new();
    while let Some(batch) = ids.recv().await {
        text.clear();
        for id in batch {
            text.push_str(&id.to_string());
            text.push('\n');
        }
        file.write_all(text.as_bytes()).await?;
    }
    file.flush().await
}

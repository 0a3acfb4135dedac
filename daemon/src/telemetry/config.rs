//! What the user configures about telemetry.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// When spool writes are flushed to stable storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After every event: nothing written is lost on power failure.
    #[default]
    Always,
    /// At most once per `fsync_interval_ms`: a power failure can lose that interval.
    Interval,
    /// Never explicitly (the OS decides): survives process crashes, not power failures.
    Never,
}

/// How batches reach the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TelemetryTransport {
    /// Publish with QoS 1 on the device's telemetry topic (needs the `[mqtt]` connection).
    Mqtt,
    /// POST JSON batches to this URL (a 2xx acknowledges).
    Https {
        /// Endpoint receiving `TelemetryBatch` JSON.
        url: String,
    },
    /// Keep events in the spool only (no fleet).
    None,
}

/// Telemetry settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Where events go.
    pub transport: TelemetryTransport,
    /// Spool directory; defaults to `<state_dir>/telemetry`.
    pub spool_dir: Option<PathBuf>,
    /// Largest spool size in bytes; beyond it the oldest events are dropped (and counted).
    pub max_spool_bytes: u64,
    /// When spool writes reach stable storage.
    pub fsync: FsyncPolicy,
    /// Interval for `fsync = "interval"`, ms.
    pub fsync_interval_ms: u64,
    /// Most events in one batch.
    pub batch_max_events: usize,
    /// Longest an event waits in the spool before its batch is sent, ms.
    pub flush_interval_ms: u64,
    /// Include prompt and answer texts in events (off: only numbers leave the device).
    pub include_text: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            transport: TelemetryTransport::None,
            spool_dir: None,
            max_spool_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 1000,
            batch_max_events: 100,
            flush_interval_ms: 1000,
            include_text: false,
        }
    }
}

//! Telemetry: one event per query, appended to a bounded disk spool first, then published in
//! batches (MQTT QoS 1, or HTTPS POST) and removed only after the fleet acknowledged them.

mod config;
mod https;
mod mqtt;
mod shipper;
mod spool;

use futures::future::BoxFuture;
use tandem_core::protocol::TelemetryBatch;

pub use config::{FsyncPolicy, TelemetryConfig, TelemetryTransport};
pub use https::HttpsTelemetryPublisher;
pub use mqtt::MqttTelemetryPublisher;
pub use shipper::{FlushError, TelemetryHandle, TelemetryShipper, TelemetryStats};
pub use spool::{MAX_EVENT_BYTES, MIN_SPOOL_BYTES, SpoolError, SpoolStats, TelemetrySpool};

/// Why a batch was not acknowledged; the batch stays in the spool and is sent again later.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to the fleet: {0}")]
    Disconnected(String),
    #[error("the fleet did not acknowledge within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the fleet rejected the batch: {0}")]
    Rejected(String),
}

/// Delivers a batch to the fleet; returns only once the fleet acknowledged it
/// (MQTT PUBACK for QoS 1, or an HTTPS 2xx).
pub trait TelemetryPublisher: Send + Sync {
    /// Publishes `batch` and waits for the acknowledgement.
    fn publish<'a>(&'a self, batch: &'a TelemetryBatch) -> BoxFuture<'a, Result<(), PublishError>>;
}

//! What can go wrong on the device's MQTT link.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of [`super::MqttLink`]: setting it up, and publishing through it.
#[derive(Debug, thiserror::Error)]
pub enum MqttLinkError {
    /// The configuration cannot work; the message says why.
    #[error("invalid MQTT configuration: {0}")]
    Config(String),
    /// A file named by the configuration could not be read.
    #[error("cannot read the MQTT {what} from {}: {source}", path.display())]
    ReadFile {
        /// What the file holds (`password`, `CA certificate`, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// Certificates or keys could not be turned into a TLS configuration.
    #[error("MQTT TLS setup failed: {0}")]
    Tls(String),
    /// Not connected to the broker right now; the link reconnects in the background.
    #[error("not connected to the MQTT broker")]
    Disconnected,
    /// The connection dropped after the publish was handed over and before the broker acknowledged
    /// it; the broker may or may not have received it.
    #[error("the connection to the MQTT broker dropped before the publish was acknowledged")]
    ConnectionLost,
    /// The broker did not acknowledge within the configured time.
    #[error("the MQTT broker did not acknowledge within {0:?}")]
    AckTimeout(Duration),
    /// The broker acknowledged with a failure reason code (MQTT 5), e.g. not authorized.
    #[error("the MQTT broker refused the publish: {0}")]
    Rejected(String),
    /// The payload exceeds the largest packet the link sends.
    #[error("the payload of {size} bytes exceeds the MQTT packet limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload size, bytes.
        size: usize,
        /// The configured limit (`max_packet_bytes`), bytes.
        max: u32,
    },
    /// Too many publishes wait to be sent (the broker stopped acknowledging); try again later.
    #[error("the MQTT send queue is full")]
    Busy,
    /// The link was shut down.
    #[error("the MQTT link is shut down")]
    Closed,
}

/// What a failed publish means to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFailure {
    /// The broker did not acknowledge in time.
    Timeout(std::time::Duration),
    /// The broker (or the link's own limits) refused this message; resending it will not help.
    Refused,
    /// The broker cannot be reached now; the message may be sent again later.
    Unreachable,
}

impl MqttLinkError {
    /// How callers should treat this error.
    pub fn failure(&self) -> PublishFailure {
        match self {
            MqttLinkError::AckTimeout(waited) => PublishFailure::Timeout(*waited),
            MqttLinkError::Rejected(_) | MqttLinkError::PayloadTooLarge { .. } => PublishFailure::Refused,
            MqttLinkError::Disconnected
            | MqttLinkError::ConnectionLost
            | MqttLinkError::Busy
            | MqttLinkError::Closed
            | MqttLinkError::Config(_)
            | MqttLinkError::ReadFile { .. }
            | MqttLinkError::Tls(_) => PublishFailure::Unreachable,
        }
    }
}

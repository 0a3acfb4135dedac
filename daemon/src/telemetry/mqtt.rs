//! Telemetry over MQTT: each batch is one QoS 1 publish of `TelemetryBatch` JSON on the device's
//! `telemetry` topic, acknowledged when the broker's PUBACK for it arrives.

use futures::future::BoxFuture;
use tandem_core::protocol::{TelemetryBatch, TopicKind};

use super::{PublishError, TelemetryPublisher};
use crate::mqtt::{MqttLink, MqttLinkError, PublishFailure, PublishOptions};

/// Publishes telemetry batches through the device's [`MqttLink`].
#[derive(Debug, Clone)]
pub struct MqttTelemetryPublisher {
    link: MqttLink,
}

impl MqttTelemetryPublisher {
    /// Publishes through `link`.
    pub fn new(link: MqttLink) -> Self {
        Self { link }
    }
}

impl TelemetryPublisher for MqttTelemetryPublisher {
    fn publish<'a>(&'a self, batch: &'a TelemetryBatch) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            let device = self.link.topics().device_id();
            if batch.device_id != device {
                return Err(PublishError::Rejected(format!(
                    "a batch of device {:?} cannot go out on the topic of device {device:?}",
                    batch.device_id
                )));
            }
            if batch.events.is_empty() {
                return Ok(());
            }
            let payload = serde_json::to_vec(batch)
                .map_err(|e| PublishError::Rejected(format!("cannot encode the batch: {e}")))?;
            let topic = self.link.topics().topic(TopicKind::Telemetry);
            self.link.publish_acked(&topic, payload, PublishOptions::default()).await.map_err(publish_error)
        })
    }
}

fn publish_error(error: MqttLinkError) -> PublishError {
    match error.failure() {
        PublishFailure::Timeout(waited) => PublishError::Timeout(waited),
        PublishFailure::Refused => PublishError::Rejected(error.to_string()),
        PublishFailure::Unreachable => PublishError::Disconnected(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn link_errors_keep_their_meaning_for_the_spool() {
        let cases = [
            (MqttLinkError::Disconnected, "Disconnected"),
            (MqttLinkError::ConnectionLost, "Disconnected"),
            (MqttLinkError::AckTimeout(Duration::from_secs(3)), "Timeout"),
            (MqttLinkError::Rejected("NotAuthorized".into()), "Rejected"),
            (MqttLinkError::PayloadTooLarge { size: 9, max: 8 }, "Rejected"),
        ];
        for (error, variant) in cases {
            let mapped = format!("{:?}", publish_error(error));
            assert!(mapped.starts_with(variant), "{mapped}");
        }
    }
}

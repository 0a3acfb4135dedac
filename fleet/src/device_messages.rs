//! What the fleet does with each message a device publishes, whichever broker it came through:
//! telemetry and status messages go to ingest (one writer, the same transactions), offload requests
//! to the gateway.

use std::sync::Arc;

use bytes::Bytes;
use tandem_core::protocol::{
    DeviceStatus, OffloadOutcome, OffloadRequest, OffloadResponse, PROTOCOL_VERSION, TopicKind,
};

use crate::device_link::DeviceLink;
use crate::gateway::{Gateway, OffloadArrival};
use crate::ingest::{Acknowledge, BadMessage, Delivery, Ingest};
use crate::metrics::FleetMetrics;
use crate::store::{DeviceStatusUpdate, now_ms};

/// The fleet's handlers for device → fleet messages.
pub struct DeviceMessages {
    ingest: Ingest,
    gateway: Option<Gateway>,
    link: Arc<dyn DeviceLink>,
    metrics: Arc<FleetMetrics>,
}

impl std::fmt::Debug for DeviceMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMessages").field("gateway", &self.gateway.is_some()).finish_non_exhaustive()
    }
}

impl DeviceMessages {
    /// Handlers over the fleet's parts; without a gateway, offload requests are answered with a
    /// non-retryable error so devices fall back at once instead of waiting for their deadline.
    pub fn new(
        ingest: Ingest,
        gateway: Option<Gateway>,
        link: Arc<dyn DeviceLink>,
        metrics: Arc<FleetMetrics>,
    ) -> Self {
        Self { ingest, gateway, link, metrics }
    }

    /// A telemetry message of `device`; `ack` runs once it is committed or refused.
    pub async fn telemetry(&self, device: &str, payload: &[u8], ack: Option<Acknowledge>) {
        self.ingest.submit(device, payload, ack).await;
    }

    /// An offload request of `device`.
    pub fn offload_request(&self, device: &str, payload: Bytes) {
        match &self.gateway {
            Some(gateway) => gateway.submit(OffloadArrival { device: device.to_string(), payload }),
            None => {
                let Ok(request) = serde_json::from_slice::<OffloadRequest>(&payload) else { return };
                let response = OffloadResponse {
                    v: PROTOCOL_VERSION,
                    request_id: request.request_id,
                    outcome: OffloadOutcome::Error {
                        message: "this fleet has no offload gateway configured".into(),
                        retryable: false,
                    },
                };
                let correlation = Bytes::copy_from_slice(request.request_id.as_bytes());
                let payload = serde_json::to_vec(&response).expect("responses serialise");
                self.link.publish(
                    device,
                    TopicKind::OffloadResponse,
                    payload.into(),
                    false,
                    Some(correlation),
                );
            }
        }
    }

    /// A status message (or last will) of `device`; `ack` runs once it is recorded (or refused).
    /// An empty payload (a cleared retained message) is ignored.
    pub async fn status(&self, device: &str, payload: &[u8], ack: Option<Acknowledge>) {
        let refuse = |reason: &'static str, ack: Option<Acknowledge>| {
            self.metrics.bad(reason);
            if let Some(ack) = ack {
                ack(Delivery::Rejected(BadMessage::Schema));
            }
        };
        if payload.is_empty() {
            if let Some(ack) = ack {
                ack(Delivery::Stored);
            }
            return;
        }
        let status: DeviceStatus = match serde_json::from_slice(payload) {
            Ok(status) => status,
            Err(error) => {
                tracing::warn!(device, %error, "ignoring a status message that is not a device status");
                return refuse("status_malformed", ack);
            }
        };
        if status.device_id != device {
            tracing::warn!(device, claimed = %status.device_id, "ignoring a status message for another device");
            return refuse("status_device_mismatch", ack);
        }
        let update = DeviceStatusUpdate {
            device_id: device.to_string(),
            online: status.online,
            at_ms: now_ms(),
            model_version: status.model_version,
            update: status.update,
        };
        self.ingest.submit_status(update, ack).await;
    }
}

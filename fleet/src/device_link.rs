//! Publishing to devices, whichever broker they are on: the embedded broker's router, or the
//! fleet's client connection to an external broker.

use bytes::Bytes;
use tandem_core::protocol::TopicKind;

/// Sends fleet → device messages (QoS 1). Never blocks; a message that cannot be queued is
/// dropped and logged (offload answers are then re-asked by the device with the same id).
pub trait DeviceLink: Send + Sync {
    /// Publishes `payload` on `device`'s `kind` topic; `correlation_data` travels as the MQTT 5
    /// property where the client speaks MQTT 5.
    fn publish(
        &self,
        device: &str,
        kind: TopicKind,
        payload: Bytes,
        retain: bool,
        correlation_data: Option<Bytes>,
    );
}

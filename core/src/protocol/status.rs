//! The device's retained status message on its `status` topic, which is also its last will.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::assignment::UpdateReport;

/// Device → fleet, retained, on the device's `status` topic: `{"online":true,"device_id":"robot-7"}`.
/// Published on every connection, replaced by `online: false` on a clean shutdown, and by the
/// broker through the last will when the connection dies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceStatus {
    /// Whether the device is connected.
    pub online: bool,
    /// The device.
    pub device_id: String,
    /// Version of the model it serves (absent in the last will and from older devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// Its updater's latest report on the current assignment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateReport>,
}

impl DeviceStatus {
    /// A status without model or update information.
    pub fn new(device_id: impl Into<String>, online: bool) -> Self {
        Self { online, device_id: device_id.into(), model_version: None, update: None }
    }

    /// The JSON payload.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a bool and a string always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_payload_is_the_documented_json() {
        let status = DeviceStatus::new("robot-7", false);
        assert_eq!(status.to_payload(), br#"{"online":false,"device_id":"robot-7"}"#);
    }

    #[test]
    fn a_status_with_an_unknown_field_is_refused() {
        let payload = br#"{"online":true,"device_id":"robot-7","battery":80}"#;
        assert!(serde_json::from_slice::<DeviceStatus>(payload).is_err());
    }

    #[test]
    fn a_status_with_its_model_and_update_reads_back() {
        let payload = br#"{"online":true,"device_id":"robot-7","model_version":"3","update":{"version":"4","state":"failed","detail":"probe failed","at_ms":5}}"#;
        let status: DeviceStatus = serde_json::from_slice(payload).unwrap();
        assert_eq!(status.model_version.as_deref(), Some("3"));
        assert_eq!(status.update.unwrap().state, super::super::UpdateState::Failed);
    }
}

//! The device's retained status message on its `status` topic, which is also its last will.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
}

impl DeviceStatus {
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
        let status = DeviceStatus { online: false, device_id: "robot-7".into() };
        assert_eq!(status.to_payload(), br#"{"online":false,"device_id":"robot-7"}"#);
    }

    #[test]
    fn a_status_with_an_unknown_field_is_refused() {
        let payload = br#"{"online":true,"device_id":"robot-7","battery":80}"#;
        assert!(serde_json::from_slice::<DeviceStatus>(payload).is_err());
    }
}

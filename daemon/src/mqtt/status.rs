//! The device's retained status message, which is also its last will.

use serde::{Deserialize, Serialize};

/// Payload of the device's `status` topic: `{"online":true,"device_id":"robot-7"}`. Published
/// (retained) on every connection, replaced by `online: false` on a clean shutdown, and by the
/// broker through the last will when the connection dies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

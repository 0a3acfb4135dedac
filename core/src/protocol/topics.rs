//! MQTT topic names, per device. Every topic a device uses starts with its own prefix, so broker
//! ACLs can allow a device exactly its own topics.

/// First level of every Tandem topic, with the protocol version.
pub const TOPIC_ROOT: &str = "tandem/v1/devices";

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Device → fleet: [`super::OffloadRequest`].
    OffloadRequest,
    /// Fleet → device: [`super::OffloadResponse`].
    OffloadResponse,
    /// Device → fleet: [`super::TelemetryBatch`], QoS 1.
    Telemetry,
    /// Fleet → device, retained: the model version the device should run.
    Assignment,
    /// Device → fleet, retained: the device's current state (also its last will).
    Status,
}

impl TopicKind {
    const ALL: [TopicKind; 5] = [
        TopicKind::OffloadRequest,
        TopicKind::OffloadResponse,
        TopicKind::Telemetry,
        TopicKind::Assignment,
        TopicKind::Status,
    ];

    fn suffix(self) -> &'static str {
        match self {
            TopicKind::OffloadRequest => "offload/request",
            TopicKind::OffloadResponse => "offload/response",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Assignment => "assignment",
            TopicKind::Status => "status",
        }
    }
}

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    device_id: String,
}

impl DeviceTopics {
    /// Topics for `device_id` (letters, digits, `-`, `_`, `.`; no MQTT wildcards or separators).
    pub fn new(device_id: &str) -> Option<Self> {
        let valid = !device_id.is_empty()
            && device_id.len() <= 128
            && device_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        valid.then(|| Self { device_id: device_id.to_string() })
    }

    /// The device this is for.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The topic of `kind` for this device.
    pub fn topic(&self, kind: TopicKind) -> String {
        format!("{TOPIC_ROOT}/{}/{}", self.device_id, kind.suffix())
    }

    /// Subscription filter matching `kind` for every device.
    pub fn all_devices(kind: TopicKind) -> String {
        format!("{TOPIC_ROOT}/+/{}", kind.suffix())
    }
}

/// Splits a concrete topic into its device id and kind.
pub fn parse_device_topic(topic: &str) -> Option<(String, TopicKind)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let (device, suffix) = rest.split_once('/')?;
    let kind = TopicKind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
    DeviceTopics::new(device).map(|t| (t.device_id, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_back_to_their_device_and_kind() {
        let t = DeviceTopics::new("robot-7").unwrap();
        for kind in TopicKind::ALL {
            assert_eq!(parse_device_topic(&t.topic(kind)), Some(("robot-7".into(), kind)));
        }
    }

    #[test]
    fn device_ids_cannot_smuggle_wildcards_or_levels() {
        for bad in ["", "a/b", "+", "#", "dev ice"] {
            assert!(DeviceTopics::new(bad).is_none(), "{bad:?}");
        }
        assert_eq!(parse_device_topic("tandem/v1/devices/+/telemetry"), None);
    }
}

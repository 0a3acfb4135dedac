//! The topic ACL: a device may publish only on its own device → fleet topics (telemetry, offload
//! request, status) and subscribe only to its own fleet → device topics (offload response,
//! assignment). The embedded broker enforces it; [`mosquitto_acl`] writes the same rules as a
//! Mosquitto `acl_file` for fleets on an external broker.

use tandem_core::protocol::{DeviceTopics, TopicKind, parse_device_topic};

/// The device → fleet topics.
const PUBLISHED_BY_DEVICES: [TopicKind; 3] =
    [TopicKind::Telemetry, TopicKind::OffloadRequest, TopicKind::Status];
/// The fleet → device topics.
const READ_BY_DEVICES: [TopicKind; 2] = [TopicKind::OffloadResponse, TopicKind::Assignment];

/// What `device` publishing on `topic` is, or `None` when the ACL refuses it.
pub fn may_publish(device: &str, topic: &str) -> Option<TopicKind> {
    let (owner, kind) = parse_device_topic(topic)?;
    (owner == device && PUBLISHED_BY_DEVICES.contains(&kind)).then_some(kind)
}

/// Whether `device` may subscribe to `filter` (only its own response and assignment topics, no
/// wildcards).
pub fn may_subscribe(device: &str, filter: &str) -> bool {
    match parse_device_topic(filter) {
        Some((owner, kind)) => owner == device && READ_BY_DEVICES.contains(&kind),
        None => false,
    }
}

/// A Mosquitto `acl_file` with the same rules, plus full access to the device topics for the
/// fleet's own user `fleet_user`.
pub fn mosquitto_acl(fleet_user: &str) -> String {
    let all = |kind| DeviceTopics::all_devices(kind);
    let own = |kind| DeviceTopics::all_devices(kind).replacen("/+/", "/%u/", 1);
    let mut acl = String::from(
        "# Mosquitto acl_file for Tandem, written by `tandem-fleet mosquitto-acl`.\n\
         # Devices log in with their device id as user name (password_file or certificates with\n\
         # use_identity_as_username); each may use only its own topics.\n\n",
    );
    acl.push_str(&format!("user {fleet_user}\n"));
    for kind in PUBLISHED_BY_DEVICES {
        acl.push_str(&format!("topic read {}\n", all(kind)));
    }
    for kind in READ_BY_DEVICES {
        acl.push_str(&format!("topic write {}\n", all(kind)));
    }
    acl.push('\n');
    for kind in PUBLISHED_BY_DEVICES {
        acl.push_str(&format!("pattern write {}\n", own(kind)));
    }
    for kind in READ_BY_DEVICES {
        acl.push_str(&format!("pattern read {}\n", own(kind)));
    }
    acl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(device: &str, kind: TopicKind) -> String {
        DeviceTopics::new(device).unwrap().topic(kind)
    }

    #[test]
    fn a_device_publishes_only_on_its_own_device_to_fleet_topics() {
        assert_eq!(may_publish("a", &topic("a", TopicKind::Telemetry)), Some(TopicKind::Telemetry));
        assert_eq!(may_publish("a", &topic("a", TopicKind::Status)), Some(TopicKind::Status));
        assert_eq!(may_publish("a", &topic("b", TopicKind::Telemetry)), None);
        assert_eq!(may_publish("a", &topic("a", TopicKind::OffloadResponse)), None);
        assert_eq!(may_publish("a", &topic("a", TopicKind::Assignment)), None);
        assert_eq!(may_publish("a", "somewhere/else"), None);
    }

    #[test]
    fn a_device_reads_only_its_own_fleet_to_device_topics() {
        assert!(may_subscribe("a", &topic("a", TopicKind::OffloadResponse)));
        assert!(may_subscribe("a", &topic("a", TopicKind::Assignment)));
        assert!(!may_subscribe("a", &topic("b", TopicKind::OffloadResponse)));
        assert!(!may_subscribe("a", &topic("a", TopicKind::Telemetry)));
        assert!(!may_subscribe("a", &DeviceTopics::all_devices(TopicKind::OffloadResponse)));
        assert!(!may_subscribe("a", "#"));
    }

    #[test]
    fn the_mosquitto_acl_has_one_pattern_per_device_topic() {
        let acl = mosquitto_acl("fleet");
        assert!(acl.contains("user fleet\ntopic read tandem/v1/devices/+/telemetry\n"), "{acl}");
        assert!(acl.contains("pattern write tandem/v1/devices/%u/offload/request\n"), "{acl}");
        assert!(acl.contains("pattern read tandem/v1/devices/%u/assignment\n"), "{acl}");
        assert_eq!(acl.matches("pattern ").count(), 5);
    }
}

//! The fleet's model assignment to a device, retained on the device's `assignment` topic (and
//! served over HTTPS for devices that poll), and the device's report on it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Fleet → device, retained, on the device's `assignment` topic, and the body of
/// `GET /v1/devices/{id}/assignment`: the model bundle the device should serve. A device that runs
/// another version downloads this one into its inactive slot, verifies it, probes it and swaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelAssignment {
    /// Protocol version ([`super::PROTOCOL_VERSION`]).
    pub v: u32,
    /// The rollout that made the assignment; absent when an operator pinned the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// The bundle's name (its manifest's `name`).
    pub bundle_name: String,
    /// The bundle's version (its manifest's `version`); telemetry reports it as `model_version`.
    pub version: String,
    /// sha256 of the bundle's `manifest.json`, lower-case hex: the device refuses any other manifest.
    pub manifest_sha256: String,
    /// URL of the bundle's folder: `manifest.json` and every file it lists are below it.
    pub url: String,
    /// Unix time in ms when the assignment was made.
    pub assigned_at_ms: u64,
}

impl ModelAssignment {
    /// The JSON payload.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an assignment always serialises")
    }
}

/// Where a device's updater stands with its assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Downloading the bundle into the inactive slot.
    Downloading,
    /// Checking sizes, hashes and the signature.
    Verifying,
    /// Loaded in a second session, answering its probe.
    Probing,
    /// Serving the assigned version (on probation until it has proven itself).
    Active,
    /// The assigned version was refused or failed; the device serves its previous model.
    Failed,
    /// The assigned version was served, then reverted (crashes, failed health checks).
    RolledBack,
}

/// Device → fleet, inside its status message: the outcome so far of the latest assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateReport {
    /// The assigned version this is about.
    pub version: String,
    /// Where the update stands.
    pub state: UpdateState,
    /// Why it failed or was rolled back, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Unix time in ms of this state.
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_round_trips_and_refuses_unknown_fields() {
        let assignment = ModelAssignment {
            v: 1,
            rollout_id: Some("r-1".into()),
            bundle_name: "countdown".into(),
            version: "7".into(),
            manifest_sha256: "ab".repeat(32),
            url: "https://fleet.example/v1/registry/countdown/7/".into(),
            assigned_at_ms: 1,
        };
        let parsed: ModelAssignment = serde_json::from_slice(&assignment.to_payload()).unwrap();
        assert_eq!(parsed, assignment);
        let mut value = serde_json::to_value(&assignment).unwrap();
        value["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<ModelAssignment>(value).is_err());
    }
}

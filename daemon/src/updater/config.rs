//! The `[updater]` section: whether `tandemd serve` follows the fleet's model assignments while
//! serving, where it learns them, how it downloads, probes and puts a new model on probation.

use std::num::NonZeroU64;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::probation::ProbationPolicy;
use crate::offload::SecretSource;

/// Following model assignments while serving. Off by default: then the daemon only serves what
/// `tandemd update` installed, from its next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdaterConfig {
    /// Follow assignments: download, verify and probe the assigned bundle while the current model
    /// keeps serving, then swap without cutting running requests. While it is on, the daemon holds
    /// the model slot store for its whole life, so `tandemd update` refuses to run next to it.
    #[serde(default)]
    pub enabled: bool,
    /// Receive assignments on the device's retained MQTT `assignment` topic, through the `[mqtt]`
    /// connection (ignored without an `[mqtt]` section).
    #[serde(default = "default_true")]
    pub mqtt: bool,
    /// The fleet's base URL to poll over HTTP(S) for devices without MQTT, e.g.
    /// `https://fleet.example:8443`: the device reads `GET {poll_url}/v1/devices/{device_id}/assignment`
    /// (404: nothing assigned). Unset: no polling.
    #[serde(default)]
    pub poll_url: Option<String>,
    /// Seconds between two polls of `poll_url`.
    #[serde(default = "default_poll_interval_secs")]
    pub poll_interval_secs: u64,
    /// Bearer token sent with each poll and bundle download instead of the device's own
    /// credentials, for a fleet without a devices file (its operator token). Unset: polls and
    /// downloads carry HTTP Basic with the `[mqtt]` user name (or `device_id`) and `password_file`
    /// password, which a fleet with a devices file requires.
    #[serde(default)]
    pub poll_token: Option<SecretSource>,
    /// CA certificates (PEM) trusted, on top of the system roots, for the fleet's HTTPS: assignment
    /// polls of `poll_url` and bundle downloads. Set it when the fleet serves `[api.tls]` with a
    /// certificate from a private CA. Unset: the system roots only.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Largest download rate of bundle files, bytes per second; unset: unlimited.
    #[serde(default)]
    pub bandwidth_limit: Option<NonZeroU64>,
    /// The user message a new model must answer, in a second engine session, before it replaces the
    /// one serving; also the periodic health probe while it is on probation.
    #[serde(default = "default_probe_prompt")]
    pub probe_prompt: String,
    /// Tokens the probe generates at most (it must produce at least one).
    #[serde(default = "default_probe_max_tokens")]
    pub probe_max_tokens: u32,
    /// Longest a probe may take, seconds; a slower one fails.
    #[serde(default = "default_probe_timeout_secs")]
    pub probe_timeout_secs: u64,
    /// Seconds between health probes of a model on probation; `probation.probes_to_commit` passing
    /// probes in a row end probation, `probation.max_failed_probes` failing ones revert it.
    #[serde(default = "default_health_probe_interval_secs")]
    pub health_probe_interval_secs: u64,
    /// When a newly swapped-in model is reverted or committed (stored with the slot when it is
    /// activated, so later changes apply to the next update).
    #[serde(default)]
    pub probation: ProbationPolicy,
}

impl Default for UpdaterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            mqtt: true,
            poll_url: None,
            poll_interval_secs: default_poll_interval_secs(),
            poll_token: None,
            ca_file: None,
            bandwidth_limit: None,
            probe_prompt: default_probe_prompt(),
            probe_max_tokens: default_probe_max_tokens(),
            probe_timeout_secs: default_probe_timeout_secs(),
            health_probe_interval_secs: default_health_probe_interval_secs(),
            probation: ProbationPolicy::default(),
        }
    }
}

const fn default_true() -> bool {
    true
}

const fn default_poll_interval_secs() -> u64 {
    60
}

fn default_probe_prompt() -> String {
    "Reply with one word: ready?".to_string()
}

const fn default_probe_max_tokens() -> u32 {
    8
}

const fn default_probe_timeout_secs() -> u64 {
    60
}

const fn default_health_probe_interval_secs() -> u64 {
    60
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_section_is_off_with_the_documented_defaults() {
        let config: UpdaterConfig = toml::from_str("").unwrap();
        assert_eq!(config, UpdaterConfig::default());
        assert!(!config.enabled && config.mqtt);
        assert_eq!(config.probation, ProbationPolicy::default());
    }

    #[test]
    fn a_partial_probation_policy_keeps_the_other_defaults_and_typos_are_refused() {
        let config: UpdaterConfig =
            toml::from_str("enabled = true\n[probation]\nprobes_to_commit = 2\n").unwrap();
        assert_eq!(config.probation.probes_to_commit, 2);
        assert_eq!(config.probation.max_starts, ProbationPolicy::default().max_starts);
        assert!(toml::from_str::<UpdaterConfig>("poll_intervall_secs = 5").is_err());
    }
}

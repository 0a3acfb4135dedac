//! The daemon's configuration: plain data, loaded in layers and validated before anything binds a
//! port or loads a model.
//!
//! Layout: this file holds [`DaemonConfig`], the whole configuration; one file per section it owns
//! (`server`, `generation`, `router`, `logging`); `load` merges the layers (built-in defaults → a
//! TOML file → `TANDEM_*` environment variables → command-line flags); `validate` explains what is
//! wrong and how to fix it (secrets are read with [`crate::offload::read_secret`]); `device_id`
//! derives the default id.
//! Sections owned elsewhere (`engine`, `budget`, `mqtt`, `cloud`, `telemetry`, `updater`) are
//! embedded as-is.

mod device_id;
mod generation;
mod load;
mod logging;
mod router;
mod server;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_core::budget::BudgetPolicy;

use crate::engine::EngineConfig;
use crate::mqtt::MqttConfig;
use crate::offload::OffloadConfig;
use crate::telemetry::TelemetryConfig;
use crate::updater::UpdaterConfig;

pub use device_id::{default_device_id, is_device_id_char, sanitize_device_id};
pub use generation::GenerationDefaults;
pub use load::{
    CliOverrides, ConfigError, ConfigFile, ConfigOrigin, ConfigSources, DEFAULT_CONFIG_PATH, ENV_PREFIX, load,
};
pub use logging::{JournaldMode, LoggingConfig};
pub use router::RouterConfig;
pub use server::ServerConfig;
pub use validate::{Problem, ValidationError};

/// Everything `tandemd serve` needs to know. Every key is optional; the defaults serve a model on
/// `127.0.0.1:8080` with offloading off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// This device's id in the fleet: MQTT topics, telemetry and offload requests carry it. Only
    /// `A-Z a-z 0-9 . _ -`. Defaults to the host name with other characters replaced by `-`.
    #[serde(default = "default_device_id")]
    pub device_id: String,
    /// The model directory to serve: a Tandem bundle, an onnxruntime-genai folder or a plain
    /// optimum/torch export. Required (here, as `TANDEM_MODEL_DIR` or as `--model`).
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// Public key files (`NAME.pub`, written by `tandem-train keygen`) trusted to sign model
    /// bundles. When any is given, `serve` loads only a Tandem bundle signed by one of them whose
    /// files all match the sizes and sha256 in its manifest, and refuses anything else: unsigned
    /// bundles, bundles signed by other keys or altered after signing, onnxruntime-genai folders and
    /// plain exports. Empty (the default): any model directory loads unverified, with a warning.
    #[serde(default)]
    pub trusted_bundle_keys: Vec<PathBuf>,
    /// Where tandemd keeps state across restarts (budget, telemetry spool, model slots). The systemd
    /// unit's `StateDirectory=tandem` creates the default.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The local HTTP API.
    #[serde(default)]
    pub server: ServerConfig,
    /// The ONNX Runtime inference engine.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Defaults for requests that leave generation parameters out.
    #[serde(default)]
    pub generation: GenerationDefaults,
    /// Acting on the model's decision to ask for help.
    #[serde(default)]
    pub router: RouterConfig,
    /// Limits on cloud use.
    #[serde(default)]
    pub budget: BudgetPolicy,
    /// Connection to the fleet's MQTT broker; needed by `cloud.mqtt = true` and by
    /// `telemetry.transport = { kind = "mqtt" }`.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// Offloading to the cloud LLM. Off unless a transport is configured.
    #[serde(default)]
    pub cloud: OffloadConfig,
    /// Per-query telemetry events.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Following the fleet's model assignments while serving (download, probe, hot swap).
    #[serde(default)]
    pub updater: UpdaterConfig,
    /// Log output.
    #[serde(default)]
    pub logging: LoggingConfig,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            device_id: default_device_id(),
            model_dir: None,
            trusted_bundle_keys: Vec::new(),
            state_dir: default_state_dir(),
            server: ServerConfig::default(),
            engine: EngineConfig::default(),
            generation: GenerationDefaults::default(),
            router: RouterConfig::default(),
            budget: BudgetPolicy::default(),
            mqtt: None,
            cloud: OffloadConfig::default(),
            telemetry: TelemetryConfig::default(),
            updater: UpdaterConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tandem")
}

impl DaemonConfig {
    /// The effective configuration as TOML (what `tandemd print-config` shows).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config: DaemonConfig = toml::from_str("").unwrap();
        let defaults = DaemonConfig::default();
        assert_eq!(config, defaults);
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.max_body_bytes, 1024 * 1024);
        assert_eq!(config.server.max_queue, 16);
        assert_eq!(config.generation.max_tokens, 256);
        assert_eq!(config.generation.temperature, None);
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/tandem"));
        assert!(!config.cloud.is_enabled());
    }

    #[test]
    fn the_printed_config_parses_back_to_the_same_config() {
        let mut config =
            DaemonConfig { model_dir: Some("/opt/models/tiny".into()), ..DaemonConfig::default() };
        config.server.api_token = Some(crate::offload::SecretSource::File("/etc/tandem/token".into()));
        config.generation.temperature = Some(0.5);
        config.mqtt =
            Some(toml::from_str::<MqttConfig>("url = \"mqtts://fleet.example:8883\"").expect("mqtt section"));
        config.cloud.mqtt = true;
        config.telemetry.transport = crate::telemetry::TelemetryTransport::Mqtt;
        let text = config.to_toml().unwrap();
        let parsed: DaemonConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed, config);
    }
}

//! Reading the configuration file. Plain data: reads one file and nothing else.

use std::path::{Path, PathBuf};

use super::FleetConfig;

/// The file read when `--config` is not given (skipped when it does not exist).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tandem/fleet.toml";

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Reads `path`, or the defaults when `path` is `None` and the default file does not exist.
pub fn load_config(path: Option<&Path>) -> Result<FleetConfig, ConfigError> {
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            if !default.exists() {
                return Ok(FleetConfig::default());
            }
            default
        }
    };
    let text =
        std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    parse_config(&text).map_err(|message| ConfigError::Parse { path, message })
}

/// Parses TOML text; the error message names the offending key and line.
pub fn parse_config(text: &str) -> Result<FleetConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MqttMode;

    #[test]
    fn an_empty_file_is_the_documented_defaults() {
        let config = parse_config("").unwrap();
        assert_eq!(config, FleetConfig::default());
        assert_eq!(config.mqtt.mode, MqttMode::Embedded);
        assert_eq!(config.store.url, "sqlite://tandem-fleet.db");
    }

    #[test]
    fn a_misspelt_key_is_an_error_that_names_it() {
        let error = parse_config("[ingest]\nmax_batch_event = 3\n").unwrap_err();
        assert!(error.contains("max_batch_event"), "{error}");
    }

    #[test]
    fn printed_configuration_parses_back_to_itself() {
        let mut config = FleetConfig::default();
        config.mqtt.mode = MqttMode::External;
        config.mqtt.external = Some(super::super::ExternalBrokerConfig {
            url: "mqtt://broker:1883".into(),
            client_id: "fleet-a".into(),
            username: Some("fleet".into()),
            password: Some(tandemd::offload::SecretSource::Env("MQTT_PASSWORD".into())),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            shared_group: "g".into(),
            session_expiry_secs: 60,
            receive_maximum: 10,
            receive_window_bytes: 1 << 20,
            keep_alive_secs: 5,
            max_packet_bytes: 1 << 20,
        });
        assert_eq!(parse_config(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn the_shipped_configuration_parses_and_validates() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tandem-fleet.toml"))
                .expect("configs/tandem-fleet.toml");
        let config = parse_config(&text).expect("configs/tandem-fleet.toml parses");
        config.validate().expect("configs/tandem-fleet.toml is valid");
    }
}

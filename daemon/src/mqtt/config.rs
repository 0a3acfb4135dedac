//! How the device connects to the fleet's MQTT broker.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 5: response topic and correlation data travel as properties too.
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers that speak nothing newer.
    V311,
}

/// Connection to the fleet broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker address: `mqtt://host:1883` or `mqtts://host:8883` (TLS).
    pub url: String,
    /// Protocol version to speak.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Client id; defaults to the device id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name for broker authentication; defaults to the device id when a password is set.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (first line). A systemd credential name also works:
    /// `credential:NAME` reads `$CREDENTIALS_DIRECTORY/NAME`.
    #[serde(default)]
    pub password_file: Option<String>,
    /// CA certificate (PEM) for `mqtts://`; the system roots are used when unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Keep-alive interval in seconds (1 to 65535). The broker considers the device gone, and
    /// publishes its last will, after one and a half intervals without traffic.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Longest wait for the broker's acknowledgement (PUBACK) of one publish, ms. A publish that is
    /// not acknowledged in time fails; its data stays in the caller's spool and is sent again.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// First pause before reconnecting after the connection dropped, ms; doubled after every failed
    /// attempt up to `reconnect_max_ms` (each pause is randomised between half and all of it).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest pause between reconnection attempts, ms.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How long the broker keeps the device's session (subscriptions and queued responses) while
    /// it is offline, seconds (MQTT 5 session expiry; 3.1.1 brokers keep it until cleared).
    #[serde(default = "default_session_expiry_secs")]
    pub session_expiry_secs: u32,
    /// Largest MQTT packet sent or accepted, bytes. Larger publishes are refused before sending.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
}

fn default_keep_alive_secs() -> u64 {
    30
}

const fn default_ack_timeout_ms() -> u64 {
    10_000
}

const fn default_reconnect_min_ms() -> u64 {
    500
}

const fn default_reconnect_max_ms() -> u64 {
    30_000
}

const fn default_session_expiry_secs() -> u32 {
    3600
}

const fn default_max_packet_bytes() -> u32 {
    4 * 1024 * 1024
}

impl MqttConfig {
    /// A configuration for the broker at `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            protocol: MqttProtocol::default(),
            client_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            keep_alive_secs: default_keep_alive_secs(),
            ack_timeout_ms: default_ack_timeout_ms(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            session_expiry_secs: default_session_expiry_secs(),
            max_packet_bytes: default_max_packet_bytes(),
        }
    }

    /// [`Self::ack_timeout_ms`] as a duration.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config: MqttConfig = toml::from_str(r#"url = "mqtt://broker:1883""#).unwrap();
        assert_eq!(config, MqttConfig::new("mqtt://broker:1883"));
        assert_eq!(config.protocol, MqttProtocol::V5);
        assert_eq!(config.ack_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<MqttConfig>("url = \"mqtt://b\"\nkeepalive = 3").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn protocol_names_are_lowercase() {
        let config: MqttConfig = toml::from_str("url = \"mqtt://b\"\nprotocol = \"v311\"").unwrap();
        assert_eq!(config.protocol, MqttProtocol::V311);
    }
}

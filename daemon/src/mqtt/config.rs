//! How the device connects to the fleet's MQTT broker.

use std::path::PathBuf;

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
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
}

fn default_keep_alive_secs() -> u64 {
    30
}

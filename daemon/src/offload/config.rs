//! What the user configures about offloading.

use serde::{Deserialize, Serialize};
use tandem_core::protocol::Transport;

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// The first line of this file.
    File(std::path::PathBuf),
    /// This environment variable.
    Env(String),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>` (LoadCredential= in the unit).
    Credential(String),
}

/// An OpenAI-compatible endpoint reached over HTTPS (or plain HTTP on loopback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsCloudConfig {
    /// Base URL; `/v1/chat/completions` is appended when missing, e.g. `https://api.example.com`.
    pub url: String,
    /// Model name sent in the request.
    pub model: String,
    /// API key (sent as `Authorization: Bearer …`); none for endpoints without authentication.
    #[serde(default)]
    pub api_key: Option<SecretSource>,
    /// Largest wait for one attempt, ms.
    #[serde(default = "default_request_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest wait for the TCP/TLS connection, ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Extra CA certificate (PEM) to trust, for private endpoints.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// When a transport stops being tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failed attempts that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit refuses requests before one trial request, ms.
    pub open_ms: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, open_ms: 30_000 }
    }
}

/// Offloading as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadConfig {
    /// The HTTPS transport, when configured.
    #[serde(default)]
    pub https: Option<HttpsCloudConfig>,
    /// Offload over MQTT through the fleet gateway (needs the `[mqtt]` connection).
    #[serde(default)]
    pub mqtt: bool,
    /// Transports in order of preference; later ones are tried when earlier ones fail.
    /// Defaults to every configured transport, HTTPS first.
    #[serde(default)]
    pub order: Vec<Transport>,
    /// Attempts per transport before failing over (1 = no retry).
    #[serde(default = "default_attempts")]
    pub attempts_per_transport: u32,
    /// Pause between attempts on the same transport, ms (doubled each retry).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// The whole offload, every attempt and transport included, ends after this many ms; the
    /// query is then answered locally.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Per-transport circuit breaker.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Send the device's own attempt along with the query (off: the paper sends the query only).
    #[serde(default)]
    pub send_local_attempt: bool,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        Self {
            https: None,
            mqtt: false,
            order: Vec::new(),
            attempts_per_transport: default_attempts(),
            retry_backoff_ms: default_retry_backoff_ms(),
            deadline_ms: default_deadline_ms(),
            circuit_breaker: CircuitBreakerConfig::default(),
            send_local_attempt: false,
        }
    }
}

impl OffloadConfig {
    /// Whether any transport is configured.
    pub fn is_enabled(&self) -> bool {
        self.https.is_some() || self.mqtt
    }

    /// The transports to try, in order.
    pub fn transport_order(&self) -> Vec<Transport> {
        let configured = |t: &Transport| match t {
            Transport::Https => self.https.is_some(),
            Transport::Mqtt => self.mqtt,
        };
        if self.order.is_empty() {
            [Transport::Https, Transport::Mqtt].into_iter().filter(configured).collect()
        } else {
            self.order.iter().copied().filter(configured).collect()
        }
    }
}

fn default_request_timeout_ms() -> u64 {
    15_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_attempts() -> u32 {
    2
}
fn default_retry_backoff_ms() -> u64 {
    200
}
fn default_deadline_ms() -> u64 {
    20_000
}

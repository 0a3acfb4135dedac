//! The fleet's configuration: plain data read from one TOML file (`serve --config FILE`), every
//! section optional with documented defaults, every key checked (`deny_unknown_fields`). Loading
//! never binds a port or opens a database; [`FleetConfig::validate`] says what is wrong and why.

mod load;
mod registry;
mod scheduler;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_core::budget::BudgetPolicy;
use tandemd::offload::{CircuitBreakerConfig, HttpsCloudConfig, SecretSource};

pub use load::{ConfigError, DEFAULT_CONFIG_PATH, load_config};
pub use registry::{RegistryConfig, S3StoreConfig};
pub use scheduler::{
    CallRatioRule, JobTemplate, NewPromptsRule, RunnerKind, SchedulerConfig, default_commands,
};
pub use validate::ValidationError;

/// The whole configuration of `tandem-fleet serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The operator's devices file: device ids, their groups and their credentials for the
    /// embedded broker (see docs/fleet.md). Reloaded when it changes.
    #[serde(default)]
    pub devices_file: Option<PathBuf>,
    /// Where telemetry and device state are kept.
    #[serde(default)]
    pub store: StoreConfig,
    /// How long raw events are kept, and their hourly roll-ups.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// How telemetry is taken in.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The MQTT side: the embedded broker, or a client of an external one.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// The operator API and dashboard.
    #[serde(default)]
    pub api: ApiConfig,
    /// The offload gateway.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// The model registry. Absent: no registry and no rollouts.
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Keep the registry's bundles in an S3-compatible bucket instead of `registry.dir`.
    #[serde(default)]
    pub registry_s3: Option<S3StoreConfig>,
    /// Staged rollouts of registered models (they need `[registry]`).
    #[serde(default)]
    pub rollouts: RolloutsConfig,
    /// Retraining jobs (see docs/fleet.md, "Retraining"). Absent: no scheduler.
    #[serde(default)]
    pub scheduler: Option<SchedulerConfig>,
}

/// Staged rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutsConfig {
    /// How often running rollouts are evaluated (assign, advance, halt), ms. Creating, pausing,
    /// resuming or aborting a rollout evaluates at once.
    #[serde(default = "default_evaluate_interval_ms")]
    pub evaluate_interval_ms: u64,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        Self { evaluate_interval_ms: default_evaluate_interval_ms() }
    }
}

const fn default_evaluate_interval_ms() -> u64 {
    5000
}

/// The database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created when missing, WAL journal) or `postgres://USER@HOST:PORT/DB`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// PostgreSQL password, when the URL carries none (file, environment or systemd credential).
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// Largest number of database connections for queries; telemetry is written on one more.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { url: default_store_url(), password: None, max_connections: default_max_connections() }
    }
}

fn default_store_url() -> String {
    "sqlite://tandem-fleet.db".into()
}
const fn default_max_connections() -> u32 {
    8
}

/// Retention and downsampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Raw events older than this many days (by the time the query arrived on the device) are
    /// rolled up into hourly aggregates and then deleted. 0 keeps raw events forever.
    #[serde(default = "default_raw_days")]
    pub raw_days: u32,
    /// Ids of rolled-up events are remembered this many days longer than the raw events, so a late
    /// copy (a device that never got its acknowledgement) is still dropped as a duplicate.
    #[serde(default = "default_dedup_days")]
    pub dedup_days: u32,
    /// Hourly aggregates older than this many days are deleted. 0 keeps them forever.
    #[serde(default)]
    pub rollup_days: u32,
    /// How often the retention job runs, seconds.
    #[serde(default = "default_retention_interval_secs")]
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            raw_days: default_raw_days(),
            dedup_days: default_dedup_days(),
            rollup_days: 0,
            interval_secs: default_retention_interval_secs(),
        }
    }
}

const fn default_raw_days() -> u32 {
    30
}
const fn default_dedup_days() -> u32 {
    30
}
const fn default_retention_interval_secs() -> u64 {
    3600
}

/// Telemetry ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Events written per database transaction, at most.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Longest a received message waits for more to share its transaction, ms.
    #[serde(default = "default_max_batch_delay_ms")]
    pub max_batch_delay_ms: u64,
    /// Messages waiting to be written, at most; when full, the broker stops reading from devices
    /// (back-pressure instead of memory growth).
    #[serde(default = "default_queue_messages")]
    pub queue_messages: usize,
    /// Largest telemetry payload accepted, bytes; larger ones are counted as `oversized` and
    /// dropped.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_batch_events: default_max_batch_events(),
            max_batch_delay_ms: default_max_batch_delay_ms(),
            queue_messages: default_queue_messages(),
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

const fn default_max_batch_events() -> usize {
    4000
}
const fn default_max_batch_delay_ms() -> u64 {
    20
}
const fn default_queue_messages() -> usize {
    8192
}
const fn default_max_message_bytes() -> usize {
    1024 * 1024
}

/// Which MQTT broker the devices use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttMode {
    /// The broker inside `tandem-fleet` (`[mqtt.embedded]`).
    #[default]
    Embedded,
    /// An external broker (Mosquitto, EMQX, …); the fleet is one of its clients (`[mqtt.external]`).
    External,
}

/// The MQTT side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `embedded` (default) or `external`.
    #[serde(default)]
    pub mode: MqttMode,
    /// The embedded broker.
    #[serde(default)]
    pub embedded: EmbeddedBrokerConfig,
    /// The external broker.
    #[serde(default)]
    pub external: Option<ExternalBrokerConfig>,
}

/// The embedded broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// Plain MQTT listener; none to accept TLS only.
    #[serde(default = "default_mqtt_listen")]
    pub listen: Option<SocketAddr>,
    /// TLS listener (`mqtts://`), configured by `[mqtt.embedded.tls]`.
    #[serde(default)]
    pub tls_listen: Option<SocketAddr>,
    /// Certificates for `tls_listen`.
    #[serde(default)]
    pub tls: Option<BrokerTlsConfig>,
    /// Let clients in without credentials; the client id is then taken as the device id (the
    /// topic ACL still applies). For development only.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Largest MQTT packet accepted, bytes; a client sending a larger one is disconnected.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
    /// QoS 1 messages a device may have unacknowledged (MQTT 5 receive maximum; also the
    /// back-pressure window for 3.1.1 clients).
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// Longest a client may take to send CONNECT after the TCP (and TLS) handshake, ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            listen: default_mqtt_listen(),
            tls_listen: None,
            tls: None,
            allow_anonymous: false,
            max_packet_bytes: default_max_packet_bytes(),
            receive_maximum: default_receive_maximum(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}

fn default_mqtt_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 1883)))
}
const fn default_max_packet_bytes() -> u32 {
    4 * 1024 * 1024
}
const fn default_receive_maximum() -> u16 {
    64
}
const fn default_connect_timeout_ms() -> u64 {
    10_000
}

/// Whether devices must present a client certificate on the TLS listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Not asked for.
    #[default]
    None,
    /// Verified against `client_ca_file` when presented; a verified certificate whose SHA-256
    /// fingerprint is listed for the device replaces its password.
    Optional,
    /// Every TLS client must present one signed by `client_ca_file`.
    Required,
}

/// TLS for the embedded broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    /// Server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Server private key (PEM).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that sign device certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// `none`, `optional` or `required`.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// The fleet as a client of an external broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalBrokerConfig {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    /// Client id; must be stable across restarts (the broker keeps this instance's session and
    /// unacknowledged messages under it) and unique per fleet instance.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// User name for the broker.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the broker.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// CA certificate (PEM) for `mqtts://`; the system roots are used when unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Shared-subscription group for running several fleet instances: instances with the same
    /// group split the devices' messages (`$share/GROUP/…`). Empty (the default): a plain
    /// subscription for a single instance. Brokers drop messages for a shared subscription while no
    /// member of the group is connected (Mosquitto 2.0 also right after its own restart), so with a
    /// group keep at least two instances running; see docs/fleet.md.
    #[serde(default)]
    pub shared_group: String,
    /// How long the broker keeps this instance's session while it is down, seconds.
    #[serde(default = "default_session_expiry_secs")]
    pub session_expiry_secs: u32,
    /// Messages received from the broker and not yet acknowledged, at most (also sent to the
    /// broker as the MQTT 5 receive maximum). The fleet stops reading the connection at this many,
    /// so it bounds the memory messages in flight take (this many times their size); large enough
    /// that the next transaction's messages are read while one commits.
    #[serde(default = "default_external_receive_maximum")]
    pub receive_maximum: u16,
    /// Bytes of messages received and not yet acknowledged, at most (each message counts at least
    /// 1 KiB): with `receive_maximum`, what in-flight messages may take in memory.
    #[serde(default = "default_receive_window_bytes")]
    pub receive_window_bytes: u64,
    /// Keep-alive interval, seconds.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u16,
    /// Largest MQTT packet accepted, bytes.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
}

fn default_client_id() -> String {
    "tandem-fleet".into()
}
const fn default_session_expiry_secs() -> u32 {
    7 * 24 * 3600
}
const fn default_external_receive_maximum() -> u16 {
    8192
}
const fn default_receive_window_bytes() -> u64 {
    16 * 1024 * 1024
}
const fn default_keep_alive_secs() -> u16 {
    30
}

/// The operator API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP(S) API and dashboard.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Bearer token every `/v1/` route requires (`/healthz`, `/metrics`, `/openapi.json` and the
    /// dashboard page itself are open). None: the API is open; only sensible on loopback.
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// Largest page of `GET /v1/events`.
    #[serde(default = "default_max_page")]
    pub max_page: u32,
    /// Serve the API (operator routes, dashboard, registry downloads, device assignments) over
    /// HTTPS on `listen` instead of plain HTTP. Unset: plain HTTP.
    #[serde(default)]
    pub tls: Option<ApiTlsConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { listen: default_api_listen(), token: None, max_page: default_max_page(), tls: None }
    }
}

/// HTTPS for the API: rustls (ring) with TLS 1.2 and 1.3, no client certificates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    /// Server certificate chain (PEM, leaf first). Its names must cover the host in
    /// `registry.public_url`, which devices connect to.
    pub cert_file: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: PathBuf,
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8780))
}
const fn default_max_page() -> u32 {
    1000
}

/// The offload gateway: answers devices' `offload/request`s with the upstream LLM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// OpenAI-compatible endpoints in order of preference; later ones are tried when earlier
    /// ones fail. None: the gateway is off and requests are not consumed.
    #[serde(default)]
    pub upstream: Vec<HttpsCloudConfig>,
    /// Attempts per upstream before failing over (1 = no retry).
    #[serde(default = "default_attempts")]
    pub attempts_per_upstream: u32,
    /// Pause between attempts on the same upstream, ms (doubled each retry).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Longest one offload may take when the request sets no earlier `deadline_ms`, ms.
    #[serde(default = "default_gateway_deadline_ms")]
    pub deadline_ms: u64,
    /// Per-upstream circuit breaker.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Upstream calls in flight at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Requests waiting for a free slot; beyond it devices get a retryable `error`.
    #[serde(default = "default_gateway_queue")]
    pub queue: usize,
    /// How long an answer is kept to answer a repeated `request_id` without calling upstream
    /// again, seconds.
    #[serde(default = "default_idempotency_ttl_secs")]
    pub idempotency_ttl_secs: u64,
    /// Each device's cloud budget at the gateway (local answers come from its telemetry).
    #[serde(default = "default_device_budget")]
    pub device_budget: BudgetPolicy,
    /// The whole fleet's cloud budget at the gateway.
    #[serde(default = "default_fleet_budget")]
    pub fleet_budget: BudgetPolicy,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            attempts_per_upstream: default_attempts(),
            retry_backoff_ms: default_retry_backoff_ms(),
            deadline_ms: default_gateway_deadline_ms(),
            circuit_breaker: CircuitBreakerConfig::default(),
            max_in_flight: default_max_in_flight(),
            queue: default_gateway_queue(),
            idempotency_ttl_secs: default_idempotency_ttl_secs(),
            device_budget: default_device_budget(),
            fleet_budget: default_fleet_budget(),
        }
    }
}

const fn default_attempts() -> u32 {
    2
}
const fn default_retry_backoff_ms() -> u64 {
    200
}
const fn default_gateway_deadline_ms() -> u64 {
    30_000
}
const fn default_max_in_flight() -> usize {
    32
}
const fn default_gateway_queue() -> usize {
    256
}
const fn default_idempotency_ttl_secs() -> u64 {
    600
}
fn default_device_budget() -> BudgetPolicy {
    BudgetPolicy { burst: 5, ..BudgetPolicy::default() }
}
fn default_fleet_budget() -> BudgetPolicy {
    BudgetPolicy { burst: 50, ..BudgetPolicy::default() }
}

impl FleetConfig {
    /// The configuration as TOML, as `print-config` shows it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }
}

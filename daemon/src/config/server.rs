//! `[server]`: the local HTTP API's address, authentication and limits.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::offload::SecretSource;

/// The local OpenAI-compatible HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on. The default only accepts connections from this machine; use
    /// `0.0.0.0:8080` to serve the local network (and then set `api_token`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token clients must send (`Authorization: Bearer <token>`) on every route except
    /// `/healthz`, read once at start, for example `{ file = "/etc/tandem/api-token" }`,
    /// `{ env = "TANDEM_API_TOKEN" }` or `{ credential = "api-token" }` (systemd `LoadCredential=`).
    /// Unset: no authentication.
    #[serde(default)]
    pub api_token: Option<SecretSource>,
    /// Largest request body in bytes; larger requests are refused with HTTP 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most chat requests admitted at once (running or waiting for the model); one more is refused
    /// with HTTP 429 and a `Retry-After` header instead of queueing without bound.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Longest a chat request may take, in seconds, waiting included; then it is cancelled and
    /// answered with HTTP 504.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// On SIGTERM/SIGINT, how long requests already running may take to finish, in seconds, before
    /// they are cancelled. Keep it below systemd's `TimeoutStopSec=`.
    #[serde(default = "default_shutdown_drain_secs")]
    pub shutdown_drain_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            api_token: None,
            max_body_bytes: default_max_body_bytes(),
            max_queue: default_max_queue(),
            request_timeout_secs: default_request_timeout_secs(),
            shutdown_drain_secs: default_shutdown_drain_secs(),
        }
    }
}

const fn default_listen() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080))
}

const fn default_max_body_bytes() -> usize {
    1024 * 1024
}

const fn default_max_queue() -> usize {
    16
}

const fn default_request_timeout_secs() -> u64 {
    300
}

const fn default_shutdown_drain_secs() -> u64 {
    30
}

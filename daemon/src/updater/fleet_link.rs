//! Where assignments come from and where the updater's reports go: the device's retained MQTT
//! `assignment` topic and/or polling `GET {poll_url}/v1/devices/{id}/assignment` feed one channel
//! of [`ModelAssignment`]s; the [`UpdateTracker`]'s changes are published as the device's retained
//! MQTT status. Every task here ends when `stop` is cancelled. Polls and bundle downloads carry
//! the device's [`FleetCredentials`].

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tandem_core::protocol::{ModelAssignment, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::report::UpdateTracker;
use crate::mqtt::{InboundMessage, MqttConfig, MqttLink, MqttLinkError, read_password};
use crate::offload::{Secret, SecretError, SecretSource, http_client, read_secret};

/// How the device proves who it is to the fleet's HTTP API (assignment polls, bundle downloads).
#[derive(Clone, PartialEq, Eq)]
pub enum FleetCredentials {
    /// HTTP Basic with the device's broker user name and password (the fleet checks them against
    /// its devices file).
    Device {
        /// The user name: `[mqtt] username`, else the device id.
        id: String,
        /// The `[mqtt] password_file` password.
        password: Secret,
    },
    /// A bearer token (`updater.poll_token`), for fleets without a devices file.
    Token(Secret),
}

impl std::fmt::Debug for FleetCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Device { id, .. } => write!(f, "Device({id}, password redacted)"),
            Self::Token(_) => f.write_str("Token(redacted)"),
        }
    }
}

impl FleetCredentials {
    /// `request` with the credentials attached.
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Self::Device { id, password } => request.basic_auth(id, Some(password.expose())),
            Self::Token(token) => request.bearer_auth(token.expose()),
        }
    }
}

/// Why the credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// `updater.poll_token` could not be read.
    #[error("updater.poll_token: {0}")]
    Token(#[source] SecretError),
    /// `[mqtt] password_file` could not be read.
    #[error("[mqtt] password_file, which the updater also sends to the fleet's API: {0}")]
    Password(#[source] MqttLinkError),
}

/// The credentials for the fleet's API: `updater.poll_token` when set (a fleet without a devices
/// file takes its operator token), else the device's broker password (`[mqtt] password_file`, with
/// `[mqtt] username` or the device id), else none.
pub fn fleet_credentials(
    device_id: &str,
    mqtt: Option<&MqttConfig>,
    poll_token: Option<&SecretSource>,
) -> Result<Option<FleetCredentials>, CredentialsError> {
    if let Some(source) = poll_token {
        return read_secret(source)
            .map(|token| Some(FleetCredentials::Token(token)))
            .map_err(CredentialsError::Token);
    }
    let Some((mqtt, spec)) = mqtt.and_then(|m| m.password_file.as_deref().map(|spec| (m, spec))) else {
        return Ok(None);
    };
    let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let password = read_password(spec, credentials_dir.as_deref()).map_err(CredentialsError::Password)?;
    let id = mqtt.username.clone().unwrap_or_else(|| device_id.to_string());
    Ok(Some(FleetCredentials::Device { id, password: Secret::new(password) }))
}

/// Assignments waiting for the updater; a newer one supersedes older ones anyway.
pub const ASSIGNMENT_QUEUE: usize = 8;
/// Limit on connecting to the fleet for a poll.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on a whole poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why polling could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client that polls the fleet for assignments: {0}")]
pub struct PollSetupError(#[source] reqwest::Error);

/// Forwards every assignment arriving on the device's MQTT `assignment` topic, starting with the
/// one the broker delivered from its retained store (possibly before this task started).
pub fn follow_mqtt(link: MqttLink, assignments: mpsc::Sender<ModelAssignment>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut messages = link.messages(TopicKind::Assignment);
        if let Some(retained) = link.latest(TopicKind::Assignment) {
            forward(&retained, &assignments).await;
        }
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = messages.recv() => message,
            };
            match message {
                Ok(message) => forward(&message, &assignments).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "assignment messages were missed; the latest one still arrives");
                    if let Some(latest) = link.latest(TopicKind::Assignment) {
                        forward(&latest, &assignments).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

async fn forward(message: &InboundMessage, assignments: &mpsc::Sender<ModelAssignment>) {
    if message.payload.is_empty() {
        tracing::info!("the fleet cleared this device's assignment; keeping the model served");
        return;
    }
    match serde_json::from_slice::<ModelAssignment>(&message.payload) {
        Ok(assignment) => {
            let _closed = assignments.send(assignment).await;
        }
        Err(error) => {
            tracing::warn!(%error, topic = %message.topic, "ignoring an assignment that does not parse")
        }
    }
}

/// Reads `GET {poll_url}/v1/devices/{device_id}/assignment` every `interval` (at once first) and
/// forwards what it returns; 404 and 204 mean nothing is assigned. Over HTTPS the fleet's
/// certificate must chain to the system roots or to `extra_ca` (`updater.ca_file`).
pub fn follow_polls(
    poll_url: &str,
    device_id: &str,
    credentials: Option<FleetCredentials>,
    extra_ca: &[reqwest::Certificate],
    interval: Duration,
    assignments: mpsc::Sender<ModelAssignment>,
    stop: CancellationToken,
) -> Result<(), PollSetupError> {
    let client = http_client(CONNECT_TIMEOUT, extra_ca).map_err(PollSetupError)?;
    let url = assignment_url(poll_url, device_id);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval.max(Duration::from_secs(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match poll_once(&client, &url, credentials.as_ref()).await {
                Ok(assignment) => {
                    if failing {
                        tracing::info!(%url, "polling the fleet for assignments works again");
                        failing = false;
                    }
                    if let Some(assignment) = assignment {
                        let _closed = assignments.send(assignment).await;
                    }
                }
                Err(error) if !failing => {
                    tracing::warn!(%url, %error, "cannot poll the fleet for assignments; retrying every interval");
                    failing = true;
                }
                Err(error) => tracing::debug!(%url, %error, "assignment poll failed"),
            }
        }
    });
    Ok(())
}

/// `{poll_url}/v1/devices/{device_id}/assignment`.
pub fn assignment_url(poll_url: &str, device_id: &str) -> String {
    format!("{}/v1/devices/{device_id}/assignment", poll_url.trim_end_matches('/'))
}

async fn poll_once(
    client: &reqwest::Client,
    url: &str,
    credentials: Option<&FleetCredentials>,
) -> Result<Option<ModelAssignment>, String> {
    let mut request = client.get(url).timeout(POLL_TIMEOUT);
    if let Some(credentials) = credentials {
        request = credentials.apply(request);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    match response.status() {
        StatusCode::NOT_FOUND | StatusCode::NO_CONTENT => Ok(None),
        status if status.is_success() => {
            let body = response.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice(&body).map(Some).map_err(|e| format!("the assignment does not parse: {e}"))
        }
        status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(format!(
            "the fleet answered {status}: it refused this device's credentials (the [mqtt] password_file \
             password, which must match the fleet's devices file, or updater.poll_token)"
        )),
        status => Err(format!("the fleet answered {status}")),
    }
}

/// Publishes the tracker's state as the device's retained MQTT status now and at every change.
pub fn publish_status(link: MqttLink, tracker: Arc<UpdateTracker>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut changes = tracker.subscribe();
        loop {
            let snapshot = tracker.snapshot();
            link.publish_status(snapshot.model_version, snapshot.report).await;
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_password_is_the_fleet_credential_unless_a_poll_token_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("pw");
        std::fs::write(&password, "device-secret-123\n").unwrap();
        let mut mqtt = MqttConfig::new("mqtt://fleet:1883");
        assert_eq!(fleet_credentials("robot-7", Some(&mqtt), None).unwrap(), None);
        assert_eq!(fleet_credentials("robot-7", None, None).unwrap(), None);
        mqtt.password_file = Some(password.to_str().unwrap().into());
        let device =
            FleetCredentials::Device { id: "robot-7".into(), password: Secret::new("device-secret-123") };
        assert_eq!(fleet_credentials("robot-7", Some(&mqtt), None).unwrap(), Some(device));
        mqtt.username = Some("user-7".into());
        let Some(FleetCredentials::Device { id, .. }) =
            fleet_credentials("robot-7", Some(&mqtt), None).unwrap()
        else {
            panic!("device credentials")
        };
        assert_eq!(id, "user-7");
        let token = dir.path().join("token");
        std::fs::write(&token, "operator-token\n").unwrap();
        let chosen = fleet_credentials("robot-7", Some(&mqtt), Some(&SecretSource::File(token))).unwrap();
        assert_eq!(chosen, Some(FleetCredentials::Token(Secret::new("operator-token"))));
        assert!(!format!("{chosen:?}").contains("operator-token"), "redacted");
    }

    #[test]
    fn the_poll_url_is_the_fleets_base_url() {
        assert_eq!(
            assignment_url("https://fleet.example:8443/", "robot-7"),
            "https://fleet.example:8443/v1/devices/robot-7/assignment"
        );
    }
}

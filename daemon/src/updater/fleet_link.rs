//! Where assignments come from and where the updater's reports go: the device's retained MQTT
//! `assignment` topic and/or polling `GET {poll_url}/v1/devices/{id}/assignment` feed one channel
//! of [`ModelAssignment`]s; the [`UpdateTracker`]'s changes are published as the device's retained
//! MQTT status. Every task here ends when `stop` is cancelled.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tandem_core::protocol::{ModelAssignment, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::report::UpdateTracker;
use crate::mqtt::{InboundMessage, MqttLink};
use crate::offload::Secret;

/// Assignments waiting for the updater; a newer one supersedes older ones anyway.
pub const ASSIGNMENT_QUEUE: usize = 8;

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
/// forwards what it returns; 404 and 204 mean nothing is assigned.
pub fn follow_polls(
    poll_url: &str,
    device_id: &str,
    token: Option<Secret>,
    interval: Duration,
    assignments: mpsc::Sender<ModelAssignment>,
    stop: CancellationToken,
) -> Result<(), PollSetupError> {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(PollSetupError)?;
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
            match poll_once(&client, &url, token.as_ref()).await {
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
    token: Option<&Secret>,
) -> Result<Option<ModelAssignment>, String> {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token.expose());
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    match response.status() {
        StatusCode::NOT_FOUND | StatusCode::NO_CONTENT => Ok(None),
        status if status.is_success() => {
            let body = response.bytes().await.map_err(|e| e.to_string())?;
            serde_json::from_slice(&body).map(Some).map_err(|e| format!("the assignment does not parse: {e}"))
        }
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
    fn the_poll_url_is_the_fleets_base_url() {
        assert_eq!(
            assignment_url("https://fleet.example:8443/", "robot-7"),
            "https://fleet.example:8443/v1/devices/robot-7/assignment"
        );
    }
}

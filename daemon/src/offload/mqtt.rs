//! Offload over MQTT, through the fleet's gateway: the request goes out on the device's
//! `offload/request` topic (QoS 1; over MQTT 5 with the response topic and the request id as
//! correlation data), and the answer comes back on its `offload/response` topic, matched to the
//! waiting request by `request_id`. Works the same on MQTT 3.1.1, where the fixed topic names and
//! the `request_id` in the payload do the job of the properties.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tandem_core::protocol::{
    OffloadOutcome, OffloadRequest, OffloadResponse, PROTOCOL_VERSION, TopicKind, Transport,
};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{CloudAnswer, OffloadError, OffloadTransport};
use crate::mqtt::{InboundMessage, MqttLink, MqttLinkError, MqttProtocol, PublishFailure, PublishOptions};

/// The MQTT offload transport. Requests with the same `request_id` (retries) may overlap: every
/// waiter gets the one answer.
pub struct MqttOffload {
    link: MqttLink,
    pending: Arc<PendingRequests>,
    dispatcher: JoinHandle<()>,
}

impl std::fmt::Debug for MqttOffload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttOffload").field("link", &self.link).finish_non_exhaustive()
    }
}

impl Drop for MqttOffload {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl MqttOffload {
    /// Offload through `link`. Starts the task that routes responses to their requests, so it
    /// must be called inside a tokio runtime.
    pub fn new(link: MqttLink) -> Self {
        let pending = Arc::new(PendingRequests::default());
        let responses = link.messages(TopicKind::OffloadResponse);
        let dispatcher = tokio::spawn(route_responses(responses, pending.clone()));
        Self { link, pending, dispatcher }
    }

    async fn exchange(
        &self,
        request: &OffloadRequest,
        timeout: Duration,
    ) -> Result<OffloadResponse, OffloadError> {
        let topics = self.link.topics();
        let payload = serde_json::to_vec(request)
            .map_err(|e| OffloadError::Unreachable(format!("cannot encode the offload request: {e}")))?;
        let options = match self.link.protocol() {
            MqttProtocol::V5 => PublishOptions {
                retain: false,
                response_topic: Some(topics.topic(TopicKind::OffloadResponse)),
                correlation_data: Some(request.request_id.as_bytes().to_vec()),
                message_expiry: Some(timeout),
            },
            MqttProtocol::V311 => PublishOptions::default(),
        };
        // Registered before publishing: the answer may overtake the PUBACK.
        let (answer, answered) = oneshot::channel();
        let _registration = self.pending.register(request.request_id, answer);
        let topic = topics.topic(TopicKind::OffloadRequest);
        self.link.publish_acked(&topic, payload, options).await.map_err(link_error)?;
        answered.await.map_err(|_| OffloadError::Unreachable("the MQTT link was shut down".into()))
    }
}

impl OffloadTransport for MqttOffload {
    fn kind(&self) -> Transport {
        Transport::Mqtt
    }

    fn ask<'a>(
        &'a self,
        request: &'a OffloadRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CloudAnswer, OffloadError>> {
        Box::pin(async move {
            let started = Instant::now();
            let response = tokio::time::timeout(timeout, self.exchange(request, timeout))
                .await
                .map_err(|_| OffloadError::Timeout(timeout))??;
            match response.outcome {
                OffloadOutcome::Answer { content, model, prompt_tokens, completion_tokens } => {
                    Ok(CloudAnswer {
                        content,
                        model,
                        prompt_tokens,
                        completion_tokens,
                        transport: Transport::Mqtt,
                        latency: started.elapsed(),
                    })
                }
                OffloadOutcome::Refused { reason } => Err(OffloadError::Refused(reason)),
                OffloadOutcome::Error { message, retryable: true } => Err(OffloadError::Unreachable(message)),
                OffloadOutcome::Error { message, retryable: false } => {
                    Err(OffloadError::InvalidResponse(message))
                }
            }
        })
    }
}

fn link_error(error: MqttLinkError) -> OffloadError {
    match error.failure() {
        PublishFailure::Timeout(waited) => OffloadError::Timeout(waited),
        PublishFailure::Refused => OffloadError::Refused(error.to_string()),
        PublishFailure::Unreachable => OffloadError::Unreachable(error.to_string()),
    }
}

/// Waiters by `request_id`, each with the token of its [`Registration`].
type Waiters = HashMap<Uuid, Vec<(u64, oneshot::Sender<OffloadResponse>)>>;

/// Requests waiting for their response, by `request_id`.
#[derive(Default)]
struct PendingRequests {
    waiters: Mutex<Waiters>,
    next_token: AtomicU64,
}

/// Removes its waiter when the request finishes, times out or is cancelled.
struct Registration<'a> {
    pending: &'a PendingRequests,
    request_id: Uuid,
    token: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiters = self.pending.lock();
        if let Some(list) = waiters.get_mut(&self.request_id) {
            list.retain(|(token, _)| *token != self.token);
            if list.is_empty() {
                waiters.remove(&self.request_id);
            }
        }
    }
}

impl PendingRequests {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, request_id: Uuid, answer: oneshot::Sender<OffloadResponse>) -> Registration<'_> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(request_id).or_default().push((token, answer));
        Registration { pending: self, request_id, token }
    }

    /// Hands a response to the requests waiting for it; a response nobody waits for (late, or a
    /// duplicate) is dropped.
    fn deliver(&self, response: OffloadResponse) {
        let Some(waiters) = self.lock().remove(&response.request_id) else {
            tracing::debug!(request_id = %response.request_id, "dropping an offload response nobody waits for");
            return;
        };
        for (_, answer) in waiters {
            let _gone = answer.send(response.clone());
        }
    }

    /// The link is gone: every waiter learns it at once.
    fn abandon_all(&self) {
        self.lock().clear();
    }
}

/// Routes responses from the link to the waiting requests until the link closes.
async fn route_responses(mut responses: broadcast::Receiver<InboundMessage>, pending: Arc<PendingRequests>) {
    loop {
        match responses.recv().await {
            Ok(message) => {
                if let Some(response) = parse_response(&message) {
                    pending.deliver(response);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "offload responses arrived faster than they were routed; some were lost"
                );
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    pending.abandon_all();
}

/// The response in `message`, or `None` (logged) when it is not a usable v1 response.
fn parse_response(message: &InboundMessage) -> Option<OffloadResponse> {
    let response = match serde_json::from_slice::<OffloadResponse>(&message.payload) {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(topic = %message.topic, %error, "ignoring a malformed offload response");
            return None;
        }
    };
    if response.v != PROTOCOL_VERSION {
        tracing::warn!(
            v = response.v,
            expected = PROTOCOL_VERSION,
            "ignoring an offload response of another protocol version"
        );
        return None;
    }
    if let Some(correlation) = &message.correlation_data
        && !correlates(correlation, response.request_id)
    {
        tracing::warn!(request_id = %response.request_id, "ignoring an offload response whose correlation data names another request");
        return None;
    }
    Some(response)
}

/// Whether MQTT 5 correlation data names `request_id` (as its 16 bytes, or as text).
fn correlates(correlation: &[u8], request_id: Uuid) -> bool {
    correlation == request_id.as_bytes()
        || std::str::from_utf8(correlation).ok().and_then(|s| Uuid::parse_str(s).ok()) == Some(request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8], correlation_data: Option<Vec<u8>>) -> InboundMessage {
        InboundMessage {
            kind: TopicKind::OffloadResponse,
            topic: "tandem/v1/devices/d/offload/response".into(),
            payload: payload.to_vec(),
            retained: false,
            correlation_data,
        }
    }

    fn response(request_id: Uuid, v: u32) -> OffloadResponse {
        OffloadResponse { v, request_id, outcome: OffloadOutcome::Refused { reason: "cap".into() } }
    }

    #[test]
    fn responses_are_checked_for_version_and_correlation() {
        let id = Uuid::now_v7();
        let good = serde_json::to_vec(&response(id, PROTOCOL_VERSION)).unwrap();
        assert!(parse_response(&message(&good, None)).is_some());
        assert!(parse_response(&message(&good, Some(id.as_bytes().to_vec()))).is_some());
        assert!(parse_response(&message(&good, Some(id.to_string().into_bytes()))).is_some());
        assert!(parse_response(&message(&good, Some(Uuid::now_v7().as_bytes().to_vec()))).is_none());
        let other_version = serde_json::to_vec(&response(id, PROTOCOL_VERSION + 1)).unwrap();
        assert!(parse_response(&message(&other_version, None)).is_none());
        assert!(parse_response(&message(b"{not json", None)).is_none());
    }

    #[tokio::test]
    async fn every_waiter_of_a_request_gets_its_response_once() {
        let pending = PendingRequests::default();
        let id = Uuid::now_v7();
        let (first, first_answer) = oneshot::channel();
        let (second, second_answer) = oneshot::channel();
        let _a = pending.register(id, first);
        let _b = pending.register(id, second);
        pending.deliver(response(id, PROTOCOL_VERSION));
        assert_eq!(first_answer.await.unwrap().request_id, id);
        assert_eq!(second_answer.await.unwrap().request_id, id);
        pending.deliver(response(id, PROTOCOL_VERSION));
        assert!(pending.lock().is_empty(), "a duplicate response finds nobody");
    }

    #[test]
    fn a_finished_request_leaves_nothing_behind() {
        let pending = PendingRequests::default();
        let (answer, _answered) = oneshot::channel();
        drop(pending.register(Uuid::now_v7(), answer));
        assert!(pending.lock().is_empty());
    }
}

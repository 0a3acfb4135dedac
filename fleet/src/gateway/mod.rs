//! The offload gateway: devices publish `OffloadRequest`s on their `offload/request` topic; the
//! gateway answers each with one `OffloadResponse` (same `request_id`; over MQTT 5 the correlation
//! data is the id's 16 raw bytes) on the device's own response topic, after asking the configured
//! upstream OpenAI-compatible endpoints (tandemd's `CloudClient`: failover in order, retries with
//! the request id as idempotency key, circuit breakers, deadlines).
//!
//! Before calling upstream it checks, in order: the request is well-formed and from the device of
//! its topic; its deadline has not passed; the id was not answered already (then the recorded
//! answer is sent again); the device's and the fleet's budgets allow a call (else `refused` with
//! the reason). At most `max_in_flight` calls run at once; a full queue answers a retryable
//! `error` at once instead of letting devices wait.

mod budget;
mod idempotency;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_core::protocol::{
    OffloadOutcome, OffloadRequest, OffloadResponse, PROTOCOL_VERSION, TopicKind, Transport,
};
use tandemd::offload::{CloudClient, HttpsOffload, HttpsSetupError, OffloadConfig, OffloadTransport};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use budget::{BudgetBook, BudgetRefusal, BudgetReport, Grant};
pub use idempotency::{IdempotencyRecord, Seen};

use crate::config::GatewayConfig;
use crate::device_link::DeviceLink;
use crate::metrics::{FleetMetrics, OutcomeLabels};
use crate::store::{Store, now_ms};

/// Answers remembered at most (each a few hundred bytes to a few kB).
const RECORD_CAPACITY: usize = 100_000;
/// How often changed budget states are saved.
const BUDGET_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway.upstream #{index}: {source}")]
    Upstream { index: usize, source: HttpsSetupError },
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct OffloadArrival {
    /// The device of the topic it came on.
    pub device: String,
    pub payload: Bytes,
}

struct Job {
    device: String,
    request: OffloadRequest,
}

struct Shared {
    client: CloudClient,
    link: Arc<dyn DeviceLink>,
    budgets: Arc<BudgetBook>,
    record: Mutex<IdempotencyRecord>,
    permits: Arc<Semaphore>,
    metrics: Arc<FleetMetrics>,
}

/// The gateway's entry point; cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("client", &self.shared.client).finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the upstream clients and starts the dispatcher and the budget saver. `link` carries
    /// the answers; budget states persist in `store`.
    pub async fn start(
        config: &GatewayConfig,
        link: Arc<dyn DeviceLink>,
        store: Store,
        metrics: Arc<FleetMetrics>,
        shutdown: CancellationToken,
    ) -> Result<(Self, Vec<JoinHandle<()>>), GatewayError> {
        let mut transports: Vec<Arc<dyn OffloadTransport>> = Vec::new();
        for (index, upstream) in config.upstream.iter().enumerate() {
            let transport = HttpsOffload::new(upstream)
                .map_err(|source| GatewayError::Upstream { index: index + 1, source })?;
            transports.push(Arc::new(transport));
        }
        let offload = OffloadConfig {
            https: config.upstream.first().cloned(),
            mqtt: false,
            order: vec![Transport::Https],
            attempts_per_transport: config.attempts_per_upstream,
            retry_backoff_ms: config.retry_backoff_ms,
            deadline_ms: config.deadline_ms,
            circuit_breaker: config.circuit_breaker.clone(),
            send_local_attempt: false,
        };
        let states = match store.budget_states().await {
            Ok(states) => states,
            Err(error) => {
                tracing::error!(%error, "cannot read saved gateway budgets; starting them empty");
                Vec::new()
            }
        };
        let budgets =
            Arc::new(BudgetBook::new(config.device_budget.clone(), config.fleet_budget.clone(), &states));
        let shared = Arc::new(Shared {
            client: CloudClient::new(&offload, transports),
            link,
            budgets: budgets.clone(),
            record: Mutex::new(IdempotencyRecord::new(
                Duration::from_secs(config.idempotency_ttl_secs),
                RECORD_CAPACITY,
            )),
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            metrics,
        });
        let (jobs, queue) = mpsc::channel(config.queue.max(1));
        let dispatcher = tokio::spawn(dispatch(queue, shared.clone(), shutdown.clone()));
        let saver = tokio::spawn(save_budgets(budgets, store, shutdown));
        Ok((Self { jobs, shared }, vec![dispatcher, saver]))
    }

    /// The gateway's budgets (fed by ingest, shown by the API).
    pub fn budgets(&self) -> Arc<BudgetBook> {
        self.shared.budgets.clone()
    }

    /// Takes in one request; never waits.
    pub fn submit(&self, arrival: OffloadArrival) {
        let metrics = &self.shared.metrics;
        let count = |outcome| metrics.gateway_requests.get_or_create(&OutcomeLabels { outcome }).inc();
        let request: OffloadRequest = match serde_json::from_slice(&arrival.payload) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(device = %arrival.device, %error, "dropping an offload request that is not an OffloadRequest");
                count("invalid");
                return;
            }
        };
        if request.device_id != arrival.device {
            tracing::warn!(device = %arrival.device, claimed = %request.device_id, "dropping an offload request for another device");
            count("invalid");
            return;
        }
        if request.v != PROTOCOL_VERSION {
            count("invalid");
            let message = format!(
                "protocol version {} is not served (this gateway speaks {PROTOCOL_VERSION})",
                request.v
            );
            self.shared.reply(
                &arrival.device,
                request.request_id,
                OffloadOutcome::Error { message, retryable: false },
            );
            return;
        }
        if is_expired(&request) {
            tracing::info!(device = %arrival.device, request_id = %request.request_id, "dropping an offload request past its deadline");
            count("expired");
            return;
        }
        let request_id = request.request_id;
        if let Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) =
            self.jobs.try_send(Job { device: arrival.device, request })
        {
            count("busy");
            let message = "the fleet gateway is busy; try again".to_string();
            self.shared.reply(&job.device, request_id, OffloadOutcome::Error { message, retryable: true });
        }
    }
}

/// Whether the device has stopped waiting.
fn is_expired(request: &OffloadRequest) -> bool {
    request.deadline_ms > 0 && u64::try_from(now_ms()).unwrap_or(0) >= request.deadline_ms
}

/// Takes queued jobs and answers each in its own task, at most `max_in_flight` at once.
async fn dispatch(mut queue: mpsc::Receiver<Job>, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let job = tokio::select! {
            job = queue.recv() => job,
            () = shutdown.cancelled() => None,
        };
        let Some(job) = job else { break };
        let seen = shared.lock_record().check(&job.device, job.request.request_id, Instant::now());
        match seen {
            Seen::InFlight => {
                shared.count("joined");
                continue;
            }
            Seen::Answered(response) => {
                shared.count("replayed");
                shared.publish(&job.device, &response);
                continue;
            }
            Seen::New => {}
        }
        let permit = tokio::select! {
            permit = shared.permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        if is_expired(&job.request) {
            // It waited for a slot until the device stopped waiting.
            shared.count("expired");
            shared.lock_record().finish(&job.device, &expired(&job.request), false, Instant::now());
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.metrics.gateway_in_flight.inc();
            shared.answer(job).await;
            shared.metrics.gateway_in_flight.dec();
            drop(permit);
        });
    }
}

fn expired(request: &OffloadRequest) -> OffloadResponse {
    OffloadResponse {
        v: PROTOCOL_VERSION,
        request_id: request.request_id,
        outcome: OffloadOutcome::Error { message: "deadline passed".into(), retryable: true },
    }
}

impl Shared {
    fn lock_record(&self) -> MutexGuard<'_, IdempotencyRecord> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.gateway_requests.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Budget, upstream, record, answer.
    async fn answer(&self, job: Job) {
        let Job { device, request } = job;
        let estimate = estimated_tokens(&request);
        let (outcome, remember) = match self.budgets.reserve(&device, estimate) {
            Err(refusal) => {
                tracing::info!(%device, request_id = %request.request_id, %refusal, "offload refused by the gateway budget");
                self.count("refused");
                (OffloadOutcome::Refused { reason: refusal.to_string() }, true)
            }
            Ok(grant) => {
                let started = Instant::now();
                match self.client.ask(request.clone()).await {
                    Ok(answer) => {
                        self.metrics.gateway_upstream_seconds.observe(started.elapsed().as_secs_f64());
                        let tokens = u64::from(answer.prompt_tokens) + u64::from(answer.completion_tokens);
                        self.budgets.settle(grant, tokens);
                        self.count("answer");
                        let outcome = OffloadOutcome::Answer {
                            content: answer.content,
                            model: answer.model,
                            prompt_tokens: answer.prompt_tokens,
                            completion_tokens: answer.completion_tokens,
                        };
                        (outcome, true)
                    }
                    Err(error) => {
                        self.budgets.settle(grant, 0);
                        tracing::warn!(%device, request_id = %request.request_id, %error, "upstream failed");
                        self.count("error");
                        let retryable = error.is_retryable();
                        (OffloadOutcome::Error { message: error.to_string(), retryable }, !retryable)
                    }
                }
            }
        };
        let response = OffloadResponse { v: PROTOCOL_VERSION, request_id: request.request_id, outcome };
        self.lock_record().finish(&device, &response, remember, Instant::now());
        if is_expired(&request) {
            self.count("late");
            return;
        }
        self.publish(&device, &response);
    }

    fn reply(&self, device: &str, request_id: uuid::Uuid, outcome: OffloadOutcome) {
        self.publish(device, &OffloadResponse { v: PROTOCOL_VERSION, request_id, outcome });
    }

    /// Publishes on the device's own response topic (never on a response topic the request
    /// names: a device must not make the gateway write to another device).
    fn publish(&self, device: &str, response: &OffloadResponse) {
        let payload = serde_json::to_vec(response).expect("responses serialise");
        let correlation = Bytes::copy_from_slice(response.request_id.as_bytes());
        self.link.publish(device, TopicKind::OffloadResponse, payload.into(), false, Some(correlation));
    }
}

/// Tokens a request may use: its prompt (about four characters per token) and the completion.
fn estimated_tokens(request: &OffloadRequest) -> u64 {
    let characters: usize = request.messages.iter().map(|m| m.content.chars().count()).sum();
    (characters as u64).div_ceil(4) + u64::from(request.max_tokens)
}

/// Saves changed budget states every few seconds, and once more at shutdown.
async fn save_budgets(budgets: Arc<BudgetBook>, store: Store, shutdown: CancellationToken) {
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(BUDGET_SAVE_INTERVAL) => false,
            () = shutdown.cancelled() => true,
        };
        let dirty = budgets.take_dirty();
        if !dirty.is_empty()
            && let Err(error) = store.save_budget_states(&dirty).await
        {
            tracing::error!(%error, "cannot save the gateway budgets");
        }
        if stop {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_core::protocol::ChatMessage;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn the_estimate_covers_prompt_and_completion() {
        let request = OffloadRequest {
            v: PROTOCOL_VERSION,
            request_id: Uuid::now_v7(),
            device_id: "d".into(),
            model_version: "m".into(),
            messages: vec![ChatMessage { role: "user".into(), content: "12345678".into() }],
            max_tokens: 10,
            temperature: None,
            local_attempt: None,
            deadline_ms: 0,
        };
        assert_eq!(estimated_tokens(&request), 12);
        assert!(!is_expired(&request), "0 means no deadline");
        assert!(is_expired(&OffloadRequest { deadline_ms: 1, ..request }));
    }
}

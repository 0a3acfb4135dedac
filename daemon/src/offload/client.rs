//! `CloudClient`: one offload, every retry and failover included. Transports are tried in the
//! configured order, each up to `attempts_per_transport` times with the same request id (the
//! idempotency key) and exponential backoff for retryable errors; a transport whose circuit breaker
//! is open is skipped; the whole offload never outlasts its deadline.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tandem_core::protocol::{OffloadRequest, Transport};
use tokio::time::Instant;

use super::circuit_breaker::{Admission, CircuitBreaker};
use super::{CloudAnswer, OffloadConfig, OffloadError, OffloadTransport};

/// Extra time a transport gets past its own timeout before the client stops waiting for it; a
/// transport honouring its timeout never reaches this.
const TRANSPORT_GRACE: Duration = Duration::from_millis(250);

struct Route {
    transport: Arc<dyn OffloadTransport>,
    breaker: Mutex<CircuitBreaker>,
}

/// The offload client; cheap to share behind an `Arc`.
pub struct CloudClient {
    config: OffloadConfig,
    /// In trial order: by `config.transport_order()`, then in the order handed in.
    routes: Vec<Route>,
}

impl std::fmt::Debug for CloudClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudClient")
            .field("transports", &self.routes.iter().map(|r| r.transport.kind()).collect::<Vec<_>>())
            .field("deadline_ms", &self.config.deadline_ms)
            .finish()
    }
}

impl CloudClient {
    /// A client over `transports`. Only transports whose kind `config.transport_order()` names are
    /// used; several of one kind are tried in the order given. Each transport gets its own breaker.
    pub fn new(config: &OffloadConfig, transports: Vec<Arc<dyn OffloadTransport>>) -> Self {
        let order = config.transport_order();
        let mut routes = Vec::new();
        for kind in &order {
            for transport in transports.iter().filter(|t| t.kind() == *kind) {
                routes.push(Route {
                    transport: Arc::clone(transport),
                    breaker: Mutex::new(CircuitBreaker::new(&config.circuit_breaker)),
                });
            }
        }
        for kind in &order {
            if !transports.iter().any(|t| t.kind() == *kind) {
                tracing::warn!(transport = ?kind, "offload transport is configured but was not started");
            }
        }
        for transport in transports.iter().filter(|t| !order.contains(&t.kind())) {
            tracing::warn!(transport = ?transport.kind(), "offload transport given but not configured; unused");
        }
        Self { config: config.clone(), routes }
    }

    /// Sends `request` to the cloud: see the module documentation. On failure returns the last
    /// error a transport gave, or `CircuitOpen` when every usable transport was skipped by its
    /// breaker, or `NotConfigured` when there is no transport at all.
    pub async fn ask(&self, request: OffloadRequest) -> Result<CloudAnswer, OffloadError> {
        let deadline = self.deadline_for(&request);
        let attempts = self.config.attempts_per_transport.max(1);
        let mut last_error: Option<OffloadError> = None;
        let mut circuit_open: Option<OffloadError> = None;

        'transports: for route in &self.routes {
            let kind = route.transport.kind();
            for attempt in 0..attempts {
                let now = Instant::now();
                let remaining = deadline.saturating_duration_since(now);
                if remaining.is_zero() {
                    break 'transports;
                }
                if let Admission::Refused { retry_after } = self.lock(route).admit(now.into_std()) {
                    tracing::debug!(transport = ?kind, ?retry_after, "circuit open; skipping transport");
                    circuit_open.get_or_insert(OffloadError::CircuitOpen { transport: kind, retry_after });
                    continue 'transports;
                }
                let timeout = self.attempt_timeout(kind).min(remaining);
                let result = match tokio::time::timeout(
                    timeout + TRANSPORT_GRACE,
                    route.transport.ask(&request, timeout),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(OffloadError::Timeout(timeout)),
                };
                let error = match result {
                    Ok(answer) => {
                        self.lock(route).record_success();
                        return Ok(answer);
                    }
                    Err(error) => error,
                };
                if counts_against_transport(&error) {
                    self.lock(route).record_failure(Instant::now().into_std());
                } else {
                    // The transport worked; the request or the gateway's policy did not.
                    self.lock(route).record_success();
                }
                tracing::info!(
                    transport = ?kind,
                    attempt = attempt + 1,
                    request_id = %request.request_id,
                    error = %error,
                    "offload attempt failed"
                );
                let retryable = error.is_retryable();
                let refused = matches!(error, OffloadError::Refused(_));
                last_error = Some(error);
                if refused {
                    // The gateway's budget said no: going around it over another transport would
                    // defeat the fleet's caps.
                    break 'transports;
                }
                if !retryable || attempt + 1 == attempts {
                    continue 'transports;
                }
                let backoff = self.backoff(attempt);
                if backoff >= deadline.saturating_duration_since(Instant::now()) {
                    continue 'transports;
                }
                tokio::time::sleep(backoff).await;
            }
        }
        Err(last_error.or(circuit_open).unwrap_or_else(|| {
            if self.routes.is_empty() {
                OffloadError::NotConfigured
            } else {
                OffloadError::Timeout(Duration::from_millis(self.config.deadline_ms))
            }
        }))
    }

    /// The state of every transport's breaker (`closed`, `open`, `half_open`), in trial order,
    /// for `/metrics` and the status endpoint.
    pub fn breaker_states(&self) -> Vec<(Transport, &'static str)> {
        let now = Instant::now().into_std();
        self.routes.iter().map(|route| (route.transport.kind(), self.lock(route).state_name(now))).collect()
    }

    /// Whether any transport is usable at all.
    pub fn is_enabled(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The end of the offload: `deadline_ms` from now, or the request's own absolute deadline
    /// when that is earlier.
    fn deadline_for(&self, request: &OffloadRequest) -> Instant {
        let now = Instant::now();
        let mut deadline = now + Duration::from_millis(self.config.deadline_ms);
        if request.deadline_ms > 0 {
            let unix_now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let left = Duration::from_millis(request.deadline_ms.saturating_sub(unix_now));
            deadline = deadline.min(now + left);
        }
        deadline
    }

    /// The longest one attempt may take on `kind`, before the deadline clips it: the HTTPS
    /// transport's configured timeout; transports without their own setting get the deadline.
    fn attempt_timeout(&self, kind: Transport) -> Duration {
        match (kind, &self.config.https) {
            (Transport::Https, Some(https)) => Duration::from_millis(https.timeout_ms),
            _ => Duration::from_millis(self.config.deadline_ms),
        }
    }

    /// Pause after failed attempt number `attempt` (0-based): `retry_backoff_ms · 2^attempt`.
    fn backoff(&self, attempt: u32) -> Duration {
        Duration::from_millis(self.config.retry_backoff_ms.saturating_mul(1u64 << attempt.min(16)))
    }

    fn lock<'a>(&self, route: &'a Route) -> std::sync::MutexGuard<'a, CircuitBreaker> {
        // The breaker is plain data updated in one step; a panic elsewhere cannot leave it torn.
        route.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether an error says the transport (rather than this request) is unhealthy: timeouts,
/// unreachable endpoints, garbage answers, server errors, throttling and authentication failures
/// count; a refusal by the gateway or a complaint about the request itself does not.
fn counts_against_transport(error: &OffloadError) -> bool {
    match error {
        OffloadError::Timeout(_) | OffloadError::Unreachable(_) | OffloadError::InvalidResponse(_) => true,
        OffloadError::HttpStatus { status, .. } => {
            *status >= 500 || matches!(status, 401 | 403 | 404 | 408 | 429)
        }
        OffloadError::Refused(_) | OffloadError::NotConfigured | OffloadError::CircuitOpen { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::future::BoxFuture;
    use tandem_core::protocol::ChatMessage;

    use super::*;
    use crate::offload::CircuitBreakerConfig;

    /// A transport answering from a script, one entry per attempt (the last entry repeats).
    struct Scripted {
        kind: Transport,
        script: Vec<Result<&'static str, OffloadError>>,
        calls: AtomicU32,
    }

    impl Scripted {
        fn new(kind: Transport, script: Vec<Result<&'static str, OffloadError>>) -> Arc<Self> {
            Arc::new(Self { kind, script, calls: AtomicU32::new(0) })
        }
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl OffloadTransport for Scripted {
        fn kind(&self) -> Transport {
            self.kind
        }
        fn ask<'a>(
            &'a self,
            _request: &'a OffloadRequest,
            _timeout: Duration,
        ) -> BoxFuture<'a, Result<CloudAnswer, OffloadError>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) as usize;
            let step = self.script[call.min(self.script.len() - 1)].clone();
            let kind = self.kind;
            Box::pin(async move {
                step.map(|content| CloudAnswer {
                    content: content.into(),
                    model: "m".into(),
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    transport: kind,
                    latency: Duration::ZERO,
                })
            })
        }
    }

    fn request() -> OffloadRequest {
        OffloadRequest {
            v: 1,
            request_id: uuid::Uuid::now_v7(),
            device_id: "d".into(),
            model_version: "m".into(),
            messages: vec![ChatMessage { role: "user".into(), content: "q".into() }],
            max_tokens: 8,
            temperature: None,
            local_attempt: None,
            deadline_ms: 0,
        }
    }

    fn config(order: Vec<Transport>) -> OffloadConfig {
        OffloadConfig {
            https: Some(crate::offload::HttpsCloudConfig {
                url: "http://127.0.0.1:1".into(),
                model: "m".into(),
                api_key: None,
                timeout_ms: 1000,
                connect_timeout_ms: 1000,
                ca_file: None,
            }),
            mqtt: true,
            order,
            attempts_per_transport: 2,
            retry_backoff_ms: 1,
            deadline_ms: 5000,
            circuit_breaker: CircuitBreakerConfig { failure_threshold: 3, open_ms: 60_000 },
            send_local_attempt: false,
        }
    }

    #[tokio::test]
    async fn no_transport_is_not_configured() {
        let client = CloudClient::new(&OffloadConfig::default(), Vec::new());
        assert_eq!(client.ask(request()).await, Err(OffloadError::NotConfigured));
    }

    #[tokio::test]
    async fn refusal_by_the_gateway_is_not_retried_or_failed_over() {
        let mqtt = Scripted::new(Transport::Mqtt, vec![Err(OffloadError::Refused("cap".into()))]);
        let https = Scripted::new(Transport::Https, vec![Ok("answer")]);
        let client = CloudClient::new(
            &config(vec![Transport::Mqtt, Transport::Https]),
            vec![https.clone(), mqtt.clone()],
        );
        assert_eq!(client.ask(request()).await, Err(OffloadError::Refused("cap".into())));
        assert_eq!((mqtt.calls(), https.calls()), (1, 0));
    }

    #[tokio::test]
    async fn non_retryable_error_fails_over_without_retrying() {
        let https = Scripted::new(Transport::Https, vec![Err(OffloadError::InvalidResponse("x".into()))]);
        let mqtt = Scripted::new(Transport::Mqtt, vec![Ok("from mqtt")]);
        let client = CloudClient::new(&config(Vec::new()), vec![mqtt.clone(), https.clone()]);
        let answer = client.ask(request()).await.expect("answer");
        assert_eq!(answer.transport, Transport::Mqtt);
        assert_eq!((https.calls(), mqtt.calls()), (1, 1));
    }

    #[tokio::test]
    async fn last_meaningful_error_wins_over_circuit_open() {
        let https = Scripted::new(Transport::Https, vec![Err(OffloadError::Unreachable("down".into()))]);
        let mqtt = Scripted::new(Transport::Mqtt, vec![Err(OffloadError::Timeout(Duration::from_secs(1)))]);
        let mut cfg = config(Vec::new());
        cfg.attempts_per_transport = 1;
        cfg.circuit_breaker.failure_threshold = 1;
        let client = CloudClient::new(&cfg, vec![https.clone(), mqtt.clone()]);
        assert_eq!(client.ask(request()).await, Err(OffloadError::Timeout(Duration::from_secs(1))));
        assert_eq!(client.breaker_states(), vec![(Transport::Https, "open"), (Transport::Mqtt, "open")]);
        let error = client.ask(request()).await.expect_err("both open");
        assert!(matches!(error, OffloadError::CircuitOpen { transport: Transport::Https, .. }), "{error}");
        assert_eq!((https.calls(), mqtt.calls()), (1, 1));
    }

    #[tokio::test]
    async fn request_errors_do_not_open_the_breaker() {
        let https = Scripted::new(
            Transport::Https,
            vec![Err(OffloadError::HttpStatus { status: 400, body: "".into() })],
        );
        let mut cfg = config(vec![Transport::Https]);
        cfg.circuit_breaker.failure_threshold = 1;
        let client = CloudClient::new(&cfg, vec![https.clone()]);
        for _ in 0..3 {
            assert!(matches!(client.ask(request()).await, Err(OffloadError::HttpStatus { status: 400, .. })));
        }
        assert_eq!(https.calls(), 3);
        assert_eq!(client.breaker_states(), vec![(Transport::Https, "closed")]);
    }

    #[test]
    fn ask_future_can_move_between_threads() {
        fn assert_send<T: Send>(_: &T) {}
        let client = CloudClient::new(&OffloadConfig::default(), Vec::new());
        let future = client.ask(request());
        assert_send(&future);
    }

    #[test]
    fn backoff_doubles_per_attempt() {
        let mut cfg = config(Vec::new());
        cfg.retry_backoff_ms = 100;
        let client = CloudClient::new(&cfg, Vec::new());
        assert_eq!(
            [client.backoff(0), client.backoff(1), client.backoff(2)],
            [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(400)]
        );
    }
}

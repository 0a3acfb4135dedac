//! Test helpers: a fake `ChatBackend` (echoes the last message; route, delay, streaming and errors
//! configurable) and an in-process API server with an HTTP client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tandem_core::budget::BudgetSnapshot;
use tandem_core::protocol::Route;
use tandemd::api::{ApiSettings, ApiState};
use tandemd::chat::{BackendStatus, ChatBackend, ChatError, ChatOutcome, ChatRequest, FinishKind, ModelInfo};
use tandemd::config::GenerationDefaults;
use tandemd::engine::CancelToken;
use tandemd::ops::Shutdown;
use tokio::sync::mpsc;

pub const MODEL_ID: &str = "tandem-tiny";

/// How the fake answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// `echo: <last message>`, streamed word by word when asked to stream.
    Echo,
    /// Streams `first ` and then waits until cancelled.
    StreamThenHang,
    /// Waits until cancelled, then returns `Cancelled`.
    Hang,
    /// Fails with this error before any text.
    Fail(ChatError),
    /// Streams `partial ` and then fails with this error.
    FailAfterText(ChatError),
}

/// A `ChatBackend` for API tests.
#[derive(Debug)]
pub struct FakeBackend {
    pub route: Route,
    pub delay: Duration,
    pub behaviour: Behaviour,
    pub requests: Mutex<Vec<ChatRequest>>,
    pub cancel_tokens: Mutex<Vec<CancelToken>>,
    pub finished: AtomicUsize,
}

impl FakeBackend {
    pub fn echo() -> Self {
        Self {
            route: Route::Local,
            delay: Duration::ZERO,
            behaviour: Behaviour::Echo,
            requests: Mutex::new(Vec::new()),
            cancel_tokens: Mutex::new(Vec::new()),
            finished: AtomicUsize::new(0),
        }
    }

    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn with_behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn last_request(&self) -> ChatRequest {
        self.requests.lock().unwrap().last().cloned().expect("a request reached the backend")
    }

    pub fn all_cancelled(&self) -> bool {
        let tokens = self.cancel_tokens.lock().unwrap();
        !tokens.is_empty() && tokens.iter().all(CancelToken::is_cancelled)
    }

    fn outcome(&self, content: String) -> ChatOutcome {
        ChatOutcome {
            route: self.route,
            prompt_tokens: 11,
            completion_tokens: content.split_whitespace().count() as u32,
            content,
            finish: FinishKind::Stop,
            help_probability: Some(0.25),
            cloud_model: (self.route == Route::Cloud).then(|| "big-cloud-model".to_string()),
            fallback_reason: (self.route == Route::LocalFallback).then(|| "budget_ratio".to_string()),
            local_ms: 12,
            cloud_ms: if self.route == Route::Cloud { 34 } else { 0 },
            event_id: None,
        }
    }

    async fn answer(
        &self,
        request: ChatRequest,
        deltas: Option<mpsc::Sender<String>>,
        cancel: CancelToken,
    ) -> Result<ChatOutcome, ChatError> {
        self.requests.lock().unwrap().push(request.clone());
        self.cancel_tokens.lock().unwrap().push(cancel.clone());
        if !sleep_unless_cancelled(self.delay, &cancel).await {
            return Err(ChatError::Cancelled);
        }
        let send = |text: &str| {
            let deltas = deltas.clone();
            let text = text.to_string();
            async move {
                if let Some(deltas) = deltas {
                    let _ = deltas.send(text).await;
                }
            }
        };
        match &self.behaviour {
            Behaviour::Echo => {
                let last = request.messages.last().map(|m| m.content.clone()).unwrap_or_default();
                let content = format!("echo: {last}");
                for piece in content.split_inclusive(' ') {
                    send(piece).await;
                }
                Ok(self.outcome(content))
            }
            Behaviour::StreamThenHang => {
                send("first ").await;
                wait_for_cancel(&cancel).await;
                Err(ChatError::Cancelled)
            }
            Behaviour::Hang => {
                wait_for_cancel(&cancel).await;
                Err(ChatError::Cancelled)
            }
            Behaviour::Fail(error) => Err(error.clone()),
            Behaviour::FailAfterText(error) => {
                send("partial ").await;
                Err(error.clone())
            }
        }
    }
}

async fn wait_for_cancel(cancel: &CancelToken) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sleeps `duration`; false when cancelled first.
async fn sleep_unless_cancelled(duration: Duration, cancel: &CancelToken) -> bool {
    let deadline = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < deadline {
        if cancel.is_cancelled() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5).min(duration)).await;
    }
    true
}

impl ChatBackend for FakeBackend {
    fn model_info(&self) -> ModelInfo {
        ModelInfo {
            id: MODEL_ID.to_string(),
            version: "1.2.3".to_string(),
            provider: "cpu".to_string(),
            ort_version: "1.22.0".to_string(),
            context_length: Some(2048),
        }
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            budget: BudgetSnapshot {
                local: 7,
                cloud: 3,
                pending: 0,
                cloud_share: 0.3,
                cloud_fraction: 0.3,
                calls_available: 2,
                calls_last_hour: 3,
                tokens_last_day: 900,
                window_secs: 3600,
            },
            spool_events: 7,
            spool_dropped: 2,
            offload_enabled: true,
            update: None,
        }
    }

    fn chat(
        &self,
        request: ChatRequest,
        deltas: Option<mpsc::Sender<String>>,
        cancel: CancelToken,
    ) -> BoxFuture<'_, Result<ChatOutcome, ChatError>> {
        async move {
            let result = self.answer(request, deltas, cancel).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            result
        }
        .boxed()
    }
}

pub fn settings() -> ApiSettings {
    ApiSettings {
        api_token: None,
        max_body_bytes: 64 * 1024,
        max_queue: 16,
        request_timeout: Duration::from_secs(30),
        generation: GenerationDefaults::default(),
        device_id: "test-device".to_string(),
    }
}

/// The API on 127.0.0.1:0 over a fake backend.
pub struct TestServer {
    pub addr: SocketAddr,
    pub backend: Arc<FakeBackend>,
    pub shutdown: Shutdown,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(backend: FakeBackend) -> Self {
        Self::start_with(backend, settings()).await
    }

    pub async fn start_with(backend: FakeBackend, settings: ApiSettings) -> Self {
        let backend = Arc::new(backend);
        let shutdown = Shutdown::new();
        let state = ApiState::new(Arc::clone(&backend) as Arc<dyn ChatBackend>, settings, shutdown.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let graceful = {
            let shutdown = shutdown.clone();
            async move { shutdown.begun().await }
        };
        tokio::spawn(async move {
            axum::serve(listener, tandemd::api::router(state)).with_graceful_shutdown(graceful).await
        });
        Self { addr, backend, shutdown, client: client() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn chat(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/v1/chat/completions")).json(body).send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Fails the test unless a simple request is still answered.
    pub async fn assert_still_serving(&self) {
        let response = self.chat(&hello()).await;
        assert_eq!(response.status(), 200, "the server stopped serving");
    }

    /// Waits until `n` requests reached the backend.
    pub async fn wait_for_requests(&self, n: usize) {
        eventually(|| self.backend.request_count() >= n, "requests to reach the backend").await;
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

/// A valid request.
pub fn hello() -> Value {
    json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hello there"}]})
}

/// Polls `condition` for up to 5 s.
pub async fn eventually(mut condition: impl FnMut() -> bool, what: &str) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Checks the OpenAI-style error body and returns it.
pub async fn error_body(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error["type"].is_string() && error["code"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "param is always present (null when none): {body}");
    body
}

/// The `data:` payloads of a server-sent event stream.
pub async fn sse_data(response: reqwest::Response) -> Vec<String> {
    let mut text = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    text.split("\n\n")
        .filter_map(|event| {
            event.lines().find_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
        })
        .map(str::to_string)
        .collect()
}

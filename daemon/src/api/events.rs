//! One struct per notable event of the local API. Emitting an event writes its log line (with
//! structured fields) and bumps its metrics in the same place, so logs and metrics never drift.

use std::time::Duration;

use super::error::{ApiError, CLIENT_CLOSED_REQUEST};
use super::metrics::{ApiMetrics, NO_ROUTE};
use crate::chat::ChatOutcome;

/// A chat request was answered.
#[derive(Debug)]
pub struct ChatAnswered<'a> {
    pub id: &'a str,
    pub outcome: &'a ChatOutcome,
    pub stream: bool,
    pub elapsed: Duration,
}

impl ChatAnswered<'_> {
    pub fn emit(&self, metrics: &ApiMetrics) {
        let route = self.outcome.route.as_str();
        tracing::info!(
            id = self.id,
            route,
            stream = self.stream,
            finish = self.outcome.finish.as_str(),
            prompt_tokens = self.outcome.prompt_tokens,
            completion_tokens = self.outcome.completion_tokens,
            help_probability = self.outcome.help_probability,
            fallback_reason = self.outcome.fallback_reason.as_deref(),
            local_ms = self.outcome.local_ms,
            cloud_ms = self.outcome.cloud_ms,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "chat request answered"
        );
        metrics.count_request(route, 200);
        metrics.observe_answer(
            route,
            self.elapsed,
            self.outcome.prompt_tokens,
            self.outcome.completion_tokens,
        );
    }
}

/// A chat request was refused or failed with an error response (or error event when streaming).
#[derive(Debug)]
pub struct ChatFailed<'a> {
    pub id: Option<&'a str>,
    pub error: &'a ApiError,
    pub stream: bool,
    pub elapsed: Duration,
}

impl ChatFailed<'_> {
    pub fn emit(&self, metrics: &ApiMetrics) {
        let status = self.error.status().as_u16();
        let elapsed_ms = self.elapsed.as_millis() as u64;
        if self.error.status().is_server_error() {
            tracing::warn!(
                id = self.id,
                status,
                code = self.error.code(),
                stream = self.stream,
                elapsed_ms,
                "chat request failed: {}",
                self.error.message()
            );
        } else {
            tracing::info!(
                id = self.id,
                status,
                code = self.error.code(),
                stream = self.stream,
                elapsed_ms,
                "chat request refused: {}",
                self.error.message()
            );
        }
        metrics.count_request(NO_ROUTE, status);
    }
}

/// A chat request was refused because `server.max_queue` requests were admitted already.
#[derive(Debug)]
pub struct QueueFull {
    pub max_queue: usize,
}

impl QueueFull {
    pub fn emit(&self, metrics: &ApiMetrics) {
        tracing::warn!(max_queue = self.max_queue, "chat request refused: the admission queue is full");
        metrics.count_request(NO_ROUTE, 429);
    }
}

/// The client went away before its answer was complete; the generation was cancelled.
#[derive(Debug)]
pub struct ClientDisconnected<'a> {
    pub id: &'a str,
    pub stream: bool,
    pub elapsed: Duration,
}

impl ClientDisconnected<'_> {
    pub fn emit(&self, metrics: &ApiMetrics) {
        tracing::info!(
            id = self.id,
            stream = self.stream,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "client disconnected; generation cancelled"
        );
        metrics.count_request(NO_ROUTE, CLIENT_CLOSED_REQUEST);
    }
}

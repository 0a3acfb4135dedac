//! Streaming answers (`stream: true`) as server-sent events.
//!
//! The route is only known at the end (the model decides at the end of its reasoning), so the
//! `x-tandem-route` header is `pending` and the final chunk, the one with `finish_reason`, carries
//! the `tandem` object. The response is held back until the first text or the outcome exists, so a
//! request that fails before producing anything gets an ordinary HTTP error; a failure after that is
//! sent as a `data: {"error": …}` event followed by `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinHandle;

use super::ROUTE_HEADER;
use super::chat_completions::backend_result;
use super::chat_response::{ChatCompletionChunk, CompletionMeta};
use super::disconnect_guard::DisconnectGuard;
use super::error::ApiError;
use super::events::{ChatAnswered, ChatFailed};
use super::state::ApiState;
use crate::chat::{ChatError, ChatOutcome, ChatRequest};
use crate::engine::CancelToken;

/// Text pieces buffered between the backend and the connection.
const DELTA_BUFFER: usize = 64;

/// The `x-tandem-route` value of streaming responses.
pub const PENDING_ROUTE: &str = "pending";

/// Answers `chat` as server-sent events.
pub(crate) async fn stream_answer(
    state: ApiState,
    meta: CompletionMeta,
    chat: ChatRequest,
    include_usage: bool,
    permit: OwnedSemaphorePermit,
    started: Instant,
) -> Response {
    let cancel = CancelToken::default();
    let guard = DisconnectGuard::new(state.clone(), meta.id.clone(), cancel.clone(), true, started);
    let (delta_sender, deltas) = mpsc::channel(DELTA_BUFFER);
    let task = state.spawn_chat(chat, Some(delta_sender), cancel, permit);
    let deadline = tokio::time::Instant::now() + state.settings().request_timeout;
    let mut stream = ChatStream {
        state,
        meta,
        task: Some(task),
        deltas: Some(deltas),
        deadline,
        guard,
        include_usage,
        started,
        streamed: String::new(),
        pending: VecDeque::new(),
        done: false,
    };

    match stream.next_step().await {
        Step::Failed(error) => {
            stream.guard.disarm();
            ChatFailed { id: Some(&stream.meta.id), error: &error, stream: true, elapsed: started.elapsed() }
                .emit(stream.state.metrics());
            return error.into_response();
        }
        step => {
            stream.pending.push_back(json_event(&ChatCompletionChunk::role(&stream.meta)));
            stream.apply(step);
        }
    }
    let events = futures::stream::unfold(stream, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok::<Event, Infallible>(event), stream))
    });
    let mut response = Sse::new(events).keep_alive(KeepAlive::default()).into_response();
    response.headers_mut().insert(ROUTE_HEADER, HeaderValue::from_static(PENDING_ROUTE));
    response
}

/// What happened next in the backend.
enum Step {
    /// More text.
    Delta(String),
    /// The answer is complete.
    Answered(ChatOutcome),
    /// The request failed (or timed out).
    Failed(ApiError),
}

/// The state of one streaming answer; dropping it before the end (the client went away) cancels
/// the generation through its guard.
struct ChatStream {
    state: ApiState,
    meta: CompletionMeta,
    task: Option<JoinHandle<Result<ChatOutcome, ChatError>>>,
    deltas: Option<mpsc::Receiver<String>>,
    deadline: tokio::time::Instant,
    guard: DisconnectGuard,
    include_usage: bool,
    started: Instant,
    /// Text sent so far.
    streamed: String,
    /// Events ready to send.
    pending: VecDeque<Event>,
    /// The outcome was turned into events; nothing follows them.
    done: bool,
}

/// One thing that can happen while waiting.
enum Wake {
    Delta(Option<String>),
    Joined(Result<Result<ChatOutcome, ChatError>, tokio::task::JoinError>),
    TimedOut,
}

impl ChatStream {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            let step = self.next_step().await;
            self.apply(step);
        }
    }

    async fn next_step(&mut self) -> Step {
        loop {
            let Some(task) = self.task.as_mut() else {
                return Step::Failed(ApiError::internal("the chat stream ended twice"));
            };
            // Text first: everything the backend sent is forwarded before its outcome.
            let wake = tokio::select! {
                biased;
                delta = next_delta(self.deltas.as_mut()) => Wake::Delta(delta),
                joined = task => Wake::Joined(joined),
                () = tokio::time::sleep_until(self.deadline) => Wake::TimedOut,
            };
            match wake {
                Wake::Delta(Some(text)) if text.is_empty() => {}
                Wake::Delta(Some(text)) => return Step::Delta(text),
                Wake::Delta(None) => self.deltas = None,
                Wake::Joined(joined) => {
                    self.task = None;
                    self.deltas = None;
                    return match backend_result(&self.state, joined) {
                        Ok(outcome) => Step::Answered(outcome),
                        Err(error) => Step::Failed(error),
                    };
                }
                Wake::TimedOut => {
                    self.task = None;
                    self.deltas = None;
                    self.guard.cancel_now();
                    return Step::Failed(ApiError::timeout(self.state.settings().request_timeout.as_secs()));
                }
            }
        }
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Delta(text) => {
                self.pending.push_back(json_event(&ChatCompletionChunk::content(&self.meta, &text)));
                self.streamed.push_str(&text);
            }
            Step::Answered(outcome) => {
                // Whatever the backend did not stream is sent now (all of it, for a backend that
                // streams nothing).
                match outcome.content.strip_prefix(self.streamed.as_str()) {
                    Some("") => {}
                    Some(rest) => {
                        self.pending.push_back(json_event(&ChatCompletionChunk::content(&self.meta, rest)));
                    }
                    None => tracing::warn!(
                        id = self.meta.id,
                        "the streamed text is not a prefix of the final answer; the rest was not sent"
                    ),
                }
                self.pending.push_back(json_event(&ChatCompletionChunk::finish(&self.meta, &outcome)));
                if self.include_usage {
                    self.pending.push_back(json_event(&ChatCompletionChunk::usage(&self.meta, &outcome)));
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.guard.disarm();
                self.done = true;
                ChatAnswered {
                    id: &self.meta.id,
                    outcome: &outcome,
                    stream: true,
                    elapsed: self.started.elapsed(),
                }
                .emit(self.state.metrics());
            }
            Step::Failed(error) => {
                self.pending.push_back(json_event(&error.body()));
                self.pending.push_back(Event::default().data("[DONE]"));
                self.guard.disarm();
                self.done = true;
                ChatFailed {
                    id: Some(&self.meta.id),
                    error: &error,
                    stream: true,
                    elapsed: self.started.elapsed(),
                }
                .emit(self.state.metrics());
            }
        }
    }
}

/// The next text piece; never resolves once the backend closed its end.
async fn next_delta(deltas: Option<&mut mpsc::Receiver<String>>) -> Option<String> {
    match deltas {
        Some(deltas) => deltas.recv().await,
        None => std::future::pending().await,
    }
}

fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(error) => {
            let error = ApiError::internal(format!("could not encode a chunk: {error}"));
            Event::default().data(serde_json::to_string(&error.body()).unwrap_or_default())
        }
    }
}

//! One chat request from prompt to answer: generate locally (stopping as soon as the help marker
//! begins), and on a help request reserve budget, offload, and settle; otherwise, or when the
//! cloud cannot be used, answer locally. Every request ends in one telemetry event.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use tandem_core::generation::{Decoding, SamplingParams};
use tandem_core::help_marker::{HELP_OPEN_TAG, HelpMarker};
use tandem_core::protocol::{
    OffloadRequest, PROTOCOL_VERSION, Route, TelemetryBudget, TelemetryEvent, TokenCounts,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::budget_store::{BudgetStore, now_ms};
use super::engine_worker::{LocalGeneration, Prompt};
use super::serving_model::{LiveModel, ServingModel};
use crate::chat::{BackendStatus, ChatBackend, ChatError, ChatOutcome, ChatRequest, FinishKind, ModelInfo};
use crate::engine::{CancelToken, EngineError, FinishReason, GenerationParams};
use crate::offload::{CloudAnswer, OffloadError};
use crate::updater::UpdateTracker;

/// Asks the cloud (the offload client with its transports, retries and breakers).
pub trait CloudOffload: Send + Sync {
    /// One offload, every retry and failover included.
    fn ask(&self, request: OffloadRequest) -> BoxFuture<'_, Result<CloudAnswer, OffloadError>>;
}

/// Where telemetry events go (the spool).
pub trait EventSink: Send + Sync {
    /// Records one event; resolves once it is in the spool (durable per the fsync policy), so an
    /// answered request is never missing from telemetry.
    fn record(&self, event: TelemetryEvent) -> BoxFuture<'_, ()>;
    /// Events waiting and events dropped so far, for status and metrics.
    fn depth(&self) -> (u64, u64);
}

/// The router's settings, taken from the daemon configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    /// This device.
    pub device_id: String,
    /// Completion tokens when the request names none.
    pub default_max_tokens: u32,
    /// Sampling temperature when the request names none; greedy when `None`.
    pub default_temperature: Option<f32>,
    /// Added to the logit of the help marker's opening token.
    pub help_bias: f32,
    /// Send the device's attempt along with the query.
    pub send_local_attempt: bool,
    /// How long the device waits for the whole offload, ms.
    pub offload_deadline_ms: u64,
    /// Put prompts and answers into telemetry events.
    pub telemetry_text: bool,
    /// Keep the device's text before the marker in a cloud-assisted answer (and stream it live).
    pub include_local_attempt: bool,
}

/// Answers chat requests; see the module documentation.
pub struct Router {
    settings: RouterSettings,
    model: Arc<LiveModel>,
    budget: Arc<BudgetStore>,
    cloud: Option<Arc<dyn CloudOffload>>,
    telemetry: Option<Arc<dyn EventSink>>,
    updates: Option<Arc<UpdateTracker>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("settings", &self.settings).finish()
    }
}

/// What happened to a help request.
struct Settled {
    route: Route,
    cloud: Option<CloudAnswer>,
    fallback_reason: Option<String>,
}

impl Router {
    /// A router over a loaded model; the model may be swapped while serving (see [`LiveModel`]).
    pub fn new(
        settings: RouterSettings,
        model: Arc<LiveModel>,
        budget: Arc<BudgetStore>,
        cloud: Option<Arc<dyn CloudOffload>>,
        telemetry: Option<Arc<dyn EventSink>>,
    ) -> Self {
        if model.current().worker().loaded().help_token.is_none() {
            tracing::warn!(
                tag = HELP_OPEN_TAG,
                "the tokenizer has no single token for the help marker's opening tag: help requests are still \
                 detected in the text, but the decision probability, the help bias and forbidding the marker \
                 on fallback are unavailable"
            );
        }
        Self { settings, model, budget, cloud, telemetry, updates: None }
    }

    /// Reports `tracker`'s update state in [`ChatBackend::status`].
    pub fn with_update_tracker(mut self, tracker: Arc<UpdateTracker>) -> Self {
        self.updates = Some(tracker);
        self
    }

    /// The model served, which the updater swaps.
    pub fn live_model(&self) -> &Arc<LiveModel> {
        &self.model
    }

    /// The budget store (for shutdown).
    pub fn budget(&self) -> &Arc<BudgetStore> {
        &self.budget
    }

    fn generation_params(
        &self,
        model: &ServingModel,
        request: &ChatRequest,
        cancel: &CancelToken,
    ) -> Result<GenerationParams, ChatError> {
        let max_new_tokens = request.max_tokens.unwrap_or(self.settings.default_max_tokens) as usize;
        if max_new_tokens == 0 {
            return Err(ChatError::Invalid("max_tokens must be at least 1".into()));
        }
        let decoding = match request.temperature.or(self.settings.default_temperature) {
            None | Some(0.0) => Decoding::Greedy,
            Some(temperature) => Decoding::Sample(SamplingParams {
                temperature,
                top_k: request.top_k.unwrap_or(0) as usize,
                top_p: request.top_p.unwrap_or(1.0),
                seed: request.seed.unwrap_or_else(now_ms),
            }),
        };
        decoding.validate().map_err(|e| ChatError::Invalid(e.to_string()))?;
        let help = model.worker().loaded().help_token;
        let mut stop_strings = request.stop.clone();
        stop_strings.push(HELP_OPEN_TAG.to_string());
        Ok(GenerationParams {
            max_new_tokens,
            decoding,
            stop_strings,
            watch_token_ids: help.into_iter().collect(),
            logit_bias: help
                .filter(|_| self.settings.help_bias != 0.0)
                .map(|t| (t, self.settings.help_bias))
                .into_iter()
                .collect(),
            cancel: Some(cancel.clone()),
            ..GenerationParams::greedy(max_new_tokens)
        })
    }

    async fn generate(
        &self,
        model: &ServingModel,
        prompt: Prompt,
        params: GenerationParams,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<LocalGeneration, ChatError> {
        let local = model.worker().generate(prompt, params, deltas.cloned()).await.map_err(engine_error)?;
        if local.generation.finish_reason == FinishReason::Cancelled {
            return Err(ChatError::Cancelled);
        }
        Ok(local)
    }

    async fn answer(
        &self,
        request: ChatRequest,
        deltas: Option<mpsc::Sender<String>>,
        cancel: CancelToken,
    ) -> Result<ChatOutcome, ChatError> {
        let arrived_ms = now_ms();
        let started = Instant::now();
        // The whole request runs on the model served now, even if an update swaps it meanwhile.
        let model = self.model.current();
        let prompt =
            model.template().render(&request.messages).map_err(|e| ChatError::Invalid(e.to_string()))?;
        let params = self.generation_params(&model, &request, &cancel)?;
        let live = if self.settings.include_local_attempt { deltas.as_ref() } else { None };
        let first = self.generate(&model, Prompt::Text(prompt), params.clone(), live).await?;
        let held_back = live.is_none();
        let help_probability = first.generation.decision.map(|d| d.probability);
        let asked_for_help = HelpMarker::opening_in(&first.raw_text).is_some();
        // Not trimmed: the content must start with exactly what was streamed.
        let local_text = first.generation.text.clone();

        let mut offload_ms = 0;
        let mut prompt_tokens = first.prompt_ids.len() as u32;
        let mut completion_tokens = first.generation.ids.len() as u32;
        let (settled, content, finish) = if !asked_for_help {
            if held_back {
                send(&deltas, &local_text).await;
            }
            self.record_local();
            let settled = Settled { route: Route::Local, cloud: None, fallback_reason: None };
            (settled, local_text.clone(), finish_kind(first.generation.finish_reason))
        } else {
            let offload_started = Instant::now();
            let settled =
                self.offload(&model, &request, &local_text, params.max_new_tokens as u32, &cancel).await;
            offload_ms = offload_started.elapsed().as_millis() as u64;
            match &settled.cloud {
                Some(answer) => {
                    let kept = if self.settings.include_local_attempt { local_text.as_str() } else { "" };
                    let separator = if kept.trim().is_empty() { "" } else { "\n\n" };
                    send(&deltas, &format!("{separator}{}", answer.content)).await;
                    prompt_tokens += answer.prompt_tokens;
                    completion_tokens += answer.completion_tokens;
                    let content = format!("{kept}{separator}{}", answer.content);
                    (settled_clone(&settled), content, FinishKind::Stop)
                }
                None => {
                    let (kept_ids, kept_text) = kept_before_marker(&model, &first);
                    if held_back {
                        send(&deltas, kept_text).await;
                    }
                    let resumed =
                        self.answer_locally(&model, &first, kept_ids, &params, deltas.as_ref()).await?;
                    completion_tokens += resumed.generation.ids.len() as u32;
                    let finish = finish_kind(resumed.generation.finish_reason);
                    (settled_clone(&settled), format!("{kept_text}{}", resumed.generation.text), finish)
                }
            }
        };
        // Time on the device is everything except waiting for the cloud (answered or not).
        let cloud_ms = offload_ms;
        let local_ms = (started.elapsed().as_millis() as u64).saturating_sub(offload_ms);
        let outcome = ChatOutcome {
            route: settled.route,
            content,
            finish,
            prompt_tokens,
            completion_tokens,
            help_probability,
            cloud_model: settled.cloud.as_ref().map(|a| a.model.clone()),
            fallback_reason: settled.fallback_reason.clone(),
            local_ms,
            cloud_ms,
            event_id: None,
        };
        let event_id = self
            .emit_telemetry(&model, arrived_ms, &request, &first, &settled, &outcome, asked_for_help)
            .await;
        Ok(ChatOutcome { event_id, ..outcome })
    }

    /// Continues the local answer after `kept` with the help marker forbidden.
    async fn answer_locally(
        &self,
        model: &ServingModel,
        first: &LocalGeneration,
        kept: &[u32],
        params: &GenerationParams,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<LocalGeneration, ChatError> {
        let help = model.worker().loaded().help_token;
        let mut prompt = first.prompt_ids.clone();
        prompt.extend_from_slice(kept);
        let remaining = params.max_new_tokens.saturating_sub(kept.len()).max(1);
        let resumed = GenerationParams {
            max_new_tokens: remaining,
            banned_token_ids: help.into_iter().collect(),
            logit_bias: Vec::new(),
            watch_token_ids: Vec::new(),
            ..params.clone()
        };
        self.generate(model, Prompt::Ids(prompt), resumed, deltas).await
    }

    async fn offload(
        &self,
        model: &ServingModel,
        request: &ChatRequest,
        local_text: &str,
        max_tokens: u32,
        cancel: &CancelToken,
    ) -> Settled {
        let fallback = |reason: &str| Settled {
            route: Route::LocalFallback,
            cloud: None,
            fallback_reason: Some(reason.into()),
        };
        let Some(cloud) = &self.cloud else {
            self.record_local();
            return fallback("offload_disabled");
        };
        let estimated =
            u64::from(max_tokens) + request.messages.iter().map(|m| m.content.len() as u64 / 3).sum::<u64>();
        let reservation = match self.budget.reserve(estimated) {
            Ok(Ok(reservation)) => reservation,
            Ok(Err(refusal)) => {
                tracing::info!(reason = %refusal, "help request answered on the device: budget");
                self.record_local();
                return fallback(&format!("budget_{}", refusal.class()));
            }
            Err(e) => {
                tracing::error!(error = %e, "budget state could not be written; not offloading");
                return fallback("budget_store");
            }
        };
        let offload_request = OffloadRequest {
            v: PROTOCOL_VERSION,
            request_id: Uuid::now_v7(),
            device_id: self.settings.device_id.clone(),
            model_version: model.version(),
            messages: request.messages.clone(),
            max_tokens,
            temperature: request.temperature,
            local_attempt: self.settings.send_local_attempt.then(|| local_text.to_string()),
            deadline_ms: now_ms() + self.settings.offload_deadline_ms,
        };
        let result = tokio::select! {
            result = cloud.ask(offload_request) => result,
            () = wait_cancelled(cancel) => Err(OffloadError::Unreachable("the client went away".into())),
        };
        match result {
            Ok(answer) => {
                let tokens = u64::from(answer.prompt_tokens + answer.completion_tokens);
                self.budget.commit(reservation, tokens);
                Settled { route: Route::Cloud, cloud: Some(answer), fallback_reason: None }
            }
            Err(e) => {
                tracing::warn!(error = %e, class = e.class(), "offload failed; answering on the device");
                self.budget.release(reservation);
                fallback(e.class())
            }
        }
    }

    fn record_local(&self) {
        self.budget.record_local();
    }

    #[allow(clippy::too_many_arguments)]
    async fn emit_telemetry(
        &self,
        model: &ServingModel,
        arrived_ms: u64,
        request: &ChatRequest,
        first: &LocalGeneration,
        settled: &Settled,
        outcome: &ChatOutcome,
        asked_for_help: bool,
    ) -> Option<Uuid> {
        let sink = self.telemetry.as_ref()?;
        let id = Uuid::now_v7();
        let budget = self.budget.snapshot();
        let with_text = self.settings.telemetry_text;
        let cloud = settled.cloud.as_ref();
        sink.record(TelemetryEvent {
            id,
            device_id: self.settings.device_id.clone(),
            model_version: model.version(),
            at_ms: arrived_ms,
            route: outcome.route,
            help_requested: asked_for_help,
            help_probability: outcome.help_probability,
            local_tokens: TokenCounts {
                prompt: first.prompt_ids.len() as u32,
                completion: outcome.completion_tokens - cloud.map_or(0, |a| a.completion_tokens),
            },
            local_latency_ms: outcome.local_ms as u32,
            cloud_tokens: cloud.map_or_else(TokenCounts::default, |a| TokenCounts {
                prompt: a.prompt_tokens,
                completion: a.completion_tokens,
            }),
            cloud_latency_ms: outcome.cloud_ms as u32,
            transport: cloud.map(|a| a.transport),
            budget: TelemetryBudget {
                cloud_share: budget.cloud_share,
                calls_available: budget.calls_available,
            },
            error_class: settled.fallback_reason.clone(),
            prompt: with_text.then(|| request.messages.last().map(|m| m.content.clone()).unwrap_or_default()),
            local_answer: with_text.then(|| first.generation.text.clone()),
            cloud_answer: if with_text { cloud.map(|a| a.content.clone()) } else { None },
        })
        .await;
        Some(id)
    }
}

/// The part of the first attempt a local answer keeps: everything before the help token, or
/// nothing when the tokenizer has no single help token (the answer is then regenerated).
fn kept_before_marker<'a>(model: &ServingModel, first: &'a LocalGeneration) -> (&'a [u32], &'a str) {
    match first.generation.decision {
        Some(decision) if decision.chosen && model.worker().loaded().help_token.is_some() => {
            (&first.generation.ids[..decision.step], first.generation.text.as_str())
        }
        _ => (&[], ""),
    }
}

fn settled_clone(s: &Settled) -> Settled {
    Settled { route: s.route, cloud: s.cloud.clone(), fallback_reason: s.fallback_reason.clone() }
}

async fn send(deltas: &Option<mpsc::Sender<String>>, text: &str) {
    if let Some(deltas) = deltas
        && !text.is_empty()
    {
        let _ = deltas.send(text.to_string()).await;
    }
}

async fn wait_cancelled(cancel: &CancelToken) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn finish_kind(reason: FinishReason) -> FinishKind {
    match reason {
        FinishReason::Length => FinishKind::Length,
        _ => FinishKind::Stop,
    }
}

fn engine_error(e: EngineError) -> ChatError {
    if e.is_user_error() { ChatError::Invalid(e.to_string()) } else { ChatError::Internal(e.to_string()) }
}

impl ChatBackend for Router {
    fn model_info(&self) -> ModelInfo {
        let model = self.model.current();
        let loaded = model.worker().loaded();
        ModelInfo {
            id: loaded.model.name.clone(),
            version: model.version(),
            provider: loaded.provider.clone(),
            ort_version: loaded.ort_version.clone(),
            context_length: loaded.model.context_length,
        }
    }

    fn status(&self) -> BackendStatus {
        let (spool_events, spool_dropped) = self.telemetry.as_ref().map_or((0, 0), |t| t.depth());
        BackendStatus {
            budget: self.budget.snapshot(),
            spool_events,
            spool_dropped,
            offload_enabled: self.cloud.is_some(),
            update: self.updates.as_ref().map(|t| t.snapshot()),
        }
    }

    fn chat(
        &self,
        request: ChatRequest,
        deltas: Option<mpsc::Sender<String>>,
        cancel: CancelToken,
    ) -> BoxFuture<'_, Result<ChatOutcome, ChatError>> {
        Box::pin(self.answer(request, deltas, cancel))
    }
}

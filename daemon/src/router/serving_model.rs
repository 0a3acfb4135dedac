//! The model the router serves — an engine worker and its model's chat template — and how it is
//! replaced while serving. Each request takes the current model once, when it starts, and finishes
//! on it; [`LiveModel::swap`] only changes what later requests take. The replaced worker's thread
//! ends when the last request holding it is done (its job channel closes with the last handle).

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tandem_core::protocol::ChatMessage;

use super::chat_template::{ChatTemplate, TemplateError};
use super::engine_worker::{EngineWorker, Prompt};
use crate::engine::{EngineConfig, EngineError, GenerationParams};

/// A loaded model, ready to answer.
#[derive(Debug)]
pub struct ServingModel {
    worker: EngineWorker,
    template: ChatTemplate,
}

/// Why a model could not be loaded or did not pass its probe.
#[derive(Debug, thiserror::Error)]
pub enum ServingModelError {
    /// The engine could not load the model.
    #[error("the model does not load: {0}")]
    Load(#[source] EngineError),
    /// The model's chat template does not compile.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The probe's generation failed.
    #[error("the probe generation failed: {0}")]
    Probe(#[source] EngineError),
    /// The probe generated nothing.
    #[error("the probe generated no tokens")]
    ProbeEmpty,
    /// The probe did not finish in time.
    #[error("the probe did not finish within {0:?}")]
    ProbeTimeout(Duration),
}

impl ServingModel {
    /// A model over a started worker and its template.
    pub fn new(worker: EngineWorker, template: ChatTemplate) -> Self {
        Self { worker, template }
    }

    /// Loads `model_dir` on a new engine thread and compiles its chat template. Blocks while the
    /// model loads: call it from a blocking task.
    pub fn load(model_dir: &Path, config: &EngineConfig) -> Result<Self, ServingModelError> {
        let worker = EngineWorker::start(model_dir, config).map_err(ServingModelError::Load)?;
        let template = ChatTemplate::new(worker.loaded().model.chat_template.as_deref())?;
        Ok(Self { worker, template })
    }

    /// The engine worker.
    pub fn worker(&self) -> &EngineWorker {
        &self.worker
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The model's version, `unversioned` when its directory names none.
    pub fn version(&self) -> String {
        self.worker.loaded().model.version.clone().unwrap_or_else(|| "unversioned".into())
    }

    /// Answers `prompt` as a user message with at most `max_tokens` greedy tokens within `timeout`;
    /// passes when the generation succeeds and produces at least one token. Returns the tokens made.
    pub async fn probe(
        &self,
        prompt: &str,
        max_tokens: usize,
        timeout: Duration,
    ) -> Result<usize, ServingModelError> {
        let message = ChatMessage { role: "user".into(), content: prompt.into() };
        let text = self.template.render(std::slice::from_ref(&message))?;
        let params = GenerationParams::greedy(max_tokens.max(1));
        let generation =
            tokio::time::timeout(timeout, self.worker.generate(Prompt::Text(text), params, None))
                .await
                .map_err(|_| ServingModelError::ProbeTimeout(timeout))?
                .map_err(ServingModelError::Probe)?;
        match generation.generation.ids.len() {
            0 => Err(ServingModelError::ProbeEmpty),
            tokens => Ok(tokens),
        }
    }
}

/// The model requests are answered with now; replaced atomically by [`LiveModel::swap`].
#[derive(Debug)]
pub struct LiveModel {
    current: RwLock<Arc<ServingModel>>,
}

impl LiveModel {
    /// Serving `model`.
    pub fn new(model: ServingModel) -> Self {
        Self { current: RwLock::new(Arc::new(model)) }
    }

    /// The model to answer one request with, start to end.
    pub fn current(&self) -> Arc<ServingModel> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Serves `next` from now on and returns the model served so far; requests that took it keep it
    /// until they end.
    pub fn swap(&self, next: ServingModel) -> Arc<ServingModel> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, Arc::new(next))
    }
}

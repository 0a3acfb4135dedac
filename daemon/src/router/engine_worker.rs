//! The engine on its own thread: ONNX Runtime runs there, never on the async runtime. Requests
//! arrive over a channel and are served one at a time (the engine has one KV cache).

use std::path::Path;
use std::sync::mpsc as std_mpsc;

use tandem_core::help_marker::HELP_OPEN_TAG;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, EngineConfig, EngineError, Generation, GenerationParams, ModelDir};

/// Facts about the loaded model that the router needs without asking the thread.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The model directory's metadata.
    pub model: ModelDir,
    /// Execution provider in use.
    pub provider: String,
    /// ONNX Runtime version.
    pub ort_version: String,
    /// The help marker's opening tag as a single token, when the tokenizer has it as one.
    pub help_token: Option<u32>,
}

/// A finished local generation.
#[derive(Debug, Clone)]
pub struct LocalGeneration {
    /// What the engine returned.
    pub generation: Generation,
    /// Token ids of the prompt.
    pub prompt_ids: Vec<u32>,
    /// The decoded text of every generated token, special tokens and stop strings included.
    pub raw_text: String,
}

/// What the prompt of a job is.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text, tokenized on the engine thread.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

struct Job {
    prompt: Prompt,
    params: GenerationParams,
    deltas: Option<mpsc::Sender<String>>,
    reply: oneshot::Sender<Result<LocalGeneration, EngineError>>,
}

/// Handle to the engine thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineWorker {
    jobs: std_mpsc::Sender<Job>,
    loaded: LoadedModel,
}

impl EngineWorker {
    /// Loads the model on a new thread and returns once it is ready (or failed to load).
    pub fn start(model_dir: &Path, config: &EngineConfig) -> Result<Self, EngineError> {
        let (jobs, receiver) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (model_dir, config) = (model_dir.to_path_buf(), config.clone());
        std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || {
                let mut engine = match Engine::load(&model_dir, &config) {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let help_token = engine.tokenizer().ok().and_then(|t| t.inner().token_to_id(HELP_OPEN_TAG));
                let loaded = LoadedModel {
                    model: engine.model().clone(),
                    provider: engine.provider_report().active.clone(),
                    ort_version: engine.runtime().version().to_string(),
                    help_token,
                };
                if ready_tx.send(Ok(loaded)).is_err() {
                    return;
                }
                while let Ok(job) = receiver.recv() {
                    let result = run_job(&mut engine, job.prompt, &job.params, job.deltas.as_ref());
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| EngineError::Config(format!("could not start the engine thread: {e}")))?;
        let loaded = ready_rx
            .recv()
            .map_err(|_| EngineError::Config("the engine thread stopped while loading".into()))??;
        Ok(Self { jobs, loaded })
    }

    /// The loaded model.
    pub fn loaded(&self) -> &LoadedModel {
        &self.loaded
    }

    /// Generates on the engine thread. Text deltas go to `deltas` as they become final.
    pub async fn generate(
        &self,
        prompt: Prompt,
        params: GenerationParams,
        deltas: Option<mpsc::Sender<String>>,
    ) -> Result<LocalGeneration, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { prompt, params, deltas, reply })
            .map_err(|_| EngineError::Config("the engine thread has stopped".into()))?;
        answer.await.map_err(|_| EngineError::Config("the engine thread stopped during generation".into()))?
    }
}

fn run_job(
    engine: &mut Engine,
    prompt: Prompt,
    params: &GenerationParams,
    deltas: Option<&mpsc::Sender<String>>,
) -> Result<LocalGeneration, EngineError> {
    let prompt_ids = match prompt {
        Prompt::Text(text) => engine.encode(&text)?,
        Prompt::Ids(ids) => ids,
    };
    let mut generations = engine.generate(std::slice::from_ref(&prompt_ids), params, |event| {
        if let Some(deltas) = deltas
            && !event.text_delta.is_empty()
        {
            // The receiver is gone when the client disconnected; the cancel token stops us.
            let _ = deltas.blocking_send(event.text_delta);
        }
    })?;
    let generation =
        generations.pop().ok_or_else(|| EngineError::ModelOutput("no generation was returned".into()))?;
    let raw_text = engine.decode(&generation.ids).unwrap_or_default();
    Ok(LocalGeneration { generation, prompt_ids, raw_text })
}

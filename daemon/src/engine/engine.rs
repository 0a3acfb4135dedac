//! `Engine`: a model directory loaded into ONNX Runtime, ready to generate.
//!
//! Loading goes: find and load ONNX Runtime → recognise the model directory → create the session
//! with the configured providers → check the graph's KV-cache layout → load the tokenizer. Every
//! call runs ONNX Runtime on the calling thread; the daemon gives the engine a thread of its own.

use std::path::Path;
use std::sync::Arc;

use ort::ErrorCode;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

use super::config::{EngineConfig, OptimizationLevel};
use super::decoder_session::{DecoderSession, ForwardInput, KvCache, LogitsScope};
use super::error::EngineError;
use super::generator::{self, Generation, GenerationParams, ModelLimits, StreamEvent, TextDecoder};
use super::io_layout::{IoLayout, LayoutHints, TensorSpec};
use super::logits::Logits;
use super::model_dir::ModelDir;
use super::ort_library::{OrtRuntime, load_ort};
use super::providers::{ProviderReport, needs_layout, register_providers};
use super::tensorrt_profile::TrtProfile;
use super::tokenizer::TextTokenizer;

/// A loaded model.
#[derive(Debug)]
pub struct Engine {
    runtime: Arc<OrtRuntime>,
    model: ModelDir,
    session: DecoderSession,
    tokenizer: Option<TextTokenizer>,
    providers: ProviderReport,
    limits: ModelLimits,
}

impl Engine {
    /// Loads the model in `model_dir` as `config` says.
    pub fn load(model_dir: &Path, config: &EngineConfig) -> Result<Engine, EngineError> {
        let runtime = load_ort(config.ort_library.as_deref())?;
        let model = ModelDir::inspect(model_dir)?;
        // TensorRT engine caches live in a directory keyed by model, runtime, GPU and precision, the
        // same one `tandemd prepare` builds into, so a prepared engine is loaded instead of rebuilt.
        let keyed = super::tensorrt_cache::resolve_cache_dirs(config, &model, &runtime)?;
        let config = &keyed.config;
        tracing::info!(dir = %model.root.display(), format = model.format.name(), "loading model");

        let trt_profile =
            TrtProfile::of_engine(config, model.context_length).map_err(EngineError::TrtProfile)?;
        let probed = if needs_layout(config) { Some(probe_layout(&runtime, &model)?) } else { None };

        let builder = configure_session(runtime.environment(), config)?;
        let (mut builder, providers) = register_providers(builder, config, probed.as_ref())?;
        let session = builder
            .commit_from_file(&model.model_file)
            .map_err(|e| model_load_error(&model.model_file, e))?;
        let layout = layout_of(&session, &model)?;

        let vocab_size = layout.vocab_size.or(model.vocab_size);
        let tokenizer = match &model.tokenizer_file {
            Some(path) => {
                let tokenizer = TextTokenizer::load(path)?;
                if let Some(vocab) = vocab_size {
                    tokenizer.check_vocab(vocab)?;
                }
                Some(tokenizer)
            }
            None => None,
        };
        // TensorRT's explicit profile accepts nothing longer, so requests beyond it are refused up front.
        let context_length = match trt_profile {
            Some(profile) if providers.active == "tensorrt" => {
                Some(model.context_length.map_or(profile.max_tokens, |c| c.min(profile.max_tokens)))
            }
            _ => model.context_length,
        };
        let limits = ModelLimits { eos_token_ids: model.eos_token_ids.clone(), context_length, vocab_size };
        tracing::info!(
            layers = layout.layers,
            kv_heads = layout.kv_heads,
            head_dim = layout.head_dim,
            kv_type = layout.kv_type.onnx_name(),
            position_ids = layout.has_position_ids,
            provider = %providers.active,
            ort = runtime.version(),
            "model loaded"
        );
        let session = DecoderSession::new(session, layout, model.model_file.clone());
        Ok(Engine { runtime, model, session, tokenizer, providers, limits })
    }

    /// Which execution providers were asked for and which one runs the model.
    pub fn provider_report(&self) -> &ProviderReport {
        &self.providers
    }

    /// The loaded ONNX Runtime (library path and version).
    pub fn runtime(&self) -> &OrtRuntime {
        &self.runtime
    }

    /// What the model directory said about the model.
    pub fn model(&self) -> &ModelDir {
        &self.model
    }

    /// The graph's KV-cache layout.
    pub fn layout(&self) -> &IoLayout {
        self.session.layout()
    }

    /// End-of-sequence ids, context length and vocabulary size used to bound generation.
    pub fn limits(&self) -> &ModelLimits {
        &self.limits
    }

    /// The tokenizer, or an error saying the directory has none.
    pub fn tokenizer(&self) -> Result<&TextTokenizer, EngineError> {
        self.tokenizer.as_ref().ok_or_else(|| EngineError::TokenizerMissing { dir: self.model.root.clone() })
    }

    /// Ids of `text` as-is (no chat template, no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer()?.encode(text)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer()?.decode(ids)
    }

    /// Generates for a batch of prompts (left-padded when their lengths differ). `on_event` sees every
    /// token as it is chosen. Rows are returned in the order of `prompts`.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: &GenerationParams,
        mut on_event: impl FnMut(StreamEvent),
    ) -> Result<Vec<Generation>, EngineError> {
        if !params.stop_strings.is_empty() {
            self.tokenizer()?;
        }
        let decoder = self.tokenizer.as_ref().map(|t| t as &dyn TextDecoder);
        let uneven = prompts.windows(2).any(|w| w[0].len() != w[1].len());
        if uneven && !self.session.layout().has_position_ids {
            // Graphs without position_ids (GroupQueryAttention) read padding as right padding, so a
            // left-padded batch would be wrong: run the rows one at a time instead.
            let mut generations = Vec::with_capacity(prompts.len());
            for (row, prompt) in prompts.iter().enumerate() {
                let mut forward_row = |event: StreamEvent| on_event(StreamEvent { row, ..event });
                let params = GenerationParams {
                    decoding: generator::row_decoding(params.decoding, row),
                    ..params.clone()
                };
                let single = std::slice::from_ref(prompt);
                generations.extend(generator::generate(
                    &mut self.session,
                    decoder,
                    &self.limits,
                    single,
                    &params,
                    &mut forward_row,
                )?);
            }
            return Ok(generations);
        }
        let generations =
            generator::generate(&mut self.session, decoder, &self.limits, prompts, params, &mut on_event)?;
        Ok(generations)
    }

    /// Generates for one text prompt, encoded as-is.
    pub fn generate_text(
        &mut self,
        prompt: &str,
        params: &GenerationParams,
        on_event: impl FnMut(StreamEvent),
    ) -> Result<Generation, EngineError> {
        let ids = self.encode(prompt)?;
        let mut generations = self.generate(&[ids], params, on_event)?;
        generations.pop().ok_or_else(|| EngineError::ModelOutput("no generation was returned".to_string()))
    }

    /// An empty KV cache for `batch` rows, for driving [`Engine::forward`] by hand.
    pub fn empty_cache(&self, batch: usize) -> Result<KvCache, EngineError> {
        self.session.empty_cache(batch)
    }

    /// One forward pass on `[batch, seq]` inputs with the given past; returns f32 logits
    /// (`[batch, seq, vocab]` for [`LogitsScope::AllPositions`]) and the extended cache.
    pub fn forward(
        &mut self,
        input: &ForwardInput<'_>,
        past: KvCache,
        scope: LogitsScope,
    ) -> Result<(Logits, KvCache), EngineError> {
        self.session.forward(input, past, scope)
    }

    /// The decoder session, for lower-level access.
    pub fn session(&mut self) -> &mut DecoderSession {
        &mut self.session
    }
}

fn configure_session(
    environment: &ort::environment::Environment,
    config: &EngineConfig,
) -> Result<SessionBuilder, EngineError> {
    // Builder errors carry the builder back for recovery; only the message matters here.
    let failed =
        |action: &'static str| move |e: ort::Error<SessionBuilder>| EngineError::ort(action)(e.into());
    let spinning = if config.allow_spinning { "1" } else { "0" };
    let mut builder = Session::builder(environment)
        .map_err(EngineError::ort("create a session builder"))?
        .with_optimization_level(optimization_level(config.optimization_level))
        .map_err(failed("set the optimization level"))?
        .with_config_entry("session.intra_op.allow_spinning", spinning)
        .map_err(failed("set allow_spinning"))?
        .with_config_entry("session.inter_op.allow_spinning", spinning)
        .map_err(failed("set allow_spinning"))?;
    if config.intra_threads > 0 {
        builder = builder.with_intra_threads(config.intra_threads).map_err(failed("set intra_threads"))?;
    }
    if config.inter_threads > 0 {
        builder = builder.with_inter_threads(config.inter_threads).map_err(failed("set inter_threads"))?;
    }
    Ok(builder)
}

/// `All` (99) rather than `Level3`, which now means layout optimisation and is refused by ONNX
/// Runtime before 1.23.
fn optimization_level(level: OptimizationLevel) -> GraphOptimizationLevel {
    match level {
        OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
        OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
        OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
        OptimizationLevel::All => GraphOptimizationLevel::All,
    }
}

/// The KV-cache layout of `session`'s graph.
fn layout_of(session: &Session, model: &ModelDir) -> Result<IoLayout, EngineError> {
    let inputs: Vec<TensorSpec> = session.inputs().iter().map(TensorSpec::from_outlet).collect();
    let outputs: Vec<TensorSpec> = session.outputs().iter().map(TensorSpec::from_outlet).collect();
    let hints = LayoutHints { head_dim: model.head_dim, kv_heads: model.num_key_value_heads };
    IoLayout::from_signature(&inputs, &outputs, hints)
        .map_err(|problem| EngineError::NotADecoder { path: model.model_file.clone(), problem })
}

/// The layout read from a plain CPU session without graph optimisations, for providers that must
/// name the graph's inputs before the real session exists (TensorRT's explicit profile). The graph
/// and its weights are loaded once more for this, and released before the real session is built.
fn probe_layout(runtime: &OrtRuntime, model: &ModelDir) -> Result<IoLayout, EngineError> {
    let session = Session::builder(runtime.environment())
        .map_err(EngineError::ort("create a session builder"))?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(|e| EngineError::ort("set the optimization level")(e.into()))?
        .commit_from_file(&model.model_file)
        .map_err(|e| model_load_error(&model.model_file, e))?;
    layout_of(&session, model)
}

/// A graph file ONNX Runtime cannot parse is corrupt; other load failures keep ONNX Runtime's words.
fn model_load_error(path: &Path, error: ort::Error) -> EngineError {
    let message = error.message().to_string();
    let unparsable = matches!(error.code(), ErrorCode::InvalidProtobuf)
        || message.contains("Protobuf parsing failed")
        || message.contains("No graph was found in the protobuf");
    if unparsable {
        EngineError::InvalidModel { path: path.to_path_buf(), message }
    } else {
        EngineError::ModelLoad { path: path.to_path_buf(), message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_can_move_to_its_own_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Engine>();
        assert_send::<KvCache>();
    }
}

//! `EngineError`: everything that can go wrong loading a model or generating with it.
//!
//! Every error a user can cause (a wrong path, a model from another exporter, a prompt that does not
//! fit) says what to do about it.

use std::path::PathBuf;

use tandem_core::bundle::ManifestError;
use tandem_core::generation::SamplingError;

use super::tensorrt_profile::TrtProfileError;

/// Errors of the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime (libonnxruntime.so) not found: looked at {}; run `make ort` in the Tandem checkout \
         (it fetches it from the onnxruntime wheel on PyPI into .ort/) and set \
         ORT_DYLIB_PATH=$PWD/.ort/libonnxruntime.so, or set `ort_library` in the config",
        display_paths(looked_at)
    )]
    OrtNotFound { looked_at: Vec<PathBuf> },

    #[error(
        "could not load ONNX Runtime from {}: {message}; it must be libonnxruntime.so 1.17 or newer built \
         for this machine (run `make ort` to fetch a matching one)",
        path.display()
    )]
    OrtLoad { path: PathBuf, message: String },

    #[error("ONNX Runtime could not {action}: {cause}")]
    Ort { action: &'static str, cause: ort::Error },

    #[error("invalid engine configuration: {0}")]
    Config(String),

    #[error("the tensorrt provider's profile (profile_max_tokens, profile_opt_tokens) does not fit: {0}")]
    TrtProfile(TrtProfileError),

    #[error(
        "execution provider `{provider}` was requested but this tandemd was built without GPU support; \
         rebuild with --features gpu"
    )]
    GpuSupportNotBuilt { provider: String },

    #[error(
        "execution provider `{provider}` could not be used: {reason}; check that the loaded \
         libonnxruntime.so is a GPU build with its provider libraries next to it, or drop \
         `strict_providers` to fall back to the next provider"
    )]
    ProviderUnavailable { provider: String, reason: String },

    #[error("model directory {} does not exist or is not a directory", path.display())]
    ModelDirMissing { path: PathBuf },

    #[error(
        "{} not found: it is the decoder graph of this model directory (model.onnx, or the \
         model.decoder.filename of genai_config.json). A model directory holds the graph (plus \
         model.onnx.data for external weights), tokenizer.json, and manifest.json (Tandem bundle), \
         genai_config.json (onnxruntime-genai) or config.json (optimum/torch export)",
        path.display()
    )]
    ModelFileMissing { path: PathBuf },

    #[error("could not read {}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },

    #[error("{}: {cause}", path.display())]
    Manifest { path: PathBuf, cause: ManifestError },

    #[error("{} is not valid: {message}; re-export the model or fix the file", path.display())]
    ModelConfig { path: PathBuf, message: String },

    #[error(
        "{} is not a valid ONNX model ({message}); the file is probably truncated or corrupt: \
         re-export or re-download it",
        path.display()
    )]
    InvalidModel { path: PathBuf, message: String },

    #[error("ONNX Runtime could not load {}: {message}", path.display())]
    ModelLoad { path: PathBuf, message: String },

    #[error(
        "{} is not a KV-cache decoder in the standard layout: {problem}; export it with `tandem-train \
         export` or another exporter that writes input_ids/attention_mask/past_key_values.N.key|value \
         and logits/present.N.key|value",
        path.display()
    )]
    NotADecoder { path: PathBuf, problem: String },

    #[error(
        "{} has no tokenizer.json; add the model's tokenizer.json to the directory, or pass prompt token \
         ids instead of text (and no stop strings)",
        dir.display()
    )]
    TokenizerMissing { dir: PathBuf },

    #[error("could not load the tokenizer {}: {message}; is it a Hugging Face tokenizer.json?", path.display())]
    TokenizerLoad { path: PathBuf, message: String },

    #[error(
        "tokenizer.json has {tokenizer_tokens} tokens but the model's logits have {model_vocab}; they belong \
         to different models: put the model's own tokenizer.json next to it"
    )]
    VocabMismatch { tokenizer_tokens: usize, model_vocab: usize },

    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),

    #[error("prompt {row} is empty; give at least one token")]
    EmptyPrompt { row: usize },

    #[error("no prompts given; give at least one")]
    NoPrompts,

    #[error(
        "prompt token id {id} (prompt {row}) is outside the model's vocabulary of {vocab} tokens; the ids \
         must come from this model's tokenizer"
    )]
    TokenOutOfVocab { row: usize, id: u32, vocab: usize },

    #[error(
        "prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} exceeds the model's context \
         length of {context_length} tokens; shorten the prompt or lower max_new_tokens"
    )]
    ContextOverflow { prompt_tokens: usize, max_new_tokens: usize, context_length: usize },

    #[error("invalid sampling parameters: {0}")]
    Sampling(SamplingError),

    #[error("invalid forward input: {0}")]
    ForwardInput(String),

    #[error("the model returned an unexpected output: {0}")]
    ModelOutput(String),
}

// Causes are part of each message (the daemon's API shows `to_string()` alone), so none is also
// reported as a `source`: `{:#}` would print it twice.
impl From<SamplingError> for EngineError {
    fn from(error: SamplingError) -> Self {
        EngineError::Sampling(error)
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no candidate paths".to_string();
    }
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl EngineError {
    /// An ONNX Runtime failure while doing `action` ("run the model", "create a session", ...).
    pub(crate) fn ort(action: &'static str) -> impl FnOnce(ort::Error) -> EngineError {
        move |cause| EngineError::Ort { action, cause }
    }

    /// Whether the error is caused by the input or configuration rather than the runtime, so a CLI
    /// can answer with a usage exit code.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            EngineError::Config(_)
                | EngineError::TrtProfile(_)
                | EngineError::ModelDirMissing { .. }
                | EngineError::ModelFileMissing { .. }
                | EngineError::TokenizerMissing { .. }
                | EngineError::EmptyPrompt { .. }
                | EngineError::NoPrompts
                | EngineError::TokenOutOfVocab { .. }
                | EngineError::ContextOverflow { .. }
                | EngineError::Sampling(_)
                | EngineError::GpuSupportNotBuilt { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ort_names_every_place_looked_and_the_fix() {
        let err = EngineError::OrtNotFound {
            looked_at: vec![PathBuf::from("/a/libonnxruntime.so"), PathBuf::from("/b/libonnxruntime.so")],
        };
        let text = err.to_string();
        assert!(text.contains("/a/libonnxruntime.so, /b/libonnxruntime.so"), "{text}");
        assert!(text.contains("make ort") && text.contains("ORT_DYLIB_PATH"), "{text}");
    }

    #[test]
    fn context_overflow_states_the_lengths_and_the_limit() {
        let err =
            EngineError::ContextOverflow { prompt_tokens: 100, max_new_tokens: 50, context_length: 128 };
        let text = err.to_string();
        assert!(text.contains("100") && text.contains("50") && text.contains("128"), "{text}");
    }
}

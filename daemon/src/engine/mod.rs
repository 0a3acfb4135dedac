//! The ONNX Runtime inference engine: loads a model directory and generates text with it.
//!
//! Layout: `config` (what the user sets), `ort_library` (finding libonnxruntime), `providers`
//! (execution providers), `model_dir` (what a model directory holds), `io_layout` (the graph's
//! KV-cache signature), `decoder_session` (one forward pass), `generator` (the generation loop),
//! `text_stream` (incremental detokenisation), `tokenizer`, `tensorrt_cache` (where TensorRT engines
//! are kept, keyed by what they depend on), `tensorrt_profile` (the sequence lengths an engine
//! accepts), and `engine` tying them together.

mod config;
mod decoder_session;
#[allow(clippy::module_inception)]
mod engine;
mod error;
mod generator;
mod io_layout;
mod logits;
mod model_dir;
mod ort_library;
mod providers;
pub mod tensorrt_cache;
pub mod tensorrt_profile;
mod text_stream;
mod tokenizer;

pub use config::{EngineConfig, KNOWN_PROVIDERS, OptimizationLevel, ProviderConfig};
pub use decoder_session::{DecoderSession, ForwardInput, KvCache, LogitsScope};
pub use engine::Engine;
pub use error::EngineError;
pub use generator::{
    CancelToken, Decision, FinishReason, Generation, GenerationParams, ModelLimits, PaddedBatch, StepModel,
    StreamEvent, TextDecoder, check_request, generate,
};
pub use io_layout::{FloatType, IoLayout, LayoutHints, TensorSpec};
pub use logits::Logits;
pub use model_dir::{ModelDir, ModelFormat};
pub use ort_library::{ORT_DYLIB_ENV, ORT_LIBRARY_FILE, OrtRuntime, load_ort};
pub use providers::ProviderReport;
pub use text_stream::{TextStep, TextStream};
pub use tokenizer::TextTokenizer;

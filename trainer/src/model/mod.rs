//! The decoder in candle: one implementation for the Qwen2 and Llama families.

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod fused;
pub mod kv_cache;
pub mod presets;
pub mod weights;

pub use checkpoint::{CheckpointError, HfCheckpoint};
pub use config::{ModelConfig, ModelFamily};
pub use decoder::{DEFAULT_INIT_STD, Decoder, LoraTarget, Mode, token_logprobs};
pub use kv_cache::KvCache;
pub use weights::TrainableModel;

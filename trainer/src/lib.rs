//! `tandem-train`: the on-device policy in candle, its post-training with GAPG (and the baselines it
//! is compared with), evaluation with the paper's protocol, ONNX export and bundle packaging.
//!
//! - [`model`]: the trainable Qwen2/Llama decoder (LoRA adapters included), checkpoints, presets;
//! - [`finetune`]: what is trained (every weight, or LoRA adapters on frozen weights);
//! - [`chat_format`]: chat template and tokenizer, the way the daemon renders prompts;
//! - [`task`]: problems, grading, warm-start data;
//! - [`rollout`]: batched sampling with the KV cache on the device;
//! - [`cloud`]: the cloud during training (OpenAI-compatible client, cache, solver cloud);
//! - [`algorithms`]: GAPG, GRPO, Dr. GRPO, supervised warm start; prompt filtering;
//! - [`optim`]: AdamW, clipping, schedules;
//! - [`run`]: configured, checkpointed, reported training runs;
//! - [`eval`]: the paper's evaluation protocol;
//! - [`export`]: ONNX export and bundles; [`tokenizer_training`]: tokenizers for Tandem's own models;
//! - [`signing`]: signing keys, signing bundles, and verifying them as devices do.

pub mod algorithms;
pub mod allocator;
pub mod chat_format;
pub mod cloud;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod model;
pub mod optim;
pub mod rollout;
pub mod run;
pub mod signing;
pub mod task;
pub mod tokenizer_training;

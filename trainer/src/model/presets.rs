//! Named model shapes for creating fresh models: tiny ones for tests and the demo, and
//! Qwen2.5-0.5B's shapes for benchmarks.

use super::config::{ModelConfig, ModelFamily};

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Qwen2 family, tied head, q/k/v biases; 2 layers, hidden 64, vocab 512.
    TinyQwen2,
    /// Llama family, untied head, no biases; 2 layers, hidden 64, vocab 512.
    TinyLlama,
    /// Qwen2 family, tied head; 4 layers, hidden 128, vocab 1024 (about 1 M weights): the policy of
    /// the CPU training experiment.
    SmallQwen2,
    /// The shapes of Qwen2.5-0.5B (24 layers, hidden 896, vocab 151936), random weights.
    Qwen2_5_0_5b,
}

impl Preset {
    /// The configuration of this shape.
    pub fn config(self) -> ModelConfig {
        let tiny = |model_type, tie| ModelConfig {
            model_type,
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: tie,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![2, 0],
        };
        match self {
            Preset::TinyQwen2 => tiny(ModelFamily::Qwen2, true),
            Preset::TinyLlama => tiny(ModelFamily::Llama, false),
            Preset::SmallQwen2 => ModelConfig {
                hidden_size: 128,
                intermediate_size: 384,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 32,
                vocab_size: 1024,
                ..tiny(ModelFamily::Qwen2, true)
            },
            Preset::Qwen2_5_0_5b => ModelConfig {
                model_type: ModelFamily::Qwen2,
                vocab_size: 151_936,
                hidden_size: 896,
                intermediate_size: 4864,
                num_hidden_layers: 24,
                num_attention_heads: 14,
                num_key_value_heads: 2,
                head_dim: 64,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: true,
                attention_bias: false,
                bos_token_id: None,
                eos_token_ids: vec![2, 0],
            },
        }
    }
}

//! `[generation]`: what a chat request gets when it does not say.

use serde::{Deserialize, Serialize};

/// Defaults for chat requests that leave a parameter out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Most completion tokens when a request sets neither `max_tokens` nor `max_completion_tokens`.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature when a request sets none. Unset: greedy decoding (always the most
    /// likely token), which is what the model was evaluated with.
    #[serde(default)]
    pub temperature: Option<f32>,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self { max_tokens: default_max_tokens(), temperature: None }
    }
}

const fn default_max_tokens() -> u32 {
    256
}

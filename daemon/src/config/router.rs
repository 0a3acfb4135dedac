//! `[router]`: how the daemon acts on the model's decision to ask for help.

use serde::{Deserialize, Serialize};

/// Settings of the router, which answers on the device or hands the query to the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Added to the logit of the help marker's opening token at every step, separate from the
    /// weights: positive values make the model ask the cloud more often, negative values less.
    /// 0 leaves the trained behaviour unchanged.
    #[serde(default)]
    pub help_bias: f32,
    /// Keep the device's own text up to the help marker (its reasoning) in the answer, before the
    /// cloud's answer, as in the paper's [device, cloud] response. On (default), the device's text is
    /// streamed as it is generated. Off, the client sees only the cloud's answer when the cloud
    /// answers, so streamed text is held back until the device has decided.
    #[serde(default = "default_include_local_attempt")]
    pub include_local_attempt_in_answer: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self { help_bias: 0.0, include_local_attempt_in_answer: default_include_local_attempt() }
    }
}

fn default_include_local_attempt() -> bool {
    true
}

//! The post-training algorithms: GAPG (METHOD.md) and the baselines it is compared with.
//!
//! - [`estimator`]: per-sample weights and advantages: GAPG's `(r_i − r̄)/(G − 1)`, GRPO's
//!   std-normalised advantage, Dr. GRPO's centred reward;
//! - [`filter`]: adaptive prompt filtering (D¹ and the capped, randomly chosen D²);
//! - [`packing`]: prompt + device tokens as training rows, and their per-token log-probabilities;
//! - [`loss`]: the surrogate losses whose gradients are the estimators (GAPG's summed
//!   log-probability, the clipped GRPO objective with a KL term, cross-entropy for the warm start);
//! - [`group`]: a prompt's samples with their outcomes and rewards;
//! - [`update_rows`]: the rows of an update with each algorithm's per-row factors.
//!
//! Cloud tokens never reach the model: a training row is the prompt followed by the tokens the
//! device generated (its help tag and end-of-sequence token included), nothing else.

pub mod estimator;
pub mod filter;
pub mod group;
pub mod loss;
pub mod packing;
pub mod update_rows;

use serde::{Deserialize, Serialize};

/// Which algorithm a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmKind {
    /// Group-adaptive policy gradient with prompt filtering (the paper's method).
    Gapg,
    /// GRPO: std-normalised advantages, ratio clipping, KL to a frozen reference, per-token averaging.
    Grpo,
    /// Dr. GRPO: centred advantages, ratio clipping, no length normalisation.
    DrGrpo,
    /// Supervised warm start: cross-entropy on completion tokens.
    Sft,
}

impl AlgorithmKind {
    /// Whether the algorithm learns from rollouts (everything but the warm start).
    pub fn is_reinforcement(self) -> bool {
        self != AlgorithmKind::Sft
    }
}

//! The run configuration: one TOML file says everything a training run does. Unknown keys are errors
//! (a typo must not silently fall back to a default), every field is documented here, and
//! [`RunConfig::validate`] says why a value cannot work before anything is loaded. Relative paths are
//! relative to the working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_core::tasks::reward::{RewardVersion, RewardWeights};

use crate::algorithms::AlgorithmKind;
use crate::algorithms::filter::{D1Rule, PromptFilter};
use crate::cloud::client::HttpCloudConfig;
use crate::eval::EvalSettings;
use crate::finetune::{FinetuneMode, LoraSettings};
use crate::optim::{LrSchedule, OptimizerKind, OptimizerSettings};
use crate::task::TaskKind;

/// Errors reading or validating a run configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid run configuration: {0}")]
    Invalid(String),
}

/// A training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where the run writes, how long it runs, how often it saves and evaluates.
    pub run: RunSection,
    /// The model to start from.
    pub model: ModelSection,
    /// Full fine-tuning or LoRA.
    #[serde(default)]
    pub finetune: FinetuneSection,
    /// The task: data, template and reward.
    pub task: TaskSection,
    /// The algorithm and its settings.
    pub algorithm: AlgorithmSection,
    /// Sampling of rollouts (reinforcement-learning algorithms).
    #[serde(default)]
    pub rollout: Option<RolloutSection>,
    /// Supervised data (the `sft` algorithm).
    #[serde(default)]
    pub sft: Option<SftSection>,
    /// The optimiser and learning-rate schedule.
    pub optimizer: OptimizerSection,
    /// The cloud that answers help requests.
    #[serde(default)]
    pub cloud: Option<CloudSection>,
    /// Evaluation with the paper's protocol during and after training.
    #[serde(default)]
    pub eval: Option<EvalSection>,
    /// When to stop early.
    #[serde(default)]
    pub guard: GuardSection,
}

/// Where the run writes, how long it runs, how often it saves and evaluates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The run directory: checkpoints, metrics.jsonl, the cloud cache, plots and the final model.
    pub out_dir: PathBuf,
    /// Seed of everything random (data order, sampling, filtering, LoRA initialisation).
    #[serde(default)]
    pub seed: u64,
    /// Optimiser steps (one per batch).
    pub steps: u64,
    /// Save a checkpoint every this many steps (and always after the last one).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (older ones are deleted).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Evaluate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// `cpu`, or `cuda` / `cuda:N` (needs the `cuda` feature).
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_checkpoint_every() -> u64 {
    50
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_device() -> String {
    "cpu".into()
}

/// The model to start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face checkpoint folder: config.json, safetensors weights, tokenizer.json (and
    /// tokenizer_config.json for the chat template).
    pub checkpoint: PathBuf,
}

/// What is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    /// `full` (every weight) or `lora` (adapters on frozen weights; needs `[finetune.lora]`).
    pub mode: FinetuneKind,
    /// LoRA's settings.
    #[serde(default)]
    pub lora: Option<LoraSettings>,
}

impl Default for FinetuneSection {
    fn default() -> Self {
        Self { mode: FinetuneKind::Full, lora: None }
    }
}

/// `full` or `lora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneKind {
    /// Every weight is trained.
    Full,
    /// Low-rank adapters on frozen weights.
    Lora,
}

/// The task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// `countdown` or `math`.
    pub kind: TaskKind,
    /// Training problems (JSONL task records; not needed by `sft`).
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Test problems for evaluation (JSONL task records).
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// Whether the template offers the help marker (false: the task-tuning-only baseline, which also
    /// bans the marker during rollouts).
    #[serde(default = "default_true")]
    pub offers_help: bool,
    /// Reward table: `v1` (with the format term) or `v2` (without).
    #[serde(default = "default_reward_version")]
    pub reward_version: RewardVersion,
    /// Reward weights; default: the paper's for the task and version.
    #[serde(default)]
    pub reward: Option<RewardWeights>,
    /// Accept α_c ≥ α_a (the paper's "always ask" ablation); off, such weights are refused.
    #[serde(default)]
    pub allow_cloud_not_cheaper: bool,
}

fn default_true() -> bool {
    true
}
fn default_reward_version() -> RewardVersion {
    RewardVersion::V1
}

impl TaskSection {
    /// The reward weights in effect.
    pub fn weights(&self) -> RewardWeights {
        self.reward.unwrap_or_else(|| self.kind.default_weights(self.reward_version))
    }
}

/// The algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmSection {
    /// `gapg`, `grpo`, `dr_grpo` or `sft`.
    pub kind: AlgorithmKind,
    /// Adaptive prompt filtering (D¹ ∪ D²). On for GAPG by default, off for the baselines.
    #[serde(default)]
    pub filter: Option<bool>,
    /// ρ: cloud-solved prompts allowed per locally solved prompt in an update (3/7: 30%).
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// `any_correct` (the paper's text) or `mixed` (its pseudo-code: correct and incorrect samples).
    #[serde(default = "default_d1_rule")]
    pub d1_rule: D1Rule,
    /// GRPO/Dr. GRPO: the ratio clipping ε.
    #[serde(default = "default_clip")]
    pub clip_epsilon: f64,
    /// GRPO/Dr. GRPO: weight β of the KL term to the frozen starting model (0: no reference model).
    #[serde(default)]
    pub kl_beta: f64,
    /// GRPO/Dr. GRPO: optimiser steps per batch of rollouts (1: on-policy, the ratio is 1).
    #[serde(default = "default_updates")]
    pub updates_per_batch: u32,
    /// GRPO: ε added to the group's standard deviation.
    #[serde(default = "default_std_eps")]
    pub std_eps: f64,
}

fn default_rho() -> f64 {
    PromptFilter::PAPER_RHO
}
fn default_d1_rule() -> D1Rule {
    D1Rule::AnyCorrect
}
fn default_clip() -> f64 {
    0.2
}
fn default_updates() -> u32 {
    1
}
fn default_std_eps() -> f64 {
    1e-4
}

impl AlgorithmSection {
    /// Whether prompt filtering is on.
    pub fn filtering(&self) -> bool {
        self.filter.unwrap_or(self.kind == AlgorithmKind::Gapg)
    }
}

/// Rollout sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    /// Prompts per batch (32 in the paper's Countdown runs).
    pub prompts_per_step: usize,
    /// Samples per prompt, G (8 in the paper).
    #[serde(default = "default_group")]
    pub group_size: usize,
    /// Sampling temperature (1.0 in the paper).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Most tokens the device generates per sample.
    pub max_new_tokens: usize,
    /// Rows generated together (bounds rollout memory).
    #[serde(default = "default_generation_rows")]
    pub generation_rows: usize,
}

fn default_group() -> usize {
    8
}
fn default_temperature() -> f64 {
    1.0
}
fn default_generation_rows() -> usize {
    256
}

/// Supervised warm start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftSection {
    /// JSONL of `{"prompt", "completion"}` (see `tandem-train make-data`).
    pub data: PathBuf,
    /// Examples per step.
    pub batch_size: usize,
}

/// The optimiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    /// `adamw` or `sgd`.
    #[serde(default = "default_optimizer")]
    pub kind: OptimizerKind,
    /// Base learning rate (the paper: 5e-6 Countdown, 2e-6 MATH, for billion-parameter models).
    pub lr: f64,
    /// Adam's β₁.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Adam's β₂.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adam's ε.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay (never on norms and biases).
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Learning-rate schedule: `{ kind = "constant" }` or
    /// `{ kind = "warmup_cosine", warmup_steps = N, min_ratio = 0.1 }`.
    #[serde(default = "default_schedule")]
    pub schedule: LrSchedule,
    /// Training rows per forward/backward pass (gradients are summed across passes).
    #[serde(default = "default_micro_batch")]
    pub micro_batch_rows: usize,
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_schedule() -> LrSchedule {
    LrSchedule::Constant
}
fn default_micro_batch() -> usize {
    64
}

impl OptimizerSection {
    /// The optimiser's settings.
    pub fn settings(&self) -> OptimizerSettings {
        OptimizerSettings {
            kind: self.kind,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// The cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CloudSection {
    /// The exact Countdown solver, served in process on a loopback port and reached through the same
    /// OpenAI-compatible client as a real cloud.
    Solver {
        /// Share of questions answered with no solution (a fixed set, by hash).
        #[serde(default)]
        error_rate: f64,
    },
    /// An OpenAI-compatible endpoint.
    Openai(HttpCloudConfig),
}

/// Evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Test problems evaluated (the first N of the test file; 0: all).
    #[serde(default)]
    pub problems: usize,
    /// Largest share of the test set the cloud may answer (0.3 in the paper); later requests are
    /// answered on the device with the help tag banned.
    #[serde(default = "default_call_cap")]
    pub call_cap: f64,
    /// Most tokens the device generates per problem (greedy).
    pub max_new_tokens: usize,
    /// Problems decoded together.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Also report the cloud alone and random offloading at the same call ratio.
    #[serde(default = "default_true")]
    pub baselines: bool,
}

fn default_call_cap() -> f64 {
    0.3
}
fn default_eval_batch() -> usize {
    32
}

impl EvalSection {
    /// The protocol's settings (the random-offloading draw seeded with `seed`).
    pub fn settings(&self, seed: u64) -> EvalSettings {
        EvalSettings {
            call_cap: self.call_cap,
            max_new_tokens: self.max_new_tokens,
            batch_size: self.batch_size,
            baselines: self.baselines,
            seed,
        }
    }
}

/// Early stopping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSection {
    /// Stop when the loss or the gradient is NaN or infinite (the update is not applied).
    #[serde(default = "default_true")]
    pub stop_on_non_finite: bool,
    /// Steps in the reward window of the collapse check.
    #[serde(default = "default_collapse_window")]
    pub collapse_window: usize,
    /// Stop when the mean reward over the last window falls below this fraction of the best window
    /// seen (0: never).
    #[serde(default)]
    pub collapse_fraction: f64,
}

fn default_collapse_window() -> usize {
    10
}

impl Default for GuardSection {
    fn default() -> Self {
        Self { stop_on_non_finite: true, collapse_window: default_collapse_window(), collapse_fraction: 0.0 }
    }
}

impl RunConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config =
            Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML (no validation).
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The fine-tuning mode.
    pub fn finetune_mode(&self) -> Result<FinetuneMode, ConfigError> {
        match (self.finetune.mode, &self.finetune.lora) {
            (FinetuneKind::Full, _) => Ok(FinetuneMode::Full),
            (FinetuneKind::Lora, Some(lora)) => Ok(FinetuneMode::Lora(lora.clone())),
            (FinetuneKind::Lora, None) => {
                Err(ConfigError::Invalid("finetune.mode = \"lora\" needs a [finetune.lora] section".into()))
            }
        }
    }

    /// Checks that the values can work together; the error says which and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.run.steps == 0 {
            return invalid("run.steps must be at least 1".into());
        }
        if self.run.checkpoint_every == 0 {
            return invalid("run.checkpoint_every must be at least 1".into());
        }
        if self.run.keep_checkpoints == 0 {
            return invalid("run.keep_checkpoints must be at least 1 (resuming needs one)".into());
        }
        if !(self.run.device == "cpu" || self.run.device == "cuda" || self.run.device.starts_with("cuda:")) {
            return invalid(format!("run.device {:?} is not cpu, cuda or cuda:N", self.run.device));
        }
        self.finetune_mode()?;
        if let Some(lora) = &self.finetune.lora
            && (lora.rank == 0 || lora.alpha.is_nan() || lora.alpha <= 0.0 || lora.targets.is_empty())
        {
            return invalid("finetune.lora needs rank ≥ 1, alpha > 0 and at least one target".into());
        }
        let weights = self.task.weights();
        let weights_ok = if self.task.allow_cloud_not_cheaper {
            [weights.alpha_a, weights.alpha_c, weights.alpha_f].iter().all(|w| w.is_finite() && *w >= 0.0)
        } else {
            weights.validate().is_ok()
        };
        if !weights_ok {
            return invalid(match weights.validate() {
                Err(e) => format!("task.reward: {e}"),
                Ok(()) => "task.reward: weights must be finite and non-negative".into(),
            });
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return invalid(format!("optimizer.lr must be a positive number (got {})", o.lr));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) || o.eps.is_nan() || o.eps <= 0.0
        {
            return invalid("optimizer: need 0 ≤ beta1, beta2 < 1 and eps > 0".into());
        }
        if o.weight_decay < 0.0 || o.max_grad_norm < 0.0 || o.micro_batch_rows == 0 {
            return invalid(
                "optimizer: weight_decay and max_grad_norm must be ≥ 0, micro_batch_rows ≥ 1".into(),
            );
        }
        if let LrSchedule::WarmupCosine { min_ratio, .. } = o.schedule
            && !(0.0..=1.0).contains(&min_ratio)
        {
            return invalid(format!("optimizer.schedule.min_ratio must be in [0, 1] (got {min_ratio})"));
        }
        let a = &self.algorithm;
        if a.kind == AlgorithmKind::Sft {
            match &self.sft {
                Some(sft) if sft.batch_size > 0 => {}
                Some(_) => return invalid("sft.batch_size must be at least 1".into()),
                None => return invalid("algorithm.kind = \"sft\" needs an [sft] section".into()),
            }
        } else {
            let Some(r) = &self.rollout else {
                return invalid(format!("algorithm.kind = {:?} needs a [rollout] section", a.kind));
            };
            if r.prompts_per_step == 0 || r.max_new_tokens == 0 || r.generation_rows == 0 {
                return invalid(
                    "rollout: prompts_per_step, max_new_tokens and generation_rows must be ≥ 1".into(),
                );
            }
            if r.group_size < 2 {
                return invalid(format!(
                    "rollout.group_size must be at least 2 (got {}): the estimator compares samples",
                    r.group_size
                ));
            }
            if !(r.temperature > 0.0 && r.temperature.is_finite()) {
                return invalid("rollout.temperature must be positive for sampling".into());
            }
            if self.task.train.is_none() {
                return invalid("task.train is required for reinforcement learning".into());
            }
            if self.task.offers_help && self.cloud.is_none() {
                return invalid(
                    "a template offering help needs a [cloud] section to answer help requests".into(),
                );
            }
            if !(a.rho >= 0.0 && a.rho.is_finite()) {
                return invalid(format!("algorithm.rho must be ≥ 0 (got {})", a.rho));
            }
            if !(a.clip_epsilon > 0.0 && a.clip_epsilon < 1.0) {
                return invalid(format!("algorithm.clip_epsilon must be in (0, 1) (got {})", a.clip_epsilon));
            }
            if a.kl_beta.is_nan()
                || a.kl_beta < 0.0
                || a.updates_per_batch == 0
                || a.std_eps.is_nan()
                || a.std_eps < 0.0
            {
                return invalid("algorithm: kl_beta ≥ 0, std_eps ≥ 0 and updates_per_batch ≥ 1".into());
            }
            if a.kind == AlgorithmKind::Gapg && (a.kl_beta != 0.0 || a.updates_per_batch != 1) {
                return invalid(
                    "GAPG has no KL term and one update per batch: leave kl_beta and updates_per_batch unset"
                        .into(),
                );
            }
        }
        if let Some(CloudSection::Solver { error_rate }) = &self.cloud {
            if !(0.0..=1.0).contains(error_rate) {
                return invalid(format!("cloud.error_rate must be in [0, 1] (got {error_rate})"));
            }
            if self.task.kind != TaskKind::Countdown {
                return invalid("the solver cloud answers Countdown only".into());
            }
        }
        if let Some(eval) = &self.eval {
            if !(0.0..=1.0).contains(&eval.call_cap) || eval.max_new_tokens == 0 || eval.batch_size == 0 {
                return invalid("eval: call_cap in [0, 1], max_new_tokens and batch_size ≥ 1".into());
            }
            if self.task.test.is_none() {
                return invalid("[eval] needs task.test".into());
            }
            if self.cloud.is_none() {
                return invalid("[eval] needs a [cloud] section (help requests and baselines)".into());
            }
        }
        if self.guard.collapse_fraction < 0.0
            || self.guard.collapse_fraction >= 1.0
            || self.guard.collapse_window == 0
        {
            return invalid("guard: collapse_fraction in [0, 1) and collapse_window ≥ 1".into());
        }
        Ok(())
    }
}

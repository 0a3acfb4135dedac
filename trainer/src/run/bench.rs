//! Timing one GAPG step (rollouts and update) on a model, for the comparison with TRL's
//! GRPOTrainer in `bench/train_bench.sh`.
//!
//! Both sides see the same checkpoint, the same prompt texts (encoded without a chat template), the
//! same number of prompts and samples per prompt, and responses of exactly `max_new_tokens` (end of
//! sequence ignored), so they do the same work; rewards are seeded random values, which exercise
//! the update path without depending on what the untrained model writes. Everything is in one
//! micro-batch, as TRL does with `gradient_accumulation_steps = 1`.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::data::derive_seed;
use super::trainer::RunError;
use crate::algorithms::estimator::gapg_weights;
use crate::algorithms::loss::weighted_logprob_loss;
use crate::algorithms::packing::{pack, response_logprobs};
use crate::chat_format::ChatFormat;
use crate::finetune::{FinetuneMode, Policy};
use crate::model::{HfCheckpoint, Mode};
use crate::optim::{Optimizer, OptimizerKind, OptimizerSettings, clip_global_norm};
use crate::rollout::noise::GumbelNoise;
use crate::rollout::{GenerationSpec, generate};

/// What to time.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSettings {
    /// Prompts per step.
    pub prompts: usize,
    /// Samples per prompt.
    pub group_size: usize,
    /// Tokens generated per sample (exactly).
    pub max_new_tokens: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Learning rate (AdamW).
    pub lr: f64,
    /// Seed of sampling and rewards.
    pub seed: u64,
}

/// Timings (medians over the timed steps).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Seconds per step.
    pub step_seconds: f64,
    /// Seconds of generation per step.
    pub rollout_seconds: f64,
    /// Seconds of forward, backward and optimiser per step.
    pub update_seconds: f64,
    /// Tokens generated per step.
    pub generated_tokens: usize,
    /// Longest prompt, in tokens.
    pub prompt_tokens: usize,
    /// Every timed step's seconds.
    pub all_step_seconds: Vec<f64>,
}

/// Times GAPG steps of the model in `checkpoint` on `prompts` (cycled to fill a step).
pub fn bench_gapg_step(
    checkpoint: &Path,
    prompts: &[String],
    settings: &BenchSettings,
) -> Result<BenchReport, RunError> {
    let device = candle_core::Device::Cpu;
    let source = HfCheckpoint::open(checkpoint)?;
    let format = ChatFormat::load(&source.dir, &source.config.eos_token_ids)?;
    let policy = Policy::from_checkpoint(&source, &FinetuneMode::Full, 0, &device)?;
    let mut optimizer = Optimizer::new(
        policy.trainable_vars(),
        OptimizerSettings {
            kind: OptimizerKind::Adamw,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let encoded = prompts.iter().map(|p| format.encode(p)).collect::<Result<Vec<_>, _>>()?;
    if encoded.is_empty() || encoded.iter().any(Vec::is_empty) {
        return Err(RunError::NoData("the benchmark needs non-empty prompts".into()));
    }
    let spec = GenerationSpec {
        temperature: 1.0,
        max_new_tokens: settings.max_new_tokens,
        eos_ids: format.eos_ids().to_vec(),
        help_token: format.help_token(),
        banned: Vec::new(),
        ignore_stops: true,
    };
    let g = settings.group_size;
    let mut timings = Vec::new();
    let mut generated_tokens = 0;
    for step in 0..settings.warmup + settings.steps {
        let started = Instant::now();
        let rows: Vec<Vec<u32>> = (0..settings.prompts)
            .flat_map(|i| std::iter::repeat_n(encoded[i % encoded.len()].clone(), g))
            .collect();
        let mut noise = GumbelNoise::new(derive_seed(settings.seed, "bench", step as u64));
        let completions = generate(&policy.decoder, &rows, &spec, &mut noise)?;
        let rollout_seconds = started.elapsed().as_secs_f64();
        generated_tokens = completions.iter().map(|c| c.tokens.len()).sum();

        let update_started = Instant::now();
        let mut reward_seed = derive_seed(settings.seed, "bench-reward", step as u64);
        let rewards: Vec<f64> = (0..rows.len())
            .map(|_| {
                reward_seed = reward_seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                [0.0, 0.25, 1.0][(reward_seed >> 33) as usize % 3]
            })
            .collect();
        let scales: Vec<f64> =
            rewards.chunks(g).flat_map(gapg_weights).map(|w| w / settings.prompts as f64).collect();
        let pairs: Vec<(&[u32], &[u32])> =
            rows.iter().zip(&completions).map(|(p, c)| (p.as_slice(), c.tokens.as_slice())).collect();
        let packed = pack(&pairs, &device)?;
        let lp = response_logprobs(&policy.decoder, &packed, Mode::Train, 1.0)?;
        let loss = weighted_logprob_loss(&lp, &packed.response_mask, &scales)?;
        let store = loss.backward()?;
        let mut grads = std::collections::HashMap::new();
        for (name, var) in policy.trainable_vars() {
            if let Some(grad) = store.get(var.as_tensor()) {
                grads.insert(name, grad.clone());
            }
        }
        clip_global_norm(&mut grads, 1.0)?;
        optimizer.step(&grads, settings.lr)?;
        let update_seconds = update_started.elapsed().as_secs_f64();
        if step >= settings.warmup {
            timings.push((started.elapsed().as_secs_f64(), rollout_seconds, update_seconds));
        }
    }
    let median = |f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = timings.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(BenchReport {
        step_seconds: median(|t| t.0),
        rollout_seconds: median(|t| t.1),
        update_seconds: median(|t| t.2),
        generated_tokens,
        prompt_tokens: encoded.iter().map(Vec::len).max().unwrap_or(0),
        all_step_seconds: timings.iter().map(|t| t.0).collect(),
    })
}

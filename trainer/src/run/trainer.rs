//! The training loop.
//!
//! A reinforcement-learning step: draw a batch of prompts, sample G responses per prompt on the
//! device, ask the cloud (once per prompt, cached) for every prompt where a sample emitted the help
//! tag, grade every sample and compute its collaboration-aware reward, select the prompts that enter
//! the update (GAPG's filter, or all of them), and take one optimiser step on the algorithm's
//! surrogate over the prompt + device-token rows. A supervised step takes a batch of
//! prompt/completion pairs and minimises the cross-entropy of the completion tokens.
//!
//! Every step appends its metrics; checkpoints are written every `checkpoint_every` steps. A NaN or
//! infinite loss or gradient stops the run before the update is applied (the last checkpoint is the
//! last good state); so does a reward collapse, when configured.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tandem_core::help_marker::HelpMarker;
use tandem_core::tasks::reward::{RewardWeights, reward};
use tandem_core::tasks::templates::PromptTemplate;

use super::checkpoint::{self, CheckpointError, TOKENIZER_FILES, TrainerState};
use super::config::{CloudSection, ConfigError, FinetuneKind, RunConfig};
use super::data::{EpochSampler, derive_seed};
use super::metrics::{EvalMetrics, MetricsError, MetricsLog, MetricsRecord, StepMetrics};
use super::plots;
use super::progress::{Progress, ProgressMode};
use crate::algorithms::AlgorithmKind;
use crate::algorithms::filter::{GroupSummary, PromptFilter, Selection};
use crate::algorithms::group::{Group, Sample};
use crate::algorithms::loss::{clipped_surrogate_loss, mean_kl, weighted_logprob_loss};
use crate::algorithms::packing::{PackedRows, pack, response_logprobs};
use crate::algorithms::update_rows::{UpdateRow, update_rows};
use crate::chat_format::{ChatFormat, ChatFormatError};
use crate::cloud::cache::CloudCache;
use crate::cloud::client::{HttpCloud, HttpCloudConfig};
use crate::cloud::solver::{SOLVER_MODEL, SolverOptions, SolverServer};
use crate::cloud::{CachedCloud, CloudError, CloudOracle, CloudStats};
use crate::eval::{CandleGenerator, EvalError, EvalReport, evaluate};
use crate::finetune::{Policy, PolicyError};
use crate::model::{Decoder, HfCheckpoint, Mode};
use crate::optim::{Optimizer, clip_global_norm};
use crate::rollout::noise::GumbelNoise;
use crate::rollout::{Completion, Finish, GenerationSpec, generate};
use crate::task::sft_data::{SftDataError, read_examples};
use crate::task::{Problem, TaskError, TaskKind};

/// File names inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The persistent cloud cache.
pub const CLOUD_CACHE_FILE: &str = "cloud_cache.jsonl";
/// The final model (merged, Hugging Face format).
pub const FINAL_DIR: &str = "final";
/// The final evaluation with per-problem predictions.
pub const EVAL_FILE: &str = "eval.json";

/// Why a run failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("opening the model: {0}")]
    Model(#[from] crate::model::CheckpointError),
    #[error("model computation: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Format(#[from] ChatFormatError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("evaluation: {0}")]
    Eval(#[from] EvalError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("supervised data: {0}")]
    SftData(#[from] SftDataError),
    #[error("plots: {0}")]
    Plot(#[from] plots::PlotError),
    #[error(
        "{0} already holds a run (checkpoints or metrics); pass --resume to continue it, or choose another \
         run.out_dir"
    )]
    RunExists(PathBuf),
    #[error("--resume: {0} has no checkpoint to resume from")]
    NothingToResume(PathBuf),
    #[error(
        "--resume: the configuration changed since the run started (only run.steps may change); start a new \
         run in another out_dir"
    )]
    ConfigChanged,
    #[error("no usable data: {0}")]
    NoData(String),
    #[error(
        "training stopped at step {step}: the {what} is {value}; the update was not applied. {last_checkpoint}"
    )]
    NonFinite { step: u64, what: &'static str, value: f64, last_checkpoint: String },
    #[error(
        "training stopped at step {step}: reward collapse, the mean reward of the last {window} steps is \
         {recent:.4}, below {fraction} × the best window ({best:.4}). {last_checkpoint}"
    )]
    RewardCollapse {
        step: u64,
        window: usize,
        recent: f64,
        best: f64,
        fraction: f64,
        last_checkpoint: String,
    },
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub out_dir: PathBuf,
    /// Steps completed.
    pub steps: u64,
    /// The final model folder.
    pub final_model: PathBuf,
    /// The final evaluation, when the run has one.
    pub eval: Option<EvalReport>,
    /// The plots written.
    pub plots: Vec<PathBuf>,
}

/// A prepared run.
pub struct Trainer {
    config: RunConfig,
    out_dir: PathBuf,
    device: Device,
    source_dir: PathBuf,
    format: ChatFormat,
    policy: Policy,
    reference: Option<Decoder>,
    optimizer: Optimizer,
    task: TaskKind,
    template: PromptTemplate,
    weights: RewardWeights,
    train: Vec<Problem>,
    train_prompts: Vec<Vec<u32>>,
    test: Vec<Problem>,
    sft_rows: Vec<(Vec<u32>, Vec<u32>)>,
    sampler: EpochSampler,
    cloud: Option<Box<dyn CloudOracle>>,
    _solver: Option<SolverServer>,
    metrics: MetricsLog,
    step: u64,
    fingerprint: String,
    last_checkpoint: Option<PathBuf>,
    best_window: Option<f64>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("out_dir", &self.out_dir).field("step", &self.step).finish()
    }
}

/// The device named in the configuration.
pub fn device_from_name(name: &str) -> Result<Device, RunError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => {
            let ordinal =
                other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).ok_or_else(|| {
                    ConfigError::Invalid(format!("run.device {other:?} is not cpu, cuda or cuda:N"))
                })?;
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}

/// The cloud a configuration names, behind the persistent cache at `cache`. The solver cloud is
/// served on a loopback port for as long as the returned server lives, and reached over HTTP like
/// any other.
pub fn open_cloud(
    section: &CloudSection,
    cache: &Path,
) -> Result<(Box<dyn CloudOracle>, Option<SolverServer>), RunError> {
    let cache = CloudCache::open(cache).map_err(CloudError::from)?;
    let (http, solver) = match section {
        CloudSection::Solver { error_rate } => {
            let server =
                SolverServer::spawn(([127, 0, 0, 1], 0).into(), SolverOptions { error_rate: *error_rate })?;
            let client = HttpCloud::new(HttpCloudConfig::new(server.url(), SOLVER_MODEL))?;
            (client, Some(server))
        }
        CloudSection::Openai(http) => (HttpCloud::new(http.clone())?, None),
    };
    Ok((Box::new(CachedCloud::new(http, cache)), solver))
}

/// The configuration's fingerprint without `run.steps`, which a resumed run may extend.
pub fn fingerprint(config: &RunConfig) -> String {
    let mut config = config.clone();
    config.run.steps = 0;
    hex::encode(Sha256::digest(serde_json::to_vec(&config).expect("the configuration serialises")))
}

impl Trainer {
    /// Loads everything a run needs; with `resume`, restores the latest checkpoint of `run.out_dir`.
    pub fn prepare(config: RunConfig, resume: bool) -> Result<Self, RunError> {
        config.validate()?;
        let out_dir = config.run.out_dir.clone();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RunError::Io { path, source }
        };
        std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
        let has_run =
            out_dir.join(checkpoint::CHECKPOINTS_DIR).exists() || out_dir.join(METRICS_FILE).exists();
        if has_run && !resume {
            return Err(RunError::RunExists(out_dir));
        }
        let device = device_from_name(&config.run.device)?;
        let restored = if resume {
            Some(
                checkpoint::load_latest(&out_dir, &device)?
                    .ok_or_else(|| RunError::NothingToResume(out_dir.clone()))?,
            )
        } else {
            None
        };
        let fingerprint = fingerprint(&config);
        if let Some(restored) = &restored
            && restored.state.config_fingerprint != fingerprint
        {
            return Err(RunError::ConfigChanged);
        }
        let config_copy = out_dir.join("config.json");
        std::fs::write(
            &config_copy,
            serde_json::to_string_pretty(&config).expect("the configuration serialises"),
        )
        .map_err(io(&config_copy))?;

        let source = HfCheckpoint::open(&config.model.checkpoint)?;
        let format = ChatFormat::load(&source.dir, &source.config.eos_token_ids)?;
        let mode = config.finetune_mode()?;
        let policy =
            Policy::from_checkpoint(&source, &mode, derive_seed(config.run.seed, "lora", 0), &device)?;
        let needs_reference = config.algorithm.kind != AlgorithmKind::Gapg
            && config.algorithm.kind.is_reinforcement()
            && config.algorithm.kl_beta > 0.0;
        let reference = if needs_reference { Some(policy.frozen_copy()?) } else { None };
        let mut optimizer = Optimizer::new(policy.trainable_vars(), config.optimizer.settings())?;

        let task = config.task.kind;
        let template = task.template(config.task.offers_help);
        let train = match &config.task.train {
            Some(path) if config.algorithm.kind.is_reinforcement() => task.load(path)?,
            _ => Vec::new(),
        };
        let train_prompts = train
            .iter()
            .map(|p| format.prompt_ids(&template.messages(p.question())))
            .collect::<Result<Vec<_>, _>>()?;
        let test = match (&config.task.test, &config.eval) {
            (Some(path), Some(eval)) => {
                let mut test = task.load(path)?;
                if eval.problems > 0 {
                    test.truncate(eval.problems);
                }
                test
            }
            _ => Vec::new(),
        };
        let sft_rows = match &config.sft {
            Some(sft) if config.algorithm.kind == AlgorithmKind::Sft => {
                let file = std::fs::File::open(&sft.data).map_err(io(&sft.data))?;
                let examples = read_examples(std::io::BufReader::new(file))?;
                examples
                    .iter()
                    .map(|e| {
                        let prompt = format.prompt_ids(&template.messages(&e.prompt))?;
                        let mut completion = format.encode(&e.completion)?;
                        completion.push(format.end_of_turn());
                        Ok((prompt, completion))
                    })
                    .collect::<Result<Vec<_>, ChatFormatError>>()?
            }
            _ => Vec::new(),
        };
        let data_len = if config.algorithm.kind == AlgorithmKind::Sft { sft_rows.len() } else { train.len() };
        if data_len == 0 {
            return Err(RunError::NoData("the training set is empty".into()));
        }
        let sampler = EpochSampler::new(data_len, config.run.seed);

        let (cloud, solver) = match &config.cloud {
            None => (None, None),
            Some(section) => {
                let (cloud, solver) = open_cloud(section, &out_dir.join(CLOUD_CACHE_FILE))?;
                (Some(cloud), solver)
            }
        };

        let mut step = 0;
        let mut last_checkpoint = None;
        if let Some(restored) = restored {
            policy.restore(&restored.trainable)?;
            optimizer.load_state(&restored.optimizer, restored.state.optimizer_steps)?;
            step = restored.state.step;
            last_checkpoint = Some(restored.dir);
        }
        let metrics = MetricsLog::open(&out_dir.join(METRICS_FILE), step)?;
        let mut trainer = Self {
            weights: config.task.weights(),
            config,
            out_dir,
            device,
            source_dir: source.dir.clone(),
            format,
            policy,
            reference,
            optimizer,
            task,
            template,
            train,
            train_prompts,
            test,
            sft_rows,
            sampler,
            cloud,
            _solver: solver,
            metrics,
            step,
            fingerprint,
            last_checkpoint,
            best_window: None,
        };
        trainer.best_window = trainer.best_reward_window();
        Ok(trainer)
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The metrics so far.
    pub fn records(&self) -> &[MetricsRecord] {
        self.metrics.records()
    }

    /// Runs the remaining steps, then saves the final model, evaluates and plots.
    pub fn run(mut self, progress: ProgressMode) -> Result<RunSummary, RunError> {
        let total = self.config.run.steps;
        let progress = Progress::new(total, self.step.min(total), progress);
        if self.step > 0 {
            progress.println(format!("resuming {} at step {}", self.out_dir.display(), self.step));
        }
        while self.step < total {
            let metrics = match self.config.algorithm.kind {
                AlgorithmKind::Sft => self.sft_step()?,
                _ => self.rl_step()?,
            };
            self.step = metrics.step;
            progress.step(&metrics);
            self.metrics.append(MetricsRecord::Train(metrics))?;
            let eval_every = self.config.run.eval_every;
            if eval_every > 0
                && self.step.is_multiple_of(eval_every)
                && self.step < total
                && !self.test.is_empty()
            {
                let report = self.evaluate()?;
                progress.println(format!("step {}: {}", self.step, describe_eval(&report)));
                self.metrics.append(MetricsRecord::Eval(EvalMetrics::from_report(self.step, &report)))?;
            }
            if self.step.is_multiple_of(self.config.run.checkpoint_every) || self.step == total {
                self.save_checkpoint()?;
            }
            self.check_collapse()?;
        }
        progress.finish();

        let final_dir = self.out_dir.join(FINAL_DIR);
        self.policy.save_merged(&final_dir)?;
        for file in TOKENIZER_FILES {
            let source = self.source_dir.join(file);
            if source.is_file() {
                std::fs::copy(&source, final_dir.join(file))
                    .map_err(|e| RunError::Io { path: source.clone(), source: e })?;
            }
        }
        let eval = if self.test.is_empty() {
            None
        } else {
            let already =
                self.records().iter().any(|r| matches!(r, MetricsRecord::Eval(m) if m.step == self.step));
            let report = self.evaluate()?;
            progress.println(format!("final ({} steps): {}", self.step, describe_eval(&report)));
            if !already {
                self.metrics.append(MetricsRecord::Eval(EvalMetrics::from_report(self.step, &report)))?;
            }
            let path = self.out_dir.join(EVAL_FILE);
            std::fs::write(&path, serde_json::to_string_pretty(&report).expect("reports serialise"))
                .map_err(|e| RunError::Io { path, source: e })?;
            Some(report)
        };
        let budget =
            self.config.task.offers_help.then_some(self.config.eval.as_ref().map_or(0.3, |e| e.call_cap));
        let plots = plots::write_plots(self.records(), &self.out_dir.join("plots"), budget)?;
        Ok(RunSummary {
            out_dir: self.out_dir.clone(),
            steps: self.step,
            final_model: final_dir,
            eval,
            plots,
        })
    }

    /// Evaluates the current policy on the test problems with the paper's protocol.
    pub fn evaluate(&mut self) -> Result<EvalReport, RunError> {
        let Some(section) = self.config.eval.clone() else {
            return Err(RunError::NoData("no [eval] section".into()));
        };
        let Some(cloud) = self.cloud.as_deref_mut() else {
            return Err(RunError::NoData("evaluation needs a cloud".into()));
        };
        let mut generator = CandleGenerator::new(&self.policy.decoder, &self.format);
        Ok(evaluate(
            &mut generator,
            &self.format,
            self.task,
            self.template,
            &self.test,
            cloud,
            &section.settings(self.config.run.seed),
        )?)
    }

    fn cloud_stats(&self) -> CloudStats {
        self.cloud.as_ref().map(|c| c.stats()).unwrap_or_default()
    }

    fn save_checkpoint(&mut self) -> Result<(), RunError> {
        let state = TrainerState {
            step: self.step,
            optimizer_steps: self.optimizer.steps(),
            seed: self.config.run.seed,
            config_fingerprint: self.fingerprint.clone(),
            finetune: match self.config.finetune.mode {
                FinetuneKind::Full => "full".into(),
                FinetuneKind::Lora => "lora".into(),
            },
        };
        let dir = checkpoint::save(
            &self.out_dir,
            &state,
            &self.policy,
            &self.optimizer,
            &self.source_dir,
            self.config.run.keep_checkpoints,
        )?;
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    fn last_checkpoint_note(&self) -> String {
        match &self.last_checkpoint {
            Some(dir) => format!("The last good checkpoint is {}.", dir.display()),
            None => "No checkpoint was written yet; the starting model is unchanged.".into(),
        }
    }

    fn banned(&self) -> Vec<u32> {
        if self.template.offers_help() { Vec::new() } else { self.format.help_token().into_iter().collect() }
    }

    /// One reinforcement-learning step.
    fn rl_step(&mut self) -> Result<StepMetrics, RunError> {
        let rollout = self.config.rollout.clone().expect("validated: RL runs have [rollout]");
        let started = Instant::now();
        let step = self.step;
        let seed = self.config.run.seed;
        let g = rollout.group_size;
        let batch = self.sampler.batch(step, rollout.prompts_per_step);
        let rows: Vec<Vec<u32>> =
            batch.iter().flat_map(|&p| std::iter::repeat_n(self.train_prompts[p].clone(), g)).collect();
        let spec = GenerationSpec {
            temperature: rollout.temperature,
            max_new_tokens: rollout.max_new_tokens,
            eos_ids: self.format.eos_ids().to_vec(),
            help_token: self.format.help_token(),
            banned: self.banned(),
            ignore_stops: false,
        };
        let mut noise = GumbelNoise::new(derive_seed(seed, "rollout", step));
        let mut completions: Vec<Completion> = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(rollout.generation_rows) {
            completions.extend(generate(&self.policy.decoder, chunk, &spec, &mut noise)?);
        }
        let rollout_seconds = started.elapsed().as_secs_f64();
        if self.format.help_token().is_none() && self.template.offers_help() {
            for completion in &mut completions {
                cut_at_help_text(completion, &self.format)?;
            }
        }
        let texts =
            completions.iter().map(|c| self.format.decode(&c.tokens)).collect::<Result<Vec<_>, _>>()?;

        // The cloud: once per prompt where a sample asked, shared by the group.
        let asking: Vec<usize> = (0..batch.len())
            .filter(|&k| completions[k * g..(k + 1) * g].iter().any(|c| c.finish == Finish::Help))
            .collect();
        let mut cloud_correct = vec![false; batch.len()];
        if !asking.is_empty() {
            let questions: Vec<String> =
                asking.iter().map(|&k| self.train[batch[k]].question().to_string()).collect();
            let cloud = self.cloud.as_deref_mut().expect("validated: a help template has a cloud");
            let answers = cloud.answers(&questions)?;
            for (&k, answer) in asking.iter().zip(&answers) {
                cloud_correct[k] = self.task.grade_cloud(&self.train[batch[k]], answer);
            }
        }
        let groups: Vec<Group> = batch
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                let samples = (0..g)
                    .map(|j| {
                        let c = &completions[k * g + j];
                        let asked = c.finish == Finish::Help;
                        let outcome =
                            self.task.outcome(&self.train[p], &texts[k * g + j], asked, cloud_correct[k]);
                        Sample {
                            tokens: c.tokens.clone(),
                            logprobs: c.logprobs.clone(),
                            finish: c.finish,
                            outcome,
                            reward: reward(&outcome, &self.weights),
                        }
                    })
                    .collect();
                Group { problem: p, prompt: self.train_prompts[p].clone(), samples }
            })
            .collect();

        let algorithm = self.config.algorithm.clone();
        let selection = if algorithm.filtering() {
            let summaries: Vec<GroupSummary> = groups
                .iter()
                .map(|g| GroupSummary {
                    samples: g.samples.len(),
                    local_correct: g.local_correct(),
                    cloud_solved: g.cloud_solved(),
                })
                .collect();
            let filter = PromptFilter { rho: algorithm.rho, d1_rule: algorithm.d1_rule };
            filter.select(&summaries, &mut ChaCha8Rng::seed_from_u64(derive_seed(seed, "filter", step)))
        } else {
            Selection::everything(groups.len())
        };
        let selected = selection.selected();
        let rows = update_rows(algorithm.kind, &groups, &selected, algorithm.std_eps, algorithm.kl_beta);

        let update_started = Instant::now();
        let lr = self.config.optimizer.schedule.rate(self.config.optimizer.lr, step, self.config.run.steps);
        let mut loss = 0.0;
        let mut grad_norm = 0.0;
        let mut kl = None;
        let updated = !rows.is_empty();
        if updated {
            let updates = if algorithm.kind == AlgorithmKind::Gapg { 1 } else { algorithm.updates_per_batch };
            for _ in 0..updates {
                let (l, n, k) = self.update(&rows, lr)?;
                (loss, grad_norm, kl) = (l, n, k);
            }
        }
        let update_seconds = update_started.elapsed().as_secs_f64();

        let samples: Vec<&Sample> = groups.iter().flat_map(|g| &g.samples).collect();
        let n = samples.len() as f64;
        let help: Vec<&&Sample> = samples.iter().filter(|s| s.outcome.asked_for_help).collect();
        let tokens: usize = samples.iter().map(|s| s.tokens.len()).sum();
        let step_seconds = started.elapsed().as_secs_f64();
        let stats = self.cloud_stats();
        Ok(StepMetrics {
            step: step + 1,
            lr,
            loss,
            grad_norm,
            updated,
            reward: Some(samples.iter().map(|s| s.reward).sum::<f64>() / n),
            local_accuracy: Some(samples.iter().filter(|s| s.is_local_correct()).count() as f64 / n),
            call_ratio: Some(help.len() as f64 / n),
            cloud_accuracy: (!help.is_empty())
                .then(|| help.iter().filter(|s| s.outcome.cloud_correct).count() as f64 / help.len() as f64),
            d1: Some(selection.d1.len()),
            d2: Some(selection.d2.len()),
            d2_candidates: Some(selection.d2_candidates),
            selected: Some(selected.len()),
            kl,
            rows_trained: rows.len(),
            tokens,
            mean_response_tokens: Some(tokens as f64 / n),
            tokens_per_second: tokens as f64 / step_seconds.max(1e-9),
            rollout_seconds,
            update_seconds,
            step_seconds,
            cloud_queries: stats.queries,
            cloud_cache_hits: stats.cache_hits,
        })
    }

    /// Gradients of the algorithm's loss over `rows` (summed over micro-batches), checked, clipped
    /// and applied. Returns (loss, gradient norm before clipping, mean KL).
    fn update(&mut self, rows: &[UpdateRow], lr: f64) -> Result<(f64, f64, Option<f64>), RunError> {
        let kind = self.config.algorithm.kind;
        let temperature = self.config.rollout.as_ref().map_or(1.0, |r| r.temperature);
        let (clip, beta) = (self.config.algorithm.clip_epsilon, self.config.algorithm.kl_beta);
        let kl_sum = Cell::new(0.0);
        let kl_chunks = Cell::new(0usize);
        let reference = self.reference.as_ref();
        let (loss, mut grads) = self.gradients(rows, temperature, &|chunk, packed, lp| match kind {
            AlgorithmKind::Gapg | AlgorithmKind::Sft => {
                let scales: Vec<f64> = chunk.iter().map(|r| r.scale).collect();
                weighted_logprob_loss(lp, &packed.response_mask, &scales)
            }
            AlgorithmKind::Grpo | AlgorithmKind::DrGrpo => {
                let old = padded_logprobs(chunk, packed.response_width, lp.device())?;
                let ref_lp = match reference {
                    Some(reference) => Some(response_logprobs(reference, packed, Mode::Infer, temperature)?),
                    None => None,
                };
                if let Some(ref_lp) = &ref_lp {
                    kl_sum.set(kl_sum.get() + mean_kl(&lp.detach(), ref_lp, &packed.response_mask)?);
                    kl_chunks.set(kl_chunks.get() + 1);
                }
                let advantages: Vec<f64> = chunk.iter().map(|r| r.advantage).collect();
                let scales: Vec<f64> = chunk.iter().map(|r| r.scale).collect();
                clipped_surrogate_loss(
                    lp,
                    &old,
                    ref_lp.as_ref(),
                    &packed.response_mask,
                    &advantages,
                    clip,
                    beta,
                    &scales,
                )
            }
        })?;
        let norm = clip_global_norm(&mut grads, 0.0)?;
        if self.config.guard.stop_on_non_finite {
            for (what, value) in [("loss", loss), ("gradient norm", norm)] {
                if !value.is_finite() {
                    return Err(RunError::NonFinite {
                        step: self.step + 1,
                        what,
                        value,
                        last_checkpoint: self.last_checkpoint_note(),
                    });
                }
            }
        } else if !(loss.is_finite() && norm.is_finite()) {
            tracing::warn!(step = self.step + 1, loss, norm, "non-finite loss or gradient: update skipped");
            return Ok((loss, norm, None));
        }
        clip_global_norm(&mut grads, self.config.optimizer.max_grad_norm)?;
        self.optimizer.step(&grads, lr)?;
        let kl = (kl_chunks.get() > 0).then(|| kl_sum.get() / kl_chunks.get() as f64);
        Ok((loss, norm, kl))
    }

    /// Sums the loss and the gradients of every trainable variable over micro-batches of `rows`.
    #[allow(clippy::type_complexity)]
    fn gradients(
        &self,
        rows: &[UpdateRow],
        temperature: f64,
        loss_of: &dyn Fn(&[UpdateRow], &PackedRows, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<(f64, HashMap<String, Tensor>), RunError> {
        let vars = self.policy.trainable_vars();
        let mut total = 0.0;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        for chunk in rows.chunks(self.config.optimizer.micro_batch_rows) {
            let pairs: Vec<(&[u32], &[u32])> =
                chunk.iter().map(|r| (r.prompt.as_slice(), r.tokens.as_slice())).collect();
            let packed = pack(&pairs, &self.device)?;
            let lp = response_logprobs(&self.policy.decoder, &packed, Mode::Train, temperature)?;
            let loss = loss_of(chunk, &packed, &lp)?;
            total += loss.to_scalar::<f32>()? as f64;
            let store = loss.backward()?;
            for (name, var) in &vars {
                if let Some(grad) = store.get(var.as_tensor()) {
                    let summed = match grads.remove(name) {
                        Some(previous) => (previous + grad)?,
                        None => grad.clone(),
                    };
                    grads.insert(name.clone(), summed);
                }
            }
        }
        Ok((total, grads))
    }

    /// One supervised step: cross-entropy averaged over the batch's completion tokens.
    fn sft_step(&mut self) -> Result<StepMetrics, RunError> {
        let started = Instant::now();
        let batch_size = self.config.sft.as_ref().expect("validated: SFT runs have [sft]").batch_size;
        let batch = self.sampler.batch(self.step, batch_size);
        let tokens: usize = batch.iter().map(|&i| self.sft_rows[i].1.len()).sum();
        let rows: Vec<UpdateRow> = batch
            .iter()
            .map(|&i| UpdateRow {
                prompt: self.sft_rows[i].0.clone(),
                tokens: self.sft_rows[i].1.clone(),
                old_logprobs: Vec::new(),
                scale: 1.0 / tokens as f64,
                advantage: 0.0,
            })
            .collect();
        let lr =
            self.config.optimizer.schedule.rate(self.config.optimizer.lr, self.step, self.config.run.steps);
        let (loss, grad_norm, _) = self.update(&rows, lr)?;
        let step_seconds = started.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.step + 1,
            lr,
            loss,
            grad_norm,
            updated: true,
            rows_trained: rows.len(),
            tokens,
            tokens_per_second: tokens as f64 / step_seconds.max(1e-9),
            update_seconds: step_seconds,
            step_seconds,
            ..StepMetrics::default()
        })
    }

    /// The best mean reward over any window of `collapse_window` consecutive steps so far.
    fn best_reward_window(&self) -> Option<f64> {
        let window = self.config.guard.collapse_window;
        let rewards: Vec<f64> = self
            .records()
            .iter()
            .filter_map(|r| if let MetricsRecord::Train(m) = r { m.reward } else { None })
            .collect();
        rewards.windows(window).map(|w| w.iter().sum::<f64>() / window as f64).reduce(f64::max)
    }

    fn check_collapse(&mut self) -> Result<(), RunError> {
        let guard = &self.config.guard;
        if guard.collapse_fraction <= 0.0 {
            return Ok(());
        }
        let window = guard.collapse_window;
        let rewards: Vec<f64> = self
            .records()
            .iter()
            .filter_map(|r| if let MetricsRecord::Train(m) = r { m.reward } else { None })
            .collect();
        let (best, collapsed) = reward_collapse(&rewards, self.best_window, window, guard.collapse_fraction);
        self.best_window = best;
        if let Some((recent, best)) = collapsed {
            return Err(RunError::RewardCollapse {
                step: self.step,
                window,
                recent,
                best,
                fraction: guard.collapse_fraction,
                last_checkpoint: self.last_checkpoint_note(),
            });
        }
        Ok(())
    }
}

/// The reward-collapse rule over the per-step mean rewards so far: the best mean of `window`
/// consecutive steps is tracked (from `best_so_far`), and once there are at least `2·window` steps,
/// a last window whose mean is below `fraction` × that best is a collapse. Returns the updated best
/// and, on a collapse, `(recent mean, best mean)`.
fn reward_collapse(
    rewards: &[f64],
    best_so_far: Option<f64>,
    window: usize,
    fraction: f64,
) -> (Option<f64>, Option<(f64, f64)>) {
    if window == 0 || rewards.len() < window {
        return (best_so_far, None);
    }
    let recent = rewards[rewards.len() - window..].iter().sum::<f64>() / window as f64;
    let best = best_so_far.map_or(recent, |b| b.max(recent));
    let collapsed = rewards.len() >= 2 * window && best > 0.0 && recent < fraction * best;
    (Some(best), collapsed.then_some((recent, best)))
}

/// `[rows, width]` rollout log-probabilities, zero-padded.
fn padded_logprobs(rows: &[UpdateRow], width: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut values = Vec::with_capacity(rows.len() * width);
    for row in rows {
        values.extend(row.old_logprobs.iter().copied().chain(std::iter::repeat(0.0)).take(width));
    }
    Tensor::from_vec(values, (rows.len(), width), device)
}

/// Without a single-token help tag, a response asks for help where its text first contains the
/// opening tag: the tokens after the one completing it are dropped.
fn cut_at_help_text(completion: &mut Completion, format: &ChatFormat) -> Result<(), ChatFormatError> {
    if completion.finish == Finish::Help {
        return Ok(());
    }
    for end in 1..=completion.tokens.len() {
        if HelpMarker::opening_in(&format.decode(&completion.tokens[..end])?).is_some() {
            completion.tokens.truncate(end);
            completion.logprobs.truncate(end);
            completion.finish = Finish::Help;
            return Ok(());
        }
    }
    Ok(())
}

/// One line about an evaluation.
pub fn describe_eval(report: &EvalReport) -> String {
    let mut line = format!(
        "eval on {}: overall {:.1}% | local {:.1}% | cond. local {:.1}% | calls {:.1}% (asked {:.1}%)",
        report.problems,
        100.0 * report.overall_accuracy,
        100.0 * report.local_accuracy,
        100.0 * report.conditional_local_accuracy,
        100.0 * report.call_ratio,
        100.0 * report.help_request_ratio,
    );
    if let Some(random) = &report.random_offloading {
        line.push_str(&format!(" | random offloading {:.1}%", 100.0 * random.accuracy));
    }
    line
}

#[cfg(test)]
mod collapse_tests {
    use super::reward_collapse;

    /// Feeds rewards one step at a time, as the trainer does, and returns the first collapse.
    fn first_collapse(rewards: &[f64], window: usize, fraction: f64) -> Option<(usize, f64, f64)> {
        let mut best = None;
        for step in 1..=rewards.len() {
            let (next, collapsed) = reward_collapse(&rewards[..step], best, window, fraction);
            best = next;
            if let Some((recent, best)) = collapsed {
                return Some((step, recent, best));
            }
        }
        None
    }

    #[test]
    fn a_steady_or_rising_reward_never_collapses() {
        let rising: Vec<f64> = (0..40).map(|i| 0.3 + i as f64 * 0.01).collect();
        assert_eq!(first_collapse(&rising, 5, 0.5), None);
        assert_eq!(first_collapse(&[0.4; 40], 5, 0.5), None);
    }

    #[test]
    fn a_reward_falling_below_the_fraction_of_the_best_window_collapses() {
        let mut rewards = vec![1.0; 10];
        rewards.extend([0.2; 10]);
        let (step, recent, best) = first_collapse(&rewards, 5, 0.5).expect("a collapse");
        assert_eq!(best, 1.0);
        assert!(recent < 0.5, "{recent}");
        assert_eq!(
            step, 14,
            "the last 5 steps' mean first drops below 0.5 at step 14 (4 of them at 0.2: 0.36)"
        );
    }

    #[test]
    fn nothing_is_judged_before_two_windows_or_when_the_best_is_not_positive() {
        assert_eq!(first_collapse(&[1.0, 1.0, 0.0], 2, 0.5), None, "3 steps < 2 windows of 2");
        assert_eq!(first_collapse(&[0.0; 10], 2, 0.5), None, "a best of 0 cannot collapse");
    }
}

//! Evaluation with the paper's protocol.
//!
//! Greedy decoding of every test problem with the help option offered. Help requests are admitted in
//! arrival order (test-set order) until the cap (a fraction of the test set, 30% in the paper); the
//! cloud answers admitted ones. Later requests are handled on the device: decoding resumes after the
//! tokens before the help tag with the tag banned, as the daemon does when its budget refuses a call
//! (for greedy decoding this is exactly a re-decode from scratch with the tag banned). Reported:
//! overall accuracy, local accuracy (correct local answers over all problems), conditional local
//! accuracy (correct local answers over the problems kept local) and the call ratio; and, on the same
//! problems, the cloud alone and random offloading at the same call ratio (local answers with the tag
//! banned, a seeded random subset of the same size sent to the cloud).
//!
//! The model is anything that decodes greedily ([`GreedyGenerator`]): the candle decoder here, the
//! daemon's ONNX Runtime engine in the agreement test.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tandem_core::help_marker::HelpMarker;
use tandem_core::tasks::templates::PromptTemplate;

use crate::chat_format::{ChatFormat, ChatFormatError};
use crate::cloud::{CloudError, CloudOracle};
use crate::model::Decoder;
use crate::rollout::noise::GumbelNoise;
use crate::rollout::{GenerationSpec, generate};
use crate::task::{Problem, TaskKind};

/// Errors during evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("generation failed: {0}")]
    Generate(String),
    #[error(transparent)]
    Format(#[from] ChatFormatError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("nothing to evaluate")]
    Empty,
}

/// A model that decodes greedily.
pub trait GreedyGenerator {
    /// The greedy continuation of each prompt: it ends with an end-of-sequence token, with the help
    /// tag, or after `max_new_tokens`; `banned` ids are never generated.
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        banned: &[u32],
    ) -> Result<Vec<Vec<u32>>, EvalError>;
}

/// The candle decoder as a [`GreedyGenerator`].
#[derive(Debug)]
pub struct CandleGenerator<'a> {
    decoder: &'a Decoder,
    eos_ids: Vec<u32>,
    help_token: Option<u32>,
}

impl<'a> CandleGenerator<'a> {
    /// Greedy decoding with `decoder`, stopping at `format`'s end-of-sequence ids and help tag.
    pub fn new(decoder: &'a Decoder, format: &ChatFormat) -> Self {
        Self { decoder, eos_ids: format.eos_ids().to_vec(), help_token: format.help_token() }
    }
}

impl GreedyGenerator for CandleGenerator<'_> {
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        banned: &[u32],
    ) -> Result<Vec<Vec<u32>>, EvalError> {
        let spec = GenerationSpec {
            temperature: 0.0,
            max_new_tokens,
            eos_ids: self.eos_ids.clone(),
            help_token: self.help_token,
            banned: banned.to_vec(),
            ignore_stops: false,
        };
        let completions = generate(self.decoder, prompts, &spec, &mut GumbelNoise::new(0))
            .map_err(|e| EvalError::Generate(e.to_string()))?;
        Ok(completions.into_iter().map(|c| c.tokens).collect())
    }
}

/// How to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Largest share of the test set the cloud may answer (0.3 in the paper).
    #[serde(default = "default_call_cap")]
    pub call_cap: f64,
    /// Most tokens the device generates per problem.
    pub max_new_tokens: usize,
    /// Problems decoded together.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Also report the cloud alone and random offloading at the same ratio (asks the cloud about
    /// every problem once; answers are cached).
    #[serde(default = "default_true")]
    pub baselines: bool,
    /// Seed of the random-offloading draw.
    #[serde(default)]
    pub seed: u64,
}

fn default_call_cap() -> f64 {
    0.3
}
fn default_batch_size() -> usize {
    32
}
fn default_true() -> bool {
    true
}

/// What happened to one test problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The device's first greedy response (ids, stopping token included).
    pub tokens: Vec<u32>,
    /// The device asked for help.
    pub asked_for_help: bool,
    /// The request was admitted under the cap (the cloud answered).
    pub admitted: bool,
    /// For a request handled on the device: the continuation after the tokens before the help tag.
    pub fallback_tokens: Option<Vec<u32>>,
    /// The final answer is correct.
    pub correct: bool,
    /// Whether the device's own answer (its response, or after a help request the answer with the
    /// tag banned) is correct, when it was computed.
    pub local_correct: Option<bool>,
    /// Whether the cloud's answer is correct, when the cloud was asked.
    pub cloud_correct: Option<bool>,
}

/// Random offloading at the policy's call ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandomOffloading {
    /// Problems sent to the cloud (the evaluated policy's admitted calls).
    pub cloud_calls: usize,
    /// Accuracy of the seeded draw.
    pub accuracy: f64,
    /// Expected accuracy over all draws of that size.
    pub expected_accuracy: f64,
}

/// The results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Test problems.
    pub problems: usize,
    /// Problems where the device asked for help.
    pub help_requests: usize,
    /// Requests the cloud answered (at most the cap).
    pub cloud_calls: usize,
    /// Correct answers overall (local and cloud) / problems.
    pub overall_accuracy: f64,
    /// Correct local answers / problems.
    pub local_accuracy: f64,
    /// Correct local answers / problems kept local.
    pub conditional_local_accuracy: f64,
    /// Cloud calls / problems.
    pub call_ratio: f64,
    /// Help requests / problems (before the cap).
    pub help_request_ratio: f64,
    /// Correct cloud answers / cloud calls.
    pub cloud_call_accuracy: f64,
    /// Accuracy with every problem answered on the device (help tag banned), when baselines ran.
    pub local_only_accuracy: Option<f64>,
    /// Accuracy of the cloud alone, when baselines ran.
    pub cloud_only_accuracy: Option<f64>,
    /// Random offloading at the same call ratio, when baselines ran.
    pub random_offloading: Option<RandomOffloading>,
    /// Per problem, in test-set order.
    pub predictions: Vec<Prediction>,
}

/// Runs the protocol on `problems` with `template` (normally the one offering help).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    generator: &mut dyn GreedyGenerator,
    format: &ChatFormat,
    task: TaskKind,
    template: PromptTemplate,
    problems: &[Problem],
    cloud: &mut dyn CloudOracle,
    settings: &EvalSettings,
) -> Result<EvalReport, EvalError> {
    let n = problems.len();
    if n == 0 {
        return Err(EvalError::Empty);
    }
    let help_token = format.help_token();
    let banned_help: Vec<u32> = help_token.into_iter().collect();
    let first_banned: &[u32] = if template.offers_help() { &[] } else { &banned_help };
    let prompts = problems
        .iter()
        .map(|p| format.prompt_ids(&template.messages(p.question())))
        .collect::<Result<Vec<_>, _>>()?;
    let first =
        generate_batched(generator, &prompts, settings.max_new_tokens, first_banned, settings.batch_size)?;

    // Where each response's help tag begins (token index), if it asked.
    let help_at: Vec<Option<usize>> =
        first.iter().map(|tokens| help_position(tokens, help_token, format)).collect::<Result<_, _>>()?;
    let cap = (settings.call_cap * n as f64 + 1e-9).floor() as usize;
    let mut admitted = vec![false; n];
    let mut calls = 0;
    for i in 0..n {
        if help_at[i].is_some() && calls < cap {
            admitted[i] = true;
            calls += 1;
        }
    }

    // Local answers after a help request, with the tag banned: needed for refused requests, and
    // for every request when the random-offloading baseline needs local-only answers.
    let needs_fallback: Vec<usize> =
        (0..n).filter(|&i| help_at[i].is_some() && (!admitted[i] || settings.baselines)).collect();
    // Tokens kept before the tag. Without a single-token tag nothing can be banned, so the answer is
    // re-decoded from scratch with the template that does not offer help.
    let kept = |i: usize| if help_token.is_some() { help_at[i].unwrap_or(0) } else { 0 };
    let fallback_prompts: Vec<Vec<u32>> = needs_fallback
        .iter()
        .map(|&i| {
            if help_token.is_some() {
                Ok(prompts[i].iter().chain(&first[i][..kept(i)]).copied().collect())
            } else {
                format.prompt_ids(&template.without_help().messages(problems[i].question()))
            }
        })
        .collect::<Result<_, _>>()?;
    let longest =
        needs_fallback.iter().map(|&i| remaining(settings.max_new_tokens, kept(i))).max().unwrap_or(0);
    let mut fallbacks: Vec<Option<Vec<u32>>> = vec![None; n];
    if !needs_fallback.is_empty() {
        let continuations =
            generate_batched(generator, &fallback_prompts, longest, &banned_help, settings.batch_size)?;
        for (&i, mut continuation) in needs_fallback.iter().zip(continuations) {
            continuation.truncate(remaining(settings.max_new_tokens, kept(i)));
            fallbacks[i] = Some(continuation);
        }
    }
    let local_text = |i: usize| -> Result<String, EvalError> {
        match (help_at[i], &fallbacks[i]) {
            (None, _) => Ok(format.decode(&first[i])?),
            (Some(_), Some(continuation)) => {
                let ids: Vec<u32> = first[i][..kept(i)].iter().chain(continuation).copied().collect();
                Ok(format.decode(&ids)?)
            }
            (Some(_), None) => Ok(String::new()),
        }
    };
    let local_correct: Vec<Option<bool>> = (0..n)
        .map(|i| {
            let available = help_at[i].is_none() || fallbacks[i].is_some();
            Ok(if available { Some(task.grade_local(&problems[i], &local_text(i)?).correct) } else { None })
        })
        .collect::<Result<_, EvalError>>()?;

    let asked: Vec<usize> =
        if settings.baselines { (0..n).collect() } else { (0..n).filter(|&i| admitted[i]).collect() };
    let questions: Vec<String> = asked.iter().map(|&i| problems[i].question().to_string()).collect();
    let answers = if questions.is_empty() { Vec::new() } else { cloud.answers(&questions)? };
    let mut cloud_correct: Vec<Option<bool>> = vec![None; n];
    for (&i, answer) in asked.iter().zip(&answers) {
        cloud_correct[i] = Some(task.grade_cloud(&problems[i], answer));
    }

    let mut predictions = Vec::with_capacity(n);
    let (mut correct_local, mut correct_cloud) = (0usize, 0usize);
    for i in 0..n {
        let correct = if admitted[i] {
            let c = cloud_correct[i].unwrap_or(false);
            correct_cloud += usize::from(c);
            c
        } else {
            let c = local_correct[i].unwrap_or(false);
            correct_local += usize::from(c);
            c
        };
        predictions.push(Prediction {
            tokens: first[i].clone(),
            asked_for_help: help_at[i].is_some(),
            admitted: admitted[i],
            fallback_tokens: if admitted[i] { None } else { fallbacks[i].clone() },
            correct,
            local_correct: local_correct[i],
            cloud_correct: cloud_correct[i],
        });
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let help_requests = help_at.iter().filter(|h| h.is_some()).count();
    let (local_only_accuracy, cloud_only_accuracy, random_offloading) = if settings.baselines {
        let local_only: Vec<bool> = local_correct.iter().map(|c| c.unwrap_or(false)).collect();
        let cloud_only: Vec<bool> = cloud_correct.iter().map(|c| c.unwrap_or(false)).collect();
        let local_rate = ratio(local_only.iter().filter(|c| **c).count(), n);
        let cloud_rate = ratio(cloud_only.iter().filter(|c| **c).count(), n);
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let chosen = rand::seq::index::sample(&mut rng, n, calls).into_vec();
        let mut to_cloud = vec![false; n];
        for i in chosen {
            to_cloud[i] = true;
        }
        let drawn = (0..n).filter(|&i| if to_cloud[i] { cloud_only[i] } else { local_only[i] }).count();
        let share = ratio(calls, n);
        let random = RandomOffloading {
            cloud_calls: calls,
            accuracy: ratio(drawn, n),
            expected_accuracy: (1.0 - share) * local_rate + share * cloud_rate,
        };
        (Some(local_rate), Some(cloud_rate), Some(random))
    } else {
        (None, None, None)
    };
    Ok(EvalReport {
        problems: n,
        help_requests,
        cloud_calls: calls,
        overall_accuracy: ratio(correct_local + correct_cloud, n),
        local_accuracy: ratio(correct_local, n),
        conditional_local_accuracy: ratio(correct_local, n - calls),
        call_ratio: ratio(calls, n),
        help_request_ratio: ratio(help_requests, n),
        cloud_call_accuracy: ratio(correct_cloud, calls),
        local_only_accuracy,
        cloud_only_accuracy,
        random_offloading,
        predictions,
    })
}

/// Tokens left for a fallback continuation: the budget minus the tokens kept before the tag.
fn remaining(max_new_tokens: usize, kept: usize) -> usize {
    max_new_tokens.saturating_sub(kept).max(1)
}

/// Index of the token where the help tag begins: the tag token itself when the tokenizer has one,
/// else the first token whose text completes the opening tag.
fn help_position(
    tokens: &[u32],
    help_token: Option<u32>,
    format: &ChatFormat,
) -> Result<Option<usize>, EvalError> {
    if let Some(token) = help_token {
        return Ok(tokens.iter().position(|&t| t == token));
    }
    for end in 1..=tokens.len() {
        if HelpMarker::opening_in(&format.decode(&tokens[..end])?).is_some() {
            return Ok(Some(end - 1));
        }
    }
    Ok(None)
}

fn generate_batched(
    generator: &mut dyn GreedyGenerator,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    banned: &[u32],
    batch_size: usize,
) -> Result<Vec<Vec<u32>>, EvalError> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch_size.max(1)) {
        out.extend(generator.generate(chunk, max_new_tokens, banned)?);
    }
    Ok(out)
}

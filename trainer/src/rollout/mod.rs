//! Rollouts: batched generation with the KV cache, on the device.
//!
//! Prompts are left-padded (positions `cumsum(mask) - 1`), prefilled once, then decoded one token per
//! step for every row together. Consecutive rows with the same prompt (a group's samples) share
//! one prefill: its keys, values and last logits are repeated to each row before sampling; rows that have finished stay in the batch with their new slots
//! masked. A row stops at an end-of-sequence token, at the help marker's opening tag (the device's
//! part of a collaborative response ends there; the cloud takes over), or at the token limit. Each
//! sampled token is kept with its log-probability under the sampling distribution (the model's
//! softmax at the sampling temperature; at the paper's temperature 1.0 this is the policy itself).
//! Sampling is Gumbel-max on the device with a seeded stream ([`noise::GumbelNoise`]); temperature 0
//! is greedy decoding.

pub mod noise;
pub mod padding;
pub mod prompt_groups;

use candle_core::{D, DType, Tensor};

use crate::model::{Decoder, KvCache, Mode};
use noise::GumbelNoise;
use padding::{LeftPadded, PAD_ID};
use prompt_groups::PromptGroups;

/// Added to the scores of banned tokens: finite, so a softmax over them stays NaN-free.
const BANNED_SCORE: f32 = -1e30;

/// How rows are generated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSpec {
    /// Sampling temperature; 0 decodes greedily.
    pub temperature: f64,
    /// Most tokens generated per row (the stopping token included).
    pub max_new_tokens: usize,
    /// Tokens that end a response.
    pub eos_ids: Vec<u32>,
    /// The help marker's opening tag: generating it ends the device's part.
    pub help_token: Option<u32>,
    /// Tokens never generated (the help tag when asking is not allowed).
    pub banned: Vec<u32>,
    /// Generate through end-of-sequence and help tokens up to `max_new_tokens` (benchmarks).
    pub ignore_stops: bool,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-sequence token.
    Eos,
    /// The help marker's opening tag: the device asks the cloud.
    Help,
    /// The token limit.
    Length,
}

/// One generated row.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated ids, the stopping token (end of sequence or help tag) included.
    pub tokens: Vec<u32>,
    /// Log-probability of each generated id under the sampling distribution.
    pub logprobs: Vec<f32>,
    /// Why generation stopped.
    pub finish: Finish,
}

/// Generates one completion per prompt (repeat a prompt to draw several samples of it; consecutive
/// repeats share one prefill).
pub fn generate(
    decoder: &Decoder,
    prompts: &[Vec<u32>],
    spec: &GenerationSpec,
    noise: &mut GumbelNoise,
) -> candle_core::Result<Vec<Completion>> {
    generate_grouped(decoder, prompts, &PromptGroups::of(prompts), spec, noise)
}

/// [`generate`] with the prefill shared as `groups` says: each group's prompt is prefilled once for
/// all its rows (`PromptGroups::unshared` prefills every row).
pub fn generate_grouped(
    decoder: &Decoder,
    prompts: &[Vec<u32>],
    groups: &PromptGroups,
    spec: &GenerationSpec,
    noise: &mut GumbelNoise,
) -> candle_core::Result<Vec<Completion>> {
    let rows = prompts.len();
    if !groups.fits(prompts) {
        candle_core::bail!("the prompt groups do not describe these {rows} prompts");
    }
    if rows == 0 || spec.max_new_tokens == 0 {
        return Ok(prompts
            .iter()
            .map(|_| Completion { tokens: vec![], logprobs: vec![], finish: Finish::Length })
            .collect());
    }
    if prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("every prompt needs at least one token");
    }
    let device = decoder.device().clone();
    let vocab = decoder.config().vocab_size;
    let distinct: Vec<Vec<u32>> = groups.first_row.iter().map(|&row| prompts[row as usize].clone()).collect();
    let padded = LeftPadded::new(&distinct);
    let (ids, mut mask, positions) = padded.tensors(&device)?;
    let mut cache = KvCache::new(decoder.config().num_hidden_layers);
    let hidden = decoder.forward(&ids, &mask, &positions, Some(&mut cache), Mode::Infer)?;
    let mut logits = decoder.logits(&hidden.narrow(1, padded.width - 1, 1)?)?.squeeze(1)?;
    if groups.shares() {
        let group_of_row = Tensor::new(groups.group_of_row.as_slice(), &device)?;
        cache = cache.select_rows(&group_of_row)?;
        mask = mask.index_select(&group_of_row, 0)?;
        logits = logits.contiguous()?.index_select(&group_of_row, 0)?;
    }
    let ban = banned_bias(&spec.banned, vocab, &device)?;

    let mut completions: Vec<Completion> = (0..rows)
        .map(|_| Completion {
            tokens: Vec::with_capacity(spec.max_new_tokens),
            logprobs: Vec::with_capacity(spec.max_new_tokens),
            finish: Finish::Length,
        })
        .collect();
    let mut live = vec![true; rows];
    for _ in 0..spec.max_new_tokens {
        let scores = match &ban {
            Some(ban) => logits.to_dtype(DType::F32)?.broadcast_add(ban)?,
            None => logits.to_dtype(DType::F32)?,
        };
        let (choice, logprob) = if spec.temperature > 0.0 {
            let log_probs = candle_nn::ops::log_softmax(&(scores / spec.temperature)?, D::Minus1)?;
            let gumbel = noise.sample(rows, vocab, &device)?;
            let choice = (&log_probs + gumbel)?.argmax_keepdim(D::Minus1)?;
            let logprob = log_probs.gather(&choice, D::Minus1)?;
            (choice, logprob)
        } else {
            let log_probs = candle_nn::ops::log_softmax(&scores, D::Minus1)?;
            let choice = scores.argmax_keepdim(D::Minus1)?;
            let logprob = log_probs.gather(&choice, D::Minus1)?;
            (choice, logprob)
        };
        let chosen = choice.flatten_all()?.to_vec1::<u32>()?;
        let logprobs = logprob.flatten_all()?.to_vec1::<f32>()?;
        for row in 0..rows {
            if !live[row] {
                continue;
            }
            let token = chosen[row];
            let completion = &mut completions[row];
            completion.tokens.push(token);
            completion.logprobs.push(logprobs[row]);
            if !spec.ignore_stops && spec.eos_ids.contains(&token) {
                completion.finish = Finish::Eos;
                live[row] = false;
            } else if !spec.ignore_stops && spec.help_token == Some(token) {
                completion.finish = Finish::Help;
                live[row] = false;
            } else if completion.tokens.len() >= spec.max_new_tokens {
                live[row] = false;
            }
        }
        if !live.iter().any(|&l| l) {
            break;
        }
        let mut next = Vec::with_capacity(rows);
        let mut next_positions = Vec::with_capacity(rows);
        let mut column = Vec::with_capacity(rows);
        for row in 0..rows {
            let generated = completions[row].tokens.len();
            next.push(if live[row] { completions[row].tokens[generated - 1] } else { PAD_ID });
            next_positions.push(if live[row] { (prompts[row].len() + generated - 1) as u32 } else { 0 });
            column.push(u32::from(live[row]));
        }
        let next = Tensor::from_vec(next, (rows, 1), &device)?;
        let next_positions = Tensor::from_vec(next_positions, (rows, 1), &device)?;
        mask = Tensor::cat(&[&mask, &Tensor::from_vec(column, (rows, 1), &device)?], 1)?;
        let hidden = decoder.forward(&next, &mask, &next_positions, Some(&mut cache), Mode::Infer)?;
        logits = decoder.logits(&hidden)?.squeeze(1)?;
    }
    Ok(completions)
}

/// `[1, vocab]` scores added to the logits: [`BANNED_SCORE`] at banned ids, 0 elsewhere.
fn banned_bias(
    banned: &[u32],
    vocab: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Option<Tensor>> {
    if banned.is_empty() {
        return Ok(None);
    }
    let mut bias = vec![0f32; vocab];
    for &id in banned {
        if let Some(slot) = bias.get_mut(id as usize) {
            *slot = BANNED_SCORE;
        }
    }
    Tensor::from_vec(bias, (1, vocab), device).map(Some)
}

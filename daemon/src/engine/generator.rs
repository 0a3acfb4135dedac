//! The generation loop: prefill a (left-padded) batch of prompts, then decode one token per row per
//! step until every row has met an end-of-sequence token, a stop string or `max_new_tokens`.
//!
//! The loop only needs a [`StepModel`] (one forward pass) and optionally a [`TextDecoder`] (ids to
//! text), so its rules are tested here without ONNX Runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tandem_core::generation::{Decoding, SamplingParams, StopStrings, TokenSampler, softmax_probability};

use super::decoder_session::{DecoderSession, ForwardInput, KvCache, LogitsScope};
use super::error::EngineError;
use super::logits::Logits;
use super::text_stream::{TextStep, TextStream};

/// Token id placed in padding positions; masked out, so any id inside the vocabulary works.
const PAD_TOKEN_ID: i64 = 0;

/// One forward pass over the last positions of a batch.
pub trait StepModel {
    /// The model's KV cache.
    type Cache;
    /// An empty cache for `batch` rows.
    fn empty_cache(&self, batch: usize) -> Result<Self::Cache, EngineError>;
    /// Runs one step; returns the last position's logits of each row and the extended cache.
    fn step(
        &mut self,
        input: &ForwardInput<'_>,
        past: Self::Cache,
    ) -> Result<(Logits, Self::Cache), EngineError>;
}

impl StepModel for DecoderSession {
    type Cache = KvCache;

    fn empty_cache(&self, batch: usize) -> Result<KvCache, EngineError> {
        DecoderSession::empty_cache(self, batch)
    }

    fn step(&mut self, input: &ForwardInput<'_>, past: KvCache) -> Result<(Logits, KvCache), EngineError> {
        self.forward(input, past, LogitsScope::LastPosition)
    }
}

/// Turns generated token ids into text.
pub trait TextDecoder {
    /// The text of `ids`, special tokens included.
    fn decode(&self, ids: &[u32]) -> Result<String, EngineError>;
    /// One more than the largest token id the tokenizer can produce.
    fn token_count(&self) -> usize;
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Upper bound of generated tokens per row (end-of-sequence tokens included).
    pub max_new_tokens: usize,
    /// Greedy or seeded sampling. With sampling, row `i` of a batch uses seed `seed + i`.
    pub decoding: Decoding,
    /// Generation of a row ends where one of these appears in its text; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Token ids never generated (for example the help marker when the cloud budget is spent).
    pub banned_token_ids: Vec<u32>,
    /// Generate through end-of-sequence tokens up to `max_new_tokens` (benchmarks).
    pub ignore_eos: bool,
    /// Added to the logits of these tokens before choosing (the help-marker bias).
    pub logit_bias: Vec<(u32, f32)>,
    /// Tokens whose probability is tracked to find the decision point (the help marker's opening
    /// token); see [`Decision`].
    pub watch_token_ids: Vec<u32>,
    /// Stops generation when cancelled (a client that went away).
    pub cancel: Option<CancelToken>,
}

/// A flag that ends a generation early; cheap to clone and share with another thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the generation to stop after the current step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl PartialEq for CancelToken {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Where the model came closest to choosing a watched token, or chose one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Decision {
    /// Probability the model (before any bias) gave to the watched tokens at that step.
    pub probability: f32,
    /// Whether a watched token was chosen there.
    pub chosen: bool,
    /// Index of the generated token at that step.
    pub step: usize,
}

impl GenerationParams {
    /// Greedy decoding of up to `max_new_tokens` tokens, no stop strings.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            decoding: Decoding::Greedy,
            stop_strings: Vec::new(),
            banned_token_ids: Vec::new(),
            ignore_eos: false,
            logit_bias: Vec::new(),
            watch_token_ids: Vec::new(),
            cancel: None,
        }
    }
}

/// Facts about the model that bound generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelLimits {
    /// Tokens that end a row.
    pub eos_token_ids: Vec<u32>,
    /// Longest prompt plus generation, when known.
    pub context_length: Option<usize>,
    /// Rows of the logits, when known before running.
    pub vocab_size: Option<usize>,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model generated an end-of-sequence token.
    Eos,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` were generated.
    Length,
    /// The caller cancelled the generation.
    Cancelled,
}

/// A new token of one row, as it is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// Index of the prompt in the batch.
    pub row: usize,
    /// The token just generated.
    pub token_id: u32,
    /// Text that became final with this token (may be empty while a tail is held back).
    pub text_delta: String,
    /// Whether this is the row's last event.
    pub finished: Option<FinishReason>,
}

/// The result of one row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// Generated token ids, the end-of-sequence token included when there was one.
    pub ids: Vec<u32>,
    /// Generated text, without an end-of-sequence token and cut before a stop string; empty without a
    /// tokenizer.
    pub text: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt (padding excluded).
    pub prompt_tokens: usize,
    /// From the start of prefill to the first generated token.
    pub time_to_first_token: Duration,
    /// Tokens per second after the first one; `None` with fewer than two tokens.
    pub decode_tokens_per_second: Option<f64>,
    /// The decision point for the watched tokens, when any were watched.
    pub decision: Option<Decision>,
}

/// A left-padded batch: every prompt ends at the same column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// `[batch, width]` ids, padding first.
    pub input_ids: Vec<i64>,
    /// `[batch, width]`: 0 on padding, 1 on prompt tokens.
    pub attention_mask: Vec<i64>,
    /// `[batch, width]`: `cumsum(mask) - 1`, clamped at 0 on padding.
    pub position_ids: Vec<i64>,
    /// Length of the longest prompt.
    pub width: usize,
}

impl PaddedBatch {
    /// Left-pads `prompts` to the longest one.
    pub fn left_padded(prompts: &[Vec<u32>]) -> PaddedBatch {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = PaddedBatch {
            input_ids: Vec::with_capacity(prompts.len() * width),
            attention_mask: Vec::with_capacity(prompts.len() * width),
            position_ids: Vec::with_capacity(prompts.len() * width),
            width,
        };
        for prompt in prompts {
            let pad = width - prompt.len();
            batch
                .input_ids
                .extend(std::iter::repeat_n(PAD_TOKEN_ID, pad).chain(prompt.iter().map(|&t| i64::from(t))));
            batch
                .attention_mask
                .extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, prompt.len())));
            batch.position_ids.extend(std::iter::repeat_n(0, pad).chain(0..prompt.len() as i64));
        }
        batch
    }
}

/// Refuses a batch that cannot run: no prompts, an empty prompt, ids outside the vocabulary, or more
/// tokens than the context holds.
pub fn check_request(
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    limits: &ModelLimits,
) -> Result<(), EngineError> {
    if prompts.is_empty() {
        return Err(EngineError::NoPrompts);
    }
    if params.max_new_tokens == 0 {
        return Err(EngineError::Config("max_new_tokens must be at least 1".to_string()));
    }
    params.decoding.validate()?;
    for (row, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt { row });
        }
        if let Some(vocab) = limits.vocab_size
            && let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab)
        {
            return Err(EngineError::TokenOutOfVocab { row, id, vocab });
        }
    }
    if let Some(context_length) = limits.context_length {
        let prompt_tokens = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompt_tokens.saturating_add(params.max_new_tokens) > context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens,
                max_new_tokens: params.max_new_tokens,
                context_length,
            });
        }
    }
    Ok(())
}

/// Per-row state of the loop.
struct Row {
    sampler: TokenSampler,
    prompt_tokens: usize,
    ids: Vec<u32>,
    stream: TextStream,
    text: String,
    finished: Option<FinishReason>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    decision: Option<Decision>,
}

/// Generates for every prompt of the batch. `on_event` sees each token as it is chosen.
pub fn generate<M: StepModel>(
    model: &mut M,
    decoder: Option<&dyn TextDecoder>,
    limits: &ModelLimits,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    on_event: &mut dyn FnMut(StreamEvent),
) -> Result<Vec<Generation>, EngineError> {
    check_request(prompts, params, limits)?;
    let limits_without_eos;
    let limits = if params.ignore_eos {
        limits_without_eos = ModelLimits { eos_token_ids: Vec::new(), ..limits.clone() };
        &limits_without_eos
    } else {
        limits
    };
    let stops = StopStrings::new(params.stop_strings.iter().cloned());
    if decoder.is_none() && !stops.is_empty() {
        return Err(EngineError::Config(
            "stop strings need a tokenizer to find them in the text".to_string(),
        ));
    }
    let mut rows = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            Ok(Row {
                sampler: TokenSampler::new(row_decoding(params.decoding, index))?,
                prompt_tokens: prompt.len(),
                ids: Vec::with_capacity(params.max_new_tokens),
                stream: TextStream::default(),
                text: String::new(),
                finished: None,
                first_token_at: None,
                last_token_at: None,
                decision: None,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;

    let batch = prompts.len();
    let padded = PaddedBatch::left_padded(prompts);
    let mut attention_mask: Vec<Vec<i64>> =
        padded.attention_mask.chunks(padded.width).map(<[i64]>::to_vec).collect();

    let start = Instant::now();
    let cache = model.empty_cache(batch)?;
    let prefill = ForwardInput {
        batch,
        input_ids: &padded.input_ids,
        attention_mask: &padded.attention_mask,
        position_ids: &padded.position_ids,
    };
    let (mut logits, mut cache) = model.step(&prefill, cache)?;
    check_logits_rows(&logits, batch)?;
    if let Some(decoder) = decoder
        && decoder.token_count() > logits.vocab()
    {
        return Err(EngineError::VocabMismatch {
            tokenizer_tokens: decoder.token_count(),
            model_vocab: logits.vocab(),
        });
    }

    let mut biased = Vec::new();
    loop {
        if params.cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
            for row in rows.iter_mut().filter(|r| r.finished.is_none()) {
                row.finished = Some(FinishReason::Cancelled);
            }
            break;
        }
        for (index, row) in rows.iter_mut().enumerate() {
            if row.finished.is_some() {
                continue;
            }
            let raw = logits.last(index);
            let watched_probability = (!params.watch_token_ids.is_empty())
                .then(|| params.watch_token_ids.iter().map(|&t| softmax_probability(raw, t)).sum::<f32>());
            let scores = if params.logit_bias.is_empty() {
                raw
            } else {
                biased.clear();
                biased.extend_from_slice(raw);
                for &(token, bias) in &params.logit_bias {
                    if let Some(score) = biased.get_mut(token as usize) {
                        *score += bias;
                    }
                }
                &biased
            };
            let token = row.sampler.next_token(scores, &params.banned_token_ids);
            if let Some(probability) = watched_probability {
                let chosen = params.watch_token_ids.contains(&token);
                let step = row.ids.len();
                let closer = row.decision.is_none_or(|d| !d.chosen && probability > d.probability);
                if chosen || closer {
                    row.decision = Some(Decision { probability, chosen, step });
                }
            }
            let now = Instant::now();
            row.first_token_at.get_or_insert(now);
            row.last_token_at = Some(now);
            row.ids.push(token);
            let event = advance_row(row, token, decoder, &stops, limits, params.max_new_tokens)?;
            on_event(StreamEvent { row: index, ..event });
        }
        if rows.iter().all(|r| r.finished.is_some()) {
            break;
        }

        let mut input_ids = Vec::with_capacity(batch);
        let mut position_ids = Vec::with_capacity(batch);
        let mut mask = Vec::with_capacity(batch * (attention_mask.first().map_or(0, Vec::len) + 1));
        for (row, row_mask) in rows.iter().zip(attention_mask.iter_mut()) {
            // A finished row still takes part in the batch's shapes; its step is masked out.
            let live = row.finished.is_none();
            input_ids.push(row.ids.last().map_or(PAD_TOKEN_ID, |&t| i64::from(t)));
            position_ids.push((row.prompt_tokens + row.ids.len()) as i64 - 1);
            row_mask.push(i64::from(live));
            mask.extend_from_slice(row_mask);
        }
        let step =
            ForwardInput { batch, input_ids: &input_ids, attention_mask: &mask, position_ids: &position_ids };
        (logits, cache) = model.step(&step, cache)?;
        check_logits_rows(&logits, batch)?;
    }

    Ok(rows.into_iter().map(|row| finish_row(row, start)).collect())
}

fn check_logits_rows(logits: &Logits, batch: usize) -> Result<(), EngineError> {
    let [rows, positions, _] = logits.shape();
    if rows != batch || positions == 0 {
        return Err(EngineError::ModelOutput(format!(
            "logits have shape {:?} for a batch of {batch}",
            logits.shape()
        )));
    }
    Ok(())
}

/// Sampling of row `index` draws from its own stream: seed + index.
pub(crate) fn row_decoding(decoding: Decoding, index: usize) -> Decoding {
    match decoding {
        Decoding::Greedy => Decoding::Greedy,
        Decoding::Sample(p) => {
            Decoding::Sample(SamplingParams { seed: p.seed.wrapping_add(index as u64), ..p })
        }
    }
}

/// Applies the row's newest token: end-of-sequence, stop strings, length; returns its stream event
/// (row index filled in by the caller).
fn advance_row(
    row: &mut Row,
    token: u32,
    decoder: Option<&dyn TextDecoder>,
    stops: &StopStrings,
    limits: &ModelLimits,
    max_new_tokens: usize,
) -> Result<StreamEvent, EngineError> {
    let is_eos = limits.eos_token_ids.contains(&token);
    let text_ids = if is_eos { &row.ids[..row.ids.len() - 1] } else { &row.ids[..] };
    let mut text_delta = String::new();
    if let Some(decoder) = decoder {
        let text = decoder.decode(text_ids)?;
        if is_eos {
            text_delta = row.stream.finish(&text);
            row.text = text;
        } else {
            match row.stream.push(&text, stops) {
                TextStep::Continue { delta } => {
                    text_delta = delta;
                    row.text = text;
                }
                TextStep::Stop { delta, end } => {
                    text_delta = delta;
                    row.text = text[..end].to_string();
                    row.finished = Some(FinishReason::StopString);
                }
            }
        }
    }
    if is_eos {
        row.finished = Some(FinishReason::Eos);
    } else if row.finished.is_none() && row.ids.len() >= max_new_tokens {
        row.finished = Some(FinishReason::Length);
        text_delta.push_str(&row.stream.finish(&row.text));
    }
    Ok(StreamEvent { row: 0, token_id: token, text_delta, finished: row.finished })
}

fn finish_row(row: Row, start: Instant) -> Generation {
    let time_to_first_token = row.first_token_at.map_or(Duration::ZERO, |t| t - start);
    let decode_tokens_per_second = match (row.first_token_at, row.last_token_at) {
        (Some(first), Some(last)) if row.ids.len() >= 2 && last > first => {
            Some((row.ids.len() - 1) as f64 / (last - first).as_secs_f64())
        }
        _ => None,
    };
    Generation {
        ids: row.ids,
        text: row.text,
        finish_reason: row.finished.unwrap_or(FinishReason::Length),
        prompt_tokens: row.prompt_tokens,
        time_to_first_token,
        decode_tokens_per_second,
        decision: row.decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake decoder over a vocabulary of 16: it always favours `(last real input token + 1) % 16`,
    /// and records every input it saw. Its cache is the list of positions seen so far.
    struct CountingModel {
        seen: Vec<(Vec<i64>, Vec<i64>, Vec<i64>)>,
    }

    const VOCAB: usize = 16;

    impl StepModel for CountingModel {
        type Cache = usize;

        fn empty_cache(&self, _batch: usize) -> Result<usize, EngineError> {
            Ok(0)
        }

        fn step(&mut self, input: &ForwardInput<'_>, past: usize) -> Result<(Logits, usize), EngineError> {
            let seq = input.input_ids.len() / input.batch;
            assert_eq!(input.attention_mask.len(), input.batch * (past + seq), "mask covers past and new");
            self.seen.push((
                input.input_ids.to_vec(),
                input.attention_mask.to_vec(),
                input.position_ids.to_vec(),
            ));
            let mut data = vec![0.0; input.batch * VOCAB];
            for row in 0..input.batch {
                let last = input.input_ids[row * seq + seq - 1] as usize;
                data[row * VOCAB + (last + 1) % VOCAB] = 1.0;
            }
            Ok((Logits::new(input.batch, 1, VOCAB, data), past + seq))
        }
    }

    /// Token `i` decodes to the letter `a + i`.
    struct Letters;

    impl TextDecoder for Letters {
        fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
            Ok(ids.iter().map(|&i| char::from(b'a' + i as u8)).collect())
        }

        fn token_count(&self) -> usize {
            VOCAB
        }
    }

    fn run(
        prompts: &[Vec<u32>],
        params: &GenerationParams,
        limits: &ModelLimits,
    ) -> (Result<Vec<Generation>, EngineError>, Vec<StreamEvent>, CountingModel) {
        let mut model = CountingModel { seen: Vec::new() };
        let mut events = Vec::new();
        let result = generate(&mut model, Some(&Letters), limits, prompts, params, &mut |e| events.push(e));
        (result, events, model)
    }

    #[test]
    fn left_padding_masks_the_pads_and_counts_positions_from_the_first_real_token() {
        let padded = PaddedBatch::left_padded(&[vec![5, 6, 7], vec![9]]);
        assert_eq!(padded.width, 3);
        assert_eq!(padded.input_ids, [5, 6, 7, 0, 0, 9]);
        assert_eq!(padded.attention_mask, [1, 1, 1, 0, 0, 1]);
        assert_eq!(padded.position_ids, [0, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn a_logit_bias_changes_the_choice() {
        let params = GenerationParams { logit_bias: vec![(9, 5.0)], ..GenerationParams::greedy(2) };
        let (result, _, _) = run(&[vec![1]], &params, &ModelLimits::default());
        assert_eq!(result.unwrap()[0].ids, [9, 9]);
    }

    #[test]
    fn the_decision_is_where_a_watched_token_was_chosen_with_its_unbiased_probability() {
        // The fake favours last+1: from prompt [4] it generates 5, 6, 7 ...; watch token 6.
        let params = GenerationParams { watch_token_ids: vec![6], ..GenerationParams::greedy(4) };
        let (result, _, _) = run(&[vec![4]], &params, &ModelLimits::default());
        let decision = result.unwrap()[0].decision.unwrap();
        assert!(decision.chosen);
        assert_eq!(decision.step, 1);
        let expected = std::f32::consts::E / (std::f32::consts::E + 15.0);
        assert!((decision.probability - expected).abs() < 1e-5, "{decision:?}");
    }

    #[test]
    fn without_a_watched_choice_the_decision_is_the_closest_step() {
        let params = GenerationParams {
            watch_token_ids: vec![15],
            banned_token_ids: vec![15],
            ..GenerationParams::greedy(3)
        };
        let (result, _, _) = run(&[vec![13]], &params, &ModelLimits::default());
        let decision = result.unwrap()[0].decision.unwrap();
        assert!(!decision.chosen);
        assert_eq!(decision.step, 1, "token 15 was most likely right after 14");
    }

    #[test]
    fn cancelling_ends_generation_early() {
        let cancel = CancelToken::default();
        let params = GenerationParams { cancel: Some(cancel.clone()), ..GenerationParams::greedy(10) };
        let mut model = CountingModel { seen: Vec::new() };
        let mut seen = 0;
        let result =
            generate(&mut model, Some(&Letters), &ModelLimits::default(), &[vec![1]], &params, &mut |_| {
                seen += 1;
                if seen == 3 {
                    cancel.cancel();
                }
            });
        let generation = &result.unwrap()[0];
        assert_eq!(generation.finish_reason, FinishReason::Cancelled);
        assert_eq!(generation.ids.len(), 3);
    }

    #[test]
    fn greedy_generation_stops_at_max_new_tokens() {
        let (result, events, _) = run(&[vec![1, 2]], &GenerationParams::greedy(4), &ModelLimits::default());
        let generation = &result.unwrap()[0];
        assert_eq!(generation.ids, [3, 4, 5, 6]);
        assert_eq!(generation.text, "defg");
        assert_eq!(generation.finish_reason, FinishReason::Length);
        assert_eq!(generation.prompt_tokens, 2);
        let streamed: String = events.iter().map(|e| e.text_delta.as_str()).collect();
        assert_eq!(streamed, "defg");
        assert_eq!(events.last().unwrap().finished, Some(FinishReason::Length));
    }

    #[test]
    fn decode_steps_continue_positions_and_grow_the_mask() {
        let (result, _, model) =
            run(&[vec![1, 2, 3], vec![7]], &GenerationParams::greedy(3), &ModelLimits::default());
        let generations = result.unwrap();
        assert_eq!(generations[0].ids, [4, 5, 6]);
        assert_eq!(generations[1].ids, [8, 9, 10]);
        // prefill, then two decode steps (the third token needs no further forward pass)
        assert_eq!(model.seen.len(), 3);
        let (ids, mask, positions) = &model.seen[1];
        assert_eq!(ids, &[4, 8]);
        assert_eq!(mask, &[1, 1, 1, 1, 0, 0, 1, 1]);
        assert_eq!(positions, &[3, 1]);
        assert_eq!(model.seen[2].2, [4, 2]);
    }

    #[test]
    fn generation_stops_at_an_eos_token_and_keeps_it_out_of_the_text() {
        let limits = ModelLimits { eos_token_ids: vec![5], ..ModelLimits::default() };
        let (result, events, _) = run(&[vec![2]], &GenerationParams::greedy(10), &limits);
        let generation = &result.unwrap()[0];
        assert_eq!(generation.ids, [3, 4, 5]);
        assert_eq!(generation.text, "de");
        assert_eq!(generation.finish_reason, FinishReason::Eos);
        assert_eq!(events.len(), 3);
    }

    #[test]
    fn a_finished_row_is_masked_while_the_others_go_on() {
        let limits = ModelLimits { eos_token_ids: vec![3], ..ModelLimits::default() };
        let (result, _, model) = run(&[vec![2], vec![8]], &GenerationParams::greedy(3), &limits);
        let generations = result.unwrap();
        assert_eq!(generations[0].ids, [3]);
        assert_eq!(generations[1].ids, [9, 10, 11]);
        let (_, mask, _) = model.seen.last().unwrap();
        assert_eq!(mask, &[1, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn a_stop_string_ends_the_row_and_is_cut_from_the_text() {
        let params = GenerationParams { stop_strings: vec!["fg".into()], ..GenerationParams::greedy(10) };
        let (result, events, _) = run(&[vec![2]], &params, &ModelLimits::default());
        let generation = &result.unwrap()[0];
        assert_eq!(generation.ids, [3, 4, 5, 6]);
        assert_eq!(generation.text, "de");
        assert_eq!(generation.finish_reason, FinishReason::StopString);
        let streamed: String = events.iter().map(|e| e.text_delta.as_str()).collect();
        assert_eq!(streamed, "de", "the held-back `f` is never streamed");
    }

    #[test]
    fn banned_tokens_are_never_generated() {
        let params = GenerationParams { banned_token_ids: vec![3], ..GenerationParams::greedy(1) };
        let (result, _, _) = run(&[vec![2]], &params, &ModelLimits::default());
        assert_ne!(result.unwrap()[0].ids, [3]);
    }

    #[test]
    fn a_prompt_that_does_not_fit_the_context_is_refused_before_running() {
        let limits = ModelLimits { context_length: Some(8), ..ModelLimits::default() };
        let (result, _, model) = run(&[vec![1; 6]], &GenerationParams::greedy(3), &limits);
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::ContextOverflow { prompt_tokens: 6, max_new_tokens: 3, context_length: 8 }
            ),
            "{err}"
        );
        assert!(model.seen.is_empty());
        assert!(check_request(&[vec![1; 9]], &GenerationParams::greedy(1), &limits).is_err());
        assert!(check_request(&[vec![1; 5]], &GenerationParams::greedy(3), &limits).is_ok());
    }

    #[test]
    fn an_empty_prompt_is_refused() {
        let err = check_request(&[vec![1], vec![]], &GenerationParams::greedy(1), &ModelLimits::default());
        assert!(matches!(err, Err(EngineError::EmptyPrompt { row: 1 })));
        assert!(matches!(
            check_request(&[], &GenerationParams::greedy(1), &ModelLimits::default()),
            Err(EngineError::NoPrompts)
        ));
    }

    #[test]
    fn a_prompt_id_outside_the_vocabulary_is_refused() {
        let limits = ModelLimits { vocab_size: Some(16), ..ModelLimits::default() };
        let err = check_request(&[vec![1, 16]], &GenerationParams::greedy(1), &limits).unwrap_err();
        assert!(matches!(err, EngineError::TokenOutOfVocab { row: 0, id: 16, vocab: 16 }));
    }

    #[test]
    fn a_tokenizer_larger_than_the_logits_is_refused() {
        struct Big;
        impl TextDecoder for Big {
            fn decode(&self, _: &[u32]) -> Result<String, EngineError> {
                Ok(String::new())
            }
            fn token_count(&self) -> usize {
                VOCAB + 1
            }
        }
        let mut model = CountingModel { seen: Vec::new() };
        let err = generate(
            &mut model,
            Some(&Big),
            &ModelLimits::default(),
            &[vec![1]],
            &GenerationParams::greedy(1),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("different models"), "{err}");
    }

    #[test]
    fn sampled_rows_use_their_own_seeds() {
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 41 };
        assert_eq!(row_decoding(Decoding::Sample(p), 2), Decoding::Sample(SamplingParams { seed: 43, ..p }));
        assert_eq!(row_decoding(Decoding::Greedy, 2), Decoding::Greedy);
    }

    #[test]
    fn without_a_tokenizer_ids_are_generated_and_stop_strings_refused() {
        let mut model = CountingModel { seen: Vec::new() };
        let generations = generate(
            &mut model,
            None,
            &ModelLimits::default(),
            &[vec![1]],
            &GenerationParams::greedy(2),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(generations[0].ids, [2, 3]);
        assert_eq!(generations[0].text, "");
        let params = GenerationParams { stop_strings: vec!["x".into()], ..GenerationParams::greedy(2) };
        assert!(
            generate(&mut model, None, &ModelLimits::default(), &[vec![1]], &params, &mut |_| {}).is_err()
        );
    }
}

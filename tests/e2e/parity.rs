//! The exported ONNX graph run by the engine on ONNX Runtime against the candle model it came from:
//! logits within 1e-4 and identical greedy tokens through prefill and 24 decode steps, for a
//! Qwen2-style (tied head, biases) and a Llama-style (untied head) model, also on a left-padded batch.

use candle_core::{Device, Tensor};
use tandem_train::export::ExternalData;
use tandem_train::model::presets::Preset;
use tandem_train::model::{Decoder, KvCache, Mode};
use tandemd::engine::{Engine, ForwardInput, GenerationParams, LogitsScope, PaddedBatch};

use crate::fixtures::{ExportedModel, argmax, candle_greedy, load_engine, max_abs_diff, to_vec};

const TOLERANCE: f32 = 1e-4;
const DECODE_STEPS: usize = 24;

/// Candle: logits of every position of a (padded) batch, with the cache filled.
fn candle_step(
    model: &Decoder,
    cache: &mut KvCache,
    ids: &[i64],
    mask: &[i64],
    pos: &[i64],
    batch: usize,
) -> Vec<f32> {
    let seq = ids.len() / batch;
    let as_u32 = |v: &[i64], width| {
        Tensor::from_vec(v.iter().map(|&x| x as u32).collect::<Vec<_>>(), (batch, width), &Device::Cpu)
            .unwrap()
    };
    let hidden = model
        .forward(
            &as_u32(ids, seq),
            &as_u32(mask, mask.len() / batch),
            &as_u32(pos, seq),
            Some(cache),
            Mode::Infer,
        )
        .unwrap();
    to_vec(&model.logits(&hidden).unwrap())
}

/// Runs prefill then greedy decode on both runtimes in lock step and compares every logit.
pub(crate) fn assert_lockstep_parity(exported: &ExportedModel, prompts: &[Vec<u32>]) {
    let model = &exported.model.decoder;
    let vocab = model.config().vocab_size;
    let mut engine: Engine = load_engine(&exported.bundle);
    let batch = prompts.len();
    let padded = PaddedBatch::left_padded(prompts);
    let width = padded.input_ids.len() / batch;

    let mut candle_cache = KvCache::new(model.config().num_hidden_layers);
    let mut mask = padded.attention_mask.clone();
    let expected =
        candle_step(model, &mut candle_cache, &padded.input_ids, &mask, &padded.position_ids, batch);
    let input = ForwardInput {
        batch,
        input_ids: &padded.input_ids,
        attention_mask: &mask,
        position_ids: &padded.position_ids,
    };
    let (logits, mut past) =
        engine.forward(&input, engine.empty_cache(batch).unwrap(), LogitsScope::AllPositions).unwrap();
    assert_eq!(logits.shape(), [batch, width, vocab]);
    // Compare only real (unpadded) positions: what a padded slot's logits are is undefined.
    for row in 0..batch {
        for col in 0..width {
            if padded.attention_mask[row * width + col] == 1 {
                let offset = (row * width + col) * vocab;
                let diff = max_abs_diff(logits.at(row, col), &expected[offset..offset + vocab]);
                assert!(diff < TOLERANCE, "prefill row {row} position {col}: max |diff| {diff}");
            }
        }
    }

    let mut next: Vec<i64> = (0..batch).map(|r| argmax(logits.last(r)) as i64).collect();
    let mut positions: Vec<i64> =
        (0..batch).map(|r| padded.position_ids[r * width + width - 1] + 1).collect();
    for step in 0..DECODE_STEPS {
        for row in 0..batch {
            mask.insert((row + 1) * (width + step) + row, 1);
        }
        let expected = candle_step(model, &mut candle_cache, &next, &mask, &positions, batch);
        let input = ForwardInput { batch, input_ids: &next, attention_mask: &mask, position_ids: &positions };
        let (logits, present) = engine.forward(&input, past, LogitsScope::LastPosition).unwrap();
        past = present;
        for row in 0..batch {
            let ours = logits.last(row);
            let theirs = &expected[row * vocab..(row + 1) * vocab];
            let diff = max_abs_diff(ours, theirs);
            assert!(diff < TOLERANCE, "decode step {step} row {row}: max |diff| {diff}");
            assert_eq!(argmax(ours), argmax(theirs), "greedy token at step {step} row {row}");
            next[row] = argmax(ours) as i64;
            positions[row] += 1;
        }
    }
    assert_eq!(past.len(), width + DECODE_STEPS);
}

#[test]
fn qwen2_style_bundle_matches_candle_through_prefill_and_decode() {
    let exported = ExportedModel::preset(Preset::TinyQwen2, 11);
    assert_lockstep_parity(&exported, &[vec![5, 17, 42, 99, 123, 7, 300, 64]]);
}

#[test]
fn llama_style_bundle_with_external_weights_matches_candle_through_prefill_and_decode() {
    let exported = ExportedModel::new(&Preset::TinyLlama.config(), 12, ExternalData::Always);
    assert!(exported.bundle.join("model.onnx.data").is_file(), "weights must be in model.onnx.data");
    assert_lockstep_parity(&exported, &[vec![3, 200, 41, 9, 77, 150]]);
}

#[test]
fn left_padded_batch_matches_candle_row_by_row() {
    for preset in [Preset::TinyQwen2, Preset::TinyLlama] {
        let exported = ExportedModel::preset(preset, 13);
        assert_lockstep_parity(
            &exported,
            &[vec![11, 12, 13, 14, 15, 16, 17], vec![21, 22, 23], vec![31, 32, 33, 34, 35]],
        );
    }
}

#[test]
fn engine_generation_on_a_padded_batch_gives_candles_greedy_tokens_for_each_prompt() {
    let mut config = Preset::TinyQwen2.config();
    config.eos_token_ids.clear(); // random weights: compare the full length, never stop early
    let exported = ExportedModel::new(&config, 14, ExternalData::Never);
    let mut engine = load_engine(&exported.bundle);
    let prompts = vec![vec![9u32, 8, 7, 6, 5, 4], vec![100u32, 200], vec![1u32, 2, 3, 4]];
    let generations = engine.generate(&prompts, &GenerationParams::greedy(DECODE_STEPS), |_| {}).unwrap();
    for (prompt, generation) in prompts.iter().zip(&generations) {
        assert_eq!(generation.ids.len(), DECODE_STEPS);
        assert_eq!(
            generation.ids,
            candle_greedy(&exported.model.decoder, prompt, DECODE_STEPS),
            "prompt {prompt:?}"
        );
    }
}

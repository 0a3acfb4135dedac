//! Rollouts: left padding does not change what a prompt generates, the recorded log-probabilities
//! are those of a training forward pass, sampling is reproducible, and rows stop at the help tag.

use candle_core::Device;
use tandem_train::algorithms::packing::{pack, response_logprobs};
use tandem_train::model::Mode;
use tandem_train::model::presets::Preset;
use tandem_train::rollout::noise::GumbelNoise;
use tandem_train::rollout::{Finish, GenerationSpec, generate};

use crate::support::tiny_model;

fn spec(temperature: f64, max_new_tokens: usize) -> GenerationSpec {
    GenerationSpec {
        temperature,
        max_new_tokens,
        eos_ids: vec![2, 0],
        help_token: Some(3),
        banned: vec![],
        ignore_stops: false,
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![40, 41, 42, 43, 44, 45, 46], vec![50, 51], vec![60, 61, 62, 63]]
}

#[test]
fn batched_generation_equals_generating_each_prompt_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyLlama, 3);
    let spec = spec(0.0, 12);
    let batched = generate(&model.decoder, &prompts(), &spec, &mut GumbelNoise::new(0)).unwrap();
    for (prompt, together) in prompts().iter().zip(&batched) {
        let alone =
            generate(&model.decoder, std::slice::from_ref(prompt), &spec, &mut GumbelNoise::new(0)).unwrap();
        assert_eq!(alone[0].tokens, together.tokens, "prompt {prompt:?}");
        for (a, b) in alone[0].logprobs.iter().zip(&together.logprobs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn recorded_logprobs_equal_a_training_forward_of_the_sampled_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyQwen2, 4);
    for temperature in [1.0, 0.7] {
        let completions =
            generate(&model.decoder, &prompts(), &spec(temperature, 10), &mut GumbelNoise::new(5)).unwrap();
        let prompts = prompts();
        let rows: Vec<(&[u32], &[u32])> =
            prompts.iter().zip(&completions).map(|(p, c)| (p.as_slice(), c.tokens.as_slice())).collect();
        let packed = pack(&rows, &Device::Cpu).unwrap();
        let recomputed = response_logprobs(&model.decoder, &packed, Mode::Train, temperature)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (row, completion) in completions.iter().enumerate() {
            for (t, recorded) in completion.logprobs.iter().enumerate() {
                let diff = (recorded - recomputed[row][t]).abs();
                assert!(
                    diff < 1e-4,
                    "T={temperature} row {row} token {t}: {recorded} vs {}",
                    recomputed[row][t]
                );
            }
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_samples_and_another_seed_others() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyQwen2, 5);
    let rows: Vec<Vec<u32>> = std::iter::repeat_n(vec![40, 41, 42], 8).collect();
    let draw = |seed| generate(&model.decoder, &rows, &spec(1.0, 16), &mut GumbelNoise::new(seed)).unwrap();
    let (a, b, c) = (draw(1), draw(1), draw(2));
    assert_eq!(a, b);
    assert_ne!(
        a.iter().map(|x| &x.tokens).collect::<Vec<_>>(),
        c.iter().map(|x| &x.tokens).collect::<Vec<_>>()
    );
    let distinct: std::collections::HashSet<_> = a.iter().map(|x| x.tokens.clone()).collect();
    assert!(distinct.len() > 1, "a group's samples differ from each other");
}

#[test]
fn a_row_stops_at_the_help_tag_or_at_end_of_sequence_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyQwen2, 6);
    let vocab = model.decoder.config().vocab_size as u32;
    let all_but = |keep: &[u32]| (0..vocab).filter(|t| !keep.contains(t)).collect::<Vec<_>>();
    let help = GenerationSpec { banned: all_but(&[3]), ..spec(1.0, 8) };
    let out = generate(&model.decoder, &prompts(), &help, &mut GumbelNoise::new(1)).unwrap();
    assert!(out.iter().all(|c| c.tokens == [3] && c.finish == Finish::Help), "{out:?}");
    let eos = GenerationSpec { banned: all_but(&[2]), ..spec(0.0, 8) };
    let out = generate(&model.decoder, &prompts(), &eos, &mut GumbelNoise::new(1)).unwrap();
    assert!(out.iter().all(|c| c.tokens == [2] && c.finish == Finish::Eos));
    let never = GenerationSpec { banned: vec![2, 0, 3], ..spec(1.0, 5) };
    let out = generate(&model.decoder, &prompts(), &never, &mut GumbelNoise::new(1)).unwrap();
    assert!(out.iter().all(|c| c.tokens.len() == 5 && c.finish == Finish::Length));
    assert!(out.iter().all(|c| !c.tokens.iter().any(|t| [0, 2, 3].contains(t))), "banned ids never appear");
}

//! A group's samples share their prompt's computation, in training and in rollouts, and that changes
//! nothing: the shared-prefix log-probabilities and gradients are those of the full rows, and a
//! shared prefill samples the same tokens as prefilling every row.

use candle_core::{Device, Tensor};
use tandem_train::algorithms::loss::weighted_logprob_loss;
use tandem_train::algorithms::packing::{PackedRows, pack, response_logprobs};
use tandem_train::model::presets::Preset;
use tandem_train::model::{Mode, TrainableModel};
use tandem_train::rollout::noise::GumbelNoise;
use tandem_train::rollout::prompt_groups::PromptGroups;
use tandem_train::rollout::{GenerationSpec, generate_grouped};

use crate::support::INIT_STD;

/// Three groups (prompts of 7, 1 and 4 tokens, the one-token prompt has no prefix at all), a lone
/// row, and responses of different lengths within each group.
fn rows() -> Vec<(Vec<u32>, Vec<u32>)> {
    let a = vec![40, 41, 42, 43, 44, 45, 46];
    let b = vec![50];
    let c = vec![60, 61, 62, 63];
    vec![
        (a.clone(), vec![70, 71, 72, 2]),
        (a.clone(), vec![73]),
        (a, vec![74, 75, 76, 77, 78, 79]),
        (b.clone(), vec![80, 81]),
        (b, vec![82, 83, 84, 85, 3]),
        (c.clone(), vec![90, 91, 92]),
        (vec![30, 31], vec![93, 94]),
        (c.clone(), vec![95, 3]),
        (c, vec![96, 97, 98, 99, 100, 101, 2]),
    ]
}

fn packed(rows: &[(Vec<u32>, Vec<u32>)]) -> PackedRows {
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
    pack(&pairs, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn shared_prefix_logprobs_equal_the_full_rows_logprobs() {
    for preset in [Preset::TinyQwen2, Preset::TinyLlama] {
        let model = TrainableModel::random(&preset.config(), INIT_STD, 21, &Device::Cpu).unwrap();
        let shared = packed(&rows());
        assert_eq!(shared.prompt_groups.first_row, [0, 3, 5, 6, 7]);
        let full = shared.clone().without_prefix_sharing();
        for (mode, temperature) in [(Mode::Train, 1.0), (Mode::Train, 0.7), (Mode::Infer, 1.0)] {
            let a = response_logprobs(&model.decoder, &shared, mode, temperature).unwrap();
            let b = response_logprobs(&model.decoder, &full, mode, temperature).unwrap();
            let diff =
                max_abs_diff(&(a * &shared.response_mask).unwrap(), &(b * &shared.response_mask).unwrap());
            assert!(diff < 1e-4, "{preset:?} {mode:?} T={temperature}: max |diff| {diff}");
        }
    }
}

#[test]
fn rows_whose_prompts_are_a_single_token_need_no_prefix() {
    let model = TrainableModel::random(&Preset::TinyQwen2.config(), INIT_STD, 22, &Device::Cpu).unwrap();
    let rows = vec![(vec![50], vec![80, 81]), (vec![50], vec![82]), (vec![51], vec![83, 84, 2])];
    let shared = packed(&rows);
    assert!(shared.prompt_groups.shares());
    let a = response_logprobs(&model.decoder, &shared, Mode::Train, 1.0).unwrap();
    let b = response_logprobs(&model.decoder, &shared.clone().without_prefix_sharing(), Mode::Train, 1.0)
        .unwrap();
    assert!(
        max_abs_diff(&(a * &shared.response_mask).unwrap(), &(b * &shared.response_mask).unwrap()) < 1e-4
    );
}

#[test]
fn shared_prefix_gradients_equal_the_full_rows_gradients() {
    let model = TrainableModel::random(&Preset::TinyQwen2.config(), INIT_STD, 23, &Device::Cpu).unwrap();
    let shared = packed(&rows());
    let full = shared.clone().without_prefix_sharing();
    let scales = [0.5, -0.25, 0.125, 1.0, -1.0, 0.3, -0.7, 0.2, -0.05];
    let grads = |rows: &PackedRows| {
        let lp = response_logprobs(&model.decoder, rows, Mode::Train, 0.8).unwrap();
        weighted_logprob_loss(&lp, &rows.response_mask, &scales).unwrap().backward().unwrap()
    };
    let (a, b) = (grads(&shared), grads(&full));
    let vars = model.varmap.all_vars();
    assert!(!vars.is_empty());
    let mut largest = 0f32;
    for var in &vars {
        let (ga, gb) = (a.get(var.as_tensor()).unwrap(), b.get(var.as_tensor()).unwrap());
        let scale = gb.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = max_abs_diff(ga, gb);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "shape {:?}: max |diff| {diff}, max |grad| {scale}",
            var.shape()
        );
        largest = largest.max(scale);
    }
    assert!(largest > 1e-3, "the gradient is not trivially zero");
}

#[test]
fn a_shared_prefill_samples_what_prefilling_every_row_samples() {
    let model = TrainableModel::random(&Preset::TinyQwen2.config(), INIT_STD, 24, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = rows().into_iter().map(|(prompt, _)| prompt).collect();
    let groups = PromptGroups::of(&prompts);
    assert!(groups.shares());
    let spec = GenerationSpec {
        temperature: 1.0,
        max_new_tokens: 12,
        eos_ids: vec![2, 0],
        help_token: Some(3),
        banned: vec![],
        ignore_stops: false,
    };
    let draw = |groups: &PromptGroups| {
        generate_grouped(&model.decoder, &prompts, groups, &spec, &mut GumbelNoise::new(7)).unwrap()
    };
    let (shared, unshared) = (draw(&groups), draw(&PromptGroups::unshared(prompts.len())));
    for (row, (a, b)) in shared.iter().zip(&unshared).enumerate() {
        assert_eq!(a.tokens, b.tokens, "row {row}");
        assert_eq!(a.finish, b.finish, "row {row}");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-5, "row {row}: {x} vs {y}");
        }
    }
    let distinct: std::collections::HashSet<_> = shared[..3].iter().map(|c| c.tokens.clone()).collect();
    assert!(distinct.len() > 1, "a group's rows still sample independently after the shared prefill");
}

#[test]
fn groups_that_do_not_describe_the_prompts_are_refused() {
    let model = TrainableModel::random(&Preset::TinyQwen2.config(), INIT_STD, 25, &Device::Cpu).unwrap();
    let prompts = vec![vec![40, 41], vec![42, 43]];
    let spec = GenerationSpec {
        temperature: 0.0,
        max_new_tokens: 2,
        eos_ids: vec![],
        help_token: None,
        banned: vec![],
        ignore_stops: false,
    };
    let wrong = PromptGroups::of(&[1, 1]);
    assert!(generate_grouped(&model.decoder, &prompts, &wrong, &spec, &mut GumbelNoise::new(0)).is_err());
}

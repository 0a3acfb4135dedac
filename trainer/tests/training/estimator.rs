//! The GAPG update on packed rows is the paper's estimator on the device tokens: its gradient equals
//! Σ_i w_i ∇ Σ_t log π(y_it | x, y_i,<t) computed row by row on unpadded sequences, and a help-calling
//! row contributes exactly its device tokens (through the help tag).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use tandem_core::tasks::reward::Outcome;
use tandem_train::algorithms::AlgorithmKind;
use tandem_train::algorithms::group::{Group, Sample};
use tandem_train::algorithms::loss::weighted_logprob_loss;
use tandem_train::algorithms::packing::{pack, response_logprobs};
use tandem_train::algorithms::update_rows::update_rows;
use tandem_train::finetune::{FinetuneMode, Policy};
use tandem_train::model::presets::Preset;
use tandem_train::model::{HfCheckpoint, Mode, token_logprobs};
use tandem_train::rollout::Finish;

use crate::support::tiny_model;

fn sample(tokens: &[u32], reward: f64, help: bool) -> Sample {
    Sample {
        tokens: tokens.to_vec(),
        logprobs: vec![0.0; tokens.len()],
        finish: if help { Finish::Help } else { Finish::Eos },
        outcome: Outcome {
            asked_for_help: help,
            cloud_correct: help && reward > 0.0,
            local_correct: reward > 1.0,
            ..Outcome::default()
        },
        reward,
    }
}

#[test]
fn the_packed_gapg_loss_has_the_gradient_of_the_summed_device_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), Preset::TinyQwen2, 9);
    let policy = Policy::from_checkpoint(
        &HfCheckpoint::open(dir.path()).unwrap(),
        &FinetuneMode::Full,
        0,
        &Device::Cpu,
    )
    .unwrap();
    // Two prompts of different lengths; a correct answer, a help call (ends with tag id 3), a wrong one.
    let groups = vec![
        Group {
            problem: 0,
            prompt: vec![40, 41, 42, 43, 44],
            samples: vec![
                sample(&[50, 51, 52, 2], 2.2, false),
                sample(&[53, 3], 0.5, true),
                sample(&[54, 55, 2], 0.0, false),
            ],
        },
        Group {
            problem: 1,
            prompt: vec![60, 61],
            samples: vec![
                sample(&[62, 3], 0.5, true),
                sample(&[63, 64, 65, 66, 2], 0.2, false),
                sample(&[3], 0.0, true),
            ],
        },
    ];
    let rows = update_rows(AlgorithmKind::Gapg, &groups, &[0, 1], 0.0, 0.0);
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[1].tokens, [53, 3], "a help-calling row holds the device's tokens only");

    // Packed and batched, as the trainer does it.
    let pairs: Vec<(&[u32], &[u32])> =
        rows.iter().map(|r| (r.prompt.as_slice(), r.tokens.as_slice())).collect();
    let packed = pack(&pairs, &Device::Cpu).unwrap();
    let lp = response_logprobs(&policy.decoder, &packed, Mode::Train, 1.0).unwrap();
    let scales: Vec<f64> = rows.iter().map(|r| r.scale).collect();
    let loss = weighted_logprob_loss(&lp, &packed.response_mask, &scales).unwrap();
    let batched = loss.backward().unwrap();

    // By hand: each row alone, unpadded, −w_i · Σ_t log π(y_t | prefix).
    let mut by_hand: Option<Tensor> = None;
    for row in &rows {
        let sequence: Vec<u32> = row.prompt.iter().chain(&row.tokens).copied().collect();
        let n = sequence.len();
        let ids = Tensor::from_vec(sequence[..n - 1].to_vec(), (1, n - 1), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n - 1), DType::U32, &Device::Cpu).unwrap();
        let positions = Tensor::arange(0u32, (n - 1) as u32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let hidden = policy.decoder.forward(&ids, &mask, &positions, None, Mode::Train).unwrap();
        let logits = policy.decoder.logits(&hidden).unwrap();
        let targets = Tensor::from_vec(sequence[1..].to_vec(), (1, n - 1), &Device::Cpu).unwrap();
        let all = token_logprobs(&logits, &targets).unwrap();
        let device_part = all.narrow(1, row.prompt.len() - 1, row.tokens.len()).unwrap().sum_all().unwrap();
        let term = (device_part * -row.scale).unwrap();
        by_hand = Some(match by_hand {
            Some(total) => (total + term).unwrap(),
            None => term,
        });
    }
    let by_hand = by_hand.unwrap().backward().unwrap();

    let mut compared = 0;
    let mut norms: HashMap<String, f32> = HashMap::new();
    for (name, var) in policy.trainable_vars() {
        let (Some(a), Some(b)) = (batched.get(var.as_tensor()), by_hand.get(var.as_tensor())) else {
            panic!("{name} has no gradient");
        };
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff / scale < 1e-3, "{name}: max |diff| {diff} vs max |grad| {scale}");
        norms.insert(name, scale);
        compared += 1;
    }
    assert_eq!(compared, policy.trainable_vars().len());
    assert!(norms.values().any(|&n| n > 1e-4), "the gradient is not trivially zero");
}

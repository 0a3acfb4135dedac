//! LoRA: adapters start as a no-op, only adapters (and the final norm when asked) are trained, and
//! the merged weights written for export reproduce the adapted model's logits.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tandem_train::finetune::{FINAL_NORM, FinetuneMode, LoraSettings, Policy};
use tandem_train::model::presets::Preset;
use tandem_train::model::{Decoder, HfCheckpoint, LoraTarget, Mode};

use crate::support::tiny_model;

fn settings(train_final_norm: bool) -> FinetuneMode {
    FinetuneMode::Lora(LoraSettings {
        rank: 4,
        alpha: 8.0,
        targets: LoraTarget::ALL.to_vec(),
        train_final_norm,
    })
}

fn ids() -> Tensor {
    Tensor::new(&[[40u32, 41, 42, 43, 44, 45], [7, 8, 9, 10, 11, 12]], &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn fresh_adapters_leave_the_model_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyQwen2, 21);
    let policy =
        Policy::from_checkpoint(&HfCheckpoint::open(dir.path()).unwrap(), &settings(true), 1, &Device::Cpu)
            .unwrap();
    let diff =
        max_diff(&policy.decoder.full_logits(&ids()).unwrap(), &model.decoder.full_logits(&ids()).unwrap());
    assert!(diff < 1e-6, "B = 0 must make the adapters a no-op, diff {diff}");
}

#[test]
fn merged_lora_weights_reproduce_the_adapted_logits() {
    for preset in [Preset::TinyQwen2, Preset::TinyLlama] {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(dir.path(), preset, 22);
        let policy = Policy::from_checkpoint(
            &HfCheckpoint::open(dir.path()).unwrap(),
            &settings(true),
            2,
            &Device::Cpu,
        )
        .unwrap();
        // Trained-looking adapters: B away from zero, the norm away from one.
        for (i, (name, var)) in policy.trainable_vars().into_iter().enumerate() {
            let noise = (Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu).unwrap() * 0.05).unwrap();
            let noise = (noise * (1.0 + i as f64 / 100.0)).unwrap();
            if name.ends_with("lora_B.weight") || name == FINAL_NORM {
                var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
            }
        }
        let adapted = policy.decoder.full_logits(&ids()).unwrap();
        let merged = Decoder::load(
            policy.config(),
            VarBuilder::from_tensors(policy.merged_tensors().unwrap(), DType::F32, &Device::Cpu),
            0.0,
        )
        .unwrap();
        let diff = max_diff(&adapted, &merged.full_logits(&ids()).unwrap());
        // f32 rounding only: W·x + B·(A·x) and (W + B·A)·x sum in different orders.
        let scale = adapted.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        assert!(
            diff < 1e-5 * scale,
            "{preset:?}: merged vs adapted max |diff| {diff} at logit scale {scale}"
        );
        let base = HfCheckpoint::open(dir.path()).unwrap();
        let original =
            Decoder::load(&base.config, base.weights(DType::F32, &Device::Cpu).unwrap(), 0.0).unwrap();
        assert!(
            max_diff(&adapted, &original.full_logits(&ids()).unwrap()) > 1e-3,
            "the adapters changed something"
        );

        let out = tempfile::tempdir().unwrap();
        policy.save_merged(out.path()).unwrap();
        let saved = HfCheckpoint::open(out.path()).unwrap();
        let reloaded =
            Decoder::load(&saved.config, saved.weights(DType::F32, &Device::Cpu).unwrap(), 0.0).unwrap();
        let diff = max_diff(&adapted, &reloaded.full_logits(&ids()).unwrap());
        assert!(diff < 1e-5 * scale, "{preset:?}: the saved merged checkpoint differs by {diff}");
    }
}

#[test]
fn lora_trains_only_the_adapters_and_the_final_norm() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Preset::TinyLlama, 23);
    let layers = model.decoder.config().num_hidden_layers;
    for train_norm in [false, true] {
        let policy = Policy::from_checkpoint(
            &HfCheckpoint::open(dir.path()).unwrap(),
            &settings(train_norm),
            3,
            &Device::Cpu,
        )
        .unwrap();
        let names: Vec<String> = policy.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), layers * 7 * 2 + usize::from(train_norm), "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight") || n == FINAL_NORM)
        );
        let mask = Tensor::ones((2, 6), DType::U32, &Device::Cpu).unwrap();
        let positions =
            Tensor::arange(0u32, 6, &Device::Cpu).unwrap().unsqueeze(0).unwrap().repeat((2, 1)).unwrap();
        let hidden = policy.decoder.forward(&ids(), &mask, &positions, None, Mode::Train).unwrap();
        let loss = policy.decoder.logits(&hidden).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let with_grad =
            policy.trainable_vars().iter().filter(|(_, v)| grads.get(v.as_tensor()).is_some()).count();
        assert_eq!(with_grad, names.len(), "every trainable variable is in the graph");
        // A gets no signal while B = 0 (as PEFT); B and the norm do.
        for (name, var) in policy.trainable_vars() {
            let norm = grads
                .get(var.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if name.ends_with("lora_B.weight") || name == FINAL_NORM {
                assert!(norm > 0.0, "{name} gets no gradient");
            }
        }
    }
}

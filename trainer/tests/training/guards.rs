//! A run stops with a clear message when the loss is not finite, without applying the update.

use candle_core::{Device, Tensor};
use tandem_train::model::presets::Preset;
use tandem_train::run::{ProgressMode, RunConfig, RunError, Trainer};

use crate::support::{countdown_data, tiny_model, toml_path};

#[test]
fn a_nan_loss_stops_the_run_before_the_update_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let model = tiny_model(&base, Preset::TinyLlama, 51);
    let (_, _, sft) = countdown_data(&dir.path().join("data"), 10, 2);
    // Poison one weight and save the model again.
    let mut tensors = model.tensors();
    let name = "model.layers.0.mlp.up_proj.weight";
    let shape = tensors[name].shape().clone();
    tensors.insert(name.into(), Tensor::full(f32::NAN, shape, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, base.join("model.safetensors")).unwrap();
    let text = format!(
        r#"
[run]
out_dir = "{out}"
steps = 3

[model]
checkpoint = "{model}"

[task]
kind = "countdown"

[algorithm]
kind = "sft"

[sft]
data = "{sft}"
batch_size = 4

[optimizer]
lr = 1e-3
"#,
        out = toml_path(&dir.path().join("run")),
        model = toml_path(&base),
        sft = toml_path(&sft)
    );
    let config = RunConfig::parse(&text).unwrap();
    let err = Trainer::prepare(config, false).unwrap().run(ProgressMode::Quiet).unwrap_err();
    assert!(matches!(err, RunError::NonFinite { step: 1, what: "loss", .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("not applied") && message.contains("No checkpoint was written yet"),
        "{message}"
    );
    assert!(!dir.path().join("run/checkpoints").exists());
}

//! A run that is stopped and resumed from its checkpoint ends with exactly the weights of a run that
//! never stopped; a run directory is never reused by accident. The policy is warm-started with a few
//! supervised steps first, so GAPG's samples differ in reward and the updates are real.

use std::path::Path;

use tandem_train::model::presets::Preset;
use tandem_train::run::metrics::MetricsRecord;
use tandem_train::run::{ProgressMode, RunConfig, RunError, Trainer};

use crate::support::{countdown_data, tiny_model, toml_path};

fn sft_config(out: &Path, model: &Path, sft: &Path) -> RunConfig {
    let text = format!(
        r#"
[run]
out_dir = "{out}"
steps = 30
checkpoint_every = 30

[model]
checkpoint = "{model}"

[task]
kind = "countdown"

[algorithm]
kind = "sft"

[sft]
data = "{sft}"
batch_size = 8

[optimizer]
lr = 3e-3
"#,
        out = toml_path(out),
        model = toml_path(model),
        sft = toml_path(sft)
    );
    let config = RunConfig::parse(&text).unwrap();
    config.validate().unwrap();
    config
}

fn gapg_config(out: &Path, model: &Path, train: &Path, steps: u64) -> RunConfig {
    rl_config(out, model, train, steps, "kind = \"gapg\"\nfilter = false", "")
}

/// A small reinforcement-learning run with `algorithm` lines and extra sections.
fn rl_config(out: &Path, model: &Path, train: &Path, steps: u64, algorithm: &str, extra: &str) -> RunConfig {
    let text = format!(
        r#"
[run]
out_dir = "{out}"
seed = 5
steps = {steps}
checkpoint_every = 2
keep_checkpoints = 3

[model]
checkpoint = "{model}"

[task]
kind = "countdown"
train = "{train}"
reward_version = "v1"

[algorithm]
{algorithm}

[rollout]
prompts_per_step = 3
group_size = 4
max_new_tokens = 56

[optimizer]
lr = 1e-3
micro_batch_rows = 5

[cloud]
kind = "solver"
{extra}
"#,
        out = toml_path(out),
        model = toml_path(model),
        train = toml_path(train)
    );
    let config = RunConfig::parse(&text).unwrap();
    config.validate().unwrap();
    config
}

fn train_records(records: &[MetricsRecord]) -> Vec<(u64, Option<f64>, bool, f64)> {
    records
        .iter()
        .filter_map(|r| match r {
            MetricsRecord::Train(m) => Some((m.step, m.reward, m.updated, m.grad_norm)),
            MetricsRecord::Eval(_) => None,
        })
        .collect()
}

#[test]
fn resuming_from_a_checkpoint_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    tiny_model(&base, Preset::TinyQwen2, 41);
    let (train, _, sft) = countdown_data(&dir.path().join("data"), 40, 5);
    let warm = Trainer::prepare(sft_config(&dir.path().join("sft"), &base, &sft), false)
        .unwrap()
        .run(ProgressMode::Quiet)
        .unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(dir.path().join("sft/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert!(
        losses[25..].iter().sum::<f64>() < 0.8 * losses[..5].iter().sum::<f64>(),
        "SFT lowers the loss: {losses:?}"
    );
    assert!(warm.plots.iter().any(|p| p.ends_with("loss.png")));

    let straight = dir.path().join("straight");
    Trainer::prepare(gapg_config(&straight, &warm.final_model, &train, 4), false)
        .unwrap()
        .run(ProgressMode::Quiet)
        .unwrap();

    let interrupted = dir.path().join("interrupted");
    Trainer::prepare(gapg_config(&interrupted, &warm.final_model, &train, 2), false)
        .unwrap()
        .run(ProgressMode::Quiet)
        .unwrap();
    let again = Trainer::prepare(gapg_config(&interrupted, &warm.final_model, &train, 4), false);
    assert!(
        matches!(again, Err(RunError::RunExists(_))),
        "a finished run is not overwritten without --resume"
    );
    let resumed = Trainer::prepare(gapg_config(&interrupted, &warm.final_model, &train, 4), true).unwrap();
    assert_eq!(resumed.step(), 2);
    resumed.run(ProgressMode::Quiet).unwrap();

    let read = |run: &Path| std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(
        read(&straight) == read(&interrupted),
        "the resumed run's final weights differ from the uninterrupted run's"
    );
    let metrics = |run: &Path| {
        train_records(&tandem_train::run::metrics::read_records(&run.join("metrics.jsonl")).unwrap())
    };
    let (a, b) = (metrics(&straight), metrics(&interrupted));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "same rewards, updates and gradient norms step by step");
    assert!(a.iter().any(|m| m.2 && m.3 > 0.0), "at least one real update happened: {a:?}");
    let checkpoint = std::fs::read(straight.join("checkpoints/step-000004/model.safetensors")).unwrap();
    assert!(checkpoint == read(&straight), "the last checkpoint is the final model");
}

#[test]
fn grpo_dr_grpo_and_lora_runs_update_and_lora_runs_resume() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    tiny_model(&base, Preset::TinyLlama, 42);
    let (train, _, sft) = countdown_data(&dir.path().join("data"), 40, 5);
    let mut warm_config = sft_config(&dir.path().join("sft"), &base, &sft);
    warm_config.run.steps = 20;
    warm_config.run.checkpoint_every = 20;
    let warm = Trainer::prepare(warm_config, false).unwrap().run(ProgressMode::Quiet).unwrap().final_model;

    for (name, algorithm) in [
        ("grpo", "kind = \"grpo\"\nkl_beta = 0.04"),
        ("dr_grpo", "kind = \"dr_grpo\"\nupdates_per_batch = 2"),
    ] {
        let out = dir.path().join(name);
        Trainer::prepare(rl_config(&out, &warm, &train, 2, algorithm, ""), false)
            .unwrap()
            .run(ProgressMode::Quiet)
            .unwrap();
        let records = tandem_train::run::metrics::read_records(&out.join("metrics.jsonl")).unwrap();
        let steps: Vec<_> = records
            .iter()
            .filter_map(|r| if let MetricsRecord::Train(m) = r { Some(m.clone()) } else { None })
            .collect();
        assert_eq!(steps.len(), 2, "{name}");
        assert!(steps.iter().any(|m| m.updated && m.grad_norm > 0.0), "{name}: {steps:?}");
        assert_eq!(steps[0].selected, Some(3), "{name}: no filtering, every prompt enters the update");
        if name == "grpo" {
            assert!(steps.iter().all(|m| m.kl.is_some()), "GRPO reports its KL to the reference");
        }
    }

    let lora =
        "[finetune]\nmode = \"lora\"\n\n[finetune.lora]\nrank = 4\nalpha = 8.0\ntrain_final_norm = true\n";
    let straight = dir.path().join("lora-straight");
    Trainer::prepare(rl_config(&straight, &warm, &train, 4, "kind = \"gapg\"\nfilter = false", lora), false)
        .unwrap()
        .run(ProgressMode::Quiet)
        .unwrap();
    let interrupted = dir.path().join("lora-interrupted");
    Trainer::prepare(
        rl_config(&interrupted, &warm, &train, 2, "kind = \"gapg\"\nfilter = false", lora),
        false,
    )
    .unwrap()
    .run(ProgressMode::Quiet)
    .unwrap();
    assert!(interrupted.join("checkpoints/step-000002/adapter_model.safetensors").is_file());
    Trainer::prepare(
        rl_config(&interrupted, &warm, &train, 4, "kind = \"gapg\"\nfilter = false", lora),
        true,
    )
    .unwrap()
    .run(ProgressMode::Quiet)
    .unwrap();
    let read = |run: &Path| std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(read(&straight) == read(&interrupted), "a resumed LoRA run ends with the same merged weights");
}

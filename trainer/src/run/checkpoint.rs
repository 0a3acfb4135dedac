//! Checkpoints of a run, under `<run>/checkpoints/step-NNNNNN/`:
//!
//! - full fine-tuning: `config.json` + `model.safetensors` (Hugging Face names, f32) + the tokenizer
//!   files, so the folder is itself a checkpoint `eval` and `export` read;
//! - LoRA: `adapter_model.safetensors` (adapters and any trained module) + `adapter_config.json`;
//! - `optimizer.safetensors`: the AdamW moments (`m.<name>`, `v.<name>`);
//! - `state.json`: steps done, optimiser steps, the seed the per-step random streams derive from,
//!   and the configuration's fingerprint.
//!
//! A checkpoint is written into a temporary folder and renamed into place, then `latest` (one line:
//! the folder name) is replaced atomically, so a crash never leaves a half-written latest checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::finetune::Policy;
use crate::optim::Optimizer;

/// The folder holding a run's checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The file naming the latest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
const FULL_WEIGHTS: &str = "model.safetensors";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
/// Files copied from the starting checkpoint so a full checkpoint folder is self-contained.
pub const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// Errors saving or loading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("saving the model: {0}")]
    Model(#[from] crate::finetune::PolicyError),
    #[error("tensors: {0}")]
    Tensors(#[from] candle_core::Error),
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Training steps completed.
    pub step: u64,
    /// Optimiser updates applied (steps without a learning signal do not update).
    pub optimizer_steps: u64,
    /// The run's seed: every per-step random stream is derived from it and the step number.
    pub seed: u64,
    /// SHA-256 of the configuration without `run.steps` (a resumed run may only extend `steps`).
    pub config_fingerprint: String,
    /// `full` or `lora`.
    pub finetune: String,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Restored {
    /// Its folder.
    pub dir: PathBuf,
    /// `state.json`.
    pub state: TrainerState,
    /// The trainable tensors by name.
    pub trainable: HashMap<String, Tensor>,
    /// The optimiser moments by name.
    pub optimizer: HashMap<String, Tensor>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Writes a checkpoint of the run in `run_dir` and prunes all but the newest `keep`.
pub fn save(
    run_dir: &Path,
    state: &TrainerState,
    policy: &Policy,
    optimizer: &Optimizer,
    tokenizer_dir: &Path,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:06}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if policy.lora().is_some() {
        candle_core::safetensors::save(&policy.trainable_tensors(), tmp.join(ADAPTER_WEIGHTS))?;
        let lora = serde_json::to_string_pretty(&policy.lora()).expect("LoRA settings serialise");
        std::fs::write(tmp.join("adapter_config.json"), lora).map_err(io(&tmp))?;
    } else {
        policy.save_merged(&tmp)?;
        for file in TOKENIZER_FILES {
            let source = tokenizer_dir.join(file);
            if source.is_file() {
                std::fs::copy(&source, tmp.join(file)).map_err(io(&source))?;
            }
        }
    }
    candle_core::safetensors::save(&optimizer.state_tensors(), tmp.join(OPTIMIZER_FILE))?;
    let state_text = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(tmp.join(STATE_FILE), state_text).map_err(io(&tmp))?;
    let dir = root.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, format!("{name}\n")).map_err(io(&latest_tmp))?;
    std::fs::rename(&latest_tmp, root.join(LATEST_FILE)).map_err(io(&root))?;
    prune(&root, &name, keep)?;
    Ok(dir)
}

fn prune(root: &Path, latest: &str, keep: usize) -> Result<(), CheckpointError> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep.max(1));
    for name in names.into_iter().take(excess).filter(|n| n != latest) {
        let path = root.join(name);
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// The folder of the latest complete checkpoint, if any.
pub fn latest_dir(run_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let latest = root.join(LATEST_FILE);
    if !latest.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(io(&latest))?;
    let dir = root.join(name.trim());
    if !dir.join(STATE_FILE).is_file() {
        return Err(CheckpointError::Invalid {
            path: dir,
            message: "the latest checkpoint has no state.json".into(),
        });
    }
    Ok(Some(dir))
}

/// Reads the latest checkpoint of a run.
pub fn load_latest(run_dir: &Path, device: &Device) -> Result<Option<Restored>, CheckpointError> {
    let Some(dir) = latest_dir(run_dir)? else { return Ok(None) };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Invalid { path: state_path.clone(), message: e.to_string() })?;
    let weights =
        if dir.join(ADAPTER_WEIGHTS).is_file() { dir.join(ADAPTER_WEIGHTS) } else { dir.join(FULL_WEIGHTS) };
    let trainable = candle_core::safetensors::load(&weights, device)?;
    let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), device)?;
    Ok(Some(Restored { dir, state, trainable, optimizer }))
}

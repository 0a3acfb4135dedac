//! Hugging Face checkpoint folders: `config.json` plus single or sharded safetensors
//! (bf16, f16 or f32 on disk), read into f32; and writing a model back in the same format.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{ConfigError, ModelConfig};

/// Errors opening or writing a checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error(
        "{0}: no model.safetensors or model.safetensors.index.json; a checkpoint folder holds \
         config.json and its weights in safetensors format"
    )]
    NoWeights(PathBuf),
    #[error("{path}: invalid shard index: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("reading weights: {0}")]
    Weights(#[from] candle_core::Error),
}

/// The config file of a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened checkpoint folder.
pub struct HfCheckpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Its parsed `config.json`.
    pub config: ModelConfig,
    /// The safetensors files holding the weights.
    pub weight_files: Vec<PathBuf>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("dir", &self.dir)
            .field("weight_files", &self.weight_files)
            .finish()
    }
}

impl HfCheckpoint {
    /// Opens `dir`: parses `config.json` and finds the weight files (sharded or not).
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = read_to_string(&config_path)?;
        let config = ModelConfig::from_hf_json(&text)
            .map_err(|source| CheckpointError::Config { path: config_path, source })?;
        let weight_files = find_weight_files(dir)?;
        Ok(Self { dir: dir.to_path_buf(), config, weight_files })
    }

    /// The weights as a read-only (constant, memory-mapped) `VarBuilder`, converted to `dtype`.
    pub fn weights(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, CheckpointError> {
        // SAFETY: the files are memory-mapped read-only; Tandem never writes a checkpoint it is reading.
        Ok(unsafe { VarBuilder::from_mmaped_safetensors(&self.weight_files, dtype, device)? })
    }

    /// `tokenizer.json` of the folder, when it has one.
    pub fn tokenizer_file(&self) -> Option<PathBuf> {
        Some(self.dir.join("tokenizer.json")).filter(|p| p.is_file())
    }

    /// `tokenizer_config.json` of the folder (chat template, special tokens), when it has one.
    pub fn tokenizer_config_file(&self) -> Option<PathBuf> {
        Some(self.dir.join("tokenizer_config.json")).filter(|p| p.is_file())
    }
}

fn read_to_string(path: &Path) -> Result<String, CheckpointError> {
    std::fs::read_to_string(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })
}

fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let single = dir.join(SINGLE_WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(SHARD_INDEX_FILE);
    if !index_path.is_file() {
        return Err(CheckpointError::NoWeights(dir.to_path_buf()));
    }
    let index: serde_json::Value = serde_json::from_str(&read_to_string(&index_path)?)
        .map_err(|e| CheckpointError::BadIndex { path: index_path.clone(), message: e.to_string() })?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        CheckpointError::BadIndex { path: index_path.clone(), message: "no weight_map object".into() }
    })?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(CheckpointError::BadIndex {
            path: index_path.clone(),
            message: format!("shard {} is missing", missing.display()),
        });
    }
    Ok(files)
}

/// Writes `config.json` and `model.safetensors` (f32) for the named tensors into `dir`.
pub fn save_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.to_path_buf(), source })?;
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, config.to_hf_json())
        .map_err(|source| CheckpointError::Io { path: config_path, source })?;
    let f32_tensors = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.to_dtype(DType::F32)?)))
        .collect::<Result<std::collections::HashMap<_, _>, candle_core::Error>>()?;
    candle_core::safetensors::save(&f32_tensors, dir.join(SINGLE_WEIGHTS_FILE))?;
    Ok(())
}

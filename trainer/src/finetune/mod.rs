//! The policy being trained: full fine-tuning (every weight a variable) or LoRA (frozen base weights,
//! trainable low-rank adapters on the chosen projections, optionally the final norm as a
//! "module to save"). Adapters are merged into the weights for export and for the frozen reference
//! model of GRPO's KL term.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::checkpoint::{CheckpointError, save_checkpoint};
use crate::model::{Decoder, HfCheckpoint, LoraTarget, ModelConfig};

/// The final norm's weight, the usual LoRA "module to save".
pub const FINAL_NORM: &str = "model.norm.weight";

/// Errors building or saving the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("restoring trainable weights: {0}")]
    Restore(String),
}

/// LoRA's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank r of each adapter.
    pub rank: usize,
    /// α: adapters are scaled by α / r.
    pub alpha: f64,
    /// Projections that get adapters (default: all seven).
    #[serde(default = "all_targets")]
    pub targets: Vec<LoraTarget>,
    /// Also train the final RMSNorm gain (PEFT's `modules_to_save`).
    #[serde(default)]
    pub train_final_norm: bool,
}

fn all_targets() -> Vec<LoraTarget> {
    LoraTarget::ALL.to_vec()
}

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum FinetuneMode {
    /// Every weight.
    Full,
    /// Adapters (and optionally the final norm) on frozen base weights.
    Lora(LoraSettings),
}

/// A weight source that hands out trainable variables for some names and frozen tensors for the
/// rest, remembering both.
struct SplitBackend {
    source: VarBuilder<'static>,
    trainable: VarMap,
    is_trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
    frozen: Mutex<HashMap<String, Tensor>>,
}

impl SimpleBackend for SplitBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.source.get(s, name)?.to_dtype(dtype)?.to_device(dev)?;
        self.keep(name, tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.source.get_unchecked(name)?.to_dtype(dtype)?.to_device(dev)?;
        self.keep(name, tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_tensor(name)
    }
}

impl SplitBackend {
    fn keep(&self, name: &str, tensor: Tensor) -> candle_core::Result<Tensor> {
        if (self.is_trainable)(name) {
            let mut vars = self.trainable.data().lock().expect("the var map lock is never poisoned");
            if let Some(var) = vars.get(name) {
                return Ok(var.as_tensor().clone());
            }
            // A copy: updating the variable must not write into the source (a memory map).
            let var = Var::from_tensor(&tensor.copy()?)?;
            let out = var.as_tensor().clone();
            vars.insert(name.to_string(), var);
            Ok(out)
        } else {
            self.frozen
                .lock()
                .expect("the frozen map lock is never poisoned")
                .insert(name.to_string(), tensor.clone());
            Ok(tensor)
        }
    }
}

/// The policy: its decoder, the variables an optimiser updates, and the frozen base weights.
pub struct Policy {
    /// The decoder (with adapters under LoRA).
    pub decoder: Decoder,
    config: ModelConfig,
    trainable: VarMap,
    frozen: HashMap<String, Tensor>,
    lora: Option<LoraSettings>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("lora", &self.lora)
            .field("trainable", &self.trainable_vars().len())
            .finish()
    }
}

impl Policy {
    /// Loads `checkpoint` for training in `mode`. LoRA's A matrices are drawn with `seed`
    /// (Kaiming-uniform as PEFT: U(−1/√in, 1/√in)); B starts at zero.
    pub fn from_checkpoint(
        checkpoint: &HfCheckpoint,
        mode: &FinetuneMode,
        seed: u64,
        device: &Device,
    ) -> Result<Self, PolicyError> {
        let source = checkpoint.weights(DType::F32, device)?;
        Self::from_weights(&checkpoint.config, source, mode, seed, device)
    }

    /// Builds the policy from weights in `source` (HF names).
    pub fn from_weights(
        config: &ModelConfig,
        source: VarBuilder<'static>,
        mode: &FinetuneMode,
        seed: u64,
        device: &Device,
    ) -> Result<Self, PolicyError> {
        let trainable = VarMap::new();
        let is_trainable: Box<dyn Fn(&str) -> bool + Send + Sync> = match mode {
            FinetuneMode::Full => Box::new(|_| true),
            FinetuneMode::Lora(settings) => {
                let norm = settings.train_final_norm;
                Box::new(move |name| norm && name == FINAL_NORM)
            }
        };
        let backend =
            SplitBackend { source, trainable: trainable.clone(), is_trainable, frozen: Mutex::default() };
        let frozen_handle = std::sync::Arc::new(backend);
        let vb =
            VarBuilder::from_backend(Box::new(ArcBackend(frozen_handle.clone())), DType::F32, device.clone());
        let base = Decoder::load(config, vb, 0.0)?;
        let frozen =
            std::mem::take(&mut *frozen_handle.frozen.lock().expect("the frozen map lock is never poisoned"));
        let (decoder, lora) = match mode {
            FinetuneMode::Full => (base, None),
            FinetuneMode::Lora(settings) => {
                let adapters = VarBuilder::from_varmap(&trainable, DType::F32, device);
                let adapted = base.with_lora(&settings.targets, settings.rank, settings.alpha, adapters)?;
                seed_lora_a(&trainable, seed)?;
                (adapted, Some(settings.clone()))
            }
        };
        Ok(Self { decoder, config: config.clone(), trainable, frozen, lora })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The LoRA settings, when training adapters.
    pub fn lora(&self) -> Option<&LoraSettings> {
        self.lora.as_ref()
    }

    /// The variables to optimise, sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.trainable.data().lock().expect("the var map lock is never poisoned");
        let mut vars: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The current values of the trainable variables.
    pub fn trainable_tensors(&self) -> HashMap<String, Tensor> {
        self.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
    }

    /// Sets every trainable variable from `tensors` (a checkpoint).
    pub fn restore(&self, tensors: &HashMap<String, Tensor>) -> Result<(), PolicyError> {
        for (name, var) in self.trainable_vars() {
            let saved =
                tensors.get(&name).ok_or_else(|| PolicyError::Restore(format!("no tensor `{name}`")))?;
            if saved.shape() != var.shape() {
                return Err(PolicyError::Restore(format!(
                    "`{name}` has shape {:?} in the checkpoint, {:?} in the model",
                    saved.shape(),
                    var.shape()
                )));
            }
            var.set(&saved.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Every weight under its Hugging Face name, adapters merged: `W + (α/r) · B A`.
    pub fn merged_tensors(&self) -> Result<HashMap<String, Tensor>, PolicyError> {
        let mut tensors = self.frozen.clone();
        let mut adapters: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, var) in self.trainable_vars() {
            if let Some(base) = name.strip_suffix(".lora_A.weight") {
                adapters.entry(base.to_string()).or_default().0 = Some(var.as_tensor().clone());
            } else if let Some(base) = name.strip_suffix(".lora_B.weight") {
                adapters.entry(base.to_string()).or_default().1 = Some(var.as_tensor().clone());
            } else {
                tensors.insert(name, var.as_tensor().clone());
            }
        }
        if let Some(lora) = &self.lora {
            let scale = lora.alpha / lora.rank as f64;
            for (module, pair) in adapters {
                let (Some(a), Some(b)) = pair else {
                    return Err(PolicyError::Restore(format!("adapter of {module} is incomplete")));
                };
                let key = format!("{module}.weight");
                let base =
                    tensors.get(&key).ok_or_else(|| PolicyError::Restore(format!("no base weight {key}")))?;
                let merged = (base + (b.matmul(&a)? * scale)?)?;
                tensors.insert(key, merged);
            }
        }
        Ok(tensors)
    }

    /// A decoder over a frozen copy of the current (merged) weights: GRPO's reference model.
    pub fn frozen_copy(&self) -> Result<Decoder, PolicyError> {
        let device = self.decoder.device().clone();
        let copies = self
            .merged_tensors()?
            .into_iter()
            .map(|(name, t)| Ok((name, t.copy()?)))
            .collect::<Result<HashMap<_, _>, candle_core::Error>>()?;
        Ok(Decoder::load(&self.config, VarBuilder::from_tensors(copies, DType::F32, &device), 0.0)?)
    }

    /// Writes the merged weights as a Hugging Face checkpoint folder (`config.json`, `model.safetensors`).
    pub fn save_merged(&self, dir: &std::path::Path) -> Result<(), PolicyError> {
        Ok(save_checkpoint(dir, &self.config, &self.merged_tensors()?)?)
    }
}

/// Shares one backend between the builder and the code that reads what it recorded.
struct ArcBackend(std::sync::Arc<SplitBackend>);

impl SimpleBackend for ArcBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Draws every `lora_A` from U(−1/√in, 1/√in) with a seeded stream, in name order.
fn seed_lora_a(trainable: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = trainable.data().lock().expect("the var map lock is never poisoned");
    let mut names: Vec<&String> = data.keys().filter(|n| n.ends_with("lora_A.weight")).collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let (rank, fan_in) = var.dims2()?;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let values: Vec<f32> = (0..rank * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
        var.set(&Tensor::from_vec(values, (rank, fan_in), var.device())?)?;
    }
    Ok(())
}

//! Where a decoder's weights come from: a seeded random initialisation, a checkpoint loaded as
//! trainable variables, and the named tensors written back to disk.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{CheckpointError, HfCheckpoint, save_checkpoint};
use super::config::ModelConfig;
use super::decoder::Decoder;

/// A decoder whose weights are trainable variables, with the map that owns them.
pub struct TrainableModel {
    /// The variables, by Hugging Face name.
    pub varmap: VarMap,
    /// The decoder reading those variables.
    pub decoder: Decoder,
}

impl std::fmt::Debug for TrainableModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableModel").field("config", self.decoder.config()).finish()
    }
}

impl TrainableModel {
    /// A fresh model: matrices drawn from N(0, `init_std`) with a seeded generator, norms 1, biases 0.
    /// The same config, seed and std always give the same weights.
    pub fn random(
        config: &ModelConfig,
        init_std: f64,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let varmap = VarMap::new();
        let decoder = Decoder::load(config, VarBuilder::from_varmap(&varmap, DType::F32, device), init_std)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (name, var) in sorted_vars(&varmap) {
            if name.ends_with("norm.weight") || name.ends_with(".bias") {
                continue;
            }
            let values: Vec<f32> =
                (0..var.elem_count()).map(|_| standard_normal(&mut rng) * init_std as f32).collect();
            var.set(&Tensor::from_vec(values, var.shape(), device)?)?;
        }
        Ok(Self { varmap, decoder })
    }

    /// Loads a checkpoint folder as trainable f32 variables.
    pub fn from_checkpoint(checkpoint: &HfCheckpoint, device: &Device) -> Result<Self, CheckpointError> {
        let frozen = checkpoint.weights(DType::F32, device)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let decoder = Decoder::load(&checkpoint.config, vb, 0.0)?;
        for (name, var) in sorted_vars(&varmap) {
            var.set(&frozen.get(var.shape(), &name)?)?;
        }
        Ok(Self { varmap, decoder })
    }

    /// Named tensors of every weight, ready for safetensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        sorted_vars(&self.varmap).into_iter().map(|(name, var)| (name, var.as_tensor().clone())).collect()
    }

    /// Writes the model as a Hugging Face checkpoint folder (`config.json` + `model.safetensors`).
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        save_checkpoint(dir, self.decoder.config(), &self.tensors())
    }
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().expect("the var map lock is never poisoned");
    let mut vars: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Box–Muller: one N(0, 1) draw.
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

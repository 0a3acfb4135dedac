//! Optimisation: AdamW with decoupled weight decay (not applied to norms and biases) or plain SGD,
//! global-norm gradient clipping, and the learning-rate schedule.
//!
//! Candle's own `AdamW` decays every parameter and has no clipping, hence this module. Moments are
//! kept in f32 by parameter name, so they can be saved with a checkpoint and restored exactly.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW (Loshchilov & Hutter): Adam moments, weight decay applied to the weights directly.
    Adamw,
    /// Plain gradient descent `θ ← θ − lr · g` (the update the paper writes down).
    Sgd,
}

/// The optimiser's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    /// The update rule.
    pub kind: OptimizerKind,
    /// Adam's β₁.
    pub beta1: f64,
    /// Adam's β₂.
    pub beta2: f64,
    /// Adam's ε.
    pub eps: f64,
    /// Decoupled weight decay (per step: `θ ← θ − lr · wd · θ`), never on norms and biases.
    pub weight_decay: f64,
}

/// Whether weight decay skips a parameter: biases and normalisation gains.
pub fn is_exempt_from_decay(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("norm.")
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// The optimiser over a set of named variables.
pub struct Optimizer {
    settings: OptimizerSettings,
    params: Vec<Param>,
    step: u64,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("settings", &self.settings)
            .field("params", &self.params.len())
            .field("step", &self.step)
            .finish()
    }
}

impl Optimizer {
    /// An optimiser over `vars` (name, variable), moments at zero.
    pub fn new(vars: Vec<(String, Var)>, settings: OptimizerSettings) -> candle_core::Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Param { decay: !is_exempt_from_decay(&name), name, m: zeros.clone(), v: zeros, var })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { settings, params, step: 0 })
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Names of the optimised variables.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The optimised variables.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// One update with learning rate `lr`. Variables without a gradient are left alone (as PyTorch
    /// does for parameters whose `.grad` is `None`).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let OptimizerSettings { kind, beta1, beta2, eps, weight_decay } = self.settings;
        let t = self.step as i32;
        for param in &mut self.params {
            let Some(grad) = grads.get(&param.name) else { continue };
            let grad = grad.to_dtype(DType::F32)?;
            let theta = param.var.as_tensor().to_dtype(DType::F32)?;
            let update = match kind {
                OptimizerKind::Sgd => grad,
                OptimizerKind::Adamw => {
                    param.m = ((&param.m * beta1)? + (&grad * (1.0 - beta1))?)?;
                    param.v = ((&param.v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&param.m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&param.v / (1.0 - beta2.powi(t)))?;
                    (m_hat / (v_hat.sqrt()? + eps)?)?
                }
            };
            let mut next = (&theta - (update * lr)?)?;
            if param.decay && weight_decay != 0.0 && kind == OptimizerKind::Adamw {
                next = (next - (&theta * (lr * weight_decay))?)?;
            }
            param.var.set(&next.to_dtype(param.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments by name (`m.<name>`, `v.<name>`), for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .flat_map(|p| [(format!("m.{}", p.name), p.m.clone()), (format!("v.{}", p.name), p.v.clone())])
            .collect()
    }

    /// Restores moments and the step count saved by [`Optimizer::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> candle_core::Result<()> {
        for param in &mut self.params {
            for (prefix, slot) in [("m", &mut param.m), ("v", &mut param.v)] {
                let key = format!("{prefix}.{}", param.name);
                let saved = tensors
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{key}`")))?;
                if saved.shape() != param.var.shape() {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        saved.shape(),
                        param.var.shape()
                    );
                }
                *slot = saved.to_dtype(DType::F32)?.to_device(param.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients.
pub fn global_norm(grads: &HashMap<String, Tensor>) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for grad in grads.values() {
        total += grad.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scales the gradients so their global norm is at most `max_norm` (when `max_norm` > 0); returns
/// the norm before clipping.
pub fn clip_global_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> candle_core::Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for grad in grads.values_mut() {
            *grad = (&*grad * scale)?;
        }
    }
    Ok(norm)
}

/// The learning rate over training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then a cosine decay to `min_ratio` × the base rate at
    /// the last step.
    WarmupCosine {
        /// Steps of linear warm-up.
        warmup_steps: u64,
        /// Final rate as a fraction of the base rate.
        #[serde(default)]
        min_ratio: f64,
    },
}

impl LrSchedule {
    /// The rate for 0-based `step` of `total_steps`, given the base rate.
    pub fn rate(&self, base: f64, step: u64, total_steps: u64) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::WarmupCosine { warmup_steps, min_ratio } => {
                if step < warmup_steps {
                    return base * (step + 1) as f64 / warmup_steps as f64;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                base * (min_ratio + (1.0 - min_ratio) * cosine)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn settings(kind: OptimizerKind, weight_decay: f64) -> OptimizerSettings {
        OptimizerSettings { kind, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_the_learning_rate_against_its_gradient_sign() {
        let w = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt =
            Optimizer::new(vec![("layer.weight".into(), w.clone())], settings(OptimizerKind::Adamw, 0.0))
                .unwrap();
        let grads = HashMap::from([(
            "layer.weight".to_string(),
            Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap(),
        )]);
        opt.step(&grads, 0.1).unwrap();
        let v = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn weight_decay_is_decoupled_and_skips_norms_and_biases() {
        let w = Var::from_vec(vec![2.0f32], 1, &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![2.0f32], 1, &Device::Cpu).unwrap();
        let n = Var::from_vec(vec![2.0f32], 1, &Device::Cpu).unwrap();
        let vars = vec![
            ("model.layers.0.mlp.up_proj.weight".to_string(), w.clone()),
            ("model.layers.0.self_attn.q_proj.bias".to_string(), b.clone()),
            ("model.norm.weight".to_string(), n.clone()),
        ];
        let mut opt = Optimizer::new(vars, settings(OptimizerKind::Adamw, 0.5)).unwrap();
        let zero = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let grads: HashMap<_, _> = opt.names().map(|n| (n.to_string(), zero.clone())).collect();
        opt.step(&grads, 0.1).unwrap();
        // Zero gradient: only decay moves the weight, by lr · wd · θ = 0.1.
        assert!((w.as_tensor().to_vec1::<f32>().unwrap()[0] - 1.9).abs() < 1e-6);
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap()[0], 2.0);
        assert_eq!(n.as_tensor().to_vec1::<f32>().unwrap()[0], 2.0);
    }

    #[test]
    fn clipping_rescales_to_the_global_norm() {
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3f32], &Device::Cpu).unwrap()),
            ("b".to_string(), Tensor::new(&[4f32], &Device::Cpu).unwrap()),
        ]);
        let norm = clip_global_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&grads).unwrap() - 1.0).abs() < 1e-4);
        let before = global_norm(&grads).unwrap();
        clip_global_norm(&mut grads, 10.0).unwrap();
        assert!((global_norm(&grads).unwrap() - before).abs() < 1e-9, "no clipping under the limit");
    }

    #[test]
    fn warmup_then_cosine_reaches_the_floor_at_the_end() {
        let s = LrSchedule::WarmupCosine { warmup_steps: 10, min_ratio: 0.1 };
        assert!((s.rate(1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((s.rate(1.0, 9, 110) - 1.0).abs() < 1e-12);
        assert!((s.rate(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((s.rate(1.0, 60, 110) - 0.55).abs() < 1e-12);
        assert!((s.rate(1.0, 110, 110) - 0.1).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.rate(0.3, 5, 10), 0.3);
    }

    #[test]
    fn saved_moments_restore_the_same_next_update() {
        let make = || Var::from_vec(vec![1.0f32, 2.0], 2, &Device::Cpu).unwrap();
        let grads = HashMap::from([("w".to_string(), Tensor::new(&[0.3f32, -0.1], &Device::Cpu).unwrap())]);
        let (a, b) = (make(), make());
        let mut first =
            Optimizer::new(vec![("w".into(), a.clone())], settings(OptimizerKind::Adamw, 0.01)).unwrap();
        first.step(&grads, 0.01).unwrap();
        b.set(a.as_tensor()).unwrap();
        let mut second =
            Optimizer::new(vec![("w".into(), b.clone())], settings(OptimizerKind::Adamw, 0.01)).unwrap();
        second.load_state(&first.state_tensors(), first.steps()).unwrap();
        first.step(&grads, 0.01).unwrap();
        second.step(&grads, 0.01).unwrap();
        assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), b.as_tensor().to_vec1::<f32>().unwrap());
    }
}

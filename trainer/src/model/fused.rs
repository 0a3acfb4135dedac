//! One-pass CPU kernels, with backward passes, for the two softmax-shaped steps of a training
//! forward: attention's softmax and the log-probabilities of the target tokens. Candle's fused
//! softmax has no backward, and the composed forms (max, subtract, exp, sum, divide or log, then a
//! gather) make a tensor per step and more in the backward pass; on the CPU they were a large share
//! of a training step. Other devices and dtypes use the composed forms.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Storage, Tensor};

/// Softmax over the last dimension. Fused on the CPU for contiguous f32 inputs, composed otherwise;
/// differentiable either way.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        x.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "tandem-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("softmax: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax: the input must be contiguous");
        };
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = values[start..end].to_vec();
        for row in out.chunks_exact_mut(width) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = y ⊙ (dy − Σ_last(dy ⊙ y))`.
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((dy.broadcast_sub(&dot)? * y)?))
    }
}

/// `log softmax(logits / temperature)` at `targets`: `[.., vocab]` f32 logits and `[..]` u32
/// targets give `[..]` log-probabilities. Fused on the CPU for f32, composed otherwise;
/// differentiable in the logits either way.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && targets.dtype() == DType::U32 {
        let vocab = logits.dim(D::Minus1)?;
        let lead = targets.dims().to_vec();
        let flat_logits = logits.contiguous()?.reshape(((), vocab))?;
        let flat_targets = targets.contiguous()?.flatten_all()?;
        let op = TargetLogprobs { inverse_temperature: (1.0 / temperature) as f32 };
        return flat_logits.apply_op2(&flat_targets, op)?.reshape(lead);
    }
    let logits = if temperature == 1.0 { logits.clone() } else { (logits / temperature)? };
    candle_nn::ops::log_softmax(&logits, D::Minus1)?
        .contiguous()?
        .gather(&targets.contiguous()?.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}

/// `y_i = s·x_it − logsumexp_j(s·x_ij)` for `[rows, vocab]` logits `x`, targets `t`, scale `s`.
struct TargetLogprobs {
    inverse_temperature: f32,
}

fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{what}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

fn cpu_u32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(values) = storage else {
        candle_core::bail!("{what}: u32 targets only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{what}: the targets must be contiguous"),
    }
}

/// `logsumexp_j(s·x_j)` of one row, shifted by its maximum for stability.
fn scaled_log_normaliser(row: &[f32], scale: f32) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let sum: f32 = row.iter().map(|&v| (v * scale - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp2 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "tandem-target-logprobs"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(logits, logits_layout, "target log-probabilities")?;
        let t = cpu_u32(targets, targets_layout, "target log-probabilities")?;
        let (rows, vocab) = logits_layout.shape().dims2()?;
        if t.len() != rows {
            candle_core::bail!("target log-probabilities: {rows} rows but {} targets", t.len());
        }
        let s = self.inverse_temperature;
        let mut out = Vec::with_capacity(rows);
        for (row, &target) in x.chunks_exact(vocab).zip(t) {
            let Some(&at) = row.get(target as usize) else {
                candle_core::bail!("target {target} is outside the vocabulary of {vocab}");
            };
            out.push(at * s - scaled_log_normaliser(row, s));
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    /// `dx_ij = s · dy_i · (1[j = t_i] − softmax(s·x_i)_j)`; the normaliser is `s·x_it − y_i`.
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, vocab) = logits.dims2()?;
        let (logits, targets, y, dy) =
            (logits.contiguous()?, targets.contiguous()?, y.contiguous()?, dy.contiguous()?);
        let (x_storage, x_layout) = logits.storage_and_layout();
        let (t_storage, t_layout) = targets.storage_and_layout();
        let (Storage::Cpu(x_storage), Storage::Cpu(t_storage)) = (&*x_storage, &*t_storage) else {
            candle_core::bail!("target log-probabilities: CPU only");
        };
        let x = cpu_f32(x_storage, x_layout, "target log-probabilities")?;
        let t = cpu_u32(t_storage, t_layout, "target log-probabilities")?;
        let y = y.to_vec1::<f32>()?;
        let dy = dy.to_vec1::<f32>()?;
        let s = self.inverse_temperature;
        let mut grad = vec![0f32; rows * vocab];
        for i in 0..rows {
            let row = &x[i * vocab..(i + 1) * vocab];
            let target = t[i] as usize;
            let normaliser = row[target] * s - y[i];
            let g = s * dy[i];
            for (out, &v) in grad[i * vocab..(i + 1) * vocab].iter_mut().zip(row) {
                *out = -g * (v * s - normaliser).exp();
            }
            grad[i * vocab + target] += g;
        }
        Ok((Some(Tensor::from_vec(grad, (rows, vocab), logits.device())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_softmax_and_its_gradient_equal_the_composed_ones() {
        let x = Var::from_vec(
            vec![0.5f32, -1.0, 2.0, 0.0, 3.0, 3.0, -1e9, 1.0, -2.0, 0.25, 0.75, -0.5],
            (2, 2, 3),
            &Device::Cpu,
        )
        .unwrap();
        let weights = Tensor::new(&[[[1f32, -2.0, 0.5]]], &Device::Cpu).unwrap();
        let run = |softmax: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let y = softmax(x.as_tensor()).unwrap();
            let grads = y.broadcast_mul(&weights).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y_fused, g_fused) = run(&softmax_last_dim);
        let (y_composed, g_composed) = run(&|x| candle_nn::ops::softmax(x, D::Minus1));
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(max_diff(&y_fused, &y_composed) < 1e-6);
        assert!(max_diff(&g_fused, &g_composed) < 1e-6);
    }

    #[test]
    fn fused_target_logprobs_and_their_gradient_equal_log_softmax_and_gather() {
        let x = Var::from_vec(
            (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.7).collect::<Vec<_>>(),
            (2, 3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let targets = Tensor::new(&[[0u32, 3, 1], [2, 2, 0]], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[[1f32, -0.5, 2.0], [0.25, 1.5, -1.0]], &Device::Cpu).unwrap();
        for temperature in [1.0, 0.7] {
            let run = |fused: bool| {
                let lp = if fused {
                    target_logprobs(x.as_tensor(), &targets, temperature).unwrap()
                } else {
                    let scaled = (x.as_tensor() / temperature).unwrap();
                    candle_nn::ops::log_softmax(&scaled, D::Minus1)
                        .unwrap()
                        .gather(&targets.unsqueeze(D::Minus1).unwrap(), D::Minus1)
                        .unwrap()
                        .squeeze(D::Minus1)
                        .unwrap()
                };
                let grads = (&lp * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                (lp, grads.get(x.as_tensor()).unwrap().clone())
            };
            let ((lp_fused, g_fused), (lp_composed, g_composed)) = (run(true), run(false));
            let max_diff = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            };
            assert_eq!(lp_fused.dims(), [2, 3]);
            assert!(max_diff(&lp_fused, &lp_composed) < 1e-5, "T={temperature}");
            assert!(max_diff(&g_fused, &g_composed) < 1e-5, "T={temperature}");
        }
    }
}

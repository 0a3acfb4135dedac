//! Surrogate losses: scalars whose gradients are the algorithms' update directions. All take
//! per-token log-probabilities `[rows, width]` and a 0/1 response mask of the same shape, and a
//! per-row scale that carries each algorithm's normalisation (batch size, sequence length).

use candle_core::{DType, Tensor};

/// `−Σ_rows scale_i · Σ_t log π(y_it)`: with `scale_i = (r_i − r̄)/((G−1)·|D¹∪D²|)` its negative
/// gradient is GAPG's batch estimator, log π summed over the device's tokens with no length
/// normalisation. With `scale_i = 1/(total tokens)` it is the warm start's cross-entropy.
pub fn weighted_logprob_loss(
    logprobs: &Tensor,
    response_mask: &Tensor,
    row_scale: &[f64],
) -> candle_core::Result<Tensor> {
    let scale = row_tensor(row_scale, logprobs)?;
    let per_row = (logprobs * response_mask)?.sum(1)?;
    (per_row * scale)?.sum_all()?.neg()
}

/// The clipped surrogate of GRPO and Dr. GRPO, per token
/// `−min(ρ A, clip(ρ, 1−ε, 1+ε) A) + β (exp(ref − lp) − (ref − lp) − 1)` with `ρ = exp(lp − old)`,
/// summed over each row's tokens and multiplied by `row_scale` (GRPO: `1/(|y_i| · rows)`, Dr. GRPO:
/// `1/rows`).
#[allow(clippy::too_many_arguments)]
pub fn clipped_surrogate_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    ref_logprobs: Option<&Tensor>,
    response_mask: &Tensor,
    advantages: &[f64],
    clip_epsilon: f64,
    kl_beta: f64,
    row_scale: &[f64],
) -> candle_core::Result<Tensor> {
    let advantage = row_tensor(advantages, logprobs)?.unsqueeze(1)?;
    let ratio = (logprobs - old_logprobs)?.exp()?;
    let unclipped = ratio.broadcast_mul(&advantage)?;
    let clipped = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)?.broadcast_mul(&advantage)?;
    let mut per_token = unclipped.minimum(&clipped)?.neg()?;
    if let (Some(reference), true) = (ref_logprobs, kl_beta != 0.0) {
        let d = (reference - logprobs)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        per_token = (per_token + (k3 * kl_beta)?)?;
    }
    let per_row = (per_token * response_mask)?.sum(1)?;
    (per_row * row_tensor(row_scale, logprobs)?)?.sum_all()
}

/// Mean of `k3` KL estimates over response tokens (for logging).
pub fn mean_kl(logprobs: &Tensor, ref_logprobs: &Tensor, response_mask: &Tensor) -> candle_core::Result<f64> {
    let d = (ref_logprobs - logprobs)?;
    let k3 = ((d.exp()? - &d)? - 1.0)?;
    let total = (k3 * response_mask)?.sum_all()?.to_scalar::<f32>()? as f64;
    let count = response_mask.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(if count > 0.0 { total / count } else { 0.0 })
}

fn row_tensor(values: &[f64], like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values.iter().map(|&v| v as f32).collect::<Vec<_>>(), values.len(), like.device())?
        .to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_weighted_loss_gradient_is_the_weighted_sum_of_token_gradients() {
        // d/dlp of −Σ_i s_i Σ_t m_it lp_it is −s_i m_it.
        let lp = Var::from_vec(vec![-1.0f32, -2.0, -0.5, -0.1, -0.2, -3.0], (2, 3), &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0, 0.0], [1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let loss = weighted_logprob_loss(lp.as_tensor(), &mask, &[0.5, -0.25]).unwrap();
        let expected_loss = -(0.5 * (-3.0) + -0.25 * (-3.3));
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - expected_loss).abs() < 1e-6);
        let grads = loss.backward().unwrap();
        let g = grads.get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, [[-0.5, -0.5, 0.0], [0.25, 0.25, 0.25]]);
    }

    #[test]
    fn on_policy_the_clipped_surrogate_has_the_plain_policy_gradient() {
        // ρ = 1 at the first update: gradient −A · scale per token, whatever ε; no KL when β = 0.
        let lp = Var::from_vec(vec![-1.0f32, -2.0, -0.5, -0.1], (2, 2), &Device::Cpu).unwrap();
        let old = lp.as_tensor().detach();
        let mask = Tensor::new(&[[1f32, 1.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let loss =
            clipped_surrogate_loss(lp.as_tensor(), &old, None, &mask, &[2.0, -1.0], 0.2, 0.0, &[0.5, 1.0])
                .unwrap();
        let g = loss.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, [[-1.0, -1.0], [1.0, 0.0]]);
    }

    #[test]
    fn clipping_stops_the_gradient_once_the_ratio_left_the_trust_region() {
        let lp = Var::from_vec(vec![0.5f32], (1, 1), &Device::Cpu).unwrap();
        let old = Tensor::new(&[[0f32]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32]], &Device::Cpu).unwrap();
        // ρ = e^0.5 ≈ 1.65 > 1.2 with a positive advantage: clipped, no gradient.
        let loss =
            clipped_surrogate_loss(lp.as_tensor(), &old, None, &mask, &[1.0], 0.2, 0.0, &[1.0]).unwrap();
        let g = loss.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, [[0.0]]);
    }

    #[test]
    fn the_kl_term_vanishes_at_the_reference_and_is_positive_elsewhere() {
        let lp = Tensor::new(&[[-1.0f32, -2.0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap();
        assert!(mean_kl(&lp, &lp, &mask).unwrap().abs() < 1e-9);
        let reference = Tensor::new(&[[-1.5f32, -1.0]], &Device::Cpu).unwrap();
        assert!(mean_kl(&lp, &reference, &mask).unwrap() > 0.0);
    }
}

//! Per-sample weights of a group's log-likelihoods.
//!
//! GAPG (Proposition 3.1): `ĝ(x) = 1/(G−1) Σ_i (r_i − r̄) ∇ log π(y_i | x)`, so sample `i`'s summed
//! log-probability is weighted by `(r_i − r̄)/(G − 1)`: unbiased (a leave-one-out baseline in
//! disguise) and free of any normalisation that would equate a local and a borrowed answer. GRPO
//! divides the centred reward by the group's standard deviation; Dr. GRPO only centres it.

/// GAPG's weights `(r_i − r̄)/(G − 1)`. Needs at least two samples.
pub fn gapg_weights(rewards: &[f64]) -> Vec<f64> {
    let g = rewards.len();
    assert!(g >= 2, "GAPG needs groups of at least two samples");
    let mean = rewards.iter().sum::<f64>() / g as f64;
    rewards.iter().map(|r| (r - mean) / (g - 1) as f64).collect()
}

/// GRPO's advantages `(r_i − mean)/(std + eps)` with the sample standard deviation (as TRL, torch's
/// unbiased `std`).
pub fn grpo_advantages(rewards: &[f64], eps: f64) -> Vec<f64> {
    let g = rewards.len();
    let mean = rewards.iter().sum::<f64>() / g as f64;
    let variance =
        if g > 1 { rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g - 1) as f64 } else { 0.0 };
    let std = variance.sqrt();
    rewards.iter().map(|r| (r - mean) / (std + eps)).collect()
}

/// Dr. GRPO's advantages `r_i − mean`.
pub fn centred(rewards: &[f64]) -> Vec<f64> {
    let mean = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
    rewards.iter().map(|r| r - mean).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn gapg_weights_match_hand_computed_groups() {
        // G = 4, rewards [2.2, 0, 0.5, 0]: mean 0.675, divisor 3.
        let w = gapg_weights(&[2.2, 0.0, 0.5, 0.0]);
        assert!(close(&w, &[(2.2 - 0.675) / 3.0, -0.675 / 3.0, (0.5 - 0.675) / 3.0, -0.675 / 3.0]), "{w:?}");
        // G = 2: (r1 − r2)/2 and its negative.
        assert!(close(&gapg_weights(&[1.0, 0.25]), &[0.375, -0.375]));
        // Equal rewards carry no signal.
        assert!(close(&gapg_weights(&[0.5; 8]), &[0.0; 8]));
    }

    #[test]
    fn gapg_is_the_leave_one_out_estimator_rescaled() {
        // (r_i − r̄)/(G−1) = (1/G)(r_i − b_i) with b_i the mean of the others.
        let rewards = [1.0, 0.0, 0.25, 0.0, 1.0, 0.25];
        let g = rewards.len() as f64;
        for (i, w) in gapg_weights(&rewards).iter().enumerate() {
            let others = (rewards.iter().sum::<f64>() - rewards[i]) / (g - 1.0);
            assert!((w - (rewards[i] - others) / g).abs() < 1e-12);
        }
    }

    #[test]
    fn std_normalisation_makes_a_local_and_a_borrowed_answer_look_equally_good() {
        // The paper's §3.3 example: [2.2, 0 × 7] vs [0.5, 0 × 7].
        let mut local = vec![0.0; 8];
        local[0] = 2.2;
        let mut borrowed = vec![0.0; 8];
        borrowed[0] = 0.5;
        let (a, b) = (grpo_advantages(&local, 0.0), grpo_advantages(&borrowed, 0.0));
        assert!((a[0] - b[0]).abs() < 1e-9, "GRPO: {} vs {}", a[0], b[0]);
        let (a, b) = (gapg_weights(&local), gapg_weights(&borrowed));
        assert!((a[0] / b[0] - 4.4).abs() < 1e-9, "GAPG keeps the reward ratio");
    }

    #[test]
    fn grpo_uses_the_sample_standard_deviation_and_dr_grpo_only_centres() {
        let a = grpo_advantages(&[1.0, 0.0], 0.0);
        let std = (0.5f64).sqrt();
        assert!(close(&a, &[0.5 / std, -0.5 / std]));
        assert!(close(&centred(&[1.0, 0.0, 0.5]), &[0.5, -0.5, 0.0]));
    }
}

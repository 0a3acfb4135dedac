//! From scored groups to the rows of an update, with each algorithm's per-row factors.
//!
//! A row is the prompt followed by the device's own tokens (through its help tag or end-of-sequence
//! token); the cloud's answer only decided the reward and never appears here.
//!
//! - GAPG: factor `(r_i − r̄)/((G − 1)·|D¹ ∪ D²|)` on the summed log-probability; rows whose factor is
//!   exactly zero are dropped (they add nothing), the divisor still counts their prompt.
//! - GRPO: advantage `(r_i − mean)/(std + ε)`, factor `1/(|y_i| · rows)` (per-token mean per
//!   sequence, mean over sequences).
//! - Dr. GRPO: advantage `r_i − mean`, factor `1/rows` (no length normalisation).

use super::AlgorithmKind;
use super::estimator::{centred, gapg_weights, grpo_advantages};
use super::group::Group;

/// One row of an update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRow {
    /// The prompt's ids.
    pub prompt: Vec<u32>,
    /// The device's ids.
    pub tokens: Vec<u32>,
    /// Their log-probabilities at rollout time (GRPO's "old" policy).
    pub old_logprobs: Vec<f32>,
    /// The loss's factor for the row.
    pub scale: f64,
    /// GRPO/Dr. GRPO advantage (0 for GAPG).
    pub advantage: f64,
}

/// The rows of the `selected` groups. Empty when the batch carries no learning signal (nothing
/// selected, or every weight zero and no KL term).
pub fn update_rows(
    kind: AlgorithmKind,
    groups: &[Group],
    selected: &[usize],
    std_eps: f64,
    kl_beta: f64,
) -> Vec<UpdateRow> {
    let total_rows: usize = selected.iter().map(|&k| groups[k].samples.len()).sum();
    let mut rows = Vec::new();
    for &k in selected {
        let group = &groups[k];
        let rewards = group.rewards();
        let (scales, advantages): (Vec<f64>, Vec<f64>) = match kind {
            AlgorithmKind::Gapg => {
                let w = gapg_weights(&rewards);
                (w.iter().map(|w| w / selected.len() as f64).collect(), vec![0.0; w.len()])
            }
            AlgorithmKind::Grpo => (
                group.samples.iter().map(|s| 1.0 / (s.tokens.len().max(1) * total_rows) as f64).collect(),
                grpo_advantages(&rewards, std_eps),
            ),
            AlgorithmKind::DrGrpo => (vec![1.0 / total_rows as f64; rewards.len()], centred(&rewards)),
            AlgorithmKind::Sft => return Vec::new(),
        };
        for ((sample, scale), advantage) in group.samples.iter().zip(scales).zip(advantages) {
            let signal = match kind {
                AlgorithmKind::Gapg => scale != 0.0,
                _ => advantage != 0.0 || kl_beta != 0.0,
            };
            if signal && !sample.tokens.is_empty() {
                rows.push(UpdateRow {
                    prompt: group.prompt.clone(),
                    tokens: sample.tokens.clone(),
                    old_logprobs: sample.logprobs.clone(),
                    scale,
                    advantage,
                });
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::group::Sample;
    use crate::rollout::Finish;
    use tandem_core::tasks::reward::Outcome;

    fn sample(tokens: &[u32], reward: f64, help: bool) -> Sample {
        Sample {
            tokens: tokens.to_vec(),
            logprobs: vec![-1.0; tokens.len()],
            finish: if help { Finish::Help } else { Finish::Eos },
            outcome: Outcome { asked_for_help: help, cloud_correct: help, ..Outcome::default() },
            reward,
        }
    }

    fn groups() -> Vec<Group> {
        vec![
            Group {
                problem: 0,
                prompt: vec![10, 11],
                samples: vec![
                    sample(&[5, 6, 2], 2.2, false),
                    sample(&[7, 3], 0.5, true),
                    sample(&[8, 2], 0.0, false),
                ],
            },
            Group {
                problem: 1,
                prompt: vec![12],
                samples: vec![sample(&[3], 0.5, true), sample(&[3], 0.5, true), sample(&[3], 0.5, true)],
            },
        ]
    }

    #[test]
    fn gapg_rows_carry_the_estimator_weight_over_the_selected_prompts() {
        let rows = update_rows(AlgorithmKind::Gapg, &groups(), &[0, 1], 0.0, 0.0);
        // Group 1 has equal rewards: no rows, but it counts in |D¹ ∪ D²| = 2.
        assert_eq!(rows.len(), 3);
        let mean = (2.2 + 0.5) / 3.0;
        for (row, r) in rows.iter().zip([2.2, 0.5, 0.0]) {
            assert!((row.scale - (r - mean) / 2.0 / 2.0).abs() < 1e-12);
        }
    }

    #[test]
    fn a_help_calling_row_ends_at_the_device_help_tag() {
        let rows = update_rows(AlgorithmKind::Gapg, &groups(), &[0], 0.0, 0.0);
        assert_eq!(rows[1].prompt, [10, 11]);
        assert_eq!(rows[1].tokens, [7, 3], "only the device's tokens, the tag included; no cloud tokens");
    }

    #[test]
    fn grpo_and_dr_grpo_differ_only_in_normalisation() {
        let grpo = update_rows(AlgorithmKind::Grpo, &groups(), &[0], 1e-4, 0.0);
        let dr = update_rows(AlgorithmKind::DrGrpo, &groups(), &[0], 1e-4, 0.0);
        assert_eq!(grpo.len(), 3);
        assert!((grpo[0].scale - 1.0 / (3.0 * 3.0)).abs() < 1e-12, "1/(|y|·rows)");
        assert!((dr[0].scale - 1.0 / 3.0).abs() < 1e-12, "1/rows");
        assert!((dr[0].advantage - (2.2 - 2.7 / 3.0)).abs() < 1e-12);
        assert!(grpo[0].advantage > 1.0, "std-normalised");
    }
}

//! Adaptive prompt filtering: which prompts of a batch enter the update.
//!
//! D¹ holds prompts the device can solve on its own (rule [`D1Rule`]); D² holds prompts no sample
//! solved locally but a help call got a correct cloud answer for, capped at `⌊ρ·|D¹|⌋` and chosen
//! uniformly at random when there are more. So at most ρ/(1+ρ) of the prompts in an update are
//! cloud-solved, which keeps the policy from drifting to "always ask".

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which prompts make up D¹.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum D1Rule {
    /// At least one sample is locally correct (the paper's text).
    AnyCorrect,
    /// At least one sample is locally correct and at least one is not (the paper's pseudo-code:
    /// "both positive and negative responses").
    Mixed,
}

/// What the filter needs to know about a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSummary {
    /// Samples in the group.
    pub samples: usize,
    /// Samples answered correctly by the device alone.
    pub local_correct: usize,
    /// A sample asked for help and the cloud's answer was correct.
    pub cloud_solved: bool,
}

/// The filter's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptFilter {
    /// ρ: cloud-solved prompts allowed per locally solved prompt (3/7 for a 30% budget).
    pub rho: f64,
    /// How D¹ is defined.
    pub d1_rule: D1Rule,
}

/// The prompts chosen for an update, by index into the batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// D¹, in batch order.
    pub d1: Vec<usize>,
    /// D², in batch order.
    pub d2: Vec<usize>,
    /// Prompts that qualified for D² before the cap.
    pub d2_candidates: usize,
}

impl Selection {
    /// D¹ ∪ D² in batch order.
    pub fn selected(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.d1.iter().chain(&self.d2).copied().collect();
        all.sort_unstable();
        all
    }

    /// Every prompt of a batch of `n` (no filtering).
    pub fn everything(n: usize) -> Self {
        Self { d1: (0..n).collect(), d2: Vec::new(), d2_candidates: 0 }
    }
}

impl PromptFilter {
    /// The paper's budget: ρ = 3/7.
    pub const PAPER_RHO: f64 = 3.0 / 7.0;

    /// Whether a group belongs to D¹.
    pub fn in_d1(&self, group: &GroupSummary) -> bool {
        match self.d1_rule {
            D1Rule::AnyCorrect => group.local_correct > 0,
            D1Rule::Mixed => group.local_correct > 0 && group.local_correct < group.samples,
        }
    }

    /// The largest D² allowed next to `d1` locally solved prompts: `⌊ρ·d1⌋`.
    pub fn d2_cap(&self, d1: usize) -> usize {
        // A hair of slack so that e.g. 3/7 · 7 is 3, not 2.999….
        (self.rho * d1 as f64 + 1e-9).floor() as usize
    }

    /// Chooses D¹ and D² among `groups`.
    pub fn select(&self, groups: &[GroupSummary], rng: &mut impl Rng) -> Selection {
        let d1: Vec<usize> = (0..groups.len()).filter(|&i| self.in_d1(&groups[i])).collect();
        let candidates: Vec<usize> =
            (0..groups.len()).filter(|&i| groups[i].local_correct == 0 && groups[i].cloud_solved).collect();
        let cap = self.d2_cap(d1.len());
        let mut d2: Vec<usize> = if candidates.len() <= cap {
            candidates.clone()
        } else {
            rand::seq::index::sample(rng, candidates.len(), cap).into_iter().map(|k| candidates[k]).collect()
        };
        d2.sort_unstable();
        Selection { d1, d2, d2_candidates: candidates.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn group(local_correct: usize, cloud_solved: bool) -> GroupSummary {
        GroupSummary { samples: 8, local_correct, cloud_solved }
    }

    #[test]
    fn d2_never_exceeds_rho_times_d1() {
        let filter = PromptFilter { rho: PromptFilter::PAPER_RHO, d1_rule: D1Rule::AnyCorrect };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for d1 in 0..12 {
            for candidates in 0..12 {
                let groups: Vec<_> = std::iter::repeat_n(group(3, false), d1)
                    .chain(std::iter::repeat_n(group(0, true), candidates))
                    .chain(std::iter::repeat_n(group(0, false), 3))
                    .collect();
                let s = filter.select(&groups, &mut rng);
                assert_eq!(s.d1.len(), d1);
                assert_eq!(s.d2_candidates, candidates);
                let cap = (3 * d1) / 7;
                assert_eq!(s.d2.len(), candidates.min(cap), "d1 {d1}, candidates {candidates}");
                assert!(s.d2.len() as f64 <= PromptFilter::PAPER_RHO * d1 as f64 + 1e-9);
                assert!(s.d2.iter().all(|&i| i >= d1 && i < d1 + candidates), "D² only from candidates");
            }
        }
    }

    #[test]
    fn d2_is_drawn_uniformly_from_the_candidates() {
        let filter = PromptFilter { rho: 0.5, d1_rule: D1Rule::AnyCorrect };
        // 2 solved prompts allow 1 of 4 candidates.
        let groups = [
            group(1, false),
            group(2, false),
            group(0, true),
            group(0, true),
            group(0, true),
            group(0, true),
        ];
        let mut counts = [0usize; 6];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..4000 {
            for i in filter.select(&groups, &mut rng).d2 {
                counts[i] += 1;
            }
        }
        for &c in &counts[2..] {
            assert!((850..=1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn the_two_d1_rules_differ_on_all_correct_groups() {
        let groups = [group(8, false), group(4, false), group(0, true), group(0, false)];
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let any = PromptFilter { rho: 1.0, d1_rule: D1Rule::AnyCorrect }.select(&groups, &mut rng);
        assert_eq!(any.d1, [0, 1]);
        assert_eq!(any.d2, [2]);
        let mixed = PromptFilter { rho: 1.0, d1_rule: D1Rule::Mixed }.select(&groups, &mut rng);
        assert_eq!(mixed.d1, [1]);
        assert_eq!(mixed.d2, [2], "an all-correct group is in neither set under the mixed rule");
        assert_eq!(mixed.selected(), [1, 2]);
    }

    #[test]
    fn without_a_locally_solved_prompt_nothing_is_selected() {
        let filter = PromptFilter { rho: PromptFilter::PAPER_RHO, d1_rule: D1Rule::AnyCorrect };
        let s = filter.select(&[group(0, true), group(0, true)], &mut ChaCha8Rng::seed_from_u64(3));
        assert!(s.selected().is_empty());
        assert_eq!(s.d2_candidates, 2);
    }
}

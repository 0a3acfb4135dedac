//! The collaboration-aware, hierarchical reward of METHOD.md (paper S1 eq. 5 and S2 eq. 18).
//!
//! v1 (format, accuracy, coordination):
//!
//! | response                                   | reward      |
//! |--------------------------------------------|-------------|
//! | local, correct, well formatted             | α_a + α_f   |
//! | local, correct, badly formatted            | α_a         |
//! | asked for help, cloud answer correct       | α_c         |
//! | local, wrong, well formatted               | α_f         |
//! | anything else                              | 0           |
//!
//! v2 drops the format term: α_a for a correct local answer, α_c for a correct cloud-assisted one,
//! 0 otherwise. That is exactly v1 with α_f = 0, so one function computes both and the version only
//! chooses the default weights. A response that asked for help is scored on the cloud's answer
//! alone: its own answer and format earn nothing, whatever they were.

use serde::{Deserialize, Serialize};

/// Which of the paper's reward tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardVersion {
    /// The original paper (S1): accuracy, coordination and format.
    V1,
    /// The revision (S2): accuracy and coordination only.
    V2,
}

/// The reward weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardWeights {
    /// α_a: a correct answer from the device alone.
    pub alpha_a: f64,
    /// α_c: a correct answer after asking the cloud for help.
    pub alpha_c: f64,
    /// α_f: a local answer in the template's format (0 in v2).
    #[serde(default)]
    pub alpha_f: f64,
}

/// Weights that break the reward's ordering.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RewardError {
    #[error(
        "reward weights must be finite and non-negative (alpha_a {alpha_a}, alpha_c {alpha_c}, alpha_f {alpha_f})"
    )]
    NotNonNegative { alpha_a: f64, alpha_c: f64, alpha_f: f64 },
    #[error(
        "alpha_a ({alpha_a}) must exceed alpha_c ({alpha_c}): a correct local answer is worth more than a borrowed one"
    )]
    CloudNotCheaper { alpha_a: f64, alpha_c: f64 },
}

impl RewardWeights {
    /// The paper's Countdown weights: v1 α_a = 2, α_c = 0.5, α_f = 0.2; v2 α_a = 1, α_c = 0.25.
    pub const fn countdown(version: RewardVersion) -> Self {
        match version {
            RewardVersion::V1 => Self { alpha_a: 2.0, alpha_c: 0.5, alpha_f: 0.2 },
            RewardVersion::V2 => Self { alpha_a: 1.0, alpha_c: 0.25, alpha_f: 0.0 },
        }
    }

    /// The paper's MATH weights (both versions): α_a = 1, α_f = 0 and a model-dependent α_c (0.2 for
    /// Llama-3.2-1B, 0.3 for Qwen2.5-1.5B, 0.6 for Llama-3.2-3B).
    pub const fn math(alpha_c: f64) -> Self {
        Self { alpha_a: 1.0, alpha_c, alpha_f: 0.0 }
    }

    /// Checks METHOD.md's constraints: all weights finite and non-negative, and α_a > α_c. (The
    /// paper's ablation runs α_c = α_a on purpose; skip this check for such runs.)
    pub fn validate(&self) -> Result<(), RewardError> {
        let Self { alpha_a, alpha_c, alpha_f } = *self;
        if ![alpha_a, alpha_c, alpha_f].iter().all(|w| w.is_finite() && *w >= 0.0) {
            return Err(RewardError::NotNonNegative { alpha_a, alpha_c, alpha_f });
        }
        if alpha_a <= alpha_c {
            return Err(RewardError::CloudNotCheaper { alpha_a, alpha_c });
        }
        Ok(())
    }
}

/// What happened to one sampled response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The device's own answer is correct.
    pub local_correct: bool,
    /// The device's response follows the prompt template's format.
    pub well_formatted: bool,
    /// The device asked the cloud for help (the help marker).
    pub asked_for_help: bool,
    /// The cloud's answer to this prompt is correct (only read when `asked_for_help`).
    pub cloud_correct: bool,
}

/// The reward for `outcome` (see the module documentation for the table).
pub fn reward(outcome: &Outcome, weights: &RewardWeights) -> f64 {
    if outcome.asked_for_help {
        return if outcome.cloud_correct { weights.alpha_c } else { 0.0 };
    }
    let accuracy = if outcome.local_correct { weights.alpha_a } else { 0.0 };
    let format = if outcome.well_formatted { weights.alpha_f } else { 0.0 };
    accuracy + format
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (local_correct, well_formatted, asked_for_help, cloud_correct, v1 reward, v2 reward), written
    /// out from METHOD.md's tables rather than computed.
    const TABLE: [(bool, bool, bool, bool, f64, f64); 16] = [
        (true, true, false, false, 2.2, 1.0),
        (true, true, false, true, 2.2, 1.0),
        (true, false, false, false, 2.0, 1.0),
        (true, false, false, true, 2.0, 1.0),
        (false, true, false, false, 0.2, 0.0),
        (false, true, false, true, 0.2, 0.0),
        (false, false, false, false, 0.0, 0.0),
        (false, false, false, true, 0.0, 0.0),
        (true, true, true, true, 0.5, 0.25),
        (true, true, true, false, 0.0, 0.0),
        (true, false, true, true, 0.5, 0.25),
        (true, false, true, false, 0.0, 0.0),
        (false, true, true, true, 0.5, 0.25),
        (false, true, true, false, 0.0, 0.0),
        (false, false, true, true, 0.5, 0.25),
        (false, false, true, false, 0.0, 0.0),
    ];

    fn outcome(row: (bool, bool, bool, bool, f64, f64)) -> Outcome {
        Outcome { local_correct: row.0, well_formatted: row.1, asked_for_help: row.2, cloud_correct: row.3 }
    }

    #[test]
    fn countdown_rewards_follow_the_v1_and_v2_tables_for_every_outcome() {
        let (v1, v2) =
            (RewardWeights::countdown(RewardVersion::V1), RewardWeights::countdown(RewardVersion::V2));
        for row in TABLE {
            let outcome = outcome(row);
            assert!((reward(&outcome, &v1) - row.4).abs() < 1e-12, "v1 {outcome:?}");
            assert!((reward(&outcome, &v2) - row.5).abs() < 1e-12, "v2 {outcome:?}");
        }
    }

    #[test]
    fn help_calls_never_earn_the_format_or_accuracy_reward() {
        let weights = RewardWeights::countdown(RewardVersion::V1);
        for row in TABLE.into_iter().filter(|row| row.2) {
            let outcome = outcome(row);
            let expected = if outcome.cloud_correct { weights.alpha_c } else { 0.0 };
            assert_eq!(reward(&outcome, &weights), expected, "{outcome:?}");
        }
    }

    #[test]
    fn a_correct_local_answer_always_beats_a_correct_borrowed_one() {
        for weights in [
            RewardWeights::countdown(RewardVersion::V1),
            RewardWeights::countdown(RewardVersion::V2),
            RewardWeights::math(0.2),
            RewardWeights::math(0.6),
        ] {
            weights.validate().unwrap();
            let local = Outcome { local_correct: true, ..Outcome::default() };
            let borrowed = Outcome { asked_for_help: true, cloud_correct: true, ..Outcome::default() };
            assert!(reward(&local, &weights) > reward(&borrowed, &weights), "{weights:?}");
        }
    }

    #[test]
    fn the_v2_table_is_the_v1_table_without_the_format_term() {
        // The paper's v1 Countdown weights are twice its v2 ones, apart from α_f.
        let v1_without_format = RewardWeights { alpha_f: 0.0, ..RewardWeights::countdown(RewardVersion::V1) };
        for row in TABLE {
            assert_eq!(reward(&outcome(row), &v1_without_format), 2.0 * row.5, "{row:?}");
        }
    }

    #[test]
    fn weights_that_break_the_ordering_are_refused() {
        assert!(matches!(RewardWeights::math(1.0).validate(), Err(RewardError::CloudNotCheaper { .. })));
        assert!(matches!(RewardWeights::math(-0.1).validate(), Err(RewardError::NotNonNegative { .. })));
        assert!(matches!(RewardWeights::math(f64::NAN).validate(), Err(RewardError::NotNonNegative { .. })));
    }

    #[test]
    fn weights_and_versions_are_configured_by_name() {
        let weights: RewardWeights = serde_json::from_str(r#"{"alpha_a":1,"alpha_c":0.3}"#).unwrap();
        assert_eq!(weights, RewardWeights::math(0.3));
        assert!(serde_json::from_str::<RewardWeights>(r#"{"alpha_a":1,"alpha_c":0.3,"alpha_x":0}"#).is_err());
        assert_eq!(serde_json::from_str::<RewardVersion>(r#""v2""#).unwrap(), RewardVersion::V2);
    }
}

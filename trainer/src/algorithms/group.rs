//! A prompt's group of samples after the cloud was consulted: what each sample did and earned.

use tandem_core::tasks::reward::Outcome;

use crate::rollout::Finish;

/// One sample of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The device's tokens (help tag or end-of-sequence token included). Never the cloud's.
    pub tokens: Vec<u32>,
    /// Their log-probabilities under the sampling distribution at rollout time.
    pub logprobs: Vec<f32>,
    /// Why generation stopped.
    pub finish: Finish,
    /// What happened (local answer graded, or the cloud's answer when it asked).
    pub outcome: Outcome,
    /// The collaboration-aware reward of the whole response.
    pub reward: f64,
}

impl Sample {
    /// A correct answer from the device alone.
    pub fn is_local_correct(&self) -> bool {
        !self.outcome.asked_for_help && self.outcome.local_correct
    }
}

/// The G samples of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Index of the problem in the training set.
    pub problem: usize,
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The samples.
    pub samples: Vec<Sample>,
}

impl Group {
    /// Rewards in sample order.
    pub fn rewards(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.reward).collect()
    }

    /// Samples the device answered correctly on its own.
    pub fn local_correct(&self) -> usize {
        self.samples.iter().filter(|s| s.is_local_correct()).count()
    }

    /// Samples that asked for help.
    pub fn help_calls(&self) -> usize {
        self.samples.iter().filter(|s| s.outcome.asked_for_help).count()
    }

    /// Whether a sample asked for help and the cloud's answer was correct.
    pub fn cloud_solved(&self) -> bool {
        self.samples.iter().any(|s| s.outcome.asked_for_help && s.outcome.cloud_correct)
    }
}

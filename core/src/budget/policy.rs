//! What the budget allows.

use serde::{Deserialize, Serialize};

/// Limits on cloud use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetPolicy {
    /// Largest share of queries that may go to the cloud, in [0, 1). 0.3 means ρ = 3/7: at most
    /// 3 cloud calls per 7 local answers.
    pub cloud_fraction: f64,
    /// Length of the sliding window the ratio is measured over, in seconds.
    pub window_secs: u64,
    /// Cloud calls allowed beyond ρ · local answers, so a freshly started device is not locked out.
    pub burst: u32,
    /// Optional cap on cloud calls in any 60 minutes.
    pub max_calls_per_hour: Option<u32>,
    /// Optional cap on cloud tokens (prompt + completion) in any 24 hours.
    pub max_cloud_tokens_per_day: Option<u64>,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            cloud_fraction: 0.3,
            window_secs: 3600,
            burst: 1,
            max_calls_per_hour: None,
            max_cloud_tokens_per_day: None,
        }
    }
}

/// A policy that cannot be enforced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("budget.cloud_fraction must be in [0, 1) (got {0}); 0.3 lets 30% of queries go to the cloud")]
    CloudFraction(f64),
    #[error("budget.window_secs must be at least 1")]
    Window,
}

impl BudgetPolicy {
    /// Checks the policy can be enforced.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(0.0..1.0).contains(&self.cloud_fraction) {
            return Err(PolicyError::CloudFraction(self.cloud_fraction));
        }
        if self.window_secs == 0 {
            return Err(PolicyError::Window);
        }
        Ok(())
    }

    /// ρ: cloud calls allowed per local answer.
    pub fn rho(&self) -> f64 {
        self.cloud_fraction / (1.0 - self.cloud_fraction)
    }
}

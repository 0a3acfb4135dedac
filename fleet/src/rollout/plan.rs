//! What an operator asks for when starting a rollout: the stages, the health gates and the device
//! group, checked before anything is recorded.

use serde::{Deserialize, Serialize};

/// One stage: the share of the targeted devices it reaches, how long it must run healthy, and how
/// many of its devices must report the new version healthy before the next stage starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutStage {
    /// Share of the targeted devices, percent, in (0, 100]. Stages grow; the last is 100.
    pub percent: f64,
    /// How long the stage runs, with every gate holding, before the next one starts, seconds.
    #[serde(default)]
    pub soak_secs: u64,
    /// Fraction of the stage's devices that must report the new version active and send telemetry
    /// from it, in (0, 1].
    #[serde(default = "default_min_healthy")]
    pub min_healthy: f64,
}

const fn default_min_healthy() -> f64 {
    1.0
}

/// Limits on the telemetry of the new version, over every device the rollout reached since it did;
/// crossing one halts the rollout and rolls it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthGates {
    /// Largest share of queries with an `error_class` (a budget refusal, `budget_ratio`, is not an
    /// error), in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Largest median local latency, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p50_local_latency_ms: Option<u64>,
    /// Lowest share of queries answered by the cloud (the bottom of the budget band).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_call_ratio: Option<f64>,
    /// Highest share of queries answered by the cloud (the top of the budget band).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_call_ratio: Option<f64>,
    /// Events of the new version needed before the gates judge; until then a stage with a gate
    /// does not advance.
    #[serde(default = "default_min_events")]
    pub min_events: u64,
}

impl Default for HealthGates {
    fn default() -> Self {
        Self {
            max_error_rate: None,
            max_p50_local_latency_ms: None,
            min_call_ratio: None,
            max_call_ratio: None,
            min_events: default_min_events(),
        }
    }
}

const fn default_min_events() -> u64 {
    20
}

impl HealthGates {
    /// Whether any gate is set.
    pub fn any(&self) -> bool {
        self.max_error_rate.is_some()
            || self.max_p50_local_latency_ms.is_some()
            || self.min_call_ratio.is_some()
            || self.max_call_ratio.is_some()
    }
}

/// The stages, gates and target of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// Canary first, growing to 100 %.
    pub stages: Vec<RolloutStage>,
    /// Health gates.
    #[serde(default)]
    pub gates: HealthGates,
    /// Only devices of this group (from the devices file); every device when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl RolloutPlan {
    /// Checks the plan; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        let Some(last) = self.stages.last() else { return Err("a rollout needs at least one stage".into()) };
        let mut previous = 0.0;
        for (i, stage) in self.stages.iter().enumerate() {
            let n = i + 1;
            if !(stage.percent > previous && stage.percent <= 100.0) {
                return Err(format!(
                    "stage {n}: percent {} must be above the previous stage's ({previous}) and at most 100",
                    stage.percent
                ));
            }
            if !(stage.min_healthy > 0.0 && stage.min_healthy <= 1.0) {
                return Err(format!("stage {n}: min_healthy {} must be in (0, 1]", stage.min_healthy));
            }
            previous = stage.percent;
        }
        if last.percent != 100.0 {
            return Err(format!(
                "the last stage must reach 100 percent of the devices, not {}",
                last.percent
            ));
        }
        let gates = &self.gates;
        for (name, value) in [
            ("max_error_rate", gates.max_error_rate),
            ("min_call_ratio", gates.min_call_ratio),
            ("max_call_ratio", gates.max_call_ratio),
        ] {
            if let Some(value) = value
                && !(0.0..=1.0).contains(&value)
            {
                return Err(format!("gates.{name} {value} must be in [0, 1]"));
            }
        }
        if let (Some(min), Some(max)) = (gates.min_call_ratio, gates.max_call_ratio)
            && min > max
        {
            return Err(format!("gates.min_call_ratio {min} is above gates.max_call_ratio {max}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(percents: &[f64]) -> RolloutPlan {
        RolloutPlan {
            stages: percents
                .iter()
                .map(|&percent| RolloutStage { percent, soak_secs: 0, min_healthy: 1.0 })
                .collect(),
            gates: HealthGates::default(),
            group: None,
        }
    }

    #[test]
    fn stages_must_grow_to_every_device() {
        assert_eq!(plan(&[5.0, 25.0, 100.0]).validate(), Ok(()));
        assert_eq!(plan(&[100.0]).validate(), Ok(()));
        assert!(plan(&[]).validate().unwrap_err().contains("at least one"));
        assert!(plan(&[25.0, 5.0, 100.0]).validate().unwrap_err().contains("stage 2"));
        assert!(plan(&[5.0, 50.0]).validate().unwrap_err().contains("100 percent"));
        assert!(plan(&[0.0, 100.0]).validate().unwrap_err().contains("stage 1"));
        assert!(plan(&[50.0, 150.0]).validate().unwrap_err().contains("at most 100"));
    }

    #[test]
    fn gates_are_fractions_and_the_band_is_ordered() {
        let mut p = plan(&[100.0]);
        p.gates.max_error_rate = Some(1.5);
        assert!(p.validate().unwrap_err().contains("max_error_rate"));
        p.gates.max_error_rate = Some(0.1);
        p.gates.min_call_ratio = Some(0.4);
        p.gates.max_call_ratio = Some(0.2);
        assert!(p.validate().unwrap_err().contains("above"));
        p.stages[0].min_healthy = 0.0;
        p.gates.min_call_ratio = None;
        assert!(p.validate().unwrap_err().contains("min_healthy"));
    }

    #[test]
    fn a_plan_reads_from_json_with_defaults_and_refuses_unknown_keys() {
        let p: RolloutPlan =
            serde_json::from_str(r#"{"stages":[{"percent":10,"soak_secs":60},{"percent":100}]}"#).unwrap();
        assert_eq!(p.stages[0].min_healthy, 1.0);
        assert_eq!(p.gates.min_events, 20);
        assert!(!p.gates.any());
        assert!(serde_json::from_str::<RolloutPlan>(r#"{"stages":[],"colour":1}"#).is_err());
    }
}

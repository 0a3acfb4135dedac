//! Probation of a newly activated slot, as plain data: the counters live in the slot state file so
//! that they survive a crash or a reboot, and every decision is a method call tested without a disk.
//!
//! A start that never reached healthy counts as a crash. Too many consecutive crashes, too many
//! consecutive failed health probes, or too many starts in all while on probation (a model that
//! becomes healthy and then crashes every time) revert the slot; enough passing probes commit it.

use serde::{Deserialize, Serialize};

/// When a slot on probation is reverted or committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbationPolicy {
    /// Consecutive starts that never reached healthy after which the slot is reverted.
    pub max_unhealthy_starts: u32,
    /// Consecutive failed health probes after which the slot is reverted.
    pub max_failed_probes: u32,
    /// Passing probes in a row that end probation and commit the slot.
    pub probes_to_commit: u32,
    /// Starts in all (healthy or not) after which a slot still on probation is reverted.
    pub max_starts: u32,
}

impl Default for ProbationPolicy {
    fn default() -> Self {
        Self { max_unhealthy_starts: 3, max_failed_probes: 3, probes_to_commit: 5, max_starts: 6 }
    }
}

/// Why a slot was reverted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RevertReason {
    /// Consecutive starts that never reached healthy.
    #[error("{starts} starts in a row never became healthy (crash loop)")]
    CrashLoop {
        /// How many starts in a row failed.
        starts: u32,
    },
    /// Consecutive failed health probes.
    #[error("{probes} health probes in a row failed")]
    ProbesFailed {
        /// How many probes in a row failed.
        probes: u32,
    },
    /// Starts in all while on probation, without being committed.
    #[error("{starts} starts while on probation without being committed")]
    TooManyStarts {
        /// How many starts were counted.
        starts: u32,
    },
    /// The slot's files no longer match its manifest.
    #[error("its files do not verify: {detail}")]
    VerificationFailed {
        /// What the verification found.
        detail: String,
    },
    /// An operator asked for it.
    #[error("an operator asked for it")]
    Manual,
}

/// What the caller must do after a probation event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbationVerdict {
    /// Keep serving the slot; it stays on probation.
    Continue,
    /// The slot passed probation: it is now the trusted one.
    Commit,
    /// The slot failed probation: go back to the previous one.
    Revert(RevertReason),
}

/// The probation of the active slot: its policy and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probation {
    /// The policy in force since activation (a config change does not move the goalposts).
    pub policy: ProbationPolicy,
    /// Starts counted since activation.
    pub starts: u32,
    /// Consecutive starts that never reached healthy.
    pub unhealthy_starts: u32,
    /// Whether the latest start has not reached healthy yet.
    pub start_pending: bool,
    /// Consecutive failed probes.
    pub failed_probes: u32,
    /// Consecutive passed probes.
    pub passed_probes: u32,
}

impl Probation {
    /// A fresh probation under `policy`.
    pub fn new(policy: ProbationPolicy) -> Self {
        Self {
            policy,
            starts: 0,
            unhealthy_starts: 0,
            start_pending: false,
            failed_probes: 0,
            passed_probes: 0,
        }
    }

    /// A process is starting to serve the slot. A previous start still pending never became
    /// healthy, so it counts as a crash.
    pub fn on_start(&mut self) -> ProbationVerdict {
        if self.start_pending {
            self.unhealthy_starts += 1;
        }
        if self.unhealthy_starts >= self.policy.max_unhealthy_starts {
            return ProbationVerdict::Revert(RevertReason::CrashLoop { starts: self.unhealthy_starts });
        }
        if self.starts >= self.policy.max_starts {
            return ProbationVerdict::Revert(RevertReason::TooManyStarts { starts: self.starts });
        }
        self.starts += 1;
        self.start_pending = true;
        self.failed_probes = 0;
        self.passed_probes = 0;
        ProbationVerdict::Continue
    }

    /// The current start loaded the model and answered its first probe.
    pub fn on_healthy(&mut self) {
        self.start_pending = false;
        self.unhealthy_starts = 0;
    }

    /// A health probe finished; a passing probe also counts as healthy.
    pub fn on_probe(&mut self, passed: bool) -> ProbationVerdict {
        if passed {
            self.on_healthy();
            self.failed_probes = 0;
            self.passed_probes += 1;
            if self.passed_probes >= self.policy.probes_to_commit {
                return ProbationVerdict::Commit;
            }
        } else {
            self.passed_probes = 0;
            self.failed_probes += 1;
            if self.failed_probes >= self.policy.max_failed_probes {
                return ProbationVerdict::Revert(RevertReason::ProbesFailed { probes: self.failed_probes });
            }
        }
        ProbationVerdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ProbationPolicy {
        ProbationPolicy { max_unhealthy_starts: 3, max_failed_probes: 2, probes_to_commit: 3, max_starts: 5 }
    }

    #[test]
    fn three_starts_that_never_became_healthy_revert_on_the_next_start() {
        let mut p = Probation::new(policy());
        for _ in 0..3 {
            assert_eq!(p.on_start(), ProbationVerdict::Continue);
        }
        assert_eq!(p.on_start(), ProbationVerdict::Revert(RevertReason::CrashLoop { starts: 3 }));
    }

    #[test]
    fn becoming_healthy_clears_the_crash_count() {
        let mut p = Probation::new(policy());
        p.on_start();
        p.on_start();
        p.on_healthy();
        assert_eq!(p.unhealthy_starts, 0);
        p.on_start();
        p.on_start();
        assert_eq!(p.on_start(), ProbationVerdict::Continue, "only two crashes in a row since healthy");
    }

    #[test]
    fn a_model_that_crashes_after_becoming_healthy_is_reverted_after_max_starts() {
        let mut p = Probation::new(policy());
        for _ in 0..5 {
            assert_eq!(p.on_start(), ProbationVerdict::Continue);
            p.on_healthy();
        }
        assert_eq!(p.on_start(), ProbationVerdict::Revert(RevertReason::TooManyStarts { starts: 5 }));
    }

    #[test]
    fn consecutive_failed_probes_revert_and_a_pass_resets_them() {
        let mut p = Probation::new(policy());
        p.on_start();
        assert_eq!(p.on_probe(false), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(true), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(false), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(false), ProbationVerdict::Revert(RevertReason::ProbesFailed { probes: 2 }));
    }

    #[test]
    fn enough_passing_probes_in_a_row_commit() {
        let mut p = Probation::new(policy());
        p.on_start();
        assert_eq!(p.on_probe(true), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(false), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(true), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(true), ProbationVerdict::Continue);
        assert_eq!(p.on_probe(true), ProbationVerdict::Commit);
    }

    #[test]
    fn a_passing_probe_marks_the_start_healthy() {
        let mut p = Probation::new(policy());
        p.on_start();
        p.on_probe(true);
        assert!(!p.start_pending);
        p.on_start();
        assert_eq!(p.unhealthy_starts, 0);
    }

    #[test]
    fn counters_survive_a_round_trip_through_json() {
        let mut p = Probation::new(policy());
        p.on_start();
        p.on_start();
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Probation>(&text).unwrap(), p);
    }
}

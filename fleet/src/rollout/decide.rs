//! The rollout state machine, without I/O: from a rollout's recorded progress and what the fleet
//! observed about its devices, decide which devices get the new version now and whether the
//! rollout advances, completes or halts. The driver (`driver.rs`) reads the observations from the
//! database, records the decision and publishes the assignments.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_core::protocol::UpdateState;

use super::plan::RolloutPlan;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Assigning stage by stage.
    Running,
    /// Stopped by an operator; assignments stay as they are.
    Paused,
    /// Every stage passed.
    Completed,
    /// A gate failed or devices failed the update: rolled back, with the reason recorded.
    Halted,
    /// Stopped and rolled back by an operator.
    Aborted,
    /// Replaced by a newer rollout of the same model, which took its devices over.
    Superseded,
}

impl RolloutStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Running => "running",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Completed => "completed",
            RolloutStatus::Halted => "halted",
            RolloutStatus::Aborted => "aborted",
            RolloutStatus::Superseded => "superseded",
        }
    }

    /// The status stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Running, Self::Paused, Self::Completed, Self::Halted, Self::Aborted, Self::Superseded]
            .into_iter()
            .find(|s| s.as_str() == name)
    }

    /// Running or paused: it still owns its devices.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutStatus::Running | RolloutStatus::Paused)
    }
}

/// The recorded state of a rollout that the state machine reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub status: RolloutStatus,
    /// Index of the current stage.
    pub stage: usize,
    /// Fleet time (Unix ms) when the current stage started (or the rollout was resumed).
    pub stage_started_ms: i64,
}

/// A device's latest report on an update, as received by the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedReport {
    pub version: String,
    pub state: UpdateState,
    pub detail: Option<String>,
    /// Fleet time (Unix ms) when the status carrying it arrived.
    pub received_ms: i64,
}

/// What the fleet knows about one targeted device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceObservation {
    pub id: String,
    /// Fleet time when this rollout assigned it the new version; `None` when it has not.
    pub assigned_at_ms: Option<i64>,
    /// Its latest update report.
    pub report: Option<ObservedReport>,
    /// Telemetry events of the new version from it since its assignment.
    pub events: u64,
}

/// The new version's telemetry over every device the rollout reached.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionHealth {
    pub events: u64,
    /// Events with an error class other than a budget refusal.
    pub errors: u64,
    /// Events answered by the cloud.
    pub cloud: u64,
    /// Median local latency, ms.
    pub p50_local_ms: Option<i64>,
}

/// What the driver must do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Devices to assign the new version now.
    pub assign: Vec<String>,
    /// A change of status or stage, if any.
    pub transition: Option<Transition>,
    /// Why the rollout is not advancing yet, for the operator.
    pub waiting: Option<String>,
}

/// A change of the rollout's status or stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// The next stage starts now (its devices are in [`Step::assign`]).
    Advance { stage: usize },
    /// The last stage passed.
    Complete,
    /// Stop and give `roll_back` (every device the rollout reached) the previous version.
    Halt { reason: String, roll_back: Vec<String> },
}

/// The device's fixed place in [0, 100) for `rollout`: stage k reaches it when its bucket is below
/// the stage's percent, so a device in a stage is in every larger one.
pub fn bucket(rollout: &str, device: &str) -> f64 {
    let digest = Sha256::new().chain_update(rollout).chain_update([0]).chain_update(device).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits: exactly representable, uniform in [0, 1).
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

/// The devices of `targets` a stage of `percent` reaches: those whose bucket is below it, and
/// always the device with the lowest bucket, so that a canary stage is never empty while there
/// are devices (it is in every stage, so stages still nest).
pub fn stage_members<'a>(rollout: &str, percent: f64, targets: &'a [DeviceObservation]) -> Vec<&'a str> {
    let buckets: Vec<(f64, &str)> = targets.iter().map(|d| (bucket(rollout, &d.id), d.id.as_str())).collect();
    let lowest = buckets.iter().min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1))).map(|b| b.1);
    buckets.iter().filter(|(b, id)| *b < percent || Some(*id) == lowest).map(|(_, id)| *id).collect()
}

/// One evaluation of a rollout at fleet time `now_ms`.
pub fn evaluate(
    rollout: &str,
    version: &str,
    plan: &RolloutPlan,
    progress: &Progress,
    devices: &[DeviceObservation],
    health: &VersionHealth,
    now_ms: i64,
) -> Step {
    if progress.status != RolloutStatus::Running {
        return Step::default();
    }
    let reached: Vec<String> =
        devices.iter().filter(|d| d.assigned_at_ms.is_some()).map(|d| d.id.clone()).collect();
    let halt = |reason: String| Step {
        assign: Vec::new(),
        transition: Some(Transition::Halt { reason, roll_back: reached.clone() }),
        waiting: None,
    };

    let failed: Vec<&DeviceObservation> = devices.iter().filter(|d| failed(d, version)).collect();
    if let Some(first) = failed.first() {
        let report = first.report.as_ref().expect("a failed device has a report");
        let state = if report.state == UpdateState::RolledBack { "rolled_back" } else { "failed" };
        let detail = report.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
        let others = match failed.len() {
            1 => String::new(),
            n => format!(" (and {} more device(s))", n - 1),
        };
        return halt(format!("device {} reported {state} for version {version}{detail}{others}", first.id));
    }
    if let Some(reason) = gate_failure(plan, health) {
        return halt(reason);
    }

    let stage_index = progress.stage.min(plan.stages.len() - 1);
    let stage = &plan.stages[stage_index];
    let members = stage_members(rollout, stage.percent, devices);
    let assigned: HashSet<&str> =
        devices.iter().filter(|d| d.assigned_at_ms.is_some()).map(|d| d.id.as_str()).collect();
    let missing: Vec<String> =
        members.iter().filter(|id| !assigned.contains(**id)).map(|id| id.to_string()).collect();
    if !missing.is_empty() {
        let waiting = format!("assigning {} device(s) of stage {}", missing.len(), stage_index + 1);
        return Step { assign: missing, transition: None, waiting: Some(waiting) };
    }

    let member_set: HashSet<&str> = members.iter().copied().collect();
    let healthy =
        devices.iter().filter(|d| member_set.contains(d.id.as_str()) && healthy(d, version)).count();
    let needed = (stage.min_healthy * members.len() as f64 - 1e-9).ceil().max(0.0) as usize;
    let waiting = |text: String| Step { assign: Vec::new(), transition: None, waiting: Some(text) };
    if healthy < needed {
        return waiting(format!(
            "stage {}: {healthy} of {} device(s) healthy on {version}, {needed} needed",
            stage_index + 1,
            members.len()
        ));
    }
    if plan.gates.any() && health.events < plan.gates.min_events {
        return waiting(format!(
            "stage {}: {} of the {} events the gates need",
            stage_index + 1,
            health.events,
            plan.gates.min_events
        ));
    }
    let soaked_ms = now_ms - progress.stage_started_ms;
    let soak_ms = i64::try_from(stage.soak_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if soaked_ms < soak_ms {
        // A stable text: the driver records the waiting reason only when it changes.
        let until = progress.stage_started_ms.saturating_add(soak_ms);
        return waiting(format!("stage {}: soaking until {until} (Unix ms)", stage_index + 1));
    }
    if stage_index + 1 == plan.stages.len() {
        return Step { assign: Vec::new(), transition: Some(Transition::Complete), waiting: None };
    }
    let next = stage_index + 1;
    let assign = stage_members(rollout, plan.stages[next].percent, devices)
        .into_iter()
        .filter(|id| !assigned.contains(id))
        .map(str::to_string)
        .collect();
    Step { assign, transition: Some(Transition::Advance { stage: next }), waiting: None }
}

/// A report about `version` made after the device's assignment.
fn current_report<'a>(device: &'a DeviceObservation, version: &str) -> Option<&'a ObservedReport> {
    let assigned_at = device.assigned_at_ms?;
    device.report.as_ref().filter(|r| r.version == version && r.received_ms >= assigned_at)
}

fn failed(device: &DeviceObservation, version: &str) -> bool {
    current_report(device, version)
        .is_some_and(|r| matches!(r.state, UpdateState::Failed | UpdateState::RolledBack))
}

fn healthy(device: &DeviceObservation, version: &str) -> bool {
    device.events > 0 && current_report(device, version).is_some_and(|r| r.state == UpdateState::Active)
}

/// The first gate the new version's telemetry crosses, in words.
fn gate_failure(plan: &RolloutPlan, health: &VersionHealth) -> Option<String> {
    let gates = &plan.gates;
    if health.events == 0 || health.events < gates.min_events {
        return None;
    }
    let n = health.events as f64;
    let error_rate = health.errors as f64 / n;
    if let Some(max) = gates.max_error_rate
        && error_rate > max
    {
        return Some(format!(
            "error rate {error_rate:.3} ({} of {} events) is above the gate max_error_rate {max}",
            health.errors, health.events
        ));
    }
    if let (Some(max), Some(p50)) = (gates.max_p50_local_latency_ms, health.p50_local_ms)
        && p50 > i64::try_from(max).unwrap_or(i64::MAX)
    {
        return Some(format!(
            "median local latency {p50} ms is above the gate max_p50_local_latency_ms {max}"
        ));
    }
    let call_ratio = health.cloud as f64 / n;
    if let Some(min) = gates.min_call_ratio
        && call_ratio < min
    {
        return Some(format!("call ratio {call_ratio:.3} is below the budget band (min_call_ratio {min})"));
    }
    if let Some(max) = gates.max_call_ratio
        && call_ratio > max
    {
        return Some(format!("call ratio {call_ratio:.3} is above the budget band (max_call_ratio {max})"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::plan::{HealthGates, RolloutStage};
    use super::*;

    const R: &str = "rollout-1";
    const V: &str = "2";

    fn plan(stages: &[(f64, u64)]) -> RolloutPlan {
        RolloutPlan {
            stages: stages
                .iter()
                .map(|&(percent, soak_secs)| RolloutStage { percent, soak_secs, min_healthy: 1.0 })
                .collect(),
            gates: HealthGates::default(),
            group: None,
        }
    }

    fn fleet(n: usize) -> Vec<DeviceObservation> {
        (0..n)
            .map(|i| DeviceObservation {
                id: format!("d{i:02}"),
                assigned_at_ms: None,
                report: None,
                events: 0,
            })
            .collect()
    }

    fn running(stage: usize, started: i64) -> Progress {
        Progress { status: RolloutStatus::Running, stage, stage_started_ms: started }
    }

    /// Marks `ids` assigned at `at` and reporting `state` (with `events` events) at `at + 1`.
    fn report(devices: &mut [DeviceObservation], ids: &[String], at: i64, state: UpdateState, events: u64) {
        for d in devices.iter_mut().filter(|d| ids.contains(&d.id)) {
            d.assigned_at_ms = Some(at);
            d.report = Some(ObservedReport { version: V.into(), state, detail: None, received_ms: at + 1 });
            d.events = events;
        }
    }

    #[test]
    fn buckets_are_stable_uniform_and_depend_on_the_rollout() {
        assert_eq!(bucket("a", "d1"), bucket("a", "d1"));
        assert_ne!(bucket("a", "d1"), bucket("b", "d1"));
        let buckets: Vec<f64> = (0..10_000).map(|i| bucket(R, &format!("d{i}"))).collect();
        assert!(buckets.iter().all(|b| (0.0..100.0).contains(b)));
        let below_ten = buckets.iter().filter(|b| **b < 10.0).count();
        assert!((900..1100).contains(&below_ten), "{below_ten}");
    }

    #[test]
    fn larger_stages_include_smaller_ones_and_a_canary_is_never_empty() {
        let devices = fleet(50);
        let mut previous: Vec<&str> = Vec::new();
        for percent in [0.001, 5.0, 25.0, 60.0, 100.0] {
            let members = stage_members(R, percent, &devices);
            assert!(!members.is_empty());
            assert!(previous.iter().all(|d| members.contains(d)), "{percent}");
            previous = members;
        }
        assert_eq!(previous.len(), 50);
        assert!(stage_members(R, 5.0, &[]).is_empty());
    }

    #[test]
    fn a_new_rollout_assigns_its_canaries_and_waits() {
        let devices = fleet(20);
        let step = evaluate(
            R,
            V,
            &plan(&[(10.0, 60), (100.0, 0)]),
            &running(0, 0),
            &devices,
            &Default::default(),
            0,
        );
        assert_eq!(step.assign, stage_members(R, 10.0, &devices));
        assert_eq!(step.transition, None);
        assert!(step.waiting.unwrap().contains("assigning"));
    }

    #[test]
    fn a_stage_waits_for_healthy_devices_then_for_its_soak_then_advances() {
        let plan = plan(&[(10.0, 60), (50.0, 60), (100.0, 0)]);
        let mut devices = fleet(20);
        let canaries: Vec<String> = stage_members(R, 10.0, &devices).iter().map(|s| s.to_string()).collect();
        report(&mut devices, &canaries, 1000, UpdateState::Downloading, 0);
        let step = evaluate(R, V, &plan, &running(0, 1000), &devices, &Default::default(), 100_000);
        assert!(step.waiting.unwrap().contains("healthy"), "downloading is not healthy");

        report(&mut devices, &canaries, 1000, UpdateState::Active, 0);
        let step = evaluate(R, V, &plan, &running(0, 1000), &devices, &Default::default(), 100_000);
        assert!(step.waiting.unwrap().contains("healthy"), "active without telemetry is not healthy");

        report(&mut devices, &canaries, 1000, UpdateState::Active, 3);
        let step = evaluate(R, V, &plan, &running(0, 1000), &devices, &Default::default(), 30_000);
        assert!(step.waiting.unwrap().contains("soaking"));

        let step = evaluate(R, V, &plan, &running(0, 1000), &devices, &Default::default(), 61_000);
        assert_eq!(step.transition, Some(Transition::Advance { stage: 1 }));
        let second = stage_members(R, 50.0, &devices);
        let expected: Vec<String> =
            second.iter().filter(|d| !canaries.contains(&d.to_string())).map(|d| d.to_string()).collect();
        assert_eq!(step.assign, expected, "the next stage's new devices, not the canaries again");
    }

    #[test]
    fn min_healthy_lets_a_stage_advance_without_every_device() {
        let mut plan = plan(&[(50.0, 0), (100.0, 0)]);
        plan.stages[0].min_healthy = 0.5;
        let mut devices = fleet(20);
        let members: Vec<String> = stage_members(R, 50.0, &devices).iter().map(|s| s.to_string()).collect();
        assert!(members.len() >= 4);
        let half = members.len().div_ceil(2);
        report(&mut devices, &members[..half], 0, UpdateState::Active, 1);
        report(&mut devices, &members[half..], 0, UpdateState::Downloading, 0);
        let step = evaluate(R, V, &plan, &running(0, 0), &devices, &Default::default(), 1);
        assert_eq!(step.transition, Some(Transition::Advance { stage: 1 }));
        report(&mut devices, &members[half - 1..half], 0, UpdateState::Probing, 0);
        let step = evaluate(R, V, &plan, &running(0, 0), &devices, &Default::default(), 1);
        assert_eq!(step.transition, None);
    }

    #[test]
    fn the_last_stage_completes_the_rollout() {
        let plan = plan(&[(10.0, 0), (100.0, 5)]);
        let mut devices = fleet(5);
        let all: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
        report(&mut devices, &all, 0, UpdateState::Active, 1);
        let step = evaluate(R, V, &plan, &running(1, 0), &devices, &Default::default(), 4_999);
        assert_eq!(step.transition, None);
        let step = evaluate(R, V, &plan, &running(1, 0), &devices, &Default::default(), 5_000);
        assert_eq!(step.transition, Some(Transition::Complete));
        assert!(step.assign.is_empty());
    }

    #[test]
    fn a_failed_or_rolled_back_device_halts_and_rolls_back_every_device_reached() {
        for state in [UpdateState::Failed, UpdateState::RolledBack] {
            let plan = plan(&[(10.0, 0), (50.0, 0), (100.0, 0)]);
            let mut devices = fleet(20);
            let reached: Vec<String> =
                stage_members(R, 50.0, &devices).iter().map(|s| s.to_string()).collect();
            report(&mut devices, &reached, 0, UpdateState::Active, 2);
            devices.iter_mut().find(|d| d.id == reached[1]).unwrap().report = Some(ObservedReport {
                version: V.into(),
                state,
                detail: Some("probe failed".into()),
                received_ms: 5,
            });
            let step = evaluate(R, V, &plan, &running(1, 0), &devices, &Default::default(), 10);
            let Some(Transition::Halt { reason, roll_back }) = step.transition else { panic!("{step:?}") };
            assert!(reason.contains(&reached[1]) && reason.contains("probe failed"), "{reason}");
            assert_eq!(roll_back, reached);
            assert!(step.assign.is_empty());
        }
    }

    #[test]
    fn reports_about_other_versions_or_from_before_the_assignment_are_ignored() {
        let plan = plan(&[(100.0, 0)]);
        let mut devices = fleet(1);
        devices[0].assigned_at_ms = Some(100);
        devices[0].events = 1;
        for (version, received_ms) in [("1", 200), (V, 50)] {
            devices[0].report = Some(ObservedReport {
                version: version.into(),
                state: UpdateState::Failed,
                detail: None,
                received_ms,
            });
            let step = evaluate(R, V, &plan, &running(0, 100), &devices, &Default::default(), 300);
            assert!(step.transition.is_none(), "{version} at {received_ms}: {step:?}");
        }
    }

    #[test]
    fn each_gate_halts_once_enough_events_arrived() {
        type Case = (fn(&mut HealthGates), VersionHealth, &'static str);
        let cases: [Case; 4] = [
            (
                |g| g.max_error_rate = Some(0.1),
                VersionHealth { events: 20, errors: 3, ..Default::default() },
                "error rate",
            ),
            (
                |g| g.max_p50_local_latency_ms = Some(200),
                VersionHealth { events: 20, p50_local_ms: Some(250), ..Default::default() },
                "median local latency",
            ),
            (
                |g| g.min_call_ratio = Some(0.1),
                VersionHealth { events: 20, cloud: 1, ..Default::default() },
                "below the budget band",
            ),
            (
                |g| g.max_call_ratio = Some(0.3),
                VersionHealth { events: 20, cloud: 7, ..Default::default() },
                "above the budget band",
            ),
        ];
        for (set, health, needle) in cases {
            let mut plan = plan(&[(10.0, 0), (100.0, 0)]);
            set(&mut plan.gates);
            let mut devices = fleet(10);
            let canaries: Vec<String> =
                stage_members(R, 10.0, &devices).iter().map(|s| s.to_string()).collect();
            report(&mut devices, &canaries, 0, UpdateState::Active, 20);
            let step = evaluate(R, V, &plan, &running(0, 0), &devices, &health, 1);
            let Some(Transition::Halt { reason, roll_back }) = step.transition else {
                panic!("{needle}: {step:?}")
            };
            assert!(reason.contains(needle), "{reason}");
            assert_eq!(roll_back, canaries);

            let few = VersionHealth { events: 19, ..health.clone() };
            let step = evaluate(R, V, &plan, &running(0, 0), &devices, &few, 1);
            assert_eq!(step.transition, None, "{needle}: too few events to judge, and too few to advance");
            assert!(step.waiting.unwrap().contains("events"));
        }
    }

    #[test]
    fn gates_inside_their_limits_let_the_rollout_advance() {
        let mut plan = plan(&[(10.0, 0), (100.0, 0)]);
        plan.gates.max_error_rate = Some(0.1);
        plan.gates.max_p50_local_latency_ms = Some(300);
        plan.gates.min_call_ratio = Some(0.1);
        plan.gates.max_call_ratio = Some(0.3);
        let mut devices = fleet(10);
        let canaries: Vec<String> = stage_members(R, 10.0, &devices).iter().map(|s| s.to_string()).collect();
        report(&mut devices, &canaries, 0, UpdateState::Active, 20);
        let health = VersionHealth { events: 20, errors: 2, cloud: 4, p50_local_ms: Some(300) };
        let step = evaluate(R, V, &plan, &running(0, 0), &devices, &health, 1);
        assert_eq!(step.transition, Some(Transition::Advance { stage: 1 }));
    }

    #[test]
    fn only_a_running_rollout_does_anything() {
        let devices = fleet(5);
        for status in [
            RolloutStatus::Paused,
            RolloutStatus::Completed,
            RolloutStatus::Halted,
            RolloutStatus::Aborted,
            RolloutStatus::Superseded,
        ] {
            let progress = Progress { status, stage: 0, stage_started_ms: 0 };
            let step = evaluate(R, V, &plan(&[(100.0, 0)]), &progress, &devices, &Default::default(), 1);
            assert_eq!(step, Step::default(), "{status:?}");
            assert_eq!(RolloutStatus::parse(status.as_str()), Some(status));
        }
    }

    #[test]
    fn a_device_joining_later_is_assigned_at_the_current_stage() {
        let plan = plan(&[(100.0, 0)]);
        let mut devices = fleet(3);
        let all: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
        report(&mut devices, &all, 0, UpdateState::Active, 1);
        devices.push(DeviceObservation { id: "late".into(), assigned_at_ms: None, report: None, events: 0 });
        let step = evaluate(R, V, &plan, &running(0, 0), &devices, &Default::default(), 1);
        assert_eq!(step.assign, ["late"]);
        assert_eq!(step.transition, None);
    }
}

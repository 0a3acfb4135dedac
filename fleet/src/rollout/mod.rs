//! Staged rollouts of registered models: the plan an operator gives (`plan`), the state machine
//! that decides each step without I/O (`decide`), and the service that feeds it from the
//! database, records its decisions and publishes the assignments (`service`).

mod decide;
mod plan;
mod service;

pub use decide::{
    DeviceObservation, ObservedReport, Progress, RolloutStatus, Step, Transition, VersionHealth, bucket,
    evaluate, stage_members,
};
pub use plan::{HealthGates, RolloutPlan, RolloutStage};
pub use service::{NewRollout, RolloutError, Rollouts};

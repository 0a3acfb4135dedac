//! The device updater: downloads an assigned model bundle, verifies it, and keeps two model slots
//! (A/B) with crash-safe activation, probation and rollback.
//!
//! - [`slots`]: the slot store on disk (`STATE_DIR/slots/{a,b,state.json}`), its recovery at
//!   startup and every change of what is served.
//! - [`state`] and `state_file`: the state file's contents and its atomic replacement.
//! - [`verify`]: whether a slot holds exactly its bundle, byte for byte.
//! - [`download`] and [`bandwidth`]: resumable, bandwidth-bounded HTTP(S) downloads.
//! - [`stage`]: from an [`Assignment`] to a verified [`StagedBundle`].
//! - [`probation`]: when a newly activated slot is reverted or committed.
//! - [`command`]: the operator's manual update.
//! - [`serving`]: what `tandemd serve` loads at startup, and its probation bookkeeping.
//! - [`config`]: the `[updater]` section.
//! - [`live`]: updates while serving — stage, load in a second session, probe, activate, swap —
//!   and health probes of a model on probation.
//! - [`fleet_link`]: assignments from MQTT and HTTPS polling; the status published over MQTT.
//! - [`report`]: the update state shared by the task, `/v1/status`, `/metrics` and the status.
//!
//! The daemon at start ([`serving`], wired in `serve`): [`Slots::open`] and
//! [`Slots::record_start`], then load [`Slots::current`] (or the configured model directory when it
//! is `None`) and call [`Slots::record_healthy`] once it is loaded. With `[updater] enabled`, the
//! store then passes to the [`live`] task for the daemon's life.

#![warn(missing_docs)]

pub mod bandwidth;
pub mod command;
pub mod config;
pub mod download;
pub mod fleet_link;
pub mod live;
pub mod probation;
pub mod report;
pub mod serving;
pub mod slots;
pub mod stage;
pub mod state;
mod state_file;
#[cfg(test)]
mod test_bundle;
pub mod verify;

pub use config::UpdaterConfig;
pub use live::LiveUpdater;
pub use probation::{Probation, ProbationPolicy, ProbationVerdict, RevertReason};
pub use report::{UpdateOutcome, UpdateSnapshot, UpdateTracker};
pub use serving::{StartupModel, StartupModelError};
pub use slots::{ProbationOutcome, Recovery, SlotView, Slots, SlotsError, StagedBundle};
pub use stage::{Assignment, StageError, StageEvent, Staged, Updater};
pub use state::{BundleId, Rollback, SlotId, SlotState, SlotStatus};

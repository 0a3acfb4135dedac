//! The slot state kept in `slots/state.json`: which slot serves, which one is the way back, what
//! each slot holds, the probation counters and the last rollback. Plain data; [`super::slots`]
//! decides the transitions and [`super::state_file`] writes it atomically.

use serde::{Deserialize, Serialize};

use super::probation::{Probation, RevertReason};

/// The state file layout this build writes and understands.
pub const STATE_FORMAT: u32 = 1;

/// How many rolled-back bundles are remembered (and refused when assigned again).
pub(crate) const REJECTED_KEPT: usize = 8;

/// One of the two model slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotId {
    /// `slots/a`.
    A,
    /// `slots/b`.
    B,
}

impl SlotId {
    /// Both slots, `a` first.
    pub const ALL: [SlotId; 2] = [SlotId::A, SlotId::B];

    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }

    /// The slot's directory name under `slots/`.
    pub fn dir_name(self) -> &'static str {
        match self {
            SlotId::A => "a",
            SlotId::B => "b",
        }
    }
}

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// Which build of a model a slot holds: the manifest's name and version and the sha256 of the
/// manifest's bytes, which (through the per-file digests in it) pins every file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleId {
    /// The manifest's model name.
    pub name: String,
    /// The manifest's version.
    pub version: String,
    /// Hex sha256 of `manifest.json` as published.
    pub manifest_sha256: String,
}

impl std::fmt::Display for BundleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// What a slot directory holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum SlotStatus {
    /// Nothing usable; the directory may hold leftovers.
    #[default]
    Empty,
    /// A download of `bundle` is under way or was interrupted; never served.
    Staging {
        /// The bundle being staged.
        bundle: BundleId,
    },
    /// `bundle` was downloaded and verified in full.
    Ready {
        /// The bundle the slot holds.
        bundle: BundleId,
    },
}

impl SlotStatus {
    /// The bundle of a ready slot.
    pub fn ready_bundle(&self) -> Option<&BundleId> {
        match self {
            SlotStatus::Ready { bundle } => Some(bundle),
            _ => None,
        }
    }
}

/// A rollback that happened, kept so that status reports can say why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The bundle that was abandoned.
    pub from: BundleId,
    /// The bundle served instead; `None` is the configured (factory) model directory.
    pub to: Option<BundleId>,
    /// Why.
    pub reason: RevertReason,
}

/// The whole of `slots/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotState {
    /// Layout version ([`STATE_FORMAT`]).
    pub format: u32,
    /// The slot to serve; `None` serves the configured model directory.
    pub active: Option<SlotId>,
    /// The slot to go back to if the active one fails probation.
    pub previous: Option<SlotId>,
    /// What slot `a` holds.
    pub a: SlotStatus,
    /// What slot `b` holds.
    pub b: SlotStatus,
    /// The active slot's probation, until it is committed.
    #[serde(default)]
    pub probation: Option<Probation>,
    /// The most recent rollback.
    #[serde(default)]
    pub last_rollback: Option<Rollback>,
    /// Bundles rolled back on this device, newest last; they are not staged again unless forced.
    #[serde(default)]
    pub rejected: Vec<BundleId>,
}

impl Default for SlotState {
    fn default() -> Self {
        Self {
            format: STATE_FORMAT,
            active: None,
            previous: None,
            a: SlotStatus::Empty,
            b: SlotStatus::Empty,
            probation: None,
            last_rollback: None,
            rejected: Vec::new(),
        }
    }
}

impl SlotState {
    /// What `slot` holds.
    pub fn slot(&self, slot: SlotId) -> &SlotStatus {
        match slot {
            SlotId::A => &self.a,
            SlotId::B => &self.b,
        }
    }

    pub(crate) fn slot_mut(&mut self, slot: SlotId) -> &mut SlotStatus {
        match slot {
            SlotId::A => &mut self.a,
            SlotId::B => &mut self.b,
        }
    }
}

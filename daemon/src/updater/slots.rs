//! The A/B slot store under the daemon's state directory: `slots/a`, `slots/b` and
//! `slots/state.json`. Every change of what is served is one atomic replacement of the state file;
//! a slot's files are only changed while the state file marks it as staging, so a slot marked ready
//! is never a mix of two builds. [`Slots::open`] recovers from whatever a crash left behind and
//! verifies the slot it returns in full.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tandem_core::bundle::signature::VerifyingKey;

use super::probation::{Probation, ProbationPolicy, ProbationVerdict, RevertReason};
use super::state::{BundleId, REJECTED_KEPT, Rollback, STATE_FORMAT, SlotId, SlotState, SlotStatus};
use super::state_file;
use super::verify::verify_slot_dir;

/// The slot store's directory under the state directory.
pub const SLOTS_DIR: &str = "slots";
/// The state file's name inside [`SLOTS_DIR`].
pub const STATE_FILE: &str = "state.json";
/// The lock file inside [`SLOTS_DIR`]: one process at a time owns the store.
pub const LOCK_FILE: &str = "lock";
/// How long [`Slots::open`] waits for a lock held by someone else before reporting it busy.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Errors of the slot store.
#[derive(Debug, thiserror::Error)]
pub enum SlotsError {
    /// A file or directory of the store could not be read or written.
    #[error(
        "cannot {action} {path}: {cause}; the state directory must be writable by the user tandemd \
         runs as, on a disk with free space",
        path = .path.display()
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        cause: io::Error,
    },
    /// The state file was written by a newer tandemd.
    #[error(
        "{path} has format {found}; this tandemd understands format {STATE_FORMAT}: it was written by \
         a newer tandemd. Upgrade tandemd again, or move {path} aside to serve the configured model",
        path = .path.display()
    )]
    UnsupportedFormat {
        /// The state file.
        path: PathBuf,
        /// Its format number.
        found: u32,
    },
    /// Another process has the store open.
    #[error(
        "{path} is locked by another process (a running tandemd, or another `tandemd update`); \
         a daemon running with `[updater] enabled` takes its updates from the fleet (assign the version \
         there); otherwise stop it first",
        path = .path.display()
    )]
    Busy {
        /// The lock file.
        path: PathBuf,
    },
    /// [`Slots::activate`] was given a bundle its slot no longer holds.
    #[error(
        "slot {slot} no longer holds {bundle} ready to serve (it was staged again since); stage it again"
    )]
    NotStaged {
        /// The slot.
        slot: SlotId,
        /// The bundle that was staged there.
        bundle: BundleId,
    },
}

/// What [`Slots::open`] repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// A temporary state file left by an interrupted write was removed; the previous state stands.
    TornStateDiscarded,
    /// The state file could not be parsed; it was moved aside and the store starts empty.
    StateQuarantined {
        /// Where the unreadable file now is.
        moved_to: PathBuf,
        /// Why it could not be read.
        cause: String,
    },
    /// The active slot did not verify and was abandoned.
    ActiveRolledBack(Rollback),
    /// A download into this slot was interrupted; it is resumed when the same bundle is staged again.
    InterruptedStaging {
        /// The slot.
        slot: SlotId,
        /// The bundle being staged.
        bundle: BundleId,
    },
}

/// A slot and the bundle it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// Which slot.
    pub slot: SlotId,
    /// Its directory: the model directory to load.
    pub dir: PathBuf,
    /// The bundle in it.
    pub bundle: BundleId,
}

/// A bundle downloaded into a slot and verified in full, ready for [`Slots::activate`]. Only the
/// store makes these, so activation cannot be handed an unverified directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedBundle {
    view: SlotView,
}

impl StagedBundle {
    /// The slot it is in.
    pub fn slot(&self) -> SlotId {
        self.view.slot
    }

    /// The model directory: load it in a second session to probe it before activating.
    pub fn dir(&self) -> &Path {
        &self.view.dir
    }

    /// The bundle.
    pub fn bundle(&self) -> &BundleId {
        &self.view.bundle
    }
}

/// What a probation event led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbationOutcome {
    /// The active slot is not on probation (or nothing is active); nothing changed.
    NotOnProbation,
    /// Still on probation.
    Continue,
    /// Probation passed; the active slot is committed.
    Committed,
    /// Probation failed; the previous slot (or the configured model) is active again.
    RolledBack(Rollback),
}

/// How staging into a slot begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StagingStart {
    /// The slot was emptied for the bundle.
    Fresh,
    /// The slot holds an interrupted download of the same bundle.
    Resume,
    /// The slot already holds the bundle, verified.
    AlreadyReady,
}

/// The A/B slot store.
#[derive(Debug)]
pub struct Slots {
    /// Held (locked) for as long as the store is open; the kernel releases it if the process dies.
    _lock: fs::File,
    dir: PathBuf,
    trusted: Vec<VerifyingKey>,
    state: SlotState,
    recovered: Vec<Recovery>,
}

impl Slots {
    /// Opens (creating if needed) the store under `state_dir`, repairs what an interrupted run left,
    /// and verifies the active slot in full (reading every file), falling back to the previous slot
    /// or to the configured model when it does not verify. With `trusted` keys, a slot must also be
    /// signed by one of them.
    pub fn open(state_dir: &Path, trusted: Vec<VerifyingKey>) -> Result<Self, SlotsError> {
        let dir = state_dir.join(SLOTS_DIR);
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        // A lock held only for a moment is waited for: a child this process forks holds a copy of
        // the descriptor (and so the lock) until it execs, even after the store is dropped here.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => return Err(SlotsError::Busy { path: lock_path }),
                Err(fs::TryLockError::Error(cause)) => {
                    return Err(SlotsError::Io { action: "lock", path: lock_path, cause });
                }
            }
        }
        let state_path = dir.join(STATE_FILE);
        let mut recovered = Vec::new();
        if state_file::discard_torn(&state_path).map_err(io_error("remove the temporary of", &state_path))? {
            recovered.push(Recovery::TornStateDiscarded);
        }
        let state = match fs::read(&state_path) {
            Ok(bytes) => match serde_json::from_slice::<SlotState>(&bytes) {
                Ok(state) if state.format == STATE_FORMAT => state,
                Ok(state) => {
                    return Err(SlotsError::UnsupportedFormat { path: state_path, found: state.format });
                }
                Err(cause) => {
                    let moved_to = dir.join("state.json.unreadable");
                    fs::rename(&state_path, &moved_to).map_err(io_error("move aside", &state_path))?;
                    tracing::error!(
                        path = %state_path.display(), moved_to = %moved_to.display(), %cause,
                        "the slot state file is unreadable; starting from the configured model"
                    );
                    recovered.push(Recovery::StateQuarantined { moved_to, cause: cause.to_string() });
                    SlotState::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => SlotState::default(),
            Err(cause) => return Err(SlotsError::Io { action: "read", path: state_path, cause }),
        };
        let mut slots = Self { _lock: lock, dir, trusted, state, recovered };
        if let Some(active) = slots.state.active
            && let Err(detail) = slots.verify(active)
        {
            let rollback = slots.roll_back(RevertReason::VerificationFailed { detail })?;
            slots.recovered.push(Recovery::ActiveRolledBack(rollback));
        }
        for slot in SlotId::ALL {
            if let SlotStatus::Staging { bundle } = slots.state.slot(slot) {
                slots.recovered.push(Recovery::InterruptedStaging { slot, bundle: bundle.clone() });
            }
        }
        Ok(slots)
    }

    /// The slot the state file makes active, read without taking the store's lock (another
    /// process, `tandemd update`, holds it): the active slot when it verifies in full, else `None`
    /// (the configured model directory). Reading is safe while an update runs: staging only ever
    /// writes the inactive slot, and the state file is replaced atomically. Repairs and probation
    /// bookkeeping are left to the lock holder.
    pub fn peek_current(state_dir: &Path, trusted: &[VerifyingKey]) -> Option<SlotView> {
        let dir = state_dir.join(SLOTS_DIR);
        let bytes = fs::read(dir.join(STATE_FILE)).ok()?;
        let state = serde_json::from_slice::<SlotState>(&bytes).ok().filter(|s| s.format == STATE_FORMAT)?;
        let slot = state.active?;
        let bundle = state.slot(slot).ready_bundle()?.clone();
        let slot_dir = dir.join(slot.dir_name());
        verify_slot_dir(&slot_dir, &bundle, trusted).ok()?;
        Some(SlotView { slot, dir: slot_dir, bundle })
    }

    /// The slot to serve; `None` means the configured model directory.
    pub fn current(&self) -> Option<SlotView> {
        self.state.active.and_then(|slot| self.view(slot))
    }

    /// The slot a failed probation goes back to; `None` means the configured model directory.
    pub fn previous(&self) -> Option<SlotView> {
        self.state.previous.and_then(|slot| self.view(slot))
    }

    /// The active slot's probation, until it is committed.
    pub fn probation(&self) -> Option<&Probation> {
        self.state.probation.as_ref()
    }

    /// The most recent rollback, for status reports.
    pub fn last_rollback(&self) -> Option<&Rollback> {
        self.state.last_rollback.as_ref()
    }

    /// What [`Slots::open`] repaired.
    pub fn recovered(&self) -> &[Recovery] {
        &self.recovered
    }

    /// The whole state, for status reports.
    pub fn state(&self) -> &SlotState {
        &self.state
    }

    /// The trusted keys slots are verified against.
    pub fn trusted_keys(&self) -> &[VerifyingKey] {
        &self.trusted
    }

    /// The directory of `slot`.
    pub fn slot_dir(&self, slot: SlotId) -> PathBuf {
        self.dir.join(slot.dir_name())
    }

    /// Whether `bundle` was rolled back on this device (it is then not staged again unless forced).
    pub fn is_rejected(&self, bundle: &BundleId) -> bool {
        self.state.rejected.iter().any(|b| b.manifest_sha256 == bundle.manifest_sha256)
    }

    /// Lets a rolled-back `bundle` be staged again (an operator's `--force`).
    pub fn forget_rejection(&mut self, bundle: &BundleId) -> Result<(), SlotsError> {
        let before = self.state.rejected.len();
        self.state.rejected.retain(|b| b.manifest_sha256 != bundle.manifest_sha256);
        if self.state.rejected.len() != before { self.persist() } else { Ok(()) }
    }

    /// Makes `staged` the active slot and puts it on probation under `policy`; the slot served so
    /// far becomes the previous one. One atomic write of the state file: a crash before it serves
    /// the old slot, after it the new one.
    pub fn activate(
        &mut self,
        staged: &StagedBundle,
        policy: ProbationPolicy,
    ) -> Result<SlotView, SlotsError> {
        let slot = staged.slot();
        if self.state.slot(slot).ready_bundle() != Some(staged.bundle()) {
            return Err(SlotsError::NotStaged { slot, bundle: staged.bundle().clone() });
        }
        if self.state.active != Some(slot) {
            self.state.previous = self.state.active;
            self.state.active = Some(slot);
            self.state.probation = Some(Probation::new(policy));
            self.persist()?;
            tracing::info!(
                %slot, bundle = %staged.bundle(), previous = ?self.state.previous,
                "model slot activated, on probation"
            );
        }
        Ok(staged.view.clone())
    }

    /// A process starts serving the active slot: counts the start for its probation, and rolls
    /// back when the slot crashed too often. Call before loading the model from [`Slots::current`].
    pub fn record_start(&mut self) -> Result<ProbationOutcome, SlotsError> {
        self.on_probation(Probation::on_start)
    }

    /// The active slot's model loaded and answered its first probe.
    pub fn record_healthy(&mut self) -> Result<(), SlotsError> {
        self.on_probation(|p| {
            p.on_healthy();
            ProbationVerdict::Continue
        })
        .map(drop)
    }

    /// A periodic health probe of the active slot passed or failed.
    pub fn record_probe(&mut self, passed: bool) -> Result<ProbationOutcome, SlotsError> {
        self.on_probation(|p| p.on_probe(passed))
    }

    /// Goes back to the previous slot (or the configured model) now, for `reason`; `None` when no
    /// slot is active.
    pub fn revert(&mut self, reason: RevertReason) -> Result<Option<Rollback>, SlotsError> {
        if self.state.active.is_none() {
            return Ok(None);
        }
        self.roll_back(reason).map(Some)
    }

    fn on_probation(
        &mut self,
        event: impl FnOnce(&mut Probation) -> ProbationVerdict,
    ) -> Result<ProbationOutcome, SlotsError> {
        let Some(probation) = self.state.probation.as_mut() else {
            return Ok(ProbationOutcome::NotOnProbation);
        };
        match event(probation) {
            ProbationVerdict::Continue => {
                self.persist()?;
                Ok(ProbationOutcome::Continue)
            }
            ProbationVerdict::Commit => {
                self.state.probation = None;
                self.persist()?;
                tracing::info!(bundle = ?self.current().map(|v| v.bundle.to_string()), "model slot passed probation");
                Ok(ProbationOutcome::Committed)
            }
            ProbationVerdict::Revert(reason) => self.roll_back(reason).map(ProbationOutcome::RolledBack),
        }
    }

    /// Switches to the previous slot when it verifies, else to the configured model; remembers the
    /// abandoned bundle as rejected unless it only failed verification (damaged files, not a bad model).
    fn roll_back(&mut self, reason: RevertReason) -> Result<Rollback, SlotsError> {
        let active = self.state.active.expect("rolling back needs an active slot");
        let from = match self.state.slot(active) {
            SlotStatus::Ready { bundle } | SlotStatus::Staging { bundle } => bundle.clone(),
            SlotStatus::Empty => {
                BundleId { name: "unknown".into(), version: "unknown".into(), manifest_sha256: String::new() }
            }
        };
        let target = self.state.previous.filter(|&p| p != active).filter(|&p| match self.verify(p) {
            Ok(()) => true,
            Err(detail) => {
                tracing::error!(slot = %p, %detail, "the previous slot does not verify either; serving the configured model");
                false
            }
        });
        let rejected = !matches!(reason, RevertReason::VerificationFailed { .. });
        if rejected {
            self.state.rejected.retain(|b| b.manifest_sha256 != from.manifest_sha256);
            self.state.rejected.push(from.clone());
            let excess = self.state.rejected.len().saturating_sub(REJECTED_KEPT);
            self.state.rejected.drain(..excess);
        } else {
            *self.state.slot_mut(active) = SlotStatus::Empty;
        }
        let rollback =
            Rollback { from, to: target.and_then(|t| self.state.slot(t).ready_bundle().cloned()), reason };
        self.state.active = target;
        self.state.previous = None;
        self.state.probation = None;
        self.state.last_rollback = Some(rollback.clone());
        self.persist()?;
        tracing::warn!(
            from = %rollback.from,
            to = %rollback.to.as_ref().map_or("the configured model".to_string(), ToString::to_string),
            reason = %rollback.reason,
            "model slot rolled back"
        );
        Ok(rollback)
    }

    /// Chooses the slot to stage `bundle` into and prepares it: the state file marks it as staging
    /// before any of its files change, and the previous slot, if it is that one, stops being a way back.
    pub(crate) fn begin_staging(
        &mut self,
        bundle: &BundleId,
    ) -> Result<(SlotId, PathBuf, StagingStart), SlotsError> {
        let slot = self.staging_target(bundle);
        let dir = self.slot_dir(slot);
        let start = match self.state.slot(slot) {
            SlotStatus::Staging { bundle: b } if b == bundle => StagingStart::Resume,
            SlotStatus::Ready { bundle: b } if b == bundle => StagingStart::AlreadyReady,
            _ => StagingStart::Fresh,
        };
        if start != StagingStart::AlreadyReady {
            if self.state.previous == Some(slot) {
                self.state.previous = None;
            }
            *self.state.slot_mut(slot) = SlotStatus::Staging { bundle: bundle.clone() };
            self.persist()?;
        }
        if start == StagingStart::Fresh {
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(cause) => return Err(SlotsError::Io { action: "empty", path: dir, cause }),
            }
        }
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        Ok((slot, dir, start))
    }

    /// Marks a ready slot whose files no longer verify as staging `bundle` again, so that the
    /// next download repairs it.
    pub(crate) fn mark_staging(&mut self, slot: SlotId, bundle: &BundleId) -> Result<(), SlotsError> {
        if self.state.active == Some(slot) {
            return Ok(());
        }
        if self.state.previous == Some(slot) {
            self.state.previous = None;
        }
        *self.state.slot_mut(slot) = SlotStatus::Staging { bundle: bundle.clone() };
        self.persist()
    }

    /// Records that `slot` now holds `bundle`, verified in full.
    pub(crate) fn mark_ready(&mut self, slot: SlotId, bundle: &BundleId) -> Result<StagedBundle, SlotsError> {
        let dir = self.slot_dir(slot);
        state_file::sync_dir(&dir).map_err(io_error("sync", &dir))?;
        *self.state.slot_mut(slot) = SlotStatus::Ready { bundle: bundle.clone() };
        self.persist()?;
        Ok(StagedBundle { view: SlotView { slot, dir, bundle: bundle.clone() } })
    }

    /// The inactive slot; with none active, one already holding `bundle`, else an empty one, else `a`.
    fn staging_target(&self, bundle: &BundleId) -> SlotId {
        if let Some(active) = self.state.active {
            return active.other();
        }
        let holds = |slot: SlotId| match self.state.slot(slot) {
            SlotStatus::Staging { bundle: b } | SlotStatus::Ready { bundle: b } => b == bundle,
            SlotStatus::Empty => false,
        };
        SlotId::ALL
            .into_iter()
            .find(|&s| holds(s))
            .or_else(|| SlotId::ALL.into_iter().find(|&s| *self.state.slot(s) == SlotStatus::Empty))
            .unwrap_or(SlotId::A)
    }

    fn view(&self, slot: SlotId) -> Option<SlotView> {
        let bundle = self.state.slot(slot).ready_bundle()?.clone();
        Some(SlotView { slot, dir: self.slot_dir(slot), bundle })
    }

    fn verify(&self, slot: SlotId) -> Result<(), String> {
        let Some(bundle) = self.state.slot(slot).ready_bundle() else {
            return Err(format!("slot {slot} holds no verified bundle"));
        };
        verify_slot_dir(&self.slot_dir(slot), bundle, &self.trusted).map_err(|e| e.to_string())
    }

    fn persist(&self) -> Result<(), SlotsError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&self.state).expect("the slot state always serialises");
        state_file::write_atomic(&path, &bytes).map_err(io_error("write", &path))
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SlotsError + use<> {
    let path = path.to_path_buf();
    move |cause| SlotsError::Io { action, path, cause }
}

#[cfg(test)]
mod tests {
    use tandem_core::bundle::MODEL_FILE;
    use tandem_core::bundle::signature::SigningKey;

    use super::*;
    use crate::updater::test_bundle::stage_locally;

    fn policy() -> ProbationPolicy {
        ProbationPolicy { max_unhealthy_starts: 2, max_failed_probes: 2, probes_to_commit: 2, max_starts: 5 }
    }

    /// A store with version 1 active (committed) and version 2 active on probation.
    fn two_versions(state_dir: &Path) -> Slots {
        let mut slots = Slots::open(state_dir, Vec::new()).unwrap();
        let v1 = stage_locally(&mut slots, "1", None);
        slots.activate(&v1, policy()).unwrap();
        slots.record_probe(true).unwrap();
        assert_eq!(slots.record_probe(true).unwrap(), ProbationOutcome::Committed);
        let v2 = stage_locally(&mut slots, "2", None);
        slots.activate(&v2, policy()).unwrap();
        slots
    }

    fn version(view: Option<SlotView>) -> Option<String> {
        view.map(|v| v.bundle.version)
    }

    #[test]
    fn an_empty_store_serves_the_configured_model() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::open(dir.path(), Vec::new()).unwrap();
        assert_eq!(slots.current(), None);
        assert_eq!(slots.previous(), None);
        assert!(slots.recovered().is_empty());
    }

    #[test]
    fn activation_switches_slots_keeps_the_previous_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let slots = two_versions(dir.path());
        assert_eq!(version(slots.current()), Some("2".into()));
        assert_eq!(version(slots.previous()), Some("1".into()));
        assert_ne!(slots.current().unwrap().slot, slots.previous().unwrap().slot);
        drop(slots);
        let reopened = Slots::open(dir.path(), Vec::new()).unwrap();
        assert_eq!(version(reopened.current()), Some("2".into()));
        assert_eq!(version(reopened.previous()), Some("1".into()));
        assert!(reopened.probation().is_some());
    }

    #[test]
    fn a_second_process_cannot_open_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Slots::open(dir.path(), Vec::new()).unwrap();
        let err = Slots::open(dir.path(), Vec::new()).unwrap_err();
        assert!(matches!(err, SlotsError::Busy { .. }), "{err}");
    }

    #[test]
    fn a_torn_state_write_is_discarded_and_the_last_state_stands() {
        let dir = tempfile::tempdir().unwrap();
        drop(two_versions(dir.path()));
        let slots_dir = dir.path().join(SLOTS_DIR);
        fs::write(slots_dir.join("state.json.tmp"), b"{\"format\":1,\"act").unwrap();
        let slots = Slots::open(dir.path(), Vec::new()).unwrap();
        assert_eq!(slots.recovered(), [Recovery::TornStateDiscarded]);
        assert_eq!(version(slots.current()), Some("2".into()));
    }

    #[test]
    fn an_unreadable_state_file_is_moved_aside_and_the_configured_model_served() {
        let dir = tempfile::tempdir().unwrap();
        drop(two_versions(dir.path()));
        fs::write(dir.path().join(SLOTS_DIR).join(STATE_FILE), b"garbage").unwrap();
        let slots = Slots::open(dir.path(), Vec::new()).unwrap();
        assert!(
            matches!(slots.recovered(), [Recovery::StateQuarantined { moved_to, .. }] if moved_to.is_file())
        );
        assert_eq!(slots.current(), None);
    }

    #[test]
    fn an_active_slot_with_a_damaged_file_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let slots = two_versions(dir.path());
        let damaged = slots.current().unwrap().dir.join(MODEL_FILE);
        drop(slots);
        fs::write(&damaged, b"graph of version 3").unwrap();
        let slots = Slots::open(dir.path(), Vec::new()).unwrap();
        assert_eq!(version(slots.current()), Some("1".into()));
        assert_eq!(slots.previous(), None);
        let rollback = slots.last_rollback().unwrap();
        assert!(
            matches!(&rollback.reason, RevertReason::VerificationFailed { detail } if detail.contains("sha256")),
            "{rollback:?}"
        );
        assert!(matches!(slots.recovered(), [Recovery::ActiveRolledBack(_)]));
        assert!(!slots.is_rejected(&rollback.from), "damaged files are not a verdict on the build");
    }

    #[test]
    fn crashed_starts_on_probation_revert_across_restarts_and_reject_the_build() {
        let dir = tempfile::tempdir().unwrap();
        drop(two_versions(dir.path()));
        // Each start is a fresh process that dies before becoming healthy.
        for _ in 0..2 {
            let mut slots = Slots::open(dir.path(), Vec::new()).unwrap();
            assert_eq!(slots.record_start().unwrap(), ProbationOutcome::Continue);
        }
        let mut slots = Slots::open(dir.path(), Vec::new()).unwrap();
        let ProbationOutcome::RolledBack(rollback) = slots.record_start().unwrap() else {
            panic!("the third start must roll back");
        };
        assert_eq!(rollback.reason, RevertReason::CrashLoop { starts: 2 });
        assert_eq!((rollback.from.version.as_str(), rollback.to.map(|b| b.version)), ("2", Some("1".into())));
        assert_eq!(version(slots.current()), Some("1".into()));
        assert!(slots.is_rejected(&rollback.from));
        assert_eq!(slots.record_start().unwrap(), ProbationOutcome::NotOnProbation);
        drop(slots);
        let slots = Slots::open(dir.path(), Vec::new()).unwrap();
        assert_eq!(version(slots.current()), Some("1".into()));
        assert!(slots.last_rollback().is_some());
    }

    #[test]
    fn failed_probes_revert_and_passing_probes_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut slots = two_versions(dir.path());
        slots.record_start().unwrap();
        slots.record_healthy().unwrap();
        assert_eq!(slots.record_probe(false).unwrap(), ProbationOutcome::Continue);
        assert!(matches!(slots.record_probe(false).unwrap(), ProbationOutcome::RolledBack(_)));
        assert_eq!(version(slots.current()), Some("1".into()));

        let dir = tempfile::tempdir().unwrap();
        let mut slots = two_versions(dir.path());
        slots.record_start().unwrap();
        slots.record_probe(true).unwrap();
        assert_eq!(slots.record_probe(true).unwrap(), ProbationOutcome::Committed);
        assert_eq!(slots.probation(), None);
        assert_eq!(version(slots.previous()), Some("1".into()), "the previous slot stays as a way back");
    }

    #[test]
    fn reverting_the_first_slot_ever_serves_the_configured_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut slots = Slots::open(dir.path(), Vec::new()).unwrap();
        let v1 = stage_locally(&mut slots, "1", None);
        slots.activate(&v1, policy()).unwrap();
        let rollback = slots.revert(RevertReason::Manual).unwrap().unwrap();
        assert_eq!(rollback.to, None);
        assert_eq!(slots.current(), None);
    }

    #[test]
    fn staging_over_the_previous_slot_stops_it_being_a_way_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut slots = two_versions(dir.path());
        let v3 = stage_locally(&mut slots, "3", None);
        assert_eq!(version(slots.previous()), None);
        let old_active = slots.current().unwrap().slot;
        assert_eq!(v3.slot(), old_active.other());
        slots.activate(&v3, policy()).unwrap();
        assert_eq!(version(slots.previous()), Some("2".into()));
    }

    #[test]
    fn activating_a_bundle_whose_slot_was_restaged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut slots = two_versions(dir.path());
        let v3 = stage_locally(&mut slots, "3", None);
        let v4 = stage_locally(&mut slots, "4", None);
        assert_eq!(v3.slot(), v4.slot());
        let err = slots.activate(&v3, policy()).unwrap_err();
        assert!(matches!(err, SlotsError::NotStaged { .. }), "{err}");
    }

    #[test]
    fn with_trusted_keys_an_unsigned_active_slot_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        {
            let mut slots = Slots::open(dir.path(), Vec::new()).unwrap();
            let v1 = stage_locally(&mut slots, "1", None);
            slots.activate(&v1, policy()).unwrap();
        }
        let slots = Slots::open(dir.path(), vec![key.verifying_key()]).unwrap();
        assert_eq!(slots.current(), None);
        let mut slots = {
            drop(slots);
            Slots::open(dir.path(), vec![key.verifying_key()]).unwrap()
        };
        let signed = stage_locally(&mut slots, "2", Some(&key));
        slots.activate(&signed, policy()).unwrap();
        drop(slots);
        let slots = Slots::open(dir.path(), vec![key.verifying_key()]).unwrap();
        assert_eq!(version(slots.current()), Some("2".into()));
    }
}

//! What `tandemd serve` does with the slots when it starts: serve the active slot (or the
//! configured model directory when nothing was ever installed), count the start for a slot on
//! probation — a start that never becomes healthy counts as a crash, and too many revert to the
//! previous slot, also across reboots — and mark the start healthy once the model is loaded.
//!
//! Without `[updater] enabled`, the store's lock is held only for this bookkeeping, so `tandemd
//! update` can stage and activate the next version while the daemon serves; the new version is
//! served from the next start. With it, [`StartupModel::loaded`] hands the open store to the
//! updater task, which keeps it (and its lock) while the daemon runs.

use std::path::{Path, PathBuf};

use tandem_core::bundle::signature::VerifyingKey;

use super::slots::{ProbationOutcome, SlotView, Slots, SlotsError};

/// The model directory chosen at startup.
#[derive(Debug)]
pub struct StartupModel {
    /// The directory to load.
    pub model_dir: PathBuf,
    /// The installed slot it comes from (`None`: the configured model directory).
    pub slot: Option<SlotView>,
    /// The open store, kept until [`StartupModel::loaded`] marks the start healthy.
    slots: Option<Slots>,
}

/// Why no model directory could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum StartupModelError {
    /// The slot store is damaged or unreadable.
    #[error(transparent)]
    Slots(#[from] SlotsError),
    /// Nothing is installed and no model directory is configured.
    #[error("no model directory: give --model DIR or model_dir, or install a bundle with `tandemd update`")]
    NoModel,
}

impl StartupModel {
    /// Chooses what to serve from the slots under `state_dir`, falling back to `configured`.
    /// Slots are verified in full (sizes, sha256, and a signature by one of `trusted` when any are
    /// given) before they are chosen.
    pub fn choose(
        state_dir: &Path,
        configured: Option<&Path>,
        trusted: &[VerifyingKey],
    ) -> Result<Self, StartupModelError> {
        let (slot, slots) = match Slots::open(state_dir, trusted.to_vec()) {
            Ok(mut slots) => {
                for recovery in slots.recovered() {
                    tracing::warn!(?recovery, "the model slots recovered from an interrupted run");
                }
                if let ProbationOutcome::RolledBack(rollback) = slots.record_start()? {
                    tracing::error!(?rollback, "the new model kept failing to start; rolled back");
                }
                (slots.current(), Some(slots))
            }
            Err(SlotsError::Busy { path }) => {
                tracing::warn!(
                    lock = %path.display(),
                    "an update is running; serving the active slot as the state file says"
                );
                (Slots::peek_current(state_dir, trusted), None)
            }
            Err(error) => return Err(error.into()),
        };
        let model_dir = match &slot {
            Some(view) => view.dir.clone(),
            None => configured.ok_or(StartupModelError::NoModel)?.to_path_buf(),
        };
        if let Some(view) = &slot {
            tracing::info!(slot = %view.slot, version = view.bundle.version, "serving the installed model slot");
        }
        Ok(Self { model_dir, slot, slots })
    }

    /// The model loaded: a slot on probation counts a healthy start. Returns the open store (`None`
    /// when another process held it); dropping it releases the store's lock.
    pub fn loaded(mut self) -> Option<Slots> {
        if let Some(slots) = self.slots.as_mut()
            && let Err(error) = slots.record_healthy()
        {
            tracing::error!(%error, "cannot record that the model slot started healthy");
        }
        self.slots
    }
}

//! What the updater tells the world: the version served, its latest [`UpdateReport`] and how many
//! updates ended each way. One [`UpdateTracker`] is shared by the updater task (which writes it),
//! `/v1/status` and `/metrics` (which read it), and the MQTT status publisher (which waits for
//! changes), so the three never disagree.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tandem_core::protocol::{UpdateReport, UpdateState};
use tokio::sync::watch;

use crate::router::now_ms;

/// How an update ended, for `tandem_model_updates_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The new model passed its probe and serves.
    Activated,
    /// The assignment was refused or failed before serving; the previous model kept serving.
    Failed,
    /// The new model served, then was reverted.
    RolledBack,
}

impl UpdateOutcome {
    /// Every outcome, in the order metrics list them.
    pub const ALL: [UpdateOutcome; 3] =
        [UpdateOutcome::Activated, UpdateOutcome::Failed, UpdateOutcome::RolledBack];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateOutcome::Activated => "activated",
            UpdateOutcome::Failed => "failed",
            UpdateOutcome::RolledBack => "rolled_back",
        }
    }
}

/// The updater's state as status and metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateSnapshot {
    /// The version served now.
    pub model_version: Option<String>,
    /// The model slot served (`a`, `b`), `None`: the configured model directory.
    pub slot: Option<String>,
    /// Whether the served slot is on probation.
    pub on_probation: bool,
    /// The latest report on an assignment.
    pub report: Option<UpdateReport>,
    /// Updates ended by outcome, since start, in [`UpdateOutcome::ALL`] order.
    pub outcomes: [u64; 3],
}

impl UpdateSnapshot {
    /// Updates that ended with `outcome` since start.
    pub fn count(&self, outcome: UpdateOutcome) -> u64 {
        self.outcomes[outcome as usize]
    }
}

/// Shared, always-current update state; see the module documentation.
#[derive(Debug)]
pub struct UpdateTracker {
    state: Mutex<UpdateSnapshot>,
    changed: watch::Sender<u64>,
}

impl UpdateTracker {
    /// Serving `model_version` from `slot`.
    pub fn new(model_version: String, slot: Option<String>, on_probation: bool) -> Self {
        let state = UpdateSnapshot {
            model_version: Some(model_version),
            slot,
            on_probation,
            ..UpdateSnapshot::default()
        };
        Self { state: Mutex::new(state), changed: watch::Sender::new(0) }
    }

    /// The state now.
    pub fn snapshot(&self) -> UpdateSnapshot {
        self.lock().clone()
    }

    /// Wakes at every change (the value is a change counter).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The update of `version` reached `state`.
    pub fn report(&self, version: &str, state: UpdateState, detail: Option<String>) {
        self.change(|s| {
            s.report = Some(UpdateReport { version: version.to_string(), state, detail, at_ms: now_ms() })
        });
    }

    /// The update of `version` ended with `outcome` (also its report's state).
    pub fn finish(&self, version: &str, outcome: UpdateOutcome, detail: Option<String>) {
        let state = match outcome {
            UpdateOutcome::Activated => UpdateState::Active,
            UpdateOutcome::Failed => UpdateState::Failed,
            UpdateOutcome::RolledBack => UpdateState::RolledBack,
        };
        self.change(|s| {
            s.outcomes[outcome as usize] += 1;
            s.report = Some(UpdateReport { version: version.to_string(), state, detail, at_ms: now_ms() });
        });
    }

    /// `swap` puts the model of `version` in service; the tracker records it as served and the
    /// update as activated in the same change, holding its lock across the swap, so a reader that
    /// sees the new model and then takes a snapshot never sees the update still in progress.
    /// Returns what `swap` returns (the previous model).
    pub fn activated<T>(
        &self,
        version: &str,
        slot: Option<String>,
        on_probation: bool,
        swap: impl FnOnce() -> T,
    ) -> T {
        let mut state = self.lock();
        let previous = swap();
        state.model_version = Some(version.to_string());
        state.slot = slot;
        state.on_probation = on_probation;
        state.outcomes[UpdateOutcome::Activated as usize] += 1;
        state.report = Some(UpdateReport {
            version: version.to_string(),
            state: UpdateState::Active,
            detail: None,
            at_ms: now_ms(),
        });
        drop(state);
        self.changed.send_modify(|n| *n += 1);
        previous
    }

    /// Another model serves now.
    pub fn serving(&self, model_version: String, slot: Option<String>, on_probation: bool) {
        self.change(|s| {
            s.model_version = Some(model_version);
            s.slot = slot;
            s.on_probation = on_probation;
        });
    }

    /// The served slot left probation (committed).
    pub fn committed(&self) {
        self.change(|s| s.on_probation = false);
    }

    fn change(&self, apply: impl FnOnce(&mut UpdateSnapshot)) {
        apply(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
    }

    fn lock(&self) -> MutexGuard<'_, UpdateSnapshot> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_finished_update_counts_its_outcome_and_becomes_the_report() {
        let tracker = UpdateTracker::new("1".into(), None, false);
        let changes = tracker.subscribe();
        tracker.report("2", UpdateState::Downloading, None);
        tracker.finish("2", UpdateOutcome::Failed, Some("probe failed".into()));
        let snapshot = tracker.snapshot();
        assert_eq!(snapshot.count(UpdateOutcome::Failed), 1);
        assert_eq!(snapshot.count(UpdateOutcome::Activated), 0);
        let report = snapshot.report.unwrap();
        assert_eq!((report.version.as_str(), report.state), ("2", UpdateState::Failed));
        assert_eq!(snapshot.model_version.as_deref(), Some("1"));
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn whoever_sees_the_swapped_model_then_sees_the_update_active() {
        let tracker = Arc::new(UpdateTracker::new("1".into(), None, false));
        tracker.report("2", UpdateState::Probing, None);
        let served = Arc::new(Mutex::new("1"));
        let (swapped_tx, swapped_rx) = std::sync::mpsc::channel();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let updater = {
            let (tracker, served) = (Arc::clone(&tracker), Arc::clone(&served));
            std::thread::spawn(move || {
                tracker.activated("2", Some("b".into()), true, || {
                    let previous = std::mem::replace(&mut *served.lock().unwrap(), "2");
                    swapped_tx.send(()).unwrap();
                    // A reader looks while the swap is done but the activation not returned.
                    finish_rx.recv().unwrap();
                    previous
                })
            })
        };
        swapped_rx.recv().unwrap();
        assert_eq!(*served.lock().unwrap(), "2");
        let reader = {
            let tracker = Arc::clone(&tracker);
            std::thread::spawn(move || tracker.snapshot())
        };
        // Give the reader time to block on the tracker (were it not locked, it would read "probing").
        std::thread::sleep(std::time::Duration::from_millis(50));
        finish_tx.send(()).unwrap();
        assert_eq!(updater.join().unwrap(), "1", "activated returns what the swap returned");
        let snapshot = reader.join().unwrap();
        let report = snapshot.report.as_ref().expect("a report");
        assert_eq!((report.version.as_str(), report.state), ("2", UpdateState::Active));
        assert_eq!(snapshot.model_version.as_deref(), Some("2"));
        assert_eq!(snapshot.slot.as_deref(), Some("b"));
        assert!(snapshot.on_probation);
        assert_eq!(snapshot.count(UpdateOutcome::Activated), 1);
    }
}

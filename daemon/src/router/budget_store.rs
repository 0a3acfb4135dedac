//! The budget gate with its state on disk, so a restart does not reset the window.
//!
//! A reservation is on disk before the cloud call goes out. Everything else (commits, releases,
//! local answers) is written at most once per second and at shutdown: after a crash an unsettled
//! reservation counts as a spent cloud call, and lost local answers leave fewer calls allowed, so
//! what a crash loses can only make the gate stricter, never looser.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_core::budget::{
    BudgetGate, BudgetPolicy, BudgetSnapshot, BudgetState, PolicyError, Refusal, Reservation,
};

const STATE_FILE: &str = "budget.json";
const LAZY_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Errors loading or saving the budget state.
#[derive(Debug, thiserror::Error)]
pub enum BudgetStoreError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt ({source}); move it away to start a fresh budget window")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

struct Inner {
    gate: BudgetGate,
    dirty: bool,
    last_save: Instant,
}

/// The gate plus its file.
pub struct BudgetStore {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for BudgetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetStore").field("path", &self.path).finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl BudgetStore {
    /// Opens the store in `state_dir`, continuing from its saved window if there is one.
    pub fn open(state_dir: &Path, policy: BudgetPolicy) -> Result<Self, BudgetStoreError> {
        let path = state_dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<BudgetState>(&bytes)
                .map_err(|source| BudgetStoreError::Corrupt { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BudgetState::default(),
            Err(source) => return Err(BudgetStoreError::Read { path, source }),
        };
        std::fs::create_dir_all(state_dir)
            .map_err(|source| BudgetStoreError::Write { path: state_dir.to_path_buf(), source })?;
        let gate = BudgetGate::restore(policy, state)?;
        let store = Self { path, inner: Mutex::new(Inner { gate, dirty: false, last_save: Instant::now() }) };
        store.save_now()?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves one cloud call; the reservation is on disk before this returns.
    pub fn reserve(&self, estimated_tokens: u64) -> Result<Result<Reservation, Refusal>, BudgetStoreError> {
        let mut inner = self.lock();
        let granted = inner.gate.reserve(now_ms(), estimated_tokens);
        if granted.is_ok() {
            self.write(&mut inner)?;
        }
        Ok(granted)
    }

    /// The cloud answered.
    pub fn commit(&self, reservation: Reservation, actual_tokens: u64) -> Result<(), BudgetStoreError> {
        let mut inner = self.lock();
        inner.gate.commit(reservation, now_ms(), actual_tokens);
        self.save_lazily(&mut inner)
    }

    /// The cloud call failed; the query was answered locally.
    pub fn release(&self, reservation: Reservation) -> Result<(), BudgetStoreError> {
        let mut inner = self.lock();
        inner.gate.release(reservation, now_ms());
        self.save_lazily(&mut inner)
    }

    /// A query answered locally.
    pub fn record_local(&self) -> Result<(), BudgetStoreError> {
        let mut inner = self.lock();
        inner.gate.record_local(now_ms());
        self.save_lazily(&mut inner)
    }

    fn save_lazily(&self, inner: &mut Inner) -> Result<(), BudgetStoreError> {
        inner.dirty = true;
        if inner.last_save.elapsed() >= LAZY_SAVE_INTERVAL {
            self.write(inner)?;
        }
        Ok(())
    }

    /// The budget now.
    pub fn snapshot(&self) -> BudgetSnapshot {
        self.lock().gate.snapshot(now_ms())
    }

    /// Writes pending changes (at shutdown).
    pub fn save_now(&self) -> Result<(), BudgetStoreError> {
        let mut inner = self.lock();
        self.write(&mut inner)
    }

    fn write(&self, inner: &mut Inner) -> Result<(), BudgetStoreError> {
        let bytes = serde_json::to_vec(inner.gate.state()).expect("budget state serialises");
        write_atomically(&self.path, &bytes)
            .map_err(|source| BudgetStoreError::Write { path: self.path.clone(), source })?;
        inner.dirty = false;
        inner.last_save = Instant::now();
        Ok(())
    }
}

/// Writes `bytes` to a temporary file, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BudgetPolicy {
        BudgetPolicy { cloud_fraction: 0.5, burst: 0, ..BudgetPolicy::default() }
    }

    #[test]
    fn the_window_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = BudgetStore::open(dir.path(), policy()).unwrap();
            store.record_local().unwrap();
            store.record_local().unwrap();
            let r = store.reserve(10).unwrap().unwrap();
            store.commit(r, 10).unwrap();
            store.save_now().unwrap();
        }
        let reopened = BudgetStore::open(dir.path(), policy()).unwrap();
        let s = reopened.snapshot();
        assert_eq!(
            (s.local, s.cloud, s.calls_available),
            (2, 1, 1),
            "ρ = 1: two local answers allow two calls"
        );
    }

    #[test]
    fn a_reservation_in_flight_at_a_crash_counts_as_spent() {
        let dir = tempfile::tempdir().unwrap();
        let store = BudgetStore::open(dir.path(), BudgetPolicy { burst: 1, ..policy() }).unwrap();
        let _lost = store.reserve(10).unwrap().unwrap();
        std::mem::forget(store); // no orderly shutdown
        let s = BudgetStore::open(dir.path(), BudgetPolicy { burst: 1, ..policy() }).unwrap().snapshot();
        assert_eq!((s.cloud, s.calls_available), (1, 0));
    }

    #[test]
    fn a_corrupt_state_file_is_reported_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = BudgetStore::open(dir.path(), policy()).unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
    }
}

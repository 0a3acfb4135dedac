//! `Shutdown`: one handle, shared by every task, that says when the daemon is stopping and counts
//! the work still running (tokio mini-redis style).
//!
//! Stopping has two phases. [`Shutdown::begin`] (SIGTERM/SIGINT): stop taking new work and let
//! running requests finish. [`Shutdown::abort`] (the drain time is over): cancel what still runs.
//! Work registers with [`Shutdown::track`]; [`Shutdown::idle`] resolves when none is left.

use std::sync::Arc;

use tokio::sync::watch;

/// How far stopping has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShutdownPhase {
    /// Serving.
    Running,
    /// Not taking new work; running work may finish.
    Draining,
    /// Running work is being cancelled.
    Aborting,
}

/// The shutdown signal and the in-flight work counter; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    phase: Arc<watch::Sender<ShutdownPhase>>,
    in_flight: Arc<watch::Sender<usize>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A handle in the running phase with no work in flight.
    pub fn new() -> Self {
        Self {
            phase: Arc::new(watch::Sender::new(ShutdownPhase::Running)),
            in_flight: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Stops taking new work; running work may finish. Idempotent.
    pub fn begin(&self) {
        self.advance(ShutdownPhase::Draining);
    }

    /// Cancels running work (the drain time is over). Implies [`Shutdown::begin`].
    pub fn abort(&self) {
        self.advance(ShutdownPhase::Aborting);
    }

    fn advance(&self, to: ShutdownPhase) {
        self.phase.send_if_modified(|phase| {
            let later = to > *phase;
            if later {
                *phase = to;
            }
            later
        });
    }

    /// The phase now.
    pub fn phase(&self) -> ShutdownPhase {
        *self.phase.borrow()
    }

    /// Whether stopping has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.phase() >= ShutdownPhase::Draining
    }

    /// Resolves once stopping has begun.
    pub async fn begun(&self) {
        self.reached(ShutdownPhase::Draining).await;
    }

    /// Resolves once running work must be cancelled.
    pub async fn aborted(&self) {
        self.reached(ShutdownPhase::Aborting).await;
    }

    async fn reached(&self, phase: ShutdownPhase) {
        let mut receiver = self.phase.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = receiver.wait_for(|now| *now >= phase).await;
    }

    /// Registers one piece of running work until the returned guard is dropped.
    pub fn track(&self) -> InFlight {
        self.in_flight.send_modify(|count| *count += 1);
        InFlight { counter: Arc::clone(&self.in_flight) }
    }

    /// Work registered with [`Shutdown::track`] and not yet finished.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Resolves when no tracked work is running.
    pub async fn idle(&self) {
        let mut receiver = self.in_flight.subscribe();
        let _ = receiver.wait_for(|count| *count == 0).await;
    }
}

/// One piece of running work; finished when dropped.
#[derive(Debug)]
#[must_use = "the work counts as finished as soon as the guard is dropped"]
pub struct InFlight {
    counter: Arc<watch::Sender<usize>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.send_modify(|count| *count = count.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn begin_wakes_waiters_and_abort_comes_after_it() {
        let shutdown = Shutdown::new();
        let waiter = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.begun().await }
        });
        assert!(!shutdown.is_shutting_down());
        shutdown.begin();
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        assert_eq!(shutdown.phase(), ShutdownPhase::Draining);
        shutdown.abort();
        shutdown.begin();
        assert_eq!(shutdown.phase(), ShutdownPhase::Aborting, "phases never go back");
        tokio::time::timeout(Duration::from_secs(1), shutdown.aborted()).await.unwrap();
    }

    #[tokio::test]
    async fn idle_waits_for_every_tracked_piece_of_work() {
        let shutdown = Shutdown::new();
        let first = shutdown.track();
        let second = shutdown.track();
        assert_eq!(shutdown.in_flight(), 2);
        drop(first);
        assert!(tokio::time::timeout(Duration::from_millis(50), shutdown.idle()).await.is_err());
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), shutdown.idle()).await.unwrap();
    }
}

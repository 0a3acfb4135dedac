//! systemd integration through `sd_notify`: `READY=1` once listening, `STATUS=` lines, `STOPPING=1`,
//! and `WATCHDOG=1` pings at half of `WATCHDOG_USEC`. Outside systemd (no `NOTIFY_SOCKET`) every
//! call does nothing.

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

/// Tells systemd the daemon is ready, with a status line.
pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd the daemon is stopping.
pub fn notify_stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// When systemd's watchdog is on for this process, pings it at half the interval until `stop`
/// completes (a hung runtime then stops the pings and systemd restarts the service).
pub fn spawn_watchdog(stop: impl Future<Output = ()> + Send + 'static) -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    tracing::debug!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => send(&[NotifyState::Watchdog]),
                () = &mut stop => break,
            }
        }
    }))
}

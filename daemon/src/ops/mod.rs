//! Running the daemon as a service: building it from a validated configuration
//! (`daemon`: load → validate → build → run), logging (`logging`: journald or stderr), systemd
//! readiness and watchdog (`systemd`), and stopping cleanly (`shutdown`). `backend_factory` turns
//! the configuration into the [`ChatBackend`](crate::chat::ChatBackend) the API serves.

mod backend_factory;
mod daemon;
mod logging;
mod shutdown;
mod systemd;

pub use backend_factory::{BuildBackendError, BuiltBackend, ShutdownHook, build_backend};
pub use daemon::{Daemon, DaemonError};
pub use logging::{LogOutput, LoggingError, init_logging, log_filter, use_journald};
pub use shutdown::{InFlight, Shutdown, ShutdownPhase};
pub use systemd::{notify_ready, notify_status, notify_stopping, spawn_watchdog};

//! Logging: to the systemd journal (structured fields) when running under systemd, else to stderr
//! as text or JSON lines. The filter comes from `logging.level`, or `RUST_LOG` when set. ONNX
//! Runtime logs through `tracing` under the `ort` target and is kept at `warn` unless the filter
//! names it.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{JournaldMode, LoggingConfig};

/// systemd-journald's native socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where the log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    Journald,
    Stderr { json: bool },
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter `{filter}`: {message}")]
    Filter { filter: String, message: String },
    #[error("cannot connect to the systemd journal (logging.journald = \"always\"): {0}")]
    Journald(std::io::Error),
    #[error("a logger is already installed: {0}")]
    AlreadyInstalled(String),
}

/// The filter: `rust_log` when given, else `config.level` with `ort=warn` added unless it names `ort`.
pub fn log_filter(config: &LoggingConfig, rust_log: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let filter = match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(rust_log) => rust_log.to_string(),
        None if config.level.contains("ort") => config.level.clone(),
        None => format!("ort=warn,{}", config.level),
    };
    EnvFilter::try_new(&filter).map_err(|e| LoggingError::Filter { filter, message: e.to_string() })
}

/// Whether `mode` means the journal, given what the environment shows.
pub fn use_journald(mode: JournaldMode, journal_socket_exists: bool, journal_stream_set: bool) -> bool {
    match mode {
        JournaldMode::Always => true,
        JournaldMode::Never => false,
        JournaldMode::Auto => journal_socket_exists || journal_stream_set,
    }
}

/// Installs the global logger for this process.
pub fn init_logging(config: &LoggingConfig) -> Result<LogOutput, LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(config, rust_log.as_deref())?;
    let journald_wanted = use_journald(
        config.journald,
        Path::new(JOURNAL_SOCKET).exists(),
        std::env::var_os("JOURNAL_STREAM").is_some(),
    );
    let registry = tracing_subscriber::registry().with(filter);
    if journald_wanted {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry
                    .with(journald.with_syslog_identifier("tandemd".to_string()))
                    .try_init()
                    .map_err(|e| LoggingError::AlreadyInstalled(e.to_string()))?;
                return Ok(LogOutput::Journald);
            }
            Err(error) if config.journald == JournaldMode::Always => {
                return Err(LoggingError::Journald(error));
            }
            // Auto: the journal looked present but is not reachable; stderr still works.
            Err(_) => {}
        }
    }
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = if config.json {
        registry.with(stderr.json().flatten_event(true)).try_init()
    } else {
        registry.with(stderr.with_ansi(std::io::stderr().is_terminal())).try_init()
    };
    result.map_err(|e| LoggingError::AlreadyInstalled(e.to_string()))?;
    Ok(LogOutput::Stderr { json: config.json })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_runtime_warnings_pass_the_default_filter_and_rust_log_overrides() {
        let config = LoggingConfig::default();
        assert_eq!(log_filter(&config, None).unwrap().to_string(), "ort=warn,info");
        let error_only = LoggingConfig { level: "error".into(), ..LoggingConfig::default() };
        assert!(log_filter(&error_only, None).unwrap().to_string().contains("ort=warn"));
        let names_ort = LoggingConfig { level: "info,ort=debug".into(), ..LoggingConfig::default() };
        let names_ort = log_filter(&names_ort, None).unwrap().to_string();
        assert!(names_ort.contains("ort=debug") && !names_ort.contains("ort=warn"), "{names_ort}");
        assert_eq!(log_filter(&config, Some("debug")).unwrap().to_string(), "debug");
        assert!(log_filter(&config, Some("=[")).is_err());
    }

    #[test]
    fn journald_auto_follows_the_environment() {
        assert!(use_journald(JournaldMode::Auto, true, false));
        assert!(use_journald(JournaldMode::Auto, false, true));
        assert!(!use_journald(JournaldMode::Auto, false, false));
        assert!(use_journald(JournaldMode::Always, false, false));
        assert!(!use_journald(JournaldMode::Never, true, true));
    }
}

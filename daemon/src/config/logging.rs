//! `[logging]`: where log lines go and how much is written.

use serde::{Deserialize, Serialize};

/// Logging settings. `RUST_LOG`, when set, replaces `level`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// Least severe level written (`error`, `warn`, `info`, `debug`, `trace`), or a full filter such
    /// as `info,tandemd::api=debug`. ONNX Runtime's own messages (target `ort`) are kept at `warn`
    /// unless the filter names `ort`.
    #[serde(default = "default_level")]
    pub level: String,
    /// Whether to write to the systemd journal (with structured fields) instead of stderr.
    #[serde(default)]
    pub journald: JournaldMode,
    /// Write stderr lines as JSON objects (one per line) instead of text. Ignored for the journal.
    #[serde(default)]
    pub json: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: default_level(), journald: JournaldMode::default(), json: false }
    }
}

fn default_level() -> String {
    "info".to_string()
}

/// When logs go to the systemd journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournaldMode {
    /// When running under systemd (`JOURNAL_STREAM` is set or the journal socket exists).
    #[default]
    Auto,
    /// Always; starting fails when the journal cannot be reached.
    Always,
    /// Never; always stderr.
    Never,
}

//! What a training run tells a bundle's manifest: the sha256 of the run's configuration and of every
//! data file it names (provenance), and its final evaluation with the paper's protocol.
//!
//! A run folder (a run's `out_dir`) holds `config.json`, the effective run configuration the trainer
//! wrote when it started, and `eval.json` once the final evaluation ran.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where the run configuration lies inside a run folder.
pub const RUN_CONFIG_FILE: &str = "config.json";
/// Where the final evaluation lies inside a run folder.
pub const RUN_EVAL_FILE: &str = "eval.json";

/// The evaluation figures recorded in a manifest, by the names `eval.json` gives them.
const EVALUATION_KEYS: [&str; 6] = [
    "problems",
    "overall_accuracy",
    "local_accuracy",
    "conditional_local_accuracy",
    "call_ratio",
    "help_request_ratio",
];

/// A training run, as recorded in a bundle's manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRecord {
    /// sha256 of the run's `config.json`.
    pub config_sha256: String,
    /// sha256 of each data file the configuration names, by file name.
    pub data_sha256: BTreeMap<String, String>,
    /// The final evaluation (empty when the run has no `eval.json`).
    pub evaluation: BTreeMap<String, f64>,
}

/// Why a run folder cannot be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RunRecordError {
    /// A file of the run cannot be read.
    #[error("cannot read {path}: {cause}; --run must be the training run's out_dir", path = .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// `config.json` or `eval.json` is not what the trainer writes.
    #[error("{path} is not a run's {what}: {cause}", path = .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What it should be.
        what: &'static str,
        /// The parse error.
        cause: String,
    },
}

/// Reads the record of the run in `run_dir`. Data paths in its configuration are read as written
/// (relative ones from the working directory, as the trainer reads them).
pub fn read_run_record(run_dir: &Path) -> Result<RunRecord, RunRecordError> {
    let config_path = run_dir.join(RUN_CONFIG_FILE);
    let config_bytes = read(&config_path)?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).map_err(|e| {
        RunRecordError::Format { path: config_path.clone(), what: "configuration", cause: e.to_string() }
    })?;
    let mut data_sha256 = BTreeMap::new();
    for pointer in ["/task/train", "/task/test", "/sft/data"] {
        if let Some(path) = config.pointer(pointer).and_then(serde_json::Value::as_str) {
            let path = PathBuf::from(path);
            let name =
                path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into());
            data_sha256.insert(name, hex::encode(Sha256::digest(read(&path)?)));
        }
    }
    let eval_path = run_dir.join(RUN_EVAL_FILE);
    let evaluation = if eval_path.exists() {
        let eval: serde_json::Value = serde_json::from_slice(&read(&eval_path)?).map_err(|e| {
            RunRecordError::Format { path: eval_path.clone(), what: "evaluation", cause: e.to_string() }
        })?;
        let mut figures: BTreeMap<String, f64> = EVALUATION_KEYS
            .iter()
            .filter_map(|key| Some((key.to_string(), eval.get(key)?.as_f64()?)))
            .collect();
        if let Some(random) = eval.pointer("/random_offloading/accuracy").and_then(serde_json::Value::as_f64)
        {
            figures.insert("random_offloading_accuracy".into(), random);
        }
        figures
    } else {
        BTreeMap::new()
    };
    Ok(RunRecord { config_sha256: hex::encode(Sha256::digest(&config_bytes)), data_sha256, evaluation })
}

fn read(path: &Path) -> Result<Vec<u8>, RunRecordError> {
    std::fs::read(path).map_err(|cause| RunRecordError::Read { path: path.to_path_buf(), cause })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_gives_config_and_data_digests_and_the_final_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.jsonl");
        std::fs::write(&train, "{\"prompt\":\"p\",\"answer\":\"a\"}\n").unwrap();
        let config = format!("{{\"task\":{{\"train\":{:?}}},\"sft\":null}}", train.display().to_string());
        std::fs::write(dir.path().join(RUN_CONFIG_FILE), &config).unwrap();
        std::fs::write(
            dir.path().join(RUN_EVAL_FILE),
            r#"{"problems":200,"overall_accuracy":0.2,"call_ratio":0.09,"random_offloading":{"accuracy":0.195},"predictions":[]}"#,
        )
        .unwrap();
        let record = read_run_record(dir.path()).unwrap();
        assert_eq!(record.config_sha256, hex::encode(Sha256::digest(config.as_bytes())));
        assert_eq!(
            record.data_sha256["train.jsonl"],
            hex::encode(Sha256::digest(b"{\"prompt\":\"p\",\"answer\":\"a\"}\n"))
        );
        assert_eq!(record.evaluation["overall_accuracy"], 0.2);
        assert_eq!(record.evaluation["random_offloading_accuracy"], 0.195);
        assert_eq!(record.evaluation["problems"], 200.0);
    }

    #[test]
    fn a_missing_data_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RUN_CONFIG_FILE), r#"{"task":{"train":"/nonexistent/train.jsonl"}}"#)
            .unwrap();
        let error = read_run_record(dir.path()).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/train.jsonl"), "{error}");
    }
}

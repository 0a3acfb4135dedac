//! Per-step metrics, one JSON object per line in `metrics.jsonl`: `{"kind": "train", …}` after every
//! step and `{"kind": "eval", …}` after every evaluation.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::eval::EvalReport;

/// One training step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Steps completed (1 after the first).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// The surrogate loss.
    pub loss: f64,
    /// Global gradient norm before clipping (0 when the step had no learning signal).
    pub grad_norm: f64,
    /// Whether the optimiser stepped (a batch with nothing selected or all-equal rewards does not).
    pub updated: bool,
    /// Mean reward of all samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Share of samples answered correctly on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_accuracy: Option<f64>,
    /// Share of samples that asked for help (the training call ratio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_ratio: Option<f64>,
    /// Share of help requests whose cloud answer was correct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_accuracy: Option<f64>,
    /// |D¹|.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d1: Option<usize>,
    /// |D²|.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d2: Option<usize>,
    /// Prompts that qualified for D² before the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d2_candidates: Option<usize>,
    /// Prompts in the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<usize>,
    /// Mean KL to the reference (GRPO with β > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// Rows that went through the backward pass.
    pub rows_trained: usize,
    /// Tokens generated (RL) or trained on (SFT).
    pub tokens: usize,
    /// Mean length of device responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_response_tokens: Option<f64>,
    /// `tokens` per second of the whole step.
    pub tokens_per_second: f64,
    /// Seconds spent generating.
    pub rollout_seconds: f64,
    /// Seconds spent on forward, backward and the optimiser.
    pub update_seconds: f64,
    /// Seconds for the whole step.
    pub step_seconds: f64,
    /// Questions sent to the cloud so far in this process.
    pub cloud_queries: u64,
    /// Questions answered from the cache so far in this process.
    pub cloud_cache_hits: u64,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Steps completed when evaluated.
    pub step: u64,
    /// Test problems.
    pub problems: usize,
    /// Overall accuracy under the cap.
    pub overall_accuracy: f64,
    /// Correct local answers / problems.
    pub local_accuracy: f64,
    /// Correct local answers / problems kept local.
    pub conditional_local_accuracy: f64,
    /// Cloud calls / problems.
    pub call_ratio: f64,
    /// Help requests / problems.
    pub help_request_ratio: f64,
    /// Every problem on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_only_accuracy: Option<f64>,
    /// Every problem to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_only_accuracy: Option<f64>,
    /// Random offloading at the same call ratio (seeded draw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_offloading_accuracy: Option<f64>,
}

impl EvalMetrics {
    /// The summary of `report` at `step`.
    pub fn from_report(step: u64, report: &EvalReport) -> Self {
        Self {
            step,
            problems: report.problems,
            overall_accuracy: report.overall_accuracy,
            local_accuracy: report.local_accuracy,
            conditional_local_accuracy: report.conditional_local_accuracy,
            call_ratio: report.call_ratio,
            help_request_ratio: report.help_request_ratio,
            local_only_accuracy: report.local_only_accuracy,
            cloud_only_accuracy: report.cloud_only_accuracy,
            random_offloading_accuracy: report.random_offloading.as_ref().map(|r| r.accuracy),
        }
    }
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsRecord {
    /// After a training step.
    Train(StepMetrics),
    /// After an evaluation.
    Eval(EvalMetrics),
}

impl MetricsRecord {
    /// Steps completed when the record was written.
    pub fn step(&self) -> u64 {
        match self {
            MetricsRecord::Train(m) => m.step,
            MetricsRecord::Eval(m) => m.step,
        }
    }
}

/// Errors reading or writing metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {source}")]
    Parse { path: PathBuf, line: usize, source: serde_json::Error },
}

/// The append-only metrics file.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    records: Vec<MetricsRecord>,
}

impl MetricsLog {
    /// Opens `path`, keeping only records up to `keep_through_step` (a resumed run rewrites what came
    /// after its checkpoint); a fresh run passes 0 and gets an empty file.
    pub fn open(path: &Path, keep_through_step: u64) -> Result<Self, MetricsError> {
        let io = |source| MetricsError::Io { path: path.into(), source };
        let mut records = if path.is_file() { read_records(path)? } else { Vec::new() };
        records.retain(|r| match r {
            MetricsRecord::Train(m) => m.step <= keep_through_step,
            MetricsRecord::Eval(m) => m.step <= keep_through_step,
        });
        let mut text = String::new();
        for record in &records {
            text.push_str(&serde_json::to_string(record).expect("metrics serialise"));
            text.push('\n');
        }
        std::fs::write(path, text).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(Self { path: path.into(), file, records })
    }

    /// Appends a record (flushed).
    pub fn append(&mut self, record: MetricsRecord) -> Result<(), MetricsError> {
        let mut line = serde_json::to_string(&record).expect("metrics serialise");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| MetricsError::Io { path: self.path.clone(), source })?;
        self.records.push(record);
        Ok(())
    }

    /// Every record so far.
    pub fn records(&self) -> &[MetricsRecord] {
        &self.records
    }
}

/// Reads a metrics file.
pub fn read_records(path: &Path) -> Result<Vec<MetricsRecord>, MetricsError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| MetricsError::Io { path: path.into(), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| MetricsError::Parse {
                path: path.into(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

//! A job's dataset in the trainer's JSONL format (`tandem_core::tasks::dataset::TaskRecord`, one
//! per line): the task data its template names, then the prompts devices recorded (opted in) with
//! the cloud's answer as the reference. A prompt appears once: the first record of it wins (task
//! data before collected prompts, older events before newer ones).

use std::collections::HashSet;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};
use tandem_core::tasks::dataset::{DatasetError, TaskRecord, read_records};

use crate::store::{CollectedPrompt, Store, StoreError};

/// Collected prompts read from the store per query.
pub const PAGE: u32 = 1000;

/// Why a dataset could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DatasetExportError {
    #[error("task data {path}: {source}")]
    TaskData { path: String, source: DatasetError },
    #[error("task data {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("cannot write the dataset {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Prompts already written, by the sha256 of their text.
#[derive(Debug, Default)]
pub struct Deduplicate {
    seen: HashSet<[u8; 32]>,
}

impl Deduplicate {
    /// True the first time `prompt` is offered (surrounding white space ignored).
    pub fn first(&mut self, prompt: &str) -> bool {
        self.seen.insert(Sha256::digest(prompt.trim().as_bytes()).into())
    }
}

/// The record of a collected prompt: the cloud's answer as `answer` (empty when the cloud did not
/// answer it), and where it came from in `meta`.
pub fn collected_record(collected: &CollectedPrompt) -> TaskRecord {
    TaskRecord {
        prompt: collected.prompt.clone(),
        answer: collected.cloud_answer.clone().unwrap_or_default(),
        id: Some(collected.id.clone()),
        meta: Some(json!({
            "source": "fleet",
            "cloud_answer": collected.cloud_answer.is_some(),
        })),
    }
}

/// One line of JSONL.
pub fn jsonl_line(record: &TaskRecord) -> String {
    let mut line = serde_json::to_string(record).expect("task records serialise");
    line.push('\n');
    line
}

/// Writes the dataset to `out`: the records of `task_data`, then every opted-in prompt of events
/// at or after `since_ms`, without repeats. Returns the number of lines.
pub async fn export_to_file(
    store: &Store,
    task_data: &[std::path::PathBuf],
    since_ms: i64,
    out: &Path,
) -> Result<u64, DatasetExportError> {
    let write_error = |source| DatasetExportError::Write { path: out.display().to_string(), source };
    let mut text = String::new();
    let mut dedup = Deduplicate::default();
    let mut lines = 0u64;
    for path in task_data {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path)
            .map_err(|source| DatasetExportError::Open { path: shown.clone(), source })?;
        let records = read_records(std::io::BufReader::new(file))
            .map_err(|source| DatasetExportError::TaskData { path: shown, source })?;
        for record in records.iter().filter(|r| dedup.first(&r.prompt)) {
            text.push_str(&jsonl_line(record));
            lines += 1;
        }
    }
    let mut after: Option<String> = None;
    loop {
        let page = store.collected_prompts(since_ms, after.as_deref(), PAGE).await?;
        for collected in page.iter().filter(|c| dedup.first(&c.prompt)) {
            text.push_str(&jsonl_line(&collected_record(collected)));
            lines += 1;
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => after = Some(last.id.clone()),
            _ => break,
        }
    }
    let partial = out.with_extension("jsonl.partial");
    std::fs::write(&partial, text).map_err(write_error)?;
    std::fs::rename(&partial, out).map_err(write_error)?;
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_is_kept_once_whatever_its_surrounding_space() {
        let mut dedup = Deduplicate::default();
        assert!(dedup.first("Use 3 5 7 to make 22"));
        assert!(!dedup.first("  Use 3 5 7 to make 22\n"));
        assert!(dedup.first("Use 3 5 7 to make 23"));
    }

    #[test]
    fn a_collected_prompt_becomes_a_task_record_with_the_cloud_answer() {
        let collected =
            CollectedPrompt { id: "e1".into(), prompt: "p".into(), cloud_answer: Some("42".into()) };
        let line = jsonl_line(&collected_record(&collected));
        let parsed = tandem_core::tasks::dataset::parse_records(&line).unwrap();
        assert_eq!(parsed[0].prompt, "p");
        assert_eq!(parsed[0].answer, "42");
        assert_eq!(parsed[0].meta.as_ref().unwrap()["cloud_answer"], true);
    }
}

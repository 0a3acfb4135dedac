//! A job's dataset in the trainer's JSONL format (`tandem_core::tasks::dataset::TaskRecord`, one
//! per line): the task data its template names, then the prompts devices recorded (opted in) with
//! the cloud's answer as the reference. A prompt appears once: the first record of it wins (task
//! data before collected prompts, older events before newer ones).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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

/// Which records a dataset takes: each prompt once (surrounding white space ignored; task data
/// before collected prompts, older events before newer ones), never one of the held-out set (an
/// evaluation set must not leak into training through the prompts devices were asked).
#[derive(Debug, Default)]
pub struct DatasetBuilder {
    seen: HashSet<[u8; 32]>,
    held_out: HashSet<[u8; 32]>,
    counts: DatasetCounts,
}

/// What a dataset holds and what it left out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DatasetCounts {
    /// Records from the template's task data.
    pub task_records: u64,
    /// Prompts collected from devices.
    pub collected: u64,
    /// Collected prompts left out because they are in the held-out data.
    pub held_out: u64,
    /// Records left out because their prompt was already in.
    pub repeats: u64,
}

impl DatasetCounts {
    /// Records written.
    pub fn lines(&self) -> u64 {
        self.task_records + self.collected
    }
}

impl std::fmt::Display for DatasetCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records ({} task records, {} prompts collected from devices; left out: {} held out, {} repeats)",
            self.lines(),
            self.task_records,
            self.collected,
            self.held_out,
            self.repeats
        )
    }
}

fn digest(prompt: &str) -> [u8; 32] {
    Sha256::digest(prompt.trim().as_bytes()).into()
}

impl DatasetBuilder {
    /// A builder that never takes a prompt of `held_out`.
    pub fn new(held_out: &[TaskRecord]) -> Self {
        Self { held_out: held_out.iter().map(|r| digest(&r.prompt)).collect(), ..Self::default() }
    }

    /// The JSONL lines of the task records not yet in.
    pub fn task_records(&mut self, records: &[TaskRecord]) -> String {
        let mut text = String::new();
        for record in records {
            if self.seen.insert(digest(&record.prompt)) {
                text.push_str(&jsonl_line(record));
                self.counts.task_records += 1;
            } else {
                self.counts.repeats += 1;
            }
        }
        text
    }

    /// The JSONL lines of the collected prompts neither held out nor yet in.
    pub fn collected(&mut self, page: &[CollectedPrompt]) -> String {
        let mut text = String::new();
        for collected in page {
            let record = collected_record(collected);
            let key = digest(&record.prompt);
            if self.held_out.contains(&key) {
                self.counts.held_out += 1;
            } else if self.seen.insert(key) {
                text.push_str(&jsonl_line(&record));
                self.counts.collected += 1;
            } else {
                self.counts.repeats += 1;
            }
        }
        text
    }

    /// What was taken and left out so far.
    pub fn counts(&self) -> DatasetCounts {
        self.counts
    }
}

/// The record of a collected prompt: the bare question without the prompt template's words, a
/// verifiable Countdown record when it is a Countdown question, else the cloud's answer as
/// `answer` (empty when the cloud did not answer it); `meta.source` is `"fleet"`.
pub fn collected_record(collected: &CollectedPrompt) -> TaskRecord {
    TaskRecord::from_collected(
        &collected.prompt,
        collected.cloud_answer.as_deref(),
        collected.id.clone(),
        "fleet",
    )
}

/// One line of JSONL.
pub fn jsonl_line(record: &TaskRecord) -> String {
    let mut line = serde_json::to_string(record).expect("task records serialise");
    line.push('\n');
    line
}

/// The records of a JSONL task data file.
pub fn read_task_data(path: &Path) -> Result<Vec<TaskRecord>, DatasetExportError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path)
        .map_err(|source| DatasetExportError::Open { path: shown.clone(), source })?;
    read_records(std::io::BufReader::new(file))
        .map_err(|source| DatasetExportError::TaskData { path: shown, source })
}

/// The records of every file of `paths`, in order.
pub fn read_all_task_data(paths: &[PathBuf]) -> Result<Vec<TaskRecord>, DatasetExportError> {
    let mut records = Vec::new();
    for path in paths {
        records.extend(read_task_data(path)?);
    }
    Ok(records)
}

/// Writes the dataset to `out` (atomically): the records of `task_data`, then every opted-in
/// prompt of events at or after `since_ms`, each prompt once and none of `held_out`.
pub async fn export_to_file(
    store: &Store,
    task_data: &[PathBuf],
    held_out: &[PathBuf],
    since_ms: i64,
    out: &Path,
) -> Result<DatasetCounts, DatasetExportError> {
    let write_error = |source| DatasetExportError::Write { path: out.display().to_string(), source };
    let mut builder = DatasetBuilder::new(&read_all_task_data(held_out)?);
    let mut text = builder.task_records(&read_all_task_data(task_data)?);
    let mut after: Option<String> = None;
    loop {
        let page = store.collected_prompts(since_ms, after.as_deref(), PAGE).await?;
        text.push_str(&builder.collected(&page));
        match page.last() {
            Some(last) if page.len() == PAGE as usize => after = Some(last.id.clone()),
            _ => break,
        }
    }
    let partial = out.with_extension("jsonl.partial");
    std::fs::write(&partial, text).map_err(write_error)?;
    std::fs::rename(&partial, out).map_err(write_error)?;
    Ok(builder.counts())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::tasks::countdown::CountdownProblem;
    use tandem_core::tasks::templates::PromptTemplate;

    fn collected(id: &str, prompt: &str, cloud_answer: Option<&str>) -> CollectedPrompt {
        CollectedPrompt { id: id.into(), prompt: prompt.into(), cloud_answer: cloud_answer.map(Into::into) }
    }

    fn record(prompt: &str) -> TaskRecord {
        TaskRecord { prompt: prompt.into(), answer: "1".into(), id: None, meta: None }
    }

    #[test]
    fn a_prompt_is_kept_once_whatever_its_surrounding_space() {
        let mut builder = DatasetBuilder::default();
        let text =
            builder.task_records(&[record("Use 3 5 7 to make 22"), record("  Use 3 5 7 to make 22\n")]);
        assert_eq!(text.lines().count(), 1);
        let text = builder.collected(&[
            collected("e1", "Use 3 5 7 to make 22", None),
            collected("e2", "Use 3 5 7 to make 23", Some("23")),
        ]);
        assert_eq!(text.lines().count(), 1);
        let counts = builder.counts();
        assert_eq!((counts.task_records, counts.collected, counts.repeats, counts.lines()), (1, 1, 2, 2));
    }

    #[test]
    fn collected_prompts_of_the_held_out_set_never_enter_the_dataset() {
        let problem = CountdownProblem { numbers: vec![4, 2], target: 8 };
        let mut builder = DatasetBuilder::new(&[TaskRecord::from_countdown(&problem, None)]);
        let turn = PromptTemplate::COUNTDOWN.user_prompt(&problem.question());
        assert_eq!(builder.collected(&[collected("e1", &turn, Some("4 * 2"))]), "");
        assert_eq!(builder.counts().held_out, 1);
        assert_eq!(builder.counts().lines(), 0);
    }

    #[test]
    fn a_collected_countdown_prompt_loses_the_templates_words_and_matches_the_task_data() {
        let problem = CountdownProblem { numbers: vec![12, 6], target: 2 };
        let mut builder = DatasetBuilder::default();
        builder.task_records(&[TaskRecord::from_countdown(&problem, None)]);
        let turn = PromptTemplate::COUNTDOWN.user_prompt(&problem.question());
        assert_eq!(builder.collected(&[collected("e1", &turn, None)]), "", "the same problem as task data");

        let other = CountdownProblem { numbers: vec![12, 6], target: 18 };
        let turn = PromptTemplate::COUNTDOWN.user_prompt(&other.question());
        let line = builder.collected(&[collected("e2", &turn, Some("12 + 6"))]);
        let parsed = tandem_core::tasks::dataset::parse_records(&line).unwrap();
        assert_eq!(parsed[0].prompt, other.question());
        assert_eq!(parsed[0].to_countdown().unwrap(), other);
        assert_eq!(parsed[0].meta.as_ref().unwrap()["source"], "fleet");
    }

    #[test]
    fn a_collected_prompt_without_a_verifier_keeps_the_cloud_answer_as_reference() {
        let line = jsonl_line(&collected_record(&collected("e1", "What is 6 * 7?", Some("42"))));
        let parsed = tandem_core::tasks::dataset::parse_records(&line).unwrap();
        assert_eq!((parsed[0].prompt.as_str(), parsed[0].answer.as_str()), ("What is 6 * 7?", "42"));
        assert_eq!(parsed[0].meta.as_ref().unwrap()["cloud_answer"], true);
    }
}

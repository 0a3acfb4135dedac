//! A new job's folder and run configuration: `DIR/JOB_ID/` with `run.toml` (the template's run
//! configuration, pointed at the job's run folder and dataset, with the overrides applied), and
//! the paths and placeholders its commands use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{JobTemplate, default_commands};
use crate::store::{JobRecord, JobState, now_ms};

use super::rules::Trigger;
use super::runner::fill;

/// Why a job's run configuration could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("cannot read the run configuration {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the run configuration {path} is not TOML: {message}")]
    Parse { path: String, message: String },
    #[error("override `{key}`: {reason}")]
    Override { key: String, reason: String },
    #[error("cannot create the job folder {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// A recorded-to-be job and what running it needs.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    pub record: JobRecord,
    pub work_dir: PathBuf,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    pub dataset_path: PathBuf,
    pub bundle_path: PathBuf,
    /// The template's commands (or the defaults), placeholders not yet filled.
    pub commands: Vec<String>,
    /// JSONL files the dataset starts from.
    pub task_data: Vec<PathBuf>,
    /// The model version the job's bundle gets (`{version}`).
    pub version: String,
    /// The bundle's registry name (`{model}`): the template's `model`, else its name.
    pub model: String,
    signing_key: String,
}

impl PreparedJob {
    /// The `{name}` placeholders of commands and the bundle path.
    pub fn placeholders(&self) -> Vec<(&'static str, String)> {
        vec![
            ("work_dir", self.work_dir.display().to_string()),
            ("config", self.config_path.display().to_string()),
            ("dataset", self.dataset_path.display().to_string()),
            ("job_id", self.record.id.clone()),
            ("template", self.record.template.clone()),
            ("model", self.model.clone()),
            ("version", self.version.clone()),
            ("bundle", self.bundle_path.display().to_string()),
            ("signing_key", self.signing_key.clone()),
        ]
    }
}

/// The version a job of a template with `model` gives its bundle: one more than the newest
/// whole-number version of it in `registered` (`(name, version)` pairs), 1 when there is none.
pub fn next_version<'a>(model: &str, registered: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let newest = registered
        .into_iter()
        .filter(|(name, _)| *name == model)
        .filter_map(|(_, version)| version.parse::<u64>().ok())
        .max();
    newest.map_or(1, |v| v + 1).to_string()
}

/// Creates the job's folder and run configuration; the record is `queued`. The bundle's version
/// is `version`, or else the job's creation time in Unix ms.
pub fn prepare(
    root: &Path,
    template: &JobTemplate,
    overrides: &BTreeMap<String, toml::Value>,
    trigger: &Trigger,
    version: Option<String>,
) -> Result<PreparedJob, RunConfigError> {
    let created_ms = now_ms();
    let id = uuid::Uuid::now_v7().to_string();
    let absolute_root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    let work_dir = absolute_root.join(&id);
    let version = version.unwrap_or_else(|| created_ms.to_string());
    let model = template.model.clone().unwrap_or_else(|| template.name.clone());
    let config_path = work_dir.join("run.toml");
    let dataset_path = work_dir.join("dataset.jsonl");
    let log_path = work_dir.join("job.log");
    let signing_key = template.signing_key.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let base: Vec<(&str, String)> = vec![
        ("work_dir", work_dir.display().to_string()),
        ("dataset", dataset_path.display().to_string()),
        ("job_id", id.clone()),
        ("template", template.name.clone()),
        ("model", model.clone()),
        ("version", version.clone()),
    ];
    let base_refs: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bundle_path = PathBuf::from(fill(&template.bundle, &base_refs));

    let shown = template.run_config.display().to_string();
    let text = std::fs::read_to_string(&template.run_config)
        .map_err(|source| RunConfigError::Read { path: shown.clone(), source })?;
    let mut table: toml::Table = fill(&text, &base_refs)
        .parse()
        .map_err(|e: toml::de::Error| RunConfigError::Parse { path: shown, message: e.to_string() })?;
    let task_data =
        if template.task_data.is_empty() { task_train(&table) } else { template.task_data.clone() };
    set(&mut table, "run.out_dir", work_dir.join("run").display().to_string().into())?;
    if table.contains_key("task") {
        set(&mut table, "task.train", dataset_path.display().to_string().into())?;
    }
    for (key, value) in template.overrides.iter().chain(overrides) {
        set(&mut table, key, value.clone())?;
    }
    let run_config = toml::to_string(&table).map_err(|e| RunConfigError::Override {
        key: String::new(),
        reason: format!("the result does not serialise: {e}"),
    })?;
    std::fs::create_dir_all(&work_dir)
        .and_then(|()| std::fs::write(&config_path, &run_config))
        .map_err(|source| RunConfigError::Write { path: work_dir.display().to_string(), source })?;

    let commands = if template.commands.is_empty() { default_commands() } else { template.commands.clone() };
    let record = JobRecord {
        id,
        template: template.name.clone(),
        trigger: trigger.kind.to_string(),
        trigger_detail: trigger.detail.clone(),
        state: JobState::Queued,
        reason: None,
        created_ms,
        started_ms: None,
        finished_ms: None,
        run_config,
        work_dir: work_dir.display().to_string(),
        log_path: log_path.display().to_string(),
        dataset_rows: None,
        model_name: None,
        model_version: None,
        rollout_id: None,
        evaluation: None,
    };
    Ok(PreparedJob {
        record,
        work_dir,
        log_path,
        config_path,
        dataset_path,
        bundle_path,
        commands,
        task_data,
        version,
        model,
        signing_key,
    })
}

/// The task data of `template`: its `task_data`, or else its run configuration's `task.train`.
pub fn task_data(template: &JobTemplate) -> Result<Vec<PathBuf>, RunConfigError> {
    if !template.task_data.is_empty() {
        return Ok(template.task_data.clone());
    }
    let shown = template.run_config.display().to_string();
    let text = std::fs::read_to_string(&template.run_config)
        .map_err(|source| RunConfigError::Read { path: shown.clone(), source })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| RunConfigError::Parse { path: shown, message: e.to_string() })?;
    Ok(task_train(&table))
}

/// `task.train` of a run configuration, if any.
fn task_train(table: &toml::Table) -> Vec<PathBuf> {
    table
        .get("task")
        .and_then(|task| task.get("train"))
        .and_then(toml::Value::as_str)
        .map(|train| vec![PathBuf::from(train)])
        .unwrap_or_default()
}

/// Sets the dotted `key` (`run.steps`) of `table`, creating missing tables.
fn set(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), RunConfigError> {
    let error = |reason: &str| RunConfigError::Override { key: key.to_string(), reason: reason.to_string() };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(error("keys are dot-separated names"));
    }
    let (last, path) = parts.split_last().expect("split yields one part at least");
    let mut current = table;
    for part in path {
        let next = current.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = next.as_table_mut().ok_or_else(|| error(&format!("`{part}` is not a table")))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_version_follows_the_newest_whole_number_of_that_model() {
        let registered = [("tiny", "1"), ("tiny", "10"), ("tiny", "9"), ("tiny", "beta"), ("other", "40")];
        assert_eq!(next_version("tiny", registered), "11");
        assert_eq!(next_version("new", registered), "1");
    }

    #[test]
    fn dotted_overrides_set_nested_keys_and_refuse_to_go_through_values() {
        let mut table: toml::Table = "[run]\nsteps = 10\n".parse().unwrap();
        set(&mut table, "run.steps", 3.into()).unwrap();
        set(&mut table, "eval.every", 5.into()).unwrap();
        assert_eq!(table["run"]["steps"].as_integer(), Some(3));
        assert_eq!(table["eval"]["every"].as_integer(), Some(5));
        assert!(set(&mut table, "run.steps.x", 1.into()).is_err());
        assert!(set(&mut table, "run..x", 1.into()).is_err());
    }
}

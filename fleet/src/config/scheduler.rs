//! `[scheduler]`: retraining jobs, their templates and what triggers them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The retraining scheduler. Absent: no jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Folder of job folders (`DIR/JOB_ID/`: run configuration, dataset, log, the run, the
    /// bundle), created when missing.
    pub work_dir: PathBuf,
    /// `local` (default): each command runs as a child process on this host, in the job's folder.
    /// `command`: each command is put into `command_template` (ssh, Slurm, Kubernetes …), which
    /// then runs the same way.
    #[serde(default)]
    pub runner: RunnerKind,
    /// For `runner = "command"`: a shell command line with `{command}` (the step, shell-quoted),
    /// `{work_dir}`, `{config}`, `{job_id}`, e.g. `ssh gpu-1 cd {work_dir} '&&' {command}`.
    #[serde(default)]
    pub command_template: Option<String>,
    /// How often the triggers (schedules and rules) are evaluated, seconds.
    #[serde(default = "default_evaluate_interval_secs")]
    pub evaluate_interval_secs: u64,
    /// Register the job's bundle in `[registry]` when it succeeds (needs a registry).
    #[serde(default = "default_true")]
    pub register: bool,
    /// Also start a rollout of the registered version with `rollout_plan` (needs `register`).
    #[serde(default)]
    pub rollout: bool,
    /// The rollout created when `rollout = true`: a `POST /v1/rollouts` body without model and
    /// version (default: 10 % for 10 minutes, then everyone).
    #[serde(default)]
    pub rollout_plan: Option<serde_json::Value>,
    /// Lines of the job's log `GET /v1/jobs/{id}` returns.
    #[serde(default = "default_log_tail_lines")]
    pub log_tail_lines: usize,
    /// Job templates, by name.
    #[serde(default)]
    pub template: Vec<JobTemplate>,
}

/// Where a job's commands run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerKind {
    #[default]
    Local,
    Command,
}

/// What a job does, and when it runs by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    /// The template's name (`POST /v1/jobs {"template": NAME}`).
    pub name: String,
    /// The trainer's run configuration (TOML). The job writes a copy into its folder as
    /// `run.toml` with `run.out_dir` set to `{work_dir}/run`, `task.train` to the job's dataset
    /// (when the file has a `[task]` table), then `overrides`; `{…}` placeholders in it are
    /// replaced.
    pub run_config: PathBuf,
    /// The registry name of the bundle the job makes (`{model}` in commands and the run
    /// configuration; default: the template's name). When set, the job's `{version}` is one more
    /// than the newest whole-number version of it registered (1 when none); otherwise the job's
    /// creation time in Unix ms.
    #[serde(default)]
    pub model: Option<String>,
    /// JSONL task data (`{prompt, answer}` per line) the dataset starts from. Default: the run
    /// configuration's `task.train`.
    #[serde(default)]
    pub task_data: Vec<PathBuf>,
    /// JSONL task data never to train on, e.g. the evaluation set: prompts collected from devices
    /// that are in it are left out of the job's dataset (and counted in its log).
    #[serde(default)]
    pub held_out: Vec<PathBuf>,
    /// Dotted keys of the run configuration to set (e.g. `"run.steps" = 200`).
    #[serde(default)]
    pub overrides: BTreeMap<String, toml::Value>,
    /// Commands run in order by `sh -c` in the job's folder, each only when the previous one
    /// succeeded. Placeholders: `{work_dir}`, `{config}`, `{dataset}`, `{job_id}`, `{template}`,
    /// `{model}`, `{version}` (the job's model version), `{bundle}`, `{signing_key}`. Default: train, export
    /// `{work_dir}/run/final` as the bundle, sign it with `signing_key`.
    #[serde(default)]
    pub commands: Vec<String>,
    /// Where the signed bundle appears (placeholders allowed).
    #[serde(default = "default_bundle")]
    pub bundle: String,
    /// The secret key file the default commands sign with (`tandem-train keygen`).
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Only prompts collected in this many days before the job go into its dataset (0: all).
    #[serde(default)]
    pub collected_days: u32,
    /// Run every this many hours (since the template's previous job). None: not on a schedule.
    #[serde(default)]
    pub every_hours: Option<f64>,
    /// Run when a model version's fleet call ratio stays outside a band.
    #[serde(default)]
    pub call_ratio: Option<CallRatioRule>,
    /// Run when enough new opted-in prompts were collected.
    #[serde(default)]
    pub new_prompts: Option<NewPromptsRule>,
}

/// A model version's call ratio (cloud calls / queries) outside `[low, high]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRatioRule {
    /// Lowest acceptable call ratio.
    pub low: f64,
    /// Highest acceptable call ratio (the budget).
    pub high: f64,
    /// The period the ratio is measured over (the last this many seconds of events).
    #[serde(default = "default_period_secs")]
    pub period_secs: u64,
    /// Fewest events of the version in the period for the ratio to count.
    #[serde(default = "default_min_events")]
    pub min_events: u64,
    /// Only this model version (default: any version with enough events).
    #[serde(default)]
    pub model_version: Option<String>,
}

/// At least `min` opted-in prompts received since the template's previous job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPromptsRule {
    pub min: u64,
}

fn default_bundle() -> String {
    "{work_dir}/bundle".into()
}
const fn default_evaluate_interval_secs() -> u64 {
    60
}
const fn default_true() -> bool {
    true
}
const fn default_log_tail_lines() -> usize {
    50
}
const fn default_period_secs() -> u64 {
    3600
}
const fn default_min_events() -> u64 {
    200
}

/// The commands a template without `commands` runs.
pub fn default_commands() -> Vec<String> {
    vec![
        "tandem-train train --config {config}".into(),
        "tandem-train export --from {work_dir}/run/final --out {bundle} --name {model} --version {version} \
         --overwrite"
            .into(),
        "tandem-train sign --key {signing_key} --bundle {bundle}".into(),
    ]
}

impl SchedulerConfig {
    /// The template `name`.
    pub fn template(&self, name: &str) -> Option<&JobTemplate> {
        self.template.iter().find(|t| t.name == name)
    }
}

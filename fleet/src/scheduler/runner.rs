//! Runs a job's commands: each through `sh -c` in the job's folder, in order, stopping at the
//! first failure, with stdout and stderr appended to the job's log. The `local` runner runs the
//! commands as they are; the `command` runner puts each one into the operator's command template
//! (ssh, Slurm's `srun`, `kubectl exec` …), so the process the fleet watches is the remote one's
//! local end either way. Each command runs in a process group of its own, so cancelling kills
//! whatever it started, and stopping the fleet kills it too (the next start marks the job failed).

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RunnerKind;

/// How long a cancelled command gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// How the job's commands ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    /// A command failed; the reason names it and its exit status.
    Failed(String),
    /// Cancelled, or the fleet is stopping.
    Stopped,
}

/// Where commands run.
#[derive(Debug, Clone)]
pub struct Runner {
    pub kind: RunnerKind,
    /// For `command`: the template with `{command}`.
    pub command_template: Option<String>,
}

/// `template` with every `{name}` of `values` replaced.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |text, (name, value)| text.replace(&format!("{{{name}}}"), value))
}

/// `text` as one word for `sh`.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Runner {
    /// The shell line that runs `step` (placeholders already filled).
    pub fn command_line(&self, step: &str, values: &[(&str, &str)]) -> String {
        match (self.kind, &self.command_template) {
            (RunnerKind::Command, Some(template)) => {
                let quoted = shell_quote(step);
                let mut all: Vec<(&str, &str)> = values.to_vec();
                all.push(("command", &quoted));
                fill(template, &all)
            }
            _ => step.to_string(),
        }
    }

    /// Runs `steps` in `work_dir`, logging to `log`, until one fails or `stop` fires.
    pub async fn run(
        &self,
        steps: &[String],
        values: &[(&str, &str)],
        work_dir: &Path,
        log: &Path,
        stop: &CancellationToken,
    ) -> RunOutcome {
        for (index, step) in steps.iter().enumerate() {
            let line = self.command_line(&fill(step, values), values);
            let outcome = run_one(&line, work_dir, log, stop).await;
            match outcome {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    append(log, &format!("# step {} failed: {status}\n", index + 1));
                    return RunOutcome::Failed(format!("step {} (`{line}`) failed: {status}", index + 1));
                }
                Err(StepError::Stopped) => {
                    append(log, "# stopped\n");
                    return RunOutcome::Stopped;
                }
                Err(StepError::Spawn(error)) => {
                    append(log, &format!("# cannot start step {}: {error}\n", index + 1));
                    return RunOutcome::Failed(format!(
                        "cannot start step {} (`{line}`): {error}",
                        index + 1
                    ));
                }
            }
        }
        RunOutcome::Succeeded
    }
}

enum StepError {
    Stopped,
    Spawn(std::io::Error),
}

/// Appends `text` to the log (a failure to log is not a failure of the job).
pub fn append(log: &Path, text: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = file.write_all(text.as_bytes());
    }
}

async fn run_one(
    line: &str,
    work_dir: &Path,
    log: &Path,
    stop: &CancellationToken,
) -> Result<std::process::ExitStatus, StepError> {
    append(log, &format!("$ {line}\n"));
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(StepError::Spawn)?;
    let stderr = file.try_clone().map_err(StepError::Spawn)?;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(work_dir)
        // The log is a file: no colour codes in it.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(StepError::Spawn)?;
    let group = child.id();
    tokio::select! {
        status = child.wait() => status.map_err(StepError::Spawn),
        () = stop.cancelled() => {
            if let Some(group) = group {
                signal_group(group, "TERM");
                if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_err() {
                    signal_group(group, "KILL");
                }
            }
            let _ = child.kill().await;
            Err(StepError::Stopped)
        }
    }
}

/// Sends `signal` to the process group `group` (the command and everything it started).
fn signal_group(group: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{group}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `lines` lines of the log (all of it when shorter; empty when there is none).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(log) else { return String::new() };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut tail = all[start..].join("\n");
    if !tail.is_empty() {
        tail.push('\n');
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_the_command_runner_quotes_the_step() {
        let values = [("work_dir", "/jobs/1"), ("job_id", "1")];
        assert_eq!(fill("cd {work_dir} # {job_id} {other}", &values), "cd /jobs/1 # 1 {other}");
        let runner = Runner {
            kind: RunnerKind::Command,
            command_template: Some("ssh gpu cd {work_dir} '&&' {command}".into()),
        };
        assert_eq!(runner.command_line("echo 'hi'", &values), r"ssh gpu cd /jobs/1 '&&' 'echo '\''hi'\'''");
        let local = Runner { kind: RunnerKind::Local, command_template: None };
        assert_eq!(local.command_line("echo hi", &values), "echo hi");
    }

    #[test]
    fn the_log_tail_is_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job.log");
        assert_eq!(log_tail(&log, 3), "");
        std::fs::write(&log, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&log, 2), "c\nd\n");
        assert_eq!(log_tail(&log, 10), "a\nb\nc\nd\n");
    }
}

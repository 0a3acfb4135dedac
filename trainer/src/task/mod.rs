//! The task a run trains on: problems read from JSONL, and how the device's responses and the
//! cloud's answers are graded. Grading is core's ([`tandem_core::tasks`]); this module only picks
//! the grader for the task and turns a response into the [`Outcome`] the reward table reads.

pub mod sft_data;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_core::tasks::countdown::{self, CountdownProblem};
use tandem_core::tasks::dataset::{self, TaskRecord};
use tandem_core::tasks::grading;
use tandem_core::tasks::math;
use tandem_core::tasks::reward::{Outcome, RewardVersion, RewardWeights};
use tandem_core::tasks::templates::PromptTemplate;

/// Errors reading a task's problems.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Dataset {
        path: PathBuf,
        #[source]
        source: dataset::DatasetError,
    },
    #[error("{path}: no problems")]
    Empty { path: PathBuf },
}

/// Which task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Countdown: an expression in `<answer>` tags, checked exactly.
    Countdown,
    /// MATH-style: a `\boxed{}` answer, compared after normalisation.
    Math,
}

/// One problem: its record, and for Countdown the parsed numbers and target.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The JSONL record (question, reference answer).
    pub record: TaskRecord,
    /// The Countdown problem the record describes (Countdown only).
    pub countdown: Option<CountdownProblem>,
}

impl Problem {
    /// The question, without any template: what the device's template wraps and the cloud is asked.
    pub fn question(&self) -> &str {
        &self.record.prompt
    }
}

/// How a local (non-help) response fares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalGrade {
    /// The answer is correct.
    pub correct: bool,
    /// The response follows the template's format.
    pub well_formatted: bool,
}

impl TaskKind {
    /// The paper's template for the task, with or without the help option.
    pub fn template(self, offers_help: bool) -> PromptTemplate {
        let template = match self {
            TaskKind::Countdown => PromptTemplate::COUNTDOWN,
            TaskKind::Math => PromptTemplate::MATH,
        };
        if offers_help { template } else { template.without_help() }
    }

    /// The paper's reward weights for the task (MATH: α_c = 0.3, the Qwen2.5-1.5B value).
    pub fn default_weights(self, version: RewardVersion) -> RewardWeights {
        match self {
            TaskKind::Countdown => RewardWeights::countdown(version),
            TaskKind::Math => RewardWeights::math(0.3),
        }
    }

    /// Reads the problems of a JSONL file of task records.
    pub fn load(self, path: &Path) -> Result<Vec<Problem>, TaskError> {
        let file = std::fs::File::open(path).map_err(|source| TaskError::Io { path: path.into(), source })?;
        let reader = std::io::BufReader::new(file);
        let dataset_error = |source| TaskError::Dataset { path: path.into(), source };
        let problems: Vec<Problem> = match self {
            TaskKind::Countdown => {
                let text = std::io::read_to_string(reader)
                    .map_err(|source| TaskError::Io { path: path.into(), source })?;
                let records = dataset::parse_records(&text).map_err(dataset_error)?;
                let problems = dataset::read_countdown(text.as_bytes()).map_err(dataset_error)?;
                records
                    .into_iter()
                    .zip(problems)
                    .map(|(record, problem)| Problem { record, countdown: Some(problem) })
                    .collect()
            }
            TaskKind::Math => dataset::read_records(reader)
                .map_err(dataset_error)?
                .into_iter()
                .map(|record| Problem { record, countdown: None })
                .collect(),
        };
        if problems.is_empty() {
            return Err(TaskError::Empty { path: path.into() });
        }
        Ok(problems)
    }

    /// Grades the device's own answer (a response that did not ask for help).
    pub fn grade_local(self, problem: &Problem, response: &str) -> LocalGrade {
        match (self, &problem.countdown) {
            (TaskKind::Countdown, Some(countdown)) => {
                let check = countdown::verify_response(countdown, response);
                LocalGrade { correct: check.is_correct(), well_formatted: check.well_formatted }
            }
            _ => {
                let check = math::verify_response(response, &problem.record.answer);
                LocalGrade { correct: check.correct, well_formatted: check.well_formatted }
            }
        }
    }

    /// Grades the cloud's free-form answer.
    pub fn grade_cloud(self, problem: &Problem, answer: &str) -> bool {
        match (self, &problem.countdown) {
            (TaskKind::Countdown, Some(countdown)) => grading::grade_countdown(countdown, answer),
            _ => grading::grade_math(answer, &problem.record.answer),
        }
    }

    /// The outcome of one device response: `asked_for_help` responses are scored on `cloud_correct`
    /// alone (the reward table ignores their own text).
    pub fn outcome(
        self,
        problem: &Problem,
        device_text: &str,
        asked_for_help: bool,
        cloud_correct: bool,
    ) -> Outcome {
        if asked_for_help {
            return Outcome { asked_for_help: true, cloud_correct, ..Outcome::default() };
        }
        let grade = self.grade_local(problem, device_text);
        Outcome {
            local_correct: grade.correct,
            well_formatted: grade.well_formatted,
            asked_for_help: false,
            cloud_correct: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::tasks::reward::reward;

    fn countdown_problem() -> Problem {
        let problem = CountdownProblem { numbers: vec![74, 78, 36, 7], target: 33 };
        Problem { record: TaskRecord::from_countdown(&problem, None), countdown: Some(problem) }
    }

    #[test]
    fn a_correct_well_formatted_local_answer_earns_accuracy_and_format_under_v1() {
        let problem = countdown_problem();
        let text = "<think>78 - 74 = 4</think>\n<answer> 36 - (7 - (78 - 74)) </answer>";
        let outcome = TaskKind::Countdown.outcome(&problem, text, false, false);
        assert!(outcome.local_correct && outcome.well_formatted);
        let v1 = TaskKind::Countdown.default_weights(RewardVersion::V1);
        let v2 = TaskKind::Countdown.default_weights(RewardVersion::V2);
        assert_eq!(reward(&outcome, &v1), 2.2);
        assert_eq!(reward(&outcome, &v2), 1.0);
    }

    #[test]
    fn a_help_call_is_scored_on_the_cloud_answer_alone() {
        let problem = countdown_problem();
        // Even a correct answer before the marker earns nothing: asking was the terminal action.
        let text = "<think>x</think><answer> 36 - (7 - (78 - 74)) </answer> <unknown>";
        let cloud = "36 − (7 − (78 − 74)) = 33";
        let cloud_correct = TaskKind::Countdown.grade_cloud(&problem, cloud);
        assert!(cloud_correct);
        let outcome = TaskKind::Countdown.outcome(&problem, text, true, cloud_correct);
        let v1 = TaskKind::Countdown.default_weights(RewardVersion::V1);
        assert_eq!(reward(&outcome, &v1), 0.5);
        let wrong = TaskKind::Countdown.outcome(&problem, text, true, false);
        assert_eq!(reward(&wrong, &v1), 0.0);
    }

    #[test]
    fn a_wrong_well_formatted_answer_earns_only_the_format_term() {
        let problem = countdown_problem();
        let text = "<think>guess</think> <answer> 74 + 78 - 36 - 7 </answer>";
        let outcome = TaskKind::Countdown.outcome(&problem, text, false, false);
        let v1 = TaskKind::Countdown.default_weights(RewardVersion::V1);
        assert!((reward(&outcome, &v1) - 0.2).abs() < 1e-12);
        assert_eq!(reward(&outcome, &TaskKind::Countdown.default_weights(RewardVersion::V2)), 0.0);
    }

    #[test]
    fn math_answers_are_graded_from_the_box_and_the_cloud_from_free_text() {
        let problem = Problem {
            record: TaskRecord {
                prompt: "1/2 + 1/4?".into(),
                answer: "\\frac34".into(),
                id: None,
                meta: None,
            },
            countdown: None,
        };
        assert!(TaskKind::Math.grade_local(&problem, "Step 1: add. \\boxed{3/4}").correct);
        assert!(!TaskKind::Math.grade_local(&problem, "Step 1: 0.75").correct);
        assert!(TaskKind::Math.grade_cloud(&problem, "The sum is 0.75"));
    }
}

//! Task datasets as JSONL: one `{"prompt", "answer", "id"?, "meta"?}` object per line.
//!
//! Sans-IO: records are read from any `BufRead` (or a `&str`) and written to any `Write`; opening
//! files is the caller's business. Errors carry the 1-based line number. Blank lines are skipped;
//! unknown keys are errors (put extra data in `meta`). For Countdown, `prompt` is the question,
//! `answer` the target, and `meta` holds the numbers and target that define the problem.

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Deserializer, Serialize};

use crate::tasks::countdown::CountdownProblem;
use crate::tasks::templates::question_of_user_turn;

/// The `meta.task` value of Countdown records.
pub const COUNTDOWN_TASK: &str = "countdown";

/// One task instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRecord {
    /// The question, without any template (it is also what the cloud is asked).
    pub prompt: String,
    /// The reference answer (MATH: the final answer, not the worked solution; Countdown: the target).
    pub answer: String,
    /// A stable identifier; a JSON number is accepted and kept as its decimal text.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "string_or_number")]
    pub id: Option<String>,
    /// Anything else about the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// Why a dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("line {line}: cannot read: {source}")]
    Read { line: usize, source: io::Error },
    #[error("line {line}: not a task record: {source}")]
    Json { line: usize, source: serde_json::Error },
    #[error("line {line}: not a Countdown record: {source}")]
    Countdown { line: usize, source: CountdownRecordError },
    #[error("cannot write record {index}: {source}")]
    Write { index: usize, source: io::Error },
}

/// Why a record does not describe a Countdown problem.
#[derive(Debug, thiserror::Error)]
pub enum CountdownRecordError {
    #[error("meta must be an object with \"numbers\" and \"target\": {0}")]
    Meta(serde_json::Error),
    #[error("meta.task is {0:?}, not \"countdown\"")]
    OtherTask(String),
    #[error("the answer {answer:?} is not the target {target}")]
    AnswerMismatch { answer: String, target: i64 },
    #[error("a Countdown problem needs at least one number")]
    NoNumbers,
}

impl TaskRecord {
    /// The record for a Countdown problem.
    pub fn from_countdown(problem: &CountdownProblem, id: Option<String>) -> Self {
        let meta = serde_json::json!({
            "task": COUNTDOWN_TASK,
            "numbers": problem.numbers,
            "target": problem.target,
        });
        Self { prompt: problem.question(), answer: problem.target.to_string(), id, meta: Some(meta) }
    }

    /// The record of a prompt a device was asked, as its telemetry recorded it (the template's user
    /// turn), with the cloud's answer when the device asked for help. A Countdown question becomes
    /// a Countdown record (the verifier grades it; the cloud's answer is kept in `meta`); anything
    /// else keeps the cloud's answer as its reference (empty when the cloud was not asked).
    /// `meta.source` is `source`, `meta.cloud_answer` says whether the cloud answered.
    pub fn from_collected(user_turn: &str, cloud_answer: Option<&str>, id: String, source: &str) -> Self {
        let question = question_of_user_turn(user_turn);
        let mut record = match CountdownProblem::from_question(question) {
            Some(problem) => {
                let mut record = Self::from_countdown(&problem, Some(id));
                if let Some(answer) = cloud_answer {
                    record.meta_object().insert("cloud_reply".into(), answer.into());
                }
                record
            }
            None => Self {
                prompt: question.to_string(),
                answer: cloud_answer.unwrap_or_default().to_string(),
                id: Some(id),
                meta: None,
            },
        };
        let meta = record.meta_object();
        meta.insert("source".into(), source.into());
        meta.insert("cloud_answer".into(), cloud_answer.is_some().into());
        record
    }

    fn meta_object(&mut self) -> &mut serde_json::Map<String, serde_json::Value> {
        let meta = self.meta.get_or_insert_with(|| serde_json::json!({}));
        if !meta.is_object() {
            *meta = serde_json::json!({ "value": meta.take() });
        }
        meta.as_object_mut().expect("made an object above")
    }

    /// The Countdown problem this record describes.
    pub fn to_countdown(&self) -> Result<CountdownProblem, CountdownRecordError> {
        #[derive(Deserialize)]
        struct Meta {
            #[serde(default)]
            task: Option<String>,
            numbers: Vec<u32>,
            target: i64,
        }
        let meta = self.meta.clone().unwrap_or(serde_json::Value::Null);
        let meta: Meta = serde_json::from_value(meta).map_err(CountdownRecordError::Meta)?;
        if let Some(task) = meta.task.filter(|task| task != COUNTDOWN_TASK) {
            return Err(CountdownRecordError::OtherTask(task));
        }
        if meta.numbers.is_empty() {
            return Err(CountdownRecordError::NoNumbers);
        }
        if self.answer.trim().parse::<i64>().ok() != Some(meta.target) {
            return Err(CountdownRecordError::AnswerMismatch {
                answer: self.answer.clone(),
                target: meta.target,
            });
        }
        Ok(CountdownProblem { numbers: meta.numbers, target: meta.target })
    }
}

/// Every record in `reader`.
pub fn read_records(reader: impl BufRead) -> Result<Vec<TaskRecord>, DatasetError> {
    numbered_records(reader).map(|item| item.map(|(_, record)| record)).collect()
}

/// Every record in `text`.
pub fn parse_records(text: &str) -> Result<Vec<TaskRecord>, DatasetError> {
    read_records(text.as_bytes())
}

/// Every Countdown problem in `reader` (each line a record made by [`TaskRecord::from_countdown`]).
pub fn read_countdown(reader: impl BufRead) -> Result<Vec<CountdownProblem>, DatasetError> {
    numbered_records(reader)
        .map(|item| {
            let (line, record) = item?;
            record.to_countdown().map_err(|source| DatasetError::Countdown { line, source })
        })
        .collect()
}

/// Writes `records` as JSONL, one per line.
pub fn write_records(mut writer: impl Write, records: &[TaskRecord]) -> Result<(), DatasetError> {
    for (index, record) in records.iter().enumerate() {
        serde_json::to_writer(&mut writer, record)
            .map_err(io::Error::from)
            .and_then(|()| writer.write_all(b"\n"))
            .map_err(|source| DatasetError::Write { index, source })?;
    }
    Ok(())
}

/// `records` as JSONL text.
pub fn to_jsonl(records: &[TaskRecord]) -> String {
    let mut out = Vec::new();
    write_records(&mut out, records).expect("writing to memory cannot fail");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// Records with their 1-based line numbers, skipping blank lines.
fn numbered_records(reader: impl BufRead) -> impl Iterator<Item = Result<(usize, TaskRecord), DatasetError>> {
    reader.lines().enumerate().filter_map(|(index, line)| {
        let line_number = index + 1;
        let line = match line {
            Ok(line) => line,
            Err(source) => return Some(Err(DatasetError::Read { line: line_number, source })),
        };
        let text = line.strip_prefix('\u{feff}').unwrap_or(&line).trim();
        if text.is_empty() {
            return None;
        }
        Some(
            serde_json::from_str(text)
                .map(|record| (line_number, record))
                .map_err(|source| DatasetError::Json { line: line_number, source }),
        )
    })
}

fn string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(serde_json::Number),
    }
    Ok(Option::<Id>::deserialize(deserializer)?.map(|id| match id {
        Id::Text(text) => text,
        Id::Number(number) => number.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::countdown::{CountdownGenerator, GeneratorConfig};

    fn record(prompt: &str, answer: &str) -> TaskRecord {
        TaskRecord { prompt: prompt.into(), answer: answer.into(), id: None, meta: None }
    }

    #[test]
    fn records_round_trip_through_jsonl() {
        let records = vec![
            record("What is 1 + 1?", "2"),
            TaskRecord {
                prompt: "Line one\nline \"two\" ünïcödé".into(),
                answer: "\\frac{1}{2}".into(),
                id: Some("math-7".into()),
                meta: Some(serde_json::json!({"level": 5, "type": "Algebra"})),
            },
        ];
        let text = to_jsonl(&records);
        assert_eq!(text.lines().count(), 2);
        assert_eq!(text.lines().next().unwrap(), r#"{"prompt":"What is 1 + 1?","answer":"2"}"#);
        assert_eq!(parse_records(&text).unwrap(), records);
    }

    #[test]
    fn blank_lines_crlf_and_a_byte_order_mark_are_tolerated() {
        let text = "\u{feff}{\"prompt\":\"a\",\"answer\":\"1\"}\r\n\r\n   \n{\"prompt\":\"b\",\"answer\":\"2\",\"id\":17}\n";
        let records = parse_records(text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].id.as_deref(), Some("17"));
    }

    #[test]
    fn errors_name_the_line() {
        let text = "{\"prompt\":\"a\",\"answer\":\"1\"}\n\n{\"prompt\":\"b\"}\n";
        let error = parse_records(text).unwrap_err();
        assert!(matches!(error, DatasetError::Json { line: 3, .. }), "{error}");
        assert!(error.to_string().starts_with("line 3: "), "{error}");
        for bad in [
            "not json",
            "{\"prompt\":\"a\",\"answer\":\"1\",\"extra\":true}",
            "[1, 2]",
            "{\"prompt\":1,\"answer\":\"1\"}",
        ] {
            assert!(matches!(parse_records(bad), Err(DatasetError::Json { line: 1, .. })), "{bad}");
        }
    }

    #[test]
    fn invalid_utf8_is_a_read_error_on_its_line() {
        let bytes: &[u8] = b"{\"prompt\":\"a\",\"answer\":\"1\"}\n\xff\xfe\n";
        assert!(matches!(read_records(bytes), Err(DatasetError::Read { line: 2, .. })));
    }

    #[test]
    fn a_collected_countdown_user_turn_becomes_a_verifiable_countdown_record() {
        let problem = CountdownProblem { numbers: vec![12, 6], target: 2 };
        let turn = crate::tasks::templates::PromptTemplate::COUNTDOWN.user_prompt(&problem.question());
        let record = TaskRecord::from_collected(&turn, Some("12 / 6 = 2"), "e1".into(), "fleet");
        assert_eq!(record.prompt, problem.question());
        assert_eq!(record.to_countdown().unwrap(), problem);
        let meta = record.meta.as_ref().unwrap();
        assert_eq!((meta["source"].as_str(), meta["cloud_answer"].as_bool()), (Some("fleet"), Some(true)));
        assert_eq!(meta["cloud_reply"], "12 / 6 = 2");
        let unanswered = TaskRecord::from_collected(&turn, None, "e2".into(), "fleet");
        assert_eq!(unanswered.meta.as_ref().unwrap()["cloud_answer"], false);
        assert_eq!(unanswered.to_countdown().unwrap().target, 2);
    }

    #[test]
    fn any_other_collected_prompt_keeps_the_clouds_answer_as_its_reference() {
        let record = TaskRecord::from_collected(
            "What is 1/2 + 1/4?\nWork through it step by step.",
            Some("3/4"),
            "e3".into(),
            "fleet",
        );
        assert_eq!((record.prompt.as_str(), record.answer.as_str()), ("What is 1/2 + 1/4?", "3/4"));
        assert!(record.to_countdown().is_err());
        let line = to_jsonl(std::slice::from_ref(&record));
        assert_eq!(parse_records(&line).unwrap(), vec![record]);
    }

    #[test]
    fn countdown_problems_round_trip_through_records() {
        let problems = CountdownGenerator::new(GeneratorConfig::default(), 5).unwrap().distinct(25).unwrap();
        let records: Vec<_> = problems
            .iter()
            .enumerate()
            .map(|(i, p)| TaskRecord::from_countdown(p, Some(format!("countdown-{i}"))))
            .collect();
        assert_eq!(records[0].prompt, problems[0].question());
        assert_eq!(records[0].answer, problems[0].target.to_string());
        assert_eq!(read_countdown(to_jsonl(&records).as_bytes()).unwrap(), problems);
    }

    #[test]
    fn records_that_are_not_countdown_problems_are_refused_with_their_line() {
        let good = TaskRecord::from_countdown(&CountdownProblem { numbers: vec![1, 2], target: 3 }, None);
        let mut wrong_answer = good.clone();
        wrong_answer.answer = "4".into();
        let mut other_task = good.clone();
        other_task.meta.as_mut().unwrap()["task"] = "math".into();
        let mut no_meta = good.clone();
        no_meta.meta = None;
        let mut no_numbers = good.clone();
        no_numbers.meta.as_mut().unwrap()["numbers"] = serde_json::json!([]);
        for bad in [wrong_answer, other_task, no_meta, no_numbers] {
            let text = to_jsonl(&[good.clone(), bad]);
            let error = read_countdown(text.as_bytes()).unwrap_err();
            assert!(matches!(error, DatasetError::Countdown { line: 2, .. }), "{error}");
        }
    }
}

//! Warm-start data: prompt/completion pairs for supervised fine-tuning before RL.
//!
//! For Countdown the completions are worked solutions written from core's exhaustive solver, in
//! Template I's format: `<think>` restating the numbers and the target, then one line per operation,
//! then the expression in `<answer>`.
//! A configurable share of the examples instead shows a failed attempt (random operations that miss
//! the target) and ends with the help marker, on problems picked at random. So the warm-started
//! policy reasons first and decides at the end, between `<answer>` and the marker, as the paper's
//! policy does; it knows the marker exists (as an instruction-tuned model does) but has not learnt
//! *when* to use it: that is what RL with the collaboration-aware reward teaches.

use std::io::{BufRead, Write};

use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tandem_core::help_marker::HELP_MARKER;
use tandem_core::tasks::countdown::{CountdownProblem, Expr, Operator, solve_expr};
use tandem_core::tasks::rational::Rational;
use tandem_core::tasks::templates::{ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN};

/// One supervised example: the bare question (the run's template wraps it) and the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftExample {
    /// The question, without any template.
    pub prompt: String,
    /// The response the model learns to give (an end-of-turn token is appended when training).
    pub completion: String,
}

/// Errors reading or writing supervised examples.
#[derive(Debug, thiserror::Error)]
pub enum SftDataError {
    #[error("line {line}: {source}")]
    Json { line: usize, source: serde_json::Error },
    #[error("line {line}: {source}")]
    Read { line: usize, source: std::io::Error },
    #[error("writing examples: {0}")]
    Write(#[from] std::io::Error),
}

/// A worked solution of `problem` in Template I's format, or `None` when it has no solution.
pub fn countdown_worked_solution(problem: &CountdownProblem) -> Option<String> {
    let expr = solve_expr(problem)?;
    let steps = expr.steps()?;
    Some(format!(
        "{THINK_OPEN}\n{}\n{}\n{THINK_CLOSE}\n{ANSWER_OPEN} {expr} {ANSWER_CLOSE}",
        restatement(problem),
        steps.join("\n")
    ))
}

/// The first line of a worked response: the problem in the response's own words.
fn restatement(problem: &CountdownProblem) -> String {
    let numbers = problem.numbers.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    format!("The numbers are {numbers} and the target is {}.", problem.target)
}

/// A response that tries random operations, misses the target and asks for help, in Template I's
/// format.
pub fn countdown_help_completion(problem: &CountdownProblem, rng: &mut impl Rng) -> String {
    let attempt = (0..20).find_map(|_| failed_attempt(problem, rng)).unwrap_or_default();
    let lines =
        if attempt.is_empty() { "I cannot reach the target.".to_string() } else { attempt.join("\n") };
    format!("{THINK_OPEN}\n{}\n{lines}\n{THINK_CLOSE}\n{HELP_MARKER}", restatement(problem))
}

/// The steps of a random `+ − ×` combination of all the numbers, when its value is not the target.
fn failed_attempt(problem: &CountdownProblem, rng: &mut impl Rng) -> Option<Vec<String>> {
    let mut numbers = problem.numbers.clone();
    numbers.shuffle(rng);
    let mut numbers = numbers.into_iter();
    let mut expr = Expr::Number(numbers.next()?);
    for n in numbers {
        let op = [Operator::Add, Operator::Subtract, Operator::Multiply][rng.random_range(0..3)];
        expr = Expr::apply(op, expr, Expr::Number(n));
    }
    let value = expr.value().ok()?;
    (value != Rational::from(problem.target)).then(|| expr.steps()).flatten()
}

/// Examples for `problems`: worked solutions, except a `help_fraction` share (chosen at random)
/// that ask for help after a failed attempt.
pub fn countdown_examples(
    problems: &[CountdownProblem],
    help_fraction: f64,
    rng: &mut impl Rng,
) -> Vec<SftExample> {
    problems
        .iter()
        .filter_map(|problem| {
            let completion = if rng.random::<f64>() < help_fraction {
                countdown_help_completion(problem, rng)
            } else {
                countdown_worked_solution(problem)?
            };
            Some(SftExample { prompt: problem.question(), completion })
        })
        .collect()
}

/// Reads examples, one JSON object per line (blank lines skipped).
pub fn read_examples(reader: impl BufRead) -> Result<Vec<SftExample>, SftDataError> {
    let mut examples = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| SftDataError::Read { line: index + 1, source })?;
        if line.trim().is_empty() {
            continue;
        }
        examples.push(
            serde_json::from_str(line.trim())
                .map_err(|source| SftDataError::Json { line: index + 1, source })?,
        );
    }
    Ok(examples)
}

/// Writes examples as JSONL.
pub fn write_examples(mut writer: impl Write, examples: &[SftExample]) -> Result<(), SftDataError> {
    for example in examples {
        serde_json::to_writer(&mut writer, example).map_err(std::io::Error::from)?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tandem_core::help_marker::HelpMarker;
    use tandem_core::tasks::countdown::{CountdownGenerator, GeneratorConfig, verify_response};

    #[test]
    fn worked_solutions_are_correct_and_well_formatted() {
        let problems = CountdownGenerator::new(GeneratorConfig::default(), 3).unwrap().distinct(40).unwrap();
        for problem in &problems {
            let text = countdown_worked_solution(problem).unwrap();
            let check = verify_response(problem, &text);
            assert!(check.is_correct() && check.well_formatted, "{problem:?}: {text}");
        }
    }

    #[test]
    fn the_help_share_of_examples_ask_for_help_and_round_trip() {
        let problems = CountdownGenerator::new(GeneratorConfig::default(), 4).unwrap().distinct(200).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let examples = countdown_examples(&problems, 0.25, &mut rng);
        let help: Vec<&SftExample> =
            examples.iter().filter(|e| HelpMarker::find_in(&e.completion).is_some()).collect();
        assert!((30..=70).contains(&help.len()), "{} of 200 ask for help", help.len());
        for example in help {
            let problem = problems.iter().find(|p| p.question() == example.prompt).unwrap();
            assert!(!verify_response(problem, &example.completion).is_correct());
            assert!(example.completion.contains(" = "), "a failed attempt is shown: {}", example.completion);
            assert!(example.completion.ends_with(HELP_MARKER));
        }
        let mut out = Vec::new();
        write_examples(&mut out, &examples).unwrap();
        assert_eq!(read_examples(out.as_slice()).unwrap(), examples);
    }
}

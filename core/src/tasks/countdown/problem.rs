//! A Countdown problem and the question a model (or the cloud) is asked about it.

use serde::{Deserialize, Serialize};

/// Reach `target` by combining every one of `numbers` exactly once with `+ - * /`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountdownProblem {
    /// The numbers, in the order they are shown. Repeats are allowed and must each be used.
    pub numbers: Vec<u32>,
    /// The value the expression must have.
    pub target: i64,
}

impl CountdownProblem {
    /// The task as a user would ask it, without any answer-format instructions (those belong to the
    /// prompt template). This is also the text the cloud receives, on its own.
    pub fn question(&self) -> String {
        let numbers = self.numbers.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        format!(
            "Using the numbers [{numbers}], write an arithmetic expression whose value is {}. You may use \
             +, -, * and /, and every number must be used exactly once.",
            self.target
        )
    }

    /// The problem a [`CountdownProblem::question`] text asks, or `None` when `text` is not exactly
    /// such a question (so collected prompts become verifiable Countdown problems again).
    pub fn from_question(text: &str) -> Option<Self> {
        let rest = text.trim().strip_prefix("Using the numbers [")?;
        let (numbers, rest) = rest.split_once(']')?;
        let target = rest
            .strip_prefix(", write an arithmetic expression whose value is ")?
            .strip_suffix(". You may use +, -, * and /, and every number must be used exactly once.")?;
        let numbers: Vec<u32> = numbers.split(", ").map(|n| n.parse().ok()).collect::<Option<_>>()?;
        let problem = Self { numbers, target: target.parse().ok()? };
        (problem.question() == text.trim()).then_some(problem)
    }

    /// The numbers sorted, for comparing the multiset of numbers an expression uses.
    pub fn sorted_numbers(&self) -> Vec<u32> {
        let mut numbers = self.numbers.clone();
        numbers.sort_unstable();
        numbers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_parses_back_into_its_problem_and_other_text_does_not() {
        let problem = CountdownProblem { numbers: vec![9, 9, 6], target: -5 };
        assert_eq!(CountdownProblem::from_question(&problem.question()), Some(problem.clone()));
        let question = problem.question();
        assert_eq!(CountdownProblem::from_question(&format!(" {question}\n")), Some(problem));
        for other in [
            "What is 2 + 2?",
            "Using the numbers [], write an arithmetic expression whose value is 5. You may use +, -, * and /, \
             and every number must be used exactly once.",
            "Using the numbers [1,2], write an arithmetic expression whose value is 3. You may use +, -, * and /, \
             and every number must be used exactly once.",
            &question.replace("exactly once.", "at most once."),
        ] {
            assert_eq!(CountdownProblem::from_question(other), None, "{other}");
        }
    }

    #[test]
    fn the_question_names_every_number_and_the_target() {
        let problem = CountdownProblem { numbers: vec![74, 78, 36, 7], target: 33 };
        let question = problem.question();
        assert!(question.contains("[74, 78, 36, 7]"), "{question}");
        assert!(question.contains("is 33."), "{question}");
    }

    #[test]
    fn problems_round_trip_through_json() {
        let problem = CountdownProblem { numbers: vec![3, 3, 8], target: 24 };
        let json = serde_json::to_string(&problem).unwrap();
        assert_eq!(json, r#"{"numbers":[3,3,8],"target":24}"#);
        assert_eq!(serde_json::from_str::<CountdownProblem>(&json).unwrap(), problem);
    }
}

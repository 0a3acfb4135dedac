//! Grading the on-device model's Countdown responses (Template I).
//!
//! The answer is the expression inside the last complete `<answer>…</answer>` pair. It must parse
//! under the rules of [`super::expression`] (digits, `+ - * /` and their typographic forms, parentheses
//! and whitespace only; no unary signs, no exponentiation, length and depth caps), use exactly the
//! given numbers as a multiset, and evaluate exactly to the target. Anything else around the
//! expression, such as `= 33`, makes it invalid: the template asks for the expression alone.
//!
//! Separately, [`is_well_formatted`] says whether the response has Template I's structure, for the
//! format reward of METHOD.md's v1 table.

use super::expression::{Expr, ExpressionError};
use super::problem::CountdownProblem;
use crate::help_marker::HelpMarker;
use crate::tasks::rational::Rational;
use crate::tasks::templates::{ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN};

/// What the answer of a response amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A valid expression over the given numbers whose value is the target.
    Correct,
    /// A valid expression over the given numbers with another value.
    Wrong { value: Rational },
    /// An answer that is not a valid expression over the given numbers, or has no value.
    Invalid(InvalidAnswer),
    /// No complete `<answer>…</answer>` pair.
    NoAnswer,
}

/// Why an answer is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAnswer {
    #[error(transparent)]
    Expression(#[from] ExpressionError),
    #[error("the expression uses the numbers {used:?}, but the numbers given are {given:?}")]
    WrongNumbers { used: Vec<u32>, given: Vec<u32> },
}

/// The verdict on a response and whether it follows Template I's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountdownCheck {
    pub verdict: Verdict,
    /// See [`is_well_formatted`].
    pub well_formatted: bool,
}

impl CountdownCheck {
    /// Whether the answer is correct.
    pub fn is_correct(&self) -> bool {
        self.verdict == Verdict::Correct
    }
}

/// Grades a full response: its last answer, and its format.
pub fn verify_response(problem: &CountdownProblem, response: &str) -> CountdownCheck {
    let verdict = match last_answer(response) {
        Some(answer) => verify_expression(problem, answer),
        None => Verdict::NoAnswer,
    };
    CountdownCheck { verdict, well_formatted: is_well_formatted(response) }
}

/// Grades a bare expression against `problem`.
pub fn verify_expression(problem: &CountdownProblem, expression: &str) -> Verdict {
    let expr = match Expr::parse(expression) {
        Ok(expr) => expr,
        Err(error) => return Verdict::Invalid(error.into()),
    };
    let mut used = expr.numbers();
    used.sort_unstable();
    let given = problem.sorted_numbers();
    if used != given {
        return Verdict::Invalid(InvalidAnswer::WrongNumbers { used, given });
    }
    match expr.value() {
        Ok(value) if value == Rational::from(problem.target) => Verdict::Correct,
        Ok(value) => Verdict::Wrong { value },
        Err(error) => Verdict::Invalid(error.into()),
    }
}

/// The text inside the last complete `<answer>…</answer>` pair: the last closing tag that has an
/// opening tag after the closing tag before it, paired with the nearest such opening tag. So
/// `<answer>a</answer><answer>b` gives `a` and `<answer>a<answer>b</answer>` gives `b`. Linear time.
pub fn last_answer(response: &str) -> Option<&str> {
    // The two tags cannot overlap, so each occurrence is found once, left to right.
    let find_from = |tag: &str, from: usize| response[from..].find(tag).map(|i| i + from);
    let mut found = None;
    let mut open = None;
    let (mut next_open, mut next_close) = (find_from(ANSWER_OPEN, 0), find_from(ANSWER_CLOSE, 0));
    loop {
        match (next_open, next_close) {
            (Some(o), close) if close.is_none_or(|c| o < c) => {
                let start = o + ANSWER_OPEN.len();
                open = Some(start);
                next_open = find_from(ANSWER_OPEN, start);
            }
            (_, Some(c)) => {
                if let Some(start) = open.take() {
                    found = Some(&response[start..c]);
                }
                next_close = find_from(ANSWER_CLOSE, c + ANSWER_CLOSE.len());
            }
            _ => return found,
        }
    }
}

/// Template I's structure: after optional whitespace, one `<think>…</think>` block, then (after
/// optional whitespace) one non-empty `<answer>…</answer>` block that ends the response. A response
/// that asks for help (a help-marker opening tag anywhere, the daemon's routing rule) is never well
/// formatted, so it cannot earn the format reward.
pub fn is_well_formatted(response: &str) -> bool {
    if HelpMarker::opening_in(response).is_some() {
        return false;
    }
    let Some(rest) = response.trim().strip_prefix(THINK_OPEN) else { return false };
    let Some((thinking, after)) = rest.split_once(THINK_CLOSE) else { return false };
    let Some(answer) =
        after.trim_start().strip_prefix(ANSWER_OPEN).and_then(|a| a.strip_suffix(ANSWER_CLOSE))
    else {
        return false;
    };
    let tags = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE];
    !thinking.contains(THINK_OPEN)
        && !tags.iter().any(|tag| answer.contains(tag))
        && !after.contains(THINK_CLOSE)
        && !answer.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::help_marker::HELP_MARKER;
    use crate::tasks::fuzz::random_texts;

    fn problem() -> CountdownProblem {
        CountdownProblem { numbers: vec![74, 78, 36, 7], target: 33 }
    }

    fn respond(answer: &str) -> String {
        format!("<think>try things</think>\n<answer>{answer}</answer>")
    }

    fn verdict(answer: &str) -> Verdict {
        verify_response(&problem(), &respond(answer)).verdict
    }

    fn wrong_numbers(verdict: &Verdict) -> bool {
        matches!(verdict, Verdict::Invalid(InvalidAnswer::WrongNumbers { .. }))
    }

    #[test]
    fn a_correct_expression_is_correct_in_any_order_and_spacing() {
        for answer in [
            "36 - (7 - (78 - 74))",
            "36-(7-(78-74))",
            "  36 - ( 7 - ( 78 - 74 ) )  ",
            "36\t-\n(7 - (78 - 74))",
            "36\u{a0}- (7 - (78 - 74))",
            "(78 - 74) + 36 - 7",
            "36 − (7 − (78 − 74))",
        ] {
            assert_eq!(verdict(answer), Verdict::Correct, "{answer:?}");
        }
    }

    #[test]
    fn a_valid_expression_with_another_value_is_wrong_with_its_value() {
        assert_eq!(verdict("(74 + 78) - (36 + 7)"), Verdict::Wrong { value: Rational::from(109i64) });
        assert_eq!(verdict("74 / 78 + 36 - 7"), Verdict::Wrong { value: Rational::new(1168, 39).unwrap() });
    }

    #[test]
    fn reused_missing_and_extra_numbers_are_invalid() {
        assert!(wrong_numbers(&verdict("36 - (7 - (78 - 74)) + 7 - 7")), "extra and reused numbers");
        assert!(wrong_numbers(&verdict("78 - 74 + 36 - 7 + 0")), "extra number");
        assert!(wrong_numbers(&verdict("36 - 7 + 4")), "missing numbers");
        assert!(wrong_numbers(&verdict("36 - (7 - (78 - 78))")), "reused number in place of another");
        assert!(wrong_numbers(&verdict("3 + 6 - (7 - (78 - 74))")), "digits of a number split up");
        assert!(wrong_numbers(&verdict("33")), "the target alone");
        let reused = CountdownProblem { numbers: vec![5, 5, 2], target: 20 };
        assert_eq!(verify_expression(&reused, "5 * 2 * 2"), verify_expression(&reused, "2 * 5 * 2"));
        assert!(wrong_numbers(&verify_expression(&reused, "5 * 2 * 2")));
        assert_eq!(verify_expression(&reused, "(5 + 5) * 2"), Verdict::Correct);
    }

    #[test]
    fn division_by_zero_is_invalid() {
        let problem = CountdownProblem { numbers: vec![4, 4, 9], target: 1 };
        assert_eq!(
            verify_expression(&problem, "9 / (4 - 4)"),
            Verdict::Invalid(InvalidAnswer::Expression(ExpressionError::DivisionByZero))
        );
    }

    #[test]
    fn exponentiation_and_huge_numbers_are_invalid() {
        let exponent = Verdict::Invalid(ExpressionError::Exponentiation.into());
        assert_eq!(verdict("36 ** 7 - 78 - 74"), exponent);
        assert_eq!(verdict("36 ^ 7 - 78 - 74"), exponent);
        assert_eq!(verdict("9**9**9**9"), exponent);
        assert_eq!(
            verdict("99999999999999999999999 - 1"),
            Verdict::Invalid(ExpressionError::NumberTooLarge { position: 0 }.into())
        );
    }

    #[test]
    fn overflow_is_reported_not_panicked() {
        let problem = CountdownProblem { numbers: vec![u32::MAX; 5], target: 1 };
        let product = ["4294967295"; 5].join(" * ");
        assert_eq!(verify_expression(&problem, &product), Verdict::Invalid(ExpressionError::Overflow.into()));
    }

    #[test]
    fn deep_and_unbalanced_parentheses_are_invalid() {
        let deep = format!("{}36 - 7 + 78 - 74{}", "(".repeat(60), ")".repeat(60));
        assert!(matches!(
            verdict(&deep),
            Verdict::Invalid(InvalidAnswer::Expression(ExpressionError::TooDeep { .. }))
        ));
        let very_deep = "(".repeat(100_000);
        assert!(matches!(
            verdict(&very_deep),
            Verdict::Invalid(InvalidAnswer::Expression(ExpressionError::TooLong { .. }))
        ));
        assert!(matches!(verdict("(36 - 7 + 78 - 74"), Verdict::Invalid(_)));
    }

    #[test]
    fn non_arithmetic_text_is_invalid() {
        for answer in [
            "36 - (7 - (78 - 74)) = 33",
            "The answer is 36 - (7 - (78 - 74))",
            "36 - (7 - (78 - 74));",
            "import os",
            "__import__('os')",
            "36.0 - (7 - (78 - 74))",
            "-(7 - 36 - (78 - 74))",
            "",
        ] {
            assert!(matches!(verdict(answer), Verdict::Invalid(_)), "{answer:?} gave {:?}", verdict(answer));
        }
    }

    #[test]
    fn the_last_answer_wins() {
        let response =
            "<think>x</think><answer>74 + 78 + 36 + 7</answer> no wait <answer>36 - (7 - (78 - 74))</answer>";
        assert!(verify_response(&problem(), response).is_correct());
        let reversed = "<answer>36 - (7 - (78 - 74))</answer><answer>74 + 78 + 36 + 7</answer>";
        assert!(!verify_response(&problem(), reversed).is_correct());
        assert_eq!(last_answer("<answer>a</answer><answer>b"), Some("a"));
        assert_eq!(last_answer("<answer>a<answer>b</answer>"), Some("b"));
        assert_eq!(last_answer("<answer>a</answer>x</answer>"), Some("a"));
        assert_eq!(last_answer("</answer><answer>"), None);
    }

    #[test]
    fn a_response_without_a_complete_answer_has_no_answer() {
        for response in
            ["<think>hmm</think> 36 - (7 - (78 - 74))", "<answer>36 - (7 - (78 - 74))", "", "</answer>"]
        {
            assert_eq!(verify_response(&problem(), response).verdict, Verdict::NoAnswer, "{response:?}");
        }
    }

    #[test]
    fn template_one_structure_is_well_formatted() {
        for response in [
            "<think>reasoning</think><answer>1 + 2</answer>",
            "  <think>\nreasoning\n</think>\n\n<answer> 1 + 2 </answer>\n",
            "<think></think><answer>anything</answer>",
        ] {
            assert!(is_well_formatted(response), "{response:?}");
        }
    }

    #[test]
    fn departures_from_template_one_are_not_well_formatted() {
        for response in [
            "<answer>1 + 2</answer>",
            "I think <think>r</think><answer>1 + 2</answer>",
            "<think>r</think> so the answer is <answer>1 + 2</answer>",
            "<think>r</think><answer>1 + 2</answer> done",
            "<think>r</think><answer>1 + 2</answer><answer>3</answer>",
            "<think>r<think>r</think><answer>1 + 2</answer>",
            "<think>r</think></think><answer>1 + 2</answer>",
            "<think>r</think><answer>  </answer>",
            "<think>r</think><answer>1 + 2",
            "<think>r<answer>1 + 2</answer>",
        ] {
            assert!(!is_well_formatted(response), "{response:?}");
        }
    }

    #[test]
    fn help_calling_responses_are_never_well_formatted() {
        let asks = format!("<think>stuck</think> {HELP_MARKER}");
        assert!(!is_well_formatted(&asks));
        let both = format!("<think>stuck {HELP_MARKER}</think><answer>36 - (7 - (78 - 74))</answer>");
        let check = verify_response(&problem(), &both);
        assert!(!check.well_formatted);
        assert!(check.is_correct(), "the answer is still graded; the reward decides what a help call earns");
    }

    #[test]
    fn random_text_never_panics() {
        let problem = problem();
        for text in random_texts(11, 10_000) {
            let _ = verify_response(&problem, &text);
            let _ = verify_expression(&problem, &text);
        }
    }
}

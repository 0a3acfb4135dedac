//! Grading the cloud's free-form answers, for the coordination reward.
//!
//! The cloud is asked the bare question with no system prompt, so it answers in its own words
//! ("36 − (7 − (78 − 74)) = 33", `\boxed{…}`, markdown). These graders look for the answer where a
//! model would put it, and only in the final answer: anything up to the last `</think>` is ignored.
//!
//! - Countdown: the first of these places that holds an expression over exactly the given numbers
//!   decides: the last `<answer>` block, then the last `\boxed{}`, then the lines of the response from
//!   the last one up. Within a place, the last such expression counts (a model's final word), and the
//!   answer is correct when its exact value is the target. Expressions are read with the strict
//!   verifier's parser after LaTeX and markdown operators (`\times`, `\div`, `\cdot`, `**bold**`,
//!   `$…$`) are rewritten, on each side of any `=`.
//! - MATH: the last `\boxed{}`, else the last number in the response, compared with
//!   [`crate::tasks::math::answers_match`].

use crate::tasks::countdown::verifier::last_answer;
use crate::tasks::countdown::{CountdownProblem, Expr};
use crate::tasks::math::{answers_match, last_boxed};
use crate::tasks::rational::Rational;
use crate::tasks::templates::THINK_CLOSE;

/// Whether a free-form response solves `problem`.
pub fn grade_countdown(problem: &CountdownProblem, response: &str) -> bool {
    countdown_expression(problem, response)
        .is_some_and(|expr| expr.value().is_ok_and(|value| value == Rational::from(problem.target)))
}

/// The expression a free-form response gives as its answer to `problem` (see the module
/// documentation for where it is looked for), whatever its value.
pub fn countdown_expression(problem: &CountdownProblem, response: &str) -> Option<Expr> {
    let response = final_part(response);
    let given = problem.sorted_numbers();
    [last_answer(response), last_boxed(response), Some(response)]
        .into_iter()
        .flatten()
        .find_map(|place| place.lines().rev().find_map(|line| expression_in_line(line, &given)))
}

/// Whether a free-form response gives the MATH answer `gold`.
pub fn grade_math(response: &str, gold: &str) -> bool {
    math_answer(response).is_some_and(|answer| answers_match(&answer, gold))
}

/// The answer a free-form MATH response gives: its last `\boxed{}`, else its last number.
pub fn math_answer(response: &str) -> Option<String> {
    let response = final_part(response);
    last_boxed(response).or_else(|| last_number(response)).map(str::to_string)
}

/// The text after the last `</think>`, where a reasoning model puts its answer.
fn final_part(response: &str) -> &str {
    response.rfind(THINK_CLOSE).map_or(response, |at| &response[at + THINK_CLOSE.len()..])
}

/// The last expression in `line` whose numbers are exactly `given` (sorted).
fn expression_in_line(line: &str, given: &[u32]) -> Option<Expr> {
    let cleaned = rewrite_notation(line);
    let chars: Vec<char> = cleaned.chars().collect();
    let mut runs = Vec::new();
    let mut start = None;
    for i in 0..=chars.len() {
        let inside = i < chars.len() && is_expression_char(&chars, i);
        match (inside, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push(chars[s..i].iter().collect::<String>());
                start = None;
            }
            _ => {}
        }
    }
    runs.iter().rev().find_map(|run| {
        let expr = Expr::parse(trim_run(run)).ok()?;
        let mut used = expr.numbers();
        used.sort_unstable();
        (used == given).then_some(expr)
    })
}

/// LaTeX and markdown spellings of the operators, rewritten to the parser's; other markup to spaces.
fn rewrite_notation(line: &str) -> String {
    let mut text = line.to_string();
    for (from, to) in [
        ("\\times", "*"),
        ("\\cdot", "*"),
        ("\\div", "/"),
        ("\\left", " "),
        ("\\right", " "),
        ("**", " "),
        ("\\(", " "),
        ("\\)", " "),
        ("\\[", " "),
        ("\\]", " "),
    ] {
        text = text.replace(from, to);
    }
    text.replace(['$', '`', '{', '}'], " ")
}

/// Whether `chars[i]` can be part of an expression. `x` counts only between operands (`3 x 4`).
fn is_expression_char(chars: &[char], i: usize) -> bool {
    match chars[i] {
        '0'..='9' | '+' | '-' | '−' | '–' | '*' | '×' | '/' | '÷' | '(' | ')' => true,
        'x' | 'X' => {
            let before = chars[..i].iter().rev().find(|c| !c.is_whitespace());
            let after = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            before.is_some_and(|c| c.is_ascii_digit() || *c == ')')
                && after.is_some_and(|c| c.is_ascii_digit() || *c == '(')
        }
        c => c.is_whitespace(),
    }
}

/// Drops what cannot begin or end an expression: operators (list bullets, dangling signs) and
/// parentheses left unmatched by the surrounding prose.
fn trim_run(run: &str) -> &str {
    let is_operator = |c: char| !c.is_ascii_digit() && c != '(' && c != ')';
    let mut run = run.trim_matches(is_operator);
    loop {
        let opens = run.matches('(').count();
        let closes = run.matches(')').count();
        let trimmed = if closes > opens && run.ends_with(')') {
            &run[..run.len() - 1]
        } else if opens > closes && run.starts_with('(') {
            &run[1..]
        } else {
            return run;
        };
        run = trimmed.trim_matches(is_operator);
    }
}

/// The last number in `text`: an optional minus, digits with optional thousands commas, a decimal
/// part or a `/denominator`.
fn last_number(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let last_digit = bytes.iter().rposition(u8::is_ascii_digit)?;
    let mut start = last_digit;
    while start > 0 && matches!(bytes[start - 1], b'0'..=b'9' | b',' | b'.' | b'/') {
        start -= 1;
    }
    while !bytes[start].is_ascii_digit() {
        start += 1;
    }
    let signed =
        start > 0 && bytes[start - 1] == b'-' && (start == 1 || !bytes[start - 2].is_ascii_alphanumeric());
    Some(&text[start - usize::from(signed)..=last_digit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::fuzz::random_texts;

    fn problem() -> CountdownProblem {
        CountdownProblem { numbers: vec![74, 78, 36, 7], target: 33 }
    }

    #[test]
    fn countdown_answers_are_found_in_free_form_text() {
        for response in [
            "36 − (7 − (78 − 74)) = 33",
            "Sure! Here is how.\n\n**Answer:** 36 - (7 - (78 - 74)) = 33",
            "The expression is $36 - (7 - (78 - 74)) = 33$.",
            "We need 33.\n\\[ 36 - \\left(7 - (78 - 74)\\right) = 33 \\]\nThat works.",
            "<answer> (78 - 74) + 36 - 7 </answer>",
            "So the answer is \\boxed{36 - (7 - (78 - 74))}",
            "33 = 36 - (7 - (78 - 74))",
            "- (78 - 74 + 36) - 7",
            "1. (78 - 74) × 36 ÷ 36 ... no.\n2. Final: (78 - 74) + 36 - 7.",
            "(the answer is 36 - (7 - (78 - 74)))",
            "<think>74 + 78 + 36 + 7 = 195 too big</think>\n36-(7-(78-74))",
        ] {
            assert!(
                grade_countdown(&problem(), response),
                "{response:?}: {:?}",
                countdown_expression(&problem(), response)
            );
        }
    }

    #[test]
    fn countdown_multiplication_signs_in_prose_are_read() {
        let problem = CountdownProblem { numbers: vec![75, 6, 2, 3], target: 152 };
        for response in [
            "(75 ÷ 3) × 6 + 2 = 152",
            "$(75 \\div 3) \\times 6 + 2 = 152$",
            "(75 / 3) x 6 + 2 = 152",
            "(75 / 3) \\cdot 6 + 2",
            "**(75/3)*6+2**",
        ] {
            assert!(grade_countdown(&problem, response), "{response:?}");
        }
    }

    #[test]
    fn the_final_expression_over_all_numbers_decides() {
        let wrong_last = "36 - (7 - (78 - 74)) = 33 is one idea, but I'll go with\n74 + 78 - 36 - 7 = 109";
        assert!(!grade_countdown(&problem(), wrong_last));
        let right_last = "74 + 78 - 36 - 7 = 109, no.\n36 - (7 - (78 - 74)) = 33\nCheck: 36 - 3 = 33.";
        assert!(grade_countdown(&problem(), right_last));
        let tagged_wins = "<answer>74 + 78 - 36 - 7</answer>\nOr: 36 - (7 - (78 - 74))";
        assert!(!grade_countdown(&problem(), tagged_wins));
    }

    #[test]
    fn countdown_answers_with_wrong_numbers_or_none_are_incorrect() {
        for response in [
            "",
            "I could not find a solution.",
            "78 - 74 = 4, 7 - 4 = 3, 36 - 3 = 33",
            "36 - (7 - (78 - 74)) + 0 = 33",
            "36 - (7 - (78 - 78)) = 33",
            "33",
            "\\boxed{33}",
            "36 ** 7 - 78 - 74",
        ] {
            assert!(!grade_countdown(&problem(), response), "{response:?}");
        }
    }

    #[test]
    fn math_answers_come_from_the_last_box_else_the_last_number() {
        let cases: &[(&str, &str, bool)] = &[
            ("Thus the answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", true),
            ("first \\boxed{3}, then corrected: \\boxed{4}", "4", true),
            ("first \\boxed{3}, then corrected: \\boxed{4}", "3", false),
            ("The total is 1,250 dollars.", "1250", true),
            ("So x = -3.", "-3", true),
            ("The ratio is 3/4.", "0.75", true),
            ("Area = 12.50 square units", "\\frac{25}{2}", true),
            ("We get 7 apples, then 9.", "7", false),
            ("<think>maybe 5</think>The answer is 6", "5", false),
            ("<think>maybe 5</think>The answer is 6", "6", true),
            ("x-3 and then 2-5", "5", true),
            ("no numbers at all", "5", false),
        ];
        for (response, gold, expected) in cases {
            assert_eq!(
                grade_math(response, gold),
                *expected,
                "{response:?} vs {gold:?}: {:?}",
                math_answer(response)
            );
        }
    }

    #[test]
    fn the_last_number_keeps_a_minus_sign_only_when_it_is_one() {
        assert_eq!(last_number("value -12"), Some("-12"));
        assert_eq!(last_number("x-12"), Some("12"));
        assert_eq!(last_number("it is 3.5."), Some("3.5"));
        assert_eq!(last_number("1,000,000!"), Some("1,000,000"));
        assert_eq!(last_number("...,5"), Some("5"));
        assert_eq!(last_number("none"), None);
    }

    #[test]
    fn random_text_never_panics() {
        let problem = problem();
        for text in random_texts(47, 10_000) {
            let _ = grade_countdown(&problem, &text);
            let _ = grade_math(&text, "7");
        }
    }
}

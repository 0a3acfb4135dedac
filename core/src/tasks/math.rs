//! MATH-style answers: extracting the last `\boxed{}`, normalising LaTeX answers, and comparing them.
//!
//! Normalisation follows the usual MATH (Hendrycks) string rules and adds exact numeric equality for
//! simple numbers: integers, decimals, `a/b`, `\frac{a}{b}` (and `\frac12`, `\dfrac`, `\tfrac`) are
//! rewritten to one canonical form, so `0.5`, `1/2`, `\frac{2}{4}` and `\dfrac12` are the same answer
//! and `5.0` is `5`. Beyond that, comparison is string equality after normalisation: there is no
//! symbolic algebra (`x + 1` and `1 + x` differ), which is the paper-era convention.

use crate::help_marker::HelpMarker;
use crate::tasks::rational::Rational;

const BOX_COMMANDS: [&str; 2] = ["\\boxed", "\\fbox"];
/// Commands whose argument is prose: a trailing one is a unit and is dropped, otherwise unwrapped.
const TEXT_COMMANDS: [&str; 5] = ["\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mbox"];
/// Removed wherever they occur (spacing, sizing, degree signs, currency and percent signs).
const REMOVED: [&str; 14] = [
    "\\displaystyle",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "^{\\circ}",
    "^\\circ",
    "\\circ",
    "\\$",
    "$",
    "\\%",
    "%",
    "~",
];
/// Most digits in a number compared numerically; longer ones are compared as text.
const MAX_DIGITS: usize = 30;

/// The content of the last `\boxed{…}` or `\fbox{…}` in `text` (braces balanced, `\{` and `\}`
/// ignored), or of the last `\boxed x` (up to the next `$` or line end). `None` when there is none or
/// the last one is cut off (an unclosed brace): a truncated final answer is no answer.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut starts: Vec<(usize, &str)> = BOX_COMMANDS
        .iter()
        .flat_map(|command| text.match_indices(command).map(move |(at, _)| (at, *command)))
        .collect();
    starts.sort_unstable_by_key(|&(at, _)| std::cmp::Reverse(at));
    for (at, command) in starts {
        match command_argument(&text[at + command.len()..]) {
            Argument::Found(content) => return Some(content.trim()),
            Argument::Unterminated => return None,
            Argument::NotThisCommand => continue,
        }
    }
    None
}

enum Argument<'a> {
    Found(&'a str),
    Unterminated,
    /// The name continues (`\boxedfoo`), so this was another command.
    NotThisCommand,
}

fn command_argument(after: &str) -> Argument<'_> {
    let trimmed = after.trim_start_matches([' ', '\t']);
    if let Some(group) = trimmed.strip_prefix('{') {
        return match braced(group) {
            Some((content, _)) => Argument::Found(content),
            None => Argument::Unterminated,
        };
    }
    if trimmed.len() == after.len() && after.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Argument::NotThisCommand;
    }
    let end = trimmed.find(['$', '\n']).unwrap_or(trimmed.len());
    match trimmed[..end].trim() {
        "" => Argument::Unterminated,
        content => Argument::Found(content),
    }
}

/// Splits `text` (just after an opening brace) at its matching closing brace: (content, rest).
fn braced(text: &str) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' if depth == 0 => return Some((&text[..i], &text[i + 1..])),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The canonical form of an answer (see the module documentation); equal forms are equal answers.
pub fn normalize_answer(answer: &str) -> String {
    let mut s = answer.trim();
    if BOX_COMMANDS.iter().any(|c| s.starts_with(c)) {
        s = last_boxed(s).unwrap_or(s);
    }
    let mut s = s.replace("\\\\", "\\").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    for removed in REMOVED {
        s = s.replace(removed, "");
    }
    s = remove_sizing(&s, "\\left");
    s = remove_sizing(&s, "\\right");
    s = unwrap_text(&s);
    s = strip_variable(&s);
    s.retain(|c| !c.is_whitespace());
    s = fix_arguments(&s, "\\frac", 2);
    s = fix_arguments(&s, "\\sqrt", 1);
    let s = s.strip_suffix('.').unwrap_or(&s);
    if let Some(letter) =
        s.strip_prefix('(').and_then(|s| s.strip_suffix(')')).filter(|l| is_single_letter(l))
    {
        return letter.to_string();
    }
    match simple_number(s) {
        Some(value) => canonical_number(value),
        None => s.to_string(),
    }
}

/// Whether `predicted` and `gold` are the same answer after normalisation. An empty gold matches
/// nothing.
pub fn answers_match(predicted: &str, gold: &str) -> bool {
    let gold = normalize_answer(gold);
    !gold.is_empty() && normalize_answer(predicted) == gold
}

/// The verdict on an on-device Template II response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MathCheck {
    /// The last boxed answer, if any.
    pub answer: Option<String>,
    /// Whether that answer matches the gold answer.
    pub correct: bool,
    /// A complete `\boxed{}` answer and no help call. (The paper's MATH runs weight format with 0.)
    pub well_formatted: bool,
}

/// Grades an on-device response against `gold`: only a boxed answer counts.
pub fn verify_response(response: &str, gold: &str) -> MathCheck {
    let answer = last_boxed(response);
    let correct = answer.is_some_and(|a| answers_match(a, gold));
    let well_formatted = answer.is_some() && HelpMarker::opening_in(response).is_none();
    MathCheck { answer: answer.map(str::to_string), correct, well_formatted }
}

/// Removes `\left` / `\right` where they size a delimiter (not `\leftarrow`).
fn remove_sizing(s: &str, command: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(command) {
        let after = &rest[at + command.len()..];
        out.push_str(&rest[..at]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(command);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `\text{…}`-like groups: dropped when they trail other content (a unit, possibly squared or cubed),
/// unwrapped otherwise.
fn unwrap_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('\\') {
        let name_len = rest[at + 1..].find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len() - at - 1);
        let command = &rest[at..at + 1 + name_len];
        let group = rest[at + command.len()..].trim_start().strip_prefix('{');
        let parsed = group.filter(|_| TEXT_COMMANDS.contains(&command)).and_then(braced);
        let Some((content, after)) = parsed else {
            out.push_str(&rest[..at + command.len()]);
            rest = &rest[at + command.len()..];
            continue;
        };
        out.push_str(&rest[..at]);
        let is_unit = !out.trim().is_empty() && matches!(after.trim(), "" | "^2" | "^3" | "^{2}" | "^{3}");
        if is_unit {
            rest = "";
        } else {
            out.push_str(content);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `x = 5` → `5`, when there is one `=` and a short name on its left (as the MATH grader does).
fn strip_variable(s: &str) -> String {
    match s.split_once('=') {
        Some((name, value)) if !value.contains('=') && name.trim().chars().count() <= 2 => value.to_string(),
        _ => s.to_string(),
    }
}

/// Braces the single-token arguments of `command`: `\frac12` → `\frac{1}{2}`, `\sqrt2` → `\sqrt{2}`.
/// Runs after whitespace removal.
fn fix_arguments(s: &str, command: &str, arguments: usize) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut rest = s;
    while let Some(at) = rest.find(command) {
        out.push_str(&rest[..at + command.len()]);
        rest = &rest[at + command.len()..];
        if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        let mut parsed = Vec::with_capacity(arguments);
        let mut cursor = rest;
        for _ in 0..arguments {
            let Some((argument, after)) = single_argument(cursor) else { break };
            parsed.push(argument);
            cursor = after;
        }
        if parsed.len() == arguments {
            for argument in parsed {
                out.push('{');
                out.push_str(argument);
                out.push('}');
            }
            rest = cursor;
        }
    }
    out.push_str(rest);
    out
}

/// One LaTeX argument at the start of `s`: a braced group, a command name, or one character.
fn single_argument(s: &str) -> Option<(&str, &str)> {
    if let Some(group) = s.strip_prefix('{') {
        return braced(group);
    }
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    let end = match first {
        '\\' => {
            let name_end = s[1..].find(|c: char| !c.is_ascii_alphabetic()).map_or(s.len(), |i| i + 1);
            if name_end == 1 { s[1..].chars().next().map_or(1, |c| 1 + c.len_utf8()) } else { name_end }
        }
        '}' | '^' | '_' | '[' => return None,
        c => c.len_utf8(),
    };
    Some((&s[..end], &s[end..]))
}

fn is_single_letter(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.next().is_none()
}

/// The exact value of an integer, decimal, `a/b` or `\frac{a}{b}` (optionally negative).
fn simple_number(s: &str) -> Option<Rational> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, s),
    };
    let value = if let Some(inner) = body.strip_prefix("\\frac{") {
        let (numer, rest) = inner.split_once("}{")?;
        Rational::new(integer(numer)?, integer(rest.strip_suffix('}')?)?).ok()?
    } else if let Some((numer, denom)) = body.split_once('/') {
        Rational::new(integer(numer)?, integer(denom)?).ok()?
    } else {
        decimal(body)?
    };
    if negative { Rational::ZERO.checked_sub(value).ok() } else { Some(value) }
}

fn integer(s: &str) -> Option<i128> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `12`, `12.50`, `.5`, `1,000` (commas only as thousands separators).
fn decimal(s: &str) -> Option<Rational> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let whole = if whole.contains(',') {
        let mut groups = whole.split(',');
        let first = groups.next()?;
        if first.is_empty() || first.len() > 3 || !groups.all(|g| g.len() == 3) {
            return None;
        }
        whole.replace(',', "")
    } else {
        whole.to_string()
    };
    let digits = format!("{whole}{fraction}");
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = 10i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    Rational::new(digits.parse().ok()?, scale).ok()
}

fn canonical_number(value: Rational) -> String {
    if value.is_integer() {
        return value.numer().to_string();
    }
    let sign = if value.is_negative() { "-" } else { "" };
    format!("{sign}\\frac{{{}}}{{{}}}", value.numer().unsigned_abs(), value.denom())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::help_marker::HELP_MARKER;
    use crate::tasks::fuzz::random_texts;

    #[test]
    fn the_last_boxed_answer_is_extracted_with_balanced_braces() {
        let cases: &[(&str, Option<&str>)] = &[
            ("so \\boxed{5}", Some("5")),
            ("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}.", Some("\\frac{1}{2}")),
            ("\\boxed{\\left\\{1, 2\\right\\}}", Some("\\left\\{1, 2\\right\\}")),
            ("\\boxed {7}", Some("7")),
            ("$\\boxed 42$ is it", Some("42")),
            ("\\fbox{x^{2}}", Some("x^{2}")),
            ("\\boxed{3} then \\fbox{4}", Some("4")),
            ("\\fbox{4} then \\boxed{3}", Some("3")),
            ("\\boxed{ 12 }", Some("12")),
            ("\\boxed{1} and \\boxedfoo", Some("1")),
            ("\\boxed{\\boxed{9}}", Some("9")),
            ("no box here: 5", None),
            ("\\boxed{5} but cut off \\boxed{\\frac{1}{", None),
            ("\\boxed", None),
            ("\\boxed{}", Some("")),
        ];
        for (text, expected) in cases {
            assert_eq!(last_boxed(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn equivalent_answers_match() {
        let pairs = [
            ("5", "5"),
            ("5.0", "5"),
            ("5.00", "5"),
            ("0.5", "\\frac{1}{2}"),
            (".5", "\\frac12"),
            ("1/2", "\\dfrac{1}{2}"),
            ("\\tfrac{2}{4}", "\\frac{1}{2}"),
            ("-0.5", "-\\frac{1}{2}"),
            ("\\frac{-1}{2}", "-\\frac{1}{2}"),
            ("-1/2", "\\frac{-1}{2}"),
            ("2.50", "\\frac{5}{2}"),
            ("\\frac{10}{5}", "2"),
            ("1,000", "1000"),
            ("\\$1,000.00", "1000"),
            ("50\\%", "50"),
            ("90^\\circ", "90"),
            ("90^{\\circ}", "90"),
            ("10\\text{ cm}", "10"),
            ("10 \\text{cm}^2", "10"),
            ("5\\mbox{ dollars}", "5"),
            ("\\text{Devon}", "Devon"),
            ("\\text{(C)}", "C"),
            ("x = 5", "5"),
            ("k=\\frac{3}{4}", "0.75"),
            ("\\left(1, 2\\right)", "(1,2)"),
            ("\\left[ 0, \\infty \\right)", "[0,\\infty)"),
            ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
            ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
            ("2\\sqrt2", "2\\sqrt{2}"),
            ("\\frac\\pi2", "\\frac{\\pi}{2}"),
            ("3\\!\\cdot\\!4", "3\\cdot4"),
            ("\\displaystyle \\frac{1}{3}", "\\frac{1}{3}"),
            ("$7$", "7"),
            ("7.", "7"),
            ("\\boxed{7}", "7"),
            ("x^2 + 1", "x^2+1"),
            ("\\sqrt[3] {8}", "\\sqrt[3]{8}"),
            ("\\textit{a} 5\\text{ cm}", "\\textit{a}5"),
        ];
        for (predicted, gold) in pairs {
            assert!(
                answers_match(predicted, gold),
                "{predicted:?} ({}) should match {gold:?} ({})",
                normalize_answer(predicted),
                normalize_answer(gold)
            );
        }
    }

    #[test]
    fn different_answers_do_not_match() {
        let pairs = [
            ("5", "6"),
            ("0.333", "\\frac{1}{3}"),
            ("\\frac{1}{2}", "\\frac{1}{3}"),
            ("-5", "5"),
            ("\\sqrt{2}", "2"),
            ("1,2", "12"),
            ("(1,2)", "[1,2]"),
            ("x+1", "1+x"),
            ("25", "2.5"),
            ("\\leftarrow", "arrow"),
            ("", ""),
            ("anything", ""),
            ("10 + 5", "10"),
        ];
        for (predicted, gold) in pairs {
            assert!(
                !answers_match(predicted, gold),
                "{predicted:?} ({}) must not match {gold:?} ({})",
                normalize_answer(predicted),
                normalize_answer(gold)
            );
        }
    }

    #[test]
    fn numbers_too_long_to_compare_exactly_are_compared_as_text() {
        let long = "1".repeat(40);
        assert!(answers_match(&long, &long));
        assert!(!answers_match(&long, &format!("{long}.0")));
    }

    #[test]
    fn an_on_device_response_is_graded_by_its_last_boxed_answer() {
        let check = verify_response("Step 1: halve it.\nStep 2: so \\boxed{0.5}.", "\\frac{1}{2}");
        assert_eq!(check, MathCheck { answer: Some("0.5".into()), correct: true, well_formatted: true });
        let unboxed = verify_response("Step 1: the answer is 1/2", "\\frac{1}{2}");
        assert!(!unboxed.correct && !unboxed.well_formatted && unboxed.answer.is_none());
        let help = verify_response(&format!("Step 1: hmm \\boxed{{3}} {HELP_MARKER}"), "3");
        assert!(help.correct && !help.well_formatted);
    }

    #[test]
    fn random_text_never_panics() {
        for text in random_texts(29, 10_000) {
            let _ = last_boxed(&text);
            let _ = answers_match(&text, "\\frac{1}{2}");
            let _ = answers_match("7", &text);
            let _ = verify_response(&text, &text);
        }
    }
}

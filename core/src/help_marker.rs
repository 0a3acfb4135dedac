//! The help marker: the text the on-device policy emits at the end of a response it cannot finish.
//!
//! Detection runs on generated text only. It tolerates small variations inside the tags (case,
//! spacing, punctuation, a typo or two) and reports where the marker begins, so the daemon can stop
//! generating as soon as the opening tag appears.

/// What the policy writes to ask the cloud for help.
pub const HELP_MARKER: &str = "<unknown> I need external assistance </unknown>";
/// The marker's opening tag; once generated, the response is a help request.
pub const HELP_OPEN_TAG: &str = "<unknown>";
/// The marker's closing tag.
pub const HELP_CLOSE_TAG: &str = "</unknown>";
const CANONICAL_INNER: &str = "i need external assistance";
/// Edits (insertions, deletions, substitutions) tolerated inside the tags.
const INNER_TYPOS: usize = 4;

/// Where a help marker was found in generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerMatch {
    /// Byte offset of the opening tag.
    pub start: usize,
    /// Byte offset just past the closing tag, or the end of the text when generation stopped at
    /// the opening tag.
    pub end: usize,
}

/// Finds help markers in generated text.
#[derive(Debug, Clone, Copy, Default)]
pub struct HelpMarker;

impl HelpMarker {
    /// The first help marker in `generated`: an opening tag followed either by nothing (generation
    /// stopped there), by a prefix of the marker (generation was cut short), or by text close to the
    /// canonical wording and a closing tag. `<unknown>` followed by unrelated text is not a marker.
    pub fn find_in(generated: &str) -> Option<MarkerMatch> {
        let lower = generated.to_ascii_lowercase();
        let mut from = 0;
        while let Some(rel) = lower[from..].find(HELP_OPEN_TAG) {
            let start = from + rel;
            let after = start + HELP_OPEN_TAG.len();
            let rest = &lower[after..];
            match rest.find(HELP_CLOSE_TAG) {
                Some(close) if inner_matches(&rest[..close]) => {
                    return Some(MarkerMatch { start, end: after + close + HELP_CLOSE_TAG.len() });
                }
                Some(_) => {}
                None if is_marker_prefix(rest) => return Some(MarkerMatch { start, end: generated.len() }),
                None => {}
            }
            from = after;
        }
        None
    }

    /// Byte offset where the opening tag begins in `generated`, if it has been generated.
    /// This is the stopping point for local generation.
    pub fn opening_in(generated: &str) -> Option<usize> {
        generated.to_ascii_lowercase().find(HELP_OPEN_TAG)
    }

    /// How many trailing bytes of `generated` could be the start of the opening tag (held back
    /// from a stream until it is clear they are not).
    pub fn pending_open_len(generated: &str) -> usize {
        let lower = generated.to_ascii_lowercase();
        (1..HELP_OPEN_TAG.len()).rev().find(|&n| lower.ends_with(&HELP_OPEN_TAG[..n])).unwrap_or(0)
    }
}

fn normalise(text: &str) -> String {
    let kept: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { ' ' }).collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn inner_matches(inner: &str) -> bool {
    edit_distance(&normalise(inner), CANONICAL_INNER) <= INNER_TYPOS
}

/// Whether `rest` (text after the opening tag, no closing tag) is empty or could still become the
/// canonical inner text.
fn is_marker_prefix(rest: &str) -> bool {
    let rest = normalise(rest);
    rest.is_empty() || CANONICAL_INNER.starts_with(&rest) || {
        let n = rest.len().min(CANONICAL_INNER.len());
        edit_distance(&rest, &CANONICAL_INNER[..n]) <= INNER_TYPOS.min(n / 4)
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            current[j + 1] =
                (previous[j] + usize::from(ca != *cb)).min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_marker_is_found_where_it_begins() {
        let text = format!("<think>no idea</think> {HELP_MARKER}");
        let m = HelpMarker::find_in(&text).unwrap();
        assert_eq!(m.start, "<think>no idea</think> ".len());
        assert_eq!(m.end, text.len());
    }

    #[test]
    fn small_variations_inside_the_tags_are_tolerated() {
        for text in [
            "<unknown>I need external assistance</unknown>",
            "<UNKNOWN>  i need  External Assistance. </Unknown>",
            "<unknown> I need externel assistence </unknown>",
            "<unknown> I need external assistance",
            "<unknown> I need ext",
            "<unknown>",
        ] {
            assert!(HelpMarker::find_in(text).is_some(), "{text:?} should be a help marker");
        }
    }

    #[test]
    fn unrelated_text_in_unknown_tags_is_not_a_marker() {
        for text in [
            "<unknown> the capital of France </unknown>",
            "<unknown> x = 3, so the answer is 7",
            "no marker here",
            "<unknow> I need external assistance </unknow>",
        ] {
            assert_eq!(HelpMarker::find_in(text), None, "{text:?} must not be a help marker");
        }
    }

    #[test]
    fn the_opening_tag_is_where_local_generation_stops() {
        assert_eq!(HelpMarker::opening_in("stuck. <unknown> I"), Some(7));
        assert_eq!(HelpMarker::opening_in("stuck."), None);
    }

    #[test]
    fn a_partial_opening_tag_is_held_back_from_the_stream() {
        assert_eq!(HelpMarker::pending_open_len("answer: <unk"), 4);
        assert_eq!(HelpMarker::pending_open_len("answer: <"), 1);
        assert_eq!(HelpMarker::pending_open_len("answer: 42"), 0);
    }
}

//! Stop strings: where generated text ends, and how much of its tail a stream must hold back.

/// A set of strings that end generation when they appear in generated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStrings {
    strings: Vec<String>,
}

impl StopStrings {
    /// Empty strings are ignored: they would stop everything immediately.
    pub fn new(strings: impl IntoIterator<Item = String>) -> Self {
        Self { strings: strings.into_iter().filter(|s| !s.is_empty()).collect() }
    }

    /// Byte offset of the earliest stop string in `text`, if any.
    pub fn find_in(&self, text: &str) -> Option<usize> {
        self.strings.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// How many trailing bytes of `text` could be the beginning of a stop string, and so must not
    /// be streamed yet. Always ends on a char boundary.
    pub fn pending_suffix_len(&self, text: &str) -> usize {
        let mut longest = 0;
        for stop in &self.strings {
            for (prefix_end, _) in stop.char_indices().skip(1) {
                if prefix_end > longest && text.ends_with(&stop[..prefix_end]) {
                    longest = prefix_end;
                }
            }
        }
        longest
    }

    /// Whether there are no stop strings.
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_string_wins() {
        let stops = StopStrings::new(["END".to_string(), "\n\n".to_string()]);
        assert_eq!(stops.find_in("abc\n\nxyzEND"), Some(3));
        assert_eq!(stops.find_in("abcENDx\n\n"), Some(3));
        assert_eq!(stops.find_in("nothing here"), None);
    }

    #[test]
    fn a_partial_stop_string_at_the_end_is_held_back() {
        let stops = StopStrings::new(["</answer>".to_string()]);
        assert_eq!(stops.pending_suffix_len("x = 3 </ans"), 5);
        assert_eq!(stops.pending_suffix_len("x = 3 <"), 1);
        assert_eq!(stops.pending_suffix_len("x = 3"), 0);
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let stops = StopStrings::new([String::new()]);
        assert!(stops.is_empty());
        assert_eq!(stops.find_in("abc"), None);
    }
}

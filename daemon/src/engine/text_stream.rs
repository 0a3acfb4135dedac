//! Incremental detokenisation: turning the growing text of one generated row into stream deltas.
//!
//! After every token the row's generated ids are decoded again and only the new suffix is sent.
//! Two kinds of tail are held back until the next token decides them: an incomplete UTF-8 character
//! (the tokenizer decodes half a character as U+FFFD) and anything that could be the start of a stop
//! string. Text that a stop string ends is never sent.

use tandem_core::generation::StopStrings;

const REPLACEMENT: char = '\u{FFFD}';

/// What the newest token did to a row's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextStep {
    /// Generation goes on; `delta` may be empty while a tail is held back.
    Continue { delta: String },
    /// A stop string appeared; the row's text ends at byte `end` and `delta` completes it.
    Stop { delta: String, end: usize },
}

/// Tracks how much of one row's text has been streamed.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    emitted: usize,
}

impl TextStream {
    /// Feeds the full decoded text of the generated ids so far.
    pub fn push(&mut self, text: &str, stops: &StopStrings) -> TextStep {
        if let Some(end) = stops.find_in(text) {
            let delta = self.advance(text, end);
            return TextStep::Stop { delta, end };
        }
        let mut end = text.len();
        while text[..end].ends_with(REPLACEMENT) {
            end -= REPLACEMENT.len_utf8();
        }
        end -= stops.pending_suffix_len(&text[..end]);
        TextStep::Continue { delta: self.advance(text, end) }
    }

    /// Sends everything not yet sent, held-back tails included (the row has ended).
    pub fn finish(&mut self, text: &str) -> String {
        self.advance(text, text.len())
    }

    /// Emits `text[emitted..end]`. Text already sent cannot be taken back: when earlier text changed
    /// under us (a tokenizer whose decoding of a prefix depends on what follows), the stream goes on
    /// from the next character boundary instead of slicing through a character.
    fn advance(&mut self, text: &str, end: usize) -> String {
        let mut from = self.emitted;
        while from < text.len() && !text.is_char_boundary(from) {
            from += 1;
        }
        if end <= from || !text.is_char_boundary(end) {
            return String::new();
        }
        let delta = text[from..end].to_string();
        self.emitted = end;
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()))
    }

    fn delta(step: TextStep) -> String {
        match step {
            TextStep::Continue { delta } => delta,
            TextStep::Stop { .. } => panic!("unexpected stop"),
        }
    }

    #[test]
    fn each_push_emits_only_the_new_suffix() {
        let mut s = TextStream::default();
        let none = stops(&[]);
        assert_eq!(delta(s.push("Hel", &none)), "Hel");
        assert_eq!(delta(s.push("Hello", &none)), "lo");
        assert_eq!(delta(s.push("Hello world", &none)), " world");
        assert_eq!(s.finish("Hello world"), "");
    }

    #[test]
    fn an_incomplete_utf8_character_is_held_back_until_complete() {
        let mut s = TextStream::default();
        let none = stops(&[]);
        assert_eq!(delta(s.push("caf\u{FFFD}", &none)), "caf");
        assert_eq!(delta(s.push("café", &none)), "é");
        assert_eq!(delta(s.push("café \u{FFFD}\u{FFFD}", &none)), " ");
        assert_eq!(delta(s.push("café 😀", &none)), "😀");
    }

    #[test]
    fn a_possible_stop_string_start_is_held_back() {
        let mut s = TextStream::default();
        let stop = stops(&["</answer>"]);
        assert_eq!(delta(s.push("42 </an", &stop)), "42 ");
        // It was not the stop string after all: the held text is released.
        assert_eq!(delta(s.push("42 </and>", &stop)), "</and>");
    }

    #[test]
    fn a_stop_string_ends_the_text_before_it() {
        let mut s = TextStream::default();
        let stop = stops(&["</answer>"]);
        assert_eq!(delta(s.push("42 </ans", &stop)), "42 ");
        assert_eq!(s.push("42 </answer> trailing", &stop), TextStep::Stop { delta: String::new(), end: 3 });
    }

    #[test]
    fn a_stop_string_in_one_token_emits_the_text_before_it() {
        let mut s = TextStream::default();
        let stop = stops(&["STOP"]);
        assert_eq!(delta(s.push("ab", &stop)), "ab");
        assert_eq!(s.push("abcdSTOPef", &stop), TextStep::Stop { delta: "cd".into(), end: 4 });
    }

    #[test]
    fn finishing_flushes_held_back_text() {
        let mut s = TextStream::default();
        let stop = stops(&["</answer>"]);
        assert_eq!(delta(s.push("x </", &stop)), "x ");
        assert_eq!(s.finish("x </"), "</");
    }

    #[test]
    fn text_that_changed_behind_the_stream_never_panics() {
        let mut s = TextStream::default();
        let none = stops(&[]);
        assert_eq!(delta(s.push("abc", &none)), "abc");
        // Decoding the longer sequence changed the sent text: byte 3 is now inside a character.
        assert_eq!(delta(s.push("éé", &none)), "");
        assert_eq!(delta(s.push("ééx", &none)), "x");
    }
}

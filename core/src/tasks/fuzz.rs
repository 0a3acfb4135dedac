//! Adversarial text for the no-panic tests: random concatenations of the fragments the parsers care
//! about (tags, operators, braces, LaTeX commands, huge numbers, multi-byte characters), with random
//! Unicode scalar values mixed in.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::help_marker::{HELP_MARKER, HELP_OPEN_TAG};

const FRAGMENTS: &[&str] = &[
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "<answer",
    "answer>",
    HELP_MARKER,
    HELP_OPEN_TAG,
    "\\boxed",
    "\\boxed{",
    "\\boxed ",
    "\\fbox{",
    "{",
    "}",
    "\\{",
    "\\}",
    "(",
    ")",
    "((((",
    "))))",
    "**",
    "^",
    "*",
    "/",
    "+",
    "-",
    "−",
    "–",
    "×",
    "÷",
    "x",
    "=",
    ".",
    ",",
    "0",
    "1",
    "7",
    "42",
    "99",
    "0.5",
    "4294967295",
    "99999999999999999999",
    "170141183460469231731687303715884105727",
    " ",
    "\t",
    "\n",
    "\\frac",
    "\\dfrac",
    "\\frac12",
    "\\text{",
    "\\left",
    "\\right",
    "\\sqrt",
    "\\!",
    "\\,",
    "$",
    "%",
    "\\%",
    "^\\circ",
    "\\",
    "é",
    "🦀",
    "\u{a0}",
    "\u{0}",
    "Step 1:",
];

/// `count` random texts, the same for the same `seed`.
pub(crate) fn random_texts(seed: u64, count: usize) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let pieces = rng.random_range(0..40);
            let mut text = String::new();
            for _ in 0..pieces {
                if rng.random_range(0..8) == 0 {
                    text.extend(char::from_u32(rng.random_range(0..0x11_0000)));
                } else {
                    text.push_str(FRAGMENTS[rng.random_range(0..FRAGMENTS.len())]);
                }
            }
            text
        })
        .collect()
}

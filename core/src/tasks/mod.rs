//! The training tasks: problems, prompt templates, answer checking and the collaboration-aware
//! reward of METHOD.md.
//!
//! - [`countdown`]: seeded generator, exhaustive solver and strict verifier for Countdown;
//! - [`math`]: `\boxed{}` extraction, normalisation and comparison for MATH-style answers;
//! - [`dataset`]: JSONL `{prompt, answer}` records, read from and written to caller-supplied streams;
//! - [`templates`]: Template I and II (with and without the help option) as chat messages;
//! - [`grading`]: grading the cloud's free-form answers;
//! - [`reward`]: the v1/v2 reward tables;
//! - [`rational`]: exact arithmetic shared by the checkers.

pub mod countdown;
pub mod dataset;
pub mod grading;
pub mod math;
pub mod rational;
pub mod reward;
pub mod templates;

#[cfg(test)]
mod fuzz;

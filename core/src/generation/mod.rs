//! Decoding rules shared by the engine and the trainer's evaluation: how the next token is chosen
//! from logits, and where generated text stops.

mod sampling;
mod stop_strings;

pub use sampling::{Decoding, SamplingError, SamplingParams, TokenSampler, softmax_probability};
pub use stop_strings::StopStrings;
